"""Sweep rows in the report: each sweep is its own table rows and curve."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from cdmbench.cli import cli
from cdmbench.reporting import tables
from cdmbench.reporting.tables import comparison_table, read_results, results_table, sweep_table


def sweep(samplers, values, inputs="generated", stderr=None, stage="sr16"):
    return [{"run": "r", "stage": stage, "metric": "fid_test", "value": v, "unit": "", "status": "ok",
             "stderr": stderr, "protocol": {"level": s, "inputs": inputs, "truncated": False, "samplers": samplers}}
            for s, v in values]


def test_sweeps_that_differ_only_in_the_base_sampler_stay_apart(tmp_path, monkeypatch):
    coarse, fine = ({"base8": f"ddpm {{'steps': {n}}}", "sr16": "ddpm {'steps': 25}"} for n in (2, 50))
    rows = (sweep(coarse, [(0.0, 30.0), (0.1, 20.0), (0.3, 25.0)])
            + sweep(fine, [(0.0, 10.0), (0.1, 40.0), (0.3, 45.0)])
            + sweep(fine, [(0.0, 5.0), (0.1, 6.0), (0.3, 7.0)], inputs="ground-truth"))
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = sweep_table(read_results([tmp_path]))
    coarse_label = "ddpm {'steps': 25}; base8: ddpm {'steps': 2}"
    fine_label = "ddpm {'steps': 25}; base8: ddpm {'steps': 50}"
    assert table["fid_test"].to_dict() == {
        ("r", "sr16", coarse_label, "generated", 0.0): 30.0, ("r", "sr16", coarse_label, "generated", 0.1): 20.0,
        ("r", "sr16", coarse_label, "generated", 0.3): 25.0, ("r", "sr16", fine_label, "generated", 0.0): 10.0,
        ("r", "sr16", fine_label, "generated", 0.1): 40.0, ("r", "sr16", fine_label, "generated", 0.3): 45.0,
        ("r", "sr16", fine_label, "ground-truth", 0.0): 5.0, ("r", "sr16", fine_label, "ground-truth", 0.1): 6.0,
        ("r", "sr16", fine_label, "ground-truth", 0.3): 7.0}

    figures = []
    monkeypatch.setattr(tables, "save_figure", lambda fig, path: figures.append(fig) or path)
    tables.plot_sweeps(table, tmp_path / "sweeps.png")
    [ax] = figures[0].axes
    curves = {curve.get_label(): list(curve.lines[0].get_ydata()) for curve in ax.containers}
    assert curves == {f"generated, {coarse_label}": [30.0, 20.0, 25.0],
                      f"generated, {fine_label}": [10.0, 40.0, 45.0],
                      f"ground-truth, {fine_label}": [5.0, 6.0, 7.0]}


def test_standard_errors_become_columns_and_error_bars(tmp_path, monkeypatch):
    chain = {"sr16": "ddpm {'steps': 25}"}
    rows = sweep(chain, [(0.0, 30.0), (0.2, 20.0)], stderr=1.5) + sweep(chain, [(0.0, 5.0)], "ground-truth")
    rows.append({"run": "r", "stage": "sr16", "metric": "cas_top1", "value": 70.0, "unit": "%", "status": "ok",
                 "protocol": {"level": 0.0, "inputs": "ground-truth", "samplers": chain}})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = sweep_table(read_results([tmp_path]))
    assert list(table.columns) == ["cas_top1 [%]", "fid_test", "fid_test ±"]  # CAS rows have no stderr
    assert table["fid_test ±"].tolist()[:2] == [1.5, 1.5] and math.isnan(table["fid_test ±"].iloc[2])

    figures = []
    monkeypatch.setattr(tables, "save_figure", lambda fig, path: figures.append(fig) or path)
    tables.plot_sweeps(table, tmp_path / "sweeps.png")
    panels = {ax.get_title(): ax for ax in figures[0].axes}
    assert set(panels) == {"sr16: cas_top1 [%]", "sr16: fid_test"}  # no panel of the errors
    generated = next(c for c in panels["sr16: fid_test"].containers if c.get_label().startswith("generated"))
    [bars] = generated.lines[2]
    assert [segment[:, 1].tolist() for segment in bars.get_segments()] == [[28.5, 31.5], [18.5, 21.5]]


def test_a_stage_and_its_swept_copies_share_a_panel_with_their_mean(tmp_path, monkeypatch):
    """sr16 at s = 0, 0.1, 0.3 and its copy sr16_r2 also at 0.5 (± 1 each): the mean is drawn at
    the shared levels (12, 12, 16), its error bars the runs' std / sqrt(2) (2, 0, 4) with the
    sampling error's floor sqrt(2) / 2 = 0.71; ground truth, swept on sr16 alone, is one plain
    curve. Without the groups each run has its own panel."""
    chain = {"sr16": "ddpm {'steps': 25}"}
    rows = (sweep(chain, [(0.0, 10.0), (0.1, 12.0), (0.3, 20.0)], stderr=1.0)
            + sweep({"sr16_r2": chain["sr16"]}, [(0.0, 14.0), (0.1, 12.0), (0.3, 12.0), (0.5, 9.0)], stderr=1.0,
                    stage="sr16_r2")
            + sweep(chain, [(0.0, 5.0), (0.1, 6.0)], "ground-truth", stderr=1.0))
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = sweep_table(read_results([tmp_path]))
    figures = []
    monkeypatch.setattr(tables, "save_figure", lambda fig, path: figures.append(fig) or path)

    tables.plot_sweeps(table, tmp_path / "sweeps.png", {"base8": ["base8"], "sr16": ["sr16", "sr16_r2"]})
    [ax] = figures[0].axes
    assert ax.get_title() == "sr16: fid_test (2 training runs)"
    curves = {c.get_label().removeprefix("generated, ddpm {'steps': 25}"): c for c in ax.containers}
    assert set(curves) == {": sr16", ": sr16_r2", ": mean of 2 runs", "ground-truth, ddpm {'steps': 25}"}
    mean = curves[": mean of 2 runs"]
    assert list(mean.lines[0].get_xdata()) == [0.0, 0.1, 0.3] and list(mean.lines[0].get_ydata()) == [12.0, 12.0, 16.0]
    bars = [end for segment in mean.lines[2][0].get_segments() for end in segment[:, 1]]
    assert bars == pytest.approx([10.0, 14.0, 12 - 0.5 ** 0.5, 12 + 0.5 ** 0.5, 12.0, 20.0])
    assert list(curves[": sr16_r2"].lines[0].get_ydata()) == [14.0, 12.0, 12.0, 9.0]
    assert (
        mean.lines[0].get_color() == curves[": sr16"].lines[0].get_color() == curves[": sr16_r2"].lines[0].get_color()
    )

    tables.plot_sweeps(table, tmp_path / "sweeps.png")
    assert [ax.get_title() for ax in figures[1].axes] == ["sr16: fid_test", "sr16_r2: fid_test"]


PROTOCOL = {"dataset": "imagenet", "resolution": 256, "features": "inception-2015-12-05",
            "mode": "legacy_tensorflow", "reference_split": "train", "labels": "random", "evaluator": "adm-evaluator",
            "reference": "VIRTUAL_imagenet256_labeled.npz"}


def evaluation(value, n, time, precision=""):
    samplers = {"base64": f"ddpm {{'steps': 250}}{precision}", "sr256": f"ddpm {{'steps': 100}}{precision}"}
    return {"run": "r", "stage": "sr256", "metric": "fid_train", "value": value, "n": n, "unit": "",
            "status": "ok", "time": time, "protocol": {**PROTOCOL, "n": n, "samplers": samplers}}


def write_evaluations(folder):
    """FID at n=50000 (fp32), at n=1000 (bf16), then at n=50000 again."""
    rows = [evaluation(5.0, 50000, "2025-01-01T00:00:00+00:00"),
            evaluation(6.0, 1000, "2025-01-02T00:00:00+00:00", precision=", bf16"),
            evaluation(4.0, 50000, "2025-01-03T00:00:00+00:00")]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_csv_has_every_row(tmp_path):
    write_evaluations(tmp_path)
    result = CliRunner().invoke(cli, ["report", str(tmp_path), "--csv", str(tmp_path / "all.csv")])
    assert result.exit_code == 0, result.output
    flat = pd.read_csv(tmp_path / "all.csv")
    assert list(zip(flat["value"], flat["protocol.n"], strict=True)) == [(5.0, 50000), (6.0, 1000), (4.0, 50000)]


def test_evaluations_with_other_n_or_precision_are_rows_of_their_own_and_the_newest_wins(tmp_path):
    write_evaluations(tmp_path)
    frame = read_results([tmp_path])
    fp32 = "sr256 (n: 50000; base64: ddpm {'steps': 250}; sr256: ddpm {'steps': 100})"
    bf16 = "sr256 (n: 1000; base64: ddpm {'steps': 250}, bf16; sr256: ddpm {'steps': 100}, bf16)"
    assert results_table(frame)["fid_train (inception-2015-12-05, legacy_tensorflow)"].to_dict() == {
        ("r", fp32): 4.0, ("r", bf16): 6.0}

    published = pd.DataFrame([{"model": "CDM", "dataset": "imagenet", "resolution": 256, "metric": "fid_train",
                               "value": 4.88, "protocol": {**PROTOCOL, "n": 50000}}])
    compared = comparison_table(frame, published)
    assert compared[["stage", "measured", "comparable"]].values.tolist() == [
        [bf16, 6.0, "no: n 1000 vs 50000"], [fp32, 4.0, "comparable"]]


def test_stages_trained_several_times_get_the_mean_and_standard_error_of_their_runs():
    """sr16 and its copy sr16_r2: runs 2, means, std / sqrt(2) (|a - b| / 2 for two runs);
    base8, trained once, has no row; a metric only one run has gets that run's value, no error."""
    rows = [{"run": "r", "stage": stage, "metric": metric, "value": value, "unit": "", "status": "ok",
             "stderr": 1.0, "n": 100, "protocol": {"n": 100}}
            for stage, metric, value in [("base8", "fid_test", 9.0), ("sr16", "fid_test", 30.0),
                                         ("sr16_r2", "fid_test", 40.0), ("sr16", "cas_top1", 70.0),
                                         ("sr16_r2", "cas_top1", 76.0), ("sr16", "is", 3.0)]]
    table = tables.replicates_table(results_table(pd.DataFrame(rows)),
                                    {"base8": ["base8"], "sr16": ["sr16", "sr16_r2"]})
    [values] = table.to_dict("records")
    assert table.index.tolist() == [("r", "sr16")]
    assert values["runs"] == 2 and values["fid_test"] == 35.0 and values["fid_test ±"] == pytest.approx(5.0)
    assert values["cas_top1"] == 73.0 and values["cas_top1 ±"] == pytest.approx(3.0)
    assert values["is"] == 3.0 and math.isnan(values["is ±"])
    assert tables.replicates_table(results_table(pd.DataFrame(rows)), {"sr16": ["sr16"]}).empty


