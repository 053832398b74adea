"""When a measured row may stand beside a published one: metric, data, n, reference, label
sampling and evaluator all match; a field not recorded is unknown, so the pair is not comparable."""

from __future__ import annotations

import pandas as pd

from cdmbench.evaluation.cas_protocol import PAPER
from cdmbench.reporting.tables import comparability, published_pairs

ADM256 = {"dataset": "imagenet", "resolution": 256, "n": 50000, "labels": "random", "evaluator": "adm-evaluator",
          "reference": "VIRTUAL_imagenet256_labeled.npz"}


def test_an_exact_match_is_comparable():
    assert comparability("fid_train", dict(ADM256), ADM256) == "comparable"
    assert comparability("fid_train", {**ADM256, "features_sha256": "ab", "seeds": "x"}, ADM256) == "comparable"


def test_a_pair_differing_only_in_labels_is_not_comparable():
    assert comparability("fid_train", {**ADM256, "labels": "balanced"}, ADM256) == "no: labels 'balanced' vs 'random'"
    assert comparability("is", {**ADM256, "labels": "balanced"}, ADM256) == "no: labels 'balanced' vs 'random'"


def test_a_pair_differing_only_in_evaluator_is_not_comparable():
    assert (comparability("fid_train", {**ADM256, "evaluator": "cdmbench"}, ADM256)
            == "no: evaluator 'cdmbench' vs 'adm-evaluator'")


def test_every_differing_field_is_named():
    measured = {**ADM256, "n": 10000, "reference": "train split", "resolution": 128}
    assert comparability("fid_train", measured, ADM256) == (
        "no: resolution 128 vs 256; n 10000 vs 50000; reference 'train split' vs 'VIRTUAL_imagenet256_labeled.npz'")


def test_is_compares_no_reference():
    assert comparability("is", {**ADM256, "reference": "none"}, ADM256) == "comparable"


def test_cas_is_comparable_only_under_the_papers_protocol():
    """CAS's published pipeline is Ravuri & Vinyals' protocol: every setting of it (missing
    Nesterov too) is named, then the fields that differ; the evaluator is not compared."""
    published = {"dataset": "imagenet", "resolution": 256, "n": 1281167, "labels": "training split",
                 "evaluator": "authors", "classifier": "resnet50", "epochs": 90, "test_split": "test"}
    measured = {**published, "evaluator": "cdmbench", "cas": dict(PAPER)}
    assert comparability("cas_top1", measured, published) == "comparable"
    no_nesterov = {**measured, "cas": {k: v for k, v in PAPER.items() if k != "nesterov"}}
    assert comparability("cas_top5", no_nesterov, published) == "no: nesterov: missing (paper: True)"
    scaled = {**measured, "epochs": 40, "cas": {**PAPER, "epochs": 40}}
    assert comparability("cas_real_top1", scaled, published) == "no: epochs: 40 (paper: 90); epochs 40 vs 90"


def test_a_field_an_older_row_did_not_record_makes_the_pair_not_comparable():
    older = {k: v for k, v in ADM256.items() if k not in ("labels", "evaluator", "reference")}
    assert comparability("fid_train", older, ADM256) == (
        "no: labels not recorded (published: 'random'); evaluator not recorded (published: 'adm-evaluator'); "
        "reference not recorded (published: 'VIRTUAL_imagenet256_labeled.npz')")


def test_a_field_the_published_row_does_not_state_makes_it_not_comparable():
    assert (comparability("fid_train", ADM256, {k: v for k, v in ADM256.items() if k != "labels"})
            == "no: labels 'random', not stated by the published row")


def test_published_pairs_carry_the_published_rows_group_records_last():
    baselines = pd.DataFrame([
        {"model": "ADM", "dataset": "imagenet", "resolution": 256, "metric": "fid_train", "value": 10.94,
         "protocol": {**ADM256, "group": "cdm"}},
        {"model": "DiT-XL/2", "dataset": "imagenet", "resolution": 256, "metric": "fid_train", "value": 2.27,
         "protocol": {**ADM256, "group": "context"}},
        {"model": "CDM", "dataset": "imagenet", "resolution": 256, "metric": "fid_train", "value": 4.88,
         "protocol": {**ADM256, "evaluator": "authors", "group": "cdm"}}])
    rows = pd.DataFrame([{"run": "r", "stage": "sr256", "metric": "fid_train", "value": 5.0, "protocol": ADM256}])
    pairs = published_pairs(rows, baselines)
    assert pairs[["published model", "group", "comparable"]].values.tolist() == [
        ["ADM", "cdm", "comparable"], ["CDM", "cdm", "no: evaluator 'adm-evaluator' vs 'authors'"],
        ["DiT-XL/2", "context", "comparable"]]
