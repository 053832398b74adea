"""Noise schedules `linear` (DDPM), `cosine` (Improved DDPM), both discrete with T steps, and
`log-snr` (continuous, for noise-level conditioned stages)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cdmbench import hookimpl


class CosineSchedule:
    """abar(t) = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) * pi / 2) (IDDPM eq. 17)."""

    def __init__(self, timesteps: int, offset: float, max_beta: float):
        self.timesteps, self.offset, self.max_beta = timesteps, offset, max_beta

    def _f(self, t: Tensor) -> Tensor:
        return torch.cos((t + self.offset) / (1 + self.offset) * math.pi / 2) ** 2

    def abar(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return self._f(t) / self._f(torch.zeros((), dtype=torch.float64))

    def betas(self) -> Tensor:
        # beta_i = 1 - abar(i/T) / abar((i-1)/T), clipped to avoid a singularity at t = 1.
        grid = torch.arange(self.timesteps + 1, dtype=torch.float64) / self.timesteps
        abar = self.abar(grid)
        return (1.0 - abar[1:] / abar[:-1]).clamp(max=self.max_beta)


class LinearSchedule:
    """DDPM's betas, linear from beta_start to beta_end, scaled by 1000 / T (IDDPM appendix)."""

    def __init__(self, timesteps: int, beta_start: float, beta_end: float):
        scale = 1000.0 / timesteps
        self.timesteps = timesteps
        self.beta_start, self.beta_end = beta_start * scale, beta_end * scale
        # log abar_k = sum_{i <= k} log(1 - beta_i), k = 0..T (abar_0 = 1), per device
        self._log_abar = {torch.device("cpu"): torch.cat([torch.zeros(1, dtype=torch.float64),
                                                          torch.log1p(-self.betas()).cumsum(0)])}

    def betas(self) -> Tensor:
        return torch.linspace(self.beta_start, self.beta_end, self.timesteps, dtype=torch.float64)

    def abar(self, t: Tensor) -> Tensor:
        """The discrete process's abar at its steps, abar(k / T) = prod_{i <= k} (1 - beta_i),
        log-linear between them: a level s is one noise level whether a sampler stops there
        (truncated augmentation) or z_0 is noised to it (training, non-truncated). The betas'
        continuous-time limit (the VP SDE) is up to 6 % away at s = 0.95."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.device not in self._log_abar:  # copied once: a copy per call would wait for the GPU
            self._log_abar[t.device] = self._log_abar[torch.device("cpu")].to(t.device)
        table, T = self._log_abar[t.device], self.timesteps
        u = (t * T).clamp(0, T)
        k = u.floor().clamp(max=T - 1).long()
        return torch.exp(table[k] + (u - k) * (table[k + 1] - table[k]))


class LogSNRSchedule:
    """Continuous cosine log-SNR schedule (Kingma et al. 2021; Imagen): lambda(t) =
    -2 log tan(a t + b), from logsnr_max at t = 0 to logsnr_min at t = 1; abar = sigmoid(lambda).
    With the full range it is the cosine schedule without the offset."""

    timesteps = None  # continuous: trained on t ~ U(0, 1), sampled with any number of steps

    def __init__(self, logsnr_min: float, logsnr_max: float):
        self.b = math.atan(math.exp(-0.5 * logsnr_max))
        self.a = math.atan(math.exp(-0.5 * logsnr_min)) - self.b

    def log_snr(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return -2 * torch.log(torch.tan(self.a * t + self.b))

    def abar(self, t: Tensor) -> Tensor:
        return torch.sigmoid(self.log_snr(t))


MAX_TIMESTEPS = 100_000  # CDM's stages use at most 4000


def _check_timesteps(timesteps: int) -> None:
    if not 1 <= timesteps <= MAX_TIMESTEPS:
        raise ValueError(f"timesteps must be in [1, {MAX_TIMESTEPS}], got {timesteps}")


def cosine(*, timesteps: int = 1000, offset: float = 0.008, max_beta: float = 0.999) -> CosineSchedule:
    _check_timesteps(timesteps)
    return CosineSchedule(timesteps, offset, max_beta)


def linear(*, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> LinearSchedule:
    _check_timesteps(timesteps)
    if not (0 < beta_start <= beta_end and beta_end * 1000 / timesteps < 1):
        raise ValueError(f"need 0 < beta_start <= beta_end, and beta_end x 1000 / timesteps < 1 (the "
                         f"betas are scaled to T steps): got {beta_start}, {beta_end} at T = {timesteps}; "
                         f"use timesteps >= {int(beta_end * 1000) + 1} or the cosine schedule")
    return LinearSchedule(timesteps, beta_start, beta_end)


def log_snr(*, logsnr_min: float = -20.0, logsnr_max: float = 20.0) -> LogSNRSchedule:
    if not logsnr_min < logsnr_max:
        raise ValueError(f"need logsnr_min < logsnr_max, got {logsnr_min}, {logsnr_max}")
    return LogSNRSchedule(logsnr_min, logsnr_max)


FACTORIES = {"linear": linear, "cosine": cosine, "log-snr": log_snr}  # also samplers' sampling schedules
SUMMARIES = {"linear": "DDPM linear betas 1e-4..0.02, scaled to T steps",
             "cosine": "Improved-DDPM cosine abar, offset 0.008, beta clipped at 0.999",
             "log-snr": "continuous cosine log-SNR schedule in [min, max], any step count"}


@hookimpl
def cdmbench_register_schedules(register):
    for name, factory in FACTORIES.items():
        register(name, factory, summary=SUMMARIES[name])
