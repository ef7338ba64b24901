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
from dpokit.objectives import build_objective

from .conftest import PAIRS, tiny_llama

CASES = [
    ("sigmoid", dict(loss="sigmoid"), {}),
    ("ipo", dict(loss="ipo", ipo_form="length_normalized"), {}),
    ("hinge", dict(loss="hinge"), {}),
    ("robust", dict(loss="robust", label_smoothing=0.1), {"label_smoothing": 0.1}),
]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.mark.parametrize("trl_loss,ours,trl_extra", CASES, ids=[c[0] for c in CASES])
def test_step0_matches_trl(trl_loss, ours, trl_extra, tokenizer, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    records = [PreferenceRecord(p, " " + c, " " + r, f"t:{i}") for i, (p, c, r) in enumerate(PAIRS)]
    pairs, _ = tokenize_records(records, tokenizer, TokenizeSettings(), Problems())
    beta = 0.1 if trl_loss != "ipo" else 0.5
    policy, reference = tiny_llama(seed=0), tiny_llama(seed=1)

    # dpokit
    objective = build_objective(ObjectiveSection(beta=beta, **ours))
    batch = collate(pairs, range(len(pairs)), "padded", tokenizer.pad_token_id)
    with torch.no_grad():
        pol = CompletionLogProbs(policy)(batch)
        ref = CompletionLogProbs(reference)(batch)
    out = objective(pol, ref)
    stats = MeanMetrics(PAIR_SUMS, "cpu")
    stats.add(MicroBatch(out.losses, pair_sums(out, pol), batch.num_tokens))
    mine = stats.result(Runtime(), "pairs")

    # TRL
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, loss_type=[trl_loss], bf16=False, report_to=[],
                     use_cpu=True, max_length=None, gradient_checkpointing=False,
                     per_device_train_batch_size=len(pairs), **trl_extra)
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
