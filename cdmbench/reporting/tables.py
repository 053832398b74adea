"""Result rows -> pandas tables."""

from __future__ import annotations

import io
import itertools
import json
import math
import statistics
from pathlib import Path

import pandas as pd

from cdmbench.errors import CdmbenchError
from cdmbench.evaluation.cas_protocol import paper_differences
from cdmbench.storage.files import atomic_write
from cdmbench.storage.rundir import RunDir


def read_results(run_dirs: list[Path]) -> pd.DataFrame:
    """Every row of the runs' results.jsonl as written (oldest first within a run), the rows of an
    evaluation run again included (each has its time): the tables keep the newest (``latest``)."""
    rows = []
    for folder in map(RunDir, run_dirs):
        if not folder.results_path.exists():
            raise CdmbenchError(f"no results in {folder.path} (missing {folder.results_path.name}); is it a run "
                                "directory?")
        rows += folder.results()
    return pd.DataFrame(rows)


def latest(frame: pd.DataFrame) -> pd.DataFrame:
    """The newest (last written) row of each evaluation: per run, stage, metric, feature network,
    mode, evaluator, reference, labels and samplers (with their precision), and for a sweep its
    level and inputs, else n; for an evaluation during training, also its training step."""
    key = frame["protocol"].map(lambda p: json.dumps(
        [p.get("features"), p.get("mode"), p.get("evaluator"), p.get("reference"), p.get("labels"),
         p.get("level"), p.get("inputs"), p.get("samplers"),
         None if is_sweep(p) else p.get("n"), p.get("step")], sort_keys=True, default=str))
    frame = frame.assign(_key=key).drop_duplicates(["run", "stage", "metric", "_key"], keep="last")
    return frame.drop(columns="_key")


def _varying(rows: pd.DataFrame, fields: list[dict]) -> list[list[str]]:
    """For each row, 'name: value' for each of its ``fields`` whose value differs between the rows
    of its (run, stage) that have that field."""
    keys = list(zip(rows["run"], rows["stage"], strict=True))
    values = {}
    for key, row_fields in zip(keys, fields, strict=True):
        for name, value in row_fields.items():
            values.setdefault((key, name), set()).add(value)
    return [[f"{name}: {value}" for name, value in row_fields.items() if len(values[key, name]) > 1]
            for key, row_fields in zip(keys, fields, strict=True)]


def flat_results(frame: pd.DataFrame) -> pd.DataFrame:
    """The result rows with their protocol spread over ``protocol.<key>`` columns (nested values
    as JSON), for a spreadsheet or ``pd.read_csv``."""
    protocol = pd.json_normalize(list(frame["protocol"]), max_level=0).map(
        lambda v: json.dumps(v) if isinstance(v, (dict, list)) else v)
    protocol.columns = [f"protocol.{key}" for key in protocol.columns]
    return pd.concat([frame.drop(columns="protocol").reset_index(drop=True), protocol], axis=1)


def is_sweep(protocol: dict) -> bool:
    """Rows of `cdmbench sweep` carry the sampling level they were measured at."""
    return "level" in protocol


def is_search(protocol: dict) -> bool:
    """Rows of a point of a sampling-time search (``evaluate.search``) carry the search and point."""
    return "search" in protocol


def is_during_training(protocol: dict) -> bool:
    """Rows of an evaluation while a stage trained (``train.eval_every``) carry its training step."""
    return "step" in protocol


def features_label(protocol: dict) -> str:
    """' (features, mode)' for metrics computed with a feature network, else ''."""
    if not protocol.get("features"):
        return ""
    return f" ({protocol['features']}, {protocol.get('mode', '-')})"


def measured_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The newest ok row of each evaluation but sweeps, searches and those during training
    (``latest``), as written."""
    rows = latest(frame)
    return rows[(rows["status"] == "ok") & ~rows["protocol"].map(is_sweep) & ~rows["protocol"].map(is_search)
                & ~rows["protocol"].map(is_during_training)].copy()


def _evaluations(frame: pd.DataFrame) -> pd.DataFrame:
    """``measured_rows``, each stage labelled with what tells the evaluation apart from the
    stage's other evaluations: n and each stage's sampler that differ, e.g.
    ``sr16 (n: 1000; base8: ddpm {'steps': 50}, bf16)``."""
    rows = measured_rows(frame)
    fields = [{**({"n": p["n"]} if "n" in p else {}), **p.get("samplers", {})} for p in rows["protocol"]]
    rows["stage"] = [stage + (f" ({'; '.join(parts)})" if parts else "")
                     for stage, parts in zip(rows["stage"], _varying(rows, fields), strict=True)]
    return rows


def results_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, stage), one column per metric (with its unit), the newest of each; a
    stage evaluated with other sample counts or samplers gets a row per evaluation (labelled as
    in ``_evaluations``); sweep rows are left to ``sweep_table``."""
    if frame.empty:
        return frame
    ok = _evaluations(frame)
    if ok.empty:
        return ok
    ok["metric"] = (ok["metric"] + ok["protocol"].map(features_label)
                    + ok["unit"].map(lambda u: f" [{u}]" if u else ""))
    order = list(dict.fromkeys(ok["stage"]))
    table = _pivot(ok, ["run", "stage"], sort=False)
    return table.reindex(sorted(table.index, key=lambda k: (k[0], order.index(k[1]))))


