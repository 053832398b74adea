"""CDM's findings checked on result rows: each verdict follows the numbers, both ways."""

import pandas as pd
import pytest

from cdmbench.evaluation.findings import augmentation_lowers_fid, fid_against_level, findings_section
from cdmbench.recipe.load import load_recipe

FEATURES = {"features": "classifier", "mode": "native"}


@pytest.fixture(scope="module")
def ablation():
    """recipes/ablation_augmentation.yaml: sr_none, sr_gauss, sr_trunc, sr_blur on base16."""
    recipe, _ = load_recipe("recipes/ablation_augmentation.yaml", overrides=["data={name: shapes}"])
    return recipe


def row(stage, value, metric="fid_test", n=1000, stderr=None, **protocol):
    return {"run": "r", "stage": stage, "metric": metric, "value": value, "unit": "", "status": "ok", "n": n,
            "stderr": stderr, "protocol": {**FEATURES, **protocol}}


def sweep(stage, inputs, values, metric="fid_test", samplers=None, stderr=None):
    samplers = samplers or {stage: "ddpm 25"}
    return [row(stage, v, metric, level=s, inputs=inputs, samplers=samplers, stderr=stderr) for s, v in values]


def test_augmented_stages_are_compared_with_the_unaugmented_one(ablation):
    frame = pd.DataFrame([row("sr_none", 30.0), row("sr_gauss", 21.5), row("sr_trunc", 33.0),
                          row("base16", 5.0), row("sr_blur", 29.0, metric="fid_train")])
    lines = augmentation_lowers_fid(frame, ablation)
    assert lines == [
        "- `sr_gauss` (gaussian nontruncated) against `sr_none` (none), fid_test (classifier, native): "
        "21.5 vs 30, lower: holds",
        "- `sr_trunc` (gaussian truncated) against `sr_none` (none), fid_test (classifier, native): "
        "33 vs 30, not lower: does not hold"]  # sr_blur has no fid_test: nothing to compare


def test_a_lower_fid_within_two_standard_errors_is_undecided(ablation):
    """sqrt(1 + 1) = 1.41 standard errors of the difference: 2 below is within 2.83, 5 below is not."""
    frame = pd.DataFrame([row("sr_none", 30.0, stderr=1.0), row("sr_gauss", 28.0, stderr=1.0),
                          row("sr_trunc", 25.0, stderr=1.0), row("sr_blur", 30.5, stderr=1.0)])
    head = "- `{}` ({}) against `sr_none` (none), fid_test (classifier, native): "
    assert augmentation_lowers_fid(frame, ablation) == [
        head.format("sr_gauss", "gaussian nontruncated") + "28 ± 1 vs 30 ± 1, lower, undecided (the "
        "differences are within 2 standard errors)",
        head.format("sr_trunc", "gaussian truncated") + "25 ± 1 vs 30 ± 1, lower: holds",
        head.format("sr_blur", "blur") + "30.5 ± 1 vs 30 ± 1, not lower: does not hold"]


def test_level_curves_are_judged_beyond_their_standard_errors(ablation):
    undecided = "undecided (the differences are within 2 standard errors)"
    cases = [("generated", [30.0, 28.0, 31.0], 1.0, undecided),         # a dip of 2 < 2.83
             ("generated", [30.0, 25.0, 31.0], 1.0, "holds"),
             ("generated", [25.0, 26.0, 31.0], 1.0, "does not hold"),
             ("ground-truth", [10.0, 9.5, 15.0], 1.0, "holds"),          # 9.5 is 10 within noise
             ("ground-truth", [10.0, 10.5, 11.0], 1.0, undecided),       # flat within noise
             ("ground-truth", [10.0, 9.0, 12.0], 0.1, "does not hold")]
    for inputs, values, stderr, verdict in cases:
        frame = pd.DataFrame(sweep("sr_gauss", inputs, list(zip([0.0, 0.1, 0.3], values, strict=True)), stderr=stderr))
        [line] = fid_against_level(frame, ablation)
        assert line.endswith(f": {verdict}"), (inputs, values, line)
        assert f"0: {values[0]:g} ± {stderr:g}" in line


def test_stages_evaluated_on_other_samples_are_not_compared(ablation):
    frame = pd.DataFrame([row("sr_none", 30.0, samplers={"base16": "ddpm 100"}),
                          row("sr_gauss", 21.5, n=500, samplers={"base16": "ddpm 100"}),
                          row("sr_trunc", 20.0, samplers={"base16": "ddpm 50"})])
    assert augmentation_lowers_fid(frame, ablation) == [
        "- `sr_gauss` (gaussian nontruncated) against `sr_none` (none), fid_test (classifier, native): "
        "not comparable (n 500 vs 1000)",
        "- `sr_trunc` (gaussian truncated) against `sr_none` (none), fid_test (classifier, native): "
        "not comparable (base16 sampled by ddpm 50 vs ddpm 100)"]


def test_the_level_curves_are_judged_by_where_their_minimum_lies(ablation):
    frame = pd.DataFrame(
        sweep("sr_gauss", "generated", [(0.0, 30.0), (0.1, 24.0), (0.3, 27.0)])          # U: holds
        + sweep("sr_gauss", "ground-truth", [(0.0, 10.0), (0.1, 12.0), (0.3, 20.0)])     # rises: holds
        + sweep("sr_trunc", "generated", [(0.1, 20.0), (0.2, 22.0), (0.3, 25.0)])        # rises: does not
        + sweep("sr_trunc", "ground-truth", [(0.1, 12.0), (0.2, 11.0), (0.3, 15.0)])     # dips: does not
        + sweep("sr_blur", "generated", [(0.1, 20.0), (0.2, 19.0)])                      # too few levels
        + [row("sr_gauss", 25.0)])                                                       # not a sweep row
    lines = fid_against_level(frame, ablation)
    assert len(lines) == 4
    gauss_generated, gauss_truth, trunc_generated, trunc_truth = lines
    assert gauss_generated == ("- `sr_gauss` (ddpm 25), generated inputs, fid_test (classifier, native) at "
                               "s = 0: 30, 0.1: 24, 0.3: 27; best at s = 0.1. First improves, then "
                               "worsens: holds")
    assert gauss_truth.endswith("best at s = 0. Only worsens: holds")
    assert trunc_generated.endswith("best at s = 0.1. First improves, then worsens: does not hold")
    assert trunc_truth.endswith("best at s = 0.2. Only worsens: does not hold")


