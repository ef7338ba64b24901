"""Config errors are caught before anything loads, each as one exact line; the CLI exits 2 without a traceback.
(Reading files and overrides: test_config_loader.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from dpokit.config import F_DIVERGENCE
from dpokit.config_loader import load_config
from dpokit.objectives.registry import OBJECTIVES
from tests.helpers import config_error as error_of

OVERRIDE_ERRORS = [
    # unknown keys, with the key meant where one is close
    (["train.lrr=1"], "override: unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    (["trian.lr=1"], "override: unknown key 'trian.lr' (did you mean 'train.lr'?)"),
    (["train.batchsize=4"], "override: unknown key 'train.batchsize' (did you mean 'train.batch_size'?)"),
    (["train.beta=0.1"], "override: unknown key 'train.beta' (did you mean 'objective.beta'?)"),
    (["train.learning_rate=1e-5"], "override: unknown key 'train.learning_rate' (did you mean 'train.lr'?)"),
    (["lr=1e-5"], "override: unknown key 'lr' (did you mean 'train.lr'?)"),
    (["foo.bar=1"], "override: unknown key 'foo.bar'"),
    (["train.lr"], "override 'train.lr' must look like section.key=value"),
    # wrong types
    (["train.batch_size=eight"], "override: train.batch_size must be an integer, got string 'eight'"),
    (["train.batch_size=2.5"], "override: train.batch_size must be an integer, got number 2.5"),
    (["train.epochs=true"], "override: train.epochs must be an integer, got boolean True"),
    (["train.lr=fast"], "override: train.lr must be a number, got string 'fast'"),
    (["train.compile=maybe"], "override: train.compile must be true or false, got string 'maybe'"),
    (["train.adam_betas={a: 1}"], "override: train.adam_betas must be a list, got mapping {'a': 1}"),
    (["lora.target_modules=[1, 2]"], "override: lora.target_modules must be a string, got integer 1"),
    # non-finite numbers pass every range check, so they are refused by type
    (["train.lr=nan"], "override: train.lr must be a finite number, got 'nan'"),
    (["objective.beta=.nan"], "override: objective.beta must be a finite number, got nan"),
    (["train.max_grad_norm=.inf"], "override: train.max_grad_norm must be a finite number, got inf"),
    # out of range, β <= 0 included
    (["objective.beta=0"], "objective.beta must be > 0; got 0"),
    (["objective.beta=-0.1"], "objective.beta must be > 0; got -0.1"),
    (["train.lr=0"], "train.lr must be > 0; got 0"),
    (["train.batch_size=0"], "train.batch_size must be >= 1; got 0"),
    (["train.max_grad_norm=-1"], "train.max_grad_norm must be >= 0; got -1"),
    (["data.eval_fraction=0.9"], "data.eval_fraction must be <= 0.5; got 0.9"),
    (["objective.label_smoothing=0.5"], "objective.label_smoothing must be <= 0.4999; got 0.5"),
    (["lora.enabled=true", "lora.r=0"], "lora.r must be >= 1; got 0"),
    (["train.adam_betas=[0.9, 1.5]"], "train.adam_betas must be two numbers in [0, 1), got [0.9, 1.5]"),
    # choices
    (["train.optimizer=sgd"], "train.optimizer must be one of adamw, adamw8bit, adamw4bit, rmsprop; got 'sgd'"),
    (["train.precision=bf16_mixed"],
     "train.precision must be one of auto, fp32, bf16-mixed, bf16; got 'bf16_mixed' (did you mean 'bf16-mixed'?)"),
    (["reference.dtype=fp8"], "reference.dtype must be one of float32, bfloat16, float16; got 'fp8'"),
    # a LoRA option without LoRA
    (["lora.r=8"], "lora.r is set but LoRA is off: add lora.enabled=true or remove it"),
    (["lora.target_modules=q_proj"], "lora.target_modules is set but LoRA is off: add lora.enabled=true or remove it"),
    (["reference.strategy=adapters"], "reference.strategy=adapters needs LoRA (lora.enabled=true)"),
    # settings that contradict each other
    (["data.max_prompt_length=1024"], "data.max_prompt_length (1024) must be less than data.max_length (1024) to "
                                      "leave room for the completion"),
    (["train.batch_size=6"], "train.batch_size (6) must be a multiple of train.micro_batch_size (4)"),
    (["data.eval=pairs.jsonl", "data.eval_fraction=0.1"], "data.eval and data.eval_fraction are both set; use one"),
    (["objective.loss=ipo", "objective.label_smoothing=0.1"],
     "objective.label_smoothing applies to sigmoid, robust, exo_pair, aot, aot_unpaired, not ipo"),
    (["objective.loss=simpo", "reference.strategy=copy"],
     "objective.loss=simpo is reference-free; reference.strategy=copy does not apply"),
    (["reference.strategy=none"],
     "objective.loss=sigmoid needs a reference model; reference.strategy=none only fits simpo, unlikelihood or "
     "orpo"),
    # objectives and their options
    (["objective.loss=[sigmoid, nope]"], "objective.loss must be one of " + ", ".join(OBJECTIVES) + "; got 'nope' (did you mean 'orpo'?)"),
    (["objective.loss=[sigmoid, bco_pair]", "objective.loss_weights=[1]"],
     "objective.loss_weights has 1 weights for 2 objectives"),
    (["objective.loss=[sigmoid, sigmoid]"], "objective.loss must name each objective once; got ['sigmoid', 'sigmoid']"),
    (["objective.loss=exo_pair"], "objective.loss=exo_pair needs objective.label_smoothing > 0 (EXO's ε; the paper: 1e-3)"),
    (["objective.loss=nca_pair", "objective.f_divergence=js"],
     "objective.f_divergence=js applies to " + ", ".join(F_DIVERGENCE) + "; not to nca_pair"),
    (["objective.loss=[kto, sigmoid]"],
     "objective.loss=kto trains on single completions; it cannot be summed with pair objectives"),
    (["objective.loss=aot", "objective.wpo=true"], "objective.wpo weights pairs, which aot and aot_unpaired sort apart"),
    (["objective.ld_alpha=1.5"], "objective.ld_alpha must be <= 1; got 1.5"),
    (["reference.sync_every=4", "reference.strategy=precomputed"],
     "reference.sync_every (TR-DPO) moves the reference, which reference.strategy=precomputed keeps fixed; use auto or "
     "copy"),
    (["objective.loss=orpo", "reference.sync_every=4"],
     "reference.sync_every (TR-DPO) moves the reference; objective.loss=orpo has none"),
    (["reference.sync_every=4", "distributed.strategy=fsdp"],
     "reference.sync_every (TR-DPO) is not implemented for sharded weights; use distributed.strategy=ddp"),
    (["reference.sync_every=4", "reference.name=./other-model"],
     "reference.sync_every (TR-DPO) moves the policy's starting weights toward it; it does not take a reference.name"),
    (["objective.ld_alpha=0.5", "objective.nll_weight=1"],
     "objective.ld_alpha (LD-DPO) weighs the log-ratios of DPO's family; objective.nll_weight reads plain token "
     "means, which it would reweigh: drop one of them"),
    (["objective.loss=simpo", "reference.strategy=none", "objective.ld_alpha=0.5"],
     "objective.ld_alpha (LD-DPO) weighs the log-ratios of DPO's family; objective.loss=simpo reads plain token "
     "means, which it would reweigh: drop one of them"),
    (["objective.loss=kto", "objective.loss_weights=[2]"],
     "objective.loss=kto takes no ld_alpha, wpo, nll_weight or loss_weights (they are defined on pairs); "
     "kto_desirable_weight and kto_undesirable_weight weigh its completions"),
    # missing files and values
    (["data.train=missing.jsonl"], "data.train: file not found: missing.jsonl"),
    (["data.eval=./held_out.jsonl"], "data.eval: file not found: ./held_out.jsonl"),
    (["data.train=null"], "data.train is required: a preference file, datasets directory or hub dataset name"),
    (["model.name=./nowhere"], "model.name: not found: ./nowhere"),
    (["model.name=weights.gguf"], "model.name: not found: weights.gguf"),
    # never code
    (["model.name=!!python/object/apply:os.system [touch pwned]"],
     "override: model.name: the YAML tag '!!python/object/apply:os.system' is not allowed "
     "(config values are plain data, never code)"),
]


@pytest.mark.parametrize("overrides, message", OVERRIDE_ERRORS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_override_errors(data_file, overrides, message):
    assert error_of(*overrides) == message


# ------------------------------------------------------------------------------------------- through the CLI


@pytest.fixture
def no_model_loads(monkeypatch):
    from dpokit import models

    def fail(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the config was checked")

    for name in ("load_model", "load_tokenizer", "model_dir", "converted_gguf"):
        monkeypatch.setattr(models, name, fail)


CLI_CASES = [
    (["train.lrr=1"], "error: override: unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    (["train.batch_size=eight"], "error: override: train.batch_size must be an integer, got string 'eight'"),
    (["data.eval_fraction=0.9"], "error: data.eval_fraction must be <= 0.5; got 0.9"),
    (["objective.beta=0"], "error: objective.beta must be > 0; got 0"),
    (["lora.r=8"], "error: lora.r is set but LoRA is off: add lora.enabled=true or remove it"),
    (["data.train=missing.jsonl"], "error: data.train: file not found: missing.jsonl"),
]


@pytest.mark.parametrize("overrides, line", CLI_CASES, ids=[c[0][0] for c in CLI_CASES])
def test_cli_exits_2_with_one_line(data_file, no_model_loads, capsys, overrides, line):
    from dpokit.cli import main

    Path("cfg.yaml").write_text("data:\n  train: pairs.jsonl\ntrain:\n  max_steps: 1\n", encoding="utf-8")
    assert main(["train", "cfg.yaml", *overrides]) == 2
    out, err = capsys.readouterr()
    assert err == line + "\n" and out == ""
    assert "Traceback" not in err


def test_cli_config_file_errors(data_file, no_model_loads, capsys):
    from dpokit.cli import main

    assert main(["train", "missing.yaml"]) == 2
    assert capsys.readouterr().err == "error: config file not found: missing.yaml\n"
    Path("bad.yaml").write_text("objective:\n  beta: -1\n", encoding="utf-8")
    assert main(["train", "bad.yaml", "data.train=pairs.jsonl"]) == 2
    assert capsys.readouterr().err == "error: objective.beta must be > 0; got -1\n"
    # overrides alone, no file
    assert main(["train", "data.train=pairs.jsonl", "objective.beta=-1"]) == 2
    assert capsys.readouterr().err == "error: objective.beta must be > 0; got -1\n"
    assert main(["train"]) == 2
    assert capsys.readouterr().err == ("error: data.train is required: a preference file, datasets directory or hub "
                                       "dataset name\n")


def test_the_quickstart_config_pins_the_precision_the_docs_measured():
    """precision=auto is bf16 autocast on CPUs with AMX or AVX512-BF16: the quickstart's figures hold on any CPU in fp32."""
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/quickstart.yaml", [f"data.train={root / 'data/quickstart/train.jsonl'}",
                                                         f"data.eval={root / 'data/quickstart/eval.jsonl'}"])
    assert cfg.train.precision == "fp32"
