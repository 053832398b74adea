"""diffusers schedulers against cdmbench's own samplers and an exact denoiser."""

import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("cdmbench_diffusers")

from cdmbench.builtin.schedules import cosine, linear, log_snr  # noqa: E402
from cdmbench.diffusion import ContinuousProcess, DiscreteProcess, Prediction, eps_from_x0, noise_level_cond  # noqa: E402
from cdmbench.plugins import load_plugins  # noqa: E402
from cdmbench.registry import BuildError  # noqa: E402

PLUGINS = load_plugins()
DISCRETE = DiscreteProcess(cosine(timesteps=1000).betas())


def sampler(name, **args):
    return PLUGINS["samplers"].get(name).build(args)


def gaussian_denoiser(var=0.25):
    """E[x_0 | x_t] for x_0 ~ N(0, var) per pixel; records the levels it is called at."""
    seen = []

    def denoise(x_t, abar, noise_cond):
        seen.append((abar[0].item(), noise_cond[0].item()))
        a = abar.to(x_t.dtype).view(-1, 1, 1, 1)
        x0 = a.sqrt() * var / (a * var + 1 - a) * x_t
        return Prediction(x0, eps_from_x0(x_t, a, x0))
    denoise.seen = seen
    return denoise


def run(s, denoise, process=DISCRETE, n=64, stop_at=0.0):
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    return s.sample(denoise=denoise, process=process, shape=(1, 2, 2), generators=gens,
                    stop_at=stop_at, progress=False)


def test_dpm_solver_multistep_equals_cdmbench_dpm_solver_2m_on_the_same_grid():
    """Both are DPM-Solver++(2M), first order on the first step: stopped at s = 0.1 (before the
    step into the smallest level, which cdmbench's takes first order and diffusers' second
    order) they visit the same levels with the same noise conditioning and give the same z_s."""
    ours, theirs = gaussian_denoiser(), gaussian_denoiser()
    a = run(sampler("dpm-solver-2m", steps=10), ours, stop_at=0.1)
    b = run(sampler("diffusers-dpm-solver-multistep", steps=10), theirs, stop_at=0.1)
    assert [round(nc, 3) for _, nc in ours.seen] == [round(nc, 3) for _, nc in theirs.seen]
    assert torch.allclose(torch.tensor(ours.seen), torch.tensor(theirs.seen), rtol=1e-5)
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-4)  # diffusers keeps abar in float32


CONTINUOUS = ContinuousProcess(log_snr(logsnr_min=-4, logsnr_max=10))  # abar_T = 0.018


@pytest.mark.parametrize("name", ["diffusers-dpm-solver-multistep", "diffusers-euler"])
def test_continuous_process_is_walked_on_its_own_grid(name):
    """10 steps visit t = 1.0, 0.9, ..., 0.1 as process.grid does (not 1.0, 0.889, ..., 0.001);
    Euler in sigma space is DDIM, so on that grid and from the same z_T it gives ddim's samples."""
    ours, theirs = gaussian_denoiser(), gaussian_denoiser()
    a = run(sampler("ddim", steps=10), ours, process=CONTINUOUS)
    b = run(sampler(name, steps=10), theirs, process=CONTINUOUS)
    levels = CONTINUOUS.abar_at(torch.arange(10, 0, -1, dtype=torch.float64) / 10)  # t = 1.0, 0.9, ..., 0.1
    assert torch.allclose(torch.tensor([nc for _, nc in theirs.seen]), noise_level_cond(levels).float(), rtol=1e-5)
    assert torch.allclose(torch.tensor(ours.seen), torch.tensor(theirs.seen), rtol=1e-5)
    if name == "diffusers-euler":
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


@pytest.mark.parametrize("name", ["diffusers-euler", "diffusers-heun"])
def test_sigma_space_schedulers_start_from_standard_normal_z_T(name):
    """The first model input is z_T ~ N(0, I), as for ddim (x_T = z_T / sqrt(abar_T) in sigma
    space), not sigma_max N(0, I), whose z-space std is sqrt(1 - abar_T) = 0.991."""
    first = []

    def record(x_t, abar, noise_cond):
        first.append(x_t)
        x0 = torch.zeros_like(x_t)
        return Prediction(x0, eps_from_x0(x_t, abar.to(x_t.dtype).view(-1, 1, 1, 1), x0))
    gens = [torch.Generator().manual_seed(i) for i in range(500)]
    sampler(name, steps=5).sample(denoise=record, process=CONTINUOUS, shape=(1, 16, 16),
                                  generators=gens, progress=False)
    z_T = torch.stack([torch.randn((1, 16, 16), generator=torch.Generator().manual_seed(i)) for i in range(500)])
    assert abs(first[0].std().item() - 1) < 3 / (2 * z_T.numel()) ** 0.5  # 3 standard errors
    assert torch.allclose(first[0], z_T, atol=1e-5)


