"""The DPO training loop: data, policy, reference and objective wired together from a `Config`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpokit import checkpoint, models
from dpokit.config import Config
from dpokit.data.dataset import PreparedData, prepare_data, settings_of
from dpokit.data.layouts import collate
from dpokit.distributed import Runtime, decoder_layer_classes, init_runtime
from dpokit.errors import ConfigError, DataError, TrainingError
from dpokit.export import export, save_pretrained
from dpokit.logps import CompletionLogProbs, causal_lm
from dpokit.metrics import MetricsWriter, PairMetrics
from dpokit.objectives import build_objective
from dpokit.optim import build_optimizer, build_scheduler
from dpokit.reference import (
    AdaptersDisabled,
    FrozenCopy,
    Precomputed,
    Reference,
    ReferenceCache,
    compute_table,
    data_fingerprint,
    resolve_strategy,
    weights_fingerprint,
)
from dpokit.rundir import RunDir, Start
from dpokit.signals import StopSignals

# keys that may change between a run and its resumption without changing its results
RESUMABLE_CHANGES = ("checkpoint.", "output.tensorboard", "output.overwrite", "train.max_steps", "train.eval_every", "train.log_every",
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
    """`auto` picks bf16 autocast only where bf16 matmul is fast: a bf16-capable GPU or a CPU with AMX."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16-mixed" if torch.cpu._is_amx_tile_supported() else "fp32"


def train(cfg: Config, *, resume: bool = False) -> TrainResult:
    cfg.validate()
    runtime = init_runtime(cfg.distributed.strategy, cfg.distributed.backend)
    try:
        trainer = Trainer(cfg, runtime, resume=resume)
        try:
            return trainer.run()
        finally:
            trainer.close()
    finally:
        runtime.close()


