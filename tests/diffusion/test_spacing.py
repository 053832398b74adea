"""Grid spacings (uniform in t, in log-SNR, EDM's sigmas, another schedule's t) and the noise
conditioning of continuous processes: a stage trained on one schedule samples on any grid."""

from __future__ import annotations

import math

import pytest
import torch

from cdmbench.builtin.samplers import ddim, dpm_solver_2m
from cdmbench.builtin.schedules import cosine, linear, log_snr
from cdmbench.diffusion import Prediction, Spacing, noise_level_cond
from cdmbench.diffusion.mixture import GaussianMixture
from cdmbench.diffusion.process import ContinuousProcess, DiscreteProcess

MIXTURE = GaussianMixture.default()
CONTINUOUS = ContinuousProcess(log_snr(logsnr_min=-15.0, logsnr_max=15.0))
SPACINGS = {"uniform-t": Spacing(), "log-snr": Spacing("log-snr"), "edm": Spacing("edm"),
            "cosine schedule": Spacing(schedule=cosine())}


def test_the_noise_conditioning_is_edms_c_noise_on_the_embeddings_scale():
    abar = torch.tensor([1e-9, 0.01, 0.3, 0.5, 0.9, 1 - 1e-9], dtype=torch.float64)
    c_noise = ((1 - abar) / abar).sqrt().log() / 4  # Karras et al. 2022, table 1
    assert torch.allclose(noise_level_cond(abar), 500 + 200 * c_noise, rtol=1e-12)
    assert noise_level_cond(torch.tensor(0.5)).item() == 500.0  # lambda = 0
    # The log-snr schedule's range [-20, 20] fills [0, 1000]; clean data and pure noise stay finite.
    ends = noise_level_cond(log_snr().abar(torch.tensor([0.0, 1.0])))
    assert ends.tolist() == pytest.approx([0.0, 1000.0], abs=1e-6)
    assert torch.isfinite(noise_level_cond(torch.tensor([0.0, 1.0], dtype=torch.float64))).all()


@pytest.mark.parametrize("name", SPACINGS)
@pytest.mark.parametrize("stop_at", [0.0, 0.3])
def test_every_grid_conditions_on_the_noise_level_alone(name, stop_at):
    grid = CONTINUOUS.grid(12, stop_at, SPACINGS[name])
    assert grid.steps == 12 and bool((grid.abar[1:] > grid.abar[:-1]).all())
    ends = CONTINUOUS.abar_at(torch.tensor([1.0, stop_at], dtype=torch.float64))
    assert grid.abar[0].item() == ends[0].item()  # from the noisiest trained level...
    assert grid.abar[-1].item() == (1.0 if stop_at == 0 else ends[1].item())  # ...to the end
    # The network sees the same value for the same level, whatever the grid.
    assert torch.allclose(grid.noise_cond.double(), noise_level_cond(grid.abar[:-1]), rtol=1e-6)
    assert grid.noise_cond[0].item() == pytest.approx(875.0)  # lambda(1) = -15


def test_grids_are_evenly_spaced_in_their_coordinate():
    lam = lambda a: (a / (1 - a)).log()  # noqa: E731
    levels = CONTINUOUS.grid(10, 0.2, SPACINGS["log-snr"]).abar
    assert torch.allclose(lam(levels).diff(), lam(levels).diff().mean().expand(10), rtol=1e-9)
    levels = CONTINUOUS.grid(10, 0.2, SPACINGS["edm"]).abar
    sigma_root = ((1 - levels) / levels) ** (1 / 14)  # sigma^(1 / rho), rho = 7
    assert torch.allclose(sigma_root.diff(), sigma_root.diff().mean().expand(10), rtol=1e-9)
    # Another schedule's t: the cosine schedule's levels at evenly spaced t between the ends.
    levels = CONTINUOUS.grid(10, 0.2, SPACINGS["cosine schedule"]).abar
    t = torch.linspace(0, 1, 100001, dtype=torch.float64)
    t_of = lambda a: t[(cosine().abar(t) - a).abs().argmin()].item()  # noqa: E731
    times = torch.tensor([t_of(a) for a in levels[1:-1]])
    assert torch.allclose(times.diff(), times.diff().mean().expand(8), atol=2e-5)
    assert Spacing("edm", rho=3).coordinate(torch.tensor(0.2)).item() == pytest.approx(2 ** (1 / 3))


@pytest.mark.parametrize("name", [n for n in SPACINGS if n != "uniform-t"])
def test_discrete_grids_respace_over_the_trained_steps(name):
    process = DiscreteProcess(cosine(timesteps=1000).betas())
    for steps, stop_at in ((25, 0.0), (40, 0.25), (1000, 0.0), (3, 0.0)):
        grid = process.grid(steps, stop_at, SPACINGS[name])
        kept = (grid.noise_cond.double() * process.T / 1000).round().long()  # 1000 t / T
        lowest = 0 if stop_at == 0 else process.level_index(stop_at) + 1
        assert grid.steps == steps and kept[0] == process.T - 1 and kept[-1] == lowest
        assert bool((kept.diff() < 0).all())  # distinct trained steps, noisiest first
        assert torch.equal(grid.abar[:-1], process.abar[kept])  # a trained step's own abar
    # Nearest to the coordinate's even spacing: 25 kept steps' log-SNR rises by 1.24 a step, except
    # at the noisy end, where one trained step spans more (999 -> 998: 6.9), so consecutive
    # steps are the nearest distinct ones.
    grid = process.grid(25, 0.0, SPACINGS["log-snr"])
    kept = (grid.noise_cond.double() * process.T / 1000).round().long()
    lam = (grid.abar[:-1] / (1 - grid.abar[:-1])).log()
    assert kept[:9].tolist() == list(range(999, 990, -1))
    assert torch.allclose(lam.diff()[10:], torch.full((14,), 1.24, dtype=torch.float64), rtol=0.1)


