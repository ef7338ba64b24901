"""Is bf16-mixed's loss deviation from fp32 each step's rounding, or a trajectory drifting away?

    .venv/bin/python benchmarks/bf16_rounding.py            # 20 updates of the loss comparison's pairs (~7 min)

On the throughput benchmark's loss-comparison pairs (`throughput.py`'s third table: 20 updates of 4 short
pairs, lr 1e-5, β 0.1, no clipping) it trains the embedded model in fp32 and, beside it, under bf16 autocast,
with a plain padded DPO step written here (not dpokit's trainer: an independent check). Before each update it
prints the batch's loss three ways: fp32; the same fp32 weights evaluated under bf16 autocast (rounding
alone, the trajectory identical); and the bf16-trained weights under bf16 autocast (what the benchmark
compares). If the second deviates as much as the third, the deviation is the rounding of each step's
log-ratio, which no bf16 trainer avoids. Results are printed, not written.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from workload import length_plan, make_pairs

from dpokit import models

MODEL, UPDATES, PAIRS, LR, BETA = "smollm2-135m-instruct", 20, 4, 1e-5, 0.1
SEED, LENGTH_SCALE = 5 + 3, 0.25  # throughput.py's loss pairs: its --seed 5 + 3, --loss-length-scale 0.25


def sequence_logps(model, tokenizer, sequences: list[tuple[list[int], int]]) -> torch.Tensor:
    """Sum of log π(completion | prompt) for each (ids, prompt length), in one right-padded batch."""
    width = max(len(ids) for ids, _ in sequences)
    ids = torch.full((len(sequences), width), tokenizer.eos_token_id)
    attention = torch.zeros(len(sequences), width, dtype=torch.long)
    completion = torch.zeros(len(sequences), width)
    for i, (seq, prompt) in enumerate(sequences):
        ids[i, :len(seq)] = torch.tensor(seq)
        attention[i, :len(seq)] = 1
        completion[i, prompt:len(seq)] = 1
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    logps = torch.log_softmax(logits, -1).gather(2, ids[:, 1:, None]).squeeze(2)
    return (logps * completion[:, 1:]).sum(1)


def dpo_loss(policy, reference, tokenizer, batch: list[tuple[list[int], int]], bf16: bool) -> torch.Tensor:
    """-log σ(β · (log-ratio of chosen − log-ratio of rejected)), batch = chosen, rejected, chosen, ..."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logps = sequence_logps(policy, tokenizer, batch)
        with torch.no_grad():
            reference_logps = sequence_logps(reference, tokenizer, batch)
    ratio = (logps - reference_logps).view(-1, 2)
    return -F.logsigmoid(BETA * (ratio[:, 0] - ratio[:, 1])).mean()


def main() -> None:
    tokenizer = models.load_tokenizer(MODEL)
    sequences = []
    for row in make_pairs(tokenizer, length_plan(UPDATES * PAIRS, SEED, LENGTH_SCALE), SEED):
        prompt = tokenizer(row["prompt"], add_special_tokens=False).input_ids
        for completion in (row["chosen"], row["rejected"]):
            ids = tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            sequences.append((prompt + ids, len(prompt)))
    reference = models.load_model(MODEL, dtype="float32").eval().requires_grad_(False)
    policies = {"fp32": copy.deepcopy(reference).train(), "bf16": copy.deepcopy(reference).train()}
    optimizers = {}
    for name, policy in policies.items():
        policy.requires_grad_(True)
        optimizers[name] = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=0.0)
    worst = {"rounding": 0.0, "trajectory": 0.0}
    for k in range(UPDATES):
        batch = sequences[2 * PAIRS * k: 2 * PAIRS * (k + 1)]
        fp32 = dpo_loss(policies["fp32"], reference, tokenizer, batch, bf16=False)
        with torch.no_grad():
            rounded = dpo_loss(policies["fp32"], reference, tokenizer, batch, bf16=True).item()
        bf16 = dpo_loss(policies["bf16"], reference, tokenizer, batch, bf16=True)
        d_round, d_traj = abs(rounded - fp32.item()), abs(bf16.item() - fp32.item())
        worst = {"rounding": max(worst["rounding"], d_round), "trajectory": max(worst["trajectory"], d_traj)}
        print(f"update {k + 1:2d}: fp32 {fp32.item():.4f} | fp32 weights under bf16 {rounded:.4f} (|Δ| {d_round:.1e}) "
              f"| bf16-trained {bf16.item():.4f} (|Δ| {d_traj:.1e})", flush=True)
        for name, loss in (("fp32", fp32), ("bf16", bf16)):
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
    print(f"worst |Δ| over {UPDATES} updates: rounding alone {worst['rounding']:.1e}, "
          f"bf16-trained {worst['trajectory']:.1e}")


if __name__ == "__main__":
    main()
