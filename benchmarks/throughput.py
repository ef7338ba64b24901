"""DPO training throughput: dpokit's modes against TRL 1.16's DPOTrainer, same model, data and settings.

One command, one run (`python benchmarks/throughput.py`, see benchmarks/README.md):

1. Generates a deterministic synthetic preference set in the standard string format, with token lengths drawn
   from clipped log-normals like real preference sets (prompts 20-500 tokens, median ~160; completions 10-300,
   median ~110; long tails), texts built from a word list so tokenization is realistic. Every contender trains
   on the same pairs in the same order: update k uses pairs [k*B, (k+1)*B).
2. Measures the machine's matmul peak in fp32 and bf16 (best of several GEMMs at the shapes the model uses
   and a 2048^3 square one).
3. Runs every contender in its own subprocess, so peak memory (`ru_maxrss` on CPU,
   `torch.cuda.max_memory_allocated` on GPU) is that contender's own: `--warmup` updates (not timed) then
   `--steps` timed updates of B pairs. dpokit is driven through its public pieces (`Config.load`,
   `Trainer(cfg, runtime)`, `trainer.train_step(ids)`); TRL through `DPOTrainer(...).train()` with its
   defaults except `bf16=False` (fp32; gradient checkpointing stays on, as TRL defaults).
4. Sweeps peak memory of dpokit's default and plain paths against batch size and sequence length.
5. Prints the tables and writes JSON (and the markdown tables) to benchmarks/results/.

Definitions (also written into the JSON):

- pairs/s = pairs in the timed updates / their wall time (data collation, forward, backward, optimizer).
- tokens/s counts the same logical tokens for everyone: 2*prompt + chosen + rejected per pair (the two
  sequences a pair stands for), no padding, completions including their EOS.
- FLOPs are matmul FLOPs (2 per multiply-add) of the linear layers, the attention scores/values and the LM
  head; elementwise work is not counted. With N_lin the weights of the decoder stack's linear layers, L layers,
  h query heads of width d_h, hidden size d and vocabulary V:
      linear(n tokens)      = 2 * N_lin * n
      attention(k pairs)    = 4 * L * h * d_h * k        (k = query-key pairs computed)
      head(n positions)     = 2 * d * V * n
  Useful FLOPs of a pair (P prompt, C chosen, R rejected tokens) are the least work DPO needs:
      F = linear(P + C + R) + attention(P+C causal, R over P and itself causal) + head(C + R)
      useful = 3F (policy forward + backward) + F (reference forward) = 4F
  that is, each prompt once, the LM head only where a completion token is predicted.
- useful MFU = useful FLOPs / wall time / measured matmul peak of the contender's dtype. Padding, prompts
  computed twice, recomputation and full-vocabulary heads do not count as useful, so they show as lower MFU.
- HFU (estimate) = the FLOPs a contender actually executes / wall time / peak, from the same formulas applied
  to its layout (padded rows of the batch's longest sequence, prompts twice, SDPA with a mask computing every
  query-key pair), its LM head (all positions or completion positions only, chunks recomputed in backward),
  gradient checkpointing (one more forward of the decoder layers) and its reference (forward, or none in the
  step with precomputed log-probs).
- precomputed reference: the one-time pass over the run's pairs is timed and amortised over the run it serves
  (one epoch of the benchmark set = warmup + steps updates): run-level time = timed updates + pass time *
  (pairs in the timed updates / pairs in the pass). Per-step numbers leave the pass out, and count only the
  policy's 3F as useful.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = "smollm2-135m-instruct"
SCHEMA = "dpokit-throughput/1"

# --------------------------------------------------------------------------------------------- contenders

# name → how it is run. dpokit rows are overrides on top of the common settings; "plain" is the TRL-like path
# inside dpokit (padded rows, full-vocabulary LM head, frozen reference copy).
DPOKIT_MODES = {
    "plain": {"train.layout": "padded", "train.lm_head": "full"},
    "padded+selective": {"train.layout": "padded", "train.lm_head": "selective"},
    "packed": {"train.layout": "packed"},
    "prefix_shared": {},  # dpokit's defaults
    "precomputed": {"reference.strategy": "precomputed"},
    "grad_ckpt": {"train.gradient_checkpointing": True},
    "bf16": {"train.precision": "bf16-mixed"},
    "compile": {"train.compile": True},
    # the least memory: no reference model in memory, activations recomputed, one pair per forward pass
    "lean": {"reference.strategy": "precomputed", "train.gradient_checkpointing": True, "train.micro_batch_size": 1},
}
PRECOMPUTED = {"precomputed", "lean"}  # modes whose reference forward happens in a one-time pass
CHECKPOINTED = {"grad_ckpt", "lean"}  # modes that recompute the decoder layers in the backward pass
LABELS = {
    "plain": "dpokit plain (padded, full LM head)",
    "padded+selective": "dpokit padded + selective head",
    "packed": "dpokit packed",
    "prefix_shared": "dpokit default (prefix_shared)",
    "precomputed": "dpokit default + precomputed ref",
    "grad_ckpt": "dpokit default + grad checkpointing",
    "bf16": "dpokit default, bf16-mixed",
    "compile": "dpokit default + torch.compile",
    "lean": "dpokit memory-lean (precomputed ref, grad ckpt, 1 pair/forward)",
    "trl": "TRL 1.16 DPOTrainer (defaults)",
    "trl_bf16": "TRL 1.16 DPOTrainer, bf16",
}
ALL_CONTENDERS = ["trl", "trl_bf16", *DPOKIT_MODES]

# --------------------------------------------------------------------------------------------- workload

WORD_TEXT = """the of and to in is that it for on with as was be by this are from at or an have not but they which you
one all were can there their has more will if we about when what so some would up other into out than them only its
also time may these two most could like over then first any new such used people many after made well should see
make way use where because both each very through between during before under while same still world year day
water system number part place case point group problem fact hand question work state life child government
company area question house country study family night program book school story result change morning reason
research girl guy moment air teacher force education energy information development environment particular
important different possible available economic political national certain social financial approximately
infrastructure photosynthesis temperature measurement relationship understanding communication responsibility
organisation performance experience knowledge language history science mountain river ocean forest garden
kitchen window village city market price value cost budget report meeting project team manager customer product
service quality design model method process theory evidence analysis sample average difference increase decrease
growth rate level range degree percent example detail feature function answer explain describe compare suggest
consider improve reduce require provide include continue develop create produce remain become believe remember
quickly slowly carefully really simply clearly usually probably recently finally however therefore although
perhaps instead otherwise meanwhile nevertheless furthermore specifically accordingly consequently green blue
yellow small large early late simple complex strong weak quiet loud bright dark warm cold careful honest useful
helpful polite rude wrong right true false clear vague short long"""
WORDS = WORD_TEXT.split()


def length_plan(n_pairs: int, seed: int, scale: float = 1.0) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token targets: clipped log-normals with long tails. Completions include EOS."""
    rng = random.Random(seed)
    plan = []
    for _ in range(n_pairs):
        p = min(500, max(20, round(rng.lognormvariate(math.log(160), 0.75))))
        c = min(300, max(10, round(rng.lognormvariate(math.log(110), 0.65))))
        r = min(300, max(10, round(rng.lognormvariate(math.log(110), 0.65))))
        plan.append((max(2, round(p * scale)), max(2, round(c * scale)), max(2, round(r * scale))))
    return plan


