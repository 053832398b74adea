"""Rows of evaluations during training: left out of the report's tables, tidy in ``quality_rows``
and plotted against the training images seen, one line per stage."""

from __future__ import annotations

import pandas as pd
import pytest

import cdmbench.reporting.curves
from cdmbench.reporting.curves import plot_quality, quality_rows
from cdmbench.reporting.tables import latest, results_table, sweep_rows
from cdmbench.storage.rundir import result_row

FEATURES = {"features": "classifier", "mode": "native", "n": 20}


def during(stage: str, step: int, value: float | None, stderr: float | None = 0.1, batch: int = 8,
           **protocol) -> dict:
    return result_row(run="tiny", stage=stage, metric="fid_train", value=value, unit="", n=20, stderr=stderr,
                      higher_is_better=False, status="ok" if value is not None else "failed",
                      protocol={**FEATURES, "during_training": True, "step": step, "train_images": step * batch,
                                **protocol})


@pytest.fixture
def frame() -> pd.DataFrame:
    """base8 evaluated at steps 2 and 4 (step 4 twice: the newer counts), sr16 at 4 (a failed
    row at 2), and a final evaluation and a sweep point of sr16."""
    final = result_row(run="tiny", stage="sr16", metric="fid_train", value=7.0, unit="", n=20,
                       higher_is_better=False, stderr=0.5, protocol=FEATURES)
    swept = result_row(run="tiny", stage="sr16", metric="fid_train", value=8.0, unit="", n=20,
                       higher_is_better=False, protocol={**FEATURES, "level": 0.1, "inputs": "generated"})
    rows = [during("base8", 2, 30.0), during("base8", 4, 99.0), during("base8", 4, 20.0, stderr=None),
            during("sr16", 2, None), during("sr16", 4, 9.0, batch=4, inputs="ground-truth", levels=[0.1]),
            final, swept]
    return pd.DataFrame(rows)


def test_the_tables_leave_rows_made_during_training_out(frame):
    table = results_table(frame)
    assert table.loc[("tiny", "sr16"), "fid_train (classifier, native)"] == 7.0  # the final evaluation only
    assert list(table.index) == [("tiny", "sr16")]
    assert list(sweep_rows(frame)["value"]) == [8.0]
    stepped = frame.iloc[[0, 3]].assign(protocol=[{**p, "level": 0.1} for p in frame.iloc[[0, 3]]["protocol"]])
    assert list(sweep_rows(pd.concat([frame, stepped]))["value"]) == [8.0]  # not even with a level
    assert len(latest(frame)) == 6  # each step is its own evaluation; base8's step 4 once


def test_quality_rows_are_the_newest_ok_row_per_stage_and_step(frame):
    rows = quality_rows(frame)
    assert list(rows[["stage", "step", "train_images", "value"]].itertuples(index=False, name=None)) == [
        ("base8", 2, 16, 30.0), ("base8", 4, 32, 20.0), ("sr16", 4, 16, 9.0)]
    assert set(rows["metric"]) == {"fid_train (classifier, native)"} and rows["stderr"].isna().tolist() == [
        False, True, False]
    assert quality_rows(pd.DataFrame()).empty


def test_the_plot_draws_each_stage_against_the_images_seen_with_its_errors(frame, tmp_path, monkeypatch):
    drawn = []
    real = cdmbench.reporting.curves.save_figure
    monkeypatch.setattr(cdmbench.reporting.curves, "save_figure",
                        lambda fig, path: drawn.append(fig) or real(fig, path))
    path = plot_quality(quality_rows(frame), tmp_path / "quality.png")
    assert path.read_bytes().startswith(b"\x89PNG")
    [ax] = drawn[0].axes  # one panel: one metric
    curves = ax.containers  # an errorbar per stage: its line, caps and bars
    assert [c.get_label() for c in curves] == ["base8", "sr16"] and all(c.has_yerr for c in curves)
    assert [(list(c.lines[0].get_xdata()), list(c.lines[0].get_ydata())) for c in curves] == [
        ([16, 32], [30.0, 20.0]), ([16], [9.0])]
    assert ax.get_xlabel() == "training images seen" and ax.get_title() == "fid_train (classifier, native)"
