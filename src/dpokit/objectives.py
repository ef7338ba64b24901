"""Preference objectives: pure functions of per-pair log-probs.

Inputs are summed completion log-probs of the policy (`pc`, `pr`: chosen, rejected) and of the
reference (`rc`, `rr`), and completion lengths (`len_c`, `len_r`). Each function returns the per-pair loss
and the chosen/rejected implicit rewards (detached, for metrics). With
    h = (pc - rc) - (pr - rr)
the DPO family differs only in the function of β·h it minimises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpokit.config import NEEDS_REFERENCE
from dpokit.logps import SequenceLogps

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
        length_normalized: bool = True) -> ObjectiveOutput:
    """IPO (Azar et al. 2023, eq. 17), β playing τ: loss = (h - 1/(2β))².
    length_normalized (TRL's form): each log-ratio is divided by its completion length first;
    otherwise h uses summed log-ratios (the DPO authors' code)."""
    if length_normalized:
        h = (pc - rc) / len_c.clamp(min=1) - (pr - rr) / len_r.clamp(min=1)
    else:
        h = (pc - rc) - (pr - rr)
    losses = (h - 1 / (2 * beta)) ** 2
    return ObjectiveOutput(losses, *_rewards(beta, pc, pr, rc, rr))


def hinge(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float) -> ObjectiveOutput:
    """SLiC-HF's calibration loss on the DPO log-ratio (Zhao et al. 2023): loss = max(0, 1 - β h)."""
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
    """A configured objective: `needs_reference` tells the trainer whether to build a reference model."""

    name: str
    needs_reference: bool
    fn: Callable[[SequenceLogps, SequenceLogps | None], ObjectiveOutput]
    nll_weight: float = 0.0

    def __call__(self, policy: SequenceLogps, reference: SequenceLogps | None) -> ObjectiveOutput:
        out = self.fn(policy, reference)
        if self.nll_weight:
            out.losses = out.losses + self.nll_weight * nll(policy.chosen, policy.chosen_lengths)
        return out


def build_objective(cfg) -> Objective:
    """From the `objective` config section."""
    b, eps = cfg.beta, cfg.label_smoothing
    fns: dict[str, Callable] = {
        "sigmoid": lambda p, r: sigmoid(p.chosen, p.rejected, r.chosen, r.rejected, beta=b, label_smoothing=eps),
        "ipo": lambda p, r: ipo(p.chosen, p.rejected, r.chosen, r.rejected, p.chosen_lengths, p.rejected_lengths,
                                beta=b, length_normalized=cfg.ipo_form == "length_normalized"),
        "hinge": lambda p, r: hinge(p.chosen, p.rejected, r.chosen, r.rejected, beta=b),
        "robust": lambda p, r: robust(p.chosen, p.rejected, r.chosen, r.rejected, beta=b, label_smoothing=eps),
        "simpo": lambda p, r: simpo(p.chosen, p.rejected, p.chosen_lengths, p.rejected_lengths, beta=b,
                                    gamma=cfg.simpo_gamma),
        "unlikelihood": lambda p, r: unlikelihood(p.chosen, p.rejected, p.chosen_lengths, p.rejected_lengths,
                                                  p.rejected_unlikely, alpha=cfg.unlikelihood_alpha),
    }
    return Objective(cfg.loss, NEEDS_REFERENCE[cfg.loss], fns[cfg.loss], cfg.nll_weight)
