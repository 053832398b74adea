"""`cdmbench prepare`: an image folder preprocessed into memory-mapped arrays at every resolution,
resumed after a failure, and used by `run` for training."""

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

import cdmbench.prepare
from cdmbench.builtin.datasets import imagefolder, square_resize
from cdmbench.cli import cli
from cdmbench.data import area_resize
from cdmbench.errors import CdmbenchError
from cdmbench.prepare import load_prepared, prepare
from cdmbench.runner import run
from conftest import TINY_RECIPE

SIZES = [(40, 30, "jpg"), (23, 61, "png"), (16, 16, "jpg"), (50, 50, "png"), (37, 18, "jpg"),
         (64, 48, "png"), (31, 33, "jpg"), (20, 45, "png"), (27, 27, "jpg")]  # (width, height)
CLASSES = ["cat", "dog", "emu"]
BAD = 5  # the file whose corruption interrupts a prepare: the third shard of two images


def quiet(*_):
    pass


@pytest.fixture
def folder(tmp_path):
    """Nine real JPEG and PNG files of different sizes and aspect ratios in three classes."""
    rng = np.random.default_rng(0)
    for i, (w, h, ext) in enumerate(SIZES):
        (tmp_path / "images" / CLASSES[i % 3]).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / CLASSES[i % 3] / f"{i}.{ext}")
    return tmp_path / "images"


@pytest.fixture
def recipe(tmp_path, folder, monkeypatch):
    monkeypatch.setenv("CDMBENCH_DATA_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE.replace("{name: shapes, args: {num_images: 40}}",
                                        f"{{name: imagefolder, args: {{path: '{folder}'}}}}"))
    return path


def test_prepare_writes_every_resolution_as_the_in_memory_loader(recipe, folder):
    said = []
    out = prepare(recipe, workers=2, shard_size=2, progress=False, echo=said.append)
    assert "5 shards to write, 2 worker processes" in said[0]
    data = load_prepared(out)
    files = imagefolder(path=str(folder), split="train", resolution=16)
    assert len(data) == len(SIZES) and data.labels.tolist() == files.labels  # the folder's order
    assert data.class_names == CLASSES and data.num_classes == 3
    for i, path in enumerate(files.files):  # decoded and resized as the dataset does
        with Image.open(path) as image:
            top = torch.from_numpy(np.array(square_resize(image, 16))).permute(2, 0, 1)[None]
        for r in (8, 16):
            assert data.images[r].shape == (len(SIZES), 3, r, r) and data.images[r].dtype == torch.uint8
            assert torch.equal(data.images[r][i], area_resize(top, r)[0]), (path, r)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resolutions"] == [8, 16] and manifest["num_images"] == len(SIZES)
    assert manifest["data"] == {"name": "imagefolder", "args": {"path": str(folder)}}


def test_an_interrupted_prepare_resumes_and_equals_an_uninterrupted_one(recipe, folder, tmp_path, monkeypatch):
    files = imagefolder(path=str(folder), split="train", resolution=16).files
    good = files[BAD].read_bytes()
    files[BAD].write_bytes(b"not an image")
    with pytest.raises(CdmbenchError, match=rf"images 4..5: imagefolder: cannot read image .*{files[BAD].name}"
                                            r".*2 shards are written .* run the same command to resume"):
        prepare(recipe, workers=0, shard_size=2, progress=False, echo=quiet)
    cache = next((tmp_path / "cache").iterdir())
    assert sorted(p.name for p in (cache / "done").iterdir()) == ["000000", "000001"]
    assert not (cache / "manifest.json").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in (cache / "done").iterdir()}

    files[BAD].write_bytes(good)
    result = CliRunner().invoke(cli, ["prepare", str(recipe), "--workers", "2", "--shard-size", "2",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "3 shards to write" in result.output
    assert {p: (cache / "done" / p).stat().st_mtime_ns for p in stamps} == stamps  # not rewritten

    monkeypatch.setenv("CDMBENCH_DATA_CACHE", str(tmp_path / "straight"))
    straight = prepare(recipe, workers=0, shard_size=2, progress=False, echo=quiet)
    for name in ("images-8.npy", "images-16.npy", "labels.npy", "manifest.json"):
        assert (cache / name).read_bytes() == (straight / name).read_bytes(), name


def test_run_trains_from_the_prepared_cache(recipe, tmp_path, monkeypatch):
    common = dict(stage="base8", progress=False, overrides=["stages.base8.train.steps=2"])
    said = []
    run(recipe, out=tmp_path / "memory", echo=said.append, **common)
    assert any("reading every image into memory" in s and "cdmbench prepare" in s for s in said)

    prepare(recipe, workers=0, progress=False, echo=quiet)

    def no_reading(*args, **kwargs):
        raise AssertionError("images read although a prepared cache exists")

    monkeypatch.setattr(cdmbench.prepare, "load_images", no_reading)
    said.clear()
    run(recipe, out=tmp_path / "cached", echo=said.append, **common)
    assert any("9 prepared images, memory-mapped" in s for s in said)
    for name in ("model", "ema"):  # the same images, labels and order: the same training
        a, b = (load_file(tmp_path / out / "base8" / "checkpoints" / "step-00000002" / f"{name}.safetensors")
                for out in ("memory", "cached"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_cache_of_other_classes_is_refused(recipe, folder):
    from cdmbench.prepare import training_images
    from cdmbench.recipe import load_recipe

    out = prepare(recipe, workers=0, progress=False, echo=quiet)
    (folder / "dog").rename(folder / "dingo")  # the folder changed after it was prepared
    parsed, _ = load_recipe(recipe)
    with pytest.raises(CdmbenchError, match=f"{re.escape(str(out))} has other class names .* delete "
                                            "the folder and run cdmbench prepare again"):
        training_images(parsed, imagefolder(path=str(folder), split="train", resolution=16), echo=quiet)
