"""An isotropic Gaussian mixture with its exact denoiser: the closed-form test bed for samplers.

For x_0 ~ sum_k w_k N(mu_k, sigma_k^2 I) and x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps, the
marginal q(x_t) is the mixture with means sqrt(abar) mu_k and variances abar sigma_k^2 + 1 - abar,
and the optimal (MMSE) prediction is E[x_0 | x_t] = sum_k r_k(x_t) (mu_k + sqrt(abar) sigma_k^2
(x_t - sqrt(abar) mu_k) / (abar sigma_k^2 + 1 - abar)), r_k the posterior component weights.
Points are image-shaped (B, d, 1, 1) so the samplers run on them unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cdmbench.diffusion.process import Prediction, eps_from_x0


@dataclass
class GaussianMixture:
    weights: Tensor  # (K,)
    means: Tensor    # (K, d)
    stds: Tensor     # (K,)

    @classmethod
    def default(cls) -> GaussianMixture:
        """Three unequal, well separated 2-d components inside [-1, 1]."""
        return cls(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
                   torch.tensor([[-0.5, -0.3], [0.5, -0.4], [0.0, 0.55]], dtype=torch.float64),
                   torch.tensor([0.12, 0.08, 0.15], dtype=torch.float64))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def at(self, abar: float) -> GaussianMixture:
        """The marginal q(x_t) at level abar."""
        return GaussianMixture(self.weights, math.sqrt(abar) * self.means,
                               (abar * self.stds**2 + 1 - abar).sqrt())

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k, None] * z).float()

    def responsibilities(self, x: Tensor) -> Tensor:
        """r_k(x) = P(component k | x), for points x (n, d)."""
        x = x.double().reshape(len(x), self.dim)
        var = self.stds**2
        sq = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)
        log_p = self.weights.log() - 0.5 * self.dim * var.log() - sq / (2 * var)
        return torch.softmax(log_p, dim=1)

    def mean(self) -> Tensor:
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        second = sum(w * (s**2 * torch.eye(self.dim, dtype=torch.float64) + torch.outer(m, m))
                     for w, m, s in zip(self.weights, self.means, self.stds, strict=True))
        return second - torch.outer(self.mean(), self.mean())

    def denoise(self, x_t: Tensor, abar: Tensor, noise_cond: Tensor) -> Prediction:
        """The exact denoiser, in the ``Denoise`` interface of the samplers."""
        a = abar.double().reshape(-1, 1)
        x = x_t.double().reshape(len(x_t), self.dim)
        var = a * self.stds**2 + 1 - a  # (B, K)
        sq = ((x[:, None, :] - a.sqrt()[:, :, None] * self.means[None]) ** 2).sum(-1)
        r = torch.softmax(self.weights.log() - 0.5 * self.dim * var.log() - sq / (2 * var), dim=1)
        gain = (a.sqrt() * self.stds**2 / var)[:, :, None]  # (B, K, 1)
        x0_k = self.means[None] + gain * (x[:, None, :] - a.sqrt()[:, :, None] * self.means[None])
        x0 = (r[:, :, None] * x0_k).sum(1).to(x_t.dtype).reshape(x_t.shape)
        return Prediction(x0, eps_from_x0(x_t, abar, x0))

    def sliced_wasserstein(self, samples: Tensor, exact: Tensor, *, projections: int = 256,
                           seed: int = 0) -> float:
        """The sliced 2-Wasserstein distance between ``samples`` and as many ``exact`` samples
        (n, d, ...): the root mean, over random unit directions, of the squared W2 between the
        two projections, which for equal counts pairs their sorted values (Rabin et al. 2011)."""
        x, y = (v.double().reshape(len(v), self.dim) for v in (samples, exact))
        if len(x) != len(y):
            raise ValueError(f"the sliced Wasserstein distance here pairs equal counts, got {len(x)} and {len(y)}")
        theta = torch.randn(self.dim, projections, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        theta = theta / theta.norm(dim=0)
        gap = (x @ theta).sort(dim=0).values - (y @ theta).sort(dim=0).values
        return gap.pow(2).mean().sqrt().item()

    def errors(self, samples: Tensor) -> dict[str, float]:
        """How far samples (n, d, ...) are from this mixture: mean error ||m - mu||, covariance
        error ||C - Sigma||_F, and the total-variation distance between the component weights
        and the samples' mean posterior weights (unbiased: E_x[r_k(x)] = w_k)."""
        x = samples.double().reshape(len(samples), self.dim)
        weights = self.responsibilities(x).mean(0)
        return {"mean_error": (x.mean(0) - self.mean()).norm().item(),
                "cov_error": (torch.cov(x.T) - self.covariance()).norm().item(),
                "weight_error": 0.5 * (weights - self.weights).abs().sum().item()}
