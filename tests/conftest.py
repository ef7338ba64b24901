"""Shared fixtures: the embedded model's tokenizer, tiny models built from a config, small pair files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def smol_dir() -> str:
    """The embedded SmolLM2-135M-Instruct as a converted HF directory (converted once per machine)."""
    from dpokit import models

    return models.model_dir("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(smol_dir):
    from dpokit import models

    return models.load_tokenizer(smol_dir)


def tiny_llama(vocab_size: int = 49152, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
               bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    """A 2-layer Llama with the SmolLM2 tokenizer, saved as an HF directory: the trainer loads it by path."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(seed=0).save_pretrained(path)
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


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    rows = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in PAIRS]
    return write_jsonl(tmp_path / "pairs.jsonl", rows * 2)


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dir, pairs_file):
    """A fast config: the tiny model, 16 pairs, 4 steps of 4, in fp32 (precision=auto picks bf16 on CPUs
    with AMX, which the tests' tolerances are not set for; tests of other precisions set it)."""
    from dpokit.config import Config

    def make(*overrides: str) -> Config:
        base = [f"model.name={tiny_model_dir}", f"data.train={pairs_file}", f"output.dir={tmp_path / 'run'}",
                "train.batch_size=4", "train.micro_batch_size=2", "train.lr=1e-3", "train.max_steps=4",
                "checkpoint.every=0", "output.tensorboard=false", "train.precision=fp32", f"reference.cache_dir={tmp_path / 'refcache'}"]
        return Config.load(None, base + list(overrides))

    return make


def crash_then_resume(cfg, monkeypatch, *, at_step: int = 3):
    """Train `cfg` until a crash inside step `at_step` (the checkpoints before it written), then resume it
    in the same process: the resumed run's result, to compare with an uninterrupted run."""
    from dpokit.train import Trainer, train

    real_step = Trainer.train_step

    def crash(self, ids):
        if self.step == at_step:
            raise RuntimeError("simulated crash")
        return real_step(self, ids)

    monkeypatch.setattr(Trainer, "train_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    return train(cfg, resume=True)


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
