"""`cdmbench sample`: chosen classes from a trained run, reproducible per image."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cdmbench.cascade.sample import sample_run
from cdmbench.cli import cli
from cdmbench.errors import CdmbenchError
from cdmbench.training.run import run
from tests.conftest import TINY_RECIPE


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny 8 -> 16 cascade, trained (4 steps a stage)."""
    folder = tmp_path_factory.mktemp("trained")
    (folder / "tiny.yaml").write_text(TINY_RECIPE)
    return run(folder / "tiny.yaml", out=folder / "run", progress=False, echo=lambda *_: None)


def quiet(*_):
    pass


def test_sample_writes_images_grids_npz_and_settings(trained, tmp_path):
    out = tmp_path / "s"
    result = CliRunner().invoke(cli, ["sample", str(trained), "--classes", "3,heart (speckle)", "--per-class", "2",
                                      "--seed", "5", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    with np.load(out / "samples.npz") as npz:
        images, labels = npz["images"], npz["labels"]
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    settings = json.loads((out / "sample.json").read_text())
    assert labels.tolist() == [3, 3, 9, 9] and settings["classes"] == [3, 9]  # by index and by name
    for i, label in enumerate(labels):  # the PNG files are the npz images
        assert (np.asarray(Image.open(out / "images" / f"{i:05d}-class{label}.png")) == images[i]).all()
    assert {p.name for p in out.glob("*_grid.png")} == {"base8_grid.png", "sr16_grid.png"}
    assert settings["checkpoint_steps"] == {"base8": 4, "sr16": 4} and settings["seed"] == 5
    assert settings["levels"] == {"sr16": 0.1} and settings["samplers"]["sr16"].startswith("ddpm")
    # Sampling again into the folder replaces the earlier sample, instead of mixing with it.
    sample_run(trained, stage="base8", classes=["0"], per_class=1, out=out, progress=False, echo=quiet)
    assert [p.name for p in (out / "images").iterdir()] == ["00000-class0.png"]
    assert [p.name for p in out.glob("*_grid.png")] == ["base8_grid.png"]


def test_an_image_depends_on_its_seed_and_id_not_on_the_other_classes(trained, tmp_path):
    one = sample_run(trained, classes=["2"], per_class=2, seed=1, out=tmp_path / "one", progress=False, echo=quiet)
    two = sample_run(trained, classes=["2", "7"], per_class=2, seed=1, batch_size=3, out=tmp_path / "two",
                     progress=False, echo=quiet)
    other_seed = sample_run(trained, classes=["2"], per_class=2, seed=2, out=tmp_path / "three",
                            progress=False, echo=quiet)
    images = {p: np.load(p / "samples.npz")["images"] for p in (one, two, other_seed)}
    assert (images[one] == images[two][:2]).all()  # ids 0, 1 in both; batches of 16 and of 3
    assert not (images[one] == images[other_seed]).all()


def test_images_go_through_the_cascade_a_chunk_at_a_time_to_the_same_pixels(trained, tmp_path, monkeypatch):
    """Memory holds a chunk (CHUNK images) of every stage, not all of them; grids show a class's
    first GRID_COLUMNS images."""
    import cdmbench.cascade.sample

    whole = sample_run(trained, classes=["1", "4"], per_class=5, out=tmp_path / "whole", progress=False, echo=quiet)
    monkeypatch.setattr(cdmbench.cascade.sample, "CHUNK", 3)
    monkeypatch.setattr(cdmbench.cascade.sample, "GRID_COLUMNS", 2)
    calls = []
    real = cdmbench.cascade.sample.sample_cascade
    monkeypatch.setattr(cdmbench.cascade.sample, "sample_cascade",
                        lambda *a, **k: calls.append((len(a[2]), k["first_id"])) or real(*a, **k))
    chunked = sample_run(trained, classes=["1", "4"], per_class=5, out=tmp_path / "chunked", progress=False,
                         echo=quiet)
    assert calls == [(3, 0), (3, 3), (3, 6), (1, 9)]
    for name in ("images", "labels"):
        assert (np.load(whole / "samples.npz")[name] == np.load(chunked / "samples.npz")[name]).all()
    for stage in ("base8", "sr16"):  # 2 rows (classes), 2 columns of 64 px tiles (2 px apart) after the labels
        assert Image.open(chunked / f"{stage}_grid.png").size == (96 + 2 * 66, 2 * 66)
        left = Image.open(whole / f"{stage}_grid.png").crop((0, 0, 96 + 2 * 66, 2 * 66))
        assert (np.asarray(left) == np.asarray(Image.open(chunked / f"{stage}_grid.png"))).all()  # the first two


def test_a_level_changes_the_sr_stage_and_not_the_base(trained, tmp_path):
    common = dict(classes=["1"], per_class=2, progress=False, echo=quiet)
    low = sample_run(trained, levels={"sr16": 0.0}, out=tmp_path / "low", **common)
    high = sample_run(trained, levels={"sr16": 0.3}, out=tmp_path / "high", **common)
    assert json.loads((high / "sample.json").read_text())["levels"] == {"sr16": 0.3}
    assert not (np.load(low / "samples.npz")["images"] == np.load(high / "samples.npz")["images"]).all()
    base = [np.asarray(Image.open(folder / "base8_grid.png")) for folder in (low, high)]
    assert (base[0] == base[1]).all()


def test_bf16_sampling_is_recorded_and_close_to_fp32(trained, tmp_path):
    common = dict(classes=["4"], per_class=3, progress=False, echo=quiet)
    full = sample_run(trained, out=tmp_path / "fp32", **common)
    half = sample_run(trained, out=tmp_path / "bf16", overrides=["sample.precision=bf16"], **common)
    samplers = json.loads((half / "sample.json").read_text())["samplers"]
    assert samplers["base8"].endswith(", bf16") and not json.loads((full / "sample.json").read_text())[
        "samplers"]["base8"].endswith("bf16")
    a, b = (np.load(f / "samples.npz")["images"].astype(int) for f in (full, half))
    assert (a != b).any() and np.abs(a - b).mean() < 1  # uint8 levels: the same images, rounded apart


@pytest.mark.parametrize("kwargs, message", [
    (dict(classes=["12"]), r"unknown class '12': give an index in 0..9 or a class name \(0="),
    (dict(levels={"base8": 0.1}), r"stage base8 has no augmentation with a level"),
    (dict(levels={"sr32": 0.1}), r"sr32 is not among the stages that make sr16 \(base8, sr16\)"),
    (dict(levels={"sr16": 1.5}), r"a level s must be in \[0, 1\]"),
    (dict(stage="sr32"), r"no stage 'sr32'; did you mean 'sr16'"),
    (dict(per_class=0), r"sample at least one image per class"),
])
def test_bad_requests_are_refused_with_the_fix(trained, tmp_path, kwargs, message):
    with pytest.raises(CdmbenchError, match=message):
        sample_run(trained, out=tmp_path / "x", progress=False, echo=quiet, **kwargs)


def test_an_untrained_run_says_to_train_first(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_RECIPE)
    run(tmp_path / "tiny.yaml", out=tmp_path / "run", stage="base8", progress=False, echo=quiet,
        overrides=["stages.base8.train.steps=1"])
    with pytest.raises(CdmbenchError, match=r"no readable checkpoint in .*sr16.*train the stages first"):
        sample_run(tmp_path / "run", progress=False, echo=quiet)


def test_sampling_needs_the_checkpoints_not_the_dataset(trained, tmp_path, monkeypatch):
    import cdmbench.cascade.sample

    def no_data(*args, **kwargs):
        raise AssertionError("the dataset was built")

    monkeypatch.setattr(cdmbench.cascade.sample, "make_dataset", no_data)
    out = sample_run(trained, classes=["heart (speckle)"], per_class=1, out=tmp_path / "s", progress=False,
                     echo=quiet)  # the class names come from run.yaml
    assert json.loads((out / "sample.json").read_text())["classes"] == [9]


def test_only_the_stages_up_to_the_sampled_one_are_built(trained, tmp_path, monkeypatch):
    import cdmbench.cascade.stages

    built, real = [], cdmbench.cascade.stages.build_stage

    def counted(plugins, recipe, spec, **kwargs):
        built.append(spec.name)
        return real(plugins, recipe, spec, **kwargs)

    monkeypatch.setattr(cdmbench.cascade.stages, "build_stage", counted)  # build_chain's
    sample_run(trained, stage="base8", classes=["0"], per_class=1, out=tmp_path / "b", progress=False, echo=quiet)
    assert built == ["base8"]  # not sr16: its weights are never allocated


@pytest.mark.parametrize("override, difference", [
    ("stages.base8.loss=v", "stages.base8.loss: 'simple' -> 'v'"),
    ("stages.base8.schedule.name=linear", "stages.base8.schedule.name: 'cosine' -> 'linear'"),
    ("stages.base8.backbone.args.channels=64", "stages.base8.backbone.args.channels: 32 -> 64"),
])
def test_sample_and_evaluate_refuse_overrides_of_the_trained_weights(trained, tmp_path, override, difference):
    message = (f"trained with a different recipe ({difference}); sampling and evaluation may only change "
               "sampling settings")
    with pytest.raises(CdmbenchError, match=re.escape(message)):
        sample_run(trained, overrides=[override], out=tmp_path / "x", progress=False, echo=quiet)
    result = CliRunner().invoke(cli, ["evaluate", str(trained), "--metrics", "fid", "--set", override])
    assert result.exit_code == 2 and message in result.output


def test_an_overridden_level_wins_over_the_sweeps_choice(trained, tmp_path):
    from cdmbench.evaluation.evaluate import _evaluation_setup

    run_dir = shutil.copytree(trained, tmp_path / "run")
    (run_dir / "cascade.json").write_text(json.dumps({"sr16": {"level": 0.3}}))
    override = ["stages.sr16.augmentation.args.level=0.2"]  # a sampling setting: allowed
    common = dict(classes=["1"], per_class=1, progress=False, echo=quiet)
    for overrides, out, level in [([], "chosen", 0.3), (override, "set", 0.2)]:
        folder = sample_run(run_dir, overrides=overrides, out=tmp_path / out, **common)
        assert json.loads((folder / "sample.json").read_text())["levels"] == {"sr16": level}
    chain = _evaluation_setup(run_dir, "sr16", ["fid"], override, False, quiet)[4]
    assert chain[-1].augmentation.level == 0.2


def test_a_truncated_level_is_checked_against_the_previous_stages_sampler(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_RECIPE)
    run(tmp_path / "tiny.yaml", out=tmp_path / "run", progress=False, echo=quiet,
        overrides=["stages.base8.train.steps=1", "stages.sr16.train.steps=1",
                   "stages.sr16.augmentation.args.mode=truncated"])
    with pytest.raises(CdmbenchError, match=r"--level sr16=0.99: stage sr16 is truncated, and stage base8's "
                                            r"sampler cannot stop there: level 0.99 is not a step of this 50-step"):
        sample_run(tmp_path / "run", levels={"sr16": 0.99}, out=tmp_path / "x", progress=False, echo=quiet)


@pytest.mark.parametrize("stage, levels, message", [
    ("base8", [0.1], r"stage base8 is a base stage"),
    ("sr16", [0.1, 1.5], r"level 1.5 is outside \[0, 1\]"),
    ("sr16", [0.1], r"no readable checkpoint in .*sr16"),
])
def test_a_sweep_checks_its_input_and_loads_the_checkpoints_before_preparing_the_metrics(
        trained, tmp_path, monkeypatch, stage, levels, message):
    from cdmbench.builtin.metrics import FID
    from cdmbench.evaluation.evaluate import sweep_levels

    monkeypatch.setattr(FID, "prepare", lambda self, context: pytest.fail("the metric was prepared"))
    run_dir = shutil.copytree(trained, tmp_path / "run")
    shutil.rmtree(run_dir / "sr16" / "checkpoints")
    with pytest.raises(CdmbenchError, match=message):
        sweep_levels(run_dir, stage=stage, levels=levels, inputs=["generated"], metrics=["fid"],
                     progress=False, echo=quiet)
