"""``--smoke``: the shrink rules, the shapes stand-in with any class count, end-to-end runs."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from cdmbench.builtin.shapes import CLASSES, shapes
from cdmbench.cli import cli
from cdmbench.recipe.load import load_recipe
from cdmbench.recipe.smoke import smoke
from cdmbench.recipe.validate import parse_recipe

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def offline(monkeypatch):
    """Any use of the Hub fails the test: the class count of a known Hub id comes from the
    table, without network (there is none here) and without retries."""
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError(f"the Hub was asked for {args}")

    for name in ("load_dataset", "load_dataset_builder"):
        monkeypatch.setattr(datasets, name, no_hub)


def _raw(name: str) -> dict:
    return yaml.safe_load((ROOT / "recipes" / name).read_text())


def test_smoke_shrinks_the_256_recipe():
    raw = _raw("cdm_imagenet256.yaml")
    out = smoke(raw, 1000)
    assert raw["stages"][0]["backbone"]["args"]["channels"] == 256  # the input is not changed
    assert out["name"] == "cdm-imagenet256-smoke"
    assert out["data"] == {"name": "shapes", "args": {"num_images": 2000, "num_classes": 1000}}
    stages = {s["name"]: s for s in out["stages"]}
    assert [s["resolution"] for s in out["stages"]] == [32, 64, 256]
    for name, mult_len, attention, heads in (("base32", 4, [16, 8], 4), ("sr64", 4, [16, 8], 4), ("sr256", 6, [16], 1)):
        args = stages[name]["backbone"]["args"]
        assert args["channels"] == 32 and args["num_res_blocks"] == 1
        assert (args["num_heads"], args["num_head_channels"]) == (heads, -1)  # a head count is kept
        assert args["channel_mult"] == [1] * mult_len and args["attention_resolutions"] == attention
        train = stages[name]["train"]
        assert (train["steps"], train["batch_size"], train["checkpoint_every"], train["log_every"]) == (2, 2, 1, 1)
        assert train["precision"] == "fp32" and train["compile"] is False
        assert stages[name]["sampler"]["args"]["steps"] == 10
    assert stages["base32"]["schedule"]["args"]["timesteps"] == 100
    assert stages["sr64"]["schedule"]["args"]["timesteps"] == 100
    assert stages["sr256"]["schedule"] == {"name": "log-snr", "args": {"logsnr_min": -20.0, "logsnr_max": 20.0}}
    assert stages["base32"]["sampler"]["args"]["variance"] == "learned"  # other sampler args kept
    assert out["sample"] == {"images_per_class": 1, "batch_size": 8, "num_classes": 4}
    evaluate = out["evaluate"]
    assert (evaluate["num_samples"], evaluate["batch_size"], evaluate["shard_size"]) == (16, 8, 8)
    cas = next(m for m in evaluate["metrics"] if isinstance(m, dict) and m["name"] == "cas")
    assert (cas["args"]["epochs"], cas["args"]["batch_size"], cas["args"]["paper_protocol"]) == (1, 16, False)
    assert next(m for m in raw["evaluate"]["metrics"] if isinstance(m, dict) and m["name"] == "cas")[
        "args"]["paper_protocol"] is True  # the recipe: the paper's CAS
    recipe, _ = parse_recipe(out)  # a valid recipe
    assert recipe.sample.num_classes == 4


def test_smoke_shrinks_any_backbone_with_adm_unets_arguments():
    """diffusers-unet2d takes adm-unet's arguments: a swapped backbone is shrunk the same way."""
    raw = _raw("cdm_imagenet64.yaml")
    raw["stages"][0]["backbone"]["name"] = "diffusers-unet2d"
    raw["stages"][0]["backbone"]["args"]["num_head_channels"] = 64  # a width per head: shrunk to 32
    raw["stages"][1]["backbone"] = {"name": "other-net", "args": {"width": 512}}  # unknown arguments: kept
    out = smoke(raw, 1000)
    args = out["stages"][0]["backbone"]["args"]
    assert (args["channels"], args["channel_mult"], args["num_res_blocks"], args["num_head_channels"]) == (
        32, [1, 1, 1, 1], 1, 32)
    assert out["stages"][1]["backbone"]["args"] == {"width": 512}


def test_smoke_rounds_truncated_levels_and_caps_classifier_epochs():
    raw = _raw("ablation_augmentation.yaml")
    raw["stages"][0]["schedule"]["args"]["timesteps"] = 1000
    trunc = next(s for s in raw["stages"] if s["name"] == "sr_trunc")
    trunc["augmentation"]["args"]["level"] = 0.123  # 123/1000 -> 12/100
    out = smoke(raw, 10)
    trunc = next(s for s in out["stages"] if s["name"] == "sr_trunc")
    assert trunc["augmentation"]["args"]["level"] == pytest.approx(0.12)
    assert out["stages"][0]["sampler"]["args"]["steps"] == 10
    fid = out["evaluate"]["metrics"][0]
    assert fid["args"]["features_args"]["epochs"] == 1
    assert out["data"]["args"] == {"num_images": 32, "num_classes": 10}
    parse_recipe(out)


