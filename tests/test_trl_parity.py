"""Step-0 metrics equal those of TRL 1.16's DPOTrainer on the same models, batch, β and objective.

TRL is a test-only dependency: an independent implementation of the same formulas. Both sides get
the same token ids (built by dpokit's tokenizer and fed to TRL's own collator) and the same policy and
reference weights; the reference differs from the policy so the rewards are not trivially zero.
"""

import pytest
import torch

from dpokit.config import ObjectiveSection
from dpokit.data.layouts import collate
from dpokit.data.records import PreferenceRecord, Problems
from dpokit.data.tokenize import TokenizeSettings, tokenize_records
from dpokit.distributed import Runtime
from dpokit.logps import CompletionLogProbs
from dpokit.metrics import PAIR_SUMS, MeanMetrics, MicroBatch, pair_sums
from dpokit.objectives.losses import build_objective
from tests.helpers import PAIRS, tiny_llama

# (id, dpokit's objective settings, TRL's DPOConfig settings)
CASES = [
    ("sigmoid", dict(loss="sigmoid"), dict(loss_type=["sigmoid"])),
    ("ipo", dict(loss="ipo", ipo_form="length_normalized"), dict(loss_type=["ipo"])),
    ("hinge", dict(loss="hinge"), dict(loss_type=["hinge"])),
    ("robust", dict(loss="robust", label_smoothing=0.1), dict(loss_type=["robust"], label_smoothing=0.1)),
    ("sigmoid_norm", dict(loss="sigmoid_norm"), dict(loss_type=["sigmoid_norm"])),
    ("exo_pair", dict(loss="exo_pair", label_smoothing=1e-3), dict(loss_type=["exo_pair"], label_smoothing=1e-3)),
    ("nca_pair", dict(loss="nca_pair"), dict(loss_type=["nca_pair"])),
    ("bco_pair", dict(loss="bco_pair"), dict(loss_type=["bco_pair"])),
    ("sppo_hard", dict(loss="sppo_hard"), dict(loss_type=["sppo_hard"])),
    ("aot", dict(loss="aot", label_smoothing=0.1), dict(loss_type=["aot"], label_smoothing=0.1)),
    ("aot_unpaired", dict(loss="aot_unpaired"), dict(loss_type=["aot_unpaired"])),
    ("apo_zero", dict(loss="apo_zero"), dict(loss_type=["apo_zero"])),
    ("apo_down", dict(loss="apo_down"), dict(loss_type=["apo_down"])),
    ("discopop", dict(loss="discopop", discopop_tau=0.05), dict(loss_type=["discopop"], discopop_tau=0.05)),
    ("mix", dict(loss=["sigmoid", "bco_pair", "hinge"], loss_weights=[0.8, 0.2, 1.0]),
     dict(loss_type=["sigmoid", "bco_pair", "hinge"], loss_weights=[0.8, 0.2, 1.0])),
    ("f_forward_kl", dict(loss="sigmoid", f_divergence="forward_kl"),
     dict(loss_type=["sigmoid"], f_divergence_type="forward_kl")),
    ("f_js", dict(loss="hinge", f_divergence="js"), dict(loss_type=["hinge"], f_divergence_type="js_divergence")),
    ("f_alpha", dict(loss="ipo", f_divergence="alpha", f_alpha=0.3),
     dict(loss_type=["ipo"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)),
    ("ld_dpo", dict(loss="sigmoid", ld_alpha=0.5), dict(loss_type=["sigmoid"], ld_alpha=0.5)),
    ("wpo", dict(loss=["sigmoid", "ipo"], wpo=True), dict(loss_type=["sigmoid", "ipo"], use_weighting=True)),
]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.mark.slow
@pytest.mark.parametrize("name,ours,theirs", CASES, ids=[c[0] for c in CASES])
def test_step0_matches_trl(name, ours, theirs, tokenizer, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    records = [PreferenceRecord(p, " " + c, " " + r, f"t:{i}") for i, (p, c, r) in enumerate(PAIRS)]
    pairs, _ = tokenize_records(records, tokenizer, TokenizeSettings(), Problems())
    beta = 0.5 if "ipo" in theirs["loss_type"] else 0.1
    policy, reference = tiny_llama(seed=0), tiny_llama(seed=1)

    # dpokit, its log-probs set up as methods.dpo does (LD-DPO weights in both, WPO's in the policy)
    section = ObjectiveSection(beta=beta, **ours)
    objective = build_objective(section)
    batch = collate(pairs, range(len(pairs)), "padded", tokenizer.pad_token_id)
    with torch.no_grad():
        pol = CompletionLogProbs(policy, ld_alpha=section.ld_alpha, wpo=section.wpo)(batch)
        ref = CompletionLogProbs(reference, ld_alpha=section.ld_alpha)(batch)
    out = objective(pol, ref)
    stats = MeanMetrics(PAIR_SUMS, "cpu")
    stats.add(MicroBatch(out.losses, pair_sums(out, pol), batch.num_tokens))
    mine = stats.result(Runtime(), "pairs")

    # TRL
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, bf16=False, report_to=[], use_cpu=True, max_length=None,
                     gradient_checkpointing=False, per_device_train_batch_size=len(pairs), **theirs)
    dataset = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=dataset,
                         processing_class=tokenizer)
    inputs = trainer.data_collator([{"prompt_ids": list(p.prompt), "chosen_ids": list(p.chosen),
                                     "rejected_ids": list(p.rejected)} for p in pairs])
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs)
    theirs = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    assert abs(mine["loss"] - loss.item()) < 1e-4
    for key in METRICS:
        assert abs(mine[key] - theirs[key]) < 1e-4, (key, mine[key], theirs[key])
    assert abs(mine["rewards/chosen"]) > 1e-3  # the comparison is not between zeros


