import copy
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cdmbench.cli import cli
from cdmbench.errors import RecipeError
from cdmbench.recipe.load import load_recipe
from cdmbench.recipe.validate import parse_recipe
from tests.conftest import ROOT


@pytest.fixture
def raw(tiny_recipe):
    return yaml.safe_load(tiny_recipe.read_text())


def error(raw, overrides=()):
    with pytest.raises(RecipeError) as info:
        parse_recipe(raw, overrides=overrides)
    return info.value


def test_valid_recipe_resolves_defaults(tiny_recipe):
    recipe, _ = load_recipe(tiny_recipe)
    assert recipe.stage_names() == ["base8", "sr16"]
    assert recipe.stages[0].augmentation.name == "none"
    assert recipe.stages[1].train.weight_decay == 0.0


@pytest.mark.parametrize("edit, path, message", [
    (lambda r: r.update(stagse=[]), "stagse", "unknown key; did you mean 'stages'?"),
    (lambda r: r["stages"][0]["train"].update(stesp=3), "stages.base8.train.stesp",
     "did you mean 'steps'?"),
    (lambda r: r["stages"][0]["train"].update(steps="ten"), "stages.base8.train.steps",
     "expected an integer, got 'ten'"),
    (lambda r: r["stages"][0]["train"].update(steps=True), "stages.base8.train.steps",
     "expected an integer"),
    (lambda r: r["stages"][1].update(resolution=4.5), "stages.sr16.resolution", "expected an integer"),
    (lambda r: r["stages"][0]["train"].pop("steps"), "stages.base8.train.steps", "required key is missing"),
    (lambda r: r["stages"][0]["backbone"].update(name="adm-unte"), "stages.base8.backbone.name",
     "unknown backbone 'adm-unte'; did you mean 'adm-unet'?"),
    (lambda r: r["stages"][1]["sampler"].update(name="dpm"), "stages.sr16.sampler.name",
     "unknown sampler 'dpm'"),
    (lambda r: r["stages"][0]["backbone"]["args"].update(chanels=64), "stages.base8.backbone.args.chanels",
     "backbone 'adm-unet' takes no argument 'chanels'; did you mean 'channels'?"),
    (lambda r: r["stages"][0]["backbone"]["args"].update(channels="wide"), "stages.base8.backbone.args.channels",
     "expected an integer"),
    (lambda r: r["stages"][0]["backbone"]["args"].update(resolution=32), "stages.base8.backbone.args.resolution",
     "is set by cdmbench from the run"),
    (lambda r: r["stages"][1].update(condition_on="base9"), "stages.sr16.condition_on",
     "'base9' is not an earlier stage; did you mean 'base8'?"),
    (lambda r: r["stages"][1].update(resolution=8), "stages.sr16.resolution", "must exceed the resolution"),
    (lambda r: r["stages"][0].update(augmentation={"name": "gaussian"}), "stages.base8.augmentation",
     "only a stage with condition_on"),
    (lambda r: r["stages"][0].update(loss="l1"), "stages.base8.loss", "unknown loss 'l1'"),
    (lambda r: r["stages"][0]["train"].update(ema=1.5), "stages.base8.train.ema", "must be in [0, 1)"),
    (lambda r: r.update(cdmbench=2), "cdmbench", "unsupported recipe format 2"),
    (lambda r: r["data"].update(name="shapez"), "data.name", "did you mean 'shapes'?"),
    (lambda r: r["data"]["args"].update(split="test"), "data.args.split", "is set by cdmbench"),
    (lambda r: r.update(device="tpu"), "device", "expected auto, cpu, cuda or cuda:N"),
    (lambda r: r["stages"][1].update(replicates=0), "stages.sr16.replicates", "must be in [1, 100], got 0"),
    (lambda r: r["stages"][1].update(replicates="two"), "stages.sr16.replicates", "expected an integer"),
    (lambda r: r["stages"][1].update(replicate_of="sr9"), "stages.sr16.replicate_of",
     "'sr9' is not an earlier stage that is not itself a replicate"),
])
def test_strict_errors_name_the_path(raw, edit, path, message):
    edit(raw)
    exc = error(raw)
    assert exc.path == path
    assert message in str(exc)


def test_replicates_append_copies_after_every_stage(raw):
    """The copies come last, so the stages before keep their positions (their seeds)."""
    raw["stages"][0]["replicates"] = 3
    recipe, _ = parse_recipe(raw, overrides=["stages.sr16.replicates=2"])
    assert recipe.stage_names() == ["base8", "sr16", "base8_r2", "base8_r3", "sr16_r2"]
    copy_ = recipe.stage("sr16_r2")
    assert copy_.replicate_of == "sr16" and recipe.stage("sr16").replicate_of is None
    assert {**vars(copy_), "name": "sr16", "replicate_of": None} == vars(recipe.stage("sr16"))
    again, _ = parse_recipe(recipe.to_dict())  # run.yaml's resolved form does not replicate again
    assert again.to_dict() == recipe.to_dict()


