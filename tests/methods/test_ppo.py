"""PPO on the shared loop: rollouts scored like a plain forward pass, a tiny model that learns a judge's
reward, the logged metrics, checkpoints, and exact resume."""

import contextlib
import json
import shutil

import pytest
import torch

from dpokit.cli import main
from dpokit.config import Config
from dpokit.config_loader import load_config
from dpokit.distributed import Runtime
from dpokit.methods.ppo import PPO
from dpokit.metrics import read_metrics
from dpokit.trainer import train
from tests.helpers import write_jsonl

PROMPTS = ["The movie was", "I think that", "This film is", "My review:"]


@pytest.fixture
def ppo_config(tmp_path, peaked_model_dir):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS * 4])

    def make(*overrides: str) -> Config:
        base = [f"model.name={peaked_model_dir}", f"data.train={prompts}", f"output.dir={tmp_path / 'run'}",
                "ppo.judge=length", "ppo.max_new_tokens=8", "ppo.template=none", "train.batch_size=16",
                "train.micro_batch_size=8", "train.lr=1e-3", "train.schedule=constant", "train.epochs=1000",
                "train.max_steps=4", "checkpoint.every=0", "output.tensorboard=false", "train.layout=padded"]
        return load_config(None, base + list(overrides))

    return make


@pytest.mark.parametrize("layout", ["padded", "prefix_shared"])
def test_rollouts_are_scored_as_a_plain_forward_pass_and_the_first_update_starts_at_ratio_one(ppo_config,
                                                                                              peaked_model_dir,
                                                                                              layout):
    from transformers import AutoModelForCausalLM

    from dpokit import models

    cfg = ppo_config(f"train.layout={layout}", "train.batch_size=4", "train.micro_batch_size=2")
    method = PPO(cfg, Runtime(), models.load_tokenizer(peaked_model_dir))
    policy = method.build(precision="fp32", autocast=contextlib.nullcontext, resume_from=None, echo=print)
    stats = method.prepare(policy, [0, 1, 2, 3], step=0)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy is the reference at step 0
    assert stats["completion_length"] <= 8 and 0 <= stats["eos_fraction"] <= 1
    r = method.rollouts
    plain = AutoModelForCausalLM.from_pretrained(peaked_model_dir).eval()
    for k in range(4):
        pair = r.pairs[k]
        with torch.no_grad():
            logp = plain(input_ids=torch.tensor([pair.prompt + pair.chosen])).logits[0].log_softmax(-1)
        expected = [logp[len(pair.prompt) + j - 1, tok].item() for j, tok in enumerate(pair.chosen)]
        torch.testing.assert_close(r.old_logps[k], torch.tensor(expected), atol=1e-4, rtol=0)
    advantages = torch.cat(r.advantages)
    assert advantages.mean().item() == pytest.approx(0.0, abs=1e-5)  # whitened over the batch
    assert advantages.std().item() == pytest.approx(1.0, abs=1e-3)
    micro = method.forward(policy, [2, 0, 3], "train")  # shuffled: each token meets its own old log-prob
    assert micro.sums["policy/ratio"].item() / 3 == pytest.approx(1.0, abs=1e-5)
    assert micro.sums["policy/clipfrac"].item() == 0 and micro.sums["policy/approx_kl"].item() < 1e-10
    # 4 epochs of 2 minibatches of 2, each epoch a permutation of the batch
    method.cfg = ppo_config(f"train.layout={layout}", "train.batch_size=4", "train.micro_batch_size=2",
                            "ppo.minibatch_size=2")
    updates = method.updates([0, 1, 2, 3])
    assert len(updates) == 8 and all(sorted(updates[i] + updates[i + 1]) == [0, 1, 2, 3] for i in range(0, 8, 2))


