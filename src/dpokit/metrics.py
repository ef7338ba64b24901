"""Step metrics: accumulated over micro-batches and processes, then written to the console (under a
progress bar), `metrics.jsonl` (one JSON object per logged step, evaluation rows with an `eval/`
prefix) and the trackers of `output.report_to` (`dpokit.trackers`). Names follow TRL's so existing
dashboards read them. Generations of `train.sample_every` go to `samples.jsonl` and the trackers."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from dpokit.logps import SequenceLogps
from dpokit.objectives.losses import ObjectiveOutput
from dpokit.storage import disk_errors, json_text, text_lines

# DPO's metrics: summed per pair, then divided by the pair count
PAIR_SUMS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected")


@dataclass
class MicroBatch:
    """What a method computes on one micro-batch: per-item losses (with gradients in training), the
    sums of its metrics over the items, and the tokens it processed."""

    losses: torch.Tensor
    sums: dict[str, torch.Tensor]
    tokens: int


def pair_sums(out: ObjectiveOutput, policy: SequenceLogps) -> dict[str, torch.Tensor]:
    c, r = out.chosen_rewards.double(), out.rejected_rewards.double()
    return {"loss": out.losses.detach().double().sum(), "rewards/chosen": c.sum(), "rewards/rejected": r.sum(),
            "rewards/accuracies": (c > r).double().sum(), "rewards/margins": (c - r).sum(),
            "logps/chosen": policy.chosen.detach().double().sum(),
            "logps/rejected": policy.rejected.detach().double().sum()}


class MeanOver(str):
    """A metric name whose sum `MeanMetrics` divides by the sum of the count metric `over` rather than by
    the item count: a mean over some of the items (KTO's desirable completions)."""

    over: str

    def __new__(cls, name: str, over: str) -> MeanOver:
        self = super().__new__(cls, name)
        self.over = over
        return self


class MeanMetrics:
    """Per-item metrics summed over micro-batches and processes (one all-reduce), then divided by the
    number of items (a `MeanOver` name: by its count). `names` fixes the order, the same on every rank."""

    def __init__(self, names: tuple[str, ...], device):
        self.names = names
        self.sums = torch.zeros(len(names) + 2, dtype=torch.float64, device=device)  # + items, tokens

    def add(self, micro: MicroBatch) -> None:
        self.sums[:-2] += torch.stack([micro.sums[n].double() for n in self.names]).to(self.sums.device)
        self.sums[-2] += len(micro.losses)
        self.sums[-1] += micro.tokens

    def result(self, runtime, unit: str) -> dict[str, float]:
        """Means per item, the item count as `unit` and the token count as `tokens`."""
        sums = runtime.all_reduce_sum(self.sums.clone())
        items = sums[-2].item()
        counts = {name: (sums[self.names.index(name.over)].item() if isinstance(name, MeanOver) else items)
                  for name in self.names}
        row = {str(name): (sums[i].item() / counts[name] if counts[name] else math.nan)
               for i, name in enumerate(self.names)}
        row[unit] = int(items)
        row["tokens"] = int(sums[-1].item())
        return row


class MetricsWriter:
    """Rank 0 writes; other ranks hold a writer that does nothing."""

    def __init__(self, run_dir: Path, *, enabled: bool, trackers: list, total_steps: int, resume_step: int = 0,
                 desc: str = "dpo"):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.samples_path = Path(run_dir) / "samples.jsonl"
        self.trackers = trackers  # opened by the trainer (`trackers.open_trackers`); closed here
        self.bar = None
        if not enabled:
            return
        with disk_errors(self.path):
            if resume_step:
                _truncate_after(self.path, resume_step)
                _truncate_after(self.samples_path, resume_step)
            self.file = self.path.open("a", encoding="utf-8")
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=resume_step, desc=desc, unit="step", dynamic_ncols=True,
                        mininterval=1.0)

    def log(self, row: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        step = row["step"]
        out = {k if k in ("step", "epoch") else prefix + k: v for k, v in row.items()}
        with disk_errors(self.path):
            self.file.write(json_text(out) + "\n")
            self.file.flush()
        for tracker in self.trackers:
            tracker.log_metrics(out, step)
        if prefix:
            self.echo(f"[{prefix.rstrip('/')} step {step}] " + _short(row))
        elif self.bar is not None:
            self.bar.set_postfix_str(_short(row), refresh=False)

    def log_samples(self, rows: list[dict], step: int) -> None:
        """Generations at `step` (`train.sample_every`): appended to samples.jsonl, a table in each tracker."""
        if not self.enabled:
            return
        with disk_errors(self.samples_path), self.samples_path.open("a", encoding="utf-8") as f:
            f.write("".join(json_text(row, ensure_ascii=False) + "\n" for row in rows))
        for tracker in self.trackers:
            tracker.log_samples(rows, step)

    def finish(self, model_dir: Path | None) -> None:
        """The exported model's path, to every tracker."""
        if self.enabled:
            for tracker in self.trackers:
                tracker.finish(model_dir)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def echo(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled or self.file.closed:
            return
        if self.bar is not None:
            self.bar.close()
        with contextlib.suppress(OSError):  # a full disk: the write that failed was reported already
            self.file.close()
        for tracker in self.trackers:
            tracker.close()


def _short(row: dict) -> str:
    keys = (("loss", "loss"), ("rewards/accuracies", "acc"), ("rewards/margins", "margin"), ("reward", "reward"),
            ("kl", "kl"), ("grad_norm", "gnorm"))
    rates = [(k, k.replace("_per_s", "/s")) for k in row if k.endswith("_per_s") and k != "tokens_per_s"]
    return " ".join(f"{label}={row[k]:.4g}" for k, label in (*keys, *rates) if isinstance(row.get(k), (int, float)))


def _truncate_after(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint: they will be logged again. A last row cut short by
    the kill is dropped too; the file is replaced whole, so a second kill leaves the old one or the new."""
    if not path.is_file():
        return
    lines = [line for line in text_lines(path.read_text(encoding="utf-8")) if line.strip()]
    kept = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):  # the write the kill interrupted
                break
            raise
        if row.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in text_lines(path.read_text(encoding="utf-8")) if line.strip()]
