"""dpokit.host_memory: freed tensor memory leaves the process at once. Each case runs in a child process, since
the setting lasts for the process."""

import json
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


def kept(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
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
        out = subprocess.run([sys.executable, "-c", REUSE_CHILD, mode], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    default, reused = faults("default"), faults("reuse")
    assert reused["reused"] and not default["reused"]
    assert default["faults"] > 6 * 16000  # 64 MB in 4 kB pages, mapped anew each round
    # the freed block is reused (where the heap's layout shifts a block's alignment, one round extends the heap)
    assert reused["faults"] < 2 * 16000
