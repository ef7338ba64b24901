"""The Bradley–Terry reward model on the shared loop: its loss, where each reward is read in every layout,
training, export as a sequence-classification model the reward-model judge loads, exact resume, the CLI."""

import math

import pytest
import torch

from dpokit import models
from dpokit.cli import main
from dpokit.data.layouts import LAYOUTS, collate, last_non_pad_index
from dpokit.data.tokenize import TokenizedPair
from dpokit.distributed import Runtime
from dpokit.errors import ConfigError, DataError
from dpokit.methods.reward import RewardModel, ScalarRewards
from dpokit.metrics import read_metrics
from dpokit.objectives.losses import bradley_terry
from dpokit.trainer import train
from tests.helpers import PAIRS, resume_matches_uninterrupted, write_jsonl

# ------------------------------------------------------------------------------------------- the loss


def test_bradley_terry_matches_hand_computed_values():
    rc, rr = torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 1.0, -2.0])
    # -log σ(h) = log(1 + e^-h)
    plain = [math.log1p(math.exp(-1)), math.log1p(math.exp(1)), math.log(2)]
    assert bradley_terry(rc, rr).tolist() == pytest.approx(plain, abs=1e-6)
    margin = torch.tensor([0.5, 0.0, 1.0])  # h - m = 0.5, -1, -1
    with_margin = [math.log1p(math.exp(-0.5)), math.log1p(math.exp(1)), math.log1p(math.exp(1))]
    assert bradley_terry(rc, rr, margin).tolist() == pytest.approx(with_margin, abs=1e-6)
    # + c (r_w + r_l)²: sums 1, 1, -4
    centred = [v + 0.01 * s ** 2 for v, s in zip(with_margin, (1, 1, -4))]
    assert bradley_terry(rc, rr, margin, center_coefficient=0.01).tolist() == pytest.approx(centred, abs=1e-6)


def test_bradley_terry_gradient():
    rc = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64, requires_grad=True)
    rr = torch.tensor([0.1, 0.4, -0.5], dtype=torch.float64, requires_grad=True)
    m = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    c = 0.05
    assert torch.autograd.gradcheck(lambda a, b: bradley_terry(a, b, m, center_coefficient=c), (rc, rr))
    bradley_terry(rc, rr, m, center_coefficient=c).sum().backward()
    # d/dr_w = -σ(-(h - m)) + 2c(r_w + r_l), d/dr_l = σ(-(h - m)) + 2c(r_w + r_l)
    s = torch.sigmoid(-(rc - rr - m)).detach()
    centre = 2 * c * (rc + rr).detach()
    assert torch.allclose(rc.grad, -s + centre) and torch.allclose(rr.grad, s + centre)


# ------------------------------------------------------------------------------ where the reward is read


def _pairs() -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return tuple(torch.randint(3, 250, (n,), generator=g).tolist())

    eos = 2
    return [
        TokenizedPair(ids(5), ids(3) + (eos,), ids(4) + (eos,), "t:1"),
        TokenizedPair(ids(2), ids(1) + (eos,), (eos,), "t:2"),  # rejected: EOS alone
        TokenizedPair(ids(7), (9,), ids(6) + (eos,), "t:3"),  # chosen: one token, not EOS
        TokenizedPair(ids(3) + (eos,), ids(2) + (eos,), (7,), "t:4"),  # prompt ends in EOS; rejected one token
    ]


def _scorer(pad_id: int):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, num_labels=1,
                      bos_token_id=1, eos_token_id=2, pad_token_id=pad_id)
    return LlamaForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pad_id", [2, 0], ids=["pad-is-eos", "pad-not-eos"])
