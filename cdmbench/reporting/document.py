"""What a run's report says, as blocks that report.md (``markdown.py``) and report.html
(``html.py``) both render: prose in a markdown subset (``#`` headings, paragraphs, ``- `` items,
`code` and **bold**), tables of formatted cells in long form (one row per stage and metric),
each distinct protocol once under the label its rows cite, and figures; built from the run's
rows, recipe and files (``build_report``, which draws the plots it shows)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from cdmbench.evaluation.findings import findings_section
from cdmbench.evaluation.search import read_manifest
from cdmbench.plugins import Plugins
from cdmbench.recipe.schema import Recipe
from cdmbench.reporting.curves import plot_quality, quality_rows
from cdmbench.reporting.tables import (
    baseline_frame,
    measured_rows,
    plot_sweeps,
    plot_training,
    published_pairs,
    read_results,
    replicates_table,
    results_table,
    sweep_rows,
    sweep_table,
    training_table,
)
from cdmbench.reporting.tradeoffs import plot_tradeoffs, search_table, tuned_rows
from cdmbench.storage.rundir import RunDir
from cdmbench.training.trainer import read_log


@dataclass(frozen=True)
class Table:
    """Rows of formatted cells under ``columns``. ``kind`` and ``hooks`` (per row, e.g. its stage
    and metric) identify the rows in report.html (``<tr class=kind data-KEY=VALUE>``)."""
    columns: list[str]
    rows: list[list[str]]
    kind: str = ""
    hooks: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Protocols:
    """Each distinct protocol once: label (``P1`` ...) -> (the rows citing it, the protocol)."""
    items: dict[str, tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class Figure:
    """An image of the run, ``path`` relative to the run directory."""
    path: str
    alt: str


Block = str | Table | Protocols | Figure


@dataclass(frozen=True)
class Report:
    """A run's report: its title (the run's name), its blocks in order, and its results table."""
    title: str
    blocks: list[Block]
    results: Table | None  # also the console's summary


def cell(value: Any) -> str:
    """A value as a cell: 4 significant digits for a float (a whole one under a million in full,
    as a count read from JSON), '' for a missing one, else as written."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e6 else f"{value:.4g}"
    return str(value)


def frame_table(frame: pd.DataFrame, kind: str = "", hooks: list[dict[str, str]] | None = None) -> Table:
    """A DataFrame as a ``Table``: its index as the first columns, each value a ``cell``."""
    frame = frame.reset_index()
    return Table([str(c) for c in frame.columns], [[cell(v) for v in row] for row in frame.itertuples(index=False)],
                 kind, hooks or [])


def plain(value: Any) -> str:
    """A protocol value as text: a mapping as ``{key: value, ...}``, a list comma-separated."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {plain(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return ", ".join(map(plain, value))
    return cell(value)


def paragraphs(text: str) -> list[tuple[str, str]]:
    """Prose as (kind, text) pairs: ('h2', ...) for a ``## `` heading (any level), ('p', ...) for a
    paragraph and ('li', ...) for a ``- `` item, each with its lines joined."""
    out: list[tuple[str, str]] = []
    for line in text.strip().splitlines():
        heading = re.match(r"(#{1,6}) (.*)", line)
        if heading:
            out.append((f"h{len(heading[1])}", heading[2].strip()))
        elif line.startswith("- "):
            out.append(("li", line[2:].strip()))
        elif not line.strip():
            out.append(("", ""))
        elif out and out[-1][0] in ("p", "li"):
            out[-1] = (out[-1][0], f"{out[-1][1]} {line.strip()}")
        else:
            out.append(("p", line.strip()))
    return [part for part in out if part[0]]


NOT_RECORDED = "not recorded"
# What an evaluation's protocol card shows, NOT_RECORDED where its rows lack it (older rows): the
# feature network and its hash, the reference and its hash, n, the label sampling, each stage's
# sampler (with its steps), sampling precision and guidance, and the seeds.
CARD = ("features", "features_sha256", "reference", "reference_sha256", "n", "labels", "samplers", "precision",
        "guidance", "seeds")


def card(protocol: dict[str, Any], metric: str) -> dict[str, Any]:
    """An evaluation's protocol (one with ``seeds``) with every ``CARD`` field that applies to its
    metric (IS has no reference; CAS trains a classifier instead of using a feature network and
    tests it on ``test_split``), as recorded or NOT_RECORDED; another protocol as it is."""
    if "seeds" not in protocol:
        return protocol
    skip = (("features", "features_sha256", "reference", "reference_sha256") if "classifier" in protocol
            else ("reference", "reference_sha256") if metric == "is" or metric.startswith("is_") else ())
    return {**protocol, **{k: NOT_RECORDED for k in CARD if k not in protocol and k not in skip}}


class _Labels:
    """Protocol labels P1, P2 ... in order of first citation, each with the rows citing it
    ('metric: stage, stage; metric: stage'); an evaluation's protocol as its ``card``."""

    def __init__(self):
        self._of: dict[str, str] = {}
        self._protocols: dict[str, dict[str, Any]] = {}
        self._cited: dict[str, dict[str, list[str]]] = {}

    def __call__(self, protocol: dict[str, Any], metric: str, stage: str) -> str:
        if not protocol:
            return ""
        protocol = card(protocol, metric)
        label = self._of.setdefault(json.dumps(protocol, sort_keys=True, default=str), f"P{len(self._of) + 1}")
        self._protocols[label] = protocol
        stages = self._cited.setdefault(label, {}).setdefault(metric, [])
        stages += [] if stage in stages else [stage]
        return label

    def protocols(self) -> Protocols:
        return Protocols({label: ("; ".join(f"{metric}: {', '.join(stages)}" for metric, stages in
                                            self._cited[label].items()), protocol)
                          for label, protocol in self._protocols.items()})