def test_sweeps_that_differ_only_in_the_base_sampler_are_judged_apart(ablation):
    coarse, fine = ({"base16": f"ddpm {{'steps': {n}}}", "sr_gauss": "ddpm 25"} for n in (10, 50))
    frame = pd.DataFrame(sweep("sr_gauss", "generated", [(0.0, 30.0), (0.1, 20.0), (0.3, 25.0)], samplers=coarse)
                         + sweep("sr_gauss", "generated", [(0.0, 10.0), (0.1, 40.0), (0.3, 45.0)], samplers=fine))
    assert fid_against_level(frame, ablation) == [
        ("- `sr_gauss` (ddpm 25; base16: ddpm {'steps': 10}), generated inputs, fid_test (classifier, native) "
         "at s = 0: 30, 0.1: 20, 0.3: 25; best at s = 0.1. First improves, then worsens: holds"),
        ("- `sr_gauss` (ddpm 25; base16: ddpm {'steps': 50}), generated inputs, fid_test (classifier, native) "
         "at s = 0: 10, 0.1: 40, 0.3: 45; best at s = 0. First improves, then worsens: does not hold")]
    section = findings_section(frame, ablation)
    assert section.count("First improves, then worsens:") == 2


def test_no_section_without_rows_to_check(ablation):
    assert findings_section(pd.DataFrame([row("base16", 5.0)]), ablation) == ""
    section = findings_section(pd.DataFrame([row("sr_none", 30.0), row("sr_blur", 28.0)]), ablation)
    assert section.startswith("\n## CDM's findings, checked on this run") and "`sr_blur` (blur)" in section


def test_replicated_stages_are_judged_by_the_spread_of_their_training_runs():
    """Alone, the first runs differ by 6 = 4.2 bootstrap errors (holds); their replicates spread
    by 10 (sr_none: 35 ± 5 over 2 runs), so the means' 10 are within 2 x sqrt(25 + 1) = 10.2."""
    recipe, _ = load_recipe("recipes/ablation_augmentation.yaml", overrides=[
        "data={name: shapes}", "stages.sr_none.replicates=2", "stages.sr_gauss.replicates=2"])
    head = "- `sr_gauss` (gaussian nontruncated{}) against `sr_none` (none{}), fid_test (classifier, native): "
    frame = pd.DataFrame([row("sr_none", 30.0, stderr=1.0), row("sr_gauss", 24.0, stderr=1.0)])
    assert augmentation_lowers_fid(frame, recipe) == [head.format("", "") + "24 ± 1 vs 30 ± 1, lower: holds"]
    frame = pd.DataFrame([row("sr_none", 30.0, stderr=1.0), row("sr_none_r2", 40.0, stderr=1.0),
                          row("sr_gauss", 24.0, stderr=1.0), row("sr_gauss_r2", 26.0, stderr=1.0),
                          row("sr_none_r2", 10.0, metric="fid_train")])  # another metric: its own line
    assert augmentation_lowers_fid(frame, recipe) == [
        head.format(", 2 training runs: 24, 26", ", 2 training runs: 30, 40")
        + "25 ± 1 vs 35 ± 5, lower, undecided (the differences are within 2 standard errors)"]
    # runs that agree by chance: the error is not below the sampling error of their mean, 1 / sqrt(2)
    frame = pd.DataFrame([row("sr_none", 30.0, stderr=1.0), row("sr_none_r2", 30.0, stderr=1.0),
                          row("sr_gauss", 28.0, stderr=1.0)])
    assert augmentation_lowers_fid(frame, recipe) == [
        head.format("", ", 2 training runs: 30, 30") + "28 ± 1 vs 30 ± 0.71, lower, undecided (the differences "
        "are within 2 standard errors)"]


def test_swept_replicates_make_one_curve_of_their_means_at_the_levels_all_share():
    """sr_gauss alone rises beyond its errors (holds); with sr_gauss_r2 (14, 12, 12 at the shared
    levels; 0.5 is dropped) the means 12 ± 2, 12 ± 0.71, 16 ± 4 no longer do."""
    recipe, _ = load_recipe("recipes/ablation_augmentation.yaml", overrides=[
        "data={name: shapes}", "stages.sr_gauss.replicates=2"])
    first = sweep("sr_gauss", "ground-truth", [(0.0, 10.0), (0.1, 12.0), (0.3, 20.0)], stderr=1.0)
    [alone] = fid_against_level(pd.DataFrame(first), recipe)
    assert alone.endswith("Only worsens: holds")
    second = sweep("sr_gauss_r2", "ground-truth", [(0.0, 14.0), (0.1, 12.0), (0.3, 12.0), (0.5, 30.0)], stderr=1.0)
    assert fid_against_level(pd.DataFrame(first + second), recipe) == [
        "- `sr_gauss` (ddpm 25; 2 training runs), ground-truth inputs, fid_test (classifier, native) at s = "
        "0: 12 ± 2, 0.1: 12 ± 0.71, 0.3: 16 ± 4; best at s = 0. Only worsens: undecided (the differences are "
        "within 2 standard errors)"]
