"""Samplers `ddpm` (ancestral), `ddim` and `dpm-solver-2m` (DPM-Solver++ 2M).

All walk a process's ``Grid`` from pure noise to clean data (or to an early-stop level s, where
they return z_s), call the denoiser once per grid level, and draw every random number from the
image's own generator, so an image does not depend on its batch. Every sampler takes the grid's
spacing (``cdmbench.diffusion.spacing``): ``spacing`` uniform-t (default), log-snr or edm (with
``rho``, default 7), and for uniform-t a sampling ``schedule`` ``{name, args}`` of the built-in
schedules, apart from the one the stage was trained on.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from cdmbench import hookimpl
from cdmbench.builtin.schedules import FACTORIES as SCHEDULES
from cdmbench.diffusion import Denoise, Prediction, Process, Spacing, posterior, randn_per_image

VARIANCES = ("fixed-small", "fixed-large", "learned")


class GridSampler:
    """The loop shared by all samplers; subclasses define one jump ``step`` between levels."""

    name = "sampler"

    def __init__(self, *, steps: int | None, clip_x0: bool, spacing: Spacing):
        self.steps, self.clip_x0, self.spacing = steps, clip_x0, spacing

    def check(self, process: Process, *, learned_variance: bool, stop_at: float = 0.0) -> None:
        """Raise ValueError (what to change) when this sampler cannot sample ``process`` (down
        to level ``stop_at``)."""
        process.grid(self.steps, stop_at, self.spacing)

    @torch.no_grad()
    def sample(self, *, denoise: Denoise, process: Process, shape: tuple[int, ...],
               generators: list[torch.Generator], device: torch.device | str = "cpu",
               stop_at: float = 0.0, progress: bool = True) -> Tensor:
        """x_0 in [-1, 1] of shape (B, *shape), or z_s at level ``stop_at`` > 0 (unclipped)."""
        grid = process.grid(self.steps, stop_at, self.spacing)
        x = randn_per_image(shape, generators, device)
        history: list[Prediction] = []
        n = len(generators)
        noise_cond = grid.noise_cond.to(device)  # once: a copy per step would wait for the GPU
        for i in tqdm(range(grid.steps), desc=self.name, leave=False, disable=not progress):
            abar_t = grid.abar[i].item()  # grid.abar stays on the CPU: reading it waits for nothing
            pred = denoise(x, torch.full((n,), abar_t, device=device, dtype=torch.float64),
                           noise_cond[i].expand(n))
            if self.clip_x0:
                pred = pred.clipped(x, abar_t)
            history.append(pred)
            x = self.step(x, history, grid, i, generators)
            del history[:-2]  # multistep solvers need the last two predictions at most
        return x.clamp(-1.0, 1.0) if stop_at == 0 else x

    def step(self, x: Tensor, history: list[Prediction], grid, i: int,
             generators: list[torch.Generator]) -> Tensor:
        raise NotImplementedError


def _noise(x: Tensor, generators: list[torch.Generator]) -> Tensor:
    return randn_per_image(tuple(x.shape[1:]), generators, x.device)


class DDPM(GridSampler):
    """Ancestral sampling (DDPM algorithm 2) on a respaced grid: x_s ~ N(mu~(x_t, x_0), Sigma)
    with Sigma = beta~ (fixed-small), beta (fixed-large) or the model's interpolation (learned)."""

    name = "ddpm"

    def __init__(self, *, steps: int | None, variance: str, clip_x0: bool, spacing: Spacing):
        super().__init__(steps=steps, clip_x0=clip_x0, spacing=spacing)
        self.variance = variance

    def check(self, process: Process, *, learned_variance: bool, stop_at: float = 0.0) -> None:
        super().check(process, learned_variance=learned_variance, stop_at=stop_at)
        if self.variance == "learned" and not learned_variance:
            raise ValueError("variance 'learned' needs a model that learns its variance "
                             "(loss: hybrid); use fixed-small or fixed-large")
        if learned_variance and self.variance != "learned":
            raise ValueError(f"this model learns its variance (loss: hybrid) but variance "
                             f"'{self.variance}' ignores it; set the sampler's variance: learned "
                             "(or use ddim / dpm-solver-2m, which need only the mean)")

    def step(self, x, history, grid, i, generators):
        pred = history[-1]
        abar_t, abar_s = grid.abar[i].item(), grid.abar[i + 1].item()
        mean, var = posterior(pred.x0, x, abar_t, abar_s)
        if abar_s == 1.0:  # the last jump to clean data: the posterior is a point mass at x_0
            return mean
        beta = 1 - abar_t / abar_s
        if self.variance == "fixed-small":
            logvar = math.log(var)
        elif self.variance == "fixed-large":
            logvar = math.log(beta)
        else:
            if pred.var_frac is None:
                raise ValueError("variance 'learned': the denoiser returned no variance")
            logvar = pred.var_frac * math.log(beta) + (1 - pred.var_frac) * math.log(var)
        return mean + (0.5 * torch.as_tensor(logvar)).exp() * _noise(x, generators)


