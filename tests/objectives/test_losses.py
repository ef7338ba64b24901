"""Each objective against values computed by hand, and its gradient against finite differences."""

import math

import pytest
import torch

from dpokit.config import ObjectiveSection
from dpokit.logps import SequenceLogps
from dpokit.objectives import losses as obj

# one pair: policy chosen/rejected, reference chosen/rejected, completion lengths
PC, PR, RC, RR, LC, LR = -10.0, -14.0, -11.0, -12.0, 5, 8
H = (PC - RC) - (PR - RR)  # = 1 - (-2) = 3


def t(x):
    return torch.tensor([x], dtype=torch.float64)


def logsig(x):
    return -math.log1p(math.exp(-x))


def test_sigmoid_matches_hand_value():
    out = obj.sigmoid(t(PC), t(PR), t(RC), t(RR), beta=0.1)
    assert out.losses.item() == pytest.approx(-logsig(0.3), abs=1e-12)  # 0.554355...
    assert out.losses.item() == pytest.approx(0.5543552, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.1)
    assert out.rejected_rewards.item() == pytest.approx(-0.2)


def test_conservative_dpo_label_smoothing():
    out = obj.sigmoid(t(PC), t(PR), t(RC), t(RR), beta=0.1, label_smoothing=0.2)
    assert out.losses.item() == pytest.approx(-0.8 * logsig(0.3) - 0.2 * logsig(-0.3), abs=1e-12)
    assert out.losses.item() == pytest.approx(0.6143552, abs=1e-6)


def test_ipo_both_forms():
    summed = obj.ipo(t(PC), t(PR), t(RC), t(RR), t(LC), t(LR), beta=0.1, form="summed")
    assert summed.losses.item() == pytest.approx((3 - 5) ** 2)  # (h - 1/(2·0.1))² = 4
    normed = obj.ipo(t(PC), t(PR), t(RC), t(RR), t(LC), t(LR), beta=0.1, form="length_normalized")
    h = 1 / 5 - (-2) / 8  # 0.45
    assert normed.losses.item() == pytest.approx((h - 5) ** 2)  # 20.7025
    assert normed.losses.item() == pytest.approx(20.7025)


def test_hinge():
    assert obj.hinge(t(PC), t(PR), t(RC), t(RR), beta=0.1).losses.item() == pytest.approx(0.7)
    assert obj.hinge(t(PC), t(PR), t(RC), t(RR), beta=1.0).losses.item() == 0.0


def test_robust_is_unbiased_mix():
    out = obj.robust(t(PC), t(PR), t(RC), t(RR), beta=0.1, label_smoothing=0.1)
    expected = (-(0.9) * logsig(0.3) + 0.1 * logsig(-0.3)) / 0.8
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)
    assert out.losses.item() == pytest.approx(0.5168552, abs=1e-6)
    # ε = 0 is plain DPO
    plain = obj.robust(t(PC), t(PR), t(RC), t(RR), beta=0.1, label_smoothing=0.0)
    assert plain.losses.item() == pytest.approx(-logsig(0.3))


