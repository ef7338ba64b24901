"""The reference copy under bf16 autocast, and reference.name: a reference model other than the policy's start
(a directory, a LoRA adapter, a dpokit run), checked to share the policy's tokenizer; tiny models saved to
temporary directories."""

from __future__ import annotations

import pytest
import torch

from dpokit import models
from dpokit.data.layouts import collate
from dpokit.data.records import Problems, read_preferences
from dpokit.data.tokenize import TokenizeSettings, tokenize_records
from dpokit.errors import ConfigError, ModelError
from dpokit.logps import CompletionLogProbs, logps_table
from dpokit.metrics import read_metrics
from dpokit.reference import FrozenCopy
from dpokit.trainer import train
from tests.helpers import random_pairs, tiny_llama, tiny_model_dir

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, tokenizer) -> str:
    """Another tiny Llama (other weights), with the policy's tokenizer."""
    return tiny_model_dir(tmp_path_factory.mktemp("other-llama"), tokenizer, seed=1)


def summed_logps(model_dir: str, pairs_file, tokenizer) -> torch.Tensor:
    read = read_preferences(str(pairs_file))
    pairs, _ = tokenize_records(read.records, tokenizer, TokenizeSettings(), Problems())
    module = CompletionLogProbs(models.load_model(model_dir)).eval()
    with torch.no_grad():
        return logps_table(module, pairs, pad_id=tokenizer.pad_token_id, batch_pairs=4)


@pytest.mark.parametrize("tied", [True, False])
def test_a_copy_under_bf16_autocast_keeps_its_linear_weights_in_bf16_and_scores_the_same(tied):
    policy = CompletionLogProbs(tiny_llama(vocab_size=100, tie_word_embeddings=tied))
    pairs = random_pairs()
    batch = collate(pairs, range(len(pairs)), "padded", pad_id=0)
    as_loaded, stored_bf16 = FrozenCopy(policy), FrozenCopy(policy, bf16_linears=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = as_loaded.logps(batch, "train"), stored_bf16.logps(batch, "train")
    assert torch.equal(a.chosen, b.chosen) and torch.equal(a.rejected, b.rejected)  # autocast's cast, done once
    lm = stored_bf16.module.model
    assert {m.weight.dtype for m in lm.modules() if isinstance(m, torch.nn.Linear)} == {torch.bfloat16}
    assert lm.model.embed_tokens.weight.dtype == torch.float32  # looked up, not multiplied: as it was
    assert lm.model.norm.weight.dtype == torch.float32
    assert policy.model.lm_head.weight.dtype == torch.float32  # the policy is untouched
    assert (policy.model.lm_head.weight is policy.model.model.embed_tokens.weight) == tied
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert size(stored_bf16.module) < 0.8 * size(as_loaded.module)


def eval_at_step_0(cfg) -> dict:
    rows = read_metrics(train(cfg).run_dir)
    return next(r for r in rows if "eval/loss" in r and r["step"] == 0)


def test_named_reference_scores_the_policy_against_that_model(tiny_config, tiny_model_dir, other_model_dir,
                                                               pairs_file, tokenizer, tmp_path):
    beta = 0.1
    expected = beta * (summed_logps(tiny_model_dir, pairs_file, tokenizer)
                       - summed_logps(other_model_dir, pairs_file, tokenizer)).mean(0)
    for strategy in ("copy", "precomputed"):
        row = eval_at_step_0(tiny_config(f"reference.name={other_model_dir}", f"reference.strategy={strategy}",
                                         f"data.eval={pairs_file}", "train.max_steps=1",
                                         f"output.dir={tmp_path / strategy}"))
        assert row["eval/rewards/chosen"] == pytest.approx(expected[0].item(), abs=1e-4), strategy
        assert row["eval/rewards/rejected"] == pytest.approx(expected[1].item(), abs=1e-4), strategy
        assert row["eval/loss"] != pytest.approx(0.693147, abs=1e-3)  # the policy is not its reference


def test_named_reference_strategies_agree_in_training(tiny_config, other_model_dir, tmp_path):
    runs = {}
    for strategy in ("copy", "precomputed"):
        rows = read_metrics(train(tiny_config(f"reference.name={other_model_dir}", f"reference.strategy={strategy}",
                                              "train.max_steps=3", f"output.dir={tmp_path / strategy}")).run_dir)
        runs[strategy] = [r for r in rows if "loss" in r]
    for a, b in zip(runs["copy"], runs["precomputed"]):
        for key in METRICS:
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)


