"""Optimizer and learning-rate schedule: linear warm-up, then constant, linear or cosine decay to 0."""

from __future__ import annotations

import math

import torch

from dpokit.errors import ConfigError


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` names over the trainable `params`; with `cfg.optimizer_in_backward` one per
    parameter, stepped from the backward pass (`OptimizerInBackward`)."""
    params = [p for p in params if p.requires_grad]
    if getattr(cfg, "optimizer_in_backward", False):
        return OptimizerInBackward(params, lambda group: _optimizer(group, cfg))
    return _optimizer(params, cfg)


def _optimizer(params, cfg) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        # the fused kernel (CPU and CUDA) is ~5x faster than the per-tensor loop and makes no full-size temporaries;
        # sharded (DTensor) parameters keep the default implementation
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") and type(p.data) is torch.Tensor
                    for p in params)
        return torch.optim.AdamW(params, fused=fused or None, **kwargs)
    if cfg.optimizer == "adamw8bit":
        # bitsandbytes: both moments quantized block-wise (256 values a block, dynamic 8-bit code with a per-block
        # absmax), dequantized and requantized in the step; tensors under 4096 values keep 32-bit moments. Runs on
        # CPU (bitsandbytes >= 0.49) and CUDA.
        bnb = _import("bitsandbytes", "train.optimizer=adamw8bit")
        return bnb.optim.AdamW8bit(params, **kwargs)
    if cfg.optimizer == "adamw4bit":
        # torchao: both moments in 4 bits (block-wise, 128 values a block), the step compiled with torch.compile
        ao = _import("torchao.optim", "train.optimizer=adamw4bit")
        return ao.AdamW4bit(params, **kwargs)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def _import(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        extra = "lowbit" if package == "torchao" else "memory"
        raise ConfigError(f"{what} needs {package}: pip install 'dpokit[{extra}]'") from None


class OptimizerInBackward(torch.optim.Optimizer):
    """One optimizer per parameter, stepped by the parameter's post-accumulate-grad hook: as soon as the backward
    pass has completed a parameter's gradient, the parameter is updated and the gradient freed (torchtune's
    optimizer_in_bwd), so at most a few gradients exist at any time instead of all of them.

    It stands in for the optimizer in the loop: its `param_groups` are the per-parameter optimizers' own groups
    (a learning-rate scheduler sets them all), `step()` does nothing (the updates happened in the backward pass),
    and `state_dict()` holds every per-parameter optimizer's state, in parameter order. The hooks also sum the
    squared gradient norms, for the logged `grad_norm` (`take_grad_norm`), and skip the update of a parameter
    whose gradient is not finite (`take_nonfinite`). What the loop does with a whole gradient cannot happen here:
    accumulation over micro-batches and global-norm clipping (config validation refuses them), and skipping the
    whole update of a step whose loss is not finite (the finite parameters' updates are already made)."""

    def __init__(self, params: list[torch.nn.Parameter], make):
        self.params = list(params)
        self.optimizers = [make([p]) for p in self.params]
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]
        self.defaults = dict(self.optimizers[0].defaults) if self.optimizers else {}
        self.state = {}  # the per-parameter optimizers hold theirs
        self._sq_norm = 0.0
        self._nonfinite = 0
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(o)) for p, o in zip(self.params,
                                                                                          self.optimizers)]

    def _hook(self, optimizer):
        def step(p: torch.Tensor) -> None:
            norm = float(p.grad.detach().float().norm())
            if math.isfinite(norm):
                self._sq_norm += norm * norm
                optimizer.step()
            else:
                self._nonfinite += 1
                self._sq_norm = float("inf")
            p.grad = None

        return step

    def take_grad_norm(self) -> float:
        """The norm of the whole gradient of the last backward pass(es), and start counting anew."""
        norm, self._sq_norm = math.sqrt(self._sq_norm), 0.0
        return norm

    def take_nonfinite(self) -> int:
        """How many parameters' updates were skipped for a non-finite gradient since the last call."""
        n, self._nonfinite = self._nonfinite, 0
        return n

    def step(self, closure=None):  # the updates happened in the backward pass
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"in_backward": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        states = state_dict["in_backward"]
        if len(states) != len(self.optimizers):
            raise ValueError(f"the checkpoint holds {len(states)} per-parameter optimizers, this model has "
                             f"{len(self.optimizers)} trainable parameters")
        for o, s in zip(self.optimizers, states):
            o.load_state_dict(s)
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for the update made at `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def build_scheduler(optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup=warmup, total=total_steps, schedule=cfg.schedule)
    )
