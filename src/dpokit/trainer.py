"""The training loop every method shares: step scheduling, accumulation, clipping, the non-finite guard,
evaluation cadence, checkpoints and exact resume, signals, metrics and export. A method (`dpokit.methods`,
looked up by name in `methods.registry`) supplies its data, its models and its micro-batch → losses and
metrics through the hooks of `methods.base.Method`; the loop never asks which method it runs."""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpokit import checkpoint, host_memory, models
from dpokit.config import Config
from dpokit.config_checks import check_config, check_runtime
from dpokit.config_loader import config_from_dict
from dpokit.data.tokenize import use_chat_template
from dpokit.distributed import Runtime, decoder_layer_classes, init_runtime
from dpokit.errors import ConfigError, TrainingError
from dpokit.export import export, save_pretrained
from dpokit.generation.training_samples import TrainingSamples
from dpokit.logps import causal_lm
from dpokit.methods.base import Method
from dpokit.methods.registry import METHODS, method_class
from dpokit.metrics import MeanMetrics, MetricsWriter
from dpokit.optim import OptimizerInBackward, build_optimizer, build_scheduler
from dpokit.rundir import RunDir, Start
from dpokit.signals import StopSignals
from dpokit.trackers import open_trackers

# keys that may change between a run and its resumption without changing its results
RESUMABLE_CHANGES = ("checkpoint.", "output.report_to", "output.project", "output.run_name", "output.wandb_mode",
                     "output.mlflow_tracking_uri", "train.sample_", "output.overwrite", "train.max_steps", "train.eval_every", "train.log_every",
                     "train.max_nonfinite_steps", "distributed.backend")


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path | None
    steps: int
    eval_before: dict = field(default_factory=dict)
    eval_after: dict = field(default_factory=dict)
    last_train: dict = field(default_factory=dict)
    nonfinite_steps: int = 0
    stopped_by_signal: bool = False
    already_finished: bool = False  # --resume on a run with nothing left to do


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto` picks bf16 autocast only where bf16 matmul is fast: a bf16-capable GPU, or a CPU with AMX or
    AVX512-BF16 (the DPO step measured 1.8× fp32's speed on an AMX Xeon, 1.45× on an AVX512-BF16 EPYC; a CPU
    with neither ran bf16 matmul at 15% of fp32's)."""
    if requested != "auto":
        return requested
    return "bf16-mixed" if models.fast_bf16(device) else "fp32"


def train(cfg: Config, *, resume: bool = False, method: str | type[Method] = "dpo") -> TrainResult:
    """Train as `cfg` says with `method` (a registry name, `dpo`, `sft`, `reward`, `ppo`, or a Method class):
    what `dpokit train | sft | reward | ppo CONFIG` runs. Every config check runs before anything loads."""
    method = method_class(method)
    check_config(cfg)
    method.check(cfg)
    runtime = init_runtime(cfg.distributed.strategy, cfg.distributed.backend)
    try:
        check_runtime(cfg, runtime)
        trainer = Trainer(cfg, runtime, resume=resume, method=method)
        try:
            return trainer.run()
        finally:
            trainer.close()
    finally:
        runtime.close()


class Trainer:
    def __init__(self, cfg: Config, runtime: Runtime, *, resume: bool = False, method: str | type[Method] = "dpo"):
        self.cfg, self.rt = cfg, runtime
        self.output = RunDir(cfg.output.dir)
        self.run_dir = self.output.path
        self.writer: MetricsWriter | None = None
        if runtime.is_main:  # under torchrun one lock for the run: rank 0's
            self.output.lock()
        try:
            self._set_up(resume, method_class(method))
        except BaseException:
            self.close()
            raise

    def _set_up(self, resume: bool, method: type) -> None:
        cfg, t, runtime = self.cfg, self.cfg.train, self.rt
        if runtime.is_main:
            self.output.refuse_reuse(resume=resume, overwrite=cfg.output.overwrite)
        self.precision = resolve_precision(t.precision, runtime.device)
        if t.release_freed_memory and runtime.device.type == "cpu" and not host_memory.release_freed_memory():
            warnings.warn("train.release_freed_memory: this C library has no mallopt; freed memory stays in the heap",
                          stacklevel=2)
        if t.reuse_freed_memory and runtime.device.type == "cpu" and not host_memory.reuse_freed_memory():
            warnings.warn("train.reuse_freed_memory: this C library has no mallopt; large blocks are mapped anew",
                          stacklevel=2)
        if t.huge_pages and runtime.device.type == "cpu" and not host_memory.huge_pages():
            warnings.warn(f"train.huge_pages: PyTorch's CPU allocator started before the trainer asked for huge pages; "
                          f"set {host_memory.THP_SWITCH}=1 in the environment to have them", stacklevel=2)
        torch.manual_seed(t.seed)

        with runtime.main_first():  # the first load may convert the GGUF default model
            self.tokenizer = models.load_tokenizer(cfg.model.name, revision=cfg.model.revision,
                                                   trust_remote_code=cfg.model.trust_remote_code)
        use_chat_template(self.tokenizer, cfg.data.chat_template)
        self.method = method(cfg, runtime, self.tokenizer)
        self.steps_per_epoch = math.ceil(len(self.method.train_set) / t.batch_size)
        total = t.epochs * self.steps_per_epoch
        self.total_steps = min(total, t.max_steps) if t.max_steps else total
        self.method.total_steps = self.total_steps  # a schedule of the method's own (online DPO's β) reads it
        self.start = self._plan_start(resume)
        if not self.start.fresh:
            self.output.check_method(self.method.name, command=lambda m: METHODS[m].command if m in METHODS else m)
        saved = None if self.start.fresh else self.output.saved_config()
        if saved is not None:
            _check_resumable(config_from_dict(saved), cfg)
        if self.start.finished_step is not None:
            return
        ckpt = self.start.checkpoint
        self.policy = self.method.build(precision=self.precision, autocast=self.autocast, echo=self._echo,
                                        resume_from=ckpt / "model" if ckpt else None)
        # DDP/FSDP around the policy: forward and backward go through it, the policy's own state is saved
        self.wrapped_policy = runtime.wrap(self.policy,
                                           layer_classes=decoder_layer_classes(causal_lm(self.policy.model)),
                                           cpu_offload=cfg.distributed.cpu_offload)
        self.params = [p for p in self.wrapped_policy.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, t)
        self.in_backward = isinstance(self.optimizer, OptimizerInBackward)
        self.scheduler = build_scheduler(self.optimizer, t, self.total_steps)
        self.step, self.nonfinite = 0, 0
        if ckpt is not None:
            self._restore(ckpt)
        # generations during training: rank 0's, its judge loaded before anything is written
        self.samples = TrainingSamples.from_config(cfg, self.tokenizer, self.method.eval_set) if runtime.is_main else None
        # the model and data loaded: from here on the run directory is written
        trackers = []
        if runtime.is_main:
            self.output.start(self.start, cfg.to_dict(), self.method.name)
            try:
                self.method.write_report(self.run_dir)
                files = [self.run_dir / name for name in ("config.yaml", "data_report.json")]
                trackers = open_trackers(cfg.output, self.run_dir, cfg.to_dict(), [f for f in files if f.is_file()],
                                         resume_step=self.step)
            except BaseException:
                if self.start.fresh:  # nothing of this run is left behind to be refused or resumed
                    self.output.unstart()
                raise
        runtime.barrier()
        self.writer = MetricsWriter(self.run_dir, enabled=runtime.is_main, trackers=trackers,
                                    total_steps=self.total_steps, resume_step=self.step, desc=self.method.name)

    def autocast(self):
        """bf16 autocast under train.precision=bf16-mixed; a no-op otherwise."""
        return torch.autocast(self.rt.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16-mixed")

    def offload(self):
        """train.activation_offload: the tensors autograd saves for the backward pass go to pinned CPU memory
        and come back when it needs them (torch.autograd.graph.save_on_cpu); a no-op otherwise."""
        if not self.cfg.train.activation_offload:
            return contextlib.nullcontext()
        return torch.autograd.graph.save_on_cpu(pin_memory=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.output.release()

    # ----------------------------------------------------------------------------------- the loop

    def run(self) -> TrainResult:
        t = self.cfg.train
        if self.start.finished_step is not None:
            self._echo(f"{self.run_dir} finished at step {self.start.finished_step} of {self.total_steps}: nothing "
                       "left to do (raise train.max_steps to continue it)")
            return TrainResult(self.run_dir, self.run_dir / "model", self.start.finished_step, already_finished=True)
        self.writer.echo(self._banner())
        result = TrainResult(self.run_dir, None, self.step)
        has_eval = bool(self.method.eval_set)
        if has_eval and self.step == 0:
            result.eval_before = self.evaluate()
            self.writer.log({"step": 0, "epoch": 0.0, **result.eval_before}, prefix="eval/")
        if self.step == 0:
            self.log_samples()
        # a resumed run whose steps were all done (stopped during its final evaluation) exports at its step
        row: dict = {"step": self.step, "epoch": self.step / self.steps_per_epoch}
        every = self.cfg.checkpoint.every
        saved = self.step if self.start.checkpoint is not None else None  # the step of the newest checkpoint
        with StopSignals() as stop:  # to the end: a signal during the final evaluation or export kills nothing
            while self.step < self.total_steps and not result.stopped_by_signal:
                row = self.train_step(self._step_items(self.step))
                self.step += 1
                self.writer.advance()
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    self.writer.log(row)
                if has_eval and t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
                    self.writer.log({"step": self.step, "epoch": row["epoch"], **self.evaluate()}, prefix="eval/")
                if t.sample_every and (self.step % t.sample_every == 0 or self.step == self.total_steps):
                    self.log_samples()
                result.stopped_by_signal = self._agree(stop.requested)
                if result.stopped_by_signal or (every and self.step % every == 0):
                    self.save_checkpoint()
                    saved = self.step
            result.steps, result.last_train, result.nonfinite_steps = self.step, row, self.nonfinite
            if not result.stopped_by_signal and has_eval:
                result.eval_after = self.evaluate()
                # stopped during it: the steps are kept in a checkpoint, and --resume evaluates and exports
                result.stopped_by_signal = self._agree(stop.requested)
                if result.stopped_by_signal and saved != self.step:
                    self.save_checkpoint()
                if not result.stopped_by_signal:
                    self.writer.log({"step": self.step, "epoch": self.step / self.steps_per_epoch,
                                     **result.eval_after}, prefix="eval/")
            if not result.stopped_by_signal:  # a signal during the export lets it finish: the run is then done
                result.model_dir = self._export({**row, **{f"eval/{k}": v for k, v in result.eval_after.items()}})
        if result.stopped_by_signal:
            self.writer.echo(f"stopped by {stop.signal_name} at step {self.step}; checkpoint written, continue with "
                             "--resume")
            return result
        self.writer.finish(result.model_dir)
        return result

    @torch.no_grad()
    def log_samples(self) -> None:
        """train.sample_every: the policy's generations for the held-out prompts, on rank 0."""
        if self.samples is None:
            return
        with self.autocast():
            rows, metrics = self.samples.generate(self.policy.model, self.step)
        self.writer.log_samples(rows, self.step)
        self.writer.log(metrics)
        score = f", mean score {metrics['samples/score']:.4g}" if "samples/score" in metrics else ""
        self.writer.echo(f"[samples step {self.step}] {len(rows)} generations{score} → {self.writer.samples_path}")

    def train_step(self, item_ids: list[int]) -> dict:
        """One loop step over `item_ids` (the global batch). The method's `prepare` does its own work first
        (PPO: rollouts, rewards, advantages; its metrics join the row), then come the optimizer updates its
        `updates` lists (one over `item_ids` by default; PPO: epochs × minibatches of the rollouts). The scheduler steps once per
        loop step, so the learning rate is constant within a step. The row's method metrics and
        `grad_norm` are the mean over the step's updates, its item and token counts their sum."""
        start = time.perf_counter()
        self.wrapped_policy.train()
        extra = self.method.prepare(self.wrapped_policy, item_ids, self.step)
        self.wrapped_policy.train()
        updates = self.method.updates(item_ids)
        lr = float(self.scheduler.get_last_lr()[0])  # a tensor for torchao's optimizers
        rows, applied = [], False
        for ids in updates:
            row, grad_norm, ok = self._update(ids, item_ids)
            rows.append({**row, "grad_norm": grad_norm})
            applied = applied or ok
        if applied:
            self.scheduler.step()
        unit = self.method.unit
        if not rows:  # the method had nothing to train on this step (online DPO kept no pair)
            row = {unit: 0, "tokens": 0}
        elif len(rows) == 1:
            row = rows[0]
        else:
            row = {k: (sum(r[k] for r in rows) if k in (unit, "tokens") else sum(r[k] for r in rows) / len(rows))
                   for k in rows[0]}
        row.update(extra)
        seconds = time.perf_counter() - start
        row.update({"step": self.step + 1, "epoch": (self.step + 1) / self.steps_per_epoch, "lr": lr,
                    f"{unit}_per_s": row[unit] / seconds, "tokens_per_s": row["tokens"] / seconds,
                    "nonfinite_steps": self.nonfinite})
        return row

    def _update(self, ids: list[int], item_ids: list[int]) -> tuple[dict, float, bool]:
        """One optimizer update over `ids`: accumulate, clip, step (skipped when the loss or the gradient is
        not finite). Returns the mean metrics, the gradient norm and whether the update was applied."""
        stats = MeanMetrics(self.method.metric_names, self.rt.device)
        micro_batches = self._micro_batches(ids)
        scale = self.rt.world / len(ids)  # DDP/FSDP average over ranks: this makes it a mean over items
        # one autocast region for the update: it casts each trainable weight to bf16 once and the micro-batches
        # share the copy (autocast caches casts until the region ends), where a region each cast them anew; not
        # under FSDP2, whose parameters are gathered anew for each micro-batch
        per_update, per_micro = ((self.autocast, contextlib.nullcontext) if not self.rt.sharded
                                 else (contextlib.nullcontext, self.autocast))
        with per_update():
            for i, (mine, weight) in enumerate(micro_batches):
                with self.rt.no_sync(self.wrapped_policy, i == len(micro_batches) - 1), per_micro(), self.offload():
                    micro = self.method.forward(self.wrapped_policy, mine, "train")
                    (micro.losses.sum() * scale * weight).backward()
                if weight:
                    stats.add(micro)
        row = stats.result(self.rt, self.method.unit)
        if self.in_backward:  # each parameter was updated in the backward pass; its hooks summed the norm
            grad_norm = self.optimizer.take_grad_norm()
            ok = math.isfinite(row["loss"]) and not self.optimizer.take_nonfinite()
            if ok:
                self.optimizer.step()  # nothing left to do; the scheduler sees the step
            else:
                self._nonfinite(item_ids, row["loss"], grad_norm)
            return row, grad_norm, ok
        max_norm = self.cfg.train.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        ok = math.isfinite(row["loss"]) and math.isfinite(grad_norm)
        if ok:
            self.optimizer.step()
        else:
            self._nonfinite(item_ids, row["loss"], grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        return row, grad_norm, ok

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean metrics over the whole held-out set."""
        self.wrapped_policy.eval()
        stats = MeanMetrics(self.method.metric_names, self.rt.device)
        for ids, weight in self._micro_batches(list(range(len(self.method.eval_set)))):
            with self.autocast():
                micro = self.method.forward(self.wrapped_policy, ids, "eval")
            if weight:
                stats.add(micro)
        result = stats.result(self.rt, self.method.unit)
        del result["tokens"]
        return result

    # ----------------------------------------------------------------------------------- data order

    def _step_items(self, step: int) -> list[int]:
        """The global batch of update `step`: a seeded permutation per epoch, so any step can be replayed."""
        epoch, k = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.cfg.train.seed + epoch)
        order = torch.randperm(len(self.method.train_set), generator=g).tolist()
        b = self.cfg.train.batch_size
        return order[k * b:(k + 1) * b]

    def _micro_batches(self, ids: list[int]) -> list[tuple[list[int], float]]:
        """This rank's share of `ids` in micro-batches. Every rank gets the same number of micro-batches
        (collectives must match), padding with a repeated item of weight 0 where its share is short."""
        mb = self.cfg.train.micro_batch_size
        count = math.ceil(math.ceil(len(ids) / self.rt.world) / mb)
        mine = self.rt.shard(ids)
        chunks = [(mine[i * mb:(i + 1) * mb], 1.0) for i in range(count)]
        return [(c, w) if c else ([ids[0]], 0.0) for c, w in chunks]

    # ----------------------------------------------------------------------------------- set-up

    def _plan_start(self, resume: bool) -> Start:
        """Rank 0 reads the run directory and decides; the other ranks follow its decision."""
        o = self.cfg.output
        start = (self.output.plan(resume=resume, overwrite=o.overwrite, total_steps=self.total_steps,
                                    warn=self._echo) if self.rt.is_main else Start())
        if not self.rt.distributed:
            return start
        ckpt_step = checkpoint.step_of(start.checkpoint) if start.checkpoint else -1
        decided = [ckpt_step, -1 if start.finished_step is None else start.finished_step]
        ckpt_step, finished = self.rt.broadcast(torch.tensor(decided, device=self.rt.device)).tolist()
        ckpt = self.run_dir / "checkpoints" / f"{checkpoint.PREFIX}{ckpt_step:07d}" if ckpt_step >= 0 else None
        return Start(checkpoint=ckpt, finished_step=None if finished < 0 else finished)

    # ----------------------------------------------------------------------------------- state

    def _full_state_dict(self) -> dict | None:
        """Under FSDP2 every rank takes part in gathering the full weights; rank 0 writes them."""
        if not self.rt.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.policy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_checkpoint(self) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        if self.in_backward:  # one process: the per-parameter optimizers' states as they are
            optimizer = self.optimizer.state_dict()
        else:
            optimizer = get_optimizer_state_dict(self.policy, self.optimizer, options=opts)
        state = self._full_state_dict()
        # every rank's RNG: each draws its own dropout masks (LoRA dropout), as many numbers as its batch's tokens
        rng = self.rt.gather_objects(checkpoint.rng_state())
        if self.rt.is_main:
            warning = checkpoint.space_warning(self.run_dir)
            if warning:
                self._echo(warning)
            checkpoint.save(
                self.run_dir, self.step,
                save_model=functools.partial(save_pretrained, self.policy.model, state_dict=state),
                optimizer=optimizer, scheduler=self.scheduler.state_dict(),
                trainer={"step": self.step, "nonfinite": self.nonfinite, "rng": rng[0], "rng_by_rank": rng,
                         "method": self.method.state_dict()},
                keep=self.cfg.checkpoint.keep, keep_models=self.cfg.checkpoint.keep_models,
            )
        self.rt.barrier()

    def _restore(self, ckpt: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = checkpoint.load(ckpt)
        if self.in_backward:
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            set_optimizer_state_dict(self.policy, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(state["scheduler"])
        trainer = state["trainer_state"]
        self.step, self.nonfinite = trainer["step"], trainer["nonfinite"]
        by_rank = trainer.get("rng_by_rank")  # checkpoints before 2026-12-07 hold rank 0's alone
        same_world = by_rank is not None and len(by_rank) == self.rt.world
        checkpoint.set_rng_state(by_rank[self.rt.rank] if same_world else trainer["rng"])
        if "method" in trainer:  # what a method keeps beyond the model (PPO: value head, KL coefficient)
            self.method.load_state_dict(trainer["method"])
        self._echo(f"resumed from {ckpt} at step {self.step}")

    def _export(self, metrics: dict) -> Path | None:
        state = self._full_state_dict()
        if not self.rt.is_main:
            return None
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        merge = self.cfg.lora.merge_on_export or self.method.exports_merged
        out = export(self.policy.model, self.tokenizer, self.run_dir / "model", method=self.method,
                     merge_lora=merge, config=self.cfg.to_dict(), metrics=clean, base_model=self.cfg.model.name,
                     state_dict=state)
        self._echo(f"model written to {out}")
        return out

    def _nonfinite(self, item_ids: list[int], loss: float, grad_norm: float) -> None:
        self.nonfinite += 1
        sources = [self.method.train_set[i].source for i in item_ids]
        shown = ", ".join(sources[:4]) + (f" and {len(sources) - 4} more" if len(sources) > 4 else "")
        what = f"loss={loss}, grad_norm={grad_norm}"
        self._echo(f"step {self.step + 1}: non-finite {what}; update skipped ({self.nonfinite}/"
                   f"{self.cfg.train.max_nonfinite_steps}); batch: {shown}")
        if self.nonfinite >= self.cfg.train.max_nonfinite_steps:
            raise TrainingError(
                f"stopped after {self.nonfinite} steps with a non-finite loss or gradient; the last at step "
                f"{self.step + 1} ({what}) on {self.method.unit} {shown}. Check these rows, lower train.lr, or use "
                "train.precision=fp32")

    def _agree(self, flag: bool) -> bool:
        """Whether any rank asked to stop: every rank must checkpoint and leave at the same step."""
        if not self.rt.distributed:
            return flag
        return bool(self.rt.all_reduce_sum(torch.tensor([int(flag)], device=self.rt.device)).item())

    def _echo(self, text: str) -> None:
        if not self.rt.is_main:
            return
        if self.writer is not None:
            self.writer.echo(text)
        else:
            print(text, flush=True)

    def _banner(self) -> str:
        c = self.cfg
        trainable = sum(p.numel() for p in self.params)
        return (f"{self.method.summary()}\n"
                f"model {c.model.name} ({'LoRA r=' + str(c.lora.r) if c.lora.enabled else 'full'}, "
                f"{trainable / 1e6:.3g}M trainable), {self.method.describe()}, precision {self.precision}, "
                f"layout {c.train.layout}, {self.rt.world} process(es) on {self.rt.device.type}\n"
                f"{self.total_steps} steps of {c.train.batch_size} {self.method.unit}; run directory {self.run_dir}")


def _check_resumable(saved: Config, now: Config) -> None:
    a, b = saved.to_dict(), now.to_dict()
    changed = [f"{s}.{k}" for s in a for k in a[s] if a[s][k] != b[s].get(k)
               and not f"{s}.{k}".startswith(RESUMABLE_CHANGES)]
    if changed:
        raise ConfigError(f"cannot resume with a different configuration: {', '.join(changed)} changed "
                          "since the run started")

