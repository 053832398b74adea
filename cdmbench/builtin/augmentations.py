"""Conditioning augmentations `none` and `gaussian` (CDM section 3: noise augmentation).

Levels s are fractions of the conditioning stage's process in [0, 1]: z_s = sqrt(abar(s)) z_0 +
sqrt(1 - abar(s)) eps with that stage's schedule, and the backbone sees s on the same [0, 1000]
scale as its own timestep.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cdmbench import hookimpl
from cdmbench.builtin.samplers import randn_per_image
from cdmbench.interfaces import Schedule


class NoAugmentation:
    cond_dim = 0

    def train(self, z0: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        return z0, z0.new_zeros(len(z0), 0)

    def sample(self, z0: Tensor, *, generators: list[torch.Generator]) -> tuple[Tensor, Tensor]:
        return z0, z0.new_zeros(len(z0), 0)


class GaussianAugmentation:
    """Non-truncated Gaussian noise augmentation: z_s ~ q(z_s | z_0), s fed to the backbone."""

    cond_dim = 1

    def __init__(self, schedule: Schedule, min_level: float, max_level: float, level: float):
        self.schedule = schedule
        self.min_level, self.max_level, self.level = min_level, max_level, level

    def _noise(self, z0: Tensor, s: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        abar = self.schedule.abar(s.double().cpu()).to(z0.device, torch.float32).view(-1, 1, 1, 1)
        return abar.sqrt() * z0 + (1 - abar).sqrt() * eps, (s * 1000.0).view(-1, 1).float()

    def train(self, z0: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        # One level per example, s ~ U(min_level, max_level).
        u = torch.rand(len(z0), generator=generator, device=z0.device)
        s = self.min_level + (self.max_level - self.min_level) * u
        eps = torch.randn(z0.shape, generator=generator, device=z0.device)
        return self._noise(z0, s, eps)

    def sample(self, z0: Tensor, *, generators: list[torch.Generator]) -> tuple[Tensor, Tensor]:
        s = torch.full((len(z0),), self.level, device=z0.device)
        return self._noise(z0, s, randn_per_image(tuple(z0.shape[1:]), generators, z0.device))


def none() -> NoAugmentation:
    return NoAugmentation()


def gaussian(*, schedule: Schedule, min_level: float = 0.0, max_level: float = 0.5,
             level: float = 0.0) -> GaussianAugmentation:
    """Train on s ~ U(min_level, max_level); sample at the fixed ``level``."""
    if not 0.0 <= min_level <= max_level <= 1.0:
        raise ValueError(f"need 0 <= min_level <= max_level <= 1, got {min_level}, {max_level}")
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"level must be in [0, 1], got {level}")
    return GaussianAugmentation(schedule, min_level, max_level, level)


@hookimpl
def cdmbench_register_augmentations(register):
    register("none", none, summary="the low-res image is passed on unchanged")
    register("gaussian", gaussian,
             summary="non-truncated Gaussian noise augmentation: z_s ~ q(z_s | z_0), level s conditioned")
