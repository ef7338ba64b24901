"""The training loop end to end on a tiny model: metrics, export, reference strategies, exact resume."""

import contextlib
import copy
import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from dpokit.data.layouts import collate
from dpokit.errors import ConfigError
from dpokit.logps import CompletionLogProbs
from dpokit.metrics import read_metrics
from dpokit.trainer import Trainer, resolve_precision, train
from tests.helpers import random_pairs, tiny_llama

KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
        "logps/rejected", "step", "epoch", "lr", "grad_norm", "pairs_per_s", "tokens_per_s"}


def weights(model_dir):
    return load_file(os.path.join(model_dir, "model.safetensors"))


def test_run_logs_trl_metric_names_and_exports_a_loadable_model(tiny_config, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("train.max_steps=6", "train.epochs=2", "output.tensorboard=true", "train.eval_every=3",
                      f"data.eval={tmp_path / 'pairs.jsonl'}")
    result = train(cfg)
    rows = read_metrics(result.run_dir)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert set(train_rows[0]) >= KEYS
    assert [r["step"] for r in eval_rows] == [0, 3, 6]
    assert {"eval/" + k for k in KEYS - {"step", "epoch", "lr", "grad_norm", "pairs_per_s", "tokens_per_s"}} <= set(eval_rows[0])
    assert eval_rows[0]["eval/loss"] == pytest.approx(0.693147, abs=1e-5)  # policy = reference at step 0
    assert eval_rows[-1]["eval/rewards/margins"] > eval_rows[0]["eval/rewards/margins"]
    assert eval_rows[-1]["eval/rewards/accuracies"] > 0.5
    assert any(f.name.startswith("events.out.tfevents") for f in (result.run_dir / "tensorboard").iterdir())
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)  # the exported model loads with transformers
    assert model.config._attn_implementation != "dpokit_segments"
    card = (result.model_dir / "README.md").read_text()
    assert "objective `sigmoid`" in card and "eval/rewards/accuracies" in card
    assert (result.model_dir / "tokenizer_config.json").is_file()


def test_a_used_run_directory_is_not_overwritten(tiny_config):
    train(tiny_config("train.max_steps=1"))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny_config("train.max_steps=1"))


def test_huge_pages_asked_for_too_late_are_named_in_a_warning(tiny_config, monkeypatch):
    from dpokit import host_memory

    monkeypatch.setattr(host_memory, "huge_pages", lambda: False)  # as after the process's first tensor
    with pytest.warns(UserWarning, match="train.huge_pages: .* THP_MEM_ALLOC_ENABLE=1"):
        train(tiny_config("train.max_steps=1"))
    monkeypatch.setattr(host_memory, "huge_pages", lambda: pytest.fail("asked with train.huge_pages=false"))
    train(tiny_config("train.max_steps=1", "train.huge_pages=false", "output.overwrite=true"))


def step_metrics(cfg):
    rows = read_metrics(train(cfg).run_dir)
    return [r for r in rows if "loss" in r]


METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_reference_strategies_give_identical_metrics(tiny_config, tmp_path, lora):
    strategies = ["copy", "precomputed"] + (["adapters"] if lora else [])
    extra = ["lora.enabled=true", "lora.r=4", "train.lr=5e-3"] if lora else []
    runs = {s: step_metrics(tiny_config(f"reference.strategy={s}", "train.max_steps=3",
                                        f"output.dir={tmp_path / s}", *extra)) for s in strategies}
    first = runs[strategies[0]]
    assert first[0]["loss"] == pytest.approx(0.693147, abs=1e-6)  # step 0: policy = reference
    assert abs(first[-1]["rewards/margins"]) > 1e-3  # later steps compare non-trivial rewards
    for s in strategies[1:]:
        for a, b in zip(first, runs[s]):
            for key in METRICS:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (s, a["step"], key)


