"""Sampler `ddpm`: ancestral sampling of the reverse process (DDPM algorithm 2)."""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from cdmbench import hookimpl
from cdmbench.diffusion import GaussianDiffusion
from cdmbench.interfaces import ModelFn


def randn_per_image(shape: tuple[int, ...], generators: list[torch.Generator],
                    device: torch.device | str) -> Tensor:
    """One standard normal draw of ``shape`` per image, each from that image's own generator,
    so an image does not depend on the batch it is drawn in."""
    return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators]).to(device)


class DDPMSampler:
    def __init__(self, steps: int | None, variance: str):
        self.steps, self.variance = steps, variance

    @torch.no_grad()
    def sample(self, *, model_fn: ModelFn, diffusion: GaussianDiffusion, shape: tuple[int, ...],
               generators: list[torch.Generator], device: torch.device | str = "cpu",
               progress: bool = True) -> Tensor:
        process = diffusion.respaced(self.steps) if self.steps else diffusion
        x = randn_per_image(shape, generators, device)
        for i in tqdm(range(process.T - 1, -1, -1), desc="ddpm", leave=False, disable=not progress):
            t = torch.full((len(generators),), i, device=device, dtype=torch.long)
            eps = model_fn(x, process.noise_cond(t)).float()
            mean, logvar = process.p_mean_logvar(eps, x, t, variance=self.variance)
            x = mean if i == 0 else mean + (0.5 * logvar).exp() * randn_per_image(shape, generators, device)
        return x.clamp(-1.0, 1.0)


def ddpm(*, steps: int | None = None, variance: str = "fixed-small") -> DDPMSampler:
    """Ancestral sampling; ``steps`` respaces the trained process (None = all T steps)."""
    if variance not in ("fixed-small", "fixed-large"):
        raise ValueError(f"variance must be 'fixed-small' or 'fixed-large', got {variance!r}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1 or null (all trained steps), got {steps}")
    return DDPMSampler(steps, variance)


@hookimpl
def cdmbench_register_samplers(register):
    register("ddpm", ddpm, summary="DDPM ancestral sampling, fixed-small or fixed-large variance, respaced steps")