def test_simpo_is_reference_free_and_length_normalised():
    out = obj.simpo(t(PC), t(PR), t(LC), t(LR), beta=2.0, gamma=0.5)
    margin = 2.0 * (-10 / 5) - 2.0 * (-14 / 8) - 0.5  # -4 + 3.5 - 0.5 = -1
    assert out.losses.item() == pytest.approx(-logsig(margin))
    assert out.losses.item() == pytest.approx(1.3132617, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(-4.0)
    assert out.rejected_rewards.item() == pytest.approx(-3.5)


def test_nll_term_is_token_mean():
    assert obj.nll(t(PC), t(LC)).item() == pytest.approx(2.0)


def test_build_objective_adds_weighted_nll():
    policy = SequenceLogps(t(PC), t(PR), t(LC), t(LR))
    reference = SequenceLogps(t(RC), t(RR), t(LC), t(LR))
    rpo = obj.build_objective(ObjectiveSection(loss="sigmoid", beta=0.1, nll_weight=0.5))
    assert rpo.needs_reference
    assert rpo(policy, reference).losses.item() == pytest.approx(-logsig(0.3) + 0.5 * 2.0)
    simpo = obj.build_objective(ObjectiveSection(loss="simpo", beta=2.0, simpo_gamma=0.5))
    assert not simpo.needs_reference
    assert simpo(policy, None).losses.item() == pytest.approx(1.3132617, abs=1e-6)


OBJECTIVES = {
    "sigmoid": lambda pc, pr, rc, rr, lc, lr: obj.sigmoid(pc, pr, rc, rr, beta=0.3, label_smoothing=0.1),
    "ipo_normalized": lambda pc, pr, rc, rr, lc, lr: obj.ipo(pc, pr, rc, rr, lc, lr, beta=0.5),
    "ipo_summed": lambda pc, pr, rc, rr, lc, lr: obj.ipo(pc, pr, rc, rr, lc, lr, beta=0.5, form="summed"),
    "hinge": lambda pc, pr, rc, rr, lc, lr: obj.hinge(pc, pr, rc, rr, beta=0.05),
    "robust": lambda pc, pr, rc, rr, lc, lr: obj.robust(pc, pr, rc, rr, beta=0.3, label_smoothing=0.2),
    "simpo": lambda pc, pr, rc, rr, lc, lr: obj.simpo(pc, pr, lc, lr, beta=2.0, gamma=0.3),
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_gradient_matches_finite_differences(name):
    torch.manual_seed(0)
    pc, pr = (torch.randn(6, dtype=torch.float64) * 3 - 10).requires_grad_(), (torch.randn(6, dtype=torch.float64) * 3 - 12).requires_grad_()
    rc, rr = torch.randn(6, dtype=torch.float64) * 3 - 10, torch.randn(6, dtype=torch.float64) * 3 - 12
    lc, lr = torch.randint(1, 20, (6,)).double(), torch.randint(1, 20, (6,)).double()
    fn = OBJECTIVES[name]
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, rc, rr, lc, lr).losses, (pc, pr), eps=1e-6, atol=1e-6)


def test_dpo_gradient_weights_wrongly_ranked_pairs_more():
    """The paper's gradient: -β σ(r̂_l - r̂_w) (∇log π(y_w) - ∇log π(y_l))."""
    pc = torch.tensor([-5.0, -5.0], requires_grad=True)
    pr = torch.tensor([-9.0, -1.0])
    out = obj.sigmoid(pc, pr, torch.tensor([-5.0, -5.0]), torch.tensor([-5.0, -5.0]), beta=0.5)
    out.losses.sum().backward()
    expected = -0.5 * torch.sigmoid(torch.tensor([0.5 * (-4.0) - 0.0, 0.5 * 4.0]))
    assert torch.allclose(pc.grad, expected)
    assert abs(pc.grad[1]) > abs(pc.grad[0])  # the pair ranked wrongly pulls harder


def test_unlikelihood_is_token_mean_nll_plus_alpha_token_mean_unlikelihood():
    ur = -0.8  # Σ_t log(1 - p_t) over the 8 rejected tokens
    out = obj.unlikelihood(t(PC), t(PR), t(LC), t(LR), t(ur), alpha=0.5)
    assert out.losses.item() == pytest.approx(10 / 5 + 0.5 * 0.8 / 8)  # 2.05
    assert out.chosen_rewards.item() == pytest.approx(-2.0) and out.rejected_rewards.item() == pytest.approx(-1.75)
    pc, ur_ = t(PC).requires_grad_(), t(ur).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: obj.unlikelihood(a, t(PR), t(LC), t(LR), b, alpha=0.5).losses,
                                    (pc, ur_), eps=1e-6, atol=1e-6)


