"""The Gaussian diffusion process (DDPM: Ho et al. 2020; IDDPM: Nichol & Dhariwal 2021).

A noise level is abar, the signal fraction of x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps (DDPM
eq. 4). A *discrete* process has T trained steps (index t = 0..T-1 is DDPM's t = 1..T); a
*continuous* process is trained on t ~ U(0, 1). Sampling walks a ``Grid`` of levels from pure
noise to clean data, or to an early-stop level s, placed by a ``Spacing`` (``spacing``). Levels
s in [0, 1] are fractions of the trained process: for a discrete process s = (t + 1) / T, so
abar(s) of the schedule is abar_t.

What the backbone sees (``noise_cond``): a discrete process's step index, 1000 t / T (IDDPM); a
continuous process's noise level itself, ``noise_level_cond(abar)``, so that it may be sampled on
levels of any schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from cdmbench.diffusion.spacing import Spacing, log_snr
from cdmbench.interfaces import Schedule

# loss -> what the backbone predicts. `hybrid` adds the learned variance (IDDPM section 3.1).
LOSSES = {"simple": "eps", "x0": "x0", "v": "v", "hybrid": "eps"}
NOISE_COND_SCALE = 1000.0  # a discrete process's backbone sees t on [0, 1000) (IDDPM's rescaled timesteps)
LOG2 = math.log(2.0)
# What a continuous process's backbone is conditioned on; checkpoints record it (a checkpoint
# without it was trained on 1000 t: ``cdmbench.training.checkpoint``).
NOISE_COND = "log-snr: 500 - 25 lambda"
LOG_SNR_LIMIT = 40.0  # |lambda| is clamped here, so clean data (abar = 1) and pure noise stay finite


def noise_level_cond(abar: Tensor) -> Tensor:
    """The conditioning of a continuous process's backbone at level abar: c = 500 - 25 lambda.

    EDM (Karras et al. 2022, table 1) conditions on c_noise = ln(sigma) / 4, sigma =
    sqrt((1 - abar) / abar), an affine function of the log-SNR lambda = -2 ln sigma: the network
    then knows the noise level itself, not a schedule's time, and any grid may sample it (CDM
    sampled its noise-level conditioned stages on schedules chosen after training). c is
    500 + 200 c_noise: lambda in [-20, 20], the log-snr schedule's range, on the [0, 1000] the
    sinusoidal timestep embedding was made for (IDDPM), increasing with noise like 1000 t."""
    return 500.0 - 25.0 * log_snr(abar).clamp(-LOG_SNR_LIMIT, LOG_SNR_LIMIT)


def _b(a: Tensor | float, x: Tensor) -> Tensor:
    """A per-example (B,) or scalar level, broadcastable against x (B, ...) in x's dtype. A
    number becomes a 0-dim CPU tensor, which broadcasts against x on any device as it is (a copy
    to a GPU would wait for the GPU's queued work)."""
    if not isinstance(a, Tensor):
        return torch.tensor(a, dtype=x.dtype)
    if a.ndim == 0 and a.device.type == "cpu":
        return a.to(x.dtype)
    a = a.to(x.device, x.dtype)
    return a.reshape(-1, *([1] * (x.ndim - 1))) if a.ndim else a


# --- q(x_t | x_0) and the three parameterisations --------------------------------------------

def q_sample(x0: Tensor, abar: Tensor | float, eps: Tensor) -> Tensor:
    """Eq. 4: x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps."""
    abar = _b(abar, x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


def x0_from_eps(x_t: Tensor, abar: Tensor | float, eps: Tensor) -> Tensor:
    abar = _b(abar, x_t)
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def eps_from_x0(x_t: Tensor, abar: Tensor | float, x0: Tensor) -> Tensor:
    abar = _b(abar, x_t)
    return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()


def v_from(x0: Tensor, eps: Tensor, abar: Tensor | float) -> Tensor:
    """v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022)."""
    abar = _b(abar, x0)
    return abar.sqrt() * eps - (1 - abar).sqrt() * x0


def x0_eps_from_v(x_t: Tensor, abar: Tensor | float, v: Tensor) -> tuple[Tensor, Tensor]:
    abar = _b(abar, x_t)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    return a * x_t - s * v, s * x_t + a * v


def x0_eps(output: Tensor, x_t: Tensor, abar: Tensor | float, prediction: str) -> tuple[Tensor, Tensor]:
    """(x_0, eps) implied by a model output that predicts ``prediction`` (eps, x0 or v)."""
    if prediction == "eps":
        return x0_from_eps(x_t, abar, output), output
    if prediction == "x0":
        return output, eps_from_x0(x_t, abar, output)
    if prediction == "v":
        return x0_eps_from_v(x_t, abar, output)
    raise ValueError(f"unknown prediction {prediction!r}; use eps, x0 or v")


@dataclass
class Prediction:
    """What a denoiser says about x_t: x_0 and eps, and for learned-variance models the
    interpolation fraction v in [0, 1] of Sigma = exp(v log beta + (1 - v) log beta~)."""

    x0: Tensor
    eps: Tensor
    var_frac: Tensor | None = None

    def clipped(self, x_t: Tensor, abar: Tensor | float) -> Prediction:
        """x_0 clamped to the data range [-1, 1], eps made consistent with it (ADM)."""
        x0 = self.x0.clamp(-1.0, 1.0)
        return Prediction(x0, eps_from_x0(x_t, abar, x0), self.var_frac)


# denoise(x_t, abar (B,), noise_cond (B,)) -> Prediction: a model with its conditioning bound.
Denoise = Callable[[Tensor, Tensor, Tensor], Prediction]


def prediction_from_output(output: Tensor, x_t: Tensor, abar: Tensor, *, prediction: str,
                           learned_variance: bool) -> Prediction:
    """Split a backbone output (C or 2C channels) into a Prediction."""
    var_frac = None
    if learned_variance:
        output, v = output.chunk(2, dim=1)
        var_frac = (v.float() + 1) / 2  # the network outputs v in [-1, 1] (IDDPM eq. 15)
    x0, eps = x0_eps(output.float(), x_t.float(), abar, prediction)
    return Prediction(x0, eps, var_frac)


# --- the posterior and the variational bound -----------------------------------------------

def posterior(x0: Tensor, x_t: Tensor, abar_t: Tensor | float,
              abar_s: Tensor | float) -> tuple[Tensor, Tensor]:
    """Mean and variance of q(x_s | x_t, x_0) for a less noisy level abar_s > abar_t (eqs. 6-7,
    with beta = 1 - abar_t / abar_s for the jump from t to s)."""
    abar_t, abar_s = _b(abar_t, x_t), _b(abar_s, x_t)
    beta = 1 - abar_t / abar_s
    mean = (abar_s.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - abar_s) * x_t) / (1 - abar_t)
    return mean, beta * (1 - abar_s) / (1 - abar_t)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 + (logvar1 - logvar2).exp()
                  + (mean1 - mean2) ** 2 * (-logvar2).exp() - 1.0)


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """log P(x) of 8-bit data x in [-1, 1] under N(mean, e^logvar) integrated over x's bin of
    width 2/255; the outermost bins extend to -inf and +inf (DDPM section 3.3)."""
    inv_std = (-0.5 * logvar).exp()
    upper = (x - mean + 1.0 / 255) * inv_std
    lower = (x - mean - 1.0 / 255) * inv_std
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    middle = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, middle))