def test_reward_is_read_where_transformers_pools_in_every_layout(layout, pad_id):
    """Each sequence's reward equals a plain forward of transformers' own sequence-classification model on
    the sequence alone (its pooling: the last token that is not padding)."""
    from dpokit import models

    pairs = _pairs()
    plain = _scorer(pad_id)
    model = _scorer(pad_id)
    models.use_layout(model, layout)
    batch = collate(pairs, range(len(pairs)), layout, pad_id)
    with torch.no_grad():
        got = ScalarRewards(model)(batch, last_non_pad_index(batch, pairs, pad_id))
        sequences = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
        expected = [plain(input_ids=torch.tensor([s])).logits[0, 0].item() for s in sequences]
    assert got.tolist() == pytest.approx(expected, abs=1e-5)


def test_last_index_is_each_sequences_last_token():
    pairs = _pairs()
    for layout in LAYOUTS:
        batch = collate(pairs, range(len(pairs)), layout, 0)
        flat = batch.input_ids.flatten()
        for s, p in enumerate(pairs + pairs):
            completion = p.chosen if s < len(pairs) else p.rejected
            assert flat[batch.last_index[s]].item() == completion[-1], (layout, s)


# ------------------------------------------------------------------------------------ the method


def test_margins_come_from_the_rows_and_enter_the_loss(tiny_config, tmp_path):
    from dpokit import models

    rows = [{"prompt": p, "chosen": c, "rejected": r, "margin": i / 4} for i, (p, c, r) in enumerate(PAIRS)]
    data = write_jsonl(tmp_path / "margins.jsonl", rows)
    cfg = tiny_config(f"data.train={data}", "train.layout=padded", "reward.center_coefficient=0.1")
    method = RewardModel(cfg, Runtime(), models.load_tokenizer(cfg.model.name))
    assert method.margins["train"].tolist() == [i / 4 for i in range(len(PAIRS))]
    policy = method.build(precision="fp32", autocast=None, resume_from=None, echo=print)
    with torch.no_grad():
        micro = method.forward(policy, [3, 5], "train")
        pairs = [method.train_set[3], method.train_set[5]]
        batch = collate(pairs, [3, 5], "padded", method.tokenizer.pad_token_id)
        r = policy(batch, last_non_pad_index(batch, pairs, method.tokenizer.pad_token_id))
    expected = bradley_terry(r[:2], r[2:], torch.tensor([0.75, 1.25]), center_coefficient=0.1)
    assert torch.allclose(micro.losses, expected)
    assert micro.sums["rewards/accuracies"].item() == float((r[:2] > r[2:]).sum())

    write_jsonl(data, rows[:3] + [{k: v for k, v in rows[3].items() if k != "margin"}])
    with pytest.raises(DataError, match=r"margins.jsonl:4: no 'margin' field"):
        RewardModel(cfg, Runtime(), method.tokenizer)
    assert RewardModel(tiny_config(f"data.train={data}", "reward.margin_field=null"), Runtime(),
                       method.tokenizer).margins is None


def test_reward_model_refuses_qlora_and_single_completions(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="QLoRA"):
        train(tiny_config("lora.enabled=true", "model.quantization=nf4"), method=RewardModel)
    with pytest.raises(ConfigError, match="preference pairs"):
        train(tiny_config("data.use=chosen"), method=RewardModel)


