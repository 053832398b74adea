"""Sweep rows in the report: each sweep is its own table rows and curve."""

import json

from cdmbench import report
from cdmbench.report import read_results, sweep_table


def sweep(samplers, values, inputs="generated"):
    return [{"run": "r", "stage": "sr16", "metric": "fid_test", "value": v, "unit": "", "status": "ok",
             "protocol": {"level": s, "inputs": inputs, "truncated": False, "samplers": samplers}}
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
    monkeypatch.setattr(report, "_save_figure", lambda fig, path: figures.append(fig) or path)
    report.plot_sweeps(table, tmp_path / "sweeps.png")
    [ax] = figures[0].axes
    curves = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert curves == {f"generated, {coarse_label}": [30.0, 20.0, 25.0],
                      f"generated, {fine_label}": [10.0, 40.0, 45.0],
                      f"ground-truth, {fine_label}": [5.0, 6.0, 7.0]}