def randn_per_image(shape: tuple[int, ...], generators: list[torch.Generator],
                    device: torch.device | str) -> Tensor:
    """One standard normal draw of ``shape`` per image, each from that image's own generator, so
    an image does not depend on its batch."""
    return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators]).to(device)


# --- sampling grids --------------------------------------------------------------------------

@dataclass
class Grid:
    """The levels a sampler visits: abar[0] (noisiest) .. abar[N] (the terminal level: 1 for
    clean data, abar(s) when stopping early at s). The model is evaluated at the first N
    levels, where the backbone sees noise_cond[i]."""

    abar: Tensor        # (N + 1,) float64, increasing
    noise_cond: Tensor  # (N,) float32

    @property
    def steps(self) -> int:
        return len(self.noise_cond)

    def betas(self) -> Tensor:
        """beta of each jump i -> i + 1: 1 - abar[i] / abar[i + 1] (a respaced process's betas)."""
        return 1 - self.abar[:-1] / self.abar[1:]


class DiscreteProcess:
    """A process with T trained steps, betas beta_1..beta_T (float64)."""

    continuous = False

    def __init__(self, betas: Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-d tensor with values in (0, 1]")
        self.betas = betas
        self.T = len(betas)
        self.abar = torch.cumprod(1 - betas, 0)
        self.abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.abar[:-1]])
        self.posterior_var = betas * (1 - self.abar_prev) / (1 - self.abar)  # beta~_t (eq. 7)
        # log beta~ with beta~_1 = 0 replaced by beta~_2 (IDDPM), and log beta: the two ends of
        # the learned variance's interpolation.
        self.log_var_min = torch.cat([self.posterior_var[1:2], self.posterior_var[1:]]).log()
        self.log_var_max = betas.log()
        self._copies: dict[tuple[str, torch.device], Tensor] = {}

    def _on(self, name: str, device: torch.device | str) -> Tensor:
        """The table ``name`` on ``device``, copied there once: a copy per training step would
        wait for the GPU."""
        key = (name, torch.device(device))
        if key not in self._copies:
            self._copies[key] = getattr(self, name).to(device)
        return self._copies[key]

    def noise_cond(self, t: Tensor) -> Tensor:
        return t.float() * (NOISE_COND_SCALE / self.T)

    def training_points(self, n: int, device: torch.device | str) -> tuple[Tensor, Tensor, Tensor]:
        """Uniform steps t for a training batch: (t, abar_t, noise_cond), from the global RNG."""
        t = torch.randint(0, self.T, (n,), device=device)
        return t, self._on("abar", device)[t], self.noise_cond(t)

    def level_index(self, s: float) -> int:
        """The step t whose level is s = (t + 1) / T."""
        k = s * self.T - 1
        if not 0 <= round(k) < self.T or abs(k - round(k)) > 1e-6:
            raise ValueError(f"level {s} is not a step of this {self.T}-step process; use a "
                             f"multiple of 1/{self.T} in (0, 1], e.g. {max(1, round(s * self.T)) / self.T}")
        return round(k)

    def grid(self, steps: int | None = None, stop_at: float = 0.0, spacing: Spacing | None = None) -> Grid:
        """``steps`` trained steps (all of them for None) from T - 1 down to the end: clean data,
        or level ``stop_at``; evenly spaced in t, or the trained steps nearest to even spacing in
        ``spacing``'s coordinate. Respacing keeps abar at the kept steps (IDDPM)."""
        lowest = 0 if stop_at == 0 else self.level_index(stop_at) + 1
        available = self.T - lowest
        steps = available if steps is None else steps
        if not 1 <= steps <= available:
            end = "to clean data" if stop_at == 0 else f"down to level {stop_at}"
            raise ValueError(f"cannot sample {steps} steps {end} from a {self.T}-step process; "
                             f"choose 1..{available} (it was trained on {self.T} steps)")
        if spacing is None or spacing.trained:
            kept = torch.linspace(self.T - 1, lowest, steps, dtype=torch.float64).round().long()
        else:
            kept = lowest + spacing.nearest_steps(self.abar[lowest:], steps)
        terminal = torch.ones(1, dtype=torch.float64) if stop_at == 0 else self.abar[lowest - 1:lowest]
        return Grid(torch.cat([self.abar[kept], terminal]), self.noise_cond(kept))

    def learned_logvar(self, var_frac: Tensor, t: Tensor) -> Tensor:
        """log Sigma_theta = v log beta_t + (1 - v) log beta~_t (IDDPM eq. 15)."""
        lo = _b(self._on("log_var_min", t.device)[t], var_frac)
        hi = _b(self._on("log_var_max", t.device)[t], var_frac)
        return var_frac * hi + (1 - var_frac) * lo

    def vlb_terms(self, x0: Tensor, x_t: Tensor, t: Tensor, pred: Prediction) -> Tensor:
        """L_{t-1} of the variational bound per example, in bits per dimension: the KL between
        the true and the model's posterior for t > 0 and the discretised Gaussian decoder NLL
        at t = 0 (DDPM eq. 5). ``pred`` must carry the learned variance."""
        abar_t = self._on("abar", t.device)[t]
        abar_s = self._on("abar_prev", t.device)[t]
        true_mean, true_var = posterior(x0, x_t, abar_t, abar_s)
        model_mean, _ = posterior(pred.x0, x_t, abar_t, abar_s)
        model_logvar = self.learned_logvar(pred.var_frac, t)
        true_logvar = true_var.clamp(min=1e-20).log()  # beta~ = 0 only at t = 0, handled below
        kl = normal_kl(true_mean, true_logvar, model_mean, model_logvar).flatten(1).mean(1)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, model_logvar).flatten(1).mean(1)
        return torch.where(t == 0, nll, kl) / LOG2

    def prior_bpd(self, x0: Tensor) -> Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension, per example."""
        abar = self.abar[-1].item()
        mean, logvar = math.sqrt(abar) * x0, torch.full_like(x0, math.log(1 - abar))
        return normal_kl(mean, logvar, torch.zeros_like(x0), torch.zeros_like(x0)).flatten(1).mean(1) / LOG2

    @torch.no_grad()
    def bits_per_dim(self, denoise: Denoise, x0: Tensor, *, generator: torch.Generator | None = None,
                     progress: bool = True) -> Tensor:
        """The full variational bound -log p(x_0) <= L_T + sum_t L_{t-1}, bits/dim per example."""
        total = self.prior_bpd(x0)
        for step in tqdm(range(self.T - 1, -1, -1), desc="bits/dim", leave=False, disable=not progress):
            t = torch.full((len(x0),), step, device=x0.device)
            abar = self.abar.to(x0.device)[t]
            eps = torch.randn(x0.shape, generator=generator, device=x0.device)
            x_t = q_sample(x0, abar, eps)
            total = total + self.vlb_terms(x0, x_t, t, denoise(x_t, abar, self.noise_cond(t)))
        return total


class ContinuousProcess:
    """A process on continuous t in [0, 1] with the schedule's abar(t); the backbone sees the
    noise level (``noise_level_cond``), so it can be sampled with any number of steps, on levels
    spaced as any ``Spacing`` says."""

    continuous = True

    def __init__(self, schedule: Schedule):
        self.schedule = schedule

    def abar_at(self, t: Tensor) -> Tensor:
        return self.schedule.abar(t.double())  # on t's device: no copy to wait for

    def training_points(self, n: int, device: torch.device | str) -> tuple[Tensor, Tensor, Tensor]:
        t = torch.rand(n, device=device, dtype=torch.float64)
        abar = self.abar_at(t)
        return t, abar, noise_level_cond(abar).float()

    def grid(self, steps: int | None = None, stop_at: float = 0.0, spacing: Spacing | None = None) -> Grid:
        """``steps + 1`` levels from the noisiest trained one, abar(1), to abar(``stop_at``) (the
        terminal level; clean data for 0), evenly spaced in t or in ``spacing``'s coordinate; the
        model is evaluated at the first ``steps``."""
        if steps is None or steps < 1:
            raise ValueError("a continuous process needs a step count: set the sampler's steps")
        if not 0 <= stop_at < 1:
            raise ValueError(f"stop level must be in [0, 1), got {stop_at}")
        if spacing is None or spacing.trained:
            abar = self.abar_at(torch.linspace(1.0, stop_at, steps + 1, dtype=torch.float64))
        else:
            ends = self.abar_at(torch.tensor([1.0, stop_at], dtype=torch.float64))
            abar = spacing.levels(ends[0], ends[1], steps + 1)
        if stop_at == 0:
            abar[-1] = 1.0
        return Grid(abar, noise_level_cond(abar[:-1]).float())


Process = DiscreteProcess | ContinuousProcess


def make_process(schedule: Schedule) -> Process:
    """Discrete when the schedule has T steps, continuous when its ``timesteps`` is None."""
    return ContinuousProcess(schedule) if schedule.timesteps is None else DiscreteProcess(schedule.betas())


# --- training losses ------------------------------------------------------------------------

def training_loss(loss: str, *, output: Tensor, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor,
                  abar: Tensor, process: Process, vlb_weight: float = 0.001) -> Tensor:
    """Per-example loss for a batch at levels abar (B,).

    simple: ||eps - eps_theta||^2 (DDPM eq. 14); x0 / v: MSE of that prediction; hybrid:
    L_simple + lambda L_vlb with the mean detached in L_vlb, so the VLB trains only the variance
    (IDDPM eq. 16). L_vlb = T E_t[L_t], so the per-example term is lambda T L_t.
    """
    prediction = LOSSES[loss]
    learned = loss == "hybrid"
    main = output.chunk(2, dim=1)[0] if learned else output
    target = {"eps": eps, "x0": x0, "v": v_from(x0, eps, abar)}[prediction]
    mse = (main.float() - target.float()).pow(2).flatten(1).mean(1)
    if not learned:
        return mse
    detached = torch.cat([main.detach(), output.chunk(2, dim=1)[1]], dim=1)
    pred = prediction_from_output(detached, x_t, abar, prediction=prediction, learned_variance=True)
    return mse + vlb_weight * process.T * process.vlb_terms(x0.float(), x_t.float(), t, pred)
