"""The contenders: dpokit's modes and TRL 1.16's DPOTrainer, each run in its own process.

Every contender trains on the same pairs file with the same hyperparameters: `--warmup` updates (not timed), then
`--steps` timed updates of B pairs. A process of its own makes its peak memory its own: `run_worker` starts
`throughput.py --worker SPEC RESULT`, which calls `worker_main`, which drives dpokit (`run_dpokit`) or TRL
(`run_trl`) and writes the result as JSON. dpokit is driven through its public pieces (`load_config`,
`Trainer(cfg, runtime)`, `trainer.train_step(ids)`, all in `dpokit_trainer`); TRL through
`DPOTrainer(...).train()` with its defaults except `bf16=False` (fp32; gradient checkpointing stays on, as TRL
defaults).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

from measure import busy_cpu_seconds, peak_memory, sync
from workload import logical_tokens

HERE = Path(__file__).resolve().parent

# name → how it is run. dpokit rows are overrides on top of the common settings; "plain" is the TRL-like path
# inside dpokit (padded rows, full-vocabulary LM head, frozen reference copy). BATCH stands for the update's pairs.
BATCH = "batch_size"
DPOKIT_MODES = {
    "plain": {"train.layout": "padded", "train.lm_head": "full"},
    "padded+selective": {"train.layout": "padded", "train.lm_head": "selective"},
    "packed": {"train.layout": "packed"},
    "prefix_shared": {},  # dpokit's defaults
    "chunk1024": {"train.logps_chunk_tokens": 1024},  # the LM head's chunks as they were until 2026-12-07
    "precomputed": {"reference.strategy": "precomputed"},
    "grad_ckpt": {"train.gradient_checkpointing": True},
    "adamw8bit": {"train.optimizer": "adamw8bit"},
    # full fine-tuning at the default's speed in less memory: activations recomputed, 8-bit optimizer state
    "ckpt_8bit": {"train.gradient_checkpointing": True, "train.optimizer": "adamw8bit"},
    # the step in the backward pass allows no accumulation and no global-norm clipping
    "in_backward": {"train.optimizer_in_backward": True, "train.micro_batch_size": BATCH, "train.max_grad_norm": 0.0},
    "bf16": {"train.precision": "bf16-mixed"},
    # freed memory kept in glibc's heap for reuse instead of mapped anew (dpokit.host_memory)
    "reuse": {"train.reuse_freed_memory": True},
    "bf16_reuse": {"train.precision": "bf16-mixed", "train.reuse_freed_memory": True},
    "compile": {"train.compile": True},
    # PyTorch's CPU blocks on 4 kB pages, as before dpokit asked for huge pages (2026-12-07)
    "small_pages": {"train.huge_pages": False},
    "lean": {"train.preset": "lean"},  # the least memory: see dpokit.config.PRESETS
    "lora": {"lora.enabled": True},
    "qlora": {"lora.enabled": True, "model.quantization": "nf4"},
    "qlora_int8": {"lora.enabled": True, "model.quantization": "int8"},
    "lora_lean": {"lora.enabled": True, "train.preset": "lean"},
    "qlora_lean": {"lora.enabled": True, "model.quantization": "nf4", "train.preset": "lean"},
}
LABELS = {
    "plain": "dpokit plain (padded, full LM head)",
    "padded+selective": "dpokit padded + selective head",
    "packed": "dpokit packed",
    "prefix_shared": "dpokit default (prefix_shared)",
    "chunk1024": "dpokit default, LM-head chunks of 1,024 tokens",
    "precomputed": "dpokit default + precomputed ref",
    "grad_ckpt": "dpokit default + grad checkpointing",
    "adamw8bit": "dpokit default + adamw8bit",
    "ckpt_8bit": "dpokit default + grad checkpointing + adamw8bit",
    "in_backward": "dpokit default + optimizer step in backward",
    "bf16": "dpokit default, bf16-mixed",
    "reuse": "dpokit default + reuse_freed_memory",
    "bf16_reuse": "dpokit default, bf16-mixed + reuse_freed_memory",
    "compile": "dpokit default + torch.compile",
    "small_pages": "dpokit default, 4 kB pages (train.huge_pages=false)",
    "lean": "dpokit train.preset=lean",
    "lora": "dpokit LoRA (r 16, adapters-off reference)",
    "qlora": "dpokit QLoRA nf4",
    "qlora_int8": "dpokit QLoRA int8",
    "lora_lean": "dpokit LoRA + train.preset=lean",
    "qlora_lean": "dpokit QLoRA nf4 + train.preset=lean",
    "trl": "TRL 1.16 DPOTrainer (defaults)",
    "trl_bf16": "TRL 1.16 DPOTrainer, bf16",
    "trl_huge_pages": "TRL 1.16 DPOTrainer, huge pages (THP_MEM_ALLOC_ENABLE=1)",
}
ALL_CONTENDERS = ["trl", "trl_bf16", "trl_huge_pages", *DPOKIT_MODES]
# PyTorch's huge-page switch for the rows that set it whatever the benchmark's own environment says: TRL as
# installed (4 kB pages), TRL with the huge pages dpokit's trainer asks for by default, dpokit without them
EXTRA_ENV = {"trl": {"THP_MEM_ALLOC_ENABLE": "0"}, "trl_huge_pages": {"THP_MEM_ALLOC_ENABLE": "1"},
             "small_pages": {"THP_MEM_ALLOC_ENABLE": "0"}}


def is_bf16(name: str) -> bool:
    """Whether the row trains in bf16 (it then runs `--bf16-warmup` and `--bf16-steps`)."""
    return name == "trl_bf16" or DPOKIT_MODES.get(name, {}).get("train.precision") == "bf16-mixed"


def kind_and_mode(name: str) -> tuple[str, str]:
    """("trl", "fp32" | "bf16") for TRL's rows, ("dpokit", <mode>) for dpokit's."""
    if name.startswith("trl"):
        return "trl", "bf16" if name == "trl_bf16" else "fp32"
    return "dpokit", name


def micro_batch(batch: int) -> int:
    """dpokit's default pairs per forward pass (gradient accumulation makes up the batch), or the largest divisor
    of `batch` below it: the same micro-batching a user of the defaults gets."""
    from dpokit.config import TrainSection

    default = TrainSection().micro_batch_size
    return max(d for d in range(1, min(default, batch) + 1) if batch % d == 0)


def mode_overrides(mode: str, batch: int) -> dict:
    """The mode's overrides for updates of `batch` pairs: dpokit's default micro-batching unless the mode (or its
    preset) sets its own."""
    own = DPOKIT_MODES[mode]
    micro = {} if "train.preset" in own else {"train.micro_batch_size": micro_batch(batch)}
    return micro | {k: batch if v == BATCH else v for k, v in own.items()}


def override_args(overrides: dict) -> list[str]:
    """`section.key=value` strings as `load_config` takes them (booleans as YAML's true and false)."""
    return [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in overrides.items()]


def resolved(mode: str):
    """dpokit's config for the mode, its preset applied (not validated: there is no data file)."""
    from dpokit.config_loader import config_from_dict, set_value

    cfg = config_from_dict({}, source="benchmark")
    for key, value in mode_overrides(mode, cfg.train.batch_size).items():
        set_value(cfg, key, value, source="benchmark")
    cfg.apply_preset()
    return cfg


# modes whose reference forward happens in a one-time pass before training
PRECOMPUTED = {m for m in DPOKIT_MODES if resolved(m).reference.strategy == "precomputed"}


def computation(kind: str, mode: str) -> dict:
    """What one update of the contender computes, as `measure.Flops.executed` takes it."""
    if kind == "trl":  # padded batches, chunked LM head on every position, gradient checkpointing, a reference copy
        return {"layout": "padded", "lm_head": "chunked_full", "checkpointing": True, "reference": True}
    train = resolved(mode).train
    return {"layout": train.layout, "lm_head": train.lm_head, "checkpointing": train.gradient_checkpointing,
            "reference": mode not in PRECOMPUTED}


def selected(only: str | None) -> list[str]:
    """The contenders `--only` names (default: all)."""
    names = only.split(",") if only else list(ALL_CONTENDERS)
    unknown = [c for c in names if c not in ALL_CONTENDERS]
    if unknown:
        raise SystemExit(f"unknown contender(s) {unknown}; choose from {ALL_CONTENDERS}")
    return names


def drop_skipped(names: list[str], args, peaks: dict) -> dict[str, str]:
    """Remove the bf16 rows the options or the machine rule out; returns why each was skipped."""
    skipped = {}
    fp32, bf16 = peaks["fp32"]["peak_flops_per_s"], peaks["bf16"]["peak_flops_per_s"]
    if "trl_bf16" in names and (args.trl_bf16 == "no" or (args.trl_bf16 == "auto" and bf16 < fp32)):
        names.remove("trl_bf16")
        skipped["trl_bf16"] = (f"the bf16 matmul peak ({bf16 / 1e9:.0f} GFLOP/s) is below the fp32 one "
                               f"({fp32 / 1e9:.0f}) on this machine, so a TRL bf16 update takes several times the "
                               "fp32 one; --trl-bf16 yes runs it")
    if args.bf16_steps == 0:
        for name in [n for n in names if is_bf16(n)]:
            names.remove(name)
            skipped[name] = "--bf16-steps 0"
    return skipped


def make_spec(args, name: str, *, data: Path, batch: int, warmup: int, steps: int, first_update: int,
              tag: str | None = None) -> dict:
    """What a worker needs to run contender `name` (named `<tag>-<name>` when tagged)."""
    kind, mode = kind_and_mode(name)
    return {"model": args.model, "data": str(data), "batch": batch, "lr": args.lr, "beta": args.beta,
            "max_length": args.max_length, "seed": args.seed, "device": args.device,
            "name": f"{tag}-{name}" if tag else name, "kind": kind, "mode": mode, "warmup": warmup, "steps": steps,
            "first_update": first_update}


def make_specs(args, work, names: list[str]) -> list[dict]:
    """The main run's specs; bf16 rows run the first `--bf16-steps` of the timed updates."""
    specs = []
    for name in names:
        warmup, steps = args.warmup, args.steps
        if is_bf16(name):
            warmup, steps = min(args.warmup, args.bf16_warmup), min(args.steps, args.bf16_steps)
        first = args.warmup - warmup  # the timed updates always start at update `args.warmup`
        specs.append(make_spec(args, name, data=work.slice_file(first, warmup + steps), batch=args.batch,
                               warmup=warmup, steps=steps, first_update=first))
    return specs


# ------------------------------------------------------------------------------------------ one process each


def run_worker(spec: dict, tmp: Path, timeout: float) -> dict:
    """One contender in its own process, its files under `tmp`; returns its result with wall time and outside CPU
    load."""
    work, log_dir = tmp / spec["name"], tmp / "logs"
    work.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(exist_ok=True)
    spec = {**spec, "tmp": str(work)}
    spec_path, result_path, log_path = work / "spec.json", work / "result.json", log_dir / f"{spec['name']}.log"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1",
           # compile from scratch: a cache left by earlier runs would hide the compilation time
           "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-cache"), "TRITON_CACHE_DIR": str(work / "triton-cache"),
           **EXTRA_ENV.get(spec["name"].rpartition("-")[2], {})}  # a sweep's rows are named <tag>-<name>
    cmd = [sys.executable, str(HERE / "throughput.py"), "--worker", str(spec_path), str(result_path)]
    busy0, self0 = busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with log_path.open("w") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - start
    busy1, self1 = busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    if result_path.is_file():
        result = json.loads(result_path.read_text())
    else:
        tail = log_path.read_text(errors="replace")[-1500:] if log_path.is_file() else ""
        reason = "timed out" if rc == "timeout" else f"exited with {rc} (killed for memory?)" if rc else "no result"
        result = {"ok": False, "error": f"worker {reason}", "log_tail": tail}
    result["process_seconds"] = wall
    if busy0 is not None and busy1 is not None:
        ours = (self1.ru_utime + self1.ru_stime) - (self0.ru_utime + self0.ru_stime)
        result["outside_cpu_cores"] = max(0.0, (busy1 - busy0 - ours) / wall)  # other processes' load, in cores
    return result