def _stage_order(rows: pd.DataFrame, stages: list[str]) -> pd.DataFrame:
    """Rows sorted (stably) by their stage's position in the recipe, unknown stages last."""
    position = {name: i for i, name in enumerate(stages)}
    return rows.assign(_at=rows["stage"].map(lambda s: position.get(s, len(position)))).sort_values(
        "_at", kind="stable").drop(columns="_at")


def _results(rows: pd.DataFrame, labels: _Labels) -> Table:
    """The newest row of each evaluation: stage, metric, value, ±, unit, n, protocol label."""
    cells, hooks = [], []
    for _, r in rows.iterrows():
        label = labels(r["protocol"], r["metric"], r["stage"])
        cells.append([r["stage"], r["metric"], cell(r["value"]), cell(r.get("stderr")), cell(r.get("unit")),
                      cell(r.get("n")), label])
        hooks.append({"stage": r["stage"], "metric": r["metric"], "protocol": label})
    return Table(["stage", "metric", "value", "±", "unit", "n", "protocol"], cells, "result", hooks)


def _results_section(rows: pd.DataFrame, labels: _Labels) -> tuple[list[Block], Table | None]:
    """The section of the results (``_results``), and their table (None without rows)."""
    table = _results(rows, labels) if not rows.empty else None
    return ["## Results", *(["No results yet."] if table is None else [
        "The newest row of each evaluation. ± is one standard error (FID's bootstrap, IS's spread over splits); n "
        "is the number of samples (of training steps for training rows); each protocol (what was measured how) "
        "is listed once below.", table])], table


def console_blocks(results: pd.DataFrame, plugins: Plugins, *, with_results: bool) -> list[Block]:
    """What ``cdmbench report`` prints of runs' rows, writing no file: with ``with_results`` the
    results (``_results_section``), then the published rows beside them, each protocol once, and
    the sampling-level sweeps. Rows of several runs name their stage ``run/stage``."""
    if results.empty:
        return []
    if results["run"].nunique() > 1:
        results = results.assign(stage=results["run"] + "/" + results["stage"])
    rows, labels = measured_rows(results), _Labels()
    blocks = _results_section(rows, labels)[0] if with_results else []
    published = _published(rows, labels, plugins)
    blocks += [protocols] if (protocols := labels.protocols()).items else []
    sweeps = _sweep_table(results, [])
    return blocks + published + ([] if sweeps is None else ["## Sampling-level sweeps", SWEEPS_TEXT, sweeps])