@pytest.mark.slow  # 30 PPO iterations
def test_ppo_raises_the_judges_reward_and_logs_its_metrics(ppo_config):
    """PPO-GT with the `length` judge (words in the completion, at most 8 here): over 30 steps of 16
    rollouts the mean reward of the last five steps is clearly above that of the first five."""
    cfg = ppo_config("train.max_steps=30", "checkpoint.every=10", "checkpoint.keep=1", "checkpoint.keep_models=2")
    result = train(cfg, method=PPO)
    rows = [r for r in read_metrics(result.run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 31))
    for key in ("reward", "kl", "kl_coef", "entropy", "rlhf_reward", "completion_length", "eos_fraction",
                "policy/loss", "value/loss", "policy/clipfrac", "value/clipfrac", "policy/approx_kl", "grad_norm",
                "lr", "sequences_per_s"):
        assert key in rows[0], key
    rewards = [r["reward"] for r in rows]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.4, rewards
    assert rows[-1]["kl"] > 0.1  # it moved away from the reference to get there
    assert rows[0]["sequences"] == 4 * 16  # 4 epochs over the 16 rollouts
    # a checkpoint every 10 steps: each model kept is a point of the frontier
    models = sorted(p.name for p in (result.run_dir / "checkpoints").iterdir())
    assert models == ["checkpoint-0000010", "checkpoint-0000020", "checkpoint-0000030"]
    assert all((result.run_dir / "checkpoints" / m / "model" / "model.safetensors").is_file() for m in models)
    assert json.loads((result.run_dir / "run.json").read_text())["method"] == "ppo"


def test_ppo_resumes_exactly(ppo_config):
    """A run whose step-2 checkpoint is all that survived resumes to the weights of the uninterrupted run:
    rollout seeds, minibatch order, the value head, β of the adaptive controller and the score
    normalisation are all restored."""
    from safetensors.torch import load_file

    from dpokit import checkpoint

    cfg = ppo_config("train.max_steps=4", "checkpoint.every=2", "ppo.target_kl=1.0", "ppo.kl_horizon=20",
                     "ppo.minibatch_size=8", "ppo.epochs=2")
    straight = train(cfg, method=PPO)
    expected = load_file(str(straight.model_dir / "model.safetensors"))
    last = read_metrics(straight.run_dir)[-1]
    shutil.rmtree(straight.model_dir)
    shutil.rmtree(checkpoint.checkpoints(straight.run_dir)[-1])
    resumed = train(cfg, method=PPO, resume=True)
    got = load_file(str(resumed.model_dir / "model.safetensors"))
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    again = read_metrics(resumed.run_dir)[-1]
    assert again["kl_coef"] == last["kl_coef"] != 0.05 and again["reward"] == last["reward"]


def test_dpokit_ppo_command_and_its_checks(ppo_config, tmp_path, capsys):
    import yaml

    cfg = ppo_config("train.max_steps=1")
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["ppo", str(path)]) == 0
    assert "PPO against judge length" in capsys.readouterr().out
    assert main(["ppo", str(path), "ppo.judge=null", "output.overwrite=true"]) == 2
    assert "dpokit ppo needs a reward" in capsys.readouterr().err
    assert main(["ppo", str(path), "ppo.minibatch_size=5", "output.overwrite=true"]) == 2
    assert "ppo.minibatch_size (5) must divide train.batch_size (16)" in capsys.readouterr().err
    assert main(["ppo", str(path), "lora.enabled=true", "lora.dropout=0.1", "output.overwrite=true"]) == 2
    assert "lora.dropout=0.1: PPO's ratio" in capsys.readouterr().err


def test_a_judge_that_fails_at_start_leaves_nothing_behind(ppo_config, tmp_path):
    from pathlib import Path

    from dpokit.errors import ConfigError

    cfg = ppo_config("ppo.judge=no_such_module_here:score")
    with pytest.raises(ConfigError, match="cannot import no_such_module_here"):
        train(cfg, method=PPO)
    assert not Path(cfg.output.dir).exists()  # the corrected run starts without --resume or overwrite
