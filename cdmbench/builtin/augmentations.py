"""Conditioning augmentations of an SR stage's low-res input (CDM section 3): `none`,
`gaussian` (non-truncated or truncated noise augmentation) and `blur`. A recipe may list several
(``cascade.Composition``): they apply in order and their conditioning vectors concatenate.

Levels s are fractions of the conditioning stage's process in [0, 1]: z_s = sqrt(abar(s)) z_0 +
sqrt(1 - abar(s)) eps with that stage's schedule (for a T-step process, s = k / T is its step
k - 1, and abar(k / T) its abar_{k-1}). Conditioning values are on the [0, 1000] scale of the
backbone's timestep embedding, as its noise conditioning is: 1000 s for a level of a discrete
schedule, the noise level ``noise_level_cond(abar(s))`` for a continuous one, 1000 sigma for a
blur width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cdmbench import hookimpl
from cdmbench.diffusion import noise_level_cond, randn_per_image
from cdmbench.interfaces import Schedule

COND_SCALE = 1000.0


class NoAugmentation:
    cond_dim = 0
    truncation = 0.0

    def train(self, z0: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        return z0, z0.new_zeros(len(z0), 0)

    def sample(self, z0: Tensor, *, generators: list[torch.Generator]) -> tuple[Tensor, Tensor]:
        return z0, z0.new_zeros(len(z0), 0)


class GaussianAugmentation:
    """Train on z_s ~ q(z_s | z_0), s ~ U(min_level, max_level) per example. At sampling,
    non-truncated re-noises the previous stage's z_0 to the fixed ``level``; truncated receives
    the previous stage's sampler stopped at ``level`` (``truncation``) and passes z_s on."""

    cond_dim = 1

    def __init__(self, schedule: Schedule, min_level: float, max_level: float, level: float,
                 mode: str):
        self.schedule = schedule
        self.min_level, self.max_level, self.level, self.mode = min_level, max_level, level, mode

    @property
    def truncation(self) -> float:
        return self.level if self.mode == "truncated" else 0.0

    def _cond(self, s: Tensor) -> Tensor:
        """(B, 1) conditioning of levels s (B,): the noise level itself for a continuous schedule,
        so that it means the same whatever grid the previous stage is sampled on."""
        if self.schedule.timesteps is None:
            return noise_level_cond(self.schedule.abar(s.double())).view(-1, 1).float()
        return (s * COND_SCALE).view(-1, 1).float()

    def _noise(self, z0: Tensor, s: Tensor, eps: Tensor) -> Tensor:
        abar = self.schedule.abar(s.double()).float().view(-1, 1, 1, 1)  # on z0's device: no copy to wait for
        return abar.sqrt() * z0 + (1 - abar).sqrt() * eps

    def train(self, z0: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        u = torch.rand(len(z0), generator=generator, device=z0.device)
        s = self.min_level + (self.max_level - self.min_level) * u
        eps = torch.randn(z0.shape, generator=generator, device=z0.device)
        return self._noise(z0, s, eps), self._cond(s)

    def sample(self, z0: Tensor, *, generators: list[torch.Generator]) -> tuple[Tensor, Tensor]:
        s = torch.full((len(z0),), self.level, device=z0.device)
        cond = self._cond(s)
        if self.mode == "truncated":  # z0 is already the previous stage's z_s
            return z0, cond
        return self._noise(z0, s, randn_per_image(tuple(z0.shape[1:]), generators, z0.device)), cond


def gaussian_kernels(sigma: Tensor, size: int) -> Tensor:
    """(B, size, size) normalised Gaussian kernels, one per sigma (B,)."""
    x = torch.arange(size, dtype=torch.float32, device=sigma.device) - (size - 1) / 2
    g = torch.exp(-x**2 / (2 * sigma.view(-1, 1).float() ** 2))
    g = g / g.sum(dim=1, keepdim=True)
    return g[:, :, None] * g[:, None, :]


class BlurAugmentation:
    """Gaussian blur (``size`` x ``size``, sigma ~ U(min_sigma, max_sigma)) of a fraction ``p``
    of the training examples; never at sampling. With ``condition``, 1000 sigma (0 when not
    blurred) is handed to the backbone."""

    truncation = 0.0

    def __init__(self, size: int, min_sigma: float, max_sigma: float, p: float, condition: bool):
        self.size, self.min_sigma, self.max_sigma, self.p = size, min_sigma, max_sigma, p
        self.cond_dim = 1 if condition else 0

    def blur(self, z0: Tensor, sigma: Tensor) -> Tensor:
        """Blur each image with its own sigma (a depthwise convolution, reflect padding)."""
        b, c, h, w = z0.shape
        kernels = gaussian_kernels(sigma, self.size).repeat_interleave(c, dim=0)[:, None]
        padded = F.pad(z0.reshape(1, b * c, h, w), [self.size // 2] * 4, mode="reflect")
        return F.conv2d(padded, kernels.to(z0.dtype), groups=b * c).reshape(b, c, h, w)

    def train(self, z0: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        applied = torch.rand(len(z0), generator=generator, device=z0.device) < self.p
        u = torch.rand(len(z0), generator=generator, device=z0.device)
        sigma = self.min_sigma + (self.max_sigma - self.min_sigma) * u
        out = torch.where(applied.view(-1, 1, 1, 1), self.blur(z0, sigma), z0)
        return out, (torch.where(applied, sigma, 0.0) * COND_SCALE).view(-1, 1)[:, :self.cond_dim]

    def sample(self, z0: Tensor, *, generators: list[torch.Generator]) -> tuple[Tensor, Tensor]:
        return z0, z0.new_zeros(len(z0), self.cond_dim)


def none() -> NoAugmentation:
    return NoAugmentation()


def gaussian(*, schedule: Schedule, min_level: float = 0.0, max_level: float = 0.5,
             level: float = 0.0, mode: str = "nontruncated") -> GaussianAugmentation:
    """Train on s ~ U(min_level, max_level); sample at ``level``, re-noising the previous
    stage's output (``nontruncated``) or stopping its sampler there (``truncated``)."""
    if not 0.0 <= min_level <= max_level <= 1.0:
        raise ValueError(f"need 0 <= min_level <= max_level <= 1, got {min_level}, {max_level}")
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"level must be in [0, 1], got {level}")
    if mode not in ("nontruncated", "truncated"):
        raise ValueError(f"mode must be 'nontruncated' or 'truncated', got {mode!r}")
    if mode == "truncated" and level == 0.0:
        raise ValueError("a truncated augmentation needs level > 0 (the previous stage stops there)")
    return GaussianAugmentation(schedule, min_level, max_level, level, mode)


def blur(*, size: int = 3, min_sigma: float = 0.4, max_sigma: float = 0.6, p: float = 0.5,
         condition: bool = False) -> BlurAugmentation:
    """CDM's blur augmentation for high resolutions (best at 256: sigma ~ U(0.4, 0.6), p 0.5)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"size must be an odd number >= 1, got {size}")
    if not 0.0 < min_sigma <= max_sigma:
        raise ValueError(f"need 0 < min_sigma <= max_sigma, got {min_sigma}, {max_sigma}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    return BlurAugmentation(size, min_sigma, max_sigma, p, condition)


@hookimpl
def cdmbench_register_augmentations(register):
    register("none", none, summary="the low-res image is passed on unchanged")
    register("gaussian", gaussian, summary="Gaussian noise augmentation, non-truncated or truncated; "
                                           "level s conditioned")
    register("blur", blur, summary="Gaussian blur of a fraction p of training inputs, sigma ~ U(a, b); "
                                   "never at sampling")
