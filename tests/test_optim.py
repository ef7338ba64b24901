"""Learning-rate schedule and optimizer choice."""

import pytest
import torch

from dpokit.config import TrainSection
from dpokit.optim import build_optimizer, build_scheduler, lr_factor


def test_warmup_then_decay_values():
    f = [lr_factor(s, warmup=4, total=12, schedule="linear") for s in range(12)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4:] == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
    cos = [lr_factor(s, warmup=0, total=4, schedule="cosine") for s in range(4)]
    assert cos == pytest.approx([1.0, 0.853553, 0.5, 0.146447], abs=1e-6)
    assert {lr_factor(s, warmup=2, total=10, schedule="constant") for s in range(2, 10)} == {1.0}


def test_scheduler_follows_warmup_ratio():
    p = torch.nn.Parameter(torch.zeros(1))
    cfg = TrainSection(lr=1e-3, warmup_ratio=0.5, schedule="linear")
    opt = build_optimizer([p], cfg)
    sched = build_scheduler(opt, cfg, total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])


@pytest.mark.parametrize("name,cls", [("adamw", torch.optim.AdamW), ("rmsprop", torch.optim.RMSprop)])
def test_optimizer_choice_and_frozen_params_left_out(name, cls):
    trainable, frozen = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2), requires_grad=False)
    opt = build_optimizer([trainable, frozen], TrainSection(optimizer=name, lr=0.1, weight_decay=0.01))
    assert isinstance(opt, cls)
    assert opt.param_groups[0]["params"] == [trainable]
    assert opt.param_groups[0]["weight_decay"] == 0.01


def test_adamw_fused_on_plain_tensors_and_same_update_as_the_reference_loop():
    """The fused kernel is chosen for ordinary parameters and makes the same update as PyTorch's for-loop AdamW."""
    torch.manual_seed(0)
    p, q = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(5, 3))
    q.data.copy_(p.data)
    cfg = TrainSection(optimizer="adamw", lr=0.1, weight_decay=0.01)
    fused = build_optimizer([p], cfg)
    assert fused.defaults["fused"] is True
    loop = torch.optim.AdamW([q], lr=0.1, betas=tuple(cfg.adam_betas), eps=cfg.eps, weight_decay=0.01, foreach=False)
    for _ in range(3):
        grad = torch.randn(5, 3)
        p.grad, q.grad = grad.clone(), grad.clone()
        fused.step()
        loop.step()
    assert torch.allclose(p, q, atol=1e-6)
