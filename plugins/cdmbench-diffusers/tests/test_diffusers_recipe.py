"""A cascade with a diffusers sampler on one stage and diffusers-unet2d on the other trains and
samples through `cdmbench run`, as a user would run it; bench and sweep use the plugin's components."""

from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("cdmbench_diffusers")

from click.testing import CliRunner  # noqa: E402

from cdmbench.cli import cli  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart_diffusers.yaml"
SHRINK = ["data.args.num_images=40", "sample.images_per_class=1",
          "stages.base16.train.steps=2", "stages.sr32.train.steps=2",
          "stages.base16.train.batch_size=4", "stages.sr32.train.batch_size=4",
          "stages.base16.sampler.args.steps=3", "stages.sr32.sampler.args.steps=3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The recipe, shrunk, trained and sampled once through the command line."""
    run = tmp_path_factory.mktemp("diffusers") / "run"
    args = ["run", str(RECIPE), "--out", str(run), "--no-progress"]
    for item in SHRINK:
        args += ["--set", item]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return run


def test_quickstart_recipe_with_diffusers_components_trains_and_samples(trained):
    run = trained
    assert (run / "sr32" / "checkpoints" / "step-00000002" / "model.safetensors").exists()
    assert (run / "base16" / "samples" / "grid.png").exists() and (run / "sr32" / "samples" / "grid.png").exists()
    recorded = (run / "run.yaml").read_text()
    assert "diffusers-unet2d" in recorded and "diffusers-dpm-solver-multistep" in recorded


@pytest.mark.slow
def test_bench_sets_adm_unet_and_diffusers_unet2d_side_by_side(tmp_path):
    """One bench run, one table: the same stage configuration on both backbones."""
    import json

    args = ["bench", str(RECIPE), "--stage", "sr32", "--steps", "1", "--warmup", "0", "--no-compile",
            "--backbone", "adm-unet", "--backbone", "diffusers-unet2d", "--out", str(tmp_path),
            "--set", "stages.sr32.train.batch_size=2", "--set", "sample.batch_size=2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(next(tmp_path.glob("quickstart-diffusers-sr32-*.json")).read_text())["rows"]
    train = {r["what"]: r for r in rows if r["what"].startswith("train")}
    assert set(train) == {"train sr32 adm-unet (eager)", "train sr32 diffusers-unet2d (eager)"}
    a, b = train.values()
    assert a["images/s"] > 0 and b["images/s"] > 0 and a["GFLOP/image"] > 0 and b["GFLOP/image"] > 0
    assert abs(b["parameters (M)"] / a["parameters (M)"] - 1) < 0.1  # the same configuration


def test_a_sweep_compares_cdmbench_and_diffusers_samplers_on_one_checkpoint(trained, tmp_path, monkeypatch):
    """The same trained SR stage swept with ddpm (the recipe's) and with diffusers-euler: rows
    for both, told apart by the samplers in their protocol."""
    import json

    monkeypatch.setenv("CDMBENCH_CACHE", str(tmp_path / "cache"))
    common = ["sweep", str(trained), "--stage", "sr32", "--levels", "0,0.1", "--inputs", "ground-truth",
              "--set=evaluate.metrics=[{name: is, args: {features: classifier, features_args: {epochs: 1}}}]",
              "--set=evaluate.num_samples=10", "--set=evaluate.batch_size=10", "--no-progress"]
    for sampler in ("ddpm", "diffusers-euler"):
        result = CliRunner().invoke(
            cli, [*common, f"--set=stages.sr32.sampler={{name: {sampler}, args: {{steps: 3}}}}"]
        )
        assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (trained / "results.jsonl").read_text().splitlines()]
    swept = [r for r in rows if r["metric"] == "is_classifier"]
    used = {(r["protocol"]["samplers"]["sr32"], r["protocol"]["level"]) for r in swept}
    assert used == {(f"{s} {{'steps': 3}}", level) for s in ("ddpm", "diffusers-euler") for level in (0.0, 0.1)}