def replicates_table(table: pd.DataFrame, groups: dict[str, list[str]]) -> pd.DataFrame:
    """For each stage trained several times (``groups``: a stage -> its runs' stage names, as
    ``Recipe.replicates``), from ``results_table``'s rows of its runs: their number and each
    metric's mean, followed by ``<metric> ±``, the standard error over the runs (their standard
    deviation over sqrt(runs))."""
    run_of = {name: stage for stage, names in groups.items() if len(names) > 1 for name in names}
    if table.empty or not run_of:
        return pd.DataFrame()
    values = table[[c for c in table.columns if not c.endswith(" ±")]]
    values = values[values.index.get_level_values("stage").isin(run_of)]
    grouped = values.groupby([values.index.get_level_values("run"),
                              values.index.get_level_values("stage").map(run_of).rename("stage")], sort=False)
    mean, error = grouped.mean(), grouped.std() / grouped.count() ** 0.5
    columns = {"runs": grouped.size()}
    for metric in values.columns:
        columns[metric], columns[f"{metric} ±"] = mean[metric], error[metric]
    return pd.DataFrame(columns)


def pooled(values: list[float], errors: list[float | None]) -> tuple[float, float | None]:
    """A stage's value and standard error from its training runs' values and sampling errors
    (None where a row has none). Over k > 1 runs: their mean, and their standard deviation over
    sqrt(k), but not below their mean sampling error over sqrt(k) (the spread of two or three
    runs can be small by chance). One run: its value and sampling error, which leaves the spread
    between training runs out."""
    if len(values) == 1:
        return values[0], errors[0]
    k = len(values)
    runs = statistics.stdev(values) / math.sqrt(k)
    sampling = 0.0 if None in errors else math.sqrt(sum(e * e for e in errors) / k) / math.sqrt(k)
    return statistics.fmean(values), max(runs, sampling)


def pooled_curve(rows: pd.DataFrame) -> list[tuple[float, float, float | None]]:
    """(s, value, standard error) along a sweep measured on one or more training runs (rows with
    the columns stage, s, value and, where measured, stderr): at each level that every run has,
    ``pooled`` over the runs."""
    levels = set.intersection(*(set(rows.loc[rows["stage"] == name, "s"]) for name in set(rows["stage"])))
    curve = []
    for level in sorted(levels):
        at = rows[rows["s"] == level]
        errors = at["stderr"] if "stderr" in at else pd.Series(float("nan"), at.index)
        curve.append((level, *pooled(list(at["value"]), [None if pd.isna(e) else float(e) for e in errors])))
    return curve


def _pivot(rows: pd.DataFrame, index: list[str], sort: bool) -> pd.DataFrame:
    """One column per metric with the rows' values, each followed by ``<metric> ±``, its
    standard error, when any of its rows has one (FID's bootstrap, IS's spread over splits)."""
    values = rows.pivot_table(index=index, columns="metric", values="value", aggfunc="last", sort=sort)
    errors = (rows.assign(stderr=pd.to_numeric(rows["stderr"])).pivot_table(
        index=index, columns="metric", values="stderr", aggfunc="last", sort=sort)
        if "stderr" in rows else pd.DataFrame(index=values.index))
    columns = {}
    for metric in values.columns:
        columns[metric] = values[metric]
        if metric in errors.columns:
            columns[f"{metric} ±"] = errors[metric]
    return pd.DataFrame(columns, index=values.index)


# --- measured rows beside published baselines ---------------------------------------------------

# A measured row and a published one are comparable only when these fields of their protocols
# match: for every metric the data, n and the label sampling; for FID-like metrics (against real
# images) and IS the evaluator (the shared vocabulary: "adm-evaluator", "authors", "edm2",
# "cdmbench"), and for the former the reference too (IS has none); for CAS, whose published
# pipeline is Ravuri & Vinyals' protocol, the classifier and test split, and the measured row must
# have been made under that protocol (``cas_protocol.paper_differences`` empty).
COMPARED = ("dataset", "resolution", "n", "labels")
COMPARED_FIELDS = {"reference": ("evaluator", "reference"), "is": ("evaluator",),
                   "cas": ("classifier", "epochs", "test_split")}


