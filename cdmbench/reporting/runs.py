"""Runs side by side (``cdmbench report RUN_DIR RUN_DIR ...``): one row per run and stage with its
components, each metric with its standard error and the stage's cost (training images, time,
device, FLOPs; sampling time per image), as a DataFrame (``comparison_frame``), markdown tables that
fit a terminal (``comparison_markdown``) and a chart (``comparison_figure``); ``write_comparison``
writes comparison.md, comparison.html and comparison.png."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from cdmbench.cascade.cost import network_flops
from cdmbench.cascade.stages import build_stage
from cdmbench.errors import CdmbenchError
from cdmbench.recipe.components import recipe_classes
from cdmbench.recipe.schema import Component
from cdmbench.recipe.yamlfile import read_yaml
from cdmbench.reporting import html, markdown
from cdmbench.reporting.document import Figure, Report, Table
from cdmbench.reporting.markdown import WIDTH
from cdmbench.reporting.tables import latest, pyplot, results_table, save_figure
from cdmbench.storage.files import atomic_write
from cdmbench.storage.rundir import RunDir, load_run
from cdmbench.training.trainer import read_log

COMPONENTS = ("data", "backbone", "schedule", "loss", "augmentation", "sampler")
COST = ("train images", "train time", "train FLOPs", "device", "s/image")
# rows of `cdmbench run` that are cost, not results: throughput is train images / train time, and
# sample_time becomes s/image
COST_METRICS = ("train_throughput", "sample_time")
FIGURE_COLUMNS = 4  # metrics a row in comparison.png


def _labels(run_dirs: list[Path]) -> list[str]:
    """Each run's name in the comparison: its folder's name, its path where two names repeat (runs
    of one recipe with other --out folders share the recipe name that result rows carry)."""
    resolved = [Path(p).resolve() for p in run_dirs]
    if len(set(resolved)) < len(resolved):
        raise CdmbenchError("a run directory is given twice; give each run once")
    names = [p.name for p in resolved]
    return [p.name if names.count(p.name) == 1 else str(Path(raw)) for p, raw in zip(resolved, run_dirs, strict=True)]


def _flat(args: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in args.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def _component(spec: Component | list[Component]) -> tuple[str, dict[str, Any]]:
    """A component, or a list of them (joined by +, their args prefixed by their names), as its
    name and its args flattened to dotted keys."""
    parts = spec if isinstance(spec, list) else [spec]
    args = {}
    for part in parts:
        args.update(_flat(part.args, f"{part.name}." if len(parts) > 1 else ""))
    return "+".join(part.name for part in parts), args


def _device(doc: dict[str, Any], device: str) -> str:
    """The machine of run.yaml's environment (the last `cdmbench run` on it): its GPUs, or its CPU
    cores when it has none or the recipe's device is the CPU; '+k other' when earlier invocations
    ran elsewhere (``earlier_environments``)."""
    machine = doc.get("environment", {}).get("machine", {})
    if machine.get("gpu") and device != "cpu":
        text = machine["gpu"] if machine.get("gpus", 1) == 1 else f"{machine['gpus']}x {machine['gpu']}"
    else:
        text = f"cpu ({machine.get('cpus')} cores)"
    others = {json.dumps(e.get("machine"), sort_keys=True) for e in doc.get("earlier_environments", [])}
    others.discard(json.dumps(machine, sort_keys=True))
    return text + (f" +{len(others)} other" if others else "")


def _read_run(path: Path, label: str) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """A run's result rows (``run`` set to ``label``) and for each stage its components and cost;
    without run.yaml, stages have only the dataset their rows name."""
    run_dir = RunDir(path)
    has_yaml = (run_dir.path / "run.yaml").is_file()
    if not run_dir.path.is_dir():
        raise CdmbenchError(f"{path} does not exist; give run directories that cdmbench run wrote (runs/<name>)")
    rows = pd.DataFrame(run_dir.results())
    if rows.empty:
        raise CdmbenchError(f"{path} is not a run directory (no run.yaml, no results.jsonl); give the folder "
                            "that cdmbench run wrote (runs/<name>)" if not has_yaml else
                            f"{path} has no results yet (no results.jsonl): `cdmbench run` writes them as "
                            f"each stage finishes training, `cdmbench evaluate {path}` adds metrics")
    rows = rows.assign(run=label)
    if not has_yaml:
        datasets = [p["dataset"] for p in rows["protocol"] if p.get("dataset")]
        return rows, {stage: {"data": (datasets[0], None)} if datasets else {} for stage in rows["stage"]}
    _, recipe, plugins = load_run(path)
    doc = read_yaml(run_dir.path / "run.yaml", "run.yaml")
    classes = len(doc["classes"]) if doc.get("classes") else recipe_classes(recipe.to_dict(), plugins)[0]
    timed = latest(rows[(rows["metric"] == "sample_time") & (rows["status"] == "ok")])
    per_image = {r["stage"]: r["value"] / r["n"] for _, r in timed.iterrows()}
    stages = {}
    for stage in recipe.stages:
        log = read_log(run_dir.stage(stage.name))
        cost = {"device": _device(doc, recipe.device), "s/image": per_image.get(stage.name)}
        if log:
            images = log[-1]["step"] * stage.train.batch_size
            per_image_flops = network_flops(build_stage(plugins, recipe, stage, num_classes=classes, device="meta"))[1]
            cost.update({"train images": images, "train time": log[-1].get("seconds"),
                         "train FLOPs": float(per_image_flops * images)})
        loss = Component(stage.loss, {"vlb_weight": stage.vlb_weight} if stage.loss == "hybrid" else {})
        stages[stage.name] = {"data": _component(recipe.data), "backbone": _component(stage.backbone),
                              "schedule": _component(stage.schedule), "loss": _component(loss),
                              "augmentation": _component(stage.augmentation), "sampler": _component(stage.sampler),
                              **cost}
    return rows, stages


def _component_cells(entries: list[tuple[str, tuple[str, dict | None] | None]]) -> list[str | None]:
    """For (stage, (name, args)) entries, each one's name and the args whose values differ between
    the entries of its stage that know their args (a key one lacks counts as differing), e.g.
    ``adm-unet channels=64``; None for an entry without the component."""
    args_of: dict[str, list[dict]] = {}
    for stage, spec in entries:
        if spec is not None and spec[1] is not None:
            args_of.setdefault(stage, []).append(spec[1])
    cells = []
    for stage, spec in entries:
        name, args = spec or (None, None)
        shown = [f"{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}" for k, v in
                 (args or {}).items() if len({json.dumps(a.get(k), sort_keys=True) for a in args_of[stage]}) > 1]
        cells.append(name and " ".join([name, *shown]))
    return cells


def comparison_frame(run_dirs: list[Path]) -> pd.DataFrame:
    """The runs side by side, indexed by run (its folder's name, its path where names repeat) and
    stage: one row per stage of each run, or per evaluation where a stage was evaluated with other
    sample counts or samplers (labelled as ``results_table`` does). Columns: ``COMPONENTS`` (name
    and the args that differ between the runs' rows of that stage; None without run.yaml), each
    metric with ``<metric> ±`` as ``results_table`` picks them (train_loss included, beside the
    loss it measures), then ``COST``: train images (last logged step x batch size), train time
    (seconds, across resumes), train FLOPs (``network_flops``' training pass of one image x train
    images), device (run.yaml's environment), s/image (the newest sample_time row / its images)."""
    rows, stages = [], []
    for path, label in zip(run_dirs, _labels(run_dirs), strict=True):
        results, run_stages = _read_run(Path(path), label)
        rows.append(results)
        stages += [(label, name, info) for name, info in run_stages.items()]
    results = pd.concat(rows, ignore_index=True)
    metrics = results_table(results[~results["metric"].isin(COST_METRICS)])
    evaluations = {}  # (run, stage) -> the labels of its rows in ``metrics``
    for run, label in metrics.index if not metrics.empty else []:
        evaluations.setdefault((run, label.split(" ")[0]), []).append(label)
    keys = [(run, label) for run, name, _ in stages for label in evaluations.get((run, name), [name])]
    info = [entry for run, name, entry in stages for _ in evaluations.get((run, name), [name])]
    frame = pd.DataFrame(index=pd.MultiIndex.from_tuples(keys, names=["run", "stage"]))
    for kind in COMPONENTS:
        frame[kind] = _component_cells([(label.split(" ")[0], entry.get(kind)) for (_, label), entry
                                        in zip(keys, info, strict=True)])
    if not metrics.empty:
        frame = frame.join(metrics)
    for column in COST:
        frame[column] = [entry.get(column) for entry in info]
    return frame


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """The metric columns of a ``comparison_frame`` (each with ``<metric> ±`` beside it)."""
    return [c for c in frame.columns if c not in COMPONENTS + COST and not c.endswith(" ±")]


def comparison_notes(frame: pd.DataFrame) -> list[str]:
    """What a reader of the comparison must know: runs on different datasets (their metrics are
    not comparable), runs without run.yaml (no components, no cost)."""
    notes = []
    data = frame["data"].dropna().groupby(level="run", sort=False).first()
    if data.nunique() > 1:
        runs = data.groupby(data, sort=False).groups
        notes.append("The runs are on different datasets (" + "; ".join(f"{d}: {', '.join(r)}" for d, r in runs.items())
                     + "): their metrics are not comparable.")
    bare = list(dict.fromkeys(frame.index[frame["backbone"].isna()].get_level_values("run")))
    if bare:
        notes.append(f"No run.yaml in {', '.join(bare)}: metrics only, no components or cost (a folder "
                     "`cdmbench report --out` exported has none; compare the run directories instead).")
    return notes


def _si(value: float) -> str:
    """3 significant digits with an SI prefix: 3.61G, 12.5m."""
    value = float(f"{value:.3g}")
    power = 0 if value == 0 else min(max(math.floor(math.log10(abs(value)) / 3), -2), 7)
    return f"{value / 1000 ** power:.3g}{'um kMGTPEZ'[power + 2].strip()}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes = round(seconds) // 60
    return f"{minutes}m {round(seconds) % 60:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def display_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The comparison as text cells: a metric as ``value ± error`` (4 and 2 significant digits),
    images and FLOPs with SI prefixes, times with units, '-' where nothing is known."""
    formats = {"train images": _si, "train time": _duration, "train FLOPs": _si, "s/image": lambda v: f"{_si(v)}s"}
    out = frame.reset_index()[["run", "stage", *COMPONENTS]].astype(object)
    for metric in metric_columns(frame):
        errors = frame.get(f"{metric} ±", pd.Series(float("nan"), frame.index))
        out[metric] = [None if _missing(v) else f"{v:.4g}" + ("" if _missing(e) else f" ± {e:.2g}")
                       for v, e in zip(frame[metric], errors, strict=True)]
    for column in COST:
        out[column] = [None if _missing(v) else formats.get(column, str)(v) for v in frame[column]]
    return out.map(lambda v: "-" if _missing(v) else str(v))


def comparison_tables(frame: pd.DataFrame, width: int = WIDTH) -> list[Table]:
    """The comparison as tables of ``display_frame``'s cells that fit ``width`` characters a line
    (a terminal's): run and stage, then as many other columns as fit, repeated until every column
    is shown. Each row's hooks name its run and stage (report.html's ``data-`` attributes)."""
    cells = display_frame(frame)
    widths = {c: max(len(c), *cells[c].map(len)) + 3 for c in cells.columns}
    groups: list[list[str]] = [[]]
    for column in cells.columns[2:]:
        if groups[-1] and widths["run"] + widths["stage"] + sum(widths[c] for c in [*groups[-1], column]) >= width:
            groups.append([])
        groups[-1].append(column)
    hooks = [{"run": run, "stage": stage} for run, stage in zip(cells["run"], cells["stage"], strict=True)]
    return [Table(["run", "stage", *group], cells[["run", "stage", *group]].values.tolist(), "comparison", hooks)
            for group in groups]


def comparison_markdown(frame: pd.DataFrame) -> str:
    """The notes (``comparison_notes``), then the tables (``comparison_tables``) as markdown: no
    line over 120 characters, a cell too long for its row moved to a note under its table."""
    notes = itertools.count(1)
    return "\n\n".join([*map(markdown.prose, comparison_notes(frame)),
                        *(markdown.table(t, notes) for t in comparison_tables(frame))]) + "\n"


def comparison_figure(frame: pd.DataFrame):
    """One panel per metric: its value with one standard error for each run and stage (a colour
    per run); below each, where training FLOPs are known, the metric against them (log scale).
    At most ``FIGURE_COLUMNS`` metrics a row, so that the chart stays readable on a page."""
    plt = pyplot()
    metrics = metric_columns(frame)
    if not metrics:
        raise CdmbenchError("the runs have no metric rows to plot; `cdmbench evaluate RUN_DIR` adds them")
    rows = frame.reset_index()
    rows["label"] = rows["run"] + "\n" + rows["stage"]
    palette = itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    colors = dict(zip(dict.fromkeys(rows["run"]), palette, strict=False))
    costs = rows["train FLOPs"].notna().any()
    columns = min(FIGURE_COLUMNS, len(metrics))
    per_metric = 1 + costs  # panels under one another for each metric
    bands = math.ceil(len(metrics) / columns)
    fig, grid = plt.subplots(bands * per_metric, columns, squeeze=False,
                             figsize=(max(4.5, 0.7 * len(rows)) * columns, 3.8 * bands * per_metric))
    axes = [[grid[(j // columns) * per_metric + k][j % columns] for j in range(len(metrics))]
            for k in range(per_metric)]
    for j in range(len(metrics), bands * columns):  # the last band's empty places
        for k in range(per_metric):
            grid[(j // columns) * per_metric + k][j % columns].set_visible(False)
    for j, metric in enumerate(metrics):
        part = rows.dropna(subset=[metric]).reset_index(drop=True)
        error = part.get(f"{metric} ±")
        ax = axes[0][j]
        for run, group in part.groupby("run", sort=False):
            ax.errorbar(group.index, group[metric], yerr=None if error is None else error[group.index],
                        fmt="o", capsize=3, color=colors[run], label=run)
        ax.set_xticks(part.index, part["label"], fontsize=7)
        ax.set(title=metric, xlim=(-0.5, len(part) - 0.5))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
        if costs:
            ax = axes[1][j]
            for run, group in part.dropna(subset=["train FLOPs"]).groupby("run", sort=False):
                ax.errorbar(group["train FLOPs"], group[metric], yerr=None if error is None else error[group.index],
                            fmt="o", capsize=3, color=colors[run], label=run)
                for _, r in group.iterrows():
                    ax.annotate(r["stage"], (r["train FLOPs"], r[metric]), fontsize=7, xytext=(4, 4),
                                textcoords="offset points")
            ax.set(title=f"{metric} against training cost", xscale="log", xlabel="training FLOPs of the stage")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    return fig


def write_comparison(frame: pd.DataFrame, run_dirs: list[Path], out: Path) -> Path:
    """``out``/comparison.md and comparison.html, the same document (where the runs are, what the
    columns mean, the notes, the tables, the chart), and the chart, comparison.png
    (``comparison_figure``); returns the markdown's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_figure(comparison_figure(frame), out / "comparison.png")
    intro = ("Runs: " + ", ".join(f"`{d}`" for d in run_dirs) + ". One row per run and stage: its components "
             "(and the args that differ between the runs), each metric ± one standard error (the newest "
             "evaluation), and its cost: images and time of training, the machine, training FLOPs (one image's "
             "forward and backward pass x images) and sampling time per image.")
    report = Report("Runs side by side", [intro, *comparison_notes(frame), *comparison_tables(frame),
                                          Figure("comparison.png", "each metric per run and stage, and against "
                                                                   "training FLOPs")], None)
    atomic_write(out / "comparison.md", markdown.render(report))
    atomic_write(out / "comparison.html", html.render(report, out))
    return out / "comparison.md"
