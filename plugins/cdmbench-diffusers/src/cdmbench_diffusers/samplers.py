"""diffusers' schedulers as cdmbench samplers.

A scheduler is built on the trained process's own discretisation: a discrete process's betas
(T steps), or a continuous process read at N = 1000 levels t_i = (i + 1) / N. diffusers'
timestep i is cdmbench's level s = (i + 1) / T (N), so the backbone sees the noise conditioning
it was trained with. Schedulers that accept custom timesteps walk the same grid as cdmbench's own
samplers (``process.grid(steps, stop_at)``'s levels, a continuous one's at the nearest of the N),
and every scheduler starts from z_T ~ N(0, I) as they do, which makes solver comparisons about
the solver alone. Custom timesteps also allow an early stop at a level s: the loop ends when the
scheduler reaches s and returns z_s. Schedulers without custom timesteps use their own spacing
and cannot stop early.

The model output handed to the scheduler is eps made consistent with the (optionally clipped)
x_0 prediction (``prediction_type="epsilon"``, which every scheduler supports), so any cdmbench
parameterisation (eps, x0, v) works.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from cdmbench.diffusion import NOISE_COND_SCALE, Denoise, noise_level_cond, randn_per_image

CONTINUOUS_LEVELS = 1000  # N: levels a continuous process is read at


class Table:
    """A process's trained levels as a scheduler sees them: betas, abar and sigma of steps
    i < T, and the (abar, noise_cond) the backbone gets at a scheduler timestep."""

    def __init__(self, process: Any):
        self.continuous = process.continuous
        if self.continuous:
            t = torch.arange(1, CONTINUOUS_LEVELS + 1, dtype=torch.float64) / CONTINUOUS_LEVELS
            abar = process.abar_at(t)
            prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
            self.betas = (1 - abar / prev).clamp(max=0.999999)  # diffusers needs beta < 1
        else:
            self.betas = process.betas
        self.T = len(self.betas)
        self.abar = torch.cumprod(1 - self.betas, 0)
        self.sigma = ((1 - self.abar) / self.abar).sqrt().numpy()

    def at(self, timestep: float) -> tuple[float, float]:
        """(abar, noise_cond) at a scheduler timestep, which may be fractional: sigma is
        interpolated linearly in the timestep, as diffusers' Euler-type schedulers do."""
        sigma = float(np.interp(timestep, np.arange(self.T), self.sigma))
        abar = 1 / (1 + sigma**2)
        if self.continuous:  # conditioned on the noise level itself
            return abar, noise_level_cond(torch.tensor(abar, dtype=torch.float64)).item()
        return abar, timestep * NOISE_COND_SCALE / self.T

    def index(self, process: Any, s: float) -> int:
        """The timestep whose level is s."""
        if not self.continuous:
            return process.level_index(s)
        k = s * self.T - 1
        if not 0 <= round(k) < self.T or abs(k - round(k)) > 1e-6:
            raise ValueError(f"diffusers schedulers read a continuous process at {self.T} levels; "
                             f"stop at a multiple of 1/{self.T}, e.g. {max(1, round(s * self.T)) / self.T}")
        return round(k)


