"""A run's report: report.md and report.html written from its rows (``write_report``), and their
export for committing (``cdmbench report --out``); what ``cdmbench report`` prints."""

from __future__ import annotations

import re
from pathlib import Path

from cdmbench.errors import CdmbenchError
from cdmbench.plugins import Plugins
from cdmbench.recipe.schema import Recipe
from cdmbench.reporting import html, markdown
from cdmbench.reporting.document import build_report, console_blocks
from cdmbench.reporting.tables import flat_results, read_results
from cdmbench.storage.files import atomic_write
from cdmbench.storage.rundir import RunDir, load_run


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
    """`cdmbench report`: which runs were read; one run's results in long form, or several runs
    side by side with their components and cost (``comparison_frame``); the published rows beside
    them and the sweeps (``console_blocks``), as markdown. ``csv_path``: every row as one flat
    table; ``out``: one run's report exported (``export_report``), or several runs' comparison
    (``write_comparison``)."""
    from cdmbench.plugins import load_plugins
    from cdmbench.reporting.runs import comparison_frame, comparison_markdown, write_comparison

    echo("runs: " + ", ".join(str(d) for d in run_dirs))
    side_by_side = comparison_frame(run_dirs) if len(run_dirs) > 1 else None
    results = read_results(run_dirs)
    if side_by_side is not None:
        echo(comparison_markdown(side_by_side).rstrip())
    shown = console_blocks(results, load_plugins(), with_results=side_by_side is None)
    if shown:
        echo(markdown.blocks(shown).rstrip())
    if csv_path is not None:
        flat_results(results).to_csv(csv_path, index=False)
        echo(f"written: {csv_path} ({len(results)} rows)")
    if out is not None:
        echo("written: " + str(export_report(run_dirs[0], out) if side_by_side is None
                               else write_comparison(side_by_side, run_dirs, out)))


def write_report(run_dir: RunDir, recipe: Recipe, plugins: Plugins) -> str:
    """report.md and report.html beside it: ``build_report``'s contents as markdown (no line over
    120 characters) and as one self-contained page. Returns the results table for the console."""
    report = build_report(run_dir, recipe, plugins)
    atomic_write(run_dir.path / "report.md", markdown.render(report))
    atomic_write(run_dir.path / "report.html", html.render(report, run_dir.path))
    summary = "No results yet." if report.results is None else markdown.table(report.results)
    return f"{summary}\nprotocols and the rest: {run_dir.path / 'report.md'}, report.html"


def export_report(run_path: str | Path, out: str | Path) -> Path:
    """Write a run's report afresh from its results (concurrent jobs on one run may have left an
    older one) and copy it to ``out`` (e.g. reports/<name>/ for committing) with the figures it
    shows, results.jsonl (and results.csv) and what regenerates it: run.yaml and each stage's
    train_log.jsonl, so that ``cdmbench report --out DIR DIR`` writes an exported report again in
    place."""
    import shutil

    run_dir, recipe, plugins = load_run(run_path)
    run_path, out = run_dir.path, Path(out)
    if not run_dir.results_path.is_file():
        raise CdmbenchError(f"{run_path} has no results yet; run `cdmbench run` or `cdmbench evaluate` first")
    write_report(run_dir, recipe, plugins)
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (run_path / "report.md").read_text())
    logs = [f"{st.name}/train_log.jsonl" for st in recipe.stages
            if (run_dir.stage(st.name) / "train_log.jsonl").is_file()]
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != run_path.resolve():
        for name in ["report.md", "report.html", "run.yaml", "results.jsonl", *figures, *logs]:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_path / name, out / name)
    flat_results(read_results([run_path])).to_csv(out / "results.csv", index=False)
    return out / "report.md"
