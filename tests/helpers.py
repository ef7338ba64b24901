"""What many tests do, written once: tiny models built from a config, small pair files, a crash and resume,
a resume from an earlier checkpoint compared with the uninterrupted run, and `dpokit train` in a child
process. The fixtures that use them are in conftest.py."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


def tiny_llama(vocab_size: int = 49152, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
               bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def random_pairs(n=4, vocab=100, seed=0):
    """`n` tokenized pairs of random ids below `vocab` (prompts of 1-9 tokens, completions of 1-7)."""
    from dpokit.data.tokenize import TokenizedPair

    rng = random.Random(seed)
    ids = lambda lo, hi: tuple(rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [TokenizedPair(ids(1, 9), ids(1, 7), ids(1, 7), f"x:{i}") for i in range(n)]


def tiny_model_dir(path: Path, tokenizer, seed: int = 0, **overrides) -> str:
    """`tiny_llama(seed, **overrides)` with the SmolLM2 tokenizer, saved as an HF directory the trainer loads."""
    tiny_llama(seed=seed, **overrides).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


PAIRS = [
    ("What is the capital of France?", "Paris.", "I don't care."),
    ("What is 2 plus 3?", "2 plus 3 is 5.", "It is 7, obviously."),
    ("Name a color.", "Blue is a color.", "Go away."),
    ("What sound does a cat make?", "A cat meows.", "A cat barks. Duh."),
    ("Which day comes after Monday?", "Tuesday.", "Ask someone else."),
    ("What is the opposite of hot?", "Cold.", "Hot, obviously."),
    ("How many legs does a dog have?", "A dog has four legs.", "Whatever."),
    ("What is the capital of Italy?", "Rome.", "The capital of Italy is Paris."),
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def crash_then_resume(cfg, monkeypatch, *, at_step: int = 3, method: str | type = "dpo"):
    """Train `cfg` until a crash inside step `at_step` (the checkpoints before it written), then resume it
    in the same process: the resumed run's result, to compare with an uninterrupted run."""
    from dpokit.trainer import Trainer, train

    real_step = Trainer.train_step

    def crash(self, ids):
        if self.step == at_step:
            raise RuntimeError("simulated crash")
        return real_step(self, ids)

    monkeypatch.setattr(Trainer, "train_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, method=method)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    return train(cfg, resume=True, method=method)


def resume_matches_uninterrupted(cfg, method: str | type = "dpo"):
    """Train `cfg` (checkpoint.every below train.max_steps), delete the final model and the last checkpoint
    (as a run killed after the one before), resume, and assert the resumed run's exported weights equal the
    uninterrupted run's, tensor for tensor. Returns the uninterrupted run's result and its weights."""
    from safetensors.torch import load_file

    from dpokit import checkpoint
    from dpokit.trainer import train

    straight = train(cfg, method=method)
    expected = load_file(str(straight.model_dir / "model.safetensors"))
    shutil.rmtree(straight.model_dir)
    shutil.rmtree(checkpoint.checkpoints(straight.run_dir)[-1])  # only the one before survived
    resumed = train(cfg, method=method, resume=True)
    got = load_file(str(resumed.model_dir / "model.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    return straight, expected


def launch(cfg, *extra, **popen) -> subprocess.Popen:
    """`dpokit train` on `cfg` in a child process, output merged into stdout."""
    import yaml

    path = Path(cfg.output.dir).with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "dpokit", "train", str(path), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def wait_for(predicate, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise TimeoutError


def load_with_pairs(*overrides: str, path: str | None = None):
    """`load_config(path, ["data.train=pairs.jsonl", *overrides])`, in the `data_file` fixture's folder."""
    from dpokit.config_loader import load_config

    return load_config(path, ["data.train=pairs.jsonl", *overrides])


def config_error(*overrides: str, path: str | None = None) -> str:
    """The one-line ConfigError of `load_with_pairs(*overrides, path=path)`."""
    from dpokit.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_with_pairs(*overrides, path=path)
    message = str(e.value)
    assert "\n" not in message
    return message