def test_the_default_grid_of_a_discrete_process_is_unchanged():
    process = DiscreteProcess(linear(timesteps=1000).betas())
    for steps, stop_at in ((10, 0.0), (7, 0.25), (None, 0.5)):
        old = process.grid(steps, stop_at)
        new = process.grid(steps, stop_at, Spacing())
        assert torch.equal(old.abar, new.abar) and torch.equal(old.noise_cond, new.noise_cond)


def test_spacing_arguments_are_checked_with_the_fix():
    with pytest.raises(ValueError, match="spacing must be one of uniform-t, log-snr, edm"):
        Spacing("karras")
    with pytest.raises(ValueError, match="drop the schedule or use spacing uniform-t"):
        Spacing("log-snr", schedule=cosine())
    with pytest.raises(ValueError, match="rho must be > 0"):
        Spacing("edm", rho=0)
    with pytest.raises(ValueError, match="infinite log-snr coordinate\\); use spacing uniform-t"):
        Spacing("log-snr").levels(torch.tensor(0.1, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64), 5)


def level_network(x_t, abar, noise_cond) -> Prediction:
    """The mixture's exact denoiser reading the level from ``noise_cond`` alone, as a network
    trained on noise-level conditioning does (lambda = (500 - c) / 25)."""
    return MIXTURE.denoise(x_t, torch.sigmoid((500 - noise_cond.double()) / 25), noise_cond)


def draw(sampler, n: int, network=level_network) -> torch.Tensor:
    return sampler.sample(denoise=network, process=CONTINUOUS, shape=(MIXTURE.dim, 1, 1),
                          generators=[torch.Generator().manual_seed(i) for i in range(n)], progress=False)


@pytest.mark.slow
def test_a_stage_trained_on_one_schedule_samples_on_another_grid():
    n = 4000
    exact = MIXTURE.sample(n, torch.Generator().manual_seed(1))
    floor = MIXTURE.sliced_wasserstein(MIXTURE.sample(n, torch.Generator().manual_seed(2)), exact)  # ~0.016
    for args in ({}, {"spacing": "log-snr"}, {"spacing": "edm"}, {"schedule": {"name": "cosine"}},
                 {"schedule": {"name": "linear"}}):
        x = draw(dpm_solver_2m(steps=50, clip_x0=False, **args), n)
        assert MIXTURE.sliced_wasserstein(x, exact) < 2 * floor, args
        assert MIXTURE.errors(x)["cov_error"] < 0.02, args
    # A network conditioned on t of its training schedule (the old conditioning) reads a cosine
    # grid's levels wrongly: the test sees it.
    def t_network(x_t, abar, noise_cond):
        return MIXTURE.denoise(x_t, CONTINUOUS.abar_at(noise_cond.double() / 1000), noise_cond)
    x = draw(dpm_solver_2m(steps=50, clip_x0=False, schedule={"name": "cosine"}), n, t_network)
    assert MIXTURE.sliced_wasserstein(x, exact) > 3 * floor


@pytest.mark.slow
@pytest.mark.parametrize("process", [CONTINUOUS, DiscreteProcess(cosine(timesteps=1000).betas())],
                         ids=["log-snr -15..15", "cosine T=1000"])
def test_log_snr_spacing_beats_uniform_t_at_25_steps(process):
    """DPM-Solver++ 2M, 25 steps, 20000 points: sliced W2 to exact samples, uniform-t / log-snr
    = 1.84 (continuous) and 1.78 (discrete); the exact samples' own floor is 0.011."""
    n = 20000
    exact = MIXTURE.sample(n, torch.Generator().manual_seed(123))
    errors = {}
    for spacing in ("uniform-t", "log-snr"):
        x = dpm_solver_2m(steps=25, clip_x0=False, spacing=spacing).sample(
            denoise=MIXTURE.denoise, process=process, shape=(MIXTURE.dim, 1, 1),
            generators=[torch.Generator().manual_seed(i) for i in range(n)], progress=False)
        errors[spacing] = MIXTURE.sliced_wasserstein(x, exact)
    assert errors["uniform-t"] / errors["log-snr"] > 1.5, errors


def test_ddim_on_another_grid_is_deterministic_per_image():
    sampler = ddim(steps=8, spacing="edm")
    assert torch.equal(draw(sampler, 6)[4], draw(sampler, 5)[4])
    assert math.isfinite(draw(sampler, 2).sum().item())
