"""dpokit.rl against hand computations: GAE, whitening, the clipped losses, KL-shaped rewards, the controller."""

import pytest
import torch

from dpokit import rl


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual.double(), t(expected), rtol=1e-9, atol=1e-9)


def test_gae_by_hand():
    """γ = 0.9, λ = 0.8; the second completion has 2 tokens and a padding column that must not count."""
    rewards = t([[1.0, 0.0, 2.0], [0.5, 1.0, 99.0]])
    values = t([[0.5, 1.0, 1.5], [0.2, 0.4, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    adv, ret = rl.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: δ2 = 2 − 1.5 = 0.5; δ1 = 0 + 0.9·1.5 − 1 = 0.35; δ0 = 1 + 0.9·1 − 0.5 = 1.4
    #        A2 = 0.5, A1 = 0.35 + 0.72·0.5 = 0.71, A0 = 1.4 + 0.72·0.71 = 1.9112
    # row 1: δ1 = 1 − 0.4 = 0.6 (nothing after the last token); δ0 = 0.5 + 0.9·0.4 − 0.2 = 0.66
    #        A1 = 0.6, A0 = 0.66 + 0.72·0.6 = 1.092
    close(adv, [[1.9112, 0.71, 0.5], [1.092, 0.6, 0.0]])
    close(ret, [[2.4112, 1.71, 2.0], [1.292, 1.0, 0.0]])


def test_gae_with_gamma_and_lambda_one_is_the_monte_carlo_return_minus_the_value():
    rewards, values = t([[0.1, -0.2, 0.3, 1.0]]), t([[0.4, 0.3, 0.2, 0.1]])
    adv, ret = rl.gae(rewards, values, torch.ones(1, 4, dtype=torch.bool), gamma=1.0, lam=1.0)
    close(ret, [[1.2, 1.1, 1.3, 1.0]])
    close(adv, [[0.8, 0.8, 1.1, 0.9]])


def test_whiten_uses_the_masked_elements_only():
    x, mask = t([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]]), torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    std = (5.0 / 3.0) ** 0.5  # unbiased variance of 1, 2, 3, 4
    out = rl.whiten(x, mask, eps=0.0)
    close(out, [[-1.5 / std, -0.5 / std, 0.5 / std], [1.5 / std, 0.0, 0.0]])
    kept = rl.whiten(x, mask, shift_mean=False, eps=0.0)
    close(kept, [[2.5 - 1.5 / std, 2.5 - 0.5 / std, 2.5 + 0.5 / std], [2.5 + 1.5 / std, 0, 0]])


@pytest.mark.parametrize("advantage, ratio, loss, clipped", [
    (1.0, 1.1, -1.1, 0.0),   # inside the clip range: the plain surrogate
    (1.0, 1.5, -1.2, 1.0),   # a good action pushed past 1 + ε: clipped, no gradient
    (1.0, 0.5, -0.5, 0.0),   # a good action made less likely: unclipped (pessimistic bound)
    (-1.0, 0.5, 0.8, 1.0),   # a bad action pushed below 1 − ε: clipped
    (-1.0, 1.5, 1.5, 0.0),   # a bad action made more likely: unclipped
    (-2.0, 0.9, 1.8, 0.0),   # inside
])
def test_clipped_policy_loss(advantage, ratio, loss, clipped):
    logps = torch.tensor([0.3 + torch.log(torch.tensor(ratio)).item()], dtype=torch.float64, requires_grad=True)
    old = t([0.3])
    out, was_clipped = rl.policy_loss(logps, old, t([advantage]), clip_range=0.2)
    assert out.item() == pytest.approx(loss) and was_clipped.item() == clipped
    out.sum().backward()
    # d/dlogπ of −A·ρ is −A·ρ; a clipped token gets none
    assert logps.grad.item() == pytest.approx(0.0 if clipped else -advantage * ratio)


def test_clipped_value_loss():
    values = t([2.0, 1.1, 0.0])
    old = t([1.0, 1.0, 0.5])
    returns = t([3.0, 0.0, 0.4])
    loss, clipped = rl.value_loss(values, old, returns, clip_range=0.2)
    # 1: unclipped (2−3)² = 1, V_clip = 1.2 → (1.2−3)² = 3.24: the larger, clipped → ½·3.24
    # 2: V − V_old = 0.1 inside the range: ½·1.21
    # 3: unclipped (0−0.4)² = 0.16, V_clip = 0.3 → 0.01: the unclipped is larger → ½·0.16
    assert loss.tolist() == pytest.approx([1.62, 0.605, 0.08])
    assert clipped.tolist() == [1.0, 0.0, 0.0]
    plain, none = rl.value_loss(values, old, returns, clip_range=None)
    assert plain.tolist() == pytest.approx([0.5, 0.605, 0.08]) and none.sum() == 0


def test_kl_shaped_rewards_and_the_missing_eos_penalty():
    logps = t([[-1.0, -2.0, -0.5], [-1.0, -1.0, -3.0]])
    ref = t([[-1.5, -1.0, -0.5], [-2.0, -1.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    scores = rl.penalize_missing_eos(t([2.0, -1.0]), torch.tensor([True, False]), penalty=1.0)
    assert scores.tolist() == [2.0, -2.0]
    rewards, kl = rl.kl_shaped_rewards(scores, logps, ref, mask, kl_coef=0.1)
    # per-token KL: [0.5, −1, 0] and [1, 0, (padding)]; r_t = −0.1·KL_t, the score added at the last token
    close(kl, [[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]])
    close(rewards, [[-0.05, 0.1, 2.0], [-0.1, -2.0, 0.0]])
    # Σ_t r_t = score − β·KL̂
    assert rewards.sum(1).tolist() == pytest.approx([2.0 - 0.1 * -0.5, -2.0 - 0.1 * 1.0])
    assert rl.penalize_missing_eos(t([1.0]), torch.tensor([False]), None).tolist() == [1.0]


def test_adaptive_kl_controller():
    # KL above the target: the error is clipped at 0.2, β grows by 0.2·n/horizon
    assert rl.adaptive_kl_coef(0.1, 9.0, target=6.0, horizon=100, batch_size=10) == pytest.approx(0.102)
    # below it: e = 5.4/6 − 1 = −0.1, β shrinks by 1%
    assert rl.adaptive_kl_coef(0.1, 5.4, target=6.0, horizon=100, batch_size=10) == pytest.approx(0.099)
    assert rl.adaptive_kl_coef(0.1, 6.0, target=6.0, horizon=100, batch_size=10) == pytest.approx(0.1)


def test_approx_kl():
    assert rl.approx_kl(t([-1.0, -2.0]), t([-1.5, -2.0])).tolist() == pytest.approx([0.125, 0.0])
