"""Sampling-time searches in a report (``evaluate.search``): the table of searched points with
each metric and the chosen point marked, the quality/diversity trade-off figure (FID against IS,
or against precision and recall, over the points; Ho & Salimans 2021, Kynkaanniemi et al. 2024),
and the evaluated rows whose point was chosen on their own reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from cdmbench.evaluation.search import label, point_key
from cdmbench.reporting.tables import is_search, pyplot, save_figure

CHOSEN = "chosen"
TUNED = "choice tuned on this metric's reference"


def search_table(frame: pd.DataFrame, manifest: dict[str, Any]) -> pd.DataFrame:
    """One row per (search, stage, point) in the order evaluated, one column per metric (its newest
    value), and ``chosen``: "chosen" at each finished search's best point (``manifest``: search.json)."""
    if frame.empty:
        return pd.DataFrame()
    rows = frame[(frame["status"] == "ok") & frame["protocol"].map(is_search)].copy()
    if rows.empty:
        return pd.DataFrame()
    rows["search"] = rows["protocol"].map(lambda p: p["search"]["id"])
    rows["key"] = rows["protocol"].map(lambda p: point_key(p["search"]["point"]))
    rows["point"] = rows["protocol"].map(lambda p: label(p["search"]["point"]))
    rows = rows.drop_duplicates(["search", "stage", "key", "metric"], keep="last")
    table = rows.pivot_table(index=["search", "stage", "key", "point"], columns="metric", values="value",
                             aggfunc="last", sort=False)
    best = {sid: point_key(record["best"]) for sid, record in manifest.get("searches", {}).items()
            if record.get("best") is not None}
    table[CHOSEN] = [CHOSEN if best.get(sid) == key else "" for sid, _, key, _ in table.index]
    table.columns.name = None
    return table.droplevel("key")


def _axes(columns: list[str], metric: str) -> tuple[str, list[str]]:
    """The x metric (``metric`` if an FID, else the first FID column, else ``metric``) and the
    metrics it trades against: IS, precision and recall."""
    fids = [c for c in columns if c.startswith("fid")]
    x = metric if metric.startswith("fid") or not fids else fids[0]
    return x, [c for c in columns if c != x and (c.startswith("is") or c in ("precision", "recall"))]


def _short(point: str) -> str:
    """A point's label as the figure shows it: each key as its stage and last part
    (``sr64.augmentation.args.level=0.2`` -> ``sr64 level=0.2``)."""
    parts = [part.split("=", 1) for part in point.split(", ")]
    return ", ".join(f"{key.split('.')[0]} {key.split('.')[-1]}={value}" if "." in key else f"{key}={value}"
                     for key, value in parts)


def plot_tradeoffs(table: pd.DataFrame, chosen: dict[str, Any], path: Path) -> Path | None:
    """One panel per metric traded against FID (``_axes``) over the chosen search's points, each
    point labelled, the chosen point starred; None when the search measured nothing to trade."""
    part = table.xs(chosen["search"], level="search") if chosen["search"] in table.index.get_level_values(0) else None
    if part is None or part.empty:
        return None
    x, others = _axes([c for c in part.columns if c != CHOSEN], chosen["metric"])
    others = [y for y in others if part[[x, y]].notna().all(axis=1).any()]
    if not others:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(others), figsize=(6.5 * len(others), 4.5), squeeze=False)
    points = part.index.get_level_values("point")
    for ax, y in zip(axes[0], others, strict=True):
        ax.plot(part[x], part[y], "o", color="tab:blue", label="searched points")
        for name, xv, yv in zip(points, part[x], part[y], strict=True):
            ax.annotate(_short(name), (xv, yv), fontsize=6, xytext=(3, 3), textcoords="offset points",
                        annotation_clip=False, clip_on=True)
        best = part[part[CHOSEN] == CHOSEN]
        ax.plot(best[x], best[y], "*", color="tab:red", markersize=16, label=f"chosen by {chosen['metric']}")
        ax.set(xlabel=x, ylabel=y, title=f"{y} against {x}")
        ax.margins(x=0.3, y=0.1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"search {chosen['search']} of {chosen['stage']}: {len(part)} points", fontsize=9)
    return save_figure(fig, path)


def tuned_rows(rows: pd.DataFrame) -> list[str]:
    """'metric of stage (n N): choice tuned ...' for each evaluated row (``measured_rows``) whose
    sampling point a search chose by a number against the same reference as its own."""
    if rows.empty:
        return []
    tuned = rows[rows["protocol"].map(lambda p: p.get("tuned_on_reference") is True)]
    return [f"{r['metric']} of {r['stage']} (n {r['n']}): {TUNED} (search {r['protocol']['chosen_by']['search']}, "
            f"by {r['protocol']['chosen_by']['metric']} on {r['protocol']['chosen_by']['n_search']} samples)"
            for _, r in tuned.iterrows()]