def test_set_wins_over_smoke(offline, tmp_path):
    recipe, _ = load_recipe(ROOT / "recipes" / "quickstart.yaml", smoke=True, echo=lambda _: None,
                            overrides=["stages.base16.train.steps=3", "sample.num_classes=2"])
    assert recipe.name == "quickstart-smoke"
    assert recipe.stage("base16").train.steps == 3 and recipe.stage("sr32").train.steps == 2
    assert recipe.sample.num_classes == 2
    assert recipe.data.name == "shapes" and recipe.data.args["num_classes"] == 10


def _check_run(result, out: Path, stages: list[str], notes: str) -> None:
    assert result.exit_code == 0, result.output
    assert notes in result.output
    for name in stages:
        grid = out / name / "samples" / "grid.png"
        assert grid.is_file()
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows if r["metric"] == "sample_time"} == set(stages)
    assert all(r["n"] == 4 for r in rows if r["metric"] == "sample_time")  # 4 classes x 1 image
    saved = yaml.safe_load((out / "run.yaml").read_text())["recipe"]
    assert saved["data"]["args"]["num_classes"] == 1000 and saved["name"].endswith("-smoke")


@pytest.mark.slow
def test_smoke_run_imagenet64(offline, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(ROOT / "recipes" / "cdm_imagenet64.yaml"), "--smoke",
                                      "--out", str(out), "--no-progress"])
    _check_run(result, out, ["base32", "sr64"],
               "stand-in data with 1000 classes (the known class count of ILSVRC/imagenet-1k)")


@pytest.mark.slow
def test_smoke_run_imagenet256(offline, tmp_path):  # ~50 s on a 2-core CPU
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", str(ROOT / "recipes" / "cdm_imagenet256.yaml"), "--smoke",
                                      "--out", str(out), "--no-progress"])
    _check_run(result, out, ["base32", "sr64", "sr256"], "stand-in data with 1000 classes")


@pytest.mark.slow
def test_dry_run_of_an_imagenet_recipe_needs_no_network_or_data(offline):
    result = CliRunner().invoke(cli, ["run", str(ROOT / "recipes" / "cdm_imagenet256.yaml"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "class embeddings for 1000 classes (the known class count of ILSVRC/imagenet-1k)" in result.output
    for stage in ("base32", "sr64", "sr256"):
        assert stage in result.output


def test_validate_smoke(offline):
    result = CliRunner().invoke(cli, ["validate", str(ROOT / "recipes" / "quickstart.yaml"), "--smoke"])
    assert result.exit_code == 0, result.output
    assert "stand-in data with 10 classes (as shapes has)" in result.output


def test_shapes_with_more_classes():
    data = shapes(split="train", resolution=16, num_images=60, num_classes=25)
    assert data.num_classes == 25 and len(data.class_names) == 25
    assert data.class_names[3] == CLASSES[3][0]
    assert data.class_names[22] == "triangle (inset outline) #2"
    images, labels = data.batch(list(range(60)))
    assert labels.tolist() == [i % 25 for i in range(60)]
    # class k renders like base class k % 10: image 13 (class 13) equals a 10-class render of
    # the same draws as class 3, and differs from class 4's
    from cdmbench.builtin.shapes import _render
    params = [data.params(13)]
    assert np.array_equal(images[13], _render(3, params, 16)[0])
    assert not np.array_equal(images[13], _render(4, params, 16)[0])
    default = shapes(split="train", resolution=16, num_images=10)
    assert default.num_classes == 10 and default.class_names == [c[0] for c in CLASSES]
    with pytest.raises(ValueError, match="num_classes"):
        shapes(split="train", resolution=16, num_classes=0)


def test_sample_num_classes_limits_the_grid(tiny_recipe, tmp_path):
    from cdmbench.training.run import run

    out = run(tiny_recipe, out=tmp_path / "run", progress=False, echo=lambda _: None,
              overrides=["sample.num_classes=3", "sample.images_per_class=2"])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["n"] for r in rows if r["metric"] == "sample_time"} == {6}
    full = run(tiny_recipe, out=tmp_path / "full", progress=False, echo=lambda _: None,
               overrides=["sample.images_per_class=2"])
    small, large = (Image.open(p / "base8" / "samples" / "grid.png").size for p in (out, full))
    assert small[1] < large[1]  # fewer rows
    with pytest.raises(Exception, match="sample.num_classes"):
        run(tiny_recipe, out=tmp_path / "bad", overrides=["sample.num_classes=0"], dry_run=True)


def test_the_class_count_falls_back_to_a_default_that_says_why(tmp_path):
    from cdmbench.recipe.components import recipe_classes

    raw = _raw("ablation_augmentation.yaml")
    raw["data"]["args"] = {"path": str(tmp_path / "missing")}
    count, source = recipe_classes(raw)
    assert count == 10 and source.startswith("a default: the recipe's data could not be built: fashion-mnist:")
    raw["data"] = {"name": "shapes", "args": {"num_classes": 7}}
    assert recipe_classes(raw) == (7, "as shapes has")
