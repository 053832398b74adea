"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2 section 3): power-function EMAs kept while training, and an EMA of any length
reconstructed after training from their snapshots.

A power-function EMA with exponent gamma updates at step t = 1, 2, ... as

    theta_hat_t = beta_t theta_hat_{t-1} + (1 - beta_t) theta_t,   beta_t = (1 - 1/t)^(gamma + 1),

which weighs step tau <= t by exactly (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1): the
integral over [tau - 1, tau] of the profile p_t(x) = (gamma + 1) x^gamma / t^(gamma+1) on [0, t].
Its length is sigma_rel, the profile's standard deviation over t:
sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)).

A snapshot stored at step t_i of the EMA with exponent gamma_i has profile p_i; the EMA of
exponent gamma at step t is approximated by the combination sum_i x_i snapshot_i whose profile
is closest to p in L2 on [0, infinity): x solves A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p>,
inner products in closed form (``profile_dot``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

MAX_SIGMA_REL = math.sqrt(1 / 12)  # gamma = 0, the plain average; longer needs gamma < 0


def sigma_rel_of(gamma: float) -> float:
    """The relative standard deviation of the power-function profile of exponent ``gamma``."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_of(sigma_rel: float) -> float:
    """The exponent gamma > 0 whose profile has ``sigma_rel``: the largest real root of
    sigma^2 (gamma + 2)^2 (gamma + 3) - (gamma + 1), a cubic in gamma."""
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must lie in (0, {MAX_SIGMA_REL:.4f}) (the plain average of all "
                         f"steps); got {sigma_rel}")
    s2 = sigma_rel**2
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def profile_dot(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """<p_a, p_b> = integral over [0, min(t_a, t_b)] of the two profiles' product, written with
    the ratio of the steps (<= 1) so that t^gamma cannot overflow."""
    if t_a > t_b:
        t_a, gamma_a, t_b, gamma_b = t_b, gamma_b, t_a, gamma_a
    return (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * t_b) * (t_a / t_b) ** gamma_b


def posthoc_coefficients(stored: Sequence[tuple[float, float]], target: tuple[float, float]) -> np.ndarray:
    """The coefficients x of the snapshots ``stored`` ((step, gamma) each) whose combination's
    profile is closest to the EMA ``target`` (step, gamma): the least-squares solution of
    A x = b (A may be singular when two snapshots share a profile)."""
    a = np.array([[profile_dot(*p, *q) for q in stored] for p in stored])
    b = np.array([profile_dot(*p, *target) for p in stored])
    return np.linalg.lstsq(a, b, rcond=None)[0]


def step_weights(t: int, gamma: float) -> np.ndarray:
    """The weight of each step 1..t in the EMA of exponent ``gamma`` at step ``t`` (sums to 1)."""
    tau = np.arange(t + 1, dtype=np.float64) / t
    cumulative = tau ** (gamma + 1)
    return np.diff(cumulative)


class PowerEMA:
    """Power-function EMAs of ``params``, one per exponent in ``gammas``, updated each step."""

    def __init__(self, params: Iterable[Tensor], gammas: Sequence[float]):
        self.params = list(params)
        self.gammas = list(gammas)
        self.averages = [[p.detach().clone() for p in self.params] for _ in self.gammas]

    @torch.no_grad()
    def update(self, t: int) -> None:
        """Fold in the parameters after training step ``t`` (1-based)."""
        current = [p.detach() for p in self.params]
        for gamma, average in zip(self.gammas, self.averages, strict=True):
            torch._foreach_lerp_(average, current, 1 - (1 - 1 / t) ** (gamma + 1))
