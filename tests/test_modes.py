"""Every execution mode (layout, LM head, gradient checkpointing, compile) gives the plain padded path's
numbers: step-0 metrics within 1e-5 in fp32 and the same loss curve over 20 steps."""

import pytest

from dpokit.metrics import read_metrics
from dpokit.trainer import train

PLAIN = ("train.layout=padded", "train.lm_head=full")
MODES = {
    "padded-selective": ("train.layout=padded", "train.lm_head=selective"),
    "packed": ("train.layout=packed",),
    "prefix_shared": ("train.layout=prefix_shared",),
    "prefix_shared-checkpointing": ("train.layout=prefix_shared", "train.gradient_checkpointing=true"),
    "packed-full-head": ("train.layout=packed", "train.lm_head=full"),
}
STEP0 = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def curve(tiny_config, tmp_path, name, *mode):
    cfg = tiny_config(*mode, "train.max_steps=20", "train.epochs=5", "train.micro_batch_size=2",
                      "train.lr=3e-3", f"output.dir={tmp_path / name}")
    return [r for r in read_metrics(train(cfg).run_dir) if "loss" in r]


@pytest.mark.slow  # many training runs
def test_all_modes_match_the_plain_padded_path(tiny_config, tmp_path):
    reference = curve(tiny_config, tmp_path, "plain", *PLAIN)
    assert reference[0]["logps/chosen"] < -10  # non-trivial values to compare
    assert reference[-1]["rewards/margins"] > 0.05  # the curve moves
    for name, mode in MODES.items():
        rows = curve(tiny_config, tmp_path, name, *mode)
        for key in STEP0:
            assert rows[0][key] == pytest.approx(reference[0][key], abs=1e-5), (name, key)
        assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in reference], abs=1e-4), name
        assert [r["logps/chosen"] for r in rows] == pytest.approx([r["logps/chosen"] for r in reference], abs=1e-3), name
