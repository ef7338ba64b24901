"""SFT on the shared loop: completion-token NLL, every layout alike, from completion rows or the chosen side."""

import json

import pytest
import torch

from dpokit.cli import main
from dpokit.data.records import PreferenceRecord, Problems
from dpokit.data.tokenize import TokenizeSettings, tokenize_records
from dpokit.distributed import Runtime
from dpokit.methods.sft import SFT
from dpokit.metrics import read_metrics
from dpokit.trainer import train
from tests.helpers import PAIRS, resume_matches_uninterrupted, write_jsonl


def test_a_single_completion_is_tokenized_with_eos_and_no_rejected_side(tokenizer):
    records = [PreferenceRecord("Say hi.", " Hi!", "", "t:1"),
               PreferenceRecord([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Hello."}],
                                [], "t:2")]
    pairs, _ = tokenize_records(records, tokenizer, TokenizeSettings(), Problems())
    for p in pairs:
        assert p.rejected == () and p.chosen[-1] == tokenizer.eos_token_id
        assert p.num_tokens == len(p.prompt) + len(p.chosen)
    assert tokenizer.decode(pairs[0].chosen[:-1]) == " Hi!"


@pytest.fixture
def completions_file(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}]}
            for p, c, _ in PAIRS]
    return write_jsonl(tmp_path / "sft.jsonl", rows * 2)


def test_sft_loss_is_the_token_mean_nll_of_each_completion(tiny_config, completions_file, tiny_model_dir):
    """Step 0 of the method against a plain forward pass of the model on each prompt + completion."""
    from transformers import AutoModelForCausalLM

    from dpokit import models

    cfg = tiny_config(f"data.train={completions_file}", "train.layout=packed")
    tokenizer = models.load_tokenizer(tiny_model_dir)
    method = SFT(cfg, Runtime(), tokenizer)
    policy = method.build(precision="fp32", autocast=None, resume_from=None, echo=print)
    with torch.no_grad():
        micro = method.forward(policy, [0, 1, 2], "train")
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for k in range(3):
        row = method.train_set[k]
        ids = torch.tensor([row.prompt + row.chosen])
        with torch.no_grad():
            logp = plain(input_ids=ids).logits[0].log_softmax(-1)
        token_logps = [logp[len(row.prompt) + j - 1, t].item() for j, t in enumerate(row.chosen)]
        assert micro.losses[k].item() == pytest.approx(-sum(token_logps) / len(token_logps), abs=1e-4)


@pytest.mark.parametrize("use", ["completion", "chosen"])
def test_sft_runs_on_the_shared_loop_and_lowers_held_out_nll(tiny_config, completions_file, pairs_file, use):
    data = completions_file if use == "completion" else pairs_file
    cfg = tiny_config(f"data.train={data}", f"data.eval={data}", f"data.use={use}", "train.max_steps=8",
                      "train.epochs=4", "train.lr=3e-3", "train.layout=packed")
    result = train(cfg, method=SFT)
    assert result.eval_after["loss"] < result.eval_before["loss"] - 0.1
    assert result.eval_after["sequences"] == 16
    rows = [r for r in read_metrics(result.run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9)) and "sequences_per_s" in rows[0]
    assert (result.model_dir / "model.safetensors").is_file()


def test_sft_refuses_preference_pairs_as_they_are(tiny_config, pairs_file):
    from dpokit.errors import ConfigError

    with pytest.raises(ConfigError, match="data.use=completion .* or data.use=chosen"):
        train(tiny_config("data.use=pairs"), method=SFT)


def test_sft_resumes_exactly(tiny_config, completions_file):
    """A run killed after its step-2 checkpoint resumes to the weights of the uninterrupted run."""
    cfg = tiny_config(f"data.train={completions_file}", "train.max_steps=4", "checkpoint.every=2")
    resume_matches_uninterrupted(cfg, "sft")


def test_dpokit_sft_command(tiny_config, completions_file, tmp_path, capsys):
    cfg = tiny_config(f"data.train={completions_file}", f"data.eval={completions_file}", "train.max_steps=2")
    path = tmp_path / "sft.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["sft", str(path)]) == 0
    out = capsys.readouterr().out
    assert "held-out sequences (16)" in out and "supervised fine-tuning" in out
    card = json.loads((tmp_path / "run" / "model" / "dpokit_metrics.json").read_text())
    assert card["step"] == 2
