"""`dpokit estimate`: the expected peak memory of a training step, its parts, and the settings that fit a device."""

from __future__ import annotations

import json

import pytest

from dpokit import models
from dpokit.estimate import GB, Lengths, Shape, configured_lengths, estimate, micro_batch_lengths, model_shape

# a 2-layer Llama-type model: hidden 32, 4 heads of 8 (2 for keys and values), MLP 64, 1,000 tokens, tied embeddings
LINEARS = [(f"model.layers.{i}.{name}", i_, o) for i in range(2) for name, i_, o in (
    ("self_attn.q_proj", 32, 32), ("self_attn.k_proj", 32, 16), ("self_attn.v_proj", 32, 16),
    ("self_attn.o_proj", 32, 32), ("mlp.gate_proj", 32, 64), ("mlp.up_proj", 32, 64), ("mlp.down_proj", 64, 32))]
TENSORS = [1000 * 32] + [i * o for _, i, o in LINEARS] + [32] * 5  # embeddings, linears, 2 norms a layer + the last
SHAPE = Shape(params=sum(TENSORS), linear_params=sum(i * o for _, i, o in LINEARS), linear_shapes=LINEARS, layers=2,
              hidden=32, intermediate=64, kv_dim=16, q_dim=32, head_dim=8, vocab=1000, tensors=TENSORS,
              file_bytes=4 * sum(TENSORS))
LENGTHS = Lengths(tokens=100, completion_tokens=60, pairs=2, source="test")
P = SHAPE.params


def parts(cfg, **kwargs):
    est = estimate(cfg, lengths=LENGTHS, shape=SHAPE, **kwargs)
    assert est.step == pytest.approx(sum(est.parts.values()))
    assert est.peak == max(est.step, est.loading, est.stepping)
    return est


def test_each_part_of_the_default_step(tiny_config):
    est = parts(tiny_config())  # fp32 on a CPU, AdamW, a reference copy, no checkpointing
    activation_values = 8 * 32 + 2 * 16 + 4 * 64 + 2 * 8
    assert SHAPE.activation_values == activation_values
    assert est.parts == pytest.approx({
        "runtime": 0.45e9, "freed_heap": 0.45e9, "weights": 4 * P, "gradients": 4 * P, "optimizer": 8 * P, "reference": 4 * P,
        "activations": 2 * 100 * activation_values * 4,
        "lm_head": 3 * 60 * 1000 * 4 + 60 * 32 * 4})  # one chunk of 60 scored positions, and their hidden states
    # on a CPU the weights file is mapped while the policy's weights (and the reference) are copied out of it
    assert est.loading == pytest.approx(0.45e9 + 4 * P + 4 * P + 4 * P)
    gpu = estimate(tiny_config(), lengths=LENGTHS, shape=SHAPE, device="cuda").parts  # PyTorch's allocations only
    assert gpu["runtime"] == gpu["freed_heap"] == 0


@pytest.mark.parametrize("overrides, changed", [
    (["reference.strategy=precomputed"], {"reference": 0}),
    # tensors under 4,096 values (here all but the embeddings) keep 32-bit state
    (["train.optimizer=adamw8bit"], {"optimizer": 8 * (P - 32000) + 32000 * (2 + 8 / 256)}),
    (["train.optimizer=adamw4bit"], {"optimizer": 8 * (P - 32000) + 32000 * (1 + 8 / 128)}),
    (["train.optimizer_in_backward=true", "train.micro_batch_size=4", "train.max_grad_norm=0"],
     {"gradients": 4 * (32000 + 2048)}),  # the two largest gradients at most
    (["train.gradient_checkpointing=true"],
     {"activations": 2 * 100 * (32 + 4) * 4 + 100 * (8 * 32 + 2 * 16 + 4 * 64 + 2 * 8) * 4}),
    (["train.logps_chunk_tokens=16"], {"lm_head": 3 * 16 * 1000 * 4 + 60 * 32 * 4}),
])
def test_each_memory_option_lowers_its_part_only(tiny_config, overrides, changed):
    default = parts(tiny_config()).parts
    est = parts(tiny_config(*overrides)).parts
    assert est == pytest.approx({**default, **changed}) and sum(est.values()) < sum(default.values())


