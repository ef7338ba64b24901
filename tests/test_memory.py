"""Memory options on the tiny model: QLoRA (bitsandbytes nf4/int8 on CPU), 8-bit and 4-bit optimizer state, the
optimizer step in the backward pass, their exact resume, the lean preset and the combinations config refuses."""

import os

import pytest
import torch
from safetensors.torch import load_file

from dpokit.errors import ConfigError
from dpokit.metrics import read_metrics
from dpokit.trainer import Trainer, train
from tests.helpers import crash_then_resume, tiny_llama

pytest.importorskip("bitsandbytes")


def weights(model_dir):
    name = "adapter_model.safetensors" if os.path.exists(os.path.join(model_dir, "adapter_config.json")) \
        else "model.safetensors"
    return load_file(os.path.join(model_dir, name))


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


IN_BACKWARD = ("train.optimizer_in_backward=true", "train.micro_batch_size=4", "train.max_grad_norm=0")


@pytest.mark.parametrize("overrides, message", [
    (["model.quantization=nf4"], "model.quantization=nf4 trains LoRA adapters on a frozen quantized base"),
    (["model.quantization=int8", "lora.enabled=true", "reference.strategy=copy"], "not a copy"),
    (["model.quantization=nf4", "lora.enabled=true", "lora.merge_on_export=true"], "export the adapter"),
    (["train.optimizer_in_backward=true", "train.max_grad_norm=0"], "no gradient accumulation"),
    (["train.optimizer_in_backward=true", "train.micro_batch_size=4"], "train.max_grad_norm=0"),
    (["distributed.cpu_offload=true"], "needs distributed.strategy=fsdp"),
    (["train.preset=lean", "train.micro_batch_size=2"], "no gradient accumulation"),
    (["train.preset=lean", "train.reuse_freed_memory=true"], "pull opposite ways"),
])
def test_config_refuses_what_the_memory_options_exclude(tiny_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(*overrides)


def test_lean_preset_sets_its_keys_unless_given(tiny_model_dir, pairs_file):
    from dpokit.config_loader import load_config

    def load(*overrides):
        return load_config(None, [f"model.name={tiny_model_dir}", f"data.train={pairs_file}", "train.batch_size=6",
                                  "train.preset=lean", *overrides])

    cfg = load()
    assert cfg.reference.strategy == "precomputed" and cfg.train.gradient_checkpointing
    assert cfg.train.optimizer == "adamw8bit" and cfg.train.optimizer_in_backward
    assert cfg.train.micro_batch_size == cfg.train.batch_size == 6 and cfg.train.max_grad_norm == 0
    assert cfg.train.release_freed_memory
    mine = load("train.optimizer=adamw", "reference.strategy=copy")
    assert mine.train.optimizer == "adamw" and mine.reference.strategy == "copy"
    assert load("lora.enabled=true").reference.strategy == "auto"  # disabled adapters take no memory


def test_activation_offload_is_refused_without_a_gpu(tiny_config):
    with pytest.raises(ConfigError, match="nothing to offload"):
        train(tiny_config("train.activation_offload=true"))


def test_optimizer_in_backward_matches_the_optimizer_after_backward(tiny_config, tmp_path):
    common = ("train.micro_batch_size=4", "train.max_grad_norm=0")
    after = train(tiny_config(*common, f"output.dir={tmp_path / 'after'}"))
    during = train(tiny_config(*IN_BACKWARD, f"output.dir={tmp_path / 'during'}"))
    assert losses(during.run_dir) == pytest.approx(losses(after.run_dir), abs=1e-6)
    norms = [[r["grad_norm"] for r in read_metrics(run) if "loss" in r] for run in (after.run_dir, during.run_dir)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)
    a, b = weights(after.model_dir), weights(during.model_dir)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


@pytest.mark.parametrize("overrides", [
    ("train.optimizer=adamw8bit",),
    ("train.preset=lean", "train.micro_batch_size=4"),  # adamw8bit stepped in the backward pass, precomputed reference, checkpointing
    ("train.optimizer=adamw4bit",),
], ids=["adamw8bit", "lean", "adamw4bit"])
def test_low_precision_optimizer_state_resumes_exactly(tiny_config, tmp_path, monkeypatch, overrides):
    if "train.optimizer=adamw4bit" in overrides:
        pytest.importorskip("torchao")
    released = []  # the lean preset's release_freed_memory, recorded: it would change this pytest process's malloc
    monkeypatch.setattr("dpokit.host_memory.release_freed_memory", lambda: released.append(True) or True)
    common = ("train.max_steps=4", "train.epochs=2", "checkpoint.every=2", *overrides)
    straight = train(tiny_config(*common, f"output.dir={tmp_path / 'straight'}"))
    cfg = tiny_config(*common, f"output.dir={tmp_path / 'interrupted'}")
    resumed = crash_then_resume(cfg, monkeypatch)  # checkpoint 2 written, step 3 done but not checkpointed
    assert losses(resumed.run_dir) == losses(straight.run_dir)
    assert bool(released) == ("train.preset=lean" in overrides)
    a, b = weights(straight.model_dir), weights(resumed.model_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_adamw8bit_keeps_8bit_moments_and_follows_adamw(tiny_config, tmp_path):
    trainer = Trainer(tiny_config("train.optimizer=adamw8bit", "train.max_steps=1"), _runtime())
    try:
        trainer.train_step(list(range(4)))
        big = max(trainer.params, key=lambda p: p.numel())
        state = trainer.optimizer.state[big]
        assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    finally:
        trainer.close()
    full = losses(train(tiny_config(f"output.dir={tmp_path / 'fp32'}")).run_dir)
    eight = losses(train(tiny_config("train.optimizer=adamw8bit", f"output.dir={tmp_path / '8bit'}")).run_dir)
    assert eight[0] == full[0]  # the same start
    assert eight == pytest.approx(full, abs=0.05)


@pytest.fixture(scope="module")
def quantizable_model_dir(tmp_path_factory, tokenizer) -> str:
    """The tiny Llama at width 64: bitsandbytes' CPU 4-bit kernels on AVX512-BF16/AMX CPUs repack weights in
    blocks of 64 input features and fail on the usual 32 (real models are hundreds wide)."""

    path = tmp_path_factory.mktemp("tiny-llama-64")
    tiny_llama(seed=0, hidden_size=64, intermediate_size=128).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_qlora_trains_adapters_on_the_quantized_base_as_its_reference(tiny_config, tmp_path, quantization,
                                                                       quantizable_model_dir):
    import bitsandbytes as bnb

    from dpokit import models

    cfg = tiny_config("lora.enabled=true", "lora.r=4", "train.lr=5e-3", f"model.quantization={quantization}",
                      "train.max_steps=3", f"model.name={quantizable_model_dir}")
    trainer = Trainer(cfg, _runtime())
    try:
        lm = trainer.policy.model
        kind = bnb.nn.Linear4bit if quantization == "nf4" else bnb.nn.Linear8bitLt
        assert any(isinstance(m, kind) for m in lm.modules())
        assert all("lora_" in n for n, p in lm.named_parameters() if p.requires_grad)
        # the reference is the quantized base with its adapters off: at step 0 (adapters B = 0) every reward is 0
        first = trainer.train_step(list(range(4)))
        assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0
        trainer.step += 1
        rows = [trainer.train_step(list(range(4, 8)))]
        assert rows[0]["rewards/margins"] != 0  # the adapters moved the policy away from the base
        base = models.load_model(cfg.model.name, quantization=quantization)
        batch_ids = list(range(4))
        from dpokit.data.layouts import collate
        from dpokit.logps import CompletionLogProbs

        pairs = [trainer.method.train_set[i] for i in batch_ids]
        batch = collate(pairs, batch_ids, cfg.train.layout, trainer.tokenizer.pad_token_id)
        models.use_layout(base, cfg.train.layout)
        with torch.no_grad():
            want = CompletionLogProbs(base)(batch)
        got = trainer.method.reference.logps(batch, "train")
        tol = 1e-4 if quantization == "nf4" else 2e-3  # int8 casts the activations to fp16 for its matmul
        # and nf4's CPU kernel on AVX512-BF16/AMX CPUs computes in bf16: agreement to 1e-4 relative there
        assert torch.allclose(got.chosen, want.chosen, atol=tol, rtol=1e-4)
        assert torch.allclose(got.rejected, want.rejected, atol=tol, rtol=1e-4)
    finally:
        trainer.close()


def test_qlora_run_exports_its_adapter(tiny_config, tmp_path, quantizable_model_dir):
    result = train(tiny_config("lora.enabled=true", "lora.r=4", "model.quantization=nf4", "train.max_steps=2",
                               f"model.name={quantizable_model_dir}"))
    assert (result.model_dir / "adapter_config.json").is_file()
    assert all("lora_" in k for k in weights(result.model_dir))
    assert all(torch.isfinite(torch.tensor(x)) for x in losses(result.run_dir))


def _runtime():
    from dpokit.distributed import init_runtime

    return init_runtime()
