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
        other_data = compared["comparable"].str.startswith("no: published rows are on")
        text += "\n## Beside published results\n\n"
        if other_data.all():  # one sentence instead of a row per metric
            text += f"None: {compared['comparable'].iloc[0].removeprefix('no: ')}.\n"
        else:
            text += ("A pair is comparable only when dataset, resolution, metric and protocol "
                     "(feature network, mode, n, reference split) match.\n\n"
                     f"```text\n{compared[~other_data].to_string(index=False)}\n```\n")
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