def test_training_raises_held_out_accuracy_and_exports_a_judge(tiny_config, pairs_file):
    """A tiny model learns the tiny pairs; the exported directory is a transformers sequence-classification
    model, and the reward-model judge scores each pair exactly as training did."""
    from transformers import AutoModelForSequenceClassification

    from dpokit.generation.judges import build_judge

    cfg = tiny_config(f"data.eval={pairs_file}", "train.max_steps=8", "train.epochs=10", "train.layout=prefix_shared")
    result = train(cfg, method=RewardModel)
    before, after = result.eval_before, result.eval_after
    assert after["rewards/accuracies"] >= 0.875 and after["rewards/accuracies"] > 0.5
    assert after["loss"] < before["loss"] - 0.1 and after["rewards/margins"] > before["rewards/margins"]
    rows = [r for r in read_metrics(result.run_dir) if "loss" in r and "step" in r]
    assert [r["step"] for r in rows if "rewards/accuracies" in r and "pairs_per_s" in r] == list(range(1, 9))

    loaded = AutoModelForSequenceClassification.from_pretrained(result.model_dir)
    assert loaded.config.num_labels == 1 and loaded.config.pad_token_id is not None
    card = (result.model_dir / "README.md").read_text()
    assert "Bradley–Terry reward model" in card and "reward-model" in card

    judge = build_judge("reward-model", model=str(result.model_dir))
    prompts = [[{"role": "user", "content": p}] for p, _, _ in PAIRS]
    chosen = judge.score(prompts, [c for _, c, _ in PAIRS])
    rejected = judge.score(prompts, [r for _, _, r in PAIRS])
    assert sum(c > r for c, r in zip(chosen, rejected)) >= 7
    # the judge reads the reward where training did: the held-out means agree
    n = len(PAIRS)
    assert sum(chosen) / n == pytest.approx(after["rewards/chosen"], abs=1e-4)
    assert sum(rejected) / n == pytest.approx(after["rewards/rejected"], abs=1e-4)


def test_reward_model_resumes_exactly(tiny_config):
    """A run killed after its step-2 checkpoint resumes to the weights of the uninterrupted run."""
    cfg = tiny_config("train.max_steps=4", "checkpoint.every=2", "train.layout=packed")
    _, weights = resume_matches_uninterrupted(cfg, RewardModel)
    assert "score.weight" in weights


def test_lora_reward_model_trains_adapters_and_head_resumes_and_exports_merged(tiny_config, pairs_file):
    """LoRA on the trunk, the head trained whole; a run killed after its step-2 checkpoint (adapters and
    head) resumes to the uninterrupted run's weights; the export is a full model that scores as training did."""
    from transformers import AutoModelForSequenceClassification

    from dpokit import checkpoint
    from dpokit.generation.judges import build_judge

    cfg = tiny_config(f"data.eval={pairs_file}", "lora.enabled=true", "lora.r=4", "train.lr=5e-3",
                      "train.max_steps=4", "checkpoint.every=2", "train.layout=prefix_shared")
    method = RewardModel(cfg, Runtime(), models.load_tokenizer(cfg.model.name))
    module = method.build(precision="fp32", autocast=None, resume_from=None, echo=print)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".score." in n for n in trainable)
    assert any(".score." in n for n in trainable)  # the new head is trained, not only adapters

    straight, expected = resume_matches_uninterrupted(cfg, RewardModel)
    assert (checkpoint.checkpoints(straight.run_dir)[0] / "model" / "adapter_config.json").is_file()
    # merged: full weights, no adapter
    assert "score.weight" in expected and not any("lora" in k for k in expected)
    after = straight.eval_after
    judge = build_judge("reward-model", model=str(straight.model_dir))
    prompts = [[{"role": "user", "content": p}] for p, _, _ in PAIRS]
    n = len(PAIRS)
    assert sum(judge.score(prompts, [c for _, c, _ in PAIRS])) / n == pytest.approx(after["rewards/chosen"], abs=1e-4)
    assert sum(judge.score(prompts, [r for _, _, r in PAIRS])) / n == pytest.approx(after["rewards/rejected"], abs=1e-4)
    assert AutoModelForSequenceClassification.from_pretrained(straight.model_dir).config.num_labels == 1


def test_dpokit_reward_command(tiny_config, pairs_file, tmp_path, capsys):
    import yaml

    with pytest.raises(SystemExit) as exit_info:
        main(["reward", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "Bradley–Terry" in help_text and "center_coefficient" in help_text and "margin_field" in help_text

    cfg = tiny_config(f"data.eval={pairs_file}", "train.max_steps=2")
    path = tmp_path / "reward.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["reward", str(path)]) == 0
    out = capsys.readouterr().out
    assert "held-out pairs (16)" in out and "rewards/accuracies" in out
    assert main(["train", str(path), "--resume"]) == 2  # a reward run continues as one