def test_cpu_8bit_step_and_the_released_heap(tiny_config):
    est = parts(tiny_config("train.optimizer=adamw8bit"))
    resident = sum(v for k, v in est.parts.items() if k not in ("activations", "lm_head"))
    assert est.stepping == pytest.approx(resident + 20 * 32000)  # fp32 working copies for the embeddings' step
    assert parts(tiny_config("train.optimizer=adamw8bit"), device="cuda").stepping == 0
    assert parts(tiny_config()).stepping == 0
    assert parts(tiny_config("train.release_freed_memory=true")).parts["freed_heap"] == 0


def test_padded_rows_and_the_full_lm_head(tiny_config):
    default = parts(tiny_config()).parts
    padded = parts(tiny_config("train.layout=padded")).parts
    # keys and values repeated to the 4 query heads (2 × (32 - 16) values) and the layer's mask (width 25 of 100
    # tokens in 2 pairs' 4 rows)
    assert padded["activations"] == 2 * 100 * (SHAPE.activation_values + 2 * (32 - 16) + 25) * 4
    full = parts(tiny_config("train.lm_head=full")).parts
    assert full["lm_head"] == (100 + 2 * 60) * 1000 * 4  # the logits (or their gradient), the gathered rows twice
    assert {k: v for k, v in full.items() if k != "lm_head"} == {k: v for k, v in default.items() if k != "lm_head"}


def test_heap_allowance_on_a_cpu(tiny_config):
    long = Lengths(tokens=10**6, completion_tokens=600, pairs=2, source="test")
    activations = 2 * 10**6 * SHAPE.activation_values * 4
    full = estimate(tiny_config(), lengths=long, shape=SHAPE)
    assert full.heap_allowance == pytest.approx(0.45 * activations - 0.45e9)  # beyond the 0.45 GB counted
    lora = estimate(tiny_config("lora.enabled=true"), lengths=long, shape=SHAPE)
    assert lora.heap_allowance == pytest.approx(1.4 * activations - 0.45e9)  # measured higher with adapters
    assert estimate(tiny_config(), lengths=LENGTHS, shape=SHAPE).heap_allowance == 0  # never below zero
    assert estimate(tiny_config("train.release_freed_memory=true"), lengths=long, shape=SHAPE).heap_allowance == 0
    assert estimate(tiny_config(), lengths=long, shape=SHAPE, device="cuda").heap_allowance == 0


def test_bf16_mixed_keeps_the_reference_copys_linear_weights_in_bf16(tiny_config, monkeypatch):
    mixed = parts(tiny_config("train.precision=bf16-mixed")).parts
    linear, head = SHAPE.linear_params, 1000 * 32
    # the tied output layer gets a bf16 weight of its own beside the fp32 embedding
    assert mixed["reference"] == pytest.approx((P - linear) * 4 + (linear + head) * 2)
    assert parts(tiny_config("train.precision=bf16-mixed", "reference.dtype=float32")).parts["reference"] == 4 * P
    for fast, expected in ((True, mixed), (False, parts(tiny_config()).parts)):  # auto: the trainer's rule
        monkeypatch.setattr(models, "fast_bf16", lambda device, fast=fast: fast)
        assert parts(tiny_config("train.precision=auto")).parts == pytest.approx(expected)


def test_lora_and_qlora(tiny_config):
    full = parts(tiny_config()).parts
    adapters = 4 * sum(4 * (i + o) for _, i, o in LINEARS)  # r=4 on every linear layer: A (r × in), B (out × r)
    lora = parts(tiny_config("lora.enabled=true", "lora.r=4")).parts
    assert lora["gradients"] == 4 * adapters / 4 and lora["optimizer"] == 8 * adapters / 4
    assert lora["reference"] == 0  # the policy with its adapters off
    assert lora["weights"] == pytest.approx(full["weights"] + adapters)
    qlora = parts(tiny_config("lora.enabled=true", "lora.r=4", "model.quantization=nf4")).parts
    linear = SHAPE.linear_params
    assert qlora["weights"] == pytest.approx(lora["weights"] - linear * (4 - 0.5 - 1 / 64 - 4 / (64 * 256)))
    assert {k: v for k, v in qlora.items() if k != "weights"} == {k: v for k, v in lora.items() if k != "weights"}


