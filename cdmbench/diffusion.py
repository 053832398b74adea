"""The Gaussian diffusion process (Ho et al. 2020, "DDPM"; Nichol & Dhariwal 2021, "IDDPM").

All per-step constants are computed in float64 from the betas and gathered per example.
Equation numbers refer to the DDPM paper.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOSSES = ("simple",)


def _gather(values: Tensor, t: Tensor, ndim: int) -> Tensor:
    """values[t] reshaped to broadcast against a (B, ...) tensor with ``ndim`` dims."""
    out = values.to(t.device)[t].float()
    return out.reshape(-1, *([1] * (ndim - 1)))


class GaussianDiffusion:
    """q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0) and the reverse step, for betas beta_1..T.

    ``t`` indexes steps 0..T-1 (step i is DDPM's t = i + 1). ``timestep_map[i]`` is the step of
    the process the model was trained on (differs from i only for a respaced process).
    """

    def __init__(self, betas: Tensor, timestep_map: Tensor | None = None, trained_steps: int | None = None):
        betas = betas.double()
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-d tensor with values in (0, 1]")
        self.betas = betas
        self.T = len(betas)
        self.timestep_map = torch.arange(self.T) if timestep_map is None else timestep_map
        self.trained_steps = trained_steps or self.T
        alphas = 1.0 - betas
        self.abar = torch.cumprod(alphas, 0)
        self.abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.abar[:-1]])
        # Eq. 7: posterior variance beta~_t and the coefficients of its mean.
        self.posterior_var = betas * (1.0 - self.abar_prev) / (1.0 - self.abar)
        self.posterior_logvar = torch.log(torch.cat([self.posterior_var[1:2], self.posterior_var[1:]]))
        self.posterior_coef_x0 = betas * self.abar_prev.sqrt() / (1.0 - self.abar)
        self.posterior_coef_xt = (1.0 - self.abar_prev) * alphas.sqrt() / (1.0 - self.abar)

    def noise_cond(self, t: Tensor) -> Tensor:
        """What the backbone sees of step t: the trained step scaled to [0, 1000) (IDDPM)."""
        return self.timestep_map.to(t.device)[t].float() * (1000.0 / self.trained_steps)

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        return (_gather(self.abar.sqrt(), t, x0.ndim) * x0
                + _gather((1.0 - self.abar).sqrt(), t, x0.ndim) * eps)

    def x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert eq. 4 for x_0 given the noise."""
        return (_gather((1.0 / self.abar).sqrt(), t, x_t.ndim) * x_t
                - _gather((1.0 / self.abar - 1.0).sqrt(), t, x_t.ndim) * eps)

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Eqs. 6-7: mean and log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (_gather(self.posterior_coef_x0, t, x_t.ndim) * x0
                + _gather(self.posterior_coef_xt, t, x_t.ndim) * x_t)
        return mean, _gather(self.posterior_logvar, t, x_t.ndim)

    def p_mean_logvar(self, eps: Tensor, x_t: Tensor, t: Tensor, *, variance: str = "fixed-small",
                      clip_x0: bool = True) -> tuple[Tensor, Tensor]:
        """The reverse step p(x_{t-1} | x_t) from an eps prediction.

        variance: ``fixed-small`` (beta~_t) or ``fixed-large`` (beta_t, with beta~_1 at t = 1).
        """
        x0 = self.x0_from_eps(x_t, t, eps)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
        mean, logvar = self.q_posterior(x0, x_t, t)
        if variance == "fixed-large":
            large = torch.log(torch.cat([self.posterior_var[1:2], self.betas[1:]]))
            logvar = _gather(large, t, x_t.ndim)
        elif variance != "fixed-small":
            raise ValueError(f"unknown variance {variance!r}; use 'fixed-small' or 'fixed-large'")
        return mean, logvar

    def respaced(self, steps: int) -> GaussianDiffusion:
        """The process restricted to ``steps`` evenly spaced steps (IDDPM section 4).

        The kept steps keep their abar; betas are recomputed as 1 - abar_k / abar_{k-1}.
        """
        if not 1 <= steps <= self.T:
            raise ValueError(f"cannot respace a {self.T}-step process to {steps} steps; "
                             f"choose 1..{self.T}")
        kept = torch.linspace(0, self.T - 1, steps).round().long()
        abar = self.abar[kept]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return GaussianDiffusion(1.0 - abar / abar_prev, timestep_map=self.timestep_map[kept],
                                 trained_steps=self.trained_steps)


def simple_loss(prediction: Tensor, eps: Tensor) -> Tensor:
    """L_simple (DDPM eq. 14): mean squared error of the eps prediction, per example."""
    return (prediction.float() - eps.float()).pow(2).flatten(1).mean(1)