def test_unlikelihood_term_comes_from_the_rejected_tokens():
    """Σ_t log(1 - p_t) of the rejected completion, from the same forward pass as its log-prob."""
    from dpokit.data.layouts import collate
    from dpokit.data.tokenize import TokenizedPair
    from dpokit.logps import CompletionLogProbs
    from tests.helpers import tiny_llama

    model = tiny_llama(vocab_size=50)
    pair = TokenizedPair((3, 4, 5), (6, 7), (8, 9, 10), "x")
    scorer = CompletionLogProbs(model, unlikelihood=True)
    with torch.no_grad():
        out = scorer(collate([pair], [0], "padded", 0))
        logp = model(input_ids=torch.tensor([[3, 4, 5, 8, 9, 10]])).logits[0].log_softmax(-1)
    p = [logp[2 + j, tok].exp().item() for j, tok in enumerate((8, 9, 10))]
    assert out.rejected_unlikely.item() == pytest.approx(sum(math.log(1 - x) for x in p), abs=1e-5)
    cfg = ObjectiveSection(loss="unlikelihood", unlikelihood_alpha=0.1)
    built = obj.build_objective(cfg)
    assert not built.needs_reference
    expected = -out.chosen / 2 - 0.1 * out.rejected_unlikely / 3
    assert built(out, None).losses.item() == pytest.approx(expected.item())


# ------------------------------------------------------------------------------------ the wider family


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_sigmoid_norm_is_dpo_on_per_token_log_ratios():
    out = obj.sigmoid_norm(t(PC), t(PR), t(RC), t(RR), t(LC), t(LR), beta=0.1)
    assert out.losses.item() == pytest.approx(-logsig(0.1 * (1 / 5 + 2 / 8)), abs=1e-12)  # h = 0.45
    assert out.chosen_rewards.item() == pytest.approx(0.1)


def test_exo_pair_is_kl_to_the_smoothed_label():
    out = obj.exo_pair(t(PC), t(PR), t(RC), t(RR), beta=0.1, label_smoothing=0.01)
    q = sig(0.3)
    assert out.losses.item() == pytest.approx(q * (math.log(q) - math.log(0.99)) + (1 - q) * (math.log(1 - q) - math.log(0.01)))


def test_nca_bco_apo_use_each_side_on_its_own():
    rw, rl = 0.1, -0.2  # β (pc - rc), β (pr - rr)
    assert obj.nca_pair(t(PC), t(PR), t(RC), t(RR), beta=0.1).losses.item() == pytest.approx(
        -logsig(rw) - 0.5 * logsig(-rw) - 0.5 * logsig(-rl))
    assert obj.bco_pair(t(PC), t(PR), t(RC), t(RR), beta=0.1).losses.item() == pytest.approx(-logsig(rw) - logsig(-rl))
    assert obj.apo_zero(t(PC), t(PR), t(RC), t(RR), beta=0.1).losses.item() == pytest.approx(1 - sig(rw) + sig(rl))
    assert obj.apo_down(t(PC), t(PR), t(RC), t(RR), beta=0.1).losses.item() == pytest.approx(sig(rw) + 1 - sig(rw - rl))


def test_sppo_hard_targets_plus_and_minus_half_over_beta():
    # (1 - 5)² + (-2 + 5)²
    assert obj.sppo_hard(t(PC), t(PR), t(RC), t(RR), beta=0.1).losses.item() == pytest.approx(25.0)


