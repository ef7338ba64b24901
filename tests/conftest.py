"""Shared fixtures: the embedded model's tokenizer, tiny models built from a config, small pair files
(the helpers they use are in helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # PyTorch reads it at the first tensor: the trainer's default here

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import helpers
from tests.helpers import PAIRS, write_jsonl


@pytest.fixture(scope="session")
def smol_dir() -> str:
    """The embedded SmolLM2-135M-Instruct as a converted HF directory (converted once per machine)."""
    from dpokit import models

    return models.model_dir("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(smol_dir):
    from dpokit import models

    return models.load_tokenizer(smol_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    """A 2-layer Llama with the SmolLM2 tokenizer, saved as an HF directory: the trainer loads it by path."""
    return helpers.tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture(scope="session")
def saying(tmp_path_factory, tokenizer):
    """`saying(text)`: the directory of a tiny Llama (with the SmolLM2 tokenizer and chat template) whose
    every next token is `text` (one token), whatever it is shown: greedy, it answers `text` repeated.
    Built from a config: every position's hidden state is the same vector, which only `text`'s row of the
    output layer matches."""
    from transformers import LlamaConfig, LlamaForCausalLM

    made: dict[str, str] = {}

    def make(text: str) -> str:
        if text not in made:
            (token,) = tokenizer.encode(text, add_special_tokens=False)
            cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
            model = LlamaForCausalLM(cfg).eval()
            with torch.no_grad():
                model.model.embed_tokens.weight.fill_(1.0)
                for layer in model.model.layers:  # blocks add nothing to the residual stream
                    layer.self_attn.o_proj.weight.zero_()
                    layer.mlp.down_proj.weight.zero_()
                model.lm_head.weight.zero_()
                model.lm_head.weight[token] = 1.0
            path = tmp_path_factory.mktemp("saying")
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[text] = str(path)
        return made[text]

    return make


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    rows = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in PAIRS]
    return write_jsonl(tmp_path / "pairs.jsonl", rows * 2)


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dir, pairs_file):
    """A fast config: the tiny model, 16 pairs, 4 steps of 4, in fp32 (precision=auto picks bf16 on CPUs
    with AMX or AVX512-BF16, which the tests' tolerances are not set for; tests of other precisions set it)."""
    from dpokit.config import Config
    from dpokit.config_loader import load_config

    def make(*overrides: str) -> Config:
        base = [f"model.name={tiny_model_dir}", f"data.train={pairs_file}", f"output.dir={tmp_path / 'run'}",
                "train.batch_size=4", "train.micro_batch_size=2", "train.lr=1e-3", "train.max_steps=4",
                "checkpoint.every=0", "output.tensorboard=false", "train.precision=fp32", f"reference.cache_dir={tmp_path / 'refcache'}"]
        return load_config(None, base + list(overrides))

    return make


@pytest.fixture
def data_file(tmp_path, monkeypatch) -> str:
    """A valid one-pair file; the tests run in tmp_path so paths in messages are short and exact."""
    monkeypatch.chdir(tmp_path)
    Path("pairs.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n', encoding="utf-8")
    return "pairs.jsonl"


@pytest.fixture(scope="session")
def peaked_model_dir(tmp_path_factory, tokenizer) -> str:
    """The tiny Llama with large initial weights: a peaked next-token distribution (entropy ≈ 2.4 nats
    instead of the uniform 10.8 over 49k tokens), so a few dozen small batches can move it."""
    path = tmp_path_factory.mktemp("tiny-peaked")
    return helpers.tiny_model_dir(path, tokenizer, initializer_range=1.0)
