"""report.md of a run: its results, the published rows beside them, sweeps, CDM's findings,
training and sample grids; and its export for committing (``cdmbench report --out``)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from cdmbench.errors import CdmbenchError
from cdmbench.evaluation.findings import findings_section
from cdmbench.plugins import Plugins
from cdmbench.recipe.schema import Recipe
from cdmbench.reporting.tables import (
    baseline_frame,
    comparison_table,
    flat_results,
    plot_sweeps,
    plot_training,
    read_results,
    replicates_table,
    results_table,
    sweep_table,
    training_table,
)
from cdmbench.storage.files import atomic_write
from cdmbench.storage.rundir import RunDir, load_run
from cdmbench.training.trainer import read_log


def _fmt(frame: pd.DataFrame) -> str:
    return frame.to_string(float_format=lambda v: f"{v:.4g}")


def _beside_published(compared: pd.DataFrame) -> str:
    """The comparison with published rows as text: one sentence when every published row is on
    another dataset (instead of a row per metric with no published value), else the table of
    the pairs on the same dataset with whether each is comparable."""
    other_data = compared["comparable"].str.startswith("no: published rows are on")
    if other_data.all():
        return f"None: {compared['comparable'].iloc[0].removeprefix('no: ')}.\n"
    return ("A pair is comparable only when dataset, resolution, metric and protocol "
            "(feature network, mode, n, reference split) match.\n\n"
            f"```text\n{compared[~other_data].to_string(index=False)}\n```\n")


def run_dirs_to_report(named: list[Path], root: Path = Path("runs")) -> list[Path]:
    """The runs ``cdmbench report`` reads: those ``named``, else every run under ``root`` that
    has results, leaving out ``--smoke`` runs (``<name>-smoke``), which only check that a recipe
    runs and would mix toy numbers into the table."""
    if named:
        return list(named)
    found = sorted(p.parent for p in root.glob("*/results.jsonl"))
    if not found:
        raise CdmbenchError(f"no run directories given and none with results under ./{root}; give "
                            "RUN_DIR (cdmbench run writes runs/<recipe name>)")
    return [p for p in found if not p.name.endswith("-smoke")] or found


def print_report(run_dirs: list[Path], *, out: Path | None = None, csv_path: Path | None = None,
                 echo=print) -> None:
    """`cdmbench report`: which runs were read, their results table, sweeps, the comparison with
    published rows; ``csv_path``: every row as one flat table; ``out``: one run's report exported
    (``export_report``)."""
    from cdmbench.plugins import load_plugins

    echo("runs: " + ", ".join(str(d) for d in run_dirs))
    results = read_results(run_dirs)
    echo(_fmt(results_table(results)))
    sweeps = sweep_table(results)
    if not sweeps.empty:
        echo("\nsampling-level sweeps:")
        echo(_fmt(sweeps))
    compared = comparison_table(results, baseline_frame(load_plugins()))
    if not compared.empty:
        echo("\nbeside published results: " + _beside_published(compared).replace("```text\n", "")
             .replace("```\n", "").rstrip())
    if csv_path is not None:
        flat_results(results).to_csv(csv_path, index=False)
        echo(f"written: {csv_path} ({len(results)} rows)")
    if out is not None:
        if len(run_dirs) != 1:
            raise CdmbenchError(f"--out exports one run's report; got {len(run_dirs)} run directories")
        echo(f"written: {export_report(run_dirs[0], out)}")



def write_report(run_dir: RunDir, recipe: Recipe, plugins: Plugins) -> str:
    """report.md: the run's results, for metrics with published rows the comparison with them,
    the sample-time level sweeps (table and sweeps.png), CDM's augmentation findings checked on
    the rows (``findings``), training (table and training.png) and each stage's sample grid.
    Returns the results table as text."""
    results = read_results([run_dir.path])
    measured = results_table(results)
    table = _fmt(measured)
    text = f"# {recipe.name}\n\n```text\n{table}\n```\n"
    groups = recipe.replicates()
    runs = replicates_table(measured, groups)
    if not runs.empty:
        text += ("\n## Stages trained several times\n\nEach metric's mean over a stage's training "
                 "runs (`replicates: k`) and, as ±, its standard error over them (their standard "
                 "deviation over sqrt(runs); CDM's findings below take no less than the FID "
                 f"bootstrap's share).\n\n```text\n{_fmt(runs)}\n```\n")
    compared = comparison_table(results, baseline_frame(plugins))
    if not compared.empty:
        text += "\n## Beside published results\n\n" + _beside_published(compared)
    sweeps = sweep_table(results)
    if not sweeps.empty:
        plot_sweeps(sweeps, run_dir.path / "sweeps.png", groups)
        swept = set(sweeps.index.get_level_values("stage"))
        shared_panel = any(len(swept.intersection(names)) > 1 for names in groups.values())
        text += ("\n## Sampling-level sweeps\n\nEach SR stage evaluated at sampling-time "
                 "augmentation levels s, on the previous stage's samples (generated) and on "
                 "downsampled training images (ground-truth); `cdmbench sweep`."
                 + (" In the plot a stage trained several times shares its panel with its swept "
                    "copies: each run's curve faint, their mean bold (± as in CDM's findings below)."
                    if shared_panel else "")
                 + f"\n\n```text\n{_fmt(sweeps)}\n```\n\n![metrics against s](sweeps.png)\n")
    text += findings_section(results, recipe)
    logs = {st.name: log for st in recipe.stages if (log := read_log(run_dir.stage(st.name)))}
    if logs:
        plot_training(logs, run_dir.path / "training.png")
        text += ("\n## Training\n\nThe last row of each stage's train_log.jsonl: loss and images/s "
                 "over its last log window, training time across resumes.\n\n"
                 f"```text\n{_fmt(training_table(logs))}\n```\n\n![training loss](training.png)\n")
    grids = [st.name for st in recipe.stages if (run_dir.path / st.name / "samples" / "grid.png").exists()]
    if grids:
        text += "\n## Samples\n\nOne row per class.\n\n" + "".join(
            f"**{name}**\n\n![{name}]({name}/samples/grid.png)\n\n" for name in grids)
    atomic_write(run_dir.path / "report.md", text)
    return table



def export_report(run_path: str | Path, out: str | Path) -> Path:
    """Write a run's report.md afresh from its results (concurrent jobs on one run may have left
    an older one) and copy it with the figures it links (sweeps.png, grids) to ``out``, e.g.
    reports/<name>/ for committing."""
    import shutil

    run_dir, recipe, plugins = load_run(run_path)
    run_path, out = run_dir.path, Path(out)
    if not run_dir.results_path.is_file():
        raise CdmbenchError(f"{run_path} has no results yet; run `cdmbench run` or `cdmbench evaluate` first")
    write_report(run_dir, recipe, plugins)
    out.mkdir(parents=True, exist_ok=True)
    text = (run_path / "report.md").read_text()
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        (out / link).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_path / link, out / link)
    shutil.copyfile(run_path / "results.jsonl", out / "results.jsonl")
    flat_results(read_results([run_path])).to_csv(out / "results.csv", index=False)
    (out / "report.md").write_text(text)
    return out / "report.md"