def baseline_frame(plugins) -> pd.DataFrame:
    """Every registered baseline row, with the plugin that registered it."""
    rows = []
    for component in plugins["baselines"]:
        for row in component.build({}):  # a factory refusing to build: an error naming it
            rows.append({"model": row.model, "dataset": row.dataset, "resolution": row.resolution,
                         "metric": row.metric, "value": row.value, "source": row.source,
                         "protocol": row.protocol, "baseline": component.name})
    return pd.DataFrame(rows)


def _family(metric: str) -> str:
    return "is" if metric == "is" or metric.startswith("is_") else "cas" if metric.startswith("cas") else "reference"


def comparability(metric: str, measured: dict, published: dict) -> str:
    """'comparable', or 'no: ' and every field that differs (``COMPARED`` and the metric's
    ``COMPARED_FIELDS``; for CAS first each setting not the paper's): a field the measured row
    does not record (older results.jsonl) is unknown, so it differs."""
    family = _family(metric)
    differ = paper_differences(measured) if family == "cas" else []
    for f in COMPARED + COMPARED_FIELDS[family]:
        if f not in measured:
            differ.append(f"{f} not recorded (published: {published.get(f)!r})")
        elif f not in published:
            differ.append(f"{f} {measured[f]!r}, not stated by the published row")
        elif measured[f] != published[f]:
            differ.append(f"{f} {measured[f]!r} vs {published[f]!r}")
    return "comparable" if not differ else "no: " + "; ".join(differ)


def published_pairs(rows: pd.DataFrame, baselines: pd.DataFrame) -> pd.DataFrame:
    """Each measured row (run, stage, metric, value, stderr, protocol) beside the published rows of
    the same metric (at its resolution when there are any), with the published row's ``group``
    (``context`` for a record shown for orientation; those come last) and whether the pair is comparable and why
    not (``comparability``); one pair with no published value (``published model`` '-')
    for a row whose metric is published on other datasets only. Rows of unpublished metrics have
    no pair. The measured row's ``stderr`` and ``protocol`` come last."""
    out = []
    for _, row in rows.iterrows():
        published = baselines[baselines["metric"] == row["metric"]]
        if published.empty:
            continue
        measured = {"run": row["run"], "stage": row["stage"], "metric": row["metric"], "measured": row["value"]}
        own = {"stderr": row.get("stderr"), "protocol": row["protocol"]}
        dataset = row["protocol"].get("dataset")
        same_data = published[published["dataset"] == dataset]
        if same_data.empty:  # one line, not one per published row of another dataset
            out.append({**measured, "published model": "-", "published res": None, "published": None, "group": None,
                        "comparable": f"no: published rows are on "
                        f"{', '.join(sorted(set(published['dataset'])))}, not {dataset!r}", **own})
            continue
        same_res = same_data[same_data["resolution"] == row["protocol"].get("resolution")]
        chosen = same_res if not same_res.empty else same_data
        records_last = chosen["protocol"].map(lambda p: p.get("group") == "context").to_numpy().argsort(kind="stable")
        for _, b in chosen.iloc[records_last].iterrows():
            out.append({**measured, "published model": b["model"], "published res": b["resolution"],
                        "published": b["value"], "group": b["protocol"].get("group"),
                        "comparable": comparability(row["metric"], row["protocol"], b["protocol"]), **own})
    return pd.DataFrame(out)


def comparison_table(results: pd.DataFrame, baselines: pd.DataFrame) -> pd.DataFrame:
    """Each measured metric row (the newest of each evaluation, labelled as in ``_evaluations``)
    beside the published rows of the same metric, as ``published_pairs``."""
    if results.empty or baselines.empty:
        return pd.DataFrame()
    return published_pairs(_evaluations(results), baselines).drop(columns=["stderr", "protocol"], errors="ignore")


# --- sample-time level sweeps ------------------------------------------------------------------

def sweep_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The newest ok row of each sweep point of `cdmbench sweep` (none made during training),
    with the columns samplers, inputs and s from the protocol. samplers is the swept stage's
    sampler, then ``; stage: sampler`` for each other stage whose sampler differs between the
    sweeps of that run and stage: sweeps that differ only in a previous stage's sampler are
    separate curves."""
    if frame.empty:
        return frame
    rows = latest(frame)
    rows = rows[(rows["status"] == "ok") & rows["protocol"].map(is_sweep)
                & ~rows["protocol"].map(is_during_training)].copy()
    if rows.empty:
        return rows
    chains = rows["protocol"].map(lambda p: p.get("samplers", {}))
    others = [{name: sampler for name, sampler in chain.items() if name != stage}
              for chain, stage in zip(chains, rows["stage"], strict=True)]
    rows["samplers"] = [chain.get(stage, "") + "".join(f"; {part}" for part in parts)
                        for chain, stage, parts in zip(chains, rows["stage"], _varying(rows, others), strict=True)]
    rows["inputs"] = rows["protocol"].map(lambda p: p["inputs"])
    rows["s"] = rows["protocol"].map(lambda p: p["level"])
    return rows


def sweep_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of `cdmbench sweep`: one row per (run, stage, samplers, inputs, level s), one
    column per metric."""
    rows = sweep_rows(frame)
    if rows.empty:
        return rows
    rows["metric"] = rows["metric"] + rows["unit"].map(lambda u: f" [{u}]" if u else "")
    return _pivot(rows, ["run", "stage", "samplers", "inputs", "s"], sort=True).sort_index()


