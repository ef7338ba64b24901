"""Host (CPU) memory: give freed tensor memory back to the system at once, or keep all of it for reuse; back
large tensors with huge pages (`huge_pages`, below).

glibc serves large allocations from its heap once freed ones have raised its mmap threshold (up to 32 MB), and a
heap with live tensors between freed ones cannot shrink: a training step's temporaries, freed layer after layer,
stay resident. Measured on the benchmark's step (SmolLM2-135M, 8 pairs, CPU), peak RSS: the lean preset 3.83 GB
with the dynamic threshold, 2.2 GB with it fixed at 4 MB or 64 kB; LoRA 6.02 GB at 4 MB and 4.16 GB at 64 kB
(which of LoRA's allocations keep the heap from shrinking was not established). Each step is
20-30% slower (fresh pages are faulted in). The CUDA caching allocator is unaffected: this is for training on a
CPU.

The other way: glibc maps every allocation above its threshold (32 MB at most) anew and unmaps it when freed,
and gives the top of its heap back past its trim threshold, so the vocabulary-wide temporaries (a batch's
logits, their log-softmax, a decode step's 128 x 49,152 probabilities) are faulted in page by page at every
step: `aten::sub` over the logits took 1.1-1.3 s of a training step, 28 ms a call (LM-head chunks of 1,024
tokens, the default then; 128 since, whose 25 MB blocks stay in the heap), where the same subtraction into
reused memory takes a few. With no mappings and no trimming (`reuse_freed_memory`) every freed block stays in
the heap for the next allocation: measured
2026-12-07 on the AMX Xeon, the default fp32 step 28.7 -> 24.6 s per update at 8.43 -> 9.10 GB peak RSS
under the profiler (24.0 -> 21.2 s at the same 6.92 GB in the throughput benchmark), bf16-mixed 16.1 -> 15.3 s;
the decode loop 5-8% faster. The same arithmetic: only where the memory comes from changes (torch aligns
every block to 64 bytes either way).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters
RELEASE_THRESHOLD = 64 << 10  # allocations from 64 kB up get their own mapping, returned to the system when freed


@functools.cache
def release_freed_memory() -> bool:
    """Fix glibc's mmap threshold for the rest of the process; False where the C library has no mallopt (musl,
    macOS), where nothing changes."""
    mallopt = _mallopt()
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, RELEASE_THRESHOLD) == 1


@functools.cache
def reuse_freed_memory() -> bool:
    """Serve every allocation from glibc's heap and never shrink it, for the rest of the process: freed memory
    is reused instead of mapped and faulted in again; the process keeps its peak. False where the C library
    has no mallopt, where nothing changes."""
    mallopt = _mallopt()
    return mallopt is not None and mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1


THP_SWITCH = "THP_MEM_ALLOC_ENABLE"  # PyTorch's own: its CPU allocator advises huge pages for blocks of 2 MB and up


def huge_pages() -> bool:
    """Back PyTorch's CPU blocks of 2 MB and up with transparent huge pages (2 MB pages, `madvise`), unless the
    environment already sets PyTorch's switch. On 4 kB pages the vocabulary-sized blocks are slow to fault in
    and to walk: the LM head's weight gradient (49,152 x 576 from a 128-token chunk) took 224 ms a chunk in the
    profiled fp32 step, 41-56 ms with huge pages (the same product alone, into a fresh block: 43 ms).
    Measured 2026-12-07 on the AMX Xeon (`benchmarks/profile_step.py --steps 2`, alternated): the default
    fp32 step 24.3 and 25.2 -> 21.9 and 23.2 s an update, max RSS 8.2 -> 7.7 GB; bf16-mixed 15.9 and 16.6 ->
    13.9 and 14.4 s at the same RSS; on an AMD EPYC (2026-12-08, throughput benchmark) 36.9 s an fp32 update
    against 36.4 on 4 kB pages, peak 6.45 against 6.99 GB. The arithmetic is the same: only the pages change.

    PyTorch reads the switch at the process's first CPU tensor, so this works only before that. Returns False
    where the switch is on and PyTorch's allocator ignores it (it had started): its blocks are then aligned to
    64 bytes, not to a page."""
    os.environ.setdefault(THP_SWITCH, "1")
    if os.environ[THP_SWITCH] != "1" or not sys.platform.startswith("linux"):
        return True  # the environment chose, or there is nothing to ask for
    return huge_pages_in_effect()


def huge_pages_in_effect() -> bool:
    """Whether PyTorch's CPU allocator is advising huge pages in this process: only then does it align its
    blocks to a page (otherwise to 64 bytes)."""
    import torch

    blocks = [torch.empty(1 << 20) for _ in range(2)]  # 4 MB each; two, since one may fall on a page by chance
    return all(b.data_ptr() % 4096 == 0 for b in blocks)


def _mallopt():
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt
