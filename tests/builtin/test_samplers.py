"""Samplers against the exact denoiser of a Gaussian mixture, seeds, early stop and guidance."""

from __future__ import annotations

import math

import pytest
import torch

from cdmbench.builtin.samplers import ddim, ddpm, dpm_solver_2m
from cdmbench.builtin.schedules import cosine, log_snr
from cdmbench.diffusion.mixture import GaussianMixture
from cdmbench.diffusion.process import DiscreteProcess, Prediction, make_process

MIXTURE = GaussianMixture.default()
N = 2000  # samples per check: the sampling error of the mean is ~0.01, of the weights ~0.01


def generators(n: int, offset: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


def draw(sampler, process, n: int = N, stop_at: float = 0.0):
    return sampler.sample(denoise=MIXTURE.denoise, process=process, shape=(MIXTURE.dim, 1, 1),
                          generators=generators(n), stop_at=stop_at, progress=False)


def assert_close_to(mixture: GaussianMixture, samples, *, mean=0.04, cov=0.04, weights=0.04):
    errors = mixture.errors(samples)
    assert errors["mean_error"] < mean, errors
    assert errors["cov_error"] < cov, errors
    assert errors["weight_error"] < weights, errors


def test_mixture_errors_are_small_for_exact_samples_and_large_for_wrong_ones():
    exact = MIXTURE.sample(N, torch.Generator().manual_seed(0))
    assert_close_to(MIXTURE, exact, mean=0.03, cov=0.02, weights=0.02)
    assert MIXTURE.errors(exact * 0.7)["cov_error"] > 0.05  # a shrunk distribution is caught
    reweighted = GaussianMixture(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64), MIXTURE.means, MIXTURE.stds)
    assert MIXTURE.errors(reweighted.sample(N, torch.Generator().manual_seed(0)))["weight_error"] > 0.2


def test_exact_denoiser_is_the_posterior_mean():
    """Bayes' rule by Monte Carlo: E[x_0 | x_t] = sum_i x0_i q(x_t | x0_i) / sum_i q(x_t | x0_i)
    over prior samples x0_i agrees with the closed form."""
    x0 = MIXTURE.sample(400_000, torch.Generator().manual_seed(1)).double()
    for abar, query in ((0.3, [0.1, -0.2]), (0.9, [0.4, -0.3]), (0.02, [-0.5, 0.5])):
        query = torch.tensor(query, dtype=torch.float64)
        w = torch.softmax(-((query - math.sqrt(abar) * x0) ** 2).sum(1) / (2 * (1 - abar)), 0)
        pred = MIXTURE.denoise(query.float().reshape(1, 2, 1, 1), torch.tensor([abar], dtype=torch.float64), None)
        assert pred.x0.flatten().tolist() == pytest.approx((w[:, None] * x0).sum(0).tolist(), abs=2e-3)


PROCESS = DiscreteProcess(cosine(timesteps=1000).betas())


@pytest.mark.parametrize("sampler", [
    pytest.param(ddpm(steps=None, clip_x0=False), id="ddpm-1000"),
    pytest.param(ddpm(steps=100, clip_x0=False), id="ddpm-100"),
    pytest.param(ddpm(steps=100, variance="fixed-large", clip_x0=False), id="ddpm-100-large"),
    pytest.param(ddim(steps=100, clip_x0=False), id="ddim-100"),
    pytest.param(ddim(steps=20, clip_x0=False), id="ddim-20"),
    pytest.param(ddim(steps=100, eta=1.0, clip_x0=False), id="ddim-100-eta1"),
    pytest.param(dpm_solver_2m(steps=100, clip_x0=False), id="dpm-solver-2m-100"),
    pytest.param(dpm_solver_2m(steps=20, clip_x0=False), id="dpm-solver-2m-20"),
])
@pytest.mark.slow
def test_sampler_reproduces_the_mixture(sampler):
    assert_close_to(MIXTURE, draw(sampler, PROCESS))


def test_too_few_ancestral_steps_are_detected():
    """The check is sharp enough to see ddpm's known failure at 10 steps with fixed-small
    variance (too little noise: the components shrink)."""
    errors = MIXTURE.errors(draw(ddpm(steps=10, clip_x0=False), PROCESS))
    assert errors["cov_error"] > 0.04