def test_precomputed_reference_is_cached_and_reused(tiny_config, tmp_path, capsys):
    train(tiny_config("reference.strategy=precomputed", "train.max_steps=1", f"output.dir={tmp_path / 'a'}"))
    cached = list((tmp_path / "refcache").glob("*.safetensors"))
    assert len(cached) == 1
    capsys.readouterr()
    train(tiny_config("reference.strategy=precomputed", "train.max_steps=1", f"output.dir={tmp_path / 'b'}"))
    assert "read from" in capsys.readouterr().out
    # another tokenization setting is another key
    train(tiny_config("reference.strategy=precomputed", "train.max_steps=1", f"output.dir={tmp_path / 'c'}",
                      "data.max_length=16", "data.max_prompt_length=8"))
    assert len(list((tmp_path / "refcache").glob("*.safetensors"))) == 2


def test_simpo_runs_without_reference(tiny_config):
    rows = step_metrics(tiny_config("objective.loss=simpo", "objective.beta=2.0", "train.max_steps=2"))
    assert rows[0]["rewards/chosen"] < 0  # β·mean log-prob, not a log-ratio


@pytest.mark.parametrize("interrupt", ["signal", "crash"])
def test_interrupted_run_resumes_to_the_same_weights(tiny_config, tmp_path, monkeypatch, interrupt):
    common = ("train.max_steps=5", "train.epochs=2", "checkpoint.every=2", "train.schedule=cosine", "train.warmup_steps=2")
    straight = train(tiny_config(*common, f"output.dir={tmp_path / 'straight'}"))

    cfg = tiny_config(*common, f"output.dir={tmp_path / 'interrupted'}")
    real_step = Trainer.train_step

    def step_then_interrupt(self, ids):
        if self.step == 3:  # checkpoint 2 written, step 3 done but not checkpointed
            if interrupt == "signal":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise RuntimeError("simulated crash")
        return real_step(self, ids)

    monkeypatch.setattr(Trainer, "train_step", step_then_interrupt)
    if interrupt == "signal":
        stopped = train(cfg)
        assert stopped.stopped_by_signal and stopped.steps == 4 and stopped.model_dir is None
    else:
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(cfg)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    resumed = train(cfg, resume=True)
    assert resumed.steps == 5
    a, b = weights(straight.model_dir), weights(resumed.model_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [r["step"] for r in read_metrics(resumed.run_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5]  # no step logged twice
    losses_a = [r["loss"] for r in read_metrics(straight.run_dir) if "loss" in r]
    losses_b = [r["loss"] for r in read_metrics(resumed.run_dir) if "loss" in r]
    assert losses_a == pytest.approx(losses_b, abs=0)


def test_a_resumed_lora_run_keeps_the_start_model_as_its_copied_reference(tiny_config, tmp_path, monkeypatch):
    # with LoRA the start is the policy itself; resumed, it holds trained adapters, which π_ref must not
    common = ("lora.enabled=true", "lora.r=4", "train.lr=5e-3", "reference.strategy=copy", "train.max_steps=4",
              "checkpoint.every=2")
    straight = read_metrics(train(tiny_config(*common, f"output.dir={tmp_path / 'straight'}")).run_dir)
    cfg = tiny_config(*common, f"output.dir={tmp_path / 'interrupted'}")
    real_step = Trainer.train_step

    def step_then_stop(self, ids):
        if self.step == 2:  # checkpoint 2 written: the resumed run starts from trained adapters
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, ids)

    monkeypatch.setattr(Trainer, "train_step", step_then_stop)
    assert train(cfg).stopped_by_signal
    monkeypatch.setattr(Trainer, "train_step", real_step)
    resumed = read_metrics(train(cfg, resume=True).run_dir)
    a, b = ([r for r in rows if "loss" in r] for rows in (straight, resumed))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert abs(a[-1]["rewards/margins"]) > 1e-3  # the adapters moved the policy away from its start
    for x, y in zip(a, b):
        for key in METRICS:
            assert y[key] == pytest.approx(x[key], abs=1e-5), (x["step"], key)


def test_a_signal_during_the_final_evaluation_keeps_the_steps_and_resume_exports(tiny_config, pairs_file,
                                                                                  monkeypatch):
    from dpokit.rundir import RunDir

    cfg = tiny_config("train.max_steps=3", "checkpoint.every=0", f"data.eval={pairs_file}")
    real_evaluate = Trainer.evaluate

    def evaluate_then_signal(self):
        out = real_evaluate(self)
        if self.step == self.total_steps:  # the final evaluation: the run's handler, not the default, gets it
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "evaluate", evaluate_then_signal)
    stopped = train(cfg)
    assert stopped.stopped_by_signal and stopped.steps == 3 and stopped.model_dir is None
    monkeypatch.setattr(Trainer, "evaluate", real_evaluate)
    resumed = train(cfg, resume=True)  # from the checkpoint written at the stop (checkpoint.every=0 writes none)
    assert resumed.steps == 3 and resumed.model_dir is not None
    assert RunDir(resumed.run_dir).finished_step() == 3  # the export records its step, though no step ran
    rows = read_metrics(resumed.run_dir)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in rows if "eval/loss" in r] == [0, 3]  # the interrupted evaluation is not logged
    assert train(cfg, resume=True).already_finished


