"""The built-in `tensorboard` logger: event files that TensorBoard reads back, a resumed stage's
later events purged, and a run logging to it end to end."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cdmbench.plugins import load_plugins
from cdmbench.storage.rundir import result_row
from cdmbench.training.run import run

accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _events(folder):
    events = accumulator.EventAccumulator(str(folder), size_guidance={accumulator.TENSORS: 0})
    events.Reload()
    return events


def _scalars(events, tag: str) -> list[tuple[int, float]]:
    return [(e.step, round(e.value, 6)) for e in events.Scalars(tag)]


def _tensorboard(run_dir):
    return load_plugins()["loggers"].get("tensorboard").build({}, run_dir=run_dir, run_name="tiny", config={},
                                                              resuming=False)


def test_scalars_results_and_grids_are_read_back_and_a_resumed_stage_purges_later_steps(tmp_path):
    grid = tmp_path / "grid.png"
    Image.fromarray(np.full((8, 16, 3), 200, np.uint8)).save(grid)
    logger = _tensorboard(tmp_path)
    logger.start_stage("base8", 0)
    for step in (1, 2, 3, 4):
        logger.log_scalars("base8", {"loss": 1.0 / step, "images_per_s": 10.0}, step)
    logger.log_results("base8", [
        result_row(run="tiny", stage="base8", metric="train_loss", value=0.25, unit="", n=4, higher_is_better=False),
        result_row(run="tiny", stage="base8", metric="fid", value=None, unit="", n=8, higher_is_better=None,
                   status="failed")], 4)
    logger.log_image("base8", "samples", grid, 4)
    logger.close()
    events = _events(tmp_path / "base8" / "tensorboard")
    assert _scalars(events, "base8/loss") == [(1, 1.0), (2, 0.5), (3, 0.333333), (4, 0.25)]
    assert _scalars(events, "base8/train_loss") == [(4, 0.25)]  # the failed row has no value to plot
    assert events.Tags()["images"] == ["base8/samples"] and events.Images("base8/samples")[0].width == 16
    assert "base8/results/text_summary" in events.Tags()["tensors"]

    resumed = _tensorboard(tmp_path)  # the stage resumes from its checkpoint at step 2
    resumed.start_stage("base8", 2)
    resumed.log_scalars("base8", {"loss": 9.0, "images_per_s": 10.0}, 3)
    resumed.close()
    assert _scalars(_events(tmp_path / "base8" / "tensorboard"), "base8/loss") == [(1, 1.0), (2, 0.5), (3, 9.0)]


@pytest.mark.slow
def test_a_run_logs_to_tensorboard_when_log_to_names_it(tiny_recipe, tmp_path):
    out = run(tiny_recipe, out=tmp_path / "a", stage="base8", progress=False, echo=lambda *_: None,
              overrides=["log_to=[tensorboard]"])
    events = _events(out / "base8" / "tensorboard")
    assert [e.step for e in events.Scalars("base8/loss")] == [1, 2, 3, 4]
    assert {"base8/images_per_s", "base8/grad_norm", "base8/seconds", "base8/train_loss"} <= set(
        events.Tags()["scalars"])
    without = run(tiny_recipe, out=tmp_path / "b", stage="base8", progress=False, echo=lambda *_: None)
    assert not (without / "base8" / "tensorboard").exists()  # log_to is empty by default