def test_report_reads_every_run_but_smoke_runs_and_says_which(tmp_path, monkeypatch):
    """Without RUN_DIR: every run under ./runs with results, --smoke runs left out (unless they
    are all there is, or named), listed on the first line."""
    for name in ("a", "b-smoke", "c"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        write_evaluations(tmp_path / "runs" / name)
    (tmp_path / "runs" / "empty").mkdir()  # no results: not a run to report
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["report"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == f"runs: {Path('runs/a')}, {Path('runs/c')}"
    named = CliRunner().invoke(cli, ["report", "runs/b-smoke"])
    assert named.output.splitlines()[0] == "runs: runs/b-smoke"
    (tmp_path / "runs" / "a" / "results.jsonl").unlink()
    (tmp_path / "runs" / "c" / "results.jsonl").unlink()
    assert CliRunner().invoke(cli, ["report"]).output.splitlines()[0] == f"runs: {Path('runs/b-smoke')}"


def test_report_says_once_that_nothing_comparable_is_published(tmp_path):
    """Rows on a dataset with no published results: one sentence, no table of empty columns."""
    write_evaluations(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    for row in rows:
        row["protocol"]["dataset"] = "shapes"
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "## Beside published results\n\nNone: published rows are on imagenet, not 'shapes'." in result.output
    assert "None None" not in result.output and "published model" not in result.output