def test_aot_compares_sorted_margins():
    pc, pr = torch.tensor([-10.0, -9.0]), torch.tensor([-14.0, -8.0])  # policy margins 4, -1
    rc, rr = torch.tensor([-11.0, -10.0]), torch.tensor([-12.0, -13.0])  # reference margins 1, 3
    paired = obj.aot(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    expected = [-0.9 * logsig(0.5 * d) - 0.1 * logsig(-0.5 * d) for d in (-1 - 1, 4 - 3)]  # sorted against sorted
    assert paired.losses.tolist() == pytest.approx(expected)
    unpaired = obj.aot_unpaired(pc, pr, rc, rr, beta=0.5)
    # chosen log-ratios 1, 1; rejected -2, 5: sorted 1, 1 against -2, 5
    assert unpaired.losses.tolist() == pytest.approx([-logsig(0.5 * 3), -logsig(0.5 * -4)])


def test_discopop_blends_logistic_and_exponential():
    out = obj.discopop(t(PC), t(PR), t(RC), t(RR), beta=0.1, tau=0.05)
    m = sig(0.3 / 0.05)
    assert out.losses.item() == pytest.approx((1 - m) * -logsig(0.3) + m * math.exp(-0.3))


def test_dpop_penalises_chosen_below_reference():
    above = obj.dpop(t(PC), t(PR), t(RC), t(RR), beta=0.1, lam=50.0)  # log π(y_w) > log π_ref(y_w): plain DPO
    assert above.losses.item() == pytest.approx(-logsig(0.3))
    below = obj.dpop(t(-12.0), t(PR), t(RC), t(RR), beta=0.1, lam=50.0)  # 1 nat below: h = -1 + 2 - 50
    assert below.losses.item() == pytest.approx(-logsig(0.1 * (-1 + 2 - 50)))


def test_orpo_is_nll_plus_lambda_odds_ratio():
    out = obj.orpo(t(PC), t(PR), t(LC), t(LR), lam=0.1)
    pw, pl = -10 / 5, -14 / 8  # token-mean log-probs
    log_odds = (pw - math.log(1 - math.exp(pw))) - (pl - math.log(1 - math.exp(pl)))
    assert out.losses.item() == pytest.approx(2.0 - 0.1 * logsig(log_odds), abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.1 * pw)
    # log(1 - P) stays finite as P → 1 and matches log1p(-P) elsewhere
    x = torch.tensor([-1e-9, -0.1, -3.0], dtype=torch.float64)
    assert torch.isfinite(obj._log1mexp(x)).all()
    assert obj._log1mexp(x)[1:].tolist() == pytest.approx([math.log1p(-math.exp(-0.1)), math.log1p(-math.exp(-3.0))])


def test_kto_desirable_and_undesirable_against_the_reference_point():
    ratios = torch.tensor([1.0, -2.0, 0.5])
    desirable = torch.tensor([True, False, False])
    z0 = obj.kto_reference_point(torch.tensor([-5.0, -6.0]), torch.tensor([-5.5, -6.1]))  # mean of 0.5, 0.1
    assert z0.item() == pytest.approx(0.3)
    assert obj.kto_reference_point(torch.tensor([-5.0]), torch.tensor([-4.0])).item() == 0.0  # clamped at 0
    # under torchrun: the mean over every rank's mismatched pairs, not the mean of the ranks' means (TRL 1.16's;
    # the same when every rank has as many pairs)
    other = torch.tensor([0.9 * 3, 3.0])  # another rank's sum of three pairs' log-ratios, and their count
    z0_all = obj.kto_reference_point(torch.tensor([-5.0, -6.0]), torch.tensor([-5.5, -6.1]), lambda t: t + other)
    assert z0_all.item() == pytest.approx((0.5 + 0.1 + 2.7) / 5)
    losses = obj.kto(ratios, desirable, z0, beta=0.1, desirable_weight=1.5, undesirable_weight=0.5)
    assert losses.tolist() == pytest.approx([1.5 * (1 - sig(0.1 * (1 - 0.3))), 0.5 * (1 - sig(0.1 * (0.3 + 2))),
                                             0.5 * (1 - sig(0.1 * (0.3 - 0.5)))])


def test_f_divergence_scores():
    u = torch.tensor([1.0], dtype=torch.float64)
    assert obj.f_divergence_scores(u, "reverse_kl").item() == 1.0
    assert obj.f_divergence_scores(u, "forward_kl").item() == pytest.approx(1 - math.exp(-1))
    assert obj.f_divergence_scores(u, "js").item() == pytest.approx(math.log(2 * math.e / (1 + math.e)))
    assert obj.f_divergence_scores(u, "alpha", 0.5).item() == pytest.approx((math.exp(-0.5) - 1) / -0.5)
    assert obj.f_divergence_scores(u, "alpha", 1.0).item() == 1.0  # the limit: reverse KL


def test_objective_sums_weighted_terms_then_wpo_rpo_and_pair_weights():
    policy = SequenceLogps(t(PC), t(PR), t(LC), t(LR), chosen_wpo=t(-0.5), rejected_wpo=t(-1.0))
    reference = SequenceLogps(t(RC), t(RR), t(LC), t(LR))
    section = ObjectiveSection(loss=["sigmoid", "bco_pair"], loss_weights=[0.8, 0.2], beta=0.1, wpo=True, nll_weight=0.5)
    built = obj.build_objective(section)
    assert built.name == "sigmoid+bco_pair" and built.needs_reference
    out = built(policy, reference, weights=t(2.0))
    mixed = 0.8 * -logsig(0.3) + 0.2 * (-logsig(0.1) - logsig(0.2))
    assert out.losses.item() == pytest.approx(2.0 * (mixed * math.exp(-1.5) + 0.5 * 2.0))
    assert out.chosen_rewards.item() == pytest.approx(0.1)  # the first term's


def test_f_dpo_changes_the_loss_not_the_rewards():
    policy, reference = SequenceLogps(t(PC), t(PR), t(LC), t(LR)), SequenceLogps(t(RC), t(RR), t(LC), t(LR))
    out = obj.build_objective(ObjectiveSection(loss="sigmoid", beta=0.1, f_divergence="forward_kl"))(policy, reference)
    h = (1 - math.exp(-1)) - (1 - math.exp(2))  # f'(u_w) - f'(u_l), u = 1 and -2
    assert out.losses.item() == pytest.approx(-logsig(0.1 * h))
    assert out.rejected_rewards.item() == pytest.approx(-0.2)


def test_ld_dpo_weights_tokens_past_the_shared_length_in_every_layout():
    from dpokit import models
    from dpokit.data.layouts import collate
    from dpokit.data.tokenize import TokenizedPair
    from dpokit.logps import CompletionLogProbs
    from tests.helpers import tiny_llama

    model = tiny_llama(vocab_size=50)
    pairs = [TokenizedPair((3, 4), (6, 7, 8, 9), (10, 11), "a"), TokenizedPair((5,), (12,), (13, 14, 15), "b")]
    plain, ld = CompletionLogProbs(model), CompletionLogProbs(model, ld_alpha=0.25)
    for layout in ("padded", "prefix_shared"):
        models.use_layout(model, layout)
        batch = collate(pairs, [0, 1], layout, 0)
        with torch.no_grad():
            tokens, sums = plain.token_logps(batch), ld(batch)
        per_seq = [tokens[batch.target_seq == s] for s in range(4)]
        shared = [2, 1]  # min(4, 2), min(1, 3)
        expected = [p[: shared[s % 2]].sum() + 0.25 * p[shared[s % 2]:].sum() for s, p in enumerate(per_seq)]
        assert torch.cat([sums.chosen, sums.rejected]).tolist() == pytest.approx([e.item() for e in expected], abs=1e-5)


def test_wpo_log_weights_are_token_means_of_aligned_log_probs():
    from dpokit.data.layouts import collate
    from dpokit.data.tokenize import TokenizedPair
    from dpokit.logps import CompletionLogProbs
    from tests.helpers import tiny_llama

    model = tiny_llama(vocab_size=50)
    pair = TokenizedPair((3, 4), (6, 7, 8), (10, 11), "a")
    with torch.no_grad():
        out = CompletionLogProbs(model, wpo=True)(collate([pair], [0], "padded", 0))
        logp = model(input_ids=torch.tensor([[3, 4, 6, 7, 8]])).logits[0].log_softmax(-1)
    aligned = [logp[1 + j, tok] - torch.logsumexp(2 * logp[1 + j], -1) for j, tok in enumerate((6, 7, 8))]
    assert out.chosen_wpo.item() == pytest.approx(sum(a.item() for a in aligned) / 3, abs=1e-5)
    full = CompletionLogProbs(model, wpo=True, lm_head="full")
    with torch.no_grad():
        assert full(collate([pair], [0], "padded", 0)).chosen_wpo.item() == pytest.approx(out.chosen_wpo.item(), abs=1e-5)


FAMILY = {
    "sigmoid_norm": lambda pc, pr, rc, rr, lc, lr: obj.sigmoid_norm(pc, pr, rc, rr, lc, lr, beta=0.3),
    "exo_pair": lambda pc, pr, rc, rr, lc, lr: obj.exo_pair(pc, pr, rc, rr, beta=0.3, label_smoothing=0.01),
    "nca_pair": lambda pc, pr, rc, rr, lc, lr: obj.nca_pair(pc, pr, rc, rr, beta=0.3),
    "bco_pair": lambda pc, pr, rc, rr, lc, lr: obj.bco_pair(pc, pr, rc, rr, beta=0.3),
    "sppo_hard": lambda pc, pr, rc, rr, lc, lr: obj.sppo_hard(pc, pr, rc, rr, beta=0.3),
    "aot": lambda pc, pr, rc, rr, lc, lr: obj.aot(pc, pr, rc, rr, beta=0.3, label_smoothing=0.1),
    "aot_unpaired": lambda pc, pr, rc, rr, lc, lr: obj.aot_unpaired(pc, pr, rc, rr, beta=0.3),
    "apo_zero": lambda pc, pr, rc, rr, lc, lr: obj.apo_zero(pc, pr, rc, rr, beta=0.3),
    "apo_down": lambda pc, pr, rc, rr, lc, lr: obj.apo_down(pc, pr, rc, rr, beta=0.3),
    "discopop": lambda pc, pr, rc, rr, lc, lr: obj.discopop(pc, pr, rc, rr, beta=0.05, tau=0.5),
    "dpop": lambda pc, pr, rc, rr, lc, lr: obj.dpop(pc, pr, rc, rr, beta=0.3, lam=5.0),
    "orpo": lambda pc, pr, rc, rr, lc, lr: obj.orpo(pc, pr, lc, lr, lam=0.5),
    "f_js": lambda pc, pr, rc, rr, lc, lr: obj.sigmoid(obj.f_divergence_scores(pc - rc, "js"),
                                                       obj.f_divergence_scores(pr - rr, "js"), 0 * rc, 0 * rr, beta=0.3),
    "f_alpha": lambda pc, pr, rc, rr, lc, lr: obj.hinge(obj.f_divergence_scores(pc - rc, "alpha", 0.7),
                                                        obj.f_divergence_scores(pr - rr, "alpha", 0.7), 0 * rc, 0 * rr,
                                                        beta=0.3),
    "kto": lambda pc, pr, rc, rr, lc, lr: obj.ObjectiveOutput(
        obj.kto(pc - rc, torch.arange(6) % 2 == 0, obj.kto_reference_point(pr, rr), beta=0.3), pc, pr),
}


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_family_gradient_matches_finite_differences(name):
    torch.manual_seed(0)
    pc = (torch.randn(6, dtype=torch.float64) - 4).requires_grad_()
    pr = (torch.randn(6, dtype=torch.float64) - 5).requires_grad_()
    rc, rr = torch.randn(6, dtype=torch.float64) - 4, torch.randn(6, dtype=torch.float64) - 5
    lc, lr = torch.randint(1, 20, (6,)).double(), torch.randint(1, 20, (6,)).double()
    fn = FAMILY[name]
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, rc, rr, lc, lr).losses, (pc, pr), eps=1e-6, atol=1e-6)