def _published(rows: pd.DataFrame, labels: _Labels, plugins: Plugins) -> list[Block]:
    """The published rows of each measured metric: those of the same protocol (``comparability``),
    those shown for context with the reason they are not (a record of the baselines' context group
    marked so), and one sentence for metrics published on other datasets only."""
    baselines = baseline_frame(plugins) if not rows.empty else pd.DataFrame()
    pairs = published_pairs(rows, baselines) if not baselines.empty else pd.DataFrame()
    if pairs.empty:
        return []
    blocks: list[Block] = ["## Beside published results"]
    elsewhere = pairs["published model"] == "-"
    if elsewhere.all():
        return [*blocks, f"None: {pairs['comparable'].iloc[0].removeprefix('no: ')}."]
    blocks.append("A pair has the same protocol only when dataset, resolution, metric, n, label sampling and evaluator "
                  "match, and the reference for a metric against real images (CAS: Ravuri & Vinyals' protocol "
                  "instead of an evaluator); a field a row does not record counts as differing. Models marked "
                  "(record) are later results, some guided, shown for where the field stands.")
    comparable = pairs["comparable"] == "comparable"
    groups = {"Same protocol": pairs[comparable], "Context (not the same protocol)": pairs[~elsewhere & ~comparable]}
    for title, part in groups.items():
        why = [] if title == "Same protocol" else ["why not"]
        cells = [[p["stage"], p["metric"], cell(p["measured"]), cell(p["stderr"]),
                  labels(p["protocol"], p["metric"], p["stage"]),
                  p["published model"] + (" (record)" if p["group"] == "context" else ""),
                  cell(p["published res"]), cell(p["published"]), *([p["comparable"].removeprefix("no: ")] * len(why))]
                 for _, p in part.iterrows()]
        hooks = [{"stage": p["stage"], "metric": p["metric"], "model": p["published model"]}
                 for _, p in part.iterrows()]
        columns = ["stage", "metric", "value", "±", "protocol", "published model", "res", "published", *why]
        blocks += [f"### {title}", Table(columns, cells, "published", hooks) if cells else "None."]
    if elsewhere.any():
        reasons = "; ".join(sorted(set(pairs.loc[elsewhere, "comparable"].str.removeprefix("no: "))))
        blocks.append(f"Not on this dataset: {', '.join(sorted(set(pairs.loc[elsewhere, 'metric'])))} ({reasons}).")
    return blocks


def _replicates(results: pd.DataFrame, recipe: Recipe) -> list[Block]:
    """Each stage trained several times: its runs and each metric's mean and standard error."""
    runs = replicates_table(results_table(results), recipe.replicates()) if not results.empty else pd.DataFrame()
    if runs.empty:
        return []
    metrics = [c for c in runs.columns if c != "runs" and not c.endswith(" ±")]
    shown = [(stage, metric, row) for (_, stage), row in runs.iterrows() for metric in metrics
             if not pd.isna(row[metric])]
    cells = [[stage, cell(row["runs"]), metric, cell(row[metric]), cell(row[f"{metric} ±"])]
             for stage, metric, row in shown]
    return ["## Stages trained several times",
            "Each metric's mean over a stage's training runs (`replicates: k`) and, as ±, its standard error over "
            "them (their standard deviation over sqrt(runs); CDM's findings below take no less than the FID "
            "bootstrap's share).",
            Table(["stage", "runs", "metric", "mean", "±"], cells, "replicates",
                  [{"stage": stage, "metric": metric} for stage, metric, _ in shown])]


SWEEPS_TEXT = ("Each SR stage evaluated at sampling-time augmentation levels s, on the previous stage's samples "
               "(generated) and on downsampled training images (ground-truth); `cdmbench sweep`.")


def _sweep_table(results: pd.DataFrame, stages: list[str]) -> Table | None:
    """One row per swept stage, samplers, inputs, metric and level s, or None without sweeps."""
    rows = sweep_rows(results) if not results.empty else results
    if rows.empty:
        return None
    rows = _stage_order(rows.sort_values(["samplers", "inputs", "metric", "s"]), stages)
    cells = [[r["stage"], r["samplers"], r["inputs"], r["metric"], cell(r["s"]), cell(r["value"]),
              cell(r.get("stderr")), cell(r.get("unit"))] for _, r in rows.iterrows()]
    hooks = [{"stage": r["stage"], "metric": r["metric"], "level": cell(r["s"]), "inputs": r["inputs"]}
             for _, r in rows.iterrows()]
    return Table(["stage", "samplers", "inputs", "metric", "s", "value", "±", "unit"], cells, "sweep", hooks)


def _sweeps(results: pd.DataFrame, run_dir: RunDir, recipe: Recipe) -> list[Block]:
    """The sampling-level sweeps: the table (``_sweep_table``) and the plot (sweeps.png)."""
    table = _sweep_table(results, recipe.stage_names())
    if table is None:
        return []
    groups = recipe.replicates()
    plot_sweeps(sweep_table(results), run_dir.path / "sweeps.png", groups)
    swept = {row[0] for row in table.rows}
    shared = any(len(swept.intersection(names)) > 1 for names in groups.values())
    return ["## Sampling-level sweeps",
            SWEEPS_TEXT
            + (" In the plot a stage trained several times shares its panel with its swept copies: each run's "
               "curve faint, their mean bold (± as in CDM's findings below)." if shared else ""),
            table, Figure("sweeps.png", "metrics against s")]


