"""Theorem 4.1 as a property test: a tabular softmax bandit trained by natural policy gradient.

NPG on a softmax bandit is θ ← θ + η·A(a), A(a) = r(a) − E_π[r]. Extrapolating the trained logits,
θ_γ = θ_T + γ(θ_T − θ_0), does not decrease the expected reward J(γ) = Σ_a softmax(θ_γ)_a r(a) for
small γ > 0, and leaves it unchanged only when r is constant. Independent check of the slope:
θ_T − θ_0 = ηT·r + c·1, so dJ/dγ at 0 = Cov_{π_T}(r, θ_T − θ_0) = ηT·Var_{π_T}(r).
The extrapolated policy is also Eq. 7 (`extrapolated_log_softmax`) applied to π_T and π_0.
"""

import numpy as np
import pytest
import torch

from verl_ext.core.distributions import extrapolated_log_softmax


def train_npg(theta0, reward, eta, steps):
    theta = theta0.clone()
    for _ in range(steps):
        pi = torch.softmax(theta, -1)
        theta = theta + eta * (reward - (pi * reward).sum())
    return theta


def expected_reward(theta, reward):
    return float((torch.softmax(theta, -1) * reward).sum())


CASES = [(seed, n_arms) for seed in range(40) for n_arms in (2, 5, 17)]


@pytest.mark.parametrize("seed,n_arms", CASES[::3] + CASES[1::7])
def test_extrapolation_does_not_decrease_reward(seed, n_arms):
    g = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(n_arms, generator=g, dtype=torch.float64) * 2
    reward = torch.randint(0, 2, (n_arms,), generator=g).to(torch.float64) if seed % 2 else torch.rand(
        n_arms, generator=g, dtype=torch.float64)
    if reward.std() == 0:
        reward[0] = 1 - reward[0]
    eta, steps = float(torch.empty(1).uniform_(0.05, 1.0, generator=g)), int(torch.randint(1, 30, (1,), generator=g))
    theta_t = train_npg(theta0, reward, eta, steps)
    j0 = expected_reward(theta_t, reward)
    js = [expected_reward(theta_t + gam * (theta_t - theta0), reward) for gam in (1e-3, 1e-2, 0.05, 0.1)]
    assert all(j >= j0 - 1e-12 for j in js)
    pi_t = torch.softmax(theta_t, -1)
    var = float((pi_t * (reward - (pi_t * reward).sum()) ** 2).sum())
    slope = (js[0] - j0) / 1e-3
    assert slope == pytest.approx(eta * steps * var, rel=2e-2, abs=1e-9)
    if var > 1e-8:
        assert js[1] > j0
    # the same policy through Eq. 7: log π_Extra = (1+γ) log π_T − γ log π_0 − log Z
    gam = 0.1
    extra = extrapolated_log_softmax(torch.log_softmax(theta_t, -1), torch.log_softmax(theta0, -1), gam)
    np.testing.assert_allclose(extra.exp().numpy(), torch.softmax(theta_t + gam * (theta_t - theta0), -1).numpy(),
                               rtol=1e-10, atol=1e-14)


def test_constant_reward_leaves_reward_unchanged():
    g = torch.Generator().manual_seed(0)
    theta0 = torch.randn(6, generator=g, dtype=torch.float64)
    reward = torch.full((6,), 0.7, dtype=torch.float64)
    theta_t = train_npg(theta0, reward, 0.5, 10)
    torch.testing.assert_close(theta_t, theta0)  # zero advantages: NPG does not move
    for gam in (0.01, 0.1, 1.0):
        assert expected_reward(theta_t + gam * (theta_t - theta0), reward) == pytest.approx(0.7, abs=1e-12)


def test_property_is_not_vacuous_for_a_non_npg_direction():
    """An arbitrary direction (not an NPG result) can decrease the reward: the check has teeth."""
    reward = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    theta0 = torch.zeros(3, dtype=torch.float64)
    theta_t = torch.tensor([-1.0, 0.5, 0.5], dtype=torch.float64)
    assert expected_reward(theta_t + 0.1 * (theta_t - theta0), reward) < expected_reward(theta_t, reward)
