"""Result rows -> pandas tables."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .errors import CdmbenchError


def read_results(run_dirs: list[Path]) -> pd.DataFrame:
    """All rows of the runs' results.jsonl; for a repeated (run, stage, metric) the newest wins."""
    rows = []
    for folder in run_dirs:
        path = Path(folder) / "results.jsonl"
        if not path.exists():
            raise CdmbenchError(f"no results in {folder} (missing {path.name}); is it a run directory?")
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return frame.drop_duplicates(["run", "stage", "metric"], keep="last").reset_index(drop=True)


def results_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, stage), one column per metric (with its unit)."""
    if frame.empty:
        return frame
    ok = frame[frame["status"] == "ok"].copy()
    ok["metric"] = ok["metric"] + ok["unit"].map(lambda u: f" [{u}]" if u else "")
    order = list(dict.fromkeys(ok["stage"]))
    table = ok.pivot_table(index=["run", "stage"], columns="metric", values="value", aggfunc="last",
                           sort=False)
    table.columns.name = None
    return table.reindex(sorted(table.index, key=lambda k: (k[0], order.index(k[1]))))
