"""The DPO family on the shared loop: KTO on unpaired rows and on pairs (with TRL's KTOTrainer at step 0),
per-pair weights, several objectives from the CLI, and TR-DPO's reference that follows the policy."""

import json
import subprocess
import sys

import pytest
import torch

from dpokit import reference
from dpokit.config_loader import load_config
from dpokit.distributed import Runtime
from dpokit.logps import CompletionLogProbs
from dpokit.methods.dpo import DPO
from dpokit.metrics import MeanMetrics, read_metrics
from dpokit.trainer import Trainer, train
from tests.helpers import PAIRS, crash_then_resume, tiny_llama, write_jsonl


def train_rows(cfg):
    return [r for r in read_metrics(train(cfg).run_dir) if "loss" in r]


@pytest.fixture
def kto_file(tmp_path):
    rows = [{"prompt": p, "completion": " " + c, "label": True} for p, c, _ in PAIRS]
    rows += [{"prompt": p, "completion": " " + r, "label": False} for p, _, r in PAIRS[:5]]
    return write_jsonl(tmp_path / "kto.jsonl", rows)


def test_kto_trains_on_unpaired_rows(tiny_config, kto_file, tmp_path):
    result = train(tiny_config(f"data.train={kto_file}", f"data.eval={kto_file}", "objective.loss=kto",
                               "train.max_steps=6", "train.epochs=2", "objective.kto_undesirable_weight=1.6"))
    first = [r for r in read_metrics(result.run_dir) if "loss" in r][0]
    assert {"loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "desirable", "completions",
            "completions_per_s"} <= set(first)
    # step 0: π = π_ref, so r = z₀ = 0 and each completion costs λ (1 - σ(0)) = λ/2
    d = first["desirable"]
    assert first["loss"] == pytest.approx(0.5 * d + 0.8 * (1 - d), abs=1e-6)
    assert first["kl"] == 0.0 and first["completions"] == 4
    before, after = result.eval_before, result.eval_after
    assert before["rewards/chosen"] == before["rewards/rejected"] == 0.0
    assert after["rewards/chosen"] > 0 > after["rewards/rejected"]  # desirable up, undesirable down
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["train_pairs"] == 13  # the completions, each with its mismatched one


def test_kto_from_pairs_same_with_every_reference_strategy(tiny_config, tmp_path):
    runs = {s: train_rows(tiny_config("objective.loss=kto", "train.max_steps=3", f"reference.strategy={s}",
                                      f"output.dir={tmp_path / s}")) for s in ("copy", "precomputed")}
    assert runs["copy"][0]["desirable"] == pytest.approx(0.5, abs=0.26)  # pairs become both labels
    assert runs["copy"][-1]["kl"] > 0  # the policy has moved: z₀ from the mismatched pairs
    for a, b in zip(runs["copy"], runs["precomputed"]):
        for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)


@pytest.mark.slow
def test_kto_step0_matches_trl(tiny_config, kto_file, tokenizer, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    cfg = tiny_config(f"data.train={kto_file}", "objective.loss=kto", "objective.kto_desirable_weight=1.3",
                      "train.layout=padded")
    method = DPO(cfg, Runtime(), tokenizer)
    policy, ref_model = tiny_llama(seed=1), tiny_llama(seed=0)  # seeds for which z₀ > 0 (it is clamped at 0)
    method.reference = reference.FrozenCopy(CompletionLogProbs(ref_model))
    items = method.train_set
    stats = MeanMetrics(method.metric_names, "cpu")
    with torch.no_grad():
        stats.add(method.forward(CompletionLogProbs(policy), list(range(len(items))), "train"))
    mine = stats.result(Runtime(), method.unit)

    args = KTOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, desirable_weight=1.3, bf16=False, report_to=[],
                     use_cpu=True, max_length=None, gradient_checkpointing=False,
                     per_device_train_batch_size=len(items))
    rows = [json.loads(line) for line in kto_file.read_text().splitlines()]
    trainer = KTOTrainer(model=policy, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    labels = method.labels["train"].tolist()
    inputs = trainer.data_collator([{"prompt_ids": list(p.prompt), "completion_ids": list(p.chosen),
                                     "KL_completion_ids": list(p.rejected), "label": label}
                                    for p, label in zip(items, labels)])
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs)
    theirs = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert abs(mine["loss"] - loss.item()) < 1e-4
    for key in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert abs(mine[key] - theirs[key]) < 1e-4, (key, mine[key], theirs[key])
    assert mine["kl"] > 1e-3 and abs(mine["rewards/chosen"]) > 1e-3  # not a comparison of zeros


