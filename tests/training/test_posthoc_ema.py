"""Post-hoc EMA's maths against closed forms and a directly computed EMA (EDM2 section 3)."""

import math

import numpy as np
import pytest
import torch

from cdmbench.training.posthoc_ema import (
    PowerEMA,
    gamma_of,
    posthoc_coefficients,
    profile_dot,
    sigma_rel_of,
)


def step_weights(t: int, gamma: float) -> np.ndarray:
    """The closed form of the weight of each step 1..t in the EMA of exponent ``gamma`` at step t:
    (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1)."""
    return np.diff((np.arange(t + 1, dtype=np.float64) / t) ** (gamma + 1))


def test_sigma_rel_and_gamma_are_each_others_inverse_and_match_edm2():
    assert gamma_of(0.05) == pytest.approx(16.97, abs=0.005)  # EDM2's stored profiles
    assert gamma_of(0.10) == pytest.approx(6.94, abs=0.005)
    for sigma_rel in (0.01, 0.05, 0.1, 0.2, 0.28):
        assert sigma_rel_of(gamma_of(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)
    for gamma in (0.5, 3.0, 6.94, 50.0):
        assert gamma_of(sigma_rel_of(gamma)) == pytest.approx(gamma, rel=1e-9)
    # the profile (gamma + 1) x^gamma on [0, 1]: its standard deviation by quadrature
    x = (np.arange(200_000) + 0.5) / 200_000
    p = 7.94 * x**6.94 / 200_000
    assert math.sqrt((p * x**2).sum() - (p * x).sum() ** 2) == pytest.approx(sigma_rel_of(6.94), rel=1e-6)
    with pytest.raises(ValueError, match=r"sigma_rel must lie in \(0, 0.2887\)"):
        gamma_of(0.3)


def test_the_recursion_weighs_each_step_as_the_profile_says():
    """Fed the unit vector e_tau at step tau, the EMA is its weights over the steps."""
    t = 50
    theta = torch.zeros(t, dtype=torch.float64)
    ema = PowerEMA({"theta": theta}, [0.0, 6.94])
    for tau in range(1, t + 1):
        theta.zero_()[tau - 1] = 1
        ema.update(tau)
    for gamma, [average] in zip(ema.gammas, ema.averages, strict=True):
        np.testing.assert_allclose(average.numpy(), step_weights(t, gamma), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(step_weights(t, 0.0), np.full(t, 1 / t))  # gamma 0: the plain average


def test_profile_inner_products_match_quadrature():
    x = (np.arange(400_000) + 0.5) / 400_000 * 300

    def profile(t, gamma):
        return np.where(x < t, (gamma + 1) * (x / t) ** gamma / t, 0.0)

    for (t_a, g_a), (t_b, g_b) in [((300, 6.94), (200, 16.97)), ((120, 3.0), (120, 3.0)), ((50, 0.5), (300, 9.0))]:
        quadrature = (profile(t_a, g_a) * profile(t_b, g_b)).sum() * 300 / 400_000
        assert profile_dot(t_a, g_a, t_b, g_b) == pytest.approx(quadrature, rel=1e-4)
        assert profile_dot(t_a, g_a, t_b, g_b) == profile_dot(t_b, g_b, t_a, g_a)
    assert math.isfinite(profile_dot(1e6, 200.0, 1e3, 200.0))  # no overflow of t^gamma


def test_an_ema_reconstructed_from_snapshots_matches_the_directly_computed_one():
    """A drifting random walk of 4000 steps; snapshots every 100 steps of the sigma_rel 0.05 and
    0.10 EMAs (EDM2's pair). The EMA of sigma_rel 0.07 (between them) and 0.12 (just outside)
    rebuilt at the last step: its profile within 0.2 % of the target's (measured 0.06 %) and
    the weights within 1e-4 of their distance from the raw weights (measured 2e-5)."""
    torch.manual_seed(0)
    steps, every = 4000, 100
    theta = torch.zeros(512, dtype=torch.float64)
    stored = PowerEMA({"theta": theta}, [gamma_of(0.05), gamma_of(0.10)])
    targets = [gamma_of(0.07), gamma_of(0.12)]
    direct = PowerEMA({"theta": theta}, targets)
    drift = torch.randn(512, dtype=torch.float64) * 0.01
    snapshots = []
    for t in range(1, steps + 1):
        theta.add_(torch.randn(512, dtype=torch.float64) * 0.1 + drift)
        stored.update(t)
        direct.update(t)
        if t % every == 0:
            snapshots += [(t, gamma, average[0].clone()) for gamma, average in zip(stored.gammas, stored.averages,
                                                                                    strict=True)]
    for gamma, [want] in zip(targets, direct.averages, strict=True):
        x = posthoc_coefficients([(t, g) for t, g, _ in snapshots], (steps, gamma))
        rebuilt = sum(float(c) * v for c, (_, _, v) in zip(x, snapshots, strict=True))
        profile = sum(c * np.pad(step_weights(t, g), (0, steps - t)) for c, (t, g, _) in zip(x, snapshots,
                                                                                             strict=True))
        target = step_weights(steps, gamma)
        assert np.linalg.norm(profile - target) / np.linalg.norm(target) < 2e-3
        assert ((rebuilt - want).norm() / (want - theta).norm()).item() < 1e-4


# --- training with snapshots, and `cdmbench ema` ---------------------------------------------------

POSTHOC = ["stages.base8.train.posthoc_ema={sigma_rels: [0.05, 0.1], snapshot_every: 1}"]


def _quiet(*_):
    pass


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(path)


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_snapshots_change_no_weight_and_a_killed_run_resumes_to_the_same_snapshots(tiny_recipe, tmp_path,
                                                                                  monkeypatch):
    """With snapshots the weights are those of a run without; a run killed after step 3's snapshot
    (its last checkpoint at step 2) resumes to snapshots and post-hoc EMAs equal to the bit to an
    uninterrupted run's; one of the stored lengths reconstructed at the last step is the stored one."""
    import cdmbench.training.trainer
    from cdmbench.training.posthoc_ema import list_snapshots, reconstruct
    from cdmbench.training.run import run

    common = dict(stage="base8", progress=False, echo=_quiet)
    plain = run(tiny_recipe, out=tmp_path / "plain", **common)
    kept = run(tiny_recipe, out=tmp_path / "kept", overrides=POSTHOC, **common)
    for name in ("model", "ema"):
        assert _same(*(_tensors(r / "base8/checkpoints/step-00000004" / f"{name}.safetensors") for r in (plain, kept)))
    assert [t for t, _ in list_snapshots(kept / "base8/posthoc_ema")] == [1, 2, 3, 4]

    class Killed(Exception):
        pass

    real_step = cdmbench.training.trainer.Trainer.step

    def killed_in_step_4(self, data, idx, step):
        if step == 3:
            raise Killed
        return real_step(self, data, idx, step)

    monkeypatch.setattr(cdmbench.training.trainer.Trainer, "step", killed_in_step_4)
    with pytest.raises(Killed):
        run(tiny_recipe, out=tmp_path / "killed", overrides=POSTHOC, **common)
    assert [t for t, _ in list_snapshots(tmp_path / "killed/base8/posthoc_ema")] == [1, 2, 3]  # checkpoint: 2
    monkeypatch.setattr(cdmbench.training.trainer.Trainer, "step", real_step)
    resumed = run(tiny_recipe, out=tmp_path / "killed", overrides=POSTHOC, **common)
    for (t, a), (u, b) in zip(list_snapshots(kept / "base8/posthoc_ema"), list_snapshots(resumed / "base8/posthoc_ema"),
                              strict=True):
        assert t == u and _same(_tensors(a / "posthoc_ema.safetensors"), _tensors(b / "posthoc_ema.safetensors"))
    assert _same(*(_tensors(r / "base8/checkpoints/step-00000004/posthoc_ema.safetensors") for r in (kept, resumed)))

    weights, info = reconstruct(kept / "base8/posthoc_ema", 0.1)
    stored = _tensors(kept / "base8/posthoc_ema/snapshot-00000004/posthoc_ema.safetensors")
    assert info["step"] == 4 and info["snapshots"] == 4 and info["profile_error"] < 1e-6
    for name, tensor in weights.items():
        assert torch.allclose(tensor, stored[f"1/{name}"], rtol=1e-4, atol=1e-6), name


@pytest.mark.slow
def test_cdmbench_ema_writes_lengths_that_sampling_uses_by_name(tiny_recipe, tmp_path):
    import json

    from click.testing import CliRunner

    from cdmbench.cli import cli
    from cdmbench.training.run import run

    out = run(tiny_recipe, out=tmp_path / "r", stage="base8", overrides=POSTHOC, progress=False, echo=_quiet)
    result = CliRunner().invoke(cli, ["ema", str(out), "--stage", "base8", "--sigma-rel", "0.07,0.12"])
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in (out / "base8/posthoc_ema").glob("sigma_rel-*.safetensors"))
    assert written == ["sigma_rel-0.0700-step-00000004.safetensors", "sigma_rel-0.1200-step-00000004.safetensors"]
    assert "base8 sigma_rel 0.07 at step 4:" in result.output
    assert "from 4 snapshots of sigma_rel 0.05, 0.1" in result.output

    sampled = []
    for setting in ([], ["--set", "stages.base8.posthoc_sigma_rel=0.07"]):
        done = CliRunner().invoke(cli, ["sample", str(out), "--stage", "base8", "--per-class", "1", "--no-progress",
                                        "--out", str(tmp_path / f"s{len(sampled)}"), *setting])
        assert done.exit_code == 0, done.output
        sampled.append(json.loads((tmp_path / f"s{len(sampled)}" / "sample.json").read_text()))
    assert sampled[1]["samplers"]["base8"].endswith(", post-hoc EMA sigma_rel 0.07")
    assert "post-hoc" not in sampled[0]["samplers"]["base8"]

    for args, message in [(["--sigma-rel", "0.5"], "--sigma-rel 0.5: sigma_rel must lie in"),
                          (["--sigma-rel", "x"], "expected comma-separated numbers")]:
        failed = CliRunner().invoke(cli, ["ema", str(out), "--stage", "base8", *args])
        assert failed.exit_code == 2 and message in failed.output, failed.output
    plain = run(tiny_recipe, out=tmp_path / "plain", stage="base8", progress=False, echo=_quiet)
    failed = CliRunner().invoke(cli, ["ema", str(plain), "--stage", "base8", "--sigma-rel", "0.07"])
    assert failed.exit_code == 2 and "was trained without post-hoc EMA snapshots" in failed.output


@pytest.mark.parametrize("overrides, path, message", [
    (["stages.base8.train.posthoc_ema.sigma_rels=[0.05, 0.3]"], "stages.base8.train.posthoc_ema.sigma_rels[1]",
     r"must be in \(0, 0.2887\)"),
    (["stages.base8.train.posthoc_ema.sigma_rels=[0.05, 0.05]"], "stages.base8.train.posthoc_ema.sigma_rels",
     "lists a length twice"),
    (["stages.base8.train.posthoc_ema={sigma_rels: [0.05], snapshot_every: 5}"],
     "stages.base8.train.posthoc_ema.snapshot_every", r"must be at most steps \(4\)"),
    (["stages.base8.posthoc_sigma_rel=0.07"], "stages.base8.posthoc_sigma_rel", "needs post-hoc EMA snapshots"),
])
def test_bad_post_hoc_settings_fail_at_validation(overrides, path, message):
    import yaml

    from cdmbench.errors import RecipeError
    from cdmbench.recipe.validate import parse_recipe
    from tests.conftest import TINY_RECIPE

    with pytest.raises(RecipeError, match=message) as info:
        parse_recipe(yaml.safe_load(TINY_RECIPE), overrides=overrides)
    assert info.value.path == path