def test_fsdp_shards_and_offloads(tiny_config):
    one = parts(tiny_config("distributed.strategy=fsdp")).parts
    two = parts(tiny_config("distributed.strategy=fsdp"), world=2).parts
    assert two["optimizer"] == pytest.approx(one["optimizer"] / 2)
    assert two["activations"] == one["activations"]  # each process runs its own micro-batch
    offload = parts(tiny_config("distributed.strategy=fsdp", "distributed.cpu_offload=true"), world=2)
    assert offload.parts["optimizer"] == 0 and offload.host["optimizer"] == pytest.approx(one["optimizer"] / 2)


def test_micro_batch_lengths_by_layout(tiny_config):
    pairs = [(10, 5, 3), (4, 8, 8)]
    assert micro_batch_lengths(pairs, "padded", "").tokens == 2 * 2 * 15  # every row as wide as the widest
    assert micro_batch_lengths(pairs, "packed", "").tokens == (20 + 8) + (8 + 16)  # each prompt twice
    shared = micro_batch_lengths(pairs, "prefix_shared", "")
    assert (shared.tokens, shared.completion_tokens, shared.pairs) == (18 + 20, 24, 2)  # each prompt once
    worst = configured_lengths(tiny_config("data.max_length=64", "data.max_prompt_length=16"))
    assert (worst.tokens, worst.completion_tokens) == (2 * (16 + 48 + 48), 2 * 96)  # 2 pairs a micro-batch