@pytest.mark.parametrize("name", ["diffusers-dpm-solver-multistep", "diffusers-euler", "diffusers-heun"])
@pytest.mark.parametrize("process", [DiscreteProcess(linear(timesteps=1000).betas()),
                                     ContinuousProcess(log_snr(logsnr_min=-10, logsnr_max=10))],
                         ids=["discrete", "continuous"])
def test_early_stop_returns_z_s_on_the_flow_of_a_point_mass(name, process):
    """For data = the point c, the probability-flow ODE keeps eps fixed: z_s = sqrt(abar_s) c +
    sqrt(1 - abar_s) eps_T exactly, so a deterministic solver stopped at s must land there.
    (Schedules with sigma_max <= ~150: diffusers' sigma-space solvers work in float32, and Heun's
    first step from cosine's sigma_max = 2e4 loses the precision this test asks for.)"""
    c, s, n = 0.3, 0.2, 8
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    x_T = torch.stack([torch.randn((1, 2, 2), generator=torch.Generator().manual_seed(i)) for i in range(n)])

    def point(x_t, abar, noise_cond):
        x0 = torch.full_like(x_t, c)
        return Prediction(x0, eps_from_x0(x_t, abar.to(x_t.dtype).view(-1, 1, 1, 1), x0))

    z = sampler(name, steps=12).sample(denoise=point, process=process, shape=(1, 2, 2), generators=gens,
                                       stop_at=s, progress=False)
    if process.continuous:
        abar_T, abar_s = (process.abar_at(torch.tensor([t])).item() for t in (1.0, s))
    else:
        abar_T, abar_s = process.abar[-1].item(), process.abar[process.level_index(s)].item()
    eps = (x_T - math.sqrt(abar_T) * c) / math.sqrt(1 - abar_T)
    expected = math.sqrt(abar_s) * c + math.sqrt(1 - abar_s) * eps
    assert torch.allclose(z, expected, atol=2e-3), (z - expected).abs().max()


@pytest.mark.parametrize("name", ["diffusers-unipc", "diffusers-euler-ancestral"])
def test_schedulers_without_custom_timesteps_refuse_an_early_stop(name):
    with pytest.raises(ValueError, match="takes no custom timesteps, so it cannot stop early at level 0.2"):
        run(sampler(name), gaussian_denoiser(), stop_at=0.2)


def test_a_stop_level_off_the_continuous_table_is_refused_with_the_nearest():
    with pytest.raises(ValueError, match=r"multiple of 1/1000, e.g. 0.123"):
        run(sampler("diffusers-euler"), gaussian_denoiser(), process=ContinuousProcess(log_snr()),
            stop_at=0.12345)


def test_too_many_steps_and_unknown_schedulers_are_clear_errors():
    with pytest.raises(ValueError, match=r"cannot take 990 steps between level 0.02 and pure noise on "
                                         r"1000 trained levels; choose 1..980"):
        run(sampler("diffusers-euler", steps=990), gaussian_denoiser(), stop_at=0.02)
    with pytest.raises(BuildError, match="has no scheduler 'NoSuchScheduler'; choose one of .*EulerDiscreteScheduler"):
        sampler("diffusers-scheduler", scheduler="NoSuchScheduler")


def test_stochastic_scheduler_draws_per_image_noise():
    s = sampler("diffusers-euler-ancestral", steps=10)
    batch = run(s, gaussian_denoiser(), n=4)
    gens = [torch.Generator().manual_seed(2)]
    alone = s.sample(denoise=gaussian_denoiser(), process=DISCRETE, shape=(1, 2, 2), generators=gens,
                     progress=False)
    assert torch.allclose(alone, batch[2:3], atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])


def test_a_native_spacing_that_repeats_a_timestep_is_refused_before_sampling():
    """UniPC's own linspace spacing of T steps over T trained steps repeats one (NaN otherwise)."""
    with pytest.raises(ValueError, match="repeats a timestep .* use at most 999 steps"):
        sampler("diffusers-unipc", steps=1000).check(DISCRETE, learned_variance=False)
    sampler("diffusers-unipc", steps=999).check(DISCRETE, learned_variance=False)
