"""Runs side by side (`cdmbench report RUN_DIR RUN_DIR`): components, metrics with their standard
errors and cost, each number as the run's rows, logs and recipe give it."""

import json
import math
import re

import pytest
import yaml
from click.testing import CliRunner

from cdmbench.cascade.cost import network_flops
from cdmbench.cascade.stages import build_stage
from cdmbench.cli import cli
from cdmbench.recipe.load import parse_yaml
from cdmbench.recipe.validate import parse_recipe
from cdmbench.reporting.runs import comparison_figure, comparison_frame
from cdmbench.storage.rundir import RunDir, result_row
from tests.conftest import TINY_RECIPE

CLASSES = [f"class{i}" for i in range(10)]
FID = "fid_test (classifier, clean)"


def make_run(path, overrides=(), *, fid=(12.5, 0.75), seconds=30.0, steps=4, run_yaml=True):
    """A run directory as `cdmbench run` and `cdmbench evaluate` leave it, without training: run.yaml
    of the tiny recipe (with ``overrides``), each stage's train_log.jsonl (``steps`` steps in
    ``seconds``, half of them logged halfway), and result rows: training's, a sampling time of 16
    images, an old FID of sr16 and the newest (``fid``, with its standard error)."""
    recipe, plugins = parse_recipe(parse_yaml(TINY_RECIPE, "tiny"), overrides=overrides)
    if run_yaml:
        RunDir(path).prepare(recipe, plugins, CLASSES)
    path.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, stage in enumerate(recipe.stages):
        (path / stage.name).mkdir(exist_ok=True)
        log = [{"step": s, "loss": 0.5 / s, "grad_norm": 1.0, "images_per_s": 8.0, "seconds": seconds * s / steps}
               for s in (steps // 2, steps)]
        (path / stage.name / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        rows += [result_row(run=recipe.name, stage=stage.name, metric="train_loss", value=0.5 / steps, unit="",
                            n=steps, higher_is_better=False, protocol={"loss": stage.loss}),
                 result_row(run=recipe.name, stage=stage.name, metric="train_throughput", value=1.0, unit="img/s",
                            n=steps, higher_is_better=True, protocol={"device": "cpu"}),
                 result_row(run=recipe.name, stage=stage.name, metric="sample_time", value=0.8 * (i + 1), unit="s",
                            n=16, higher_is_better=False, protocol={"sampler": stage.sampler.name})]
    protocol = {"dataset": recipe.data.name, "resolution": 16, "features": "classifier", "mode": "clean", "n": 64}
    for value, stderr in ((99.0, 9.0), fid):
        rows.append(result_row(run=recipe.name, stage="sr16", metric="fid_test", value=value, stderr=stderr, unit="",
                               n=64, higher_is_better=False, protocol=protocol))
    RunDir(path).add_results(rows)
    return recipe, plugins


@pytest.fixture
def two_runs(tmp_path):
    """Run a: the tiny recipe; run b: a wider base backbone, more sr16 sampling steps, trained
    twice as long in twice the time."""
    a = make_run(tmp_path / "a")
    b = make_run(tmp_path / "b", ["stages.base8.backbone.args.channels=64", "stages.sr16.sampler.args.steps=8"],
                 fid=(10.25, 0.5), seconds=60.0, steps=8)
    return tmp_path / "a", tmp_path / "b", a, b


def test_one_row_per_run_and_stage_with_components_metrics_and_cost(two_runs):
    path_a, path_b, (recipe_a, plugins_a), (recipe_b, plugins_b) = two_runs
    frame = comparison_frame([path_a, path_b])
    assert frame.index.tolist() == [("a", "base8"), ("a", "sr16"), ("b", "base8"), ("b", "sr16")]
    # the name of each component, and the args that differ between the runs' rows of a stage
    assert frame["backbone"].tolist() == ["adm-unet channels=32", "adm-unet", "adm-unet channels=64", "adm-unet"]
    assert frame["sampler"].tolist() == ["ddpm", "ddpm steps=4", "ddpm", "ddpm steps=8"]
    assert frame["augmentation"].tolist() == ["none", "gaussian", "none", "gaussian"]
    assert set(frame["data"]) == {"shapes"} and set(frame["loss"]) == {"simple"}
    # the newest FID of each run with its standard error; stages without one have none
    assert frame[FID].tolist()[1::2] == [12.5, 10.25] and frame[f"{FID} ±"].tolist()[1::2] == [0.75, 0.5]
    assert all(math.isnan(v) for v in frame[FID].tolist()[::2])
    assert frame["train_loss"].tolist() == [0.125, 0.125, 0.0625, 0.0625]
    assert "train_throughput" not in frame and not any(c.startswith("sample_time") for c in frame)
    # cost: images = last step x batch size, seconds of the last log row, FLOPs = one image's
    # training pass x images, sampling seconds / images timed
    for (run, name), row in frame.iterrows():
        recipe, plugins = (recipe_a, plugins_a) if run == "a" else (recipe_b, plugins_b)
        stage = recipe.stage(name)
        images = (4 if run == "a" else 8) * stage.train.batch_size
        per_image = network_flops(build_stage(plugins, recipe, stage, num_classes=len(CLASSES), device="meta"))[1]
        assert row["train images"] == images
        assert row["train time"] == (30.0 if run == "a" else 60.0)
        assert row["train FLOPs"] == per_image * images
        assert row["s/image"] == pytest.approx((0.8 if name == "base8" else 1.6) / 16)
        machine = yaml.safe_load((path_a / "run.yaml").read_text())["environment"]["machine"]
        assert row["device"] == f"cpu ({machine['cpus']} cores)"  # the recipe's device: cpu
    assert frame.loc[("a", "base8"), "train FLOPs"] != frame.loc[("b", "base8"), "train FLOPs"]  # wider


def test_the_command_prints_the_table_and_out_writes_markdown_and_a_chart(two_runs, tmp_path):
    path_a, path_b, *_ = two_runs
    frame = comparison_frame([path_a, path_b])
    result = CliRunner().invoke(cli, ["report", str(path_a), str(path_b), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"runs: {path_a}, {path_b}"
    assert any(line.startswith("| run ") and "backbone" in line for line in lines)
    row = next(line for line in lines if line.startswith("| b ") and "sr16" in line and "±" in line)
    assert "10.25 ± 0.5" in row
    assert any(line.startswith("| a ") and "adm-unet channels=32" in line for line in lines)
    cost = next(line for line in lines if line.startswith("| b ") and "base8" in line and "1m 00s" in line)
    flops = frame.loc[("b", "base8"), "train FLOPs"]
    assert f"{flops / 1e9:.3g}G" in cost and "| 64 " in cost and "| 50ms " in cost  # 8 steps x 8 images
    assert "| 100ms " in next(line for line in lines if line.startswith("| b ") and "sr16" in line and "1m 00s" in line)
    assert max(map(len, lines[1:])) <= 120

    text = (tmp_path / "cmp" / "comparison.md").read_text()
    assert max(len(line) for line in text.splitlines()) <= 120
    assert "10.25 ± 0.5" in text and "![" in text and "(comparison.png)" in text
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "cmp" / "report.md").exists()  # one run's export is for one run

    page = (tmp_path / "cmp" / "comparison.html").read_text()  # the same, as a page with the chart inside
    shown = set(re.findall(r'<tr class="comparison" data-run="([^"]+)" data-stage="([^"]+)">', page))
    assert shown == set(frame.index) and page.count("data:image/png;base64,") == 1 and "10.25 ± 0.5" in page


def test_the_chart_has_a_panel_per_metric_and_one_against_training_flops(two_runs):
    frame = comparison_frame(list(two_runs[:2]))
    fig = comparison_figure(frame)
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert set(panels) == {FID, "train_loss", f"{FID} against training cost", "train_loss against training cost"}
    bars = {c.get_label(): (list(c.lines[0].get_ydata()), [s[:, 1].tolist() for s in c.lines[2][0].get_segments()])
            for c in panels[FID].containers}
    assert bars == {"a": ([12.5], [[11.75, 13.25]]), "b": ([10.25], [[9.75, 10.75]])}
    costs = {c.get_label(): list(c.lines[0].get_xdata()) for c in panels[f"{FID} against training cost"].containers}
    assert costs == {"a": [frame.loc[("a", "sr16"), "train FLOPs"]], "b": [frame.loc[("b", "sr16"), "train FLOPs"]]}


def test_other_datasets_and_runs_without_run_yaml_are_shown_with_a_note(two_runs, tmp_path):
    """A run on another dataset is compared, flagged; an exported folder (results.jsonl, no
    run.yaml) shows its metrics, with no components or cost, and says why."""
    path_a = two_runs[0]
    make_run(tmp_path / "fashion", ["data.name=fashion-mnist", "data.args={}"])
    make_run(tmp_path / "exported", run_yaml=False, fid=(20.0, 1.0))
    frame = comparison_frame([path_a, tmp_path / "fashion", tmp_path / "exported"])
    assert frame.loc["fashion", "data"].tolist() == ["fashion-mnist", "fashion-mnist"]
    exported = frame.loc["exported"]
    assert exported[FID].tolist()[1] == 20.0 and exported["backbone"].isna().all()
    assert exported["train FLOPs"].isna().all() and exported["data"].tolist() == ["shapes", "shapes"]
    result = CliRunner().invoke(cli, ["report", str(path_a), str(tmp_path / "fashion"), str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert ("different datasets (shapes num_images=40: a; fashion-mnist: fashion; shapes: exported): their metrics "
            "are not comparable") in text
    assert "No run.yaml in exported: metrics only, no components or cost" in text


def test_runs_with_one_folder_name_are_told_apart_by_their_paths(tmp_path):
    make_run(tmp_path / "x" / "run")
    make_run(tmp_path / "y" / "run", fid=(3.0, 0.1))
    frame = comparison_frame([tmp_path / "x" / "run", tmp_path / "y" / "run"])
    assert frame[FID].dropna().to_dict() == {(str(tmp_path / "x" / "run"), "sr16"): 12.5,
                                             (str(tmp_path / "y" / "run"), "sr16"): 3.0}


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "is not a run directory (no run.yaml, no results.jsonl)"),
    ("untrained", "has no results yet"),
])
def test_what_is_not_a_run_is_an_error_naming_it(two_runs, tmp_path, case, message):
    bad = tmp_path / case
    if case != "missing":
        bad.mkdir()
    if case == "untrained":
        recipe, plugins = parse_recipe(parse_yaml(TINY_RECIPE, "tiny"))
        RunDir(bad).prepare(recipe, plugins, CLASSES)
    result = CliRunner().invoke(cli, ["report", str(two_runs[0]), str(bad)])
    assert result.exit_code == 2 and "error:" in result.output and str(bad) in result.output
    assert message in result.output