def test_the_model_shape_from_its_config(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    shape = model_shape(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert shape.params == sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    assert (shape.layers, shape.hidden, shape.intermediate, shape.kv_dim, shape.q_dim, shape.head_dim, shape.vocab) \
        == (2, 32, 64, 16, 32, 8, 49152)
    assert len(shape.linear_shapes) == 14 and shape.file_bytes == 4 * shape.params


# ------------------------------------------------------------------------------------------------ CLI


def run(capsys, *args) -> tuple[int, str]:
    from dpokit.cli import main

    code = main(["estimate", *args])
    return code, capsys.readouterr().out


def test_cli_breakdown_adds_up(tiny_model_dir, pairs_file, capsys):
    common = (f"model.name={tiny_model_dir}", f"data.train={pairs_file}", "data.max_length=256",
              "data.max_prompt_length=64", "--device", "cpu")
    code, out = run(capsys, *common, "--json")
    report = json.loads(out)
    assert code == 0 and report["step_bytes"] == pytest.approx(sum(report["parts_bytes"].values()))
    assert report["peak_bytes"] == max(report["step_bytes"], report["loading_bytes"], report["optimizer_step_bytes"])
    assert report["lengths"]["tokens"] == 4 * (64 + 192 + 192)  # 4 pairs a micro-batch, each prompt once
    code, out = run(capsys, *common)
    lines = out.splitlines()
    shown = {line.split()[0]: float(line.split()[1]) for line in lines[1:9]}
    assert list(shown) == ["runtime", "freed_heap", "weights", "gradients", "optimizer", "reference", "activations", "lm_head"]
    step = next(float(line.split()[2]) for line in lines if line.startswith("  step peak"))
    assert sum(shown.values()) == pytest.approx(step, abs=0.01 * len(shown))  # each rounded to 0.01 GB
    assert lines[-1] == f"expected peak per device: {report['peak_bytes'] / GB:.2f} GB"


def test_cli_suggests_leaner_settings_for_a_small_device(smol_dir, pairs_file, capsys):
    common = (f"data.train={pairs_file}", "--device", "cuda", "--json")  # the embedded model, default settings
    peak = json.loads(run(capsys, *common)[1])["peak_bytes"]
    roomy = json.loads(run(capsys, *common, "--device-gb", f"{peak / GB + 1:.1f}")[1])
    assert roomy["fits"] is True and roomy["suggestions"] == []

    small = json.loads(run(capsys, *common, "--device-gb", f"{peak / GB / 3:.2f}")[1])
    rows = small["suggestions"]
    assert small["fits"] is False and rows and rows[-1]["fits"] and not any(r["fits"] for r in rows[:-1])
    peaks = [peak] + [r["peak"] for r in rows]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == len(peaks)  # each row lowers the peak
    assert rows[0]["overrides"] == ["train.gradient_checkpointing=true"]  # activations first: cheapest in time
    # the fitting settings are a valid config of their own: `dpokit train` takes them as they are
    from dpokit.config_loader import load_config

    cfg = load_config(None, [f"data.train={pairs_file}", *rows[-1]["overrides"]])
    assert estimate(cfg, device="cuda").peak == pytest.approx(rows[-1]["peak"])

    none_fit = run(capsys, *common[:-1], "--device-gb", "0.01")[1].splitlines()
    assert none_fit[-1].startswith("  none of them fits")


def test_cli_counts_the_heap_allowance_on_a_cpu(smol_dir, pairs_file, capsys):
    common = (f"data.train={pairs_file}", "lora.enabled=true", "--device", "cpu")
    report = json.loads(run(capsys, *common, "--json")[1])
    peak, allowance = report["peak_bytes"], report["freed_heap_allowance_bytes"]
    assert allowance > 1e9  # LoRA: up to 1.4 × a micro-batch's activations of the embedded model at 1,024 tokens
    between = f"{(peak + allowance / 2) / GB:.2f}"
    out = run(capsys, *common, "--device-gb", between)[1].splitlines()
    assert out[-1] == f"fits {between} GB unless glibc keeps more freed heap: train.release_freed_memory=true to be sure"
    assert json.loads(run(capsys, *common, "--json", "--device-gb", between)[1])["fits"] is False


@pytest.mark.parametrize("args, message", [
    (["--device-gb", "-1"], "--device-gb: must be a finite number > 0, got -1"),
    (["--device-gb", "0"], "--device-gb: must be a finite number > 0, got 0"),
    (["--device-gb", "nan"], "--device-gb: must be a finite number > 0, got nan"),
    (["--device-gb", "inf"], "--device-gb: must be a finite number > 0, got inf"),
    (["--world", "0"], "--world: must be a finite number > 0, got 0"),
    (["--world", "-3"], "--world: must be a finite number > 0, got -3"),
])
def test_cli_refuses_nonsense_device_sizes_and_process_counts(tiny_model_dir, args, message, capsys):
    from dpokit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["estimate", f"model.name={tiny_model_dir}", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_needs_no_data_without_from_data(tiny_model_dir, capsys):
    from dpokit.cli import main

    assert main(["estimate", f"model.name={tiny_model_dir}"]) == 0
    assert "expected peak per device" in capsys.readouterr().out


def test_each_method_is_estimated_by_what_it_holds(tiny_model_dir, pairs_file, capsys):
    common = (f"model.name={tiny_model_dir}", "data.max_length=256", "data.max_prompt_length=64",
              "reference.strategy=copy", "train.layout=packed", "--device", "cpu", "--json")
    reports = {}
    for method in ("dpo", "sft", "reward", "ppo"):
        code, out = run(capsys, *common, "--method", method)
        assert code == 0
        reports[method] = json.loads(out)
    tokens = {m: r["lengths"]["tokens"] for m, r in reports.items()}
    assert tokens == {"dpo": 4 * (2 * 64 + 2 * 192), "sft": 4 * (64 + 192), "reward": 4 * (2 * 64 + 2 * 192),
                      "ppo": 4 * (64 + 53)}  # PPO: rollouts of ppo.max_new_tokens (53)
    parts = {m: r["parts_bytes"] for m, r in reports.items()}
    assert parts["dpo"]["reference"] > 0 and parts["ppo"]["reference"] > 0  # a frozen copy
    assert parts["sft"]["reference"] == parts["reward"]["reference"] == 0  # none
    assert parts["reward"]["lm_head"] == 0 < parts["dpo"]["lm_head"]  # a scalar head


def test_an_unknown_hub_id_is_one_line_at_once_as_in_training(capsys):
    import time

    from dpokit.cli import main
    from dpokit.errors import DpokitError

    name = "nobody-here/no-such-model-xyz"
    start = time.monotonic()
    assert main(["estimate", f"model.name={name}"]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - start < 20 and err.count("\n") == 1
    with pytest.raises(DpokitError) as training:
        models.load_tokenizer(name)  # what `dpokit train` asks first
    assert err == f"error: {training.value}\n"
