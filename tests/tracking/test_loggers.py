"""Loggers (experiment trackers): the recipe's `log_to`, opening them with their host facts, the
fan-out to every logger, and a run, an evaluation and a sweep logging to them."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import yaml

from cdmbench.errors import CdmbenchError, RecipeError
from cdmbench.evaluation.evaluate import evaluate, sweep_levels
from cdmbench.plugins import load_plugins
from cdmbench.recipe.load import load_recipe
from cdmbench.recipe.validate import parse_recipe
from cdmbench.storage.rundir import RunDir, result_row
from cdmbench.tracking.loggers import Loggers, log_run_results, open_loggers
from cdmbench.training.run import run

RECORDER_PLUGIN = '''
"""A logger that records every call (and loggers that fail), and a cheap metric."""

import functools
from pathlib import Path

from cdmbench import hookimpl

CALLS = []


class Recorder:
    def __init__(self, label):
        self.label = label

    def start_stage(self, stage, step):
        CALLS.append((self.label, "start_stage", stage, step))

    def log_scalars(self, stage, values, step):
        CALLS.append((self.label, "log_scalars", stage, dict(values), step))

    def log_results(self, stage, rows, step):
        CALLS.append((self.label, "log_results", stage, [dict(r) for r in rows], step))

    def log_image(self, stage, name, path, step):
        CALLS.append((self.label, "log_image", stage, name, Path(path), step))

    def close(self):
        CALLS.append((self.label, "close"))


def recorder(*, label: str = "recorder", run_dir: Path, run_name: str, config: dict, resuming: bool):
    CALLS.append((label, "open", {"run_dir": run_dir, "run_name": run_name, "config": config,
                                  "resuming": resuming}))
    return Recorder(label)


def unreachable(*, run_dir: Path):
    raise ConnectionError("tracker server out of reach")


class MeanPixel:
    name = "mean-pixel"

    def evaluate(self, context):
        return [{"metric": "mean_pixel", "value": float(context.samples.float().mean()), "unit": "",
                 "n": len(context.samples), "higher_is_better": None, "protocol": dict(context.protocol)}]


@hookimpl
def cdmbench_register_loggers(register):
    register("recorder", recorder, summary="records its calls")
    register("second-recorder", functools.partial(recorder, label="second"))
    register("unreachable", unreachable)


@hookimpl
def cdmbench_register_metrics(register):
    register("mean-pixel", lambda: MeanPixel())
'''


@pytest.fixture
def recorder(plugin_dir):
    """The recorder plugin module (its CALLS), importable as ``testplugin_recorder``."""
    (plugin_dir / "testplugin_recorder.py").write_text(RECORDER_PLUGIN)
    return importlib.import_module("testplugin_recorder")


def _recipe(path: Path, *overrides: str, plugins=None):
    """The recipe at ``path`` with the recorder plugin and ``overrides`` (checked against ``plugins``)."""
    return parse_recipe(yaml.safe_load(path.read_text()), overrides=["plugins=[testplugin_recorder]", *overrides],
                        plugins=plugins)


def test_an_unknown_logger_is_a_recipe_error_with_a_suggestion(recorder, tiny_recipe):
    with pytest.raises(RecipeError, match=r"^log_to\[0\]\.name: unknown logger 'recordr'; did you mean "
                                          r"'recorder'\?"):
        _recipe(tiny_recipe, "log_to=[recordr]")


def test_logger_args_are_checked_and_each_logger_is_listed_once(recorder, tiny_recipe):
    plugins = load_plugins(["testplugin_recorder"])
    with pytest.raises(RecipeError, match=r"log_to\[0\]\.args\.labl: logger 'recorder' takes no argument "
                                          r"'labl'; did you mean 'label'\?"):
        _recipe(tiny_recipe, "log_to=[{name: recorder, args: {labl: a}}]", plugins=plugins)
    with pytest.raises(RecipeError, match=r"log_to\[0\]\.args\.run_dir: is set by cdmbench"):
        _recipe(tiny_recipe, "log_to=[{name: recorder, args: {run_dir: elsewhere}}]", plugins=plugins)
    with pytest.raises(RecipeError, match=r"log_to\[1\]: logger 'recorder' is listed twice"):
        _recipe(tiny_recipe, "log_to=[recorder, {name: recorder, args: {label: b}}]", plugins=plugins)
    recipe, _ = _recipe(tiny_recipe, "log_to=[recorder]", plugins=plugins)
    assert [c.name for c in recipe.log_to] == ["recorder"]
    assert _recipe(tiny_recipe, plugins=plugins)[0].log_to == []  # the default: none


def test_a_logger_needing_a_module_that_is_missing_is_not_available_with_the_reason(monkeypatch, tiny_recipe):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    plugins = load_plugins()
    assert "tensorboard" not in plugins["loggers"] and "cdmbench.builtin.loggers" not in plugins.failures
    with pytest.raises(RecipeError, match=r"log_to\[0\]\.name: logger 'tensorboard' \(plugin "
                                          r"'cdmbench.builtin.loggers'\) is not available: it needs the module "
                                          r"'tensorboard', which is not installed; install it \(pip install "
                                          r"tensorboard\)"):
        load_recipe(tiny_recipe, overrides=["log_to=[tensorboard]"], echo=lambda *_: None)


def test_changing_log_to_keeps_a_run_directory_resumable(recorder, tiny_recipe, tmp_path):
    recipe, plugins = _recipe(tiny_recipe)
    run_dir = RunDir(tmp_path / "run")
    run_dir.prepare(recipe, plugins, ["a", "b"])
    run_dir.check(_recipe(tiny_recipe, "log_to=[recorder]")[0])  # no error: the same run


def test_open_loggers_passes_the_host_facts_and_the_fanout_reaches_every_logger(recorder, tiny_recipe, tmp_path):
    recipe, plugins = _recipe(tiny_recipe, "log_to=[recorder, second-recorder]")
    grid = tmp_path / "grid.png"
    rows = [result_row(run="tiny", stage=stage, metric="sample_time", value=1.0, unit="s", n=2,
                       higher_is_better=False) for stage in ("base8", "sr16")]
    with open_loggers(plugins, recipe, tmp_path, resuming=True) as loggers:
        loggers.start_stage("base8", 2)
        loggers.log_scalars("base8", {"loss": 0.5}, 3)
        loggers.log_results(rows, {"base8": 4, "sr16": 6})
        loggers.log_image("sr16", "samples", grid, 6)
    facts = {"run_dir": tmp_path, "run_name": "tiny", "config": recipe.to_dict(), "resuming": True}
    for label in ("recorder", "second"):
        assert [c[1:] for c in recorder.CALLS if c[0] == label] == [
            ("open", facts), ("start_stage", "base8", 2), ("log_scalars", "base8", {"loss": 0.5}, 3),
            ("log_results", "base8", [rows[0]], 4), ("log_results", "sr16", [rows[1]], 6),
            ("log_image", "sr16", "samples", grid, 6), ("close",)]


def test_only_the_main_process_opens_loggers(recorder, tiny_recipe, tmp_path, monkeypatch):
    recipe, plugins = _recipe(tiny_recipe, "log_to=[recorder]")
    monkeypatch.setattr("cdmbench.runtime.distributed.is_main", lambda: False)
    with open_loggers(plugins, recipe, tmp_path, resuming=False) as loggers:
        loggers.log_scalars("base8", {"loss": 0.5}, 1)
    assert recorder.CALLS == []


def test_a_logger_that_fails_is_reported_once_and_the_others_go_on():
    calls = []

    class Failing:
        def log_scalars(self, stage, values, step):
            raise OSError("disk full")

        def close(self):
            calls.append("failing closed")

    class Fine:
        def log_scalars(self, stage, values, step):
            calls.append(step)

        def close(self):
            calls.append("fine closed")

    said = []
    loggers = Loggers({"failing": Failing(), "fine": Fine()}, echo=said.append)
    for step in (1, 2):
        loggers.log_scalars("base8", {"loss": 0.5}, step)
    loggers.close()
    assert calls == ["failing closed", 1, 2, "fine closed"]
    assert said == ["logger failing failed in log_scalars (OSError: disk full); it logs nothing more in this "
                    "command (the run directory has every number)"]


def test_a_logger_that_cannot_start_is_an_error_naming_it(recorder, tiny_recipe, tmp_path):
    recipe, plugins = _recipe(tiny_recipe, "log_to=[recorder, unreachable]")
    with pytest.raises(CdmbenchError, match=r"^log_to\[1\]: logger 'unreachable' \(plugin 'testplugin_recorder'\) "
                                            r"could not start \(ConnectionError: tracker server out of reach\); "
                                            r"fix its args or set-up as that says, or remove it from log_to$"):
        open_loggers(plugins, recipe, tmp_path, resuming=False)
    assert recorder.CALLS[-1] == ("recorder", "close")  # the one opened before is closed


def test_log_run_results_opens_nothing_without_rows_or_loggers(recorder, tiny_recipe, tmp_path):
    recipe, plugins = _recipe(tiny_recipe, "log_to=[recorder]")
    log_run_results(plugins, recipe, tmp_path, [], {})
    log_run_results(plugins, _recipe(tiny_recipe)[0], tmp_path, [{"stage": "base8"}], {"base8": 1})
    assert recorder.CALLS == []


@pytest.mark.slow
def test_run_evaluate_and_sweep_log_to_the_recipes_loggers(recorder, tiny_recipe, tmp_path):
    """A run logs each training row, the result rows it appends (its evaluations during training
    too) and the grids; running it again logs nothing new; evaluate and sweep continue the
    tracker run with their rows."""
    during = ["stages.base8.train.eval_every=2", "stages.base8.train.eval_num_samples=4",
              "evaluate.metrics=[mean-pixel]"]
    out = run(tiny_recipe, out=tmp_path / "run", progress=False, echo=lambda *_: None,
              overrides=["plugins=[testplugin_recorder]", "log_to=[recorder]", *during])
    calls = [c[1:] for c in recorder.CALLS]
    assert calls[0] == ("open", {"run_dir": out, "run_name": "tiny", "resuming": False,
                                 "config": _recipe(tiny_recipe, "log_to=[recorder]", *during)[0].to_dict()})
    assert calls[-1] == ("close",) and [c for c in calls if c[0] in ("open", "close")] == [calls[0], calls[-1]]
    for stage in ("base8", "sr16"):
        assert ("start_stage", stage, 0) in calls
        log = [json.loads(line) for line in (out / stage / "train_log.jsonl").read_text().splitlines()]
        assert [c[2:] for c in calls if c[:2] == ("log_scalars", stage)] == [
            ({k: v for k, v in row.items() if k != "step"}, row["step"]) for row in log]
        assert ("log_image", stage, "samples", out / stage / "samples" / "grid.png", 4) in calls
    logged = [row for c in calls if c[0] == "log_results" for row in c[2]]
    assert logged == RunDir(out).results()  # every row results.jsonl got, as written
    assert [r["protocol"]["step"] for r in logged if r["protocol"].get("during_training")] == [2, 4]
    assert {(c[1], c[3]) for c in calls if c[0] == "log_results"} == {("base8", 2), ("base8", 4), ("sr16", 4)}

    recorder.CALLS.clear()
    run(tiny_recipe, out=out, progress=False, echo=lambda *_: None,
        overrides=["plugins=[testplugin_recorder]", "log_to=[recorder]"])
    assert [c[1] for c in recorder.CALLS] == ["open", "start_stage", "start_stage", "close"]  # nothing new
    assert recorder.CALLS[0][2]["resuming"] is True

    recorder.CALLS.clear()
    tiny_eval = ["evaluate.num_samples=4", "evaluate.batch_size=4", "evaluate.shard_size=4"]
    rows = evaluate(out, stage="base8", metrics=["mean-pixel"], overrides=tiny_eval, progress=False,
                    echo=lambda *_: None)
    sweep_levels(out, stage="sr16", levels=[0.0], inputs=["ground-truth"], metrics=["mean-pixel"],
                 overrides=tiny_eval, progress=False, echo=lambda *_: None)
    opened = [c for c in recorder.CALLS if c[1] == "open"]
    assert len(opened) == 2 and all(c[2]["resuming"] for c in opened)
    results = [c[2:] for c in recorder.CALLS if c[1] == "log_results"]
    assert results[0] == ("base8", rows, 4)
    assert results[1][0] == "sr16" and results[1][2] == 4
    assert results[1][1] == [r for r in RunDir(out).results() if r["stage"] == "sr16"][-len(results[1][1]):]