def _searches(results: pd.DataFrame, rows: pd.DataFrame, run_dir: RunDir) -> list[Block]:
    """The sampling-time searches (``tradeoffs``): their points, the trade-off plot (tradeoffs.png)
    and the evaluated rows whose choice was tuned on their own reference."""
    manifest = read_manifest(run_dir.path)
    table = search_table(results, manifest)
    if table.empty:
        return []
    chosen = manifest.get("chosen")
    figure = plot_tradeoffs(table, chosen, run_dir.path / "tradeoffs.png") if chosen else None
    return ["## Sampling-time searches",
            "Each point of a search (`evaluate.search`) evaluated on its small sample; the best by the search's "
            "metric is chosen, then evaluated on the full sample (the results above).",
            frame_table(table, "search", [{"search": sid, "point": point} for sid, _, point in table.index]),
            *([Figure("tradeoffs.png", "quality against diversity over the searched points")] if figure else []),
            *[f"- {line}" for line in tuned_rows(rows)]]


def _training(run_dir: RunDir, recipe: Recipe) -> list[Block]:
    """Each stage's last train_log.jsonl row, and the loss curves (training.png)."""
    logs = {st.name: log for st in recipe.stages if (log := read_log(run_dir.stage(st.name)))}
    if not logs:
        return []
    plot_training(logs, run_dir.path / "training.png")
    table = training_table(logs)
    return ["## Training",
            "The last row of each stage's train_log.jsonl: loss and images/s over its last log window, training "
            "time across resumes.",
            frame_table(table, "training", [{"stage": stage} for stage in table.index]),
            Figure("training.png", "training loss")]


def _quality(results: pd.DataFrame, run_dir: RunDir, recipe: Recipe) -> list[Block]:
    """The evaluations during training (``train.eval_every``): one row per stage, metric and step,
    and each metric against the training images seen (quality.png)."""
    rows = quality_rows(results) if not results.empty else pd.DataFrame()
    if rows.empty:
        return []
    plot_quality(rows, run_dir.path / "quality.png")
    rows = _stage_order(rows, recipe.stage_names())
    cells = [[r["stage"], r["metric"], cell(r["step"]), cell(r["train_images"]), cell(r["value"]), cell(r["stderr"]),
              cell(r["unit"])] for _, r in rows.iterrows()]
    hooks = [{"stage": r["stage"], "metric": r["metric"], "step": cell(r["step"])} for _, r in rows.iterrows()]
    return ["## Quality during training",
            "The EMA weights evaluated every `train.eval_every` steps on `train.eval_num_samples` samples, an SR "
            "stage on ground-truth low-res inputs (training images, augmented at its sampling level). Fewer "
            "samples than the final evaluation: follow the trend, do not compare these values with the results "
            "above or with published ones.",
            Table(["stage", "metric", "step", "train images", "value", "±", "unit"], cells, "quality", hooks),
            Figure("quality.png", "metrics against training images seen")]


def build_report(run_dir: RunDir, recipe: Recipe, plugins: Plugins) -> Report:
    """The run's report: its results in long form with their protocols, for metrics with
    published rows the comparison with them, stages trained several times, the sampling-level
    sweeps, CDM's findings checked on the rows (``findings_section``), training, the evaluations
    during training and each stage's sample grid. Writes the plots it shows (sweeps.png,
    training.png, quality.png)."""
    results = read_results([run_dir.path])
    rows = _stage_order(measured_rows(results), recipe.stage_names()) if not results.empty else results
    labels = _Labels()
    blocks, table = _results_section(rows, labels)
    published = _published(rows, labels, plugins)
    blocks += [protocols] if (protocols := labels.protocols()).items else []
    blocks += published + _replicates(results, recipe) + _sweeps(results, run_dir, recipe)
    blocks += _searches(results, rows, run_dir)
    blocks += [findings] if (findings := findings_section(results, recipe)) else []
    blocks += _training(run_dir, recipe) + _quality(results, run_dir, recipe)
    grids = [st.name for st in recipe.stages if (run_dir.stage(st.name) / "samples" / "grid.png").exists()]
    blocks += ["## Samples\n\nOne row per class."] if grids else []
    for name in grids:
        blocks += [f"**{name}**", Figure(f"{name}/samples/grid.png", f"samples of {name}")]
    return Report(recipe.name, blocks, table)
