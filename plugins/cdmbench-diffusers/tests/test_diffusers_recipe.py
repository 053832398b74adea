"""A cascade with a diffusers sampler on one stage and diffusers-unet2d on the other trains,
resumes from its checkpoints and samples through `cdmbench run`, as a user would run it."""

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


def test_quickstart_recipe_with_diffusers_components_trains_and_samples(tmp_path):
    args = ["run", str(RECIPE), "--out", str(tmp_path / "run"), "--no-progress"]
    for item in SHRINK:
        args += ["--set", item]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    assert (run / "sr32" / "checkpoints" / "step-00000002" / "model.safetensors").exists()
    assert (run / "base16" / "samples" / "grid.png").exists() and (run / "sr32" / "samples" / "grid.png").exists()
    recorded = (run / "run.yaml").read_text()
    assert "diffusers-unet2d" in recorded and "diffusers-dpm-solver-multistep" in recorded