def worker_main(spec_path: str, result_path: str) -> None:
    """The worker process (`throughput.py --worker SPEC RESULT`): run one contender, write its result."""
    spec = json.loads(Path(spec_path).read_text())
    result: dict = {"ok": False}
    try:
        if spec["kind"] == "trl":
            run_trl(spec, result)
        else:
            run_dpokit(spec, result)
        result["ok"] = "error" not in result
    except Exception as e:  # a contender that fails is recorded, not fatal to the benchmark
        result["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        result["traceback"] = traceback.format_exc()[-4000:]
    with contextlib.suppress(Exception):
        result["memory"] = peak_memory(spec["device"])
    from dpokit.host_memory import huge_pages_in_effect

    result["huge_pages"] = huge_pages_in_effect()
    Path(result_path).write_text(json.dumps(result, indent=1))


def _progress(spec: dict, done: int, total: int, seconds: float) -> None:
    print(f"[{spec['name']}] step {done}/{total}: {seconds:.1f} s", flush=True)


# ------------------------------------------------------------------------------------------ dpokit


def dpokit_overrides(spec: dict) -> dict:
    """dpokit's config overrides for a contender spec: the common settings, the spec's own overrides, the mode's."""
    tmp, b = Path(spec["tmp"]), spec["batch"]
    return {
        "model.name": spec["model"], "data.train": spec["data"], "data.max_length": spec["max_length"],
        "output.dir": str(tmp / "run"), "output.overwrite": True, "output.tensorboard": False,
        "checkpoint.every": 0, "train.batch_size": b, "train.lr": spec["lr"], "objective.beta": spec["beta"],
        "train.precision": "fp32", "train.max_steps": spec["warmup"] + spec["steps"], "train.seed": spec["seed"],
        "reference.cache_dir": str(tmp / "refcache"), **spec.get("overrides", {}), **mode_overrides(spec["mode"], b),
    }


def run_dpokit(spec: dict, result: dict) -> None:
    from dpokit.config_loader import load_config

    b, total = spec["batch"], spec["warmup"] + spec["steps"]
    overrides = dpokit_overrides(spec)
    cfg = load_config(None, override_args(overrides))
    result["config"] = {k: str(v) for k, v in overrides.items() if not k.startswith(("output.", "reference.cache"))}

    trainer = dpokit_trainer(cfg, spec["device"])
    result["setup_seconds"] = trainer.setup_seconds
    result["setup_memory"] = peak_memory(spec["device"])
    result["precision"] = trainer.precision
    result["reference"] = trainer.reference
    if trainer.precompute["pairs"]:
        result["precompute"] = trainer.precompute
    if [p.source for p in trainer.pairs] != [f"{spec['data']}:{i + 1}" for i in range(len(trainer.pairs))]:
        raise RuntimeError("dpokit did not keep the benchmark file's pair order")
    result["token_lengths"] = [[len(p.prompt), len(p.chosen), len(p.rejected)] for p in trainer.pairs]

    steps = []
    try:
        for k in range(total):
            row, seconds = trainer.step(list(range(k * b, (k + 1) * b)))
            steps.append({"seconds": seconds, "pairs": row["pairs"], "tokens": row["tokens"], "loss": row["loss"],
                          "logps/chosen": row["logps/chosen"], "grad_norm": row["grad_norm"]})
            _progress(spec, k + 1, total, seconds)
    except Exception as e:
        result["error"] = f"{type(e).__name__} at step {len(steps) + 1}: {str(e).strip().splitlines()[0]}"
        result["traceback"] = traceback.format_exc()[-4000:]
    finally:
        trainer.close()
    result["steps"] = steps
    if spec["mode"] == "compile":
        with contextlib.suppress(Exception):
            from torch._dynamo.utils import counters

            result["dynamo"] = {"stats": dict(counters["stats"]), "graph_breaks": sum(counters["graph_break"].values()),
                                "recompiles": dict(counters.get("recompiles", {}))}


def dpokit_trainer(cfg, device: str) -> SimpleNamespace:
    """dpokit's trainer for `cfg`. EVERY use of dpokit's trainer internals is in this function, so that a change
    of dpokit.trainer is followed here and nowhere else. It uses:

    - `dpokit.reference.logps_table`, wrapped to time the one-time reference pass (reference.strategy=precomputed)
      where the reference is built, while the trainer is built;
    - `dpokit.trainer.Trainer(cfg, runtime)` and its `precision`, `method.reference.name` (the resolved reference
      strategy) and `method.train_set` (the tokenized training pairs, in file order);
    - `trainer.train_step(pair_ids)`: one optimizer update over those pairs (the benchmark picks them: update k is
      pairs [k*B, (k+1)*B)), returning its metrics row; then `trainer.step += 1`, as the trainer's own loop does;
    - `trainer.close()` at the end.

    Returns setup_seconds (building the trainer, the reference pass included), precision, reference, pairs,
    precompute ({seconds, pairs} of the reference pass), step(pair_ids) -> (metrics row, wall seconds) and close().
    """
    import importlib

    from dpokit.distributed import init_runtime

    dtrain = importlib.import_module("dpokit.trainer")
    dreference = importlib.import_module("dpokit.reference")
    precompute = {"seconds": 0.0, "pairs": 0}
    original = dreference.logps_table

    def timed_logps_table(module, pairs, **kwargs):
        start = time.perf_counter()
        table = original(module, pairs, **kwargs)
        sync(device)
        precompute["seconds"] += time.perf_counter() - start
        precompute["pairs"] += len(pairs)
        return table

    dreference.logps_table = timed_logps_table
    start = time.perf_counter()
    trainer = dtrain.Trainer(cfg, init_runtime())
    setup_seconds = time.perf_counter() - start

    def step(pair_ids: list[int]) -> tuple[dict, float]:
        start = time.perf_counter()
        row = trainer.train_step(pair_ids)
        sync(device)
        seconds = time.perf_counter() - start
        trainer.step += 1
        return row, seconds

    return SimpleNamespace(setup_seconds=setup_seconds, precision=trainer.precision,
                           reference=trainer.method.reference.name, pairs=trainer.method.train_set,
                           precompute=precompute, step=step, close=trainer.close)


# ------------------------------------------------------------------------------------------ TRL


def run_trl(spec: dict, result: dict) -> None:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from dpokit import models
    from dpokit.generation.jsonl import read_jsonl

    tmp = Path(spec["tmp"])
    rows = read_jsonl(spec["data"])
    total = spec["warmup"] + spec["steps"]
    settings = dict(output_dir=str(tmp / "trl"), per_device_train_batch_size=spec["batch"],
                    gradient_accumulation_steps=1, max_steps=total, learning_rate=spec["lr"], beta=spec["beta"],
                    bf16=spec["mode"] == "bf16", max_length=spec["max_length"], lr_scheduler_type="linear",
                    warmup_steps=0, weight_decay=0.0, max_grad_norm=spec.get("max_grad_norm", 1.0), seed=spec["seed"],
                    logging_steps=1,
                    train_sampling_strategy="sequential", save_strategy="no", report_to=[], disable_tqdm=True,
                    dataloader_num_workers=0, use_cpu=spec["device"] == "cpu")
    args = DPOConfig(**settings)
    result["config"] = {k: v for k, v in settings.items() if k != "output_dir"}
    result["config"].update(gradient_checkpointing=args.gradient_checkpointing, optim=str(args.optim),
                            precompute_ref_log_probs=args.precompute_ref_log_probs, padding_free=args.padding_free)
    result["precision"] = "bf16-mixed" if args.bf16 else "fp32"

    start = time.perf_counter()
    trainer = DPOTrainer(model=models.model_dir(spec["model"]), args=args, train_dataset=Dataset.from_list(rows))
    result["setup_seconds"] = time.perf_counter() - start
    result["setup_memory"] = peak_memory(spec["device"])
    ds = trainer.train_dataset
    result["token_lengths"] = [[len(x["prompt_ids"]), len(x["chosen_ids"]), len(x["rejected_ids"])] for x in ds]
    result["model_dtype"] = str(trainer.model.dtype)

    begins, ends, metrics, losses = [], [], [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            sync(spec["device"])
            ends.append(time.perf_counter())
            m = trainer._metrics["train"]
            metrics.append({k: (m[k][-1] if m.get(k) else None) for k in ("logps/chosen", "rewards/margins")})
            _progress(spec, len(ends), total, ends[-1] - begins[-1])

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:  # each update's loss (logging_steps=1), as dpokit's rows record theirs
                losses.append(logs["loss"])

    trainer.add_callback(Timer())
    out = trainer.train()
    b = spec["batch"]
    steps = []
    for k in range(len(ends)):
        previous = ends[k - 1] if k else begins[0]  # from the end of the previous update: data loading included
        tokens = logical_tokens(result["token_lengths"][k * b:(k + 1) * b])
        loss = {"loss": losses[k]} if len(losses) == len(ends) else {}
        steps.append({"seconds": ends[k] - previous, "pairs": b, "tokens": tokens, **metrics[k], **loss})
    result["steps"] = steps
    result["train_loss"] = out.training_loss