class TextMaker:
    """Word-list texts of a target token length. Byte-level BPE pre-tokenizes at spaces and punctuation, so a
    text's token count is the sum of its pieces' counts (cached per piece); the result is checked afterwards."""

    def __init__(self, tokenizer, seed: int):
        self.tok = tokenizer
        self.rng = random.Random(seed)
        self.cache: dict[str, int] = {}

    def count(self, piece: str) -> int:
        if piece not in self.cache:
            self.cache[piece] = len(self.tok(piece, add_special_tokens=False)["input_ids"])
        return self.cache[piece]

    def text(self, n_tokens: int, *, leading_space: bool, question: bool = False) -> str:
        pieces, total, words_in_sentence = [], 0, 0
        sentence_len = self.rng.randint(6, 18)
        while total < n_tokens:
            word = self.rng.choice(WORDS)
            if words_in_sentence == 0:
                word = word.capitalize()
            piece = (" " if pieces or leading_space else "") + word
            pieces.append(piece)
            total += self.count(piece)
            words_in_sentence += 1
            if words_in_sentence >= sentence_len and total < n_tokens - 1:
                end = self.rng.choice([".", ".", ".", ",", "?"] if question else [".", ".", ",", ";"])
                pieces.append(end)
                total += self.count(end)
                words_in_sentence = 0 if end in ".?" else words_in_sentence // 2
                sentence_len = self.rng.randint(6, 18)
        return "".join(pieces)