def test_a_lora_run_names_another_adapter_as_its_reference(tiny_config, tiny_model_dir, pairs_file, tokenizer,
                                                           tmp_path):
    from dpokit.config import LoraSection

    base = models.load_model(tiny_model_dir)
    lora = LoraSection()
    lora.r = 4
    adapted = models.apply_lora(base, lora)
    torch.manual_seed(3)
    with torch.no_grad():  # a trained adapter: its B matrices are not zero
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapter_dir = tmp_path / "adapter"
    adapted.save_pretrained(adapter_dir)
    assert models.resolve(str(adapter_dir)).kind == "adapter"

    row = eval_at_step_0(tiny_config("lora.enabled=true", "lora.r=4", f"reference.name={adapter_dir}",
                                     f"data.eval={pairs_file}", "train.max_steps=1", f"output.dir={tmp_path / 'run'}"))
    expected = 0.1 * (summed_logps(tiny_model_dir, pairs_file, tokenizer)
                      - summed_logps(str(adapter_dir), pairs_file, tokenizer)).mean(0)
    assert row["eval/rewards/chosen"] == pytest.approx(expected[0].item(), abs=1e-4)
    assert abs(expected[0].item()) > 1e-3  # the adapter changes the reference's log-probs


def test_a_dpokit_run_directory_is_a_reference(tiny_config, tiny_model_dir, pairs_file, tokenizer, tmp_path):
    first = train(tiny_config("train.max_steps=2", f"output.dir={tmp_path / 'first'}"))
    row = eval_at_step_0(tiny_config(f"reference.name={first.run_dir}", f"data.eval={pairs_file}",
                                     "train.max_steps=1", f"output.dir={tmp_path / 'second'}"))
    expected = 0.1 * (summed_logps(tiny_model_dir, pairs_file, tokenizer)
                      - summed_logps(str(first.run_dir / "model"), pairs_file, tokenizer)).mean(0)
    assert row["eval/rewards/chosen"] == pytest.approx(expected[0].item(), abs=1e-4)


def test_a_reference_with_another_tokenizer_is_refused(tiny_config, tokenizer, tmp_path):
    other = tmp_path / "other-tokenizer"
    tiny_llama(seed=1).save_pretrained(other)
    changed = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    changed.add_tokens(["<not-in-the-policy>"])
    changed.save_pretrained(other)
    with pytest.raises(ModelError, match=r"reference.name .*: its tokenizer differs from the policy's \(49153 tokens "
                                         r"against 49152; token '<not-in-the-policy>' is absent for the policy and id 49152 for the "
                                         r"reference\)"):
        train(tiny_config(f"reference.name={other}", "train.max_steps=1"))
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start


def test_reference_name_config_checks(tiny_config, other_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="reference.name: not found"):
        tiny_config(f"reference.name={tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="reference-free; reference.name does not apply"):
        tiny_config(f"reference.name={other_model_dir}", "objective.loss=simpo")
    with pytest.raises(ConfigError, match="with reference.name use copy or precomputed"):
        tiny_config(f"reference.name={other_model_dir}", "lora.enabled=true", "reference.strategy=adapters")


def test_a_run_with_a_named_reference_is_evaluated_against_it(tiny_config, other_model_dir, tmp_path):
    from dpokit.rundir import default_reference

    result = train(tiny_config(f"reference.name={other_model_dir}", "train.max_steps=1"))
    assert default_reference(str(result.run_dir)) == other_model_dir