@pytest.mark.parametrize("sampler", [ddpm(steps=100, clip_x0=False), ddim(steps=20, clip_x0=False),
                                     dpm_solver_2m(steps=20, clip_x0=False)], ids=lambda s: s.name)
def test_early_stop_returns_q_z_s(sampler):
    s = 0.3
    z_s = draw(sampler, PROCESS, stop_at=s)
    assert_close_to(MIXTURE.at(PROCESS.abar[int(s * 1000) - 1].item()), z_s)


@pytest.mark.parametrize("sampler", [ddpm(steps=100, clip_x0=False), dpm_solver_2m(steps=20, clip_x0=False)],
                         ids=lambda s: s.name)
def test_continuous_process_any_step_count(sampler):
    process = make_process(log_snr())
    assert_close_to(MIXTURE, draw(sampler, process))
    assert_close_to(MIXTURE.at(log_snr().abar(torch.tensor(0.4)).item()), draw(sampler, process, stop_at=0.4))


@pytest.mark.parametrize("sampler", [ddpm(steps=10), ddim(steps=10, eta=0.5), dpm_solver_2m(steps=10)],
                         ids=lambda s: s.name)
def test_an_image_does_not_depend_on_its_batch(sampler):
    process = DiscreteProcess(cosine(timesteps=50).betas())
    kwargs = dict(denoise=MIXTURE.denoise, process=process, shape=(2, 1, 1), progress=False)
    together = sampler.sample(generators=generators(5), **kwargs)
    alone = sampler.sample(generators=generators(1, offset=3), **kwargs)
    assert torch.equal(together[3], alone[0])
    assert not torch.equal(together[0], together[1])


def test_learned_variance_interpolates_between_beta_tilde_and_beta():
    """ddpm with learned variance v = 0 is fixed-small and v = 1 is fixed-large, draw for draw."""
    process = DiscreteProcess(cosine(timesteps=50).betas())

    def with_frac(v: float):
        def denoise(x_t, abar, noise_cond):
            pred = MIXTURE.denoise(x_t, abar, noise_cond)
            return Prediction(pred.x0, pred.eps, torch.full_like(x_t, v))
        return denoise

    kwargs = dict(process=process, shape=(2, 1, 1), progress=False)
    for v, variance in ((0.0, "fixed-small"), (1.0, "fixed-large")):
        learned = ddpm(steps=10, variance="learned").sample(denoise=with_frac(v), generators=generators(4), **kwargs)
        fixed = ddpm(steps=10, variance=variance).sample(denoise=MIXTURE.denoise, generators=generators(4), **kwargs)
        assert torch.allclose(learned, fixed, atol=1e-6)


def test_sampler_checks_say_what_to_change():
    with pytest.raises(ValueError, match="needs a model that learns its variance"):
        ddpm(variance="learned").check(PROCESS, learned_variance=False)
    with pytest.raises(ValueError, match="set the sampler's variance: learned"):
        ddpm(steps=100).check(PROCESS, learned_variance=True)
    ddim(steps=50).check(PROCESS, learned_variance=True)  # the ODE solvers need only the mean
    with pytest.raises(ValueError, match="choose 1..1000 \\(it was trained on 1000 steps\\)"):
        dpm_solver_2m(steps=2000).check(PROCESS, learned_variance=False)
    with pytest.raises(ValueError, match="continuous process needs a step count"):
        ddpm(steps=None).check(make_process(log_snr()), learned_variance=False)


