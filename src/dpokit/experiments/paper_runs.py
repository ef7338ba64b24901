"""What `make paper` trains (`paper.py` plans and runs it, `paper_report.py` reports on it): every
configuration tried, as a `Run` of a series, the settings each run's command gets and where its run
directories are; the judges and KL limits the comparison is read at."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dpokit.experiments import demo

JUDGE = demo.JUDGE
SECOND_JUDGE = "afinn"  # reported beside VADER, trained on by nothing: over-optimisation shows as a gap
KL_BINS = (2.0, 5.0, 10.0)  # best reward at KL ≤ each, nats


@dataclass(frozen=True)
class Run:
    """One training run of the comparison: its series on the frontier and the command that trains it."""

    series: str
    name: str  # directory under the experiment's runs/
    trainer: str  # dpokit command: train | sft | reward | ppo | online | iterate
    config: str
    overrides: tuple[str, ...]
    reward: str = "pairs"  # what it learns from: pairs (the labelled samples), model (the learned reward model), judge
    setting: str = ""  # the configuration, in words, for the table

    @property
    def needs_reward_model(self) -> bool:
        return self.reward == "model"


def runs(configs: Path, *, dpo: list[tuple[float, float]], alphas: list[float], kl_coefs: list[float],
         online_betas: list[float]) -> list[Run]:
    """Every configuration tried, grouped by series: DPO's (β, lr) sweep, the baselines, PPO's β_KL sweep and
    PPO-GT, and online and iterative DPO with each reward. The on-policy methods are tuned alike: with the
    learned reward, PPO sweeps β_KL and online and iterative DPO sweep β, as many values each; against the
    judge itself each runs the first value of its sweep."""
    out = [Run("DPO", f"dpo-beta{b:g}-lr{lr:g}", "train", str(configs / "dpo.yaml"),
               (f"objective.beta={b}", f"train.lr={lr}"), setting=f"β {b:g}, lr {lr:g}") for b, lr in dpo]
    out.append(Run("Preferred-FT", "preferred-ft", "sft", str(configs / "preferred_ft.yaml"), (), setting="lr 1e-4"))
    out += [Run("Unlikelihood", f"unlikelihood-alpha{a:g}", "train", str(configs / "unlikelihood.yaml"),
                (f"objective.unlikelihood_alpha={a}",), setting=f"α {a:g}") for a in alphas]
    out += [Run("PPO", f"ppo-kl{k:g}", "ppo", str(configs / "ppo.yaml"), (f"ppo.kl_coef={k}",), reward="model",
                setting=f"β_KL {k:g}") for k in kl_coefs]
    out.append(Run("PPO-GT", "ppo-gt", "ppo", str(configs / "ppo.yaml"), (f"ppo.kl_coef={kl_coefs[0]}",),
                   reward="judge", setting=f"β_KL {kl_coefs[0]:g}"))
    on_policy = (("Online DPO", "online", "online_dpo.yaml", ""),
                 ("Iterative DPO", "iterate", "iterate.yaml", "3 rounds of 85 openings, "))
    for reward, suffix, betas in (("model", "", online_betas), ("judge", "-GT", online_betas[:1])):
        tag = "rm" if reward == "model" else "gt"
        out += [Run(f"{method}{suffix}", f"{trainer}-{tag}-beta{b:g}", trainer, str(configs / config),
                    (f"objective.beta={b}",), reward=reward, setting=f"{rounds}β {b:g}, lr 1e-4, K 4")
                for method, trainer, config, rounds in on_policy for b in betas]
    return out


def run_overrides(run: Run, out: Path, *, model: str, train_prompts: Path, max_new_tokens: int,
                  seed: int) -> list[str]:
    """A run's command-line settings: its data, its reward, its seed and its directory."""
    where = [*run.overrides, f"train.seed={42 + seed}", f"output.dir={out / 'runs' / run.name}"]
    if run.reward == "pairs":
        # the DPO sweep's runs share one set of pairs and one reference: its log-probs are computed once a seed
        shared = [f"reference.cache_dir={out / 'reference-logps'}"] if run.series == "DPO" else []
        return [f"model.name={model}", f"data.train={out / 'pairs_train.jsonl'}",
                f"data.eval={out / 'pairs_heldout.jsonl'}", *shared, *where]
    # PPO, online and iterative DPO learn on the training openings; their rollouts as long as the evaluation's
    section = "ppo" if run.trainer == "ppo" else "online"
    judge = ([f"{section}.judge=reward-model", f"{section}.judge_model={out / 'runs' / 'reward' / 'model'}"]
             if run.needs_reward_model else [f"{section}.judge={JUDGE}"])
    return [f"model.name={model}", f"data.train={train_prompts}", f"{section}.max_new_tokens={max_new_tokens}",
            *judge, *where]


def run_paths(run: Run, out: Path) -> list[Path]:
    """The run directories of a run: one, or an iterative run's rounds."""
    base = out / "runs" / run.name
    if run.trainer != "iterate":
        return [base]
    return sorted((base.glob("round-*")), key=lambda p: int(p.name.split("-")[1])) or [base / "round-1"]


def read_selection(select_dir: Path) -> dict[str, dict]:
    path = select_dir / "selection.json"
    return json.loads(path.read_text()) if path.is_file() else {}
