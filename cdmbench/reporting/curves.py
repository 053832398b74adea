"""Quality during training: the rows that ``train.eval_every`` records
(``evaluation/during_training.py``) as a tidy table, and each metric plotted against the training
images seen, one line per stage."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cdmbench.reporting.tables import features_label, is_during_training, latest, pyplot, save_figure

COLUMNS = ["run", "stage", "metric", "unit", "step", "train_images", "value", "stderr"]


def quality_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The newest ok row of each evaluation during training, one per (run, stage, metric, step):
    the columns ``COLUMNS``, metric named with its feature network (``fid_test (classifier,
    native)``), in order of run, stage (as first recorded), metric and step."""
    if frame.empty:
        return pd.DataFrame(columns=COLUMNS)
    rows = latest(frame)
    rows = rows[(rows["status"] == "ok") & rows["protocol"].map(is_during_training)]
    out = pd.DataFrame({
        "run": rows["run"], "stage": rows["stage"],
        "metric": rows["metric"] + rows["protocol"].map(features_label), "unit": rows["unit"],
        "step": rows["protocol"].map(lambda p: p["step"]),
        "train_images": rows["protocol"].map(lambda p: p["train_images"]),
        "value": pd.to_numeric(rows["value"]), "stderr": pd.to_numeric(rows["stderr"])}, columns=COLUMNS)
    stages = list(dict.fromkeys(out["stage"]))
    out = out.assign(_order=out["stage"].map(stages.index))
    return out.sort_values(["run", "_order", "metric", "step"]).drop(columns="_order").reset_index(drop=True)


def plot_quality(rows: pd.DataFrame, path: Path) -> Path:
    """One panel per metric of ``quality_rows`` (non-empty): its value against the training images
    seen, one line per stage (``run: stage`` when there are several runs), with error bars of one
    standard error where the rows have one (FID's bootstrap, IS's spread over splits)."""
    plt = pyplot()
    metrics = list(dict.fromkeys(rows["metric"]))
    several = rows["run"].nunique() > 1
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        part = rows[rows["metric"] == metric]
        for (run, stage), line in part.groupby(["run", "stage"], sort=False):
            ax.errorbar(line["train_images"], line["value"], yerr=line["stderr"], marker="o", capsize=3,
                        label=f"{run}: {stage}" if several else stage)
        unit = part["unit"].iloc[0]
        ax.set(title=metric, xlabel="training images seen", ylabel=f"{metric} [{unit}]" if unit else metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)