class DiffusersSampler:
    """Runs ``scheduler_class`` (a diffusers scheduler) through the cdmbench sampler interface."""

    def __init__(self, scheduler_class: type, *, steps: int, clip_x0: bool, config: dict[str, Any]):
        self.scheduler_class, self.steps, self.clip_x0, self.config = scheduler_class, steps, clip_x0, config
        self.name = scheduler_class.__name__
        params = inspect.signature(scheduler_class.set_timesteps).parameters
        self.custom_timesteps = "timesteps" in params
        self.takes_generator = "generator" in inspect.signature(scheduler_class.step).parameters

    def scheduler(self, table: Table):
        try:
            return self.scheduler_class(num_train_timesteps=table.T, trained_betas=table.betas.numpy(),
                                        prediction_type="epsilon", **self.config)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{self.name} cannot be built with config {self.config}: {exc}") from None

    def prepared(self, process: Any, stop_at: float, device: torch.device | str = "cpu"):
        """(table, scheduler with its timesteps set, stop timestep or None). Custom timesteps:
        the levels of ``process.grid`` (discrete: evenly spaced trained steps from T - 1 down;
        continuous: t evenly spaced from 1 to the end, at the nearest of the N levels), then the
        stop level; otherwise the scheduler's own spacing."""
        table = Table(process)
        scheduler = self.scheduler(table)
        if not self.custom_timesteps:
            if stop_at > 0:
                raise ValueError(f"{self.name} takes no custom timesteps, so it cannot stop early at "
                                 f"level {stop_at} (truncated conditioning augmentation); use "
                                 "diffusers-dpm-solver-multistep, diffusers-euler, diffusers-heun "
                                 "or a cdmbench sampler for that stage")
            scheduler.set_timesteps(self.steps, device=device)
            ts = scheduler.timesteps.tolist()
            if len(set(ts)) < len(ts) and scheduler.order == 1:
                raise ValueError(f"{self.name}'s own spacing of {self.steps} steps over {table.T} trained "
                                 f"steps repeats a timestep (a zero-length step gives NaN); use at most "
                                 f"{table.T - 1} steps")
            return table, scheduler, None
        end = table.index(process, stop_at) if stop_at > 0 else -1  # -1: clean data
        if not 1 <= self.steps <= table.T - 1 - end:
            raise ValueError(f"cannot take {self.steps} steps between level {stop_at} and pure noise "
                             f"on {table.T} trained levels; choose 1..{table.T - 1 - end}")
        kept = (np.linspace(table.T - 1, end, self.steps + 1)[:-1] if table.continuous
                else np.linspace(table.T - 1, end + 1, self.steps))
        stop = end if stop_at > 0 else None
        timesteps = kept.round().astype(int).tolist() + ([stop] if stop is not None else [])
        scheduler.set_timesteps(timesteps=timesteps, device=device)
        return table, scheduler, stop

    def check(self, process: Any, *, learned_variance: bool, stop_at: float = 0.0) -> None:
        """Schedulers solve with the mean only, so learned variances are ignored."""
        self.prepared(process, stop_at)

    @torch.no_grad()
    def sample(self, *, denoise: Denoise, process: Any, shape: tuple[int, ...],
               generators: list[torch.Generator], device: torch.device | str = "cpu",
               stop_at: float = 0.0, progress: bool = True) -> Tensor:
        table, scheduler, stop = self.prepared(process, stop_at, device)
        n = len(generators)
        x = randn_per_image(shape, generators, device)  # z_T ~ N(0, I), as cdmbench's samplers
        if scheduler.init_noise_sigma != 1:  # sigma space: x = z_T / sqrt(abar_T)
            x = x * (1 + float(scheduler.sigmas.max()) ** 2) ** 0.5
        extra = {"generator": generators} if self.takes_generator else {}
        for t in tqdm(scheduler.timesteps, desc=self.name, leave=False, disable=not progress):
            x_t = scheduler.scale_model_input(x, t)  # sigma-space schedulers scale x to x_t
            if stop is not None and int(t) == stop and getattr(scheduler, "state_in_first_order", True):
                return x_t  # z_s: the scheduler has reached level s
            abar, noise_cond = table.at(float(t))
            pred = denoise(x_t, torch.full((n,), abar, device=device, dtype=torch.float64),
                           torch.full((n,), noise_cond, device=device))
            if self.clip_x0:
                pred = pred.clipped(x_t, abar)
            x = scheduler.step(pred.eps.to(x.dtype), t, x, **extra).prev_sample
        if not torch.isfinite(x).all():
            raise ValueError(f"{self.name} produced NaN or inf with {self.steps} steps on this process")
        return x.clamp(-1.0, 1.0)


SCHEDULERS = {  # cdmbench name -> (diffusers class, config, summary)
    "diffusers-dpm-solver-multistep": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        "diffusers DPMSolverMultistepScheduler (DPM-Solver++ 2M)",
    ),
    "diffusers-unipc": ("UniPCMultistepScheduler", {}, "diffusers UniPCMultistepScheduler (UniPC, bh2); no early stop"),
    "diffusers-euler": ("EulerDiscreteScheduler", {}, "diffusers EulerDiscreteScheduler (Karras et al. Euler)"),
    "diffusers-heun": ("HeunDiscreteScheduler", {}, "diffusers HeunDiscreteScheduler (2 evaluations per step)"),
    "diffusers-euler-ancestral": (
        "EulerAncestralDiscreteScheduler",
        {},
        "diffusers EulerAncestralDiscreteScheduler (stochastic); no early stop",
    ),
}


def scheduler_class(name: str) -> type:
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "set_timesteps"):
        known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler"))
        raise ValueError(f"diffusers {diffusers.__version__} has no scheduler {name!r}; "
                         f"choose one of {', '.join(known)}")
    return cls


def make(scheduler: str, defaults: dict[str, Any]):
    """A factory for one named scheduler: steps, clip_x0 and scheduler config keys as args."""
    def factory(*, steps: int = 20, clip_x0: bool = True, config: dict[str, Any] | None = None) -> DiffusersSampler:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return DiffusersSampler(scheduler_class(scheduler), steps=steps, clip_x0=clip_x0,
                                config={**defaults, **(config or {})})
    factory.__doc__ = f"{scheduler}: ``config`` sets its constructor arguments (e.g. solver_order)."
    return factory


def any_scheduler(*, scheduler: str, steps: int = 20, clip_x0: bool = True,
                  config: dict[str, Any] | None = None) -> DiffusersSampler:
    """Any diffusers scheduler by class name, e.g. scheduler: DEISMultistepScheduler."""
    return make(scheduler, {})(steps=steps, clip_x0=clip_x0, config=config)