def test_per_pair_weights_scale_each_pair(tiny_config, tmp_path):
    rows = [{"prompt": p, "chosen": " " + c, "rejected": " " + r, "weight": w}
            for (p, c, r), w in zip(PAIRS, [0, 1, 2, 3, 0.5, 1, 1, 4])]
    weighted = write_jsonl(tmp_path / "weighted.jsonl", rows)
    plain = write_jsonl(tmp_path / "plain.jsonl", [{k: v for k, v in r.items() if k != "weight"} for r in rows])
    common = ("train.max_steps=1", "train.batch_size=8", "train.micro_batch_size=8", "objective.loss=ipo")
    a = train_rows(tiny_config(f"data.train={weighted}", *common, f"output.dir={tmp_path / 'a'}"))[0]
    b = train_rows(tiny_config(f"data.train={plain}", *common, f"output.dir={tmp_path / 'b'}"))[0]
    # step 0: every pair's IPO loss is (0 - 1/(2β))² = 25, so the weighted mean is 25 · mean(weights)
    assert b["loss"] == pytest.approx(25.0)
    assert a["loss"] == pytest.approx(25.0 * 12.5 / 8)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**rows[0], "weight": -1}] + rows[1:])
    with pytest.raises(Exception, match="'weight' must be a finite number >= 0; got -1"):
        train(tiny_config(f"data.train={bad}", f"output.dir={tmp_path / 'c'}"))


@pytest.mark.slow
def test_objectives_from_the_command_line(tiny_config, tmp_path):
    cfg = tiny_config("train.max_steps=2")
    config_file = tmp_path / "run.yaml"
    config_file.write_text(json.dumps({k: v for k, v in cfg.to_dict().items()}))
    out = subprocess.run([sys.executable, "-m", "dpokit", "train", str(config_file),
                          "objective.loss=[sigmoid, hinge, dpop]", "objective.loss_weights=[1, 0.5, 0.25]",
                          "objective.ld_alpha=0.5", "objective.wpo=true", f"output.dir={tmp_path / 'cli'}"],
                         capture_output=True, text=True, env={"TQDM_DISABLE": "1", **__import__("os").environ})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "sigmoid+hinge+dpop" in out.stdout
    assert len([r for r in read_metrics(tmp_path / "cli") if "loss" in r]) == 2
    helped = subprocess.run([sys.executable, "-m", "dpokit", "train", "--help"], capture_output=True, text=True)
    for key in ("loss_weights", "discopop_tau", "dpop_lambda", "orpo_lambda", "kto_desirable_weight", "f_divergence",
                "ld_alpha", "wpo", "weight_field", "sync_every", "sync_alpha", "exo_pair"):
        assert key in helped.stdout, key


def reference_weights(trainer):
    return {k: v.clone() for k, v in trainer.method.reference.state_dict().items()}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_tr_dpo_reference_follows_the_policy(tiny_config, tmp_path, lora):
    extra = ["lora.enabled=true", "lora.r=4", "train.lr=5e-3"] if lora else []
    cfg = tiny_config("reference.sync_every=2", "reference.sync_alpha=0.5", "train.max_steps=3", *extra)
    trainer = Trainer(cfg, Runtime())
    try:
        start = reference_weights(trainer)
        for step in range(3):
            before = reference_weights(trainer)
            policy = reference.effective_weights(trainer.policy.model)
            policy = {k: v.detach().clone() for k, v in policy.items()}
            trainer.train_step(trainer._step_items(step))
            trainer.step += 1
            if step == 2:  # prepare() of the step after 2 updates moved it: π_ref ← ½ π_θ + ½ π_ref
                after = reference_weights(trainer)
                for name in policy:
                    assert torch.allclose(after[name], 0.5 * policy[name] + 0.5 * before[name], atol=1e-6), name
                assert any(not torch.equal(after[k], start[k]) for k in start)
            else:
                assert all(torch.equal(reference_weights(trainer)[k], before[k]) for k in before)
    finally:
        trainer.close()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_tr_dpo_resume_carries_the_moving_reference(tiny_config, tmp_path, monkeypatch, lora):
    common = ("reference.sync_every=1", "reference.sync_alpha=0.3", "train.max_steps=5", "train.epochs=2",
              "checkpoint.every=2", *(["lora.enabled=true", "lora.r=4", "train.lr=5e-3"] if lora else []))
    straight = train(tiny_config(*common, f"output.dir={tmp_path / 'straight'}"))
    cfg = tiny_config(*common, f"output.dir={tmp_path / 'interrupted'}")
    resumed = crash_then_resume(cfg, monkeypatch)  # checkpoint 2 written, step 3 done but not checkpointed
    losses = [[r["loss"] for r in read_metrics(run.run_dir) if "loss" in r] for run in (straight, resumed)]
    assert losses[0] == pytest.approx(losses[1], abs=0)  # the loss reads the reference: it moved identically
    a = torch.load(sorted((tmp_path / "straight" / "checkpoints").iterdir())[-1] / "trainer_state.pt")
    b = torch.load(sorted((tmp_path / "interrupted" / "checkpoints").iterdir())[-1] / "trainer_state.pt")
    for k, v in a["method"]["reference"].items():
        assert torch.equal(v, b["method"]["reference"][k]), k


def test_tr_dpo_refuses_a_fixed_reference():
    with pytest.raises(Exception, match="keeps fixed"):
        load_config(None, ["data.train=x", "reference.sync_every=2", "reference.strategy=precomputed"])
