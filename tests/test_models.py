"""Model sources (alias, .gguf, directory, run), LoRA, export; the embedded model where realism matters."""

import re

import pytest
import torch

from dpokit import models
from dpokit.errors import ModelError


def test_alias_resolves_to_the_packaged_gguf_and_converts_once(smol_dir):
    src = models.resolve("smollm2-135m-instruct")
    assert src.kind == "gguf" and src.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert models.model_dir("smollm2-135m-instruct") == smol_dir  # the cached conversion is reused
    assert (models.cache_root() / "models").exists()


def test_embedded_model_is_a_trainable_float_llama(smol_dir):
    model = models.load_model("smollm2-135m-instruct")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in model.config.to_dict()


def test_embedded_tokenizer_has_chat_template_and_eos(tokenizer):
    assert tokenizer.chat_template is not None
    assert tokenizer.eos_token == "<|im_end|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


def test_resolve_errors_are_clear(tmp_path):
    with pytest.raises(ModelError, match="no such file or directory"):
        models.resolve("./nowhere/model")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="must be .gguf"):
        models.resolve(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelError, match="no config.json"):
        models.resolve(str(tmp_path))
    assert models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"  # resolved, not downloaded


def test_run_directory_resolves_to_its_model(tiny_config):
    from dpokit.trainer import train

    result = train(tiny_config("train.max_steps=1"))
    assert models.resolve(str(result.run_dir)).path == str(result.model_dir.resolve())


def test_embedded_model_trains_one_lora_step(tmp_path, pairs_file):
    """One real step on SmolLM2-135M: LoRA, prefix-shared layout, adapters-disabled reference."""
    from dpokit.config_loader import load_config
    from dpokit.metrics import read_metrics
    from dpokit.trainer import train

    cfg = load_config(None, [f"data.train={pairs_file}", f"output.dir={tmp_path / 'run'}", "lora.enabled=true",
                             "lora.r=8", "train.layout=prefix_shared", "train.batch_size=4",
                             "train.micro_batch_size=4", "train.max_steps=2", "train.lr=1e-3",
                             "checkpoint.every=0", "output.tensorboard=false"])
    result = train(cfg)
    rows = [r for r in read_metrics(result.run_dir) if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert rows[1]["rewards/margins"] != 0.0
    assert -200 < rows[0]["logps/chosen"] < 0  # a pretrained model: plausible sequence log-probs


def test_a_reward_model_is_refused_where_a_causal_lm_is_needed(tmp_path, tiny_config, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from dpokit.errors import ConfigError
    from dpokit.rundir import check_model

    reward = tmp_path / "reward" / "model"
    LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                                               pad_token_id=2)).save_pretrained(reward)
    run = str(reward.parent)
    message = f"{run} is a reward model (a sequence classifier, as dpokit reward exports): it scores text"
    with pytest.raises(ModelError, match=re.escape(message)):
        check_model(run)  # dpokit chat, generate and evaluate ask this first
    with pytest.raises(ModelError, match=re.escape(message)):
        models.load_model(run)
    with pytest.raises(ConfigError, match=re.escape(f"reference.name: {message}")):
        tiny_config(f"reference.name={run}")


@pytest.mark.slow  # a fresh process: bitsandbytes warns once, when first imported
def test_lora_without_quantization_prints_no_kernel_download_warning():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import dpokit.models, peft, bitsandbytes"], capture_output=True,
                         text=True, check=True)
    assert "gemm_4bit_forward" not in out.stderr and "kernels-community" not in out.stderr


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(True, False, "bfloat16"), (False, True, "bfloat16"),
                                                         (False, False, "float32")])
def test_auto_dtype_is_bf16_only_where_bf16_matmul_is_fast(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert models.resolve_dtype("auto", "cpu") == expected
    assert models.resolve_dtype("float32", "cpu") == "float32"  # a pinned dtype is kept
