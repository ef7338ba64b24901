"""The arithmetic of RLHF with PPO, as pure functions on tensors (no models, no state).

Shapes: per-token quantities of a batch of completions are [B, T] tensors, right-padded, with `mask`
[B, T] (1 for a completion token, 0 after it); a completion's tokens are the first `mask.sum(1)` columns
of its row. Token t of a completion is the action a_t taken in state s_t = (prompt, a_<t); its value
V(s_t) is read where the policy predicts a_t.

Sources: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (arXiv 1909.08593):
KL-shaped reward and the adaptive KL controller. Schulman et al. 2016 (arXiv 1506.02438): GAE.
Schulman et al. 2017 (arXiv 1707.06347): the clipped surrogate objective. Huang et al. 2024, "The N+
Implementation Details of RLHF with PPO" (arXiv 2403.17031, code vwxyzjn/summarize_from_feedback_details)
and TRL's PPOTrainer: the value clipping, whitening, EOS penalty and the logged approx-KL and clip fractions.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x·mask / Σ mask, over all elements or along `dim`."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the masked elements: Σ (x − μ)² · n / (n − 1) / n (TRL's `masked_var`)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1) if n > 1 else var


def whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − μ) / sqrt(σ² + ε) over the masked elements (mean and unbiased variance of the whole batch);
    with `shift_mean=False` the mean is added back, x' = (x − μ)/σ + μ: only the scale changes (TRL's
    reward whitening). Elements outside the mask come out 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(out.dtype)


def kl_shaped_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of Ziegler et al. 2019 (eq. 2, spread over tokens as in their code and TRL):

        r_t = −β (log π(a_t|s_t) − log π_ref(a_t|s_t))  for every completion token t,
        r_T += score                                    at its last token T,

    (the textbook placement: the N+ details' code and TRL add the score one position after an EOS, to a
    state whose value they keep; here the value after the last token is 0, so a finished completion's last
    advantage differs; a truncated one's is the same)

    so Σ_t r_t = score − β·KL̂, with KL̂ = Σ_t (log π − log π_ref) the single-sample (k1) estimate of
    KL(π(·|x) ‖ π_ref(·|x)) on the sampled completion. `scores` [B] are the sequence rewards (after any
    missing-EOS penalty, `penalize_missing_eos`). Returns (rewards [B, T], KL̂ per token [B, T]); both are
    0 outside the mask."""
    m = mask.to(logps.dtype)
    kl = (logps - ref_logps) * m
    rewards = -kl_coef * kl
    last = (mask.sum(1) - 1).clamp(min=0).long()
    rows = torch.arange(len(scores), device=rewards.device)
    rewards = rewards.index_put((rows, last), scores.to(rewards.dtype), accumulate=True)
    return rewards * m, kl


def penalize_missing_eos(scores: torch.Tensor, finished: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """The EOS trick of the N+ details (their `penalty_reward_value`, TRL's `missing_eos_penalty`): a
    completion cut at the length limit without generating EOS has `penalty` subtracted from its score,
    so the policy learns to finish its answers. `finished` [B] bool; `penalty` None leaves the scores."""
    if penalty is None:
        return scores
    return scores - penalty * (~finished.bool()).to(scores.dtype)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16), backwards over each completion:

        δ_t = r_t + γ V(s_{t+1}) − V(s_t),   with V(s_{T+1}) = 0 after the last token,
        A_t = δ_t + γλ A_{t+1},              A_{T+1} = 0,
        returns R_t = A_t + V(s_t)           (the value function's regression target).

    Returns (advantages, returns), [B, T], 0 outside the mask."""
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    width = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(width)):
        next_value = values[:, t + 1] if t + 1 < width else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * m


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip loss (Schulman et al. 2017, eq. 7, negated to be minimised), with the ratio
    ρ_t = π(a_t|s_t) / π_old(a_t|s_t) = exp(log π − log π_old):

        L_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε))

    Returns (loss, clipped): `clipped` is 1.0 where the clipped term is the strictly larger one (the token
    gets no gradient), the numerator of the clip fraction TRL and the N+ details log."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).to(logps.dtype)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip_range: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped value loss (PPO2 / TRL / the N+ details):

        V_clip = V_old + clip(V − V_old, −c, c)
        L_t = ½ max((V − R_t)², (V_clip − R_t)²)

    `clip_range` None gives the plain ½ (V − R_t)². Returns (loss, clipped), `clipped` 1.0 where the
    clipped error is the strictly larger one."""
    unclipped = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * unclipped, torch.zeros_like(unclipped)
    v_clip = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    clipped = (v_clip - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).to(values.dtype)


def approx_kl(logps: torch.Tensor, old_logps: torch.Tensor) -> torch.Tensor:
    """Per-token ½ (log π − log π_old)², the approximate KL(π_old ‖ π) TRL logs as `policy/approxkl`
    (Schulman's k2 estimator: unbiased to second order, always ≥ 0)."""
    return 0.5 * (logps - old_logps) ** 2


def adaptive_kl_coef(kl_coef: float, kl: float, *, target: float, horizon: int, batch_size: int) -> float:
    """The adaptive KL controller of Ziegler et al. 2019 (§2.2), in TRL's form:

        e = clip(KL / KL_target − 1, −0.2, 0.2)
        β ← β (1 + e · n / horizon)

    with KL the mean sequence KL of the last batch and n its size, so β moves by at most 0.2·n/horizon
    per batch: up when the policy drifts beyond the target, down when it stays inside it."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * batch_size / horizon)