def make_pairs(tokenizer, plan: list[tuple[int, int, int]], seed: int) -> list[dict]:
    maker = TextMaker(tokenizer, seed)
    rows = []
    for p, c, r in plan:  # completions end with EOS, which the trainers append: the text is one token shorter
        rows.append({"prompt": maker.text(p, leading_space=False, question=True),
                     "chosen": maker.text(c - 1, leading_space=True),
                     "rejected": maker.text(r - 1, leading_space=True)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def tokenized_lengths(path: Path, tokenizer, max_length: int) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts exactly as dpokit's trainer tokenizes the file."""
    from dpokit.data.records import Problems, read_preferences
    from dpokit.data.tokenize import TokenizeSettings, tokenize_records

    read = read_preferences(str(path), problems=Problems())
    pairs, stats = tokenize_records(read.records, tokenizer, TokenizeSettings(max_length=max_length), Problems())
    if stats.truncated:
        raise SystemExit(f"{stats.truncated} benchmark pairs exceed max_length={max_length}; raise --max-length")
    return [(len(x.prompt), len(x.chosen), len(x.rejected)) for x in pairs]


def typical_batch(batch: int, scale: float = 1.0, samples: int = 1000) -> dict:
    """Padded width and padding overhead (padded tokens / logical tokens) over many batches of the distribution,
    to show how typical the timed batches are."""
    plan = length_plan(batch * samples, 12345, scale)
    widths, ratios = [], []
    for k in range(samples):
        b = plan[k * batch:(k + 1) * batch]
        width = max(p + max(c, r) for p, c, r in b)
        widths.append(width)
        ratios.append(2 * batch * width / sum(2 * p + c + r for p, c, r in b))
    q = statistics.quantiles(ratios, n=10)
    return {"batches": samples, "padded_width": percentiles(widths),
            "padding_overhead": {"p10": round(q[0], 3), "median": round(statistics.median(ratios), 3),
                                 "p90": round(q[-1], 3)}}


def percentiles(values: list[int]) -> dict:
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"min": s[0], "p10": pick(0.10), "median": pick(0.5), "mean": round(statistics.fmean(s), 1),
            "p90": pick(0.90), "max": s[-1]}


# --------------------------------------------------------------------------------------------- FLOPs


def model_dims(model_name: str) -> dict:
    """Dimensions for the FLOP formulas, counted from the model itself (built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dpokit import models

    path = models.model_dir(model_name)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    n_lin = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    text = config.get_text_config()
    heads = text.num_attention_heads
    d_head = getattr(text, "head_dim", None) or text.hidden_size // heads
    return {"path": path, "architecture": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
            "linear_params": n_lin, "layers": text.num_hidden_layers, "heads": heads,
            "kv_heads": getattr(text, "num_key_value_heads", heads), "head_dim": d_head,
            "hidden": text.hidden_size, "intermediate": getattr(text, "intermediate_size", None),
            "vocab": head.weight.shape[0]}


def causal(n: int) -> int:
    return n * (n + 1) // 2


class Flops:
    def __init__(self, dims: dict):
        self.lin = 2 * dims["linear_params"]
        self.att = 4 * dims["layers"] * dims["heads"] * dims["head_dim"]
        self.head = 2 * dims["hidden"] * dims["vocab"]
        self.vocab = dims["vocab"]

    def forward_min(self, p: int, c: int, r: int) -> float:
        """F: one forward over the pair as DPO needs it (prompt once, LM head on completion positions)."""
        return self.lin * (p + c + r) + self.att * (causal(p + c) + r * p + causal(r)) + self.head * (c + r)

    def useful(self, batch: list[tuple[int, int, int]], *, reference: bool = True) -> float:
        return sum((4 if reference else 3) * self.forward_min(*x) for x in batch)

    def executed(self, batch: list[tuple[int, int, int]], kind: str, mode: str) -> float:
        """Estimate of the matmul FLOPs one update of `batch` executes (see the module docstring)."""
        b = len(batch)
        width = max(p + max(c, r) for p, c, r in batch)
        if kind == "trl" or mode in ("plain", "padded+selective"):
            tokens, pairs_qk = 2 * b * width, 2 * b * width * width  # padded rows, masked SDPA: every pair
        elif mode == "packed":
            tokens = sum(2 * p + c + r for p, c, r in batch)
            pairs_qk = sum(causal(p + c) + causal(p + r) for p, c, r in batch)
        else:  # prefix_shared: [prompt][chosen] causal; rejected over prompt + itself with an explicit mask
            tokens = sum(p + c + r for p, c, r in batch)
            pairs_qk = sum(causal(p + c) + r * (p + r) for p, c, r in batch)
        body = self.lin * tokens + self.att * pairs_qk
        completion = sum(c + r for _, c, r in batch)
        if kind == "trl":  # checkpointing: 4 body passes; fused head on every position: fwd + recompute + 2 grads
            head_all = self.head * 2 * b * (width - 1)
            return 4 * body + 4 * head_all + body + head_all  # + reference forward
        passes = 4 if mode in CHECKPOINTED else 3
        if mode == "plain":
            head_policy, head_ref = 3 * self.head * 2 * b * width, self.head * 2 * b * width
        else:  # selective: chunks recomputed in backward
            head_policy, head_ref = 4 * self.head * completion, self.head * completion
        reference = 0 if mode in PRECOMPUTED else body + head_ref
        return passes * body + head_policy + reference


# --------------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in have]
    return []


def proc_kb_field(path: str, key: str) -> int | None:
    """A `key:  N kB` line of a /proc file (meminfo, status), in bytes; None where there is none."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def mem_total_bytes() -> int | None:
    return proc_kb_field("/proc/meminfo", "MemTotal")


def busy_cpu_seconds() -> float | None:
    """CPU seconds every process on the machine has used (from /proc/stat), to measure outside load."""
    with contextlib.suppress(OSError, ValueError):
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return None


def wait_quiet(max_seconds: float, threshold: float = 0.15, window: float = 5.0) -> float:
    """Wait (at most `max_seconds`) until the machine's CPU use over `window` seconds is below `threshold` cores;
    returns the last measured use. Between contenders this process is idle, so what it sees is other work."""
    start = deadline = time.monotonic()
    deadline += max_seconds
    try:
        return _wait_quiet(deadline, threshold, window)
    finally:
        WAITED[0] += time.monotonic() - start


WAITED = [0.0]


def _wait_quiet(deadline: float, threshold: float, window: float) -> float:
    while True:
        before = busy_cpu_seconds()
        time.sleep(window)
        after = busy_cpu_seconds()
        if before is None or after is None:
            return 0.0
        used = (after - before) / window
        if used < threshold or time.monotonic() >= deadline:
            return used


class LoadSampler:
    """The 1-minute load average every 15 s while the benchmark runs."""

    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(15)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def measure_peaks(dims: dict, device: str) -> dict:
    """Best achieved GEMM throughput in fp32 and bf16 at the shapes the model uses."""
    import torch

    d, ff, v = dims["hidden"], dims["intermediate"] or 4 * dims["hidden"], dims["vocab"]
    if device == "cuda":
        m, shapes = 16384, [(8192, 8192, 8192)]
    else:
        m, shapes = 2048, [(2048, 2048, 2048)]
    shapes += [(m, d, ff), (m, ff, d), (m, d, d), (max(256, m // 4), d, v)]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def rate(fn, flops: float, budget: float) -> float:
        fn()
        sync()
        best, spent = 0.0, 0.0
        for _ in range(5 if device == "cpu" else 20):
            t = time.perf_counter()
            fn()
            sync()
            dt_ = time.perf_counter() - t
            best, spent = max(best, flops / dt_), spent + dt_
            if spent > budget:
                break
        return best

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        results = []
        for mm, k, n in shapes:
            flops = 2.0 * mm * k * n
            a32 = torch.randn(mm, k, device=device)
            w32 = torch.randn(n, k, device=device)
            if name == "fp32":
                results.append({"shape": [mm, k, n], "method": "mm",
                                "flops_per_s": rate(lambda a=a32, w=w32: a @ w.t(), flops, 2.0)})
                continue
            a, w = a32.to(dtype), w32.to(dtype)
            results.append({"shape": [mm, k, n], "method": "bf16 mm",
                            "flops_per_s": rate(lambda a=a, w=w: a @ w.t(), flops, 3.0)})

            def autocast_linear(a=a32, w=w32):
                with torch.autocast(device, dtype=torch.bfloat16):
                    return torch.nn.functional.linear(a, w)

            results.append({"shape": [mm, k, n], "method": "autocast linear",
                            "flops_per_s": rate(autocast_linear, flops, 3.0)})
        best = max(results, key=lambda x: x["flops_per_s"])
        out[name] = {"peak_flops_per_s": best["flops_per_s"], "best": best, "all": results}
    return out


# --------------------------------------------------------------------------------------------- workers


def rss_now() -> int | None:
    return proc_kb_field("/proc/self/status", "VmRSS")


def peak_memory(device: str) -> dict:
    import torch

    out = {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_bytes": rss_now()}
    if device == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return out


def worker_main(spec_path: str, result_path: str) -> None:
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
    Path(result_path).write_text(json.dumps(result, indent=1))


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_dpokit(spec: dict, result: dict) -> None:
    import importlib

    from dpokit.config import Config
    from dpokit.distributed import init_runtime

    dtrain = importlib.import_module("dpokit.train")  # the module (the package exports a function `train`)
    tmp = Path(spec["tmp"])
    b, total = spec["batch"], spec["warmup"] + spec["steps"]
    overrides = {
        "model.name": spec["model"], "data.train": spec["data"], "data.max_length": spec["max_length"],
        "output.dir": str(tmp / "run"), "output.overwrite": True, "output.tensorboard": False,
        "checkpoint.every": 0, "train.batch_size": b, "train.micro_batch_size": micro_batch(b), "train.lr": spec["lr"],
        "objective.beta": spec["beta"], "train.precision": "fp32", "train.max_steps": total, "train.seed": spec["seed"],
        "reference.cache_dir": str(tmp / "refcache"), **DPOKIT_MODES[spec["mode"]],
    }
    cfg = Config.load(None, [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in overrides.items()])
    result["config"] = {k: str(v) for k, v in overrides.items() if not k.startswith(("output.", "reference.cache"))}

    precompute = {"seconds": 0.0, "pairs": 0}
    original = dtrain.compute_table

    def timed_compute_table(module, pairs, **kwargs):  # the one-time reference pass, timed where it runs
        start = time.perf_counter()
        table = original(module, pairs, **kwargs)
        _sync(spec["device"])
        precompute["seconds"] += time.perf_counter() - start
        precompute["pairs"] += len(pairs)
        return table

    dtrain.compute_table = timed_compute_table
    start = time.perf_counter()
    trainer = dtrain.Trainer(cfg, init_runtime())
    result["setup_seconds"] = time.perf_counter() - start
    result["setup_memory"] = peak_memory(spec["device"])
    result["precision"] = trainer.precision
    result["reference"] = trainer.strategy
    if precompute["pairs"]:
        result["precompute"] = precompute
    expected = [f"{spec['data']}:{i + 1}" for i in range(len(trainer.data.train))]
    if [p.source for p in trainer.data.train] != expected:
        raise RuntimeError("dpokit did not keep the benchmark file's pair order")
    result["token_lengths"] = [[len(p.prompt), len(p.chosen), len(p.rejected)] for p in trainer.data.train]

    steps = []
    try:
        for k in range(total):
            ids = list(range(k * b, (k + 1) * b))
            start = time.perf_counter()
            row = trainer.train_step(ids)
            _sync(spec["device"])
            trainer.step += 1
            steps.append({"seconds": time.perf_counter() - start, "pairs": row["pairs"], "tokens": row["tokens"],
                          "loss": row["loss"], "logps/chosen": row["logps/chosen"], "grad_norm": row["grad_norm"]})
            print(f"[{spec['name']}] step {k + 1}/{total}: {steps[-1]['seconds']:.1f} s", flush=True)
    except Exception as e:
        result["error"] = f"{type(e).__name__} at step {len(steps) + 1}: {str(e).strip().splitlines()[0]}"
        result["traceback"] = traceback.format_exc()[-4000:]
    finally:
        trainer.writer.close()
    result["steps"] = steps
    if spec["mode"] == "compile":
        with contextlib.suppress(Exception):
            from torch._dynamo.utils import counters

            result["dynamo"] = {"stats": dict(counters["stats"]), "graph_breaks": sum(counters["graph_break"].values()),
                                "recompiles": dict(counters.get("recompiles", {}))}


def micro_batch(batch: int) -> int:
    """dpokit's default pairs per forward pass (gradient accumulation makes up the batch), or the largest divisor
    of `batch` below it: the same micro-batching a user of the defaults gets."""
    from dpokit.config import TrainSection

    default = TrainSection().micro_batch_size
    return max(d for d in range(1, min(default, batch) + 1) if batch % d == 0)


def run_trl(spec: dict, result: dict) -> None:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from dpokit import models

    tmp = Path(spec["tmp"])
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines() if line.strip()]
    total = spec["warmup"] + spec["steps"]
    settings = dict(output_dir=str(tmp / "trl"), per_device_train_batch_size=spec["batch"],
                    gradient_accumulation_steps=1, max_steps=total, learning_rate=spec["lr"], beta=spec["beta"],
                    bf16=spec["mode"] == "bf16", max_length=spec["max_length"], lr_scheduler_type="linear",
                    warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=spec["seed"],
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

    begins, ends, metrics = [], [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            _sync(spec["device"])
            ends.append(time.perf_counter())
            m = trainer._metrics["train"]
            metrics.append({k: (m[k][-1] if m.get(k) else None) for k in ("logps/chosen", "rewards/margins")})
            print(f"[{spec['name']}] step {len(ends)}/{total}: {ends[-1] - begins[-1]:.1f} s", flush=True)

    trainer.add_callback(Timer())
    out = trainer.train()
    b = spec["batch"]
    steps = []
    for k in range(len(ends)):
        previous = ends[k - 1] if k else begins[0]  # from the end of the previous update: data loading included
        tokens = sum(2 * p + c + r for p, c, r in result["token_lengths"][k * b:(k + 1) * b])
        steps.append({"seconds": ends[k] - previous, "pairs": b, "tokens": tokens, **metrics[k]})
    result["steps"] = steps
    result["train_loss"] = out.training_loss


# --------------------------------------------------------------------------------------------- orchestration


class Workload:
    """The benchmark set: `warmup` short updates, then `steps` timed updates of `batch` pairs, in this order.
    A contender that runs fewer updates (bf16 rows) gets the slice it needs, so every timed update u is the same
    batch for every contender and rows compare on the updates they share."""

    def __init__(self, args, tokenizer, tmp: Path):
        b = args.batch
        warm = length_plan(args.warmup * b, args.seed + 1000, args.length_scale * args.warmup_length_scale)
        timed = length_plan(args.steps * b, args.seed, args.length_scale)
        rows = make_pairs(tokenizer, warm, args.seed + 1000) + make_pairs(tokenizer, timed, args.seed)
        self.args, self.tokenizer, self.tmp, self.rows, self.batch = args, tokenizer, tmp, rows, b
        self.warmup, self.steps = args.warmup, args.steps
        self.path = self.slice_file(0, args.warmup + args.steps)
        self.lengths = tokenized_lengths(self.path, tokenizer, args.max_length)

    def slice_file(self, first: int, count: int) -> Path:
        """Updates [first, first + count) as their own pairs file."""
        path = self.tmp / f"pairs-{first}-{first + count}.jsonl"
        if not path.is_file():
            write_jsonl(path, self.rows[first * self.batch:(first + count) * self.batch])
        return path

    def update(self, u: int) -> list[tuple[int, int, int]]:
        return self.lengths[u * self.batch:(u + 1) * self.batch]


def run_worker(spec: dict, tmp: Path, timeout: float, log_dir: Path) -> dict:
    """One contender in its own process; returns its result with wall time and outside CPU load."""
    work = tmp / spec["name"]
    work.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "tmp": str(work)}
    spec_path, result_path, log_path = work / "spec.json", work / "result.json", log_dir / f"{spec['name']}.log"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1",
           # compile from scratch: a cache left by earlier runs would hide the compilation time
           "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-cache"), "TRITON_CACHE_DIR": str(work / "triton-cache")}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path), str(result_path)]
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


def make_specs(args, work: Workload, contenders: list[str]) -> list[dict]:
    common = {"model": args.model, "batch": args.batch, "lr": args.lr, "beta": args.beta,
              "max_length": args.max_length, "seed": args.seed, "device": args.device}
    specs = []
    for name in contenders:
        kind = "trl" if name.startswith("trl") else "dpokit"
        mode = "bf16" if name == "trl_bf16" else ("fp32" if name == "trl" else name)
        warmup, steps = args.warmup, args.steps
        if mode == "bf16":
            warmup, steps = min(args.warmup, args.bf16_warmup), min(args.steps, args.bf16_steps)
        first = args.warmup - warmup  # the timed updates always start at update `args.warmup`
        specs.append({**common, "name": name, "kind": kind, "mode": mode, "warmup": warmup, "steps": steps,
                      "first_update": first, "data": str(work.slice_file(first, warmup + steps))})
    return specs


def summarise(spec: dict, raw: dict, flops: Flops, peaks: dict, work: Workload) -> dict:
    kind, mode = spec["kind"], spec["mode"]
    row = {"name": spec["name"], "label": LABELS[mode if kind == "dpokit" else spec["name"]], "kind": kind,
           "mode": mode, "ok": bool(raw.get("ok")), "error": raw.get("error"), "precision": raw.get("precision"),
           "warmup": spec["warmup"], "steps": spec["steps"], "raw": raw}
    steps = raw.get("steps") or []
    if not row["ok"] or len(steps) < spec["warmup"] + spec["steps"]:
        row["ok"] = False
        row["error"] = row["error"] or f"ran {len(steps)} of {spec['warmup'] + spec['steps']} updates"
        return row
    first = spec["first_update"]
    timed = {first + i: s["seconds"] for i, s in enumerate(steps) if i >= spec["warmup"]}
    dtype = "bf16" if raw.get("precision") == "bf16-mixed" else "fp32"
    peak = peaks[dtype]["peak_flops_per_s"]
    reference_in_step = mode not in PRECOMPUTED
    mem = raw.get("memory", {})
    row.update(
        dtype=dtype, peak_flops_per_s=peak, per_update_seconds=timed, step_seconds=[s["seconds"] for s in steps],
        peak_memory_bytes=mem.get("cuda_max_allocated_bytes", mem.get("max_rss_bytes")),
        memory_metric="torch.cuda.max_memory_allocated" if "cuda_max_allocated_bytes" in mem else "ru_maxrss",
        setup_memory_bytes=(raw.get("setup_memory") or {}).get("max_rss_bytes"), setup_seconds=raw.get("setup_seconds"),
        outside_cpu_cores=raw.get("outside_cpu_cores"), process_seconds=raw.get("process_seconds"),
        first_step_logps_chosen=steps[0].get("logps/chosen"), token_lengths_match=raw.get("token_lengths") ==
        [list(x) for u in range(first, first + len(steps)) for x in work.update(u)],
    )
    row.update(_rates(timed, work, flops, peak, kind, mode, reference=reference_in_step))
    if mode == "compile":
        row["first_step_seconds"] = steps[0]["seconds"]
        row["dynamo"] = raw.get("dynamo")
    if mode in PRECOMPUTED and raw.get("precompute"):
        pre = raw["precompute"]
        # the pass computes every pair's reference forward once: charge each timed update its FLOP share
        in_pass = range(first, first + spec["warmup"] + spec["steps"])
        total_ref = sum(flops.forward_min(*x) for u in in_pass for x in work.update(u))
        charged = {u: s + pre["seconds"] * sum(flops.forward_min(*x) for x in work.update(u)) / total_ref
                   for u, s in timed.items()}
        # the run executes the pass's reference forward besides the update's own work
        run = _rates(charged, work, flops, peak, kind, mode, reference=True)
        run["executed_flops_estimate"] += sum(flops.forward_min(*x) for u in timed for x in work.update(u))
        run["hfu_estimate"] = run["executed_flops_estimate"] / run["seconds"] / peak
        run.update(per_update_seconds=charged, precompute_seconds=pre["seconds"], precompute_pairs=pre["pairs"],
                   run_updates=spec["warmup"] + spec["steps"])
        row["run_level"] = run
    return row


def _rates(per_update: dict, work: Workload, flops: Flops, peak: float, kind: str, mode: str, *,
           reference: bool) -> dict:
    batches = [work.update(u) for u in per_update]
    seconds = sum(per_update.values())
    pairs = sum(len(b) for b in batches)
    tokens = sum(2 * p + c + r for b in batches for p, c, r in b)
    useful = sum(flops.useful(b, reference=reference) for b in batches)
    executed = sum(flops.executed(b, kind, mode) for b in batches)
    return {"seconds": seconds, "seconds_per_step": seconds / len(batches), "pairs": pairs, "tokens": tokens,
            "pairs_per_s": pairs / seconds, "tokens_per_s": tokens / seconds, "useful_flops": useful,
            "executed_flops_estimate": executed, "useful_mfu": useful / seconds / peak,
            "hfu_estimate": executed / seconds / peak}


def speed_ratio(a: dict | None, b: dict | None) -> float | None:
    """pairs/s of `a` over pairs/s of `b`, on the timed updates both ran (every update has the same pairs)."""
    if not a or not b:
        return None
    shared = set(a["per_update_seconds"]) & set(b["per_update_seconds"])
    if not shared:
        return None
    return sum(b["per_update_seconds"][u] for u in shared) / sum(a["per_update_seconds"][u] for u in shared)


# --------------------------------------------------------------------------------------------- output

GB = 1e9


def fmt(x, spec: str = ".2f", missing: str = "–") -> str:
    return missing if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def comparisons(rows: list[dict]) -> None:
    """Ratios against TRL (same dtype where measured, else fp32, marked) and against dpokit plain."""
    by = {r["name"]: r for r in rows if r.get("ok")}
    for r in rows:
        if not r.get("ok"):
            continue
        trl = by.get("trl_bf16") if r["dtype"] == "bf16" and "trl_bf16" in by else by.get("trl")
        for target in (r, r.get("run_level")):
            if target is None:
                continue
            target["vs_trl"] = speed_ratio(target, trl)
            target["vs_trl_dtype"] = trl["dtype"] if trl else None
            target["vs_plain"] = speed_ratio(target, by.get("plain"))
        r["memory_vs_trl"] = r["peak_memory_bytes"] / trl["peak_memory_bytes"] if trl else None
    compiled, eager = by.get("compile"), by.get("prefix_shared")
    if compiled and eager and compiled["warmup"] and eager["warmup"]:
        # compilation happens in the first (warm-up) update: its extra time over the same update in eager mode
        compiled["compile_seconds_estimate"] = compiled["step_seconds"][0] - eager["step_seconds"][0]


def main_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["contender", "dtype", "timed updates", "s/update", "pairs/s", "tokens/s", "× TRL", "× plain",
            "peak mem GB", "mem / TRL", "useful MFU", "HFU (est.)", "notes"]
    out = []
    for r in rows:
        if not r.get("ok"):
            out.append([r["label"], r.get("precision") or "–", "–", "–", "–", "–", "–", "–", "–", "–", "–", "–",
                        f"failed: {r.get('error')}"])
            continue
        for src, label in ((r, r["label"]), (r.get("run_level"), r["label"] + ", whole run")):
            if src is None:
                continue
            notes = []
            if r["kind"] == "trl":
                notes.append("TRL defaults: grad checkpointing on, fused AdamW")
            if r["mode"] == "compile" and r.get("compile_seconds_estimate") is not None:
                notes.append(f"compilation ≈ {r['compile_seconds_estimate']:.0f} s (warm-up update, not timed)")
            if r["mode"] in PRECOMPUTED and src is r:
                notes.append("per update, reference pass left out")
            if src is not r:
                notes.append(f"+ one reference pass ({src['precompute_seconds']:.0f} s for {src['precompute_pairs']} "
                             f"pairs) charged to a {src['run_updates']}-update run")
            if r["dtype"] == "bf16" and src.get("vs_trl_dtype") == "fp32":
                notes.append("× TRL against TRL fp32 (no TRL bf16 row)")
            if (r.get("outside_cpu_cores") or 0) > 0.2:
                notes.append(f"machine busy: other processes used {r['outside_cpu_cores']:.1f} cores")
            if not r.get("token_lengths_match", True):
                notes.append("token lengths differ from dpokit's tokenization")
            vs_trl, vs_plain = src.get("vs_trl"), src.get("vs_plain")
            out.append([
                label, r["dtype"], str(len(src["per_update_seconds"])), fmt(src["seconds_per_step"], ".1f"),
                fmt(src["pairs_per_s"], ".3f"), fmt(src["tokens_per_s"], ".0f"),
                fmt(vs_trl, ".2f") + ("×" if vs_trl else ""), fmt(vs_plain, ".2f") + ("×" if vs_plain else ""),
                fmt(r["peak_memory_bytes"] / GB, ".2f"), fmt(r.get("memory_vs_trl"), ".2f"),
                fmt(100 * src["useful_mfu"], ".0f") + "%", fmt(100 * src["hfu_estimate"], ".0f") + "%",
                "; ".join(notes),
            ])
    return head, out


def sweep_table(sweep: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["axis", "pairs", "tokens/sequence (mean, max)", "logical tokens", "contender", "peak mem GB", "s/update",
            "[2B, width, V] fp32 logits GB"]
    out = []
    for s in sweep:
        for name in s["contenders"]:
            r = s["results"].get(name, {})
            mem = r.get("peak_memory_bytes")
            shown = fmt(mem / GB if mem else None, ".2f") if r.get("ok") else f"failed: {r.get('error')}"
            out.append([s["axis"], str(s["pairs"]), f"{s['seq_mean']:.0f}, {s['seq_max']}", str(s["logical_tokens"]),
                        LABELS[name], shown + (" (main run)" if r.get("from_main_run") else ""),
                        fmt(r.get("seconds"), ".1f"), fmt(s["padded_logits_bytes"] / GB, ".2f")])
    return head, out


def markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(title: str, head: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(markdown(head, rows))
        return
    table = Table(title=title, title_justify="left")
    for i, h in enumerate(head):
        table.add_column(h, justify="left" if i == 0 or h in ("notes", "contender", "axis") else "right",
                         overflow="fold")
    for r in rows:
        table.add_row(*r)
    Console(width=240).print(table)


def evaluate_targets(rows: list[dict]) -> list[dict]:
    by = {r["name"]: r for r in rows if r.get("ok")}
    trl, default = by.get("trl"), by.get("prefix_shared")
    out = []
    if trl and default:
        speed = default["vs_trl"]
        out.append({"target": "dpokit default (fp32) >= 3x TRL's pairs/s (fp32)", "value": f"{speed:.2f}x",
                    "met": speed >= 3})
        mem = default["memory_vs_trl"]
        out.append({"target": "dpokit default peak memory <= 0.3x TRL's", "value": f"{mem:.2f}x", "met": mem <= 0.3})
        for name in ("grad_ckpt", "precomputed", "lean"):
            if name in by:
                out.append({"target": f"({LABELS[name]}: peak memory <= 0.3x TRL's)",
                            "value": f"{by[name]['memory_vs_trl']:.2f}x", "met": by[name]["memory_vs_trl"] <= 0.3})
    lean = by.get("lean")
    if trl and lean:
        speed = (lean.get("run_level") or lean)["vs_trl"]
        out.append({"target": f"({LABELS['lean']}, whole run: >= 3x TRL's pairs/s)", "value": f"{speed:.2f}x",
                    "met": speed >= 3})
    if default:
        mfu = default["useful_mfu"]
        out.append({"target": "dpokit default useful MFU >= 50%", "value": f"{100 * mfu:.0f}%", "met": mfu >= 0.5})
    bf16 = by.get("bf16")
    if bf16 and trl and default and bf16.get("vs_trl"):
        vs = "TRL bf16" if bf16["vs_trl_dtype"] == "bf16" else "TRL fp32, no TRL bf16 row"
        out.append({"target": f"dpokit bf16-mixed: more than the fp32 default's {default['vs_trl']:.2f}x over TRL "
                              f"(vs {vs})", "value": f"{bf16['vs_trl']:.2f}x", "met": bf16["vs_trl"] > default["vs_trl"]})
    return out


# --------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="model for every contender (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=1,
                    help="timed optimizer updates per contender; the default keeps the whole run near 40 minutes on "
                         "a 2-core CPU, where one TRL update takes minutes (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed updates before them (default: %(default)s)")
    ap.add_argument("--warmup-length-scale", type=float, default=0.25,
                    help="token lengths of the warm-up pairs relative to the timed ones: a warm-up update runs every "
                         "code path (compilation, optimizer state) at a fraction of the cost (default: %(default)s)")
    ap.add_argument("--bf16-steps", type=int, default=1,
                    help="timed updates for bf16 rows, the first of the timed updates (bf16 matmul can be much slower "
                         "than fp32 on CPUs without AMX/AVX512-BF16); 0 skips them (default: %(default)s)")
    ap.add_argument("--bf16-warmup", type=int, default=0, help="untimed updates for bf16 rows (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=8, help="pairs per optimizer update, everyone (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=5,
                    help="seed of the synthetic data; with the default, the first timed update sits at the median of "
                         "the distribution's padded width and padding overhead (see workload.typical_batch in the "
                         "JSON), so one timed update is representative (default: %(default)s)")
    ap.add_argument("--length-scale", type=float, default=1.0,
                    help="scale every token length (for quick checks of the script; 1.0 for real numbers)")
    ap.add_argument("--only", default=None,
                    help=f"comma-separated contenders to run (default: all): {', '.join(ALL_CONTENDERS)}")
    ap.add_argument("--trl-bf16", choices=("auto", "yes", "no"), default="auto",
                    help="run TRL in bf16 too; auto: only where the measured bf16 peak is at least the fp32 one")
    ap.add_argument("--sweep", choices=("yes", "no"), default="yes", help="run the memory sweep")
    ap.add_argument("--sweep-batches", default="2,4,8", help="pairs per update for the batch-size sweep")
    ap.add_argument("--sweep-lengths", default="256,512,1024", help="tokens per sequence for the length sweep")
    ap.add_argument("--sweep-length-batch", type=int, default=2, help="pairs per update in the length sweep")
    ap.add_argument("--sweep-trl", action="store_true", help="include TRL in the memory sweep (slow)")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="before each contender, wait up to SECONDS for other processes to use under 0.15 cores "
                         "(on a shared machine; default: do not wait)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds before a contender is stopped")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/throughput-<date>.json)")
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(*args.worker)
        return 0
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")

    import torch
    import transformers

    from dpokit import models

    wall_start = time.perf_counter()
    started = dt.datetime.now().astimezone()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}", flush=True)
    if load_before[0] > 0.5:
        print("  warning: the machine is busy; other processes make the numbers meaningless", flush=True)
    out_path = Path(args.out) if args.out else HERE / "results" / f"throughput-{started:%Y-%m-%d}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    machine = {
        "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_flags": cpu_flags(), "torch_threads": torch.get_num_threads(), "memory_bytes": mem_total_bytes(),
        "device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "platform": platform.platform(), "python": platform.python_version(),
    }
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_version,
                "dpokit": _dpokit_version()}

    tokenizer = models.load_tokenizer(args.model)
    dims = model_dims(args.model)
    flops = Flops(dims)
    contenders = args.only.split(",") if args.only else list(ALL_CONTENDERS)
    unknown = [c for c in contenders if c not in ALL_CONTENDERS]
    if unknown:
        raise SystemExit(f"unknown contender(s) {unknown}; choose from {ALL_CONTENDERS}")

    with tempfile.TemporaryDirectory(prefix="dpokit-bench-") as tmp_name, LoadSampler() as load:
        tmp = Path(tmp_name)
        log_dir = tmp / "logs"
        log_dir.mkdir()
        work = Workload(args, tokenizer, tmp)
        timed = [x for u in range(args.warmup, args.warmup + args.steps) for x in work.update(u)]
        workload = {
            "timed_pairs": len(timed), "warmup_pairs": args.warmup * args.batch, "pairs_per_update": args.batch,
            "updates": args.warmup + args.steps,
            "prompt_tokens": percentiles([p for p, _, _ in timed]),
            "chosen_tokens": percentiles([c for _, c, _ in timed]),
            "rejected_tokens": percentiles([r for _, _, r in timed]),
            "per_update": [{"update": u, "warmup": u < args.warmup,
                            "logical_tokens": sum(2 * p + c + r for p, c, r in work.update(u)),
                            "tokens_each_prompt_once": sum(p + c + r for p, c, r in work.update(u)),
                            "padded_width": max(p + max(c, r) for p, c, r in work.update(u)),
                            "padding_overhead": round(2 * args.batch * max(p + max(c, r) for p, c, r in work.update(u))
                                                      / sum(2 * p + c + r for p, c, r in work.update(u)), 3),
                            "useful_flops": flops.useful(work.update(u))}
                           for u in range(args.warmup + args.steps)],
            "typical_batch": typical_batch(args.batch, args.length_scale),
            "generator": "clipped log-normals: prompt median 160 tokens sigma 0.75 in [20, 500], completions median "
                         "110 sigma 0.65 in [10, 300] (EOS included), word-list texts; warm-up pairs scaled by "
                         f"{args.warmup_length_scale}",
        }
        print(f"workload: {len(timed)} timed pairs; prompt {workload['prompt_tokens']}; chosen "
              f"{workload['chosen_tokens']}; rejected {workload['rejected_tokens']}", flush=True)
        typical = workload["typical_batch"]
        print("  timed updates: padded width " + ", ".join(str(x["padded_width"]) for x in workload["per_update"]
                                                         if not x["warmup"])
              + ", padding overhead " + ", ".join(str(x["padding_overhead"]) for x in workload["per_update"]
                                                  if not x["warmup"])
              + f" (medians over {typical['batches']} batches of the distribution: "
              f"{typical['padded_width']['median']}, {typical['padding_overhead']['median']})", flush=True)

        print("measuring matmul peaks ...", flush=True)
        peaks = measure_peaks(dims, args.device)
        for k, v in peaks.items():
            print(f"  {k}: {v['peak_flops_per_s'] / 1e9:.1f} GFLOP/s ({v['best']['method']} {v['best']['shape']})",
                  flush=True)

        skipped = {}
        bf16_cheap = peaks["bf16"]["peak_flops_per_s"] >= peaks["fp32"]["peak_flops_per_s"]
        if "trl_bf16" in contenders and (args.trl_bf16 == "no" or (args.trl_bf16 == "auto" and not bf16_cheap)):
            contenders.remove("trl_bf16")
            skipped["trl_bf16"] = (f"the bf16 matmul peak ({peaks['bf16']['peak_flops_per_s'] / 1e9:.0f} GFLOP/s) is "
                                   f"below the fp32 one ({peaks['fp32']['peak_flops_per_s'] / 1e9:.0f}) on this "
                                   "machine, so a TRL bf16 update takes several times the fp32 one; --trl-bf16 yes "
                                   "runs it")
        if args.bf16_steps == 0:
            for name in ("bf16", "trl_bf16"):
                if name in contenders:
                    contenders.remove(name)
                    skipped[name] = "--bf16-steps 0"

        rows = []
        for spec in make_specs(args, work, contenders):
            if args.wait_quiet:
                used = wait_quiet(args.wait_quiet)
                print(f"other processes use {used:.2f} cores", flush=True)
            print(f"running {spec['name']} ({spec['warmup']} warm-up + {spec['steps']} timed updates) ...", flush=True)
            raw = run_worker(spec, tmp, args.timeout, log_dir)
            row = summarise(spec, raw, flops, peaks, work)
            rows.append(row)
            if row["ok"]:
                print(f"  {row['seconds_per_step']:.1f} s/update, {row['pairs_per_s']:.3f} pairs/s, peak "
                      f"{row['peak_memory_bytes'] / GB:.2f} GB, useful MFU {100 * row['useful_mfu']:.0f}%, outside "
                      f"load {fmt(row.get('outside_cpu_cores'), '.2f')} cores", flush=True)
            else:
                print(f"  failed: {row['error']}\n{raw.get('traceback') or raw.get('log_tail') or ''}", flush=True)
        comparisons(rows)

        sweep = run_sweep(args, work, tmp, log_dir, rows, flops) if args.sweep == "yes" else []
        load_samples = list(load.samples)

    load_after = os.getloadavg()
    total_seconds = time.perf_counter() - wall_start
    head, table = main_table(rows)
    sweep_head, sweep_rows = sweep_table(sweep)
    title = (f"DPO training throughput, dpokit vs TRL {trl_version} DPOTrainer — {started:%Y-%m-%d}, "
             f"{machine['gpu'] or machine['cpu']} ({machine['cores']} cores), torch {versions['torch']}, transformers "
             f"{versions['transformers']}; {args.model}, {args.batch} pairs/update, lr {args.lr}, β {args.beta}")
    print()
    print_table(title, head, table)
    if sweep:
        print_table("Peak memory against batch size and sequence length (one update per process)", sweep_head,
                    sweep_rows)
    targets = evaluate_targets(rows)
    for t in targets:
        print(f"target {t['target']}: {t['value']} → {'met' if t['met'] else 'MISSED'}")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    max_load = max(load_samples, default=load_after[0])
    print(f"load average (1 min) before {load_before[0]:.2f}, max during {max_load:.2f}, after {load_after[0]:.2f}")

    md = f"{title}\n\n{markdown(head, table)}\n"
    if sweep:
        md += f"\nPeak memory against batch size and sequence length:\n\n{markdown(sweep_head, sweep_rows)}\n"
    result = {
        "schema": SCHEMA, "date": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "total_seconds": total_seconds,
        "seconds_waiting_for_quiet": WAITED[0],
        "machine": machine, "versions": versions,
        "load_average": {"before": load_before, "after": load_after, "samples_1min_every_15s": load_samples,
                         "max_1min": max_load},
        "settings": {k: v for k, v in vars(args).items() if k != "worker"},
        "model": dims, "workload": workload, "peaks": peaks,
        "definitions": {
            "pairs_per_s": "pairs in the timed updates / their wall time (collation, forward, backward, optimizer)",
            "tokens_per_s": "sum of 2*prompt + chosen + rejected tokens (EOS included, no padding) / wall time",
            "useful_flops": "4F per pair, F = 2*N_lin*(P+C+R) + 4*L*h*d_h*(causal(P+C) + R*P + causal(R)) "
                            "+ 2*d*V*(C+R), causal(n) = n(n+1)/2; 3F per pair in the per-update numbers of the "
                            "precomputed reference",
            "useful_mfu": "useful FLOPs / wall time / measured matmul peak of the contender's dtype",
            "hfu_estimate": "estimated executed matmul FLOPs (layout, LM head, recomputation, reference) / time / peak",
            "x_trl": "pairs/s over TRL's on the timed updates both ran (TRL of the same dtype where measured)",
            "peak_memory": "ru_maxrss of the contender's own process (CPU) or torch.cuda.max_memory_allocated (GPU)",
            "outside_cpu_cores": "CPU time other processes on the machine used while the contender ran, in cores",
            "precomputed_run_level": "timed updates + the one-time reference pass, charged to each update by its "
                                     "share of the pass's reference FLOPs",
        },
        "contenders": [_jsonable(r) for r in rows],
        "skipped": skipped, "memory_sweep": sweep, "targets": targets, "markdown": md,
    }
    out_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    out_path.with_suffix(".md").write_text(md)
    print(f"\nwrote {out_path} and {out_path.with_suffix('.md')} in {total_seconds / 60:.1f} min")
    return 0