def test_an_override_finds_a_named_item_in_a_list_with_bare_names(raw):
    """``metrics: [is, {name: fid}]``: `--set evaluate.metrics.fid...` sets fid's key, not that
    of the item at fid's position among the mappings (the bare 'is')."""
    raw["evaluate"] = {"metrics": ["is", {"name": "fid"}]}
    recipe, _ = parse_recipe(raw, overrides=["evaluate.metrics.fid.args={bootstrap: 3}"])
    assert [(m.name, m.args) for m in recipe.evaluate.metrics] == [("is", {}), ("fid", {"bootstrap": 3})]
    assert "no item with keys named 'is'" in str(error(raw, ["evaluate.metrics.is.args={splits: 2}"]))


def test_overrides_go_through_validation(raw):
    recipe, _ = parse_recipe(raw, overrides=["stages.sr16.train.steps=7", "seed=3"])
    assert recipe.stage("sr16").train.steps == 7 and recipe.seed == 3
    assert error(raw, ["stages.sr16.train.steps=many"]).path == "stages.sr16.train.steps"
    assert "no stage 'sr61'; did you mean 'sr16'?" in str(error(raw, ["stages.sr61.train.steps=1"]))
    assert "expected key=value" in str(error(raw, ["seed"]))
    broken = error(raw, ["stages.base8.train.steps=[1"])
    assert broken.path == "stages.base8.train.steps" and "--set value '[1' is not valid YAML" in str(broken)
    for key in ("seed", "sample.seed"):  # a negative seed would fail only when images are seeded
        assert error(copy.deepcopy(raw), ["stages.sr16.train.steps=7", f"{key}=-1"]).path == key


def test_validate_cli_prints_path_and_suggestion_without_traceback(tiny_recipe):
    tiny_recipe.write_text(tiny_recipe.read_text().replace("num_res_blocks: 1", "num_res_block: 1", 1))
    result = CliRunner().invoke(cli, ["validate", str(tiny_recipe)])
    assert result.exit_code == 2
    assert "stages.base8.backbone.args.num_res_block" in result.output
    assert "did you mean 'num_res_blocks'?" in result.output
    assert "Traceback" not in result.output


def test_validate_cli_reports_factory_errors_with_path(tiny_recipe):
    result = CliRunner().invoke(cli, ["validate", str(tiny_recipe),
                                      "--set", "stages.sr16.backbone.args.attention_resolutions=[3]"])
    assert result.exit_code == 2
    assert "stages.sr16.backbone: backbone 'adm-unet': " in result.output
    assert "attention_resolutions contains 3" in result.output


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n")
    with pytest.raises(RecipeError, match="is not valid YAML"):
        load_recipe(bad)


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    data = yaml.safe_load(path.read_text())["data"]
    if data["name"] == "fashion-mnist" and not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    # ImageNet from the Hub cannot be reached here: check the stages against a local stand-in.
    extra = ["--set", "data={name: shapes}"] if data["name"] == "hf" else []
    result = CliRunner().invoke(cli, ["validate", str(path), *extra])
    assert result.exit_code == 0, result.output
    assert all(f"{s['name']} " in result.output for s in yaml.safe_load(path.read_text())["stages"])


@pytest.mark.parametrize("args", [["sample", "RUN", "--batch-size", "0"], ["sample", "RUN", "--seed", "-1"],
                                  ["evaluate", "RUN", "--num-samples", "-3"], ["sweep", "RUN", "--stage", "sr16",
                                  "--levels", "0.1", "--num-samples", "0"], ["bench", "R.yaml", "--steps", "0"]])
def test_integer_options_are_checked_before_any_work(args):
    """0 would fall back to the recipe's default (50,000 samples for evaluate), a negative count
    or batch fail with a traceback after loading everything."""
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "is not in the range" in result.output


def test_args_are_checked_against_tuple_literal_and_dict_hints():
    from typing import Literal

    from cdmbench.recipe.validate import _convert

    assert _convert([3, "x"], tuple[int, str], "a") == [3, "x"]
    assert _convert([1, 2, 3], tuple[int, ...], "a") == [1, 2, 3]
    with pytest.raises(RecipeError, match=r"a\[1\]: expected a string, got 4"):
        _convert([3, 4], tuple[int, str], "a")
    with pytest.raises(RecipeError, match="a: expected a list of 2 items"):
        _convert([3], tuple[int, str], "a")
    assert _convert("fast", Literal["fast", "slow"], "m") == "fast"
    with pytest.raises(RecipeError, match="m: expected one of 'fast', 'slow', got 'bogus'"):
        _convert("bogus", Literal["fast", "slow"], "m")
    with pytest.raises(RecipeError, match="w.a: expected an integer, got 'x'"):
        _convert({"a": "x"}, dict[str, int], "w")


def test_a_component_mapping_without_a_name_says_so(raw):
    """The error of the option the value's shape matches (a mapping: a Component), not 'expected
    Component or list[Component]'."""
    exc = error(raw, ["stages.base8.augmentation={args: {level: 0.1}}"])
    assert exc.path == "stages.base8.augmentation.name" and "required key is missing" in str(exc)
