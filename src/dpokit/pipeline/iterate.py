"""`dpokit iterate`: iterative DPO in rounds (Xiong et al. 2024; Dong et al. 2024, "RLHF Workflow"), each
round a run directory `<output.dir>/round-R` made of the commands' own steps:

    sample   `online.samples` = K completions of every prompt of `data.train` (or of the round's
             `iterate.prompts_per_round` of them) from the latest policy (the start model in round 1),
             `online.temperature`, `online.top_p`, `online.max_new_tokens`
    label    the judge (`online.judge`, ...) scores them, less `online.missing_eos_penalty` for a sample cut
             without EOS; best-vs-worst pairs, or all pairs over `online.margin` (`online.pairing`); ties and
             near-ties dropped and counted
    train    DPO (every `objective` and `train` setting) on those pairs for `train.epochs`, from the latest
             policy, against the start model or the previous round's policy (`iterate.reference`)

A finished round (its exported model) is never redone: rerunning the command continues with the first
unfinished round, whose sampling resumes where it stopped and whose training resumes from its last
checkpoint with `--resume` (or starts over with `output.overwrite=true`).

Under torchrun (`torchrun -m dpokit iterate CONFIG`) the process group starts once, as the trainer starts it:
rank 0 alone samples, judges and writes a round's files while the others wait for it, then every rank
trains the round's DPO (DDP or FSDP2, `distributed.*`), so 2 ranks give 1 rank's files and weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from dpokit import host_memory
from dpokit.config import Config
from dpokit.config_checks import check_config
from dpokit.config_loader import set_value
from dpokit.errors import ConfigError
from dpokit.generation.pairs import label_file
from dpokit.generation.settings import SamplingSettings
from dpokit.rundir import RunDir

# a round's files in its run directory, beside the DPO run's own
PROMPTS, SAMPLES, SCORED, PAIRS = "prompts.jsonl", "samples.jsonl", "scored.jsonl", "pairs.jsonl"


@dataclass
class Round:
    index: int
    run_dir: Path
    policy_from: str  # the model it sampled from and trained from
    reference: str
    mean_score: float  # the judge's mean over the round's samples
    pairs: int
    resumed: bool  # finished by an earlier invocation: nothing redone


def check(cfg: Config) -> None:
    """The settings iterate reads, before anything loads."""
    o = cfg.online
    if o.judge is None:
        raise ConfigError("dpokit iterate needs a judge to rank each round's samples: online.judge=sentiment|length|"
                          "keywords|module:function, or online.judge=reward-model with online.judge_model=DIR")
    from dpokit.generation.judges import check_scoring_judge  # judges load torch

    check_scoring_judge(o.judge, o.judge_options, "online.judge")
    if cfg.reference.name is not None:
        raise ConfigError("dpokit iterate sets each round's reference (iterate.reference: start or previous); leave "
                          "reference.name unset")


def iterate(cfg: Config, *, resume: bool = False, echo=print) -> list[Round]:
    """All `iterate.rounds` rounds; the policy of the last is `<output.dir>/round-R/model`."""
    from dpokit.distributed import init_runtime
    from dpokit.generation.jsonl import read_jsonl
    from dpokit.generation.judges import configured_judge
    from dpokit.generation.sampling import sample_file
    from dpokit.methods.dpo import DPO
    from dpokit.trainer import train

    check(cfg)
    DPO.check(cfg)
    if cfg.train.huge_pages:  # before the first round's sampling allocates a tensor, after which it is too late
        host_memory.huge_pages()
    o, out = cfg.online, Path(cfg.output.dir)
    # the trainer's process group, started here once: each round's `train` joins it (and leaves it open)
    rt = init_runtime(cfg.distributed.strategy, cfg.distributed.backend)
    try:
        judge = configured_judge(o.judge, o.judge_model, o.judge_options, "online.judge") if rt.is_main else None
        start, policy, rounds = cfg.model.name, cfg.model.name, []
        for r in range(1, cfg.iterate.rounds + 1):
            run_dir = out / f"round-{r}"
            reference = start if cfg.iterate.reference == "start" else policy
            done = rank0_says(rt, rt.is_main and RunDir(run_dir).finished_step() is not None)
            if not done:
                failure = None
                if rt.is_main:  # one process samples and writes the round's files; the others wait for them
                    try:
                        echo(f"[round {r}/{cfg.iterate.rounds}] sample {o.samples} completions a prompt from {policy}")
                        settings = SamplingSettings(n=o.samples, temperature=o.temperature, top_p=o.top_p,
                                                    max_new_tokens=o.max_new_tokens, seed=cfg.train.seed * 1_000 + r,
                                                    batch_size=max(o.samples, cfg.train.micro_batch_size * o.samples),
                                                    template=o.template)
                        run_dir.mkdir(parents=True, exist_ok=True)
                        sample_file(policy, round_prompts(cfg, r, run_dir), run_dir / SAMPLES, settings)
                        summary = label_file(run_dir / SAMPLES, run_dir / PAIRS, judge, mode=o.pairing,
                                             margin=o.margin, scored_out=run_dir / SCORED,
                                             missing_eos_penalty=o.missing_eos_penalty or 0.0)
                        echo(f"[round {r}/{cfg.iterate.rounds}] {summary.counts.summary()}; train DPO against "
                             f"{reference}")
                    except BaseException as e:  # the others are told, not left waiting
                        failure = e
                if not rank0_says(rt, failure is None):
                    if failure is not None:
                        raise failure
                    raise RuntimeError(f"dpokit iterate: rank 0 failed to sample or label round {r} (its error "
                                       "is in its output)")
                train(round_config(cfg, run_dir, policy=policy, reference=reference, start=start), resume=resume,
                      method="dpo")
            scores = [s for row in read_jsonl(run_dir / SCORED) for s in row["scores"]]
            pairs = len(read_jsonl(run_dir / PAIRS))
            rounds.append(Round(r, run_dir, policy, reference, sum(scores) / len(scores), pairs, done))
            policy = str(run_dir / "model")
        rt.barrier()
    finally:
        rt.close()
    return rounds


def round_prompts(cfg: Config, r: int, run_dir: Path) -> str | Path:
    """The prompt file round `r` samples: data.train, or its r-th slice of `iterate.prompts_per_round`
    prompts (wrapping at its end), written to the round's directory."""
    per_round = cfg.iterate.prompts_per_round
    if per_round == 0:
        return cfg.data.train
    from dpokit.generation.jsonl import write_jsonl
    from dpokit.generation.prompts import read_prompts

    prompts = read_prompts(cfg.data.train)
    chosen = [prompts[i % len(prompts)] for i in range((r - 1) * per_round, r * per_round)]
    write_jsonl(run_dir / PROMPTS, [{"prompt": p} for p in chosen])
    return run_dir / PROMPTS


def rank0_says(rt, flag: bool) -> bool:
    """Rank 0's `flag` on every rank (a collective: every rank calls it); the flag itself in one process."""
    if not rt.distributed:
        return flag
    import torch

    return bool(rt.broadcast(torch.tensor([int(flag)], device=rt.device)).item())


def round_config(cfg: Config, run_dir: Path, *, policy: str, reference: str, start: str) -> Config:
    """The DPO run of one round: its pairs, its run directory, trained from `policy` against `reference`."""
    c = copy.deepcopy(cfg)
    set_value(c, "data.train", str(run_dir / PAIRS), source="iterate")
    set_value(c, "output.dir", str(run_dir), source="iterate")
    set_value(c, "model.name", policy, source="iterate")
    if reference != policy:  # a round after the first, against the start model
        set_value(c, "reference.name", reference, source="iterate")
    check_config(c)
    return c
