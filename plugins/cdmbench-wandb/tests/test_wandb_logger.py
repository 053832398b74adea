"""The `wandb` logger, offline: what it logged is read back from wandb's own files (the run's
transaction log, its media and tables), a resumed run keeps its W&B run id, the plugin passes
cdmbench's conformance kit, and a cdmbench run logs to it end to end."""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("wandb")
pytest.importorskip("cdmbench_wandb")

from wandb.proto import wandb_internal_pb2  # noqa: E402

from cdmbench.errors import RecipeError  # noqa: E402
from cdmbench.plugins import load_plugins  # noqa: E402
from cdmbench.recipe.load import load_recipe  # noqa: E402
from cdmbench.storage.rundir import result_row  # noqa: E402
from cdmbench.testing import check_component, components  # noqa: E402
from cdmbench.training.run import run  # noqa: E402

RECIPE = """
cdmbench: 1
name: tiny-wandb
device: cpu
data: {name: shapes, args: {num_images: 16}}
stages:
  - name: base8
    resolution: 8
    backbone: {name: adm-unet, args: {channels: 32, channel_mult: [1], num_res_blocks: 1,
                                      attention_resolutions: []}}
    schedule: {name: cosine, args: {timesteps: 20}}
    train: {steps: 2, batch_size: 4, checkpoint_every: 1, log_every: 1}
    sampler: {name: ddim, args: {steps: 2}}
sample: {images_per_class: 1, num_classes: 2}
log_to: [{name: wandb, args: {mode: offline}}]
"""


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """wandb offline and silent, its settings, caches and staged files in the test's folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.chdir(tmp_path)


def transaction_log(folder: Path) -> list:
    """The records of an offline run's transaction log ``run-<id>.wandb``, parsed by wandb's own
    protobuf ``Record``. The framing is LevelDB's log format, as wandb writes it: a 7-byte header
    (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of chunks (CRC-32 of type and data,
    length, type: full, first, middle or last). wandb's service may still be writing it after the
    run's close returns: read until it holds the run record and has stopped growing (at most 20 s)."""
    path, deadline = next(folder.glob("run-*.wandb")), time.monotonic() + 20
    while True:
        data = path.read_bytes()
        time.sleep(0.2)
        if path.read_bytes() == data or time.monotonic() > deadline:  # not growing: whole chunks
            records = _records(data)
            if any(r.WhichOneof("record_type") == "run" for r in records) or time.monotonic() > deadline:
                return records


def _records(data: bytes) -> list:
    """The records of a transaction log's bytes (``transaction_log``)."""
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0), "not a wandb transaction log"
    records, chunks, pos, block = [], [], 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        body = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + body) == checksum, f"chunk at {pos} is corrupt"
        chunks.append(body)
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def history(records) -> list[dict]:
    """Each logged step's values (JSON-decoded) by key."""
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def run_record(records):
    return next(r.run for r in records if r.WhichOneof("record_type") == "run")


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def open_logger(run_dir: Path, *, resuming: bool, **args):
    return load_plugins()["loggers"].get("wandb").build({"mode": "offline", **args}, run_dir=run_dir,
                                                        run_name="tiny", config={"name": "tiny", "seed": 3},
                                                        resuming=resuming)


def test_an_offline_run_holds_the_losses_results_grid_and_config(tmp_path):
    grid = tmp_path / "grid.png"
    Image.fromarray(np.full((8, 16, 3), 200, np.uint8)).save(grid)
    rows = [result_row(run="tiny", stage="base8", metric="train_loss", value=0.25, unit="", n=3,
                       higher_is_better=False, protocol={"loss": "simple"}),
            result_row(run="tiny", stage="base8", metric="fid", value=None, unit="", n=8, higher_is_better=None,
                       protocol={"error": "no features"}, status="failed")]
    logger = open_logger(tmp_path / "run", resuming=False)
    logger.start_stage("base8", 0)
    for step in (1, 2, 3):
        logger.log_scalars("base8", {"loss": 1.0 / step, "images_per_s": 10.0}, step)
    logger.log_results("base8", rows, 3)
    logger.log_image("base8", "samples", grid, 3)
    logger.close()

    [folder] = offline_runs(tmp_path / "run")
    records = transaction_log(folder)
    info = run_record(records)
    assert info.run_id == (tmp_path / "run" / "wandb-run-id").read_text().strip() and info.display_name == "tiny"
    config = {item.key: json.loads(item.value_json) for item in info.config.update}
    assert config["name"] == "tiny" and config["seed"] == 3
    steps = history(records)
    losses = [(h["base8/step"], h["base8/loss"]) for h in steps if "base8/loss" in h]
    assert losses == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    result = next(h for h in steps if "base8/train_loss" in h)
    assert (result["base8/train_loss"], result["base8/step"]) == (0.25, 3)
    assert not any("base8/fid" in h for h in steps)  # a failed row has no value; it is in the table
    image = next(h for h in steps if "base8/samples/_type" in h)
    assert image["base8/samples/_type"] == "image-file" and image["base8/samples/width"] == 16
    assert (folder / "files" / image["base8/samples/path"]).is_file()
    table = next(h for h in steps if "results/_type" in h)
    content = json.loads((folder / "files" / table["results/path"]).read_text())
    table_rows = {row[content["columns"].index("metric")]: dict(zip(content["columns"], row, strict=True))
                         for row in content["data"]}
    assert table_rows["train_loss"]["value"] == 0.25 and table_rows["fid"]["status"] == "failed"
    assert json.loads(table_rows["fid"]["protocol"]) == {"error": "no features"}


def test_a_resumed_run_keeps_its_id_and_a_run_started_over_gets_a_new_one(tmp_path):
    run_dir = tmp_path / "run"
    first = open_logger(run_dir, resuming=False)
    first.log_scalars("base8", {"loss": 1.0}, 1)
    first.close()
    run_id = (run_dir / "wandb-run-id").read_text().strip()
    resumed = open_logger(run_dir, resuming=True)  # as cdmbench evaluate opens it
    resumed.log_scalars("base8", {"loss": 0.5}, 2)
    resumed.close()
    folders = offline_runs(run_dir)
    assert len(folders) == 2 and [run_record(transaction_log(f)).run_id for f in folders] == [run_id, run_id]
    assert [h["base8/loss"] for h in history(transaction_log(folders[1])) if "base8/loss" in h] == [0.5]
    open_logger(run_dir, resuming=False).close()  # the folder holds a new run: a new W&B run
    assert (run_dir / "wandb-run-id").read_text().strip() != run_id


def test_the_mode_is_checked_when_the_recipe_loads(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.replace("mode: offline", "mode: ofline"))
    with pytest.raises(RecipeError, match=r"^log_to\[0\]\.args\.mode: expected one of 'online', 'offline', "
                                          r"'disabled' or null, got 'ofline'$"):
        load_recipe(path, echo=lambda *_: None)


@pytest.mark.parametrize("component", components("wandb", alone=True), ids=lambda c: f"{c.kind}:{c.name}")
def test_component_conforms(component):
    check_component(component, {"mode": "offline"})


@pytest.mark.slow
def test_a_cdmbench_run_logs_to_wandb_and_its_resume_continues_the_same_run(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    out = run(path, out=tmp_path / "run", progress=False, echo=lambda *_: None)
    run(path, out=out, progress=False, echo=lambda *_: None, overrides=["stages.base8.train.steps=3"])
    first, second = offline_runs(out)
    run_id = (out / "wandb-run-id").read_text().strip()
    assert run_record(transaction_log(first)).run_id == run_record(transaction_log(second)).run_id == run_id
    before, after = history(transaction_log(first)), history(transaction_log(second))
    assert [h["base8/step"] for h in before if "base8/loss" in h] == [1, 2]
    assert [h["base8/step"] for h in after if "base8/loss" in h] == [3]  # trained on from step 2
    assert any("base8/samples/_type" in h for h in before) and any("base8/samples/_type" in h for h in after)
    assert {"base8/train_loss", "base8/train_throughput", "base8/sample_time"} <= {k for h in before for k in h}
    config = {item.key: json.loads(item.value_json) for item in run_record(transaction_log(first)).config.update}
    assert config["name"] == "tiny-wandb" and config["stages"][0]["train"]["steps"] == 2  # the resolved recipe
