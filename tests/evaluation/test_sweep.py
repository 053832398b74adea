"""`cdmbench sweep`: previous stages run once (non-truncated) or once per level (truncated),
rows per level and input kind, and the chosen level is used by later sampling."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import cdmbench.cascade.stages
import cdmbench.evaluation.samples
import cdmbench.evaluation.sweep
from cdmbench.cli import cli
from cdmbench.training.run import run

IS = "--set=evaluate.metrics=[{name: is, args: {features: classifier, features_args: {epochs: 1}}}]"
SMALL = ["--set=evaluate.num_samples=20", "--set=evaluate.batch_size=10", "--no-progress"]


@pytest.fixture
def counted(monkeypatch):
    """Count the sweeps' calls of the previous stages (each with the level it stops at)."""
    calls = []
    real = cdmbench.evaluation.samples.sample_cascade

    def counting(*args, **kwargs):
        if "stop_at" in kwargs:  # the previous stages; the swept one is given their output
            calls.append(kwargs["stop_at"])
        return real(*args, **kwargs)

    monkeypatch.setattr(cdmbench.evaluation.samples, "sample_cascade", counting)
    return calls


def results(run_dir):
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_nontruncated_sweep_samples_the_previous_stage_once(tiny_recipe, tmp_path, monkeypatch, counted):
    monkeypatch.setenv("CDMBENCH_CACHE", str(tmp_path / "cache"))
    out = run(tiny_recipe, out=tmp_path / "r", progress=False, echo=lambda *_: None)
    args = ["sweep", str(out), "--stage", "sr16", "--levels", "0,0.1,0.3", IS, *SMALL]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert counted == [{"base8": 0.0}]  # one call for three levels
    rows = [r for r in results(out) if r["metric"] == "is_classifier"]
    assert sorted((r["protocol"]["inputs"], r["protocol"]["level"]) for r in rows) == sorted(
        (kind, s) for kind in ("generated", "ground-truth") for s in (0.0, 0.1, 0.3))
    manifest = json.loads((out / "cascade.json").read_text())
    generated = {r["protocol"]["level"]: r["value"] for r in rows if r["protocol"]["inputs"] == "generated"}
    assert manifest["sr16"]["level"] == max(generated, key=generated.get)  # higher IS is better

    assert CliRunner().invoke(cli, args).exit_code == 0
    assert len(counted) == 1  # the second sweep reads the cached z_0

    # Later sampling uses the chosen level, and its samples are the sweep's: nothing is sampled again.
    swept = {p.parent: json.loads(p.read_text()) for p in (out / "sr16" / "eval_samples").glob("*/signature.json")}
    assert sorted(sig["stages"][1]["levels"][0] for sig in swept.values()) == [0.0, 0.1, 0.3]
    before = {p: p.stat().st_mtime_ns for p in (out / "sr16" / "eval_samples").glob("*/shard-*.npz")}
    assert CliRunner().invoke(cli, ["evaluate", str(out), IS, *SMALL]).exit_code == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "sr16" / "eval_samples").glob("*/shard-*.npz")} == before
    rows = [r for r in results(out) if r["metric"] == "is_classifier"]
    chosen = next(r for r in rows if r["protocol"].get("level") == manifest["sr16"]["level"]
                  and r["protocol"]["inputs"] == "generated")
    assert rows[-1]["value"] == chosen["value"]  # the evaluation: the same samples, the same number

    # The report keeps sweep rows out of the results table and shows them as a table and plot.
    from cdmbench.reporting.tables import read_results, results_table, sweep_table
    frame = read_results([out])
    evaluated = [r for r in results(out) if r["metric"] == "is_classifier" and "level" not in r["protocol"]]
    table = results_table(frame)
    column = next(c for c in table.columns if c.startswith("is_classifier"))
    assert table.loc[("tiny", "sr16"), column] == evaluated[-1]["value"]
    assert len(sweep_table(frame)) == 6  # 2 input kinds x 3 levels
    text = (out / "report.md").read_text()
    assert "## Sampling-level sweeps" in text and (out / "sweeps.png").stat().st_size > 0
    exported = CliRunner().invoke(cli, ["report", str(out), "--out", str(tmp_path / "exported")])
    assert exported.exit_code == 0, exported.output
    assert {p.name for p in (tmp_path / "exported").rglob("*.png")} == {"sweeps.png", "training.png", "grid.png"}
    assert (tmp_path / "exported" / "sr16" / "samples" / "grid.png").exists()

    other_sampler = CliRunner().invoke(cli, [*args, "--set=stages.base8.sampler.args.steps=2"])
    assert other_sampler.exit_code == 0, other_sampler.output
    assert len(counted) == 2  # another previous-stage sampler: another z_0, not the cached one


