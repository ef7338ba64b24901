"""dpokit.host_memory: freed tensor memory leaves the process at once, or stays for reuse; huge pages. Each case
runs in a child process, since the setting lasts for the process."""

import json
import os
import subprocess
import sys

import pytest

# Free a 24 MB tensor (glibc then serves allocations up to that size from its heap), then allocate 16 tensors of
# 8 MB with a live 256 kB tensor after each, and free the large ones: the heap cannot shrink past the live ones.
CHILD = """
import json, os, sys
import torch
from dpokit import host_memory
released = host_memory.release_freed_memory() if sys.argv[1] == "release" else False
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
torch.ones(6 << 20)
before = rss()
big, small = [], []
for _ in range(16):
    big.append(torch.ones(2 << 20))
    small.append(torch.ones(64 << 10))
del big
print(json.dumps({"released": released, "kept": rss() - before}))
"""


# glibc's behaviour alone: 4 kB pages (the tests' own process asks PyTorch for huge pages, conftest.py)
SMALL_PAGES = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0"}


def kept(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True,
                         env=SMALL_PAGES)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt; elsewhere the setting does nothing")
def test_freed_tensors_leave_the_process():
    heap, released = kept("keep"), kept("release")
    assert released["released"] and not heap["released"]
    assert heap["kept"] > 100e6  # 128 MB freed, still resident
    assert released["kept"] < 20e6


# Allocate, fill and free a 64 MB tensor 8 times (past glibc's largest mmap threshold, 32 MB: mapped anew each
# time by default) and count the page faults of the last 6 (the heap settles in the first rounds).
REUSE_CHILD = """
import json, resource, sys
import torch
from dpokit import host_memory
reused = host_memory.reuse_freed_memory() if sys.argv[1] == "reuse" else False
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 << 20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del x
print(json.dumps({"reused": reused, "faults": sum(faults[2:])}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt; elsewhere the setting does nothing")
def test_reused_memory_is_not_faulted_in_again():
    def faults(mode: str) -> dict:
        out = subprocess.run([sys.executable, "-c", REUSE_CHILD, mode], capture_output=True, text=True, check=True,
                             env=SMALL_PAGES)
        return json.loads(out.stdout.strip().splitlines()[-1])

    default, reused = faults("default"), faults("reuse")
    assert reused["reused"] and not default["reused"]
    assert default["faults"] > 6 * 16000  # 64 MB in 4 kB pages, mapped anew each round
    # the freed block is reused (where the heap's layout shifts a block's alignment, one round extends the heap)
    assert reused["faults"] < 2 * 16000


# The switch is PyTorch's, read at the process's first CPU tensor: asked for before it, blocks of 2 MB and up are
# page-aligned (for `madvise`); asked for after it, or switched off by the environment, they are not.
HUGE_CHILD = """
import json, os, sys
import torch
from dpokit import host_memory
if sys.argv[1] == "late":
    torch.ones(3)
in_effect = host_memory.huge_pages()
aligned = all(torch.empty(1 << 20).data_ptr() % 4096 == 0 for _ in range(4))
print(json.dumps({"in_effect": in_effect, "aligned": aligned, "switch": os.environ["THP_MEM_ALLOC_ENABLE"]}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PyTorch advises huge pages on Linux only")
@pytest.mark.parametrize("case, switch, expected", [
    ("first", None, {"in_effect": True, "aligned": True, "switch": "1"}),
    ("late", None, {"in_effect": False, "aligned": False, "switch": "1"}),
    ("first", "0", {"in_effect": True, "aligned": False, "switch": "0"}),  # the environment's choice stands
])
def test_huge_pages_apply_before_the_first_tensor_only(case, switch, expected):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if switch is not None:
        env["THP_MEM_ALLOC_ENABLE"] = switch
    out = subprocess.run([sys.executable, "-c", HUGE_CHILD, case], capture_output=True, text=True, check=True, env=env)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected
