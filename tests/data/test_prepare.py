"""`cdmbench prepare`: an image folder preprocessed into memory-mapped arrays at every resolution,
resumed after a failure, and used by `run` for training and by evaluation for real data."""

import json
import multiprocessing
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

import cdmbench.data.prepare
import cdmbench.storage.files
from cdmbench.builtin.datasets import imagefolder, square_resize
from cdmbench.cli import cli
from cdmbench.data.images import area_resize, load_images
from cdmbench.data.prepare import load_prepared, make_dataset, prepare, split_images
from cdmbench.errors import CdmbenchError
from cdmbench.evaluation.samples import EvalContext
from cdmbench.recipe.load import load_recipe
from cdmbench.recipe.schema import Component
from cdmbench.training.run import run
from tests.conftest import TINY_RECIPE

SIZES = [(40, 30, "jpg"), (23, 61, "png"), (16, 16, "jpg"), (50, 50, "png"), (37, 18, "jpg"),
         (64, 48, "png"), (31, 33, "jpg"), (20, 45, "png"), (27, 27, "jpg")]  # (width, height)
CLASSES = ["cat", "dog", "emu"]
BAD = 5  # the file whose corruption interrupts a prepare: the third shard of two images


def quiet(*_):
    pass


def write_images(folder, sizes, seed=0):
    """Real JPEG and PNG files of the given sizes and aspect ratios, in three classes."""
    rng = np.random.default_rng(seed)
    for i, (w, h, ext) in enumerate(sizes):
        (folder / CLASSES[i % 3]).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / CLASSES[i % 3] / f"{i}.{ext}")
    return folder


def tiny_recipe_of(tmp_path, folder):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE.replace("{name: shapes, args: {num_images: 40}}",
                                        f"{{name: imagefolder, args: {{path: '{folder}'}}}}"))
    return path


@pytest.fixture
def folder(tmp_path):
    """Nine images of different sizes and aspect ratios in three classes."""
    return write_images(tmp_path / "images", SIZES)


@pytest.fixture
def recipe(tmp_path, folder, monkeypatch):
    monkeypatch.setenv("CDMBENCH_DATA_CACHE", str(tmp_path / "cache"))
    return tiny_recipe_of(tmp_path, folder)


@pytest.fixture
def split_recipe(tmp_path, monkeypatch):
    """The tiny recipe on a folder with a train split (the nine images) and a test split (six)."""
    monkeypatch.setenv("CDMBENCH_DATA_CACHE", str(tmp_path / "cache"))
    write_images(tmp_path / "split" / "train", SIZES)
    write_images(tmp_path / "split" / "test", SIZES[3:], seed=1)
    return tiny_recipe_of(tmp_path, tmp_path / "split")


def test_prepare_writes_every_resolution_as_the_in_memory_loader(recipe, folder):
    said = []
    out = prepare(recipe, workers=2, shard_size=2, progress=False, echo=said.append)
    assert "5 shards to write, 2 worker processes" in said[0]
    data = load_prepared(out)
    files = imagefolder(path=str(folder), split="train", resolution=16)
    assert len(data) == len(SIZES) and data.labels.tolist() == files.items[1]  # the folder's order
    assert data.class_names == CLASSES and data.num_classes == 3
    for i, path in enumerate(files.items[0]):  # decoded and resized as the dataset does
        with Image.open(path) as image:
            top = torch.from_numpy(np.array(square_resize(image, 16))).permute(2, 0, 1)[None]
        for r in (8, 16):
            assert data.images[r].shape == (len(SIZES), 3, r, r) and data.images[r].dtype == torch.uint8
            assert torch.equal(data.images[r][i], area_resize(top, r)[0]), (path, r)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resolutions"] == [8, 16] and manifest["num_images"] == len(SIZES)
    assert manifest["data"] == {"name": "imagefolder", "args": {"path": str(folder)}}


def test_an_interrupted_prepare_resumes_and_equals_an_uninterrupted_one(recipe, folder, tmp_path, monkeypatch):
    files, _ = imagefolder(path=str(folder), split="train", resolution=16).items
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


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork",
                    reason="the workers inherit the patched write by fork")
def test_a_dead_worker_stops_prepare_with_an_error_instead_of_a_hang(recipe, monkeypatch):
    write = cdmbench.data.prepare._Shards.write

    def die_at_shard_2(self, shard):
        if shard == 2:
            os._exit(1)  # as a SIGBUS or the OOM killer ends a worker: no exception, no result
        return write(self, shard)

    monkeypatch.setattr(cdmbench.data.prepare._Shards, "write", die_at_shard_2)
    outcome = []

    def prepare_with_workers():
        try:
            outcome.append(prepare(recipe, workers=2, shard_size=2, progress=False, echo=quiet))
        except CdmbenchError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=prepare_with_workers, daemon=True)  # a hang fails the test
    thread.start()
    thread.join(60)
    assert outcome, "prepare still waits 60 s after a worker died"
    assert re.fullmatch(r"prepare stopped: a preprocessing worker process died \(out of memory or disk "
                        r"space\?\)\. [0-4] shards are written in .* and kept; fix the problem and run "
                        r"the same command to resume", str(outcome[0])), outcome[0]

    monkeypatch.undo()
    out = prepare(recipe, workers=2, shard_size=2, progress=False, echo=quiet)  # resumes
    assert len(load_prepared(out)) == len(SIZES)


def test_a_full_disk_fails_before_any_image_is_written(recipe, monkeypatch):
    real = cdmbench.storage.files.shutil.disk_usage
    monkeypatch.setattr(cdmbench.storage.files.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(CdmbenchError, match=r"no disk space for the arrays in (.*): they need (\d+) more "
                                            r"bytes .* free space or set CDMBENCH_DATA_CACHE") as info:
        prepare(recipe, workers=0, progress=False, echo=quiet)
    folder, size = re.search(r"arrays in (.*): they need (\d+) more bytes", str(info.value)).groups()
    assert int(size) == len(SIZES) * (3 * 8 * 8 + 3 * 16 * 16 + 8)
    assert not list(Path(folder).glob("*.npy"))  # nothing written; the next prepare allocates afresh

    # The arrays are sparse: a resume checks what is still to write against the space left then.
    monkeypatch.undo()
    folder = prepare(recipe, workers=0, shard_size=2, progress=False, echo=quiet)
    for k in (0, 1):
        (folder / "done" / f"{k:06d}").unlink()
    (folder / "manifest.json").unlink()
    monkeypatch.setattr(cdmbench.storage.files.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(CdmbenchError, match=f"they need {4 * (3 * 8 * 8 + 3 * 16 * 16)} more bytes"):
        prepare(recipe, workers=0, shard_size=2, progress=False, echo=quiet)


def test_run_trains_from_the_prepared_cache(recipe, tmp_path, monkeypatch):
    common = dict(stage="base8", progress=False, overrides=["stages.base8.train.steps=2"])
    said = []
    run(recipe, out=tmp_path / "memory", echo=said.append, **common)
    assert any("reading every image into memory" in s and "cdmbench prepare" in s for s in said)

    prepare(recipe, workers=0, progress=False, echo=quiet)

    monkeypatch.setattr(cdmbench.data.prepare, "load_images", no_reading)
    said.clear()
    run(recipe, out=tmp_path / "cached", echo=said.append, **common)
    assert any("9 prepared images, memory-mapped" in s for s in said)
    for name in ("model", "ema"):  # the same images, labels and order: the same training
        a, b = (load_file(tmp_path / out / "base8" / "checkpoints" / "step-00000002" / f"{name}.safetensors")
                for out in ("memory", "cached"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_cache_of_other_classes_is_refused(recipe, folder):
    out = prepare(recipe, workers=0, progress=False, echo=quiet)
    (folder / "dog").rename(folder / "dingo")  # the folder changed after it was prepared
    parsed, _ = load_recipe(recipe)
    with pytest.raises(CdmbenchError, match=f"{re.escape(str(out))} has other class names .* delete "
                                            "the folder and run cdmbench prepare again"):
        split_images(parsed, imagefolder(path=str(folder), split="train", resolution=16), "train",
                     echo=quiet)


def mapped_file(tensor):
    """The file mapped at ``tensor``'s memory (from /proc/self/maps), or None for other memory
    (anonymous, [heap])."""
    address = tensor.data_ptr()
    for line in open("/proc/self/maps"):
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi and len(fields) == 6 and fields[5].startswith("/"):
            return fields[5].strip()
    return None


def context_of(recipe, cache_dir, said):
    parsed, plugins = load_recipe(recipe)
    return EvalContext(samples=None, labels=None, num_classes=3, resolution=16, recipe=parsed,
                       plugins=plugins, device="cpu", cache_dir=cache_dir, protocol={}, progress=False,
                       stage="sr16", echo=said.append)


def in_memory(recipe, split, resolution):
    parsed, plugins = load_recipe(recipe)
    data = load_images(make_dataset(plugins, parsed, split), [resolution], progress=False)
    return data.images[resolution], data.labels


def no_reading(*args, **kwargs):
    raise AssertionError("images read although a prepared cache exists")


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_evaluation_maps_the_prepared_splits_and_falls_back_elsewhere(split_recipe, tmp_path, monkeypatch):
    expected = {(s, r): in_memory(split_recipe, s, r) for s in ("train", "test") for r in (8, 16)}
    folders = {s: prepare(split_recipe, split=s, workers=0, progress=False, echo=quiet)
               for s in ("train", "test")}
    monkeypatch.setattr(cdmbench.data.prepare, "load_images", no_reading)
    said = []
    context = context_of(split_recipe, tmp_path / "eval", said)
    for (split, r), (images, labels) in expected.items():
        real, real_labels = context.real_at(split, r)
        assert mapped_file(real) == str(folders[split] / f"images-{r}.npy"), (split, r)  # not a copy
        assert torch.equal(real, images) and torch.equal(real_labels, labels), (split, r)
    assert said == [f"{s} data: {n} prepared images, memory-mapped from {folders[s]}"
                    for s, n in (("train", 9), ("test", 6))]  # once per split

    monkeypatch.setattr(cdmbench.data.prepare, "load_images", load_images)
    real, _ = context.real_at("test", 4)  # not a resolution of the cascade: not prepared
    assert mapped_file(real) is None and torch.equal(real, in_memory(split_recipe, "test", 4)[0])
    assert said[-1] == "test data at [4] px: not a resolution of the cascade, so not prepared; " \
                      "reading every image into memory"


def test_evaluation_without_a_prepared_split_reads_it_and_says_how_to_prepare(split_recipe, tmp_path):
    prepare(split_recipe, split="train", workers=0, progress=False, echo=quiet)
    said = []
    context = context_of(split_recipe, tmp_path / "eval", said)
    for r in (8, 16):
        real, labels = context.real_at("test", r)
        expected = in_memory(split_recipe, "test", r)
        assert torch.equal(real, expected[0]) and torch.equal(labels, expected[1])
    assert [s for s in said if s.startswith("test data")] == [  # said once
        "test data: reading every image into memory; for a large dataset run `cdmbench prepare "
        "RECIPE --split test` once to preprocess it to disk"]


def test_reference_statistics_from_the_prepared_splits_equal_the_in_memory_ones(split_recipe, tmp_path,
                                                                                 monkeypatch):
    """The classifier features train on the train split and the statistics run over the test
    split: the same network (by hash) and the same statistics from memory-mapped data."""
    spec = Component("classifier", {"epochs": 1})
    memory = context_of(split_recipe, tmp_path / "memory", [])
    network = memory.feature_network(spec)
    mu, sigma, n = memory.reference_statistics(network, "native", "test")

    for s in ("train", "test"):
        prepare(split_recipe, split=s, workers=0, progress=False, echo=quiet)
    monkeypatch.setattr(cdmbench.data.prepare, "load_images", no_reading)
    mapped = context_of(split_recipe, tmp_path / "mapped", [])  # another cache: computed afresh
    mapped_network = mapped.feature_network(spec)
    assert mapped_network.sha256 == network.sha256  # trained on the same images in the same order
    mapped_mu, mapped_sigma, mapped_n = mapped.reference_statistics(mapped_network, "native", "test")
    assert n == mapped_n == 6
    np.testing.assert_array_equal(mapped_mu, mu)
    np.testing.assert_array_equal(mapped_sigma, sigma)


def test_run_reports_bits_per_dim_on_the_prepared_test_split(split_recipe, tmp_path, monkeypatch):
    for s in ("train", "test"):
        prepare(split_recipe, split=s, workers=0, progress=False, echo=quiet)
    monkeypatch.setattr(cdmbench.data.prepare, "load_images", no_reading)
    said = []
    out = run(split_recipe, out=tmp_path / "run", stage="base8", progress=False, echo=said.append, overrides=[
        "stages.base8.train.steps=1", "stages.base8.loss=hybrid", "stages.base8.train.val_bpd_images=2",
        "stages.base8.schedule={name: cosine, args: {timesteps: 4}}",
        "stages.base8.sampler={name: ddpm, args: {variance: learned, steps: 2}}"])
    assert any(s.startswith("test data: 6 prepared images, memory-mapped") for s in said)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["n"], r["protocol"]["split"]) for r in rows if r["metric"] == "val_bpd"] == [(2, "test")]


def test_a_prepared_split_is_used_without_listing_the_image_folder(split_recipe, tmp_path):
    expected = in_memory(split_recipe, "test", 16)
    prepare(split_recipe, split="test", workers=0, progress=False, echo=quiet)
    for image in (tmp_path / "split" / "test").rglob("*.*"):
        image.unlink()  # the class folders stay: the dataset is still built, but has no files
    real, labels = context_of(split_recipe, tmp_path / "eval", []).real_at("test", 16)
    assert torch.equal(real, expected[0]) and torch.equal(labels, expected[1])


def test_a_relative_data_path_shares_the_cache_of_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.setenv("CDMBENCH_DATA_CACHE", str(tmp_path / "cache"))
    for project in ("a", "b"):
        write_images(tmp_path / project / "images", SIZES[:3], seed=len(project))
    absolute, _ = load_recipe(tiny_recipe_of(tmp_path, tmp_path / "a" / "images"))
    relative, _ = load_recipe(tiny_recipe_of(tmp_path, "images"))
    monkeypatch.chdir(tmp_path / "a")
    assert cdmbench.data.prepare.cache_folder(relative, "train") == cdmbench.data.prepare.cache_folder(
        absolute, "train"
    )
    in_a = cdmbench.data.prepare.cache_folder(relative, "train")
    monkeypatch.chdir(tmp_path / "b")  # the same words name other images here
    assert cdmbench.data.prepare.cache_folder(relative, "train") != in_a


def test_prepare_starts_one_worker_per_cpu_the_job_may_use(recipe):
    """A scheduler's allocation (CPU affinity), not the node's CPU count: 16 cores of a 256-core
    node must not start 256 workers."""
    allowed = os.sched_getaffinity(0)
    said = []
    try:
        os.sched_setaffinity(0, {min(allowed)})
        prepare(recipe, shard_size=2, progress=False, echo=said.append)
    finally:
        os.sched_setaffinity(0, allowed)
    assert any("shards to write, 1 worker processes" in s for s in said), said


def test_data_too_large_for_memory_asks_for_prepare_before_reading_it(recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(cdmbench.data.prepare, "_available_memory", lambda: 2 * 3 * (8 * 8 + 16 * 16) * len(SIZES))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: two processes on this node read it each
    with pytest.raises(CdmbenchError, match=r"train data: \d+ images at \[8, 16\] px take 0.0 GiB in memory in each "
                                            r"of 2 process\(es\) on this node, .* run `cdmbench prepare RECIPE` once"):
        run(recipe, out=tmp_path / "r", stage="base8", progress=False, echo=quiet)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # half the memory
    run(recipe, out=tmp_path / "r", stage="base8", progress=False, echo=quiet,
        overrides=["stages.base8.train.steps=1"])


def test_training_from_prepared_data_never_builds_the_dataset(recipe, tmp_path, monkeypatch):
    """A Hub dataset's builder asks the Hub on every rank at every start: offline nodes failed."""
    prepare(recipe, workers=0, progress=False, echo=quiet)
    real = cdmbench.data.prepare.make_component

    def offline(plugins, kind, *args, **kwargs):
        if kind == "datasets":
            raise CdmbenchError("the Hub is unreachable")
        return real(plugins, kind, *args, **kwargs)

    monkeypatch.setattr(cdmbench.data.prepare, "make_component", offline)
    out = run(recipe, out=tmp_path / "r", stage="base8", progress=False, echo=quiet,
              overrides=["stages.base8.train.steps=1"])
    assert (out / "base8" / "checkpoints" / "step-00000001").is_dir()
    parsed, plugins = load_recipe(recipe)
    dataset = make_dataset(plugins, parsed, "train")
    assert len(dataset) == len(SIZES) and dataset.num_classes == len(dataset.class_names)
    with pytest.raises(CdmbenchError, match="the Hub is unreachable"):  # only an image read builds it
        dataset[0]