@pytest.mark.slow
def test_a_sweep_cut_short_keeps_its_finished_levels_and_resumes(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("CDMBENCH_CACHE", str(tmp_path / "cache"))
    out = run(tiny_recipe, out=tmp_path / "r", progress=False, echo=lambda *_: None)
    (out / "report.md").unlink()
    calls = []
    real = cdmbench.cascade.stages.sample_stage

    def interrupted(stage, *args, **kwargs):  # two batches of sr16 a level: stop in the third level
        if stage.spec.name == "sr16":
            calls.append(len(kwargs["image_ids"]))
            if len(calls) == 5:
                raise KeyboardInterrupt
        return real(stage, *args, **kwargs)

    monkeypatch.setattr(cdmbench.cascade.stages, "sample_stage", interrupted)
    args = ["sweep", str(out), "--stage", "sr16", "--levels", "0,0.1,0.3", "--inputs", "generated", IS, *SMALL]
    assert CliRunner().invoke(cli, args).exit_code != 0
    levels = [r["protocol"]["level"] for r in results(out) if r["metric"] == "is_classifier"]
    assert levels == [0.0, 0.1]  # recorded as each level finished

    calls.clear()
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert len(calls) == 2  # only the unfinished level is sampled; the others come from the cache
    rows = [r for r in results(out) if r["metric"] == "is_classifier"]
    assert sorted({r["protocol"]["level"] for r in rows}) == [0.0, 0.1, 0.3]
    exported = CliRunner().invoke(cli, ["report", str(out), "--out", str(tmp_path / "exported")])
    assert exported.exit_code == 0, exported.output  # report.md written afresh from the results
    assert "## Sampling-level sweeps" in (tmp_path / "exported" / "report.md").read_text()


@pytest.mark.slow
def test_truncated_sweep_stops_the_previous_stage_at_each_level(tiny_recipe, tmp_path, monkeypatch, counted):
    monkeypatch.setenv("CDMBENCH_CACHE", str(tmp_path / "cache"))
    out = run(tiny_recipe, out=tmp_path / "r", progress=False, echo=lambda *_: None, overrides=[
        "stages.sr16.augmentation={name: gaussian, args: {mode: truncated, max_level: 0.4, level: 0.2}}"])
    result = CliRunner().invoke(cli, ["sweep", str(out), "--stage", "sr16", "--levels", "0.1,0.2",
                                      "--inputs", "generated", IS, *SMALL])
    assert result.exit_code == 0, result.output
    assert counted == [{"base8": 0.1}, {"base8": 0.2}]
    bad = CliRunner().invoke(cli, ["sweep", str(out), "--stage", "sr16", "--levels", "0.105",
                                   "--inputs", "generated", IS, *SMALL])
    assert bad.exit_code == 2 and "not a step of this 50-step process" in bad.output
    zero = CliRunner().invoke(cli, ["sweep", str(out), "--stage", "sr16", "--levels", "0,0.1", IS, *SMALL])
    assert zero.exit_code == 2 and "sr16 is truncated: its level must be > 0" in zero.output

    ground_truth = []
    real = cdmbench.evaluation.sweep.sample_stage

    def recording(*args, **kwargs):
        ground_truth.append(kwargs["ground_truth"])
        return real(*args, **kwargs)

    monkeypatch.setattr(cdmbench.evaluation.sweep, "sample_stage", recording)
    result = CliRunner().invoke(cli, ["sweep", str(out), "--stage", "sr16", "--levels", "0.1",
                                      "--inputs", "ground-truth", IS, *SMALL])
    assert result.exit_code == 0, result.output
    assert ground_truth == [True, True]  # two batches of real images, taken to z_s by the stage
    [row] = [r for r in results(out) if r["metric"] == "is_classifier" and r["protocol"]["inputs"] == "ground-truth"]
    assert row["protocol"]["inputs_split"] == "train" and row["protocol"]["truncated"] is True
    base = CliRunner().invoke(cli, ["sweep", str(out), "--stage", "base8", "--levels", "0.1", IS, *SMALL])
    assert base.exit_code == 2 and "base stage" in base.output


@pytest.mark.slow
def test_a_sweep_samples_its_inputs_again_when_an_earlier_stages_level_changes(tiny_recipe, tmp_path, monkeypatch,
                                                                              counted):
    """sr16's level decides the inputs of sr32: cached inputs of another sr16 level are not reused."""
    import yaml

    monkeypatch.setenv("CDMBENCH_CACHE", str(tmp_path / "cache"))
    raw = yaml.safe_load(tiny_recipe.read_text())
    third = {**raw["stages"][1], "name": "sr32", "resolution": 32, "condition_on": "sr16"}
    third["backbone"] = {"name": "adm-unet", "args": {**third["backbone"]["args"], "attention_resolutions": [16]}}
    raw["stages"].append(third)
    recipe = tmp_path / "three.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    out = run(recipe, out=tmp_path / "r", progress=False, echo=lambda *_: None)
    args = ["sweep", str(out), "--stage", "sr32", "--levels", "0.1", "--inputs", "generated", IS, *SMALL]
    for sr16_level in (0.1, 0.1, 0.2):
        result = CliRunner().invoke(cli, [*args, f"--set=stages.sr16.augmentation.args.level={sr16_level}"])
        assert result.exit_code == 0, result.output
    assert counted == [{"sr16": 0.0}, {"sr16": 0.0}]  # the second sweep reused the first's inputs


@pytest.mark.slow
def test_a_sweep_under_torchrun_shares_each_levels_shards(tiny_recipe, tmp_path):
    import os
    import subprocess
    import sys

    out = run(tiny_recipe, out=tmp_path / "r", progress=False, echo=lambda *_: None)
    env = {**os.environ, "CDMBENCH_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "cdmbench", "sweep",
           str(out), "--stage", "sr16", "--levels", "0.1,0.3", IS, *SMALL, "--set=evaluate.shard_size=10"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    [ground_truth] = (out / "sr16" / "sweep").iterdir()
    folders = [*(out / "sr16" / "eval_samples").iterdir(), *ground_truth.iterdir()]
    assert sorted(f.name for f in ground_truth.iterdir()) == ["level-0.1", "level-0.3"] and len(folders) == 4
    for folder in folders:  # rank 0 wrote shard 0, rank 1 shard 1, on generated and ground-truth inputs
        assert sorted(p.name for p in folder.glob("shard-*.npz")) == ["shard-00000-0-10.npz", "shard-00001-10-20.npz"]
    rows = [r for r in results(out) if r["metric"] == "is_classifier"]
    assert sorted((r["protocol"]["inputs"], r["protocol"]["level"]) for r in rows) == [
        ("generated", 0.1), ("generated", 0.3), ("ground-truth", 0.1), ("ground-truth", 0.3)]  # rank 0's only
    assert json.loads((out / "cascade.json").read_text())["sr16"]["level"] in (0.1, 0.3)


@pytest.mark.slow
def test_ground_truth_sample_i_is_the_stage_on_a_training_image_of_sample_is_class(tiny_recipe, tmp_path,
                                                                                  monkeypatch):
    """Whatever N, shard size or batch size: a larger N samples only the rows it adds."""
    import torch

    from cdmbench.cascade.stages import build_chain, sample_stage
    from cdmbench.data.images import to_float, to_uint8
    from cdmbench.data.prepare import make_dataset, split_images
    from cdmbench.evaluation.cas import class_matched
    from cdmbench.evaluation.samples import load_chain, read_samples, sample_labels
    from cdmbench.storage.rundir import load_run

    monkeypatch.setenv("CDMBENCH_CACHE", str(tmp_path / "cache"))
    out = run(tiny_recipe, out=tmp_path / "r", progress=False, echo=lambda *_: None)
    sweep = ["sweep", str(out), "--stage", "sr16", "--levels", "0.1", "--inputs", "ground-truth", IS, "--no-progress"]
    first = CliRunner().invoke(cli, [*sweep, "--set=evaluate.num_samples=12", "--set=evaluate.shard_size=5",
                                     "--set=evaluate.batch_size=4"])
    assert first.exit_code == 0, first.output
    sampled = []
    real_stage = cdmbench.evaluation.sweep.sample_stage
    monkeypatch.setattr(cdmbench.evaluation.sweep, "sample_stage",
                        lambda *a, **k: sampled.append(k["image_ids"]) or real_stage(*a, **k))
    second = CliRunner().invoke(cli, [*sweep, "--set=evaluate.num_samples=20", "--set=evaluate.shard_size=10",
                                      "--set=evaluate.batch_size=10"])
    assert second.exit_code == 0, second.output
    assert sampled == [list(range(10, 20))]  # shard 0 (rows 0..9) is held by the first sweep's shards

    [folder] = (out / "sr16" / "sweep").iterdir()
    samples, labels = read_samples(folder / "level-0.1", 20)
    _, recipe, plugins = load_run(out)
    [_, st] = chain = build_chain(plugins, recipe, "sr16", 10, "cpu")
    load_chain(chain, out)
    train = split_images(recipe, make_dataset(plugins, recipe, "train"), "train", [8], progress=False,
                         echo=lambda *_: None)
    index = class_matched(labels, train.labels, num_classes=10, seed=recipe.sample.seed)
    # the classes of the generated inputs' samples (random labels): each input a training image of its class
    assert torch.equal(labels, sample_labels(0, 20, num_classes=10, seed=recipe.sample.seed, mode="random"))
    assert torch.equal(train.labels[index], labels)
    expected = sample_stage(st, st.backbone, labels, seed=recipe.sample.seed, image_ids=list(range(20)),
                            low_res=to_float(train.images[8][index]), device="cpu", ground_truth=True,
                            progress=False)
    assert torch.equal(samples, to_uint8(expected))