@pytest.mark.slow
def test_orpo_odds_ratio_term_and_rewards_match_trl(tokenizer, tmp_path):
    """ORPO lives in TRL's experimental ORPOTrainer, whose NLL term is a batch token mean over prompt and
    completion (dpokit's: the chosen completion's per-pair token mean, the paper's L_SFT); its odds-ratio
    term and rewards, on the same length-normalised log-probs, must agree."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from dpokit.objectives.losses import nll, orpo

    records = [PreferenceRecord(p, " " + c, " " + r, f"t:{i}") for i, (p, c, r) in enumerate(PAIRS)]
    pairs, _ = tokenize_records(records, tokenizer, TokenizeSettings(), Problems())
    policy = tiny_llama(seed=0)
    with torch.no_grad():
        logps = CompletionLogProbs(policy)(collate(pairs, range(len(pairs)), "padded", tokenizer.pad_token_id))
    lam = 0.25
    ours = orpo(logps.chosen, logps.rejected, logps.chosen_lengths, logps.rejected_lengths, lam=lam)
    odds_term = ours.losses - nll(logps.chosen, logps.chosen_lengths)  # -λ log σ(log odds ratio)

    args = ORPOConfig(output_dir=str(tmp_path), beta=lam, bf16=False, report_to=[], use_cpu=True)
    dataset = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])
    trainer = ORPOTrainer(model=policy, args=args, train_dataset=dataset, processing_class=tokenizer)
    theirs, chosen_rewards, rejected_rewards, _, _ = trainer.odds_ratio_loss(
        logps.chosen / logps.chosen_lengths, logps.rejected / logps.rejected_lengths)
    assert torch.allclose(odds_term, -theirs, atol=1e-5)
    assert torch.allclose(ours.chosen_rewards, chosen_rewards, atol=1e-6)
    assert torch.allclose(ours.rejected_rewards, rejected_rewards, atol=1e-6)
    assert odds_term.abs().min() > 1e-3
