"""One process or many (torchrun): rank, device, collectives and model wrapping.

A single process is the world of size 1, so the trainer calls the same methods either way.
Under torchrun the process group starts from the environment torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT); gloo on CPU, nccl on GPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Runtime:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    strategy: str = "ddp"
    owns_group: bool = False  # this runtime started the process group, so it ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def sharded(self) -> bool:
        """FSDP2 over several processes: each holds a shard of the parameters."""
        return self.distributed and self.strategy == "fsdp"

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's values of `t`, in place on every rank."""
        if self.distributed:
            dist.broadcast(t, src=0)
        return t

    def gather_objects(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank (one element when not distributed)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (a download, a conversion), then the others reuse its result."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def shard(self, items: list) -> list:
        """This rank's contiguous share of `items` (sizes differ by at most one)."""
        n, r, w = len(items), self.rank, self.world
        return items[n * r // w: n * (r + 1) // w]

    def wrap(self, module: nn.Module, *, layer_classes: tuple[type, ...] = (), cpu_offload: bool = False) -> nn.Module:
        """DDP or FSDP2 around the trainable module (`cpu_offload`: FSDP2's CPUOffloadPolicy); unchanged in a single
        process."""
        if not self.distributed:
            return module
        if self.strategy == "fsdp":
            return shard_module(module, layer_classes, cpu_offload=cpu_offload, device=self.device)
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def no_sync(self, module: nn.Module, last_micro_batch: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step (DDP)."""
        if self.distributed and not last_micro_batch and hasattr(module, "no_sync"):
            return module.no_sync()
        return contextlib.nullcontext()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def shard_module(module: nn.Module, layer_classes: tuple[type, ...], *, cpu_offload: bool = False,
                 device: torch.device | None = None) -> nn.Module:
    """FSDP2: each decoder layer is its own shard group, the rest (embeddings, head) the root's. With `cpu_offload`
    (CPUOffloadPolicy) the sharded parameters, their gradients and so the optimizer state live in CPU memory; each
    group's parameters are copied to the device for its forward and backward, the gradients back after its
    reduce-scatter, and the optimizer steps on the CPU."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    policy = CPUOffloadPolicy(pin_memory=device is not None and device.type == "cuda") if cpu_offload else OffloadPolicy()
    for sub in module.modules():
        if layer_classes and isinstance(sub, layer_classes):
            fully_shard(sub, offload_policy=policy)
    fully_shard(module, offload_policy=policy)
    for name in ("lm_forward", "token_logps"):  # entry points besides forward (generation and PPO's scoring):
        if hasattr(module, name):  # each gathers the root's parameters as forward does
            register_fsdp_forward_method(module, name)
    return module


def init_runtime(strategy: str = "ddp", backend: str = "auto") -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Runtime(device=pick_device(), strategy=strategy)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend=backend, device_id=device if use_cuda else None)
    return Runtime(rank=rank, world=world, device=device, strategy=strategy, owns_group=owns)


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: the GPU where there is one, else the CPU; any other name as torch spells it (cuda:1)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def decoder_layer_classes(model: nn.Module) -> tuple[type, ...]:
    """The transformer block classes of a transformers model (its `_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return tuple({type(m) for m in model.modules() if type(m).__name__ in names})
