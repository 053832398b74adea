"""Post-hoc EMA's maths against closed forms and a directly computed EMA (EDM2 section 3)."""

import math

import numpy as np
import pytest
import torch

from cdmbench.training.posthoc_ema import (
    PowerEMA,
    gamma_of,
    posthoc_coefficients,
    profile_dot,
    sigma_rel_of,
    step_weights,
)


def test_sigma_rel_and_gamma_are_each_others_inverse_and_match_edm2():
    assert gamma_of(0.05) == pytest.approx(16.97, abs=0.005)  # EDM2's stored profiles
    assert gamma_of(0.10) == pytest.approx(6.94, abs=0.005)
    for sigma_rel in (0.01, 0.05, 0.1, 0.2, 0.28):
        assert sigma_rel_of(gamma_of(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)
    for gamma in (0.5, 3.0, 6.94, 50.0):
        assert gamma_of(sigma_rel_of(gamma)) == pytest.approx(gamma, rel=1e-9)
    # the profile (gamma + 1) x^gamma on [0, 1]: its standard deviation by quadrature
    x = (np.arange(200_000) + 0.5) / 200_000
    p = 7.94 * x**6.94 / 200_000
    assert math.sqrt((p * x**2).sum() - (p * x).sum() ** 2) == pytest.approx(sigma_rel_of(6.94), rel=1e-6)
    with pytest.raises(ValueError, match=r"sigma_rel must lie in \(0, 0.2887\)"):
        gamma_of(0.3)


def test_the_recursion_weighs_each_step_as_the_profile_says():
    """Fed the unit vector e_tau at step tau, the EMA is its weights over the steps."""
    t = 50
    theta = torch.zeros(t, dtype=torch.float64)
    ema = PowerEMA([theta], [0.0, 6.94])
    for tau in range(1, t + 1):
        theta.zero_()[tau - 1] = 1
        ema.update(tau)
    for gamma, [average] in zip(ema.gammas, ema.averages, strict=True):
        np.testing.assert_allclose(average.numpy(), step_weights(t, gamma), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(step_weights(t, 0.0), np.full(t, 1 / t))  # gamma 0: the plain average


def test_profile_inner_products_match_quadrature():
    x = (np.arange(400_000) + 0.5) / 400_000 * 300

    def profile(t, gamma):
        return np.where(x < t, (gamma + 1) * (x / t) ** gamma / t, 0.0)

    for (t_a, g_a), (t_b, g_b) in [((300, 6.94), (200, 16.97)), ((120, 3.0), (120, 3.0)), ((50, 0.5), (300, 9.0))]:
        quadrature = (profile(t_a, g_a) * profile(t_b, g_b)).sum() * 300 / 400_000
        assert profile_dot(t_a, g_a, t_b, g_b) == pytest.approx(quadrature, rel=1e-4)
        assert profile_dot(t_a, g_a, t_b, g_b) == profile_dot(t_b, g_b, t_a, g_a)
    assert math.isfinite(profile_dot(1e6, 200.0, 1e3, 200.0))  # no overflow of t^gamma


def test_an_ema_reconstructed_from_snapshots_matches_the_directly_computed_one():
    """A drifting random walk of 4000 steps; snapshots every 100 steps of the sigma_rel 0.05 and
    0.10 EMAs (EDM2's pair). The EMA of sigma_rel 0.07 (between them) and 0.12 (just outside)
    rebuilt at the last step: its profile within 0.2 % of the target's (measured 0.06 %) and
    the weights within 1e-4 of their distance from the raw weights (measured 2e-5)."""
    torch.manual_seed(0)
    steps, every = 4000, 100
    theta = torch.zeros(512, dtype=torch.float64)
    stored = PowerEMA([theta], [gamma_of(0.05), gamma_of(0.10)])
    targets = [gamma_of(0.07), gamma_of(0.12)]
    direct = PowerEMA([theta], targets)
    drift = torch.randn(512, dtype=torch.float64) * 0.01
    snapshots = []
    for t in range(1, steps + 1):
        theta.add_(torch.randn(512, dtype=torch.float64) * 0.1 + drift)
        stored.update(t)
        direct.update(t)
        if t % every == 0:
            snapshots += [(t, gamma, average[0].clone()) for gamma, average in zip(stored.gammas, stored.averages,
                                                                                    strict=True)]
    for gamma, [want] in zip(targets, direct.averages, strict=True):
        x = posthoc_coefficients([(t, g) for t, g, _ in snapshots], (steps, gamma))
        rebuilt = sum(float(c) * v for c, (_, _, v) in zip(x, snapshots, strict=True))
        profile = sum(c * np.pad(step_weights(t, g), (0, steps - t)) for c, (t, g, _) in zip(x, snapshots,
                                                                                             strict=True))
        target = step_weights(steps, gamma)
        assert np.linalg.norm(profile - target) / np.linalg.norm(target) < 2e-3
        assert ((rebuilt - want).norm() / (want - theta).norm()).item() < 1e-4