class DDIM(GridSampler):
    """DDIM (Song et al. 2021, eq. 12): x_s = sqrt(abar_s) x_0 + sqrt(1 - abar_s - sigma^2) eps
    + sigma z, sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)."""

    name = "ddim"

    def __init__(self, *, steps: int | None, eta: float, clip_x0: bool, spacing: Spacing):
        super().__init__(steps=steps, clip_x0=clip_x0, spacing=spacing)
        self.eta = eta

    def step(self, x, history, grid, i, generators):
        pred = history[-1]
        abar_t, abar_s = grid.abar[i].item(), grid.abar[i + 1].item()
        sigma = self.eta * math.sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s))
        out = math.sqrt(abar_s) * pred.x0 + math.sqrt(max(1 - abar_s - sigma**2, 0.0)) * pred.eps
        return out + sigma * _noise(x, generators) if sigma > 0 else out


class DPMSolver2M(GridSampler):
    """DPM-Solver++(2M) (Lu et al. 2022, algorithm 2): a multistep solver of the probability-flow
    ODE in lambda = log(alpha / sigma) on data predictions; first order on the first step and on
    the last two (into the smallest noise level, then to clean data where sigma = 0)."""

    name = "dpm-solver-2m"

    def step(self, x, history, grid, i, generators):
        abar = grid.abar
        lam = lambda j: 0.5 * math.log(abar[j].item() / (1 - abar[j].item()))  # noqa: E731
        abar_s = abar[i + 1].item()
        if abar_s == 1.0:
            return history[-1].x0
        alpha_s = math.sqrt(abar_s)
        sigma_ratio = math.sqrt((1 - abar_s) / (1 - abar[i].item()))
        h = lam(i + 1) - lam(i)
        d = history[-1].x0
        # Second order except on the first step and on the step into the last level before
        # clean data, where lambda jumps and the extrapolation overshoots (on the mixture,
        # covariance error at 20 steps: 0.036 second order, 0.004 first order).
        last = i == grid.steps - 2 and abar[-1].item() == 1.0
        if i > 0 and not last:
            r = (lam(i) - lam(i - 1)) / h
            d = (1 + 1 / (2 * r)) * history[-1].x0 - 1 / (2 * r) * history[-2].x0
        return sigma_ratio * x - alpha_s * math.expm1(-h) * d


def _check_steps(steps: int | None) -> None:
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1 or null (every trained step), got {steps}")


def make_spacing(spacing: str, rho: float | None, schedule: dict[str, Any] | None) -> Spacing:
    """The grid spacing of a sampler's args; ``schedule`` ``{name, args}`` names a built-in
    schedule. ValueError saying what to change."""
    if rho is not None and spacing != "edm":
        raise ValueError(f"rho sets the edm spacing; with spacing {spacing} drop it, or set spacing: edm")
    sampling = None
    if schedule is not None:
        if not isinstance(schedule, dict) or "name" not in schedule or set(schedule) - {"name", "args"}:
            raise ValueError(f"schedule must be a mapping {{name: ..., args: {{...}}}} naming a sampling schedule "
                             f"({', '.join(SCHEDULES)}), got {schedule!r}")
        factory = SCHEDULES.get(schedule["name"])
        if factory is None:
            raise ValueError(f"sampling schedule {schedule['name']!r} is not a built-in schedule; use one of "
                             f"{', '.join(SCHEDULES)}")
        try:
            sampling = factory(**(schedule.get("args") or {}))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"sampling schedule {schedule['name']!r}: {exc}") from None
    return Spacing(spacing, 7.0 if rho is None else rho, sampling)


def ddpm(*, steps: int | None = None, variance: str = "fixed-small", clip_x0: bool = True,
         spacing: str = "uniform-t", rho: float | None = None, schedule: dict[str, Any] | None = None) -> DDPM:
    """Ancestral sampling; ``steps`` respaces the trained process (null: all T steps)."""
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {', '.join(VARIANCES)}, got {variance!r}")
    _check_steps(steps)
    return DDPM(steps=steps, variance=variance, clip_x0=clip_x0, spacing=make_spacing(spacing, rho, schedule))


def ddim(*, steps: int | None = 50, eta: float = 0.0, clip_x0: bool = True,
         spacing: str = "uniform-t", rho: float | None = None, schedule: dict[str, Any] | None = None) -> DDIM:
    """DDIM; eta = 0 is deterministic, eta = 1 matches ancestral sampling's variance."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    _check_steps(steps)
    return DDIM(steps=steps, eta=eta, clip_x0=clip_x0, spacing=make_spacing(spacing, rho, schedule))


def dpm_solver_2m(*, steps: int | None = 20, clip_x0: bool = True, spacing: str = "uniform-t",
                  rho: float | None = None, schedule: dict[str, Any] | None = None) -> DPMSolver2M:
    """DPM-Solver++(2M); ``clip_x0`` is its thresholding of data predictions to [-1, 1]."""
    _check_steps(steps)
    return DPMSolver2M(steps=steps, clip_x0=clip_x0, spacing=make_spacing(spacing, rho, schedule))


@hookimpl
def cdmbench_register_samplers(register):
    register("ddpm", ddpm, summary="DDPM ancestral sampling: fixed-small, fixed-large or learned variance")
    register("ddim", ddim, summary="DDIM with eta (0: deterministic)")
    register("dpm-solver-2m", dpm_solver_2m, summary="DPM-Solver++ 2M multistep ODE solver (few steps)")