def _jsonable(row: dict) -> dict:
    raw = {k: v for k, v in row.get("raw", {}).items() if k != "token_lengths"}
    return {k: v for k, v in row.items() if k != "raw"} | {"detail": raw}


def _dpokit_version() -> str:
    try:
        from importlib.metadata import version

        return version("dpokit")
    except Exception:
        return "unknown"


def run_sweep(args, work: Workload, tmp: Path, log_dir: Path, rows: list[dict], flops: Flops) -> list[dict]:
    """Peak memory of dpokit's default, memory-lean and plain paths (and TRL with --sweep-trl), one update per process.
    Batch axis: the first pairs of the first timed update; length axis: pairs of a fixed length."""
    names = ["prefix_shared", "lean", "plain"] + (["trl"] if args.sweep_trl else [])
    main_rows = {r["name"]: r for r in rows if r.get("ok")}
    points = [("batch", int(b), None) for b in args.sweep_batches.split(",") if b]
    points += [("length", args.sweep_length_batch, int(n)) for n in args.sweep_lengths.split(",") if n]
    first_timed = work.rows[args.warmup * args.batch:(args.warmup + 1) * args.batch]
    out = []
    for axis, pairs, seq in points:
        if seq is None:
            if pairs > len(first_timed):
                continue
            pair_rows = first_timed[:pairs]
        else:  # prompt a quarter of the sequence, each completion the rest
            n = max(8, round(seq * args.length_scale))
            pair_rows = make_pairs(work.tokenizer, [(n // 4, n - n // 4, n - n // 4)] * pairs, args.seed + 2)
        tag = f"sweep-{axis}-{pairs}-{seq or 'natural'}"
        data = tmp / f"{tag}.jsonl"
        write_jsonl(data, pair_rows)
        lengths = tokenized_lengths(data, work.tokenizer, args.max_length)
        seqs = [p + c for p, c, _ in lengths] + [p + r for p, _, r in lengths]
        point = {"axis": axis, "pairs": pairs, "seq_target": seq, "seq_mean": statistics.fmean(seqs),
                 "seq_max": max(seqs), "logical_tokens": sum(2 * p + c + r for p, c, r in lengths),
                 "padded_logits_bytes": 2 * pairs * max(seqs) * flops.vocab * 4, "contenders": names,
                 "results": {}}
        # the main run's first timed update is this very batch: reuse its peak when it ran only that update
        reuse = axis == "batch" and pairs == args.batch and args.steps == 1
        for name in names:
            if reuse and name in main_rows:
                m = main_rows[name]
                point["results"][name] = {"ok": True, "peak_memory_bytes": m["peak_memory_bytes"],
                                          "seconds": m["per_update_seconds"].get(args.warmup), "from_main_run": True}
                continue
            kind = "trl" if name == "trl" else "dpokit"
            spec = {"model": args.model, "data": str(data), "batch": pairs, "lr": args.lr, "beta": args.beta,
                    "max_length": args.max_length, "seed": args.seed, "device": args.device,
                    "name": f"{tag}-{name}", "kind": kind, "mode": "fp32" if kind == "trl" else name,
                    "warmup": 0, "steps": 1, "first_update": 0}
            if args.wait_quiet:
                wait_quiet(args.wait_quiet)
            print(f"sweep {axis}: {pairs} pairs, mean {point['seq_mean']:.0f} tokens/sequence, {name} ...", flush=True)
            raw = run_worker(spec, tmp, args.timeout, log_dir)
            mem = raw.get("memory", {})
            steps = raw.get("steps") or []
            r = point["results"][name] = {
                "ok": bool(raw.get("ok")) and bool(steps), "error": raw.get("error"),
                "peak_memory_bytes": mem.get("cuda_max_allocated_bytes", mem.get("max_rss_bytes")),
                "setup_memory_bytes": (raw.get("setup_memory") or {}).get("max_rss_bytes"),
                "seconds": steps[0]["seconds"] if steps else None, "outside_cpu_cores": raw.get("outside_cpu_cores"),
            }
            print(f"  peak {fmt((r['peak_memory_bytes'] or 0) / GB, '.2f')} GB, {fmt(r['seconds'], '.1f')} s"
                  + ("" if r["ok"] else f" failed: {r['error']}"), flush=True)
        out.append(point)
    return out


if __name__ == "__main__":
    sys.exit(main())
