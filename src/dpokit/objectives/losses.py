"""Preference objectives: pure functions of per-pair log-probs.

Inputs are summed completion log-probs of the policy (`pc`, `pr`: chosen, rejected) and of the
reference (`rc`, `rr`), and completion lengths (`len_c`, `len_r`). Each function returns the per-pair loss
and the chosen/rejected implicit rewards (detached, for metrics). With
    h = (pc - rc) - (pr - rr)
the DPO family differs only in the function of β·h it minimises.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpokit.logps import SequenceLogps
from dpokit.objectives.registry import OBJECTIVES

Tensor = torch.Tensor


@dataclass
class ObjectiveOutput:
    losses: Tensor  # [pairs]
    chosen_rewards: Tensor  # [pairs], detached
    rejected_rewards: Tensor  # [pairs], detached


def _rewards(beta: float, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> tuple[Tensor, Tensor]:
    """Implicit reward r(x, y) = β (log π(y|x) - log π_ref(y|x))."""
    return (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


def sigmoid(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, label_smoothing: float = 0.0) -> ObjectiveOutput:
    """DPO (Rafailov et al. 2023, eq. 7): loss = -log σ(β h).
    With label smoothing ε, conservative DPO (Mitchell 2023): loss = -(1-ε) log σ(β h) - ε log σ(-β h)."""
    h = (pc - rc) - (pr - rr)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return ObjectiveOutput(losses, *_rewards(beta, pc, pr, rc, rr))


def ipo(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, len_c: Tensor, len_r: Tensor, *, beta: float,
        form: str = "length_normalized") -> ObjectiveOutput:
    """IPO (Azar et al. 2023, eq. 17), β playing τ: loss = (h - 1/(2β))².
    form `length_normalized` (TRL's): each log-ratio is divided by its completion length first;
    `summed`: h uses summed log-ratios (the DPO authors' code)."""
    if form == "length_normalized":
        h = (pc - rc) / len_c.clamp(min=1) - (pr - rr) / len_r.clamp(min=1)
    else:
        h = (pc - rc) - (pr - rr)
    losses = (h - 1 / (2 * beta)) ** 2
    return ObjectiveOutput(losses, *_rewards(beta, pc, pr, rc, rr))


def hinge(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float) -> ObjectiveOutput:
    """The hinge loss on the DPO log-ratio, RSO's hinge-norm (Liu et al. 2024, "Statistical Rejection
    Sampling"; SLiC-HF's calibration loss without a reference, Zhao et al. 2023): loss = max(0, 1 - β h)."""
    h = (pc - rc) - (pr - rr)
    losses = torch.relu(1 - beta * h)
    return ObjectiveOutput(losses, *_rewards(beta, pc, pr, rc, rr))


def robust(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, label_smoothing: float) -> ObjectiveOutput:
    """Robust DPO (Chowdhury et al. 2024, eq. 9), ε the label-flip rate:
    loss = [-(1-ε) log σ(β h) + ε log σ(-β h)] / (1 - 2ε), an unbiased loss under flipped labels."""
    h = (pc - rc) - (pr - rr)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return ObjectiveOutput(losses, *_rewards(beta, pc, pr, rc, rr))


def simpo(pc: Tensor, pr: Tensor, len_c: Tensor, len_r: Tensor, *, beta: float, gamma: float) -> ObjectiveOutput:
    """SimPO (Meng et al. 2024, eq. 6), reference-free and length-normalised:
    loss = -log σ(β/|y_w| log π(y_w|x) - β/|y_l| log π(y_l|x) - γ); reward = β/|y| log π(y|x)."""
    chosen = beta * pc / len_c.clamp(min=1)
    rejected = beta * pr / len_r.clamp(min=1)
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return ObjectiveOutput(losses, chosen.detach(), rejected.detach())


def unlikelihood(pc: Tensor, pr: Tensor, len_c: Tensor, len_r: Tensor, ur: Tensor, *, alpha: float) -> ObjectiveOutput:
    """Unlikelihood, the DPO paper's §6 baseline: raise the chosen completion's likelihood, lower the
    rejected one's through Welleck et al. (2019)'s token-level unlikelihood term; reference-free.
    Implemented with token means, `ur` = Σ_t log(1 - π(y_l,t | x, y_l,<t)):
        loss = -(1/|y_w|) Σ_t log π(y_w,t | x, y_w,<t) - α (1/|y_l|) Σ_t log(1 - π(y_l,t | x, y_l,<t)).
    Rewards (for metrics only) are the token-mean log-probs of each completion."""
    chosen = pc / len_c.clamp(min=1)
    losses = -chosen - alpha * ur / len_r.clamp(min=1)
    return ObjectiveOutput(losses, chosen.detach(), (pr / len_r.clamp(min=1)).detach())


def sigmoid_norm(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, len_c: Tensor, len_r: Tensor, *,
                 beta: float) -> ObjectiveOutput:
    """Length-normalised DPO (TRL's `sigmoid_norm`): DPO on per-token log-ratios,
    loss = -log σ(β [(log π(y_w) - log π_ref(y_w)) / |y_w| - (log π(y_l) - log π_ref(y_l)) / |y_l|])."""
    h = (pc - rc) / len_c.clamp(min=1) - (pr - rr) / len_r.clamp(min=1)
    return ObjectiveOutput(-F.logsigmoid(beta * h), *_rewards(beta, pc, pr, rc, rr))


def exo_pair(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, label_smoothing: float) -> ObjectiveOutput:
    """EXO (Ji et al. 2024, eq. 16, K = 2): KL(q ‖ p) between the policy's preference distribution
    q = (σ(β h), σ(-β h)) and the smoothed label p = (1-ε, ε):
    loss = σ(β h) [log σ(β h) - log(1-ε)] + σ(-β h) [log σ(-β h) - log ε]; needs ε > 0."""
    h = (pc - rc) - (pr - rr)
    eps = label_smoothing
    losses = (torch.sigmoid(beta * h) * (F.logsigmoid(beta * h) - math.log1p(-eps))
              + torch.sigmoid(-beta * h) * (F.logsigmoid(-beta * h) - math.log(eps)))
    return ObjectiveOutput(losses, *_rewards(beta, pc, pr, rc, rr))


def nca_pair(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float) -> ObjectiveOutput:
    """NCA (Chen et al. 2024, "Noise Contrastive Alignment", pairwise form), r = β log π/π_ref:
    loss = -log σ(r_w) - ½ log σ(-r_w) - ½ log σ(-r_l): raises r_w in absolute terms, not only r_w - r_l."""
    rw, rl = beta * (pc - rc), beta * (pr - rr)
    losses = -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)
    return ObjectiveOutput(losses, rw.detach(), rl.detach())


def bco_pair(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float) -> ObjectiveOutput:
    """BCO on pairs (Jung et al. 2024, binary classifier optimisation; TRL's `bco_pair`, without the
    paper's running reward shift δ): chosen classified as good, rejected as bad, r = β log π/π_ref:
    loss = -log σ(r_w) - log σ(-r_l)."""
    rw, rl = beta * (pc - rc), beta * (pr - rr)
    return ObjectiveOutput(-F.logsigmoid(rw) - F.logsigmoid(-rl), rw.detach(), rl.detach())


def sppo_hard(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float) -> ObjectiveOutput:
    """SPPO (Wu et al. 2024, eq. 4.7) with hard win probabilities (1 for y_w, 0 for y_l) and η = 1/β:
    loss = (log π(y_w)/π_ref(y_w) - 1/(2β))² + (log π(y_l)/π_ref(y_l) + 1/(2β))²."""
    losses = (pc - rc - 0.5 / beta) ** 2 + (pr - rr + 0.5 / beta) ** 2
    return ObjectiveOutput(losses, *_rewards(beta, pc, pr, rc, rr))


def _smoothed_sigmoid(delta: Tensor, beta: float, label_smoothing: float) -> Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def aot(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, label_smoothing: float = 0.0) -> ObjectiveOutput:
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment via Optimal Transport"):
    first-order stochastic dominance of the policy's margins over the reference's, through the sorted
    (1-D optimal transport) batch: Δ_i = sort(log π(y_w) - log π(y_l))_i - sort(log π_ref(y_w) - log π_ref(y_l))_i,
    loss_i = -(1-ε) log σ(β Δ_i) - ε log σ(-β Δ_i). Losses are per rank in the micro-batch, not per pair."""
    delta = torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values
    return ObjectiveOutput(_smoothed_sigmoid(delta, beta, label_smoothing), *_rewards(beta, pc, pr, rc, rr))


def aot_unpaired(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float,
                 label_smoothing: float = 0.0) -> ObjectiveOutput:
    """AOT, unpaired (Melnyk et al. 2024): dominance of the chosen log-ratios' distribution over the
    rejected ones', Δ_i = sort(log π(y_w)/π_ref(y_w))_i - sort(log π(y_l)/π_ref(y_l))_i, then the smoothed
    sigmoid loss as `aot`."""
    delta = torch.sort(pc - rc, dim=0).values - torch.sort(pr - rr, dim=0).values
    return ObjectiveOutput(_smoothed_sigmoid(delta, beta, label_smoothing), *_rewards(beta, pc, pr, rc, rr))


def apo_zero(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float) -> ObjectiveOutput:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7), when y_w is better than the model's own outputs:
    loss = (1 - σ(r_w)) + σ(r_l), r = β log π/π_ref: raise the chosen likelihood, lower the rejected one."""
    rw, rl = beta * (pc - rc), beta * (pr - rr)
    return ObjectiveOutput(1 - torch.sigmoid(rw) + torch.sigmoid(rl), rw.detach(), rl.detach())


def apo_down(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float) -> ObjectiveOutput:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8), when y_w is worse than the model's own outputs:
    loss = σ(r_w) + (1 - σ(r_w - r_l)): lower both likelihoods, the rejected one more."""
    rw, rl = beta * (pc - rc), beta * (pr - rr)
    return ObjectiveOutput(torch.sigmoid(rw) + 1 - torch.sigmoid(rw - rl), rw.detach(), rl.detach())


def discopop(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, tau: float) -> ObjectiveOutput:
    """DiscoPOP (Chris Lu et al. 2024, eq. 5), the log-ratio modulated loss found by LLM-driven search:
    with ρ = β h and m = σ(ρ/τ), loss = (1 - m)(-log σ(ρ)) + m exp(-ρ)."""
    rho = beta * ((pc - rc) - (pr - rr))
    m = torch.sigmoid(rho / tau)
    return ObjectiveOutput((1 - m) * -F.logsigmoid(rho) + m * torch.exp(-rho), *_rewards(beta, pc, pr, rc, rr))


def dpop(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, lam: float) -> ObjectiveOutput:
    """DPO-Positive (Pal et al. 2024, "Smaug", eq. 3): DPO with a penalty once the chosen completion
    falls below its reference likelihood,
    loss = -log σ(β [h - λ max(0, log π_ref(y_w|x) - log π(y_w|x))])."""
    h = (pc - rc) - (pr - rr) - lam * torch.relu(rc - pc)
    return ObjectiveOutput(-F.logsigmoid(beta * h), *_rewards(beta, pc, pr, rc, rr))


def orpo(pc: Tensor, pr: Tensor, len_c: Tensor, len_r: Tensor, *, lam: float) -> ObjectiveOutput:
    """ORPO (Hong et al. 2024, eqs. 2-7), reference-free: NLL of the chosen completion plus λ times the
    odds-ratio term, with P(y|x) the token-mean (length-normalised) likelihood and odds = P / (1 - P):
        loss = -(1/|y_w|) log π(y_w|x) - λ log σ(log odds(y_w) - log odds(y_l)).
    log odds = log P - log(1 - P), with log(1 - P) computed stably from log P. Rewards, for metrics:
    λ (1/|y|) log π(y|x), as TRL's ORPO trainer reports them."""
    chosen, rejected = pc / len_c.clamp(min=1), pr / len_r.clamp(min=1)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    losses = -chosen - lam * F.logsigmoid(log_odds)
    return ObjectiveOutput(losses, (lam * chosen).detach(), (lam * rejected).detach())


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0 (Mächler 2012): log(-expm1(x)) near 0, log1p(-exp(x)) further out."""
    x = x.clamp(max=-1e-7)  # a token-mean log-prob of exactly 0 (P = 1) has infinite odds: keep them finite
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def kto(logratios: Tensor, desirable: Tensor, kl: Tensor, *, beta: float, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0) -> Tensor:
    """KTO (Ethayarajh et al. 2024, eq. 7) on unpaired completions, r = log π(y|x) - log π_ref(y|x) and
    z₀ the reference point, an estimate of KL(π ‖ π_ref) (no gradient flows through it):
        desirable:   λ_D (1 - σ(β (r - z₀)))
        undesirable: λ_U (1 - σ(β (z₀ - r)))
    `desirable` is a bool per completion; returns the per-completion losses."""
    return torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios))))


def kto_reference_point(kl_policy: Tensor, kl_reference: Tensor,
                        all_reduce_sum: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """KTO's z₀ (Ethayarajh et al. 2024, §4.1): max(0, mean_i log π(y'_i|x_i) - log π_ref(y'_i|x_i)) over
    mismatched pairs (x_i, y'_i), y'_i another row's completion, detached: a biased but cheap estimate
    of the batch KL. `all_reduce_sum` sums over processes, so the mean is over every rank's pairs (TRL 1.16
    averages the ranks' means, the same when every rank has as many pairs)."""
    terms = (kl_policy - kl_reference).detach().float()
    total = torch.stack([terms.sum(), terms.new_tensor(float(terms.numel()))])
    if all_reduce_sum is not None:
        total = all_reduce_sum(total)
    return (total[0] / total[1]).clamp(min=0)


def f_divergence_scores(logratio: Tensor, divergence: str, alpha: float = 0.5) -> Tensor:
    """f-DPO (Wang et al. 2023, "Beyond Reverse KL", Theorem 1): under an f-divergence constraint the
    implicit reward is β f'(π/π_ref) instead of β log(π/π_ref), so pairwise losses compare f'(u_w) - f'(u_l),
    u = π/π_ref. f' per divergence, with log u = `logratio`:
        reverse_kl: log u (DPO)        forward_kl: 1 - 1/u
        js:         log 2 + log σ(log u) = log(2u/(1+u))
        alpha:      (u^(α-1) - 1)/(α - 1)  (TRL's parameterisation; α → 1 is reverse KL)"""
    if divergence == "reverse_kl":
        return logratio
    if divergence == "forward_kl":
        return 1 - torch.exp(-logratio)
    if divergence == "js":
        return math.log(2) + F.logsigmoid(logratio)
    if divergence == "alpha":
        if abs(alpha - 1.0) < 1e-6:
            return logratio
        work = logratio if logratio.dtype in (torch.float32, torch.float64) else logratio.float()
        t = ((alpha - 1.0) * work).clamp(max=80.0)  # exp stays finite in float32
        return ((torch.exp(t) - 1.0) / (alpha - 1.0)).to(logratio.dtype)
    raise ValueError(f"unknown divergence {divergence!r}")


def wpo_weights(policy: SequenceLogps) -> Tensor:
    """WPO (Zhou et al. 2024, eq. 2, the "aligned" form TRL uses): each pair weighs w(y_w) w(y_l), with
    w(y) = exp((1/|y|) Σ_t [log π(y_t|·) - log Σ_v π(v|·)²]), the sequence's length-normalised probability
    relative to what the policy itself would sample; detached, so it only reweights the loss."""
    return torch.exp(policy.chosen_wpo + policy.rejected_wpo).detach()


def nll(pc: Tensor, len_c: Tensor) -> Tensor:
    """Token-mean negative log-likelihood of the chosen completion (the RPO term, Pang et al. 2024)."""
    return -pc / len_c.clamp(min=1)


def bradley_terry(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | None = None, *,
                  center_coefficient: float = 0.0) -> Tensor:
    """Per-pair loss of a Bradley–Terry reward model, whose scalar rewards r_w, r_l are read off the
    model itself (not implicit, as in DPO):
        loss = -log σ(r_w - r_l - m) + c (r_w + r_l)²
    The first term is the negative log-likelihood of the preference under Bradley & Terry (1952), as
    reward models are trained in Christiano et al. 2017, Stiennon et al. 2020 (eq. 1) and Ouyang et al.
    2022. m, a per-pair margin (0 when None), asks for a gap of at least about m (Llama 2, Touvron et al.
    2023 §3.2.2; TRL RewardTrainer's `margin` column). c > 0 pulls each pair's rewards toward a zero sum,
    so that rewards are centred (Eisenstein et al. 2023, "Helping or Herding?"; TRL's
    `center_rewards_coefficient`, whose batch mean of (r_w + r_l)² is the mean of this per-pair term)."""
    h = r_chosen - r_rejected
    if margin is not None:
        h = h - margin
    losses = -F.logsigmoid(h)
    if center_coefficient:
        losses = losses + center_coefficient * (r_chosen + r_rejected) ** 2
    return losses


@dataclass(frozen=True)
class Objective:
    """A configured objective: one or several weighted terms, each (policy, reference) → ObjectiveOutput,
    summed per pair (TRL's loss_type list with loss_weights); the first term's rewards are the ones
    reported. Then WPO's weights, the RPO term and per-pair weights apply. `needs_reference` tells the
    trainer whether to build a reference model."""

    name: str
    needs_reference: bool
    terms: tuple[tuple[float, Callable[[SequenceLogps, SequenceLogps | None], ObjectiveOutput]], ...]
    nll_weight: float = 0.0
    wpo: bool = False

    def __call__(self, policy: SequenceLogps, reference: SequenceLogps | None,
                 weights: Tensor | None = None) -> ObjectiveOutput:
        outs = [(w, fn(policy, reference)) for w, fn in self.terms]
        losses = sum(w * out.losses for w, out in outs)
        if self.wpo:
            losses = losses * wpo_weights(policy)
        if self.nll_weight:
            losses = losses + self.nll_weight * nll(policy.chosen, policy.chosen_lengths)
        if weights is not None:
            losses = losses * weights
        return ObjectiveOutput(losses, outs[0][1].chosen_rewards, outs[0][1].rejected_rewards)


def build_objective(cfg) -> Objective:
    """From the `objective` config section: each named loss is `registry.OBJECTIVES`' entry, its function
    called on the inputs and with the options the entry lists. KTO is not built here: it scores single
    completions (`methods.dpo` calls `kto` with its reference point)."""
    inputs = {"pc": lambda p, r: p.chosen, "pr": lambda p, r: p.rejected, "rc": lambda p, r: r.chosen,
              "rr": lambda p, r: r.rejected, "len_c": lambda p, r: p.chosen_lengths,
              "len_r": lambda p, r: p.rejected_lengths, "ur": lambda p, r: p.rejected_unlikely}

    def term(name: str) -> Callable[[SequenceLogps, SequenceLogps | None], ObjectiveOutput]:
        info = OBJECTIVES[name]
        fn = functools.partial(globals()[name], **{k: getattr(cfg, key) for k, key in info.options.items()})
        if not info.f_divergence or cfg.f_divergence == "reverse_kl":
            return lambda p, r: fn(*(inputs[k](p, r) for k in info.inputs))

        def f_dpo(p: SequenceLogps, r: SequenceLogps) -> ObjectiveOutput:
            # the loss sees f'(u) in place of log u (zero reference terms); rewards stay β log π/π_ref, as TRL's
            zero = torch.zeros_like(p.chosen)
            scores = {"pc": f_divergence_scores(p.chosen - r.chosen, cfg.f_divergence, cfg.f_alpha),
                      "pr": f_divergence_scores(p.rejected - r.rejected, cfg.f_divergence, cfg.f_alpha),
                      "rc": zero, "rr": zero}
            out = fn(*(scores[k] if k in scores else inputs[k](p, r) for k in info.inputs))
            out.chosen_rewards, out.rejected_rewards = _rewards(cfg.beta, p.chosen, p.rejected, r.chosen, r.rejected)
            return out

        return f_dpo

    names = cfg.losses
    weights = cfg.loss_weights or [1.0] * len(names)
    return Objective(cfg.name, cfg.needs_reference, tuple((w, term(n)) for w, n in zip(weights, names)),
                     cfg.nll_weight, cfg.wpo)