def test_resume_refuses_a_changed_config(tiny_config, tmp_path):
    train(tiny_config("checkpoint.every=1", "train.max_steps=1"))
    with pytest.raises(ConfigError, match="objective.beta changed"):
        train(tiny_config("checkpoint.every=1", "train.max_steps=1", "objective.beta=0.5"), resume=True)


def test_lora_run_exports_adapter_or_merged_model(tiny_config, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter = train(tiny_config("lora.enabled=true", "lora.r=4", "train.max_steps=1", f"output.dir={tmp_path / 'a'}"))
    assert json.loads((adapter.model_dir / "adapter_config.json").read_text())["r"] == 4
    merged = train(tiny_config("lora.enabled=true", "lora.r=4", "lora.merge_on_export=true", "train.max_steps=1",
                               f"output.dir={tmp_path / 'm'}"))
    assert not (merged.model_dir / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(merged.model_dir)


@pytest.mark.parametrize("overrides", [
    ("train.precision=bf16-mixed",),
    ("train.precision=bf16",),
    ("reference.dtype=bfloat16", "train.optimizer=rmsprop"),
], ids=["bf16-mixed", "bf16-weights", "bf16-reference-rmsprop"])
def test_precisions_and_optimizers_train(tiny_config, tmp_path, overrides):
    rows = step_metrics(tiny_config(*overrides, "train.max_steps=3", "train.lr=1e-2"))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert rows[-1]["rewards/margins"] != 0.0
    saved = weights(tmp_path / "run" / "model")
    expected = torch.bfloat16 if "train.precision=bf16" in overrides else torch.float32
    assert next(iter(saved.values())).dtype == expected


def test_micro_batches_in_one_autocast_region_reuse_its_weight_casts_with_the_same_gradients():
    """What the trainer's update relies on: autocast caches a trainable weight's bf16 cast for the region, and
    the gradients of micro-batches that share the cast are those of a region each (untied weights; a tied
    embedding sums its two gradients in another order, within fp32 rounding)."""
    start = CompletionLogProbs(tiny_llama(vocab_size=100, tie_word_embeddings=False))
    pairs = random_pairs(4)
    micro_batches = [collate(pairs[i:i + 2], range(i, i + 2), "padded", pad_id=0) for i in (0, 2)]

    def gradients(shared: bool) -> list[torch.Tensor]:
        policy = copy.deepcopy(start).train()
        autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
        with autocast() if shared else contextlib.nullcontext():
            for batch in micro_batches:
                with contextlib.nullcontext() if shared else autocast():
                    out = policy(batch)
                    (out.chosen - out.rejected).sum().backward()
        return [p.grad for p in policy.parameters()]

    each, shared = gradients(False), gradients(True)
    assert all(g is not None and torch.equal(a, g) for a, g in zip(each, shared))
    assert sum(g.abs().sum().item() for g in shared) > 0


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(True, False, "bf16-mixed"), (False, True, "bf16-mixed"),
                                                         (False, False, "fp32")])
def test_auto_precision_is_bf16_autocast_only_on_cpus_with_fast_bf16_matmul(monkeypatch, amx, avx512_bf16,
                                                                             expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"  # a pinned precision is kept
