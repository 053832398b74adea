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
    # One value per (run, stage, metric, feature network, mode): the newest.
    protocol = frame["protocol"] if "protocol" in frame else pd.Series([{}] * len(frame))
    frame["_features"] = protocol.map(lambda p: f"{p.get('features', '')}/{p.get('mode', '')}")
    frame = frame.drop_duplicates(["run", "stage", "metric", "_features"], keep="last")
    return frame.drop(columns="_features").reset_index(drop=True)


def _features_label(protocol: dict) -> str:
    """' (features, mode)' for metrics computed with a feature network, else ''."""
    if not protocol.get("features"):
        return ""
    return f" ({protocol['features']}, {protocol.get('mode', '-')})"


def results_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, stage), one column per metric (with its unit)."""
    if frame.empty:
        return frame
    ok = frame[frame["status"] == "ok"].copy()
    ok["metric"] = (ok["metric"] + ok["protocol"].map(_features_label)
                    + ok["unit"].map(lambda u: f" [{u}]" if u else ""))
    order = list(dict.fromkeys(ok["stage"]))
    table = ok.pivot_table(index=["run", "stage"], columns="metric", values="value", aggfunc="last",
                           sort=False)
    table.columns.name = None
    return table.reindex(sorted(table.index, key=lambda k: (k[0], order.index(k[1]))))


# --- measured rows beside published baselines ---------------------------------------------------

COMPARED_FIELDS = {"fid": ("features", "mode", "n", "reference_split"),
                   "is": ("features", "n", "splits"),
                   "cas": ("classifier", "epochs", "scaled_down", "test_split")}


def baseline_frame(plugins) -> pd.DataFrame:
    """Every registered baseline row, with the plugin that registered it."""
    rows = []
    for component in plugins["baselines"]:
        for row in component.factory():
            rows.append({"model": row.model, "dataset": row.dataset, "resolution": row.resolution,
                         "metric": row.metric, "value": row.value, "source": row.source,
                         "protocol": row.protocol, "baseline": component.name})
    return pd.DataFrame(rows)


def _family(metric: str) -> str:
    return "fid" if metric.startswith("fid_") else "is" if metric == "is" else "cas"


def comparability(metric: str, measured: dict, published: dict) -> str:
    """'comparable', or 'no: ' and every field (dataset, resolution, protocol) that differs."""
    fields = ("dataset", "resolution") + COMPARED_FIELDS[_family(metric)]
    differ = [f"{f} {measured.get(f)!r} vs {published.get(f)!r}" for f in fields
              if measured.get(f) != published.get(f)]
    return "comparable" if not differ else "no: " + "; ".join(differ)


def comparison_table(results: pd.DataFrame, baselines: pd.DataFrame) -> pd.DataFrame:
    """Each measured metric row beside the published rows of the same metric (at its
    resolution when there are any), with whether the pair is comparable and why not."""
    if results.empty or baselines.empty:
        return pd.DataFrame()
    out = []
    for _, row in results[results["status"] == "ok"].iterrows():
        published = baselines[baselines["metric"] == row["metric"]]
        if published.empty:
            continue
        dataset = row["protocol"].get("dataset")
        same_data = published[published["dataset"] == dataset]
        if same_data.empty:  # one line, not one per published row of another dataset
            out.append({"run": row["run"], "stage": row["stage"], "metric": row["metric"],
                        "measured": row["value"], "published model": "-", "published res": None,
                        "published": None, "comparable": f"no: published rows are on "
                        f"{', '.join(sorted(set(published['dataset'])))}, not {dataset!r}"})
            continue
        same_res = same_data[same_data["resolution"] == row["protocol"].get("resolution")]
        for _, b in (same_res if not same_res.empty else same_data).iterrows():
            out.append({"run": row["run"], "stage": row["stage"], "metric": row["metric"],
                        "measured": row["value"], "published model": b["model"],
                        "published res": b["resolution"], "published": b["value"],
                        "comparable": comparability(row["metric"], row["protocol"], b["protocol"])})
    return pd.DataFrame(out)
