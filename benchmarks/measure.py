"""The measurement: FLOPs, the machine's matmul peak, memory, time and how quiet the machine is.

FLOPs are matmul FLOPs (2 per multiply-add) of the linear layers, the attention scores/values and the LM head;
elementwise work is not counted. With N_lin the weights of the decoder stack's linear layers, L layers, h query
heads of width d_h, hidden size d and vocabulary V:
    linear(n tokens)      = 2 * N_lin * n
    attention(k pairs)    = 4 * L * h * d_h * k        (k = query-key pairs computed)
    head(n positions)     = 2 * d * V * n
Useful FLOPs of a pair (P prompt, C chosen, R rejected tokens) are the least work DPO needs:
    F = linear(P + C + R) + attention(P+C causal, R over P and itself causal) + head(C + R)
    useful = 3F (policy forward + backward) + F (reference forward) = 4F
that is, each prompt once, the LM head only where a completion token is predicted. The executed FLOPs
(HFU) apply the same formulas to what a contender runs: its layout (padded rows of the batch's longest sequence,
prompts twice, SDPA with a mask computing every query-key pair), its LM head (all positions or completion
positions only, chunks recomputed in backward), gradient checkpointing (one more forward of the decoder layers)
and its reference (forward, or none in the step with precomputed log-probs).

Memory is the peak of the contender's own process: `ru_maxrss` on CPU, `torch.cuda.max_memory_allocated` on GPU.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import threading
import time
from pathlib import Path

from workload import Lengths, padded_width

# ------------------------------------------------------------------------------------------ FLOPs


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

    def useful(self, batch: list[Lengths], *, reference: bool = True) -> float:
        return sum((4 if reference else 3) * self.forward_min(*x) for x in batch)

    def executed(self, batch: list[Lengths], *, layout: str, lm_head: str, checkpointing: bool,
                 reference: bool) -> float:
        """Estimate of the matmul FLOPs one update of `batch` executes. `layout`: padded | packed | prefix_shared;
        `lm_head`: full (every position: forward + 2 backward GEMMs), chunked_full (TRL: every position but the
        last: forward, recomputation + 2 backward GEMMs) or selective (completion positions, chunks recomputed in
        backward); `checkpointing`: one more forward of the decoder layers; `reference`: its forward is in the
        update."""
        b, width = len(batch), padded_width(batch)
        if layout == "padded":
            tokens, pairs_qk = 2 * b * width, 2 * b * width * width  # masked SDPA: every query-key pair
        elif layout == "packed":
            tokens = sum(2 * p + c + r for p, c, r in batch)
            pairs_qk = sum(causal(p + c) + causal(p + r) for p, c, r in batch)
        else:  # prefix_shared: [prompt][chosen] causal; rejected over prompt + itself with an explicit mask
            tokens = sum(p + c + r for p, c, r in batch)
            pairs_qk = sum(causal(p + c) + r * (p + r) for p, c, r in batch)
        body = self.lin * tokens + self.att * pairs_qk
        if lm_head == "full":
            head_passes, positions = 3, 2 * b * width
        elif lm_head == "chunked_full":
            head_passes, positions = 4, 2 * b * (width - 1)
        else:
            head_passes, positions = 4, sum(c + r for _, c, r in batch)
        head = self.head * positions
        policy = (4 if checkpointing else 3) * body + head_passes * head
        return policy + (body + head if reference else 0)


# ------------------------------------------------------------------------------------------ the machine


def cpuinfo_field(key: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1]
    return None


def cpu_flags() -> list[str]:
    have = set((cpuinfo_field("flags") or "").split())
    return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in have]


def proc_kb_field(path: str, key: str) -> int | None:
    """A `key:  N kB` line of a /proc file (meminfo, status), in bytes; None where there is none."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def machine(device: str) -> dict:
    import torch

    cpu = cpuinfo_field("model name")
    return {
        "cpu": cpu.strip() if cpu is not None else platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_flags": cpu_flags(), "torch_threads": torch.get_num_threads(),
        "memory_bytes": proc_kb_field("/proc/meminfo", "MemTotal"),
        "device": device, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "platform": platform.platform(), "python": platform.python_version(),
    }


def versions() -> dict:
    import torch
    import transformers

    import dpokit

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_version,
            "dpokit": dpokit.__version__}


def measure_peaks(dims: dict, device: str) -> dict:
    """Best achieved GEMM throughput in fp32 and bf16 at the shapes the model uses."""
    import torch

    d, ff, v = dims["hidden"], dims["intermediate"] or 4 * dims["hidden"], dims["vocab"]
    if device == "cuda":
        m, shapes = 16384, [(8192, 8192, 8192)]
    else:
        m, shapes = 2048, [(2048, 2048, 2048)]
    shapes += [(m, d, ff), (m, ff, d), (m, d, d), (max(256, m // 4), d, v)]

    def rate(fn, flops: float, budget: float) -> float:
        fn()
        sync(device)
        best, spent = 0.0, 0.0
        for _ in range(5 if device == "cpu" else 20):
            t = time.perf_counter()
            fn()
            sync(device)
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


# ------------------------------------------------------------------------------------------ quietness


def busy_cpu_seconds() -> float | None:
    """CPU seconds every process on the machine has used (from /proc/stat), to measure outside load."""
    with contextlib.suppress(OSError, ValueError):
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return None


WAITED = [0.0]  # seconds spent in wait_quiet, for the JSON


def wait_quiet(max_seconds: float, threshold: float = 0.15, window: float = 5.0) -> float:
    """Wait (at most `max_seconds`) until the machine's CPU use over `window` seconds is below `threshold` cores;
    returns the last measured use. Between contenders this process is idle, so what it sees is other work."""
    start = time.monotonic()
    deadline = start + max_seconds
    try:
        while True:
            before = busy_cpu_seconds()
            time.sleep(window)
            after = busy_cpu_seconds()
            if before is None or after is None:
                return 0.0
            used = (after - before) / window
            if used < threshold or time.monotonic() >= deadline:
                return used
    finally:
        WAITED[0] += time.monotonic() - start


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


# ------------------------------------------------------------------------------------------ in a contender


def sync(device: str) -> None:
    """Wait for queued GPU work, so the clock reads what was computed."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory(device: str) -> dict:
    """The process's peak (and current) memory so far."""
    import torch

    out = {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "rss_bytes": proc_kb_field("/proc/self/status", "VmRSS")}
    if device == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return out


def peak_bytes(memory: dict) -> int | None:
    """The reported peak of a `peak_memory` result: allocated GPU memory where there is a GPU, else max RSS."""
    return memory.get("cuda_max_allocated_bytes", memory.get("max_rss_bytes"))
