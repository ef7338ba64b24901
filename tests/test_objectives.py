"""Each objective against values computed by hand, and its gradient against finite differences."""

import math

import pytest
import torch

from dpokit import objectives as obj
from dpokit.config import ObjectiveSection
from dpokit.logps import SequenceLogps

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
    summed = obj.ipo(t(PC), t(PR), t(RC), t(RR), t(LC), t(LR), beta=0.1, length_normalized=False)
    assert summed.losses.item() == pytest.approx((3 - 5) ** 2)  # (h - 1/(2·0.1))² = 4
    normed = obj.ipo(t(PC), t(PR), t(RC), t(RR), t(LC), t(LR), beta=0.1, length_normalized=True)
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
    "ipo_summed": lambda pc, pr, rc, rr, lc, lr: obj.ipo(pc, pr, rc, rr, lc, lr, beta=0.5, length_normalized=False),
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

    from .conftest import tiny_llama

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
