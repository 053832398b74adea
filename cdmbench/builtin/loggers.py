"""The built-in logger ``tensorboard``: training scalars, result rows and sample grids as
TensorBoard event files in each stage's folder, ``<run>/<stage>/tensorboard/``.

It needs the ``tensorboard`` package (``pip install -e ".[tensorboard]"``); without it the name is
registered as not available, with that reason, and only a recipe whose ``log_to`` names it fails.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cdmbench import hookimpl

RESULT_COLUMNS = ("metric", "value", "stderr", "unit", "n", "status")


def _markdown(rows: list[dict[str, Any]]) -> str:
    """Result rows as a markdown table (TensorBoard's text dashboard renders it)."""
    lines = ["| " + " | ".join(RESULT_COLUMNS) + " |", "|" + "---|" * len(RESULT_COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join("" if row.get(c) is None else str(row[c]) for c in RESULT_COLUMNS) + " |")
    return "\n".join(lines)


class TensorBoardLogger:
    """One ``SummaryWriter`` per stage, opened on first use: scalars ``<stage>/<key>`` (training
    rows and result metrics alike), result rows as a text table ``<stage>/results``, images
    ``<stage>/<name>``, all at the training step they belong to."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.writers: dict[str, Any] = {}

    def _writer(self, stage: str, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        if stage not in self.writers:
            self.writers[stage] = SummaryWriter(str(self.run_dir / stage / "tensorboard"), purge_step=purge_step)
        return self.writers[stage]

    def start_stage(self, stage: str, step: int) -> None:
        """A new writer that purges the stage's events after ``step`` (a resumed run's)."""
        if stage in self.writers:
            self.writers.pop(stage).close()
        self._writer(stage, purge_step=step + 1)

    def log_scalars(self, stage: str, values: dict[str, float], step: int) -> None:
        writer = self._writer(stage)
        for key, value in values.items():
            writer.add_scalar(f"{stage}/{key}", value, step)

    def log_results(self, stage: str, rows: list[dict[str, Any]], step: int) -> None:
        writer = self._writer(stage)
        for row in rows:
            if isinstance(row.get("value"), (int, float)) and math.isfinite(row["value"]):
                writer.add_scalar(f"{stage}/{row['metric']}", row["value"], step)
        writer.add_text(f"{stage}/results", _markdown(rows), step)

    def log_image(self, stage: str, name: str, path: Path, step: int) -> None:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self._writer(stage).add_image(f"{stage}/{name}", pixels, step, dataformats="HWC")

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()


def tensorboard(*, run_dir: Path) -> TensorBoardLogger:
    """TensorBoard event files in ``<run>/<stage>/tensorboard/`` (``tensorboard --logdir <run>``)."""
    return TensorBoardLogger(run_dir)


@hookimpl
def cdmbench_register_loggers(register):
    register("tensorboard", tensorboard, requires=("tensorboard",),
             summary="TensorBoard event files in <run>/<stage>/tensorboard (needs tensorboard)")
