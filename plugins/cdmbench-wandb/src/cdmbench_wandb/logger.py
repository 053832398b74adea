"""The ``wandb`` logger: a cdmbench run as one Weights & Biases run.

- Training log rows: ``<stage>/loss``, ``<stage>/grad_norm``, ``<stage>/images_per_s``,
  ``<stage>/seconds`` (and ``<stage>/peak_memory_gib``), plotted against ``<stage>/step`` (each
  stage counts its own steps: W&B's global step cannot go back to 0 for the next stage).
- Result rows: each finite value as ``<stage>/<metric>`` at the step of the weights it measures,
  and every row this command logged as the table ``results`` (the protocol as JSON).
- Sample grids: ``<stage>/samples`` images.
- The resolved recipe is the run's config, the run's name its display name.
- Resume: the W&B run id is kept in ``<run>/wandb-run-id``; every later command on the run
  (``cdmbench run`` again, ``evaluate``, ``sweep``) continues that W&B run (``resume="allow"``).
  W&B keeps what it was sent: steps trained again after a resume are logged again.

wandb is imported when the logger is built, not when the plugin loads.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

ID_FILE = "wandb-run-id"  # in the run directory: the W&B run every command on it continues
MODES = ("online", "offline", "disabled")  # wandb.init's modes a recipe may choose
RESULT_COLUMNS = ("stage", "metric", "value", "stderr", "unit", "n", "status", "protocol", "time")


class WandbLogger:
    """A W&B run; per stage, a step metric ``<stage>/step`` that the stage's keys plot against."""

    def __init__(self, run: Any):
        self.run = run
        self.stages: set[str] = set()
        self.results: list[list[Any]] = []  # the table rows logged so far by this command

    def _log(self, stage: str, values: dict[str, Any], step: int) -> None:
        if stage not in self.stages:
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self.stages.add(stage)
        self.run.log({**{f"{stage}/{key}": value for key, value in values.items()}, f"{stage}/step": step})

    def start_stage(self, stage: str, step: int) -> None:
        """Nothing to do: W&B cannot drop what a cut-short job logged after ``step``."""

    def log_scalars(self, stage: str, values: dict[str, float], step: int) -> None:
        self._log(stage, values, step)

    def log_results(self, stage: str, rows: list[dict[str, Any]], step: int) -> None:
        import wandb

        values = {row["metric"]: row["value"] for row in rows
                  if isinstance(row.get("value"), (int, float)) and math.isfinite(row["value"])}
        if values:
            self._log(stage, values, step)
        self.results += [[json.dumps(row.get("protocol", {}), sort_keys=True) if column == "protocol"
                          else row.get(column) for column in RESULT_COLUMNS] for row in rows]
        self.run.log({"results": wandb.Table(columns=list(RESULT_COLUMNS), data=self.results)})

    def log_image(self, stage: str, name: str, path: Path, step: int) -> None:
        import wandb

        self._log(stage, {name: wandb.Image(str(path))}, step)

    def close(self) -> None:
        self.run.finish()


def wandb_logger(*, project: str | None = None, entity: str | None = None,
                 mode: Literal["online", "offline", "disabled"] | None = None,
                 dir: str | None = None, group: str | None = None, tags: list[str] | None = None,
                 run_dir: Path, run_name: str, config: dict[str, Any], resuming: bool) -> WandbLogger:
    """project: the W&B project (None: $WANDB_PROJECT, else "cdmbench"); entity: the user or team
    (None: $WANDB_ENTITY, else your default); mode: online, offline (sync later with `wandb sync`)
    or disabled (None: $WANDB_MODE, else online); dir: where wandb keeps its local files (None:
    the run directory, in <run>/wandb/); group, tags: W&B's grouping and labels of the run."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    import wandb

    id_file = Path(run_dir) / ID_FILE
    run_id = id_file.read_text().strip() if resuming and id_file.is_file() else None
    folder = Path(dir) if dir is not None else Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project or os.environ.get("WANDB_PROJECT") or "cdmbench", entity=entity,
                     mode=mode, dir=str(folder), id=run_id or None, resume="allow", name=run_name,
                     config=config, group=group, tags=tags, reinit="create_new")
    if run_id is None:
        id_file.write_text(run.id + "\n")
    return WandbLogger(run)