def test_compare_samplers_writes_table_and_plot(tmp_path):
    import pandas as pd
    from click.testing import CliRunner

    from cdmbench.cli import cli
    from cdmbench.plugins import load_plugins

    result = CliRunner().invoke(cli, ["compare-samplers", "--steps", "5,20", "--num-samples", "300",
                                      "--out", str(tmp_path), "--no-progress"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "samplers.csv")
    assert {"ddpm", "ddim", "dpm-solver-2m", "exact samples"} <= set(table.sampler)
    assert set(table[table.sampler == "ddim"].steps) == {5, 20}
    ran = table.dropna(subset=["evaluations"])
    assert (ran[ran.sampler == "ddim"].evaluations == ran[ran.sampler == "ddim"].steps).all()
    assert (ran.evaluations >= ran.steps).all()
    if "diffusers-heun" in load_plugins()["samplers"]:  # the diffusers plugin, which the set-up installs
        heun = ran[ran.sampler == "diffusers-heun"]
        assert not heun.empty and (heun.evaluations > heun.steps).all()  # a second-order step evaluates twice
    ddim = table[(table.sampler == "ddim") & (table.grid == "uniform-t")].set_index("steps")
    assert ddim.loc[5, "cov_error"] > ddim.loc[20, "cov_error"]  # more steps, smaller error
    assert ddim.loc[5, "sw_error"] > ddim.loc[20, "sw_error"]
    # Every built-in sampler on every grid choice; a plugin's sampler on its own.
    grids = table[table.sampler.isin(["ddpm", "ddim", "dpm-solver-2m"])].groupby("sampler").grid.agg(set)
    assert all(g == {"uniform-t", "log-snr", "edm", "linear schedule"} for g in grids)
    assert "Sliced-Wasserstein error by grid" in (tmp_path / "samplers.md").read_text()
    assert (tmp_path / "samplers.png").stat().st_size > 10_000
    assert "cdmbench compare-samplers --steps 5,20" in (tmp_path / "samplers.md").read_text()
    bad = CliRunner().invoke(cli, ["compare-samplers", "--steps", "5,x"])
    assert bad.exit_code == 2 and "comma-separated integers" in bad.output
    for steps in ("0,2", "5,2000"):
        bad = CliRunner().invoke(cli, ["compare-samplers", "--steps", steps])
        assert bad.exit_code == 2 and "step counts must be in 1..1000" in bad.output


@pytest.mark.parametrize(("args", "message"), [
    ({"spacing": "karras"}, "spacing must be one of uniform-t, log-snr, edm, got 'karras'"),
    ({"rho": 5.0}, "rho sets the edm spacing; with spacing uniform-t drop it, or set spacing: edm"),
    ({"spacing": "log-snr", "schedule": {"name": "cosine"}}, "drop the schedule or use spacing uniform-t"),
    ({"schedule": {"name": "cosinus"}}, "'cosinus' is not a built-in schedule; use one of linear, cosine, log-snr"),
    ({"schedule": "cosine"}, "schedule must be a mapping {name: ..., args: {...}}"),
    ({"schedule": {"name": "cosine", "args": {"timesteps": 0}}}, "sampling schedule 'cosine': timesteps must be in"),
    ({"schedule": {"name": "cosine", "args": {"offst": 0.1}}}, "sampling schedule 'cosine': .*offst"),
])
def test_grid_arguments_are_refused_with_the_fix(args, message):
    from cdmbench.plugins import load_plugins
    from cdmbench.registry import BuildError

    for name in ("ddpm", "ddim", "dpm-solver-2m"):
        with pytest.raises(BuildError, match=message):
            load_plugins()["samplers"].get(name).build({"steps": 10, **args})


def test_a_recipe_sets_the_grid_in_the_sampler_args(tiny_recipe):
    from cdmbench.cascade.stages import build_stage
    from cdmbench.errors import RecipeError
    from cdmbench.recipe.load import load_recipe

    recipe, plugins = load_recipe(tiny_recipe, overrides=[
        "stages.base8.sampler={name: ddim, args: {steps: 6, spacing: edm, rho: 3}}"])
    stage = build_stage(plugins, recipe, recipe.stages[0], num_classes=2)
    assert stage.sampler.spacing.kind == "edm" and stage.sampler.spacing.rho == 3.0
    assert stage.process.grid(6, 0.0, stage.sampler.spacing).steps == 6
    recipe, plugins = load_recipe(tiny_recipe, overrides=["stages.base8.sampler.args.spacing=log-snr",
                                                          "stages.base8.sampler.args.rho=7"])
    with pytest.raises(RecipeError, match="stages.base8.sampler: sampler 'ddpm'.*rho sets the edm spacing"):
        build_stage(plugins, recipe, recipe.stages[0], num_classes=2)