class Trainer:
    def __init__(self, cfg: Config, runtime: Runtime, *, resume: bool = False):
        self.cfg, self.rt = cfg, runtime
        self.output = RunDir(cfg.output.dir)
        self.run_dir = self.output.path
        self.writer: MetricsWriter | None = None
        if runtime.is_main:  # under torchrun one lock for the run: rank 0's
            self.output.lock()
        try:
            self._set_up(resume)
        except BaseException:
            self.close()
            raise

    def _set_up(self, resume: bool) -> None:
        cfg, t, runtime = self.cfg, self.cfg.train, self.rt
        if runtime.is_main:
            self.output.refuse_reuse(resume=resume, overwrite=cfg.output.overwrite)
        self.precision = resolve_precision(t.precision, runtime.device)
        self.autocast = lambda: torch.autocast(runtime.device.type, dtype=torch.bfloat16,
                                               enabled=self.precision == "bf16-mixed")
        torch.manual_seed(t.seed)

        with runtime.main_first():  # the first load may convert the GGUF default model
            self.tokenizer = models.load_tokenizer(cfg.model.name, revision=cfg.model.revision,
                                                   trust_remote_code=cfg.model.trust_remote_code)
        self.data = self._load_data()
        self.steps_per_epoch = math.ceil(len(self.data.train) / t.batch_size)
        total = t.epochs * self.steps_per_epoch
        self.total_steps = min(total, t.max_steps) if t.max_steps else total
        self.start = self._plan_start(resume)
        saved = None if self.start.fresh else self.output.saved_config()
        if saved is not None:
            _check_resumable(Config.from_dict(saved), cfg)
        self.ckpt = self.start.checkpoint
        if self.start.finished_step is not None:
            return
        self.objective = build_objective(cfg.objective)
        self.strategy = resolve_strategy(cfg.reference.strategy, needs_reference=self.objective.needs_reference,
                                         lora=cfg.lora.enabled)
        self.module, self.reference = self._build_models()
        self.model = runtime.wrap(self.module, layer_classes=decoder_layer_classes(causal_lm(self.module.model)))

        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, t)
        self.scheduler = build_scheduler(self.optimizer, t, self.total_steps)
        self.step, self.nonfinite = 0, 0
        if self.ckpt is not None:
            self._restore(self.ckpt)
        # the model and data loaded: from here on the run directory is written
        if runtime.is_main:
            self.output.start(self.start, cfg.to_dict())
            self.data.write_report(self.run_dir)
        runtime.barrier()
        self.writer = MetricsWriter(self.run_dir, enabled=runtime.is_main, tensorboard=cfg.output.tensorboard,
                                    total_steps=self.total_steps, resume_step=self.step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.output.release()

    # ----------------------------------------------------------------------------------- the loop

    def run(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        if self.start.finished_step is not None:
            self._echo(f"{self.run_dir} finished at step {self.start.finished_step} of {self.total_steps}: nothing "
                       "left to do (raise train.max_steps or train.epochs to continue it)")
            return TrainResult(self.run_dir, self.run_dir / "model", self.start.finished_step, already_finished=True)
        self.writer.echo(self._banner())
        result = TrainResult(self.run_dir, None, self.step)
        if self.data.eval and self.step == 0:
            result.eval_before = self.evaluate()
            self.writer.log({"step": 0, "epoch": 0.0, **result.eval_before}, prefix="eval/")
        row: dict = {}
        with StopSignals() as stop:
            while self.step < self.total_steps:
                row = self.train_step(self._step_pairs(self.step))
                self.step += 1
                self.writer.advance()
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    self.writer.log(row)
                if self.data.eval and t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
                    self.writer.log({"step": self.step, "epoch": row["epoch"], **self.evaluate()}, prefix="eval/")
                stopping = self._agree(stop.requested)
                if stopping or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                    self.save_checkpoint()
                if stopping:
                    self.writer.echo(f"stopped by {stop.signal_name} at step {self.step}; checkpoint written, "
                                     "continue with --resume")
                    result.stopped_by_signal = True
                    break
            else:
                if self.data.eval:
                    result.eval_after = self.evaluate()
                    self.writer.log({"step": self.step, "epoch": self.step / self.steps_per_epoch, **result.eval_after},
                                    prefix="eval/")
                result.model_dir = self._export({**row, **{f"eval/{k}": v for k, v in result.eval_after.items()}})
        result.steps, result.last_train, result.nonfinite_steps = self.step, row, self.nonfinite
        return result

    def train_step(self, pair_ids: list[int]) -> dict:
        """One optimizer update over `pair_ids` (the global batch): accumulate, clip, step."""
        start = time.perf_counter()
        self.model.train()
        stats = PairMetrics(self.rt.device)
        micro_batches = self._micro_batches(pair_ids)
        scale = self.rt.world / len(pair_ids)  # DDP/FSDP average over ranks: this makes it a mean over pairs
        for i, (ids, weight) in enumerate(micro_batches):
            with self.rt.no_sync(self.model, i == len(micro_batches) - 1), self.autocast():
                batch, policy, out = self._forward(ids, "train")
                (out.losses.sum() * scale * weight).backward()
            if weight:
                stats.add(out, policy, batch.num_tokens)
        row = stats.result(self.rt)
        max_norm = self.cfg.train.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        if math.isfinite(row["loss"]) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.scheduler.step()
        else:
            self._nonfinite(pair_ids, row["loss"], grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        row.update(step=self.step + 1, epoch=(self.step + 1) / self.steps_per_epoch, lr=lr, grad_norm=grad_norm,
                   pairs_per_s=row["pairs"] / seconds, tokens_per_s=row["tokens"] / seconds,
                   nonfinite_steps=self.nonfinite)
        return row

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean pair metrics over all held-out pairs."""
        self.model.eval()
        stats = PairMetrics(self.rt.device)
        for ids, weight in self._micro_batches(list(range(len(self.data.eval)))):
            with self.autocast():
                batch, policy, out = self._forward(ids, "eval")
            if weight:
                stats.add(out, policy, batch.num_tokens)
        result = stats.result(self.rt)
        del result["tokens"]
        return result

    def _forward(self, ids: list[int], split: str):
        """Policy and reference log-probs of pairs `ids` of `split`, and the objective on them."""
        pairs = self.data.train if split == "train" else self.data.eval
        batch = collate([pairs[j] for j in ids], ids, self.cfg.train.layout, self.tokenizer.pad_token_id)
        batch = batch.to(self.rt.device)
        policy = self.model(batch)
        return batch, policy, self.objective(policy, self.reference.logps(batch, split))

    # ----------------------------------------------------------------------------------- data order

    def _step_pairs(self, step: int) -> list[int]:
        """The global batch of update `step`: a seeded permutation per epoch, so any step can be replayed."""
        epoch, k = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.cfg.train.seed + epoch)
        order = torch.randperm(len(self.data.train), generator=g).tolist()
        b = self.cfg.train.batch_size
        return order[k * b:(k + 1) * b]

    def _micro_batches(self, ids: list[int]) -> list[tuple[list[int], float]]:
        """This rank's share of `ids` in micro-batches. Every rank gets the same number of micro-batches
        (collectives must match), padding with a repeated pair of weight 0 where its share is short."""
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

    def _load_data(self) -> PreparedData:
        data = prepare_data(self.cfg.data, self.tokenizer, seed=self.cfg.train.seed)
        if not data.train:
            raise DataError(f"{self.cfg.data.train}: no valid training pairs ({data.summary()})")
        return data

    def _build_models(self) -> tuple[CompletionLogProbs, Reference]:
        cfg, t, rt = self.cfg, self.cfg.train, self.rt
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        load = dict(dtype=dtype, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code,
                    attn_implementation=cfg.model.attn_implementation)
        with rt.main_first():
            base = models.load_model(cfg.model.name, **load)
        models.disable_dropout(base)
        models.use_layout(base, t.layout)
        wrap = lambda m: CompletionLogProbs(m, lm_head=t.lm_head, chunk_tokens=t.logps_chunk_tokens)  # noqa: E731

        if cfg.lora.enabled:
            from peft import PeftModel

            policy = (PeftModel.from_pretrained(base, str(self.ckpt / "model"), is_trainable=True) if self.ckpt
                      else models.apply_lora(base, cfg.lora))
            reference_source = policy
        else:
            policy = models.load_model(str(self.ckpt / "model"), **load) if self.ckpt else base
            if self.ckpt:
                models.disable_dropout(policy)
                models.use_layout(policy, t.layout)
            reference_source = base
        module = wrap(policy).to(rt.device)
        ref_module = module if reference_source is policy else wrap(reference_source).to(rt.device)

        if self.strategy == "precomputed":
            reference: Reference = self._precompute(ref_module)
        elif self.strategy == "copy":
            ref_dtype = models.DTYPES[cfg.reference.dtype] if cfg.reference.dtype else None
            reference = FrozenCopy(ref_module, ref_dtype)
            if rt.distributed and rt.strategy == "fsdp":
                from dpokit.distributed import shard_module

                shard_module(reference.module, decoder_layer_classes(reference.module.model))
        elif self.strategy == "adapters":
            reference = AdaptersDisabled(module)
        else:
            reference = Reference()
        del ref_module, base
        if t.gradient_checkpointing:
            causal_lm(policy).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if t.compile:
            for layer in (m for m in policy.modules() if isinstance(m, decoder_layer_classes(causal_lm(policy)))):
                layer.compile(dynamic=True)
        return module, reference

    def _precompute(self, ref_module: CompletionLogProbs) -> Precomputed:
        cfg = self.cfg
        cache = ReferenceCache(cfg.reference.cache_dir)
        settings = {**vars(settings_of(cfg.data)), "precision": self.precision, "dtype": cfg.reference.dtype}
        weights = weights_fingerprint(ref_module.model)
        module = FrozenCopy(ref_module, models.DTYPES[cfg.reference.dtype]).module if cfg.reference.dtype else ref_module
        tables = {}
        for split, pairs in (("train", self.data.train), ("eval", self.data.eval)):
            if not pairs:
                continue
            key = cache.key(weights, data_fingerprint(pairs), settings)
            # rank 0 decides and shares: the other ranks may not see its cache directory (several nodes)
            table = cache.get(key) if self.rt.is_main else None
            hit = self.rt.broadcast(torch.tensor([int(table is not None)], device=self.rt.device)).item()
            if hit:
                table = table if table is not None else torch.zeros(len(pairs), 2)
                table = self.rt.broadcast(table.to(self.rt.device)).cpu()
                self._echo(f"reference log-probs for {split} read from {cache.path(key)}")
            else:
                self._echo(f"precomputing reference log-probs for {len(pairs)} {split} pairs")
                table = compute_table(module, pairs, layout=cfg.train.layout, batch_pairs=cfg.train.micro_batch_size,
                                      pad_id=self.tokenizer.pad_token_id, device=self.rt.device, runtime=self.rt,
                                      autocast=self.autocast)
                if self.rt.is_main:
                    cache.put(key, table, {"model": cfg.model.name, "pairs": len(pairs), "split": split})
            tables[split] = table
        return Precomputed(tables)

    # ----------------------------------------------------------------------------------- state

    def _full_state_dict(self) -> dict | None:
        """Under FSDP2 every rank takes part in gathering the full weights; rank 0 writes them."""
        if not (self.rt.distributed and self.rt.strategy == "fsdp"):
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_checkpoint(self) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optimizer = get_optimizer_state_dict(self.module, self.optimizer, options=opts)
        state = self._full_state_dict()
        if self.rt.is_main:
            warning = checkpoint.space_warning(self.run_dir)
            if warning:
                self._echo(warning)
            checkpoint.save(
                self.run_dir, self.step,
                save_model=lambda d: save_pretrained(self.module.model, d, state_dict=state),
                optimizer=optimizer, scheduler=self.scheduler.state_dict(),
                trainer={"step": self.step, "nonfinite": self.nonfinite, "rng": checkpoint.rng_state()},
                keep=self.cfg.checkpoint.keep, keep_models=self.cfg.checkpoint.keep_models,
            )
        self.rt.barrier()

    def _restore(self, ckpt: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = checkpoint.load(ckpt)
        set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(state["scheduler"])
        trainer = state["trainer_state"]
        self.step, self.nonfinite = trainer["step"], trainer["nonfinite"]
        checkpoint.set_rng_state(trainer["rng"])
        self._echo(f"resumed from {ckpt} at step {self.step}")

    def _export(self, metrics: dict) -> Path | None:
        state = self._full_state_dict()
        if not self.rt.is_main:
            return None
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        out = export(self.module.model, self.tokenizer, self.run_dir / "model", merge_lora=self.cfg.lora.merge_on_export,
                     config=self.cfg.to_dict(), metrics=clean, base_model=self.cfg.model.name, state_dict=state)
        self._echo(f"model written to {out}")
        return out

    def _nonfinite(self, pair_ids: list[int], loss: float, grad_norm: float) -> None:
        self.nonfinite += 1
        sources = [self.data.train[i].source for i in pair_ids]
        shown = ", ".join(sources[:4]) + (f" and {len(sources) - 4} more" if len(sources) > 4 else "")
        what = f"loss={loss}, grad_norm={grad_norm}"
        self._echo(f"step {self.step + 1}: non-finite {what}; update skipped ({self.nonfinite}/"
                   f"{self.cfg.train.max_nonfinite_steps}); batch: {shown}")
        if self.nonfinite >= self.cfg.train.max_nonfinite_steps:
            raise TrainingError(
                f"stopped after {self.nonfinite} steps with a non-finite loss or gradient; the last at step "
                f"{self.step + 1} ({what}) on pairs {shown}. Check these rows, lower train.lr, or use "
                "train.precision=fp32")

    def _agree(self, flag: bool) -> bool:
        """Whether any rank asked to stop: every rank must checkpoint and leave at the same step."""
        if not self.rt.distributed:
            return flag
        return bool(self.rt.all_reduce_sum(torch.tensor([int(flag)], device=self.rt.device)).item())

    def _echo(self, text: str) -> None:
        if self.rt.is_main:
            writer = getattr(self, "writer", None)
            writer.echo(text) if writer is not None else print(text, flush=True)

    def _banner(self) -> str:
        c = self.cfg
        trainable = sum(p.numel() for p in self.params)
        return (f"{self.data.summary()}\n"
                f"model {c.model.name} ({'LoRA r=' + str(c.lora.r) if c.lora.enabled else 'full'}, "
                f"{trainable / 1e6:.3g}M trainable), objective {c.objective.loss} β={c.objective.beta}, "
                f"reference {self.strategy}, precision {self.precision}, layout {c.train.layout}, "
                f"{self.rt.world} process(es) on {self.rt.device.type}\n"
                f"{self.total_steps} steps of {c.train.batch_size} pairs; run directory {self.run_dir}")


def _check_resumable(saved: Config, now: Config) -> None:
    a, b = saved.to_dict(), now.to_dict()
    changed = [f"{s}.{k}" for s in a for k in a[s] if a[s][k] != b[s].get(k)
               and not f"{s}.{k}".startswith(RESUMABLE_CHANGES)]
    if changed:
        raise ConfigError(f"cannot resume with a different configuration: {', '.join(changed)} changed "
                          "since the run started")