def plot_sweeps(table: pd.DataFrame, path: Path, groups: dict[str, list[str]] | None = None) -> Path:
    """One panel per (stage, metric): the metric against s, one line per input kind and samplers,
    with error bars of one standard error where the table has them (CDM's figure: with generated
    inputs FID should first improve with s, then worsen). A stage trained several times
    (``groups``, as ``Recipe.replicates``) shares its panel with its swept copies: each run's
    curve faint, and bold their mean at the levels all of them have, with ``pooled``'s error."""
    plt = pyplot()
    root = {name: stage for stage, names in (groups or {}).items() for name in names}
    rows = table.reset_index()
    rows["panel"] = rows["stage"].map(lambda name: root.get(name, name))
    stages = list(dict.fromkeys(rows["panel"]))
    metrics = [c for c in table.columns if not c.endswith(" ±")]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]  # a run's copies and their mean share one
    fig, axes = plt.subplots(len(stages), len(metrics), figsize=(4.5 * len(metrics), 3.4 * len(stages)),
                             squeeze=False)
    for i, stage in enumerate(stages):
        part = rows[rows["panel"] == stage]
        for j, metric in enumerate(metrics):
            ax, error = axes[i][j], f"{metric} ±"
            curves = part.dropna(subset=[metric]).groupby(["run", "samplers", "inputs"])
            for ((_, samplers, inputs), curve), color in zip(curves, itertools.cycle(colors)):
                style = {"marker": "o", "capsize": 3, "color": color,
                         "linestyle": "-" if inputs == "generated" else "--"}
                label = f"{inputs}, {samplers}" if samplers else inputs
                copies = list(dict.fromkeys(curve["stage"]))
                for (name, line), marker in zip(curve.groupby("stage", sort=False), itertools.cycle("os^Dv")):
                    own = ({"label": label} if len(copies) == 1 else {"label": f"{label}: {name}", "alpha": 0.4,
                                                                    "linewidth": 1, "marker": marker, "markersize": 4})
                    ax.errorbar(line["s"], line[metric], yerr=line.get(error), **{**style, **own})
                if len(copies) > 1:
                    mean = pooled_curve(curve.rename(columns={metric: "value", error: "stderr"}))
                    ax.errorbar([s for s, _, _ in mean], [v for _, v, _ in mean],
                                yerr=[float("nan") if e is None else e for _, _, e in mean],
                                linewidth=2.2, label=f"{label}: mean of {len(copies)} runs", **style)
            runs = part["stage"].nunique()
            ax.set(title=f"{stage}: {metric}" + (f" ({runs} training runs)" if runs > 1 else ""),
                   xlabel="sampling level s")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return save_figure(fig, path)


def training_table(logs: dict[str, list[dict]]) -> pd.DataFrame:
    """One row per stage from its train_log.jsonl rows: steps trained, the last logged loss and
    images/s, training time across resumes and peak GPU memory (when logged)."""
    rows = [{"stage": stage, "steps": log[-1]["step"], "loss": log[-1]["loss"],
             "img/s": log[-1]["images_per_s"], "train min": log[-1].get("seconds", float("nan")) / 60,
             "peak GiB": log[-1].get("peak_memory_gib", float("nan"))}
            for stage, log in logs.items() if log]
    return pd.DataFrame(rows).set_index("stage").dropna(axis=1, how="all")


def plot_training(logs: dict[str, list[dict]], path: Path) -> Path:
    """The training loss (mean over each log window) against the step, one line per stage, on a
    log scale: stages whose losses differ (base vs SR, eps vs x0) share one panel."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for stage, log in logs.items():
        ax.plot([r["step"] for r in log], [r["loss"] for r in log], label=stage)
    ax.set(xlabel="training step", ylabel="training loss", yscale="log", title="training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display), imported when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Write the figure as a PNG atomically (a reader never sees half a file) and close it."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    pyplot().close(fig)
    atomic_write(path, buffer.getvalue())
    return path
