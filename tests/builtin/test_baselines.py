"""The built-in published rows: every one with its source and provenance (evaluator, reference,
labels, n, guidance), CDM's Table 1, ADM's recomputation of BigGAN-deep and today's records."""

from __future__ import annotations

import pytest

from cdmbench.builtin.baselines import NOT_STATED, PUBLISHED
from cdmbench.plugins import load_plugins
from cdmbench.reporting.tables import baseline_frame

EVALUATORS = {"authors", "adm-evaluator", "edm2"}


@pytest.fixture(scope="module")
def frame():
    return baseline_frame(load_plugins())


def row(frame, model: str, resolution: int, metric: str = "fid_train"):
    [found] = frame[(frame.model == model) & (frame.resolution == resolution) & (frame.metric == metric)].itertuples()
    return found


def test_every_baseline_row_has_a_source_and_an_evaluator(frame):
    assert len(frame) == len(PUBLISHED)
    assert frame["source"].str.len().min() > 10
    for protocol in frame["protocol"]:
        assert protocol["evaluator"] in EVALUATORS, protocol
        assert {"reference", "labels", "n", "guidance"} <= set(protocol), protocol
        assert protocol["group"] in ("cdm", "context")
        assert protocol["labels"] in ("random", "training split", NOT_STATED)
        assert isinstance(protocol["n"], int) or protocol["n"] == NOT_STATED


def test_cdm_rows_are_its_own_pipeline_on_50k_samples_without_guidance(frame):
    cdm = row(frame, "CDM", 256)
    assert cdm.value == 4.88 and cdm.source.endswith("Table 1")
    assert cdm.protocol == {**cdm.protocol, "evaluator": "authors", "n": 50000, "guidance": "none", "group": "cdm",
                            "reference": "ImageNet train split (all images)", "labels": NOT_STATED}
    assert row(frame, "CDM", 256, "fid_test").protocol["reference"] == "ImageNet validation split"
    cas = row(frame, "CDM", 256, "cas_top1").protocol
    assert cas["n"] == 1281167 and cas["labels"] == "training split"


@pytest.mark.parametrize("resolution, value", [(128, 6.02), (256, 6.95)])
def test_adm_recomputed_biggan_deep_with_its_evaluator(frame, resolution, value):
    recomputed = row(frame, "BigGAN-deep, ADM eval", resolution)
    assert recomputed.value == value and "arXiv:2105.05233" in recomputed.source
    assert recomputed.protocol["evaluator"] == "adm-evaluator" and recomputed.protocol["truncation"] == 1.0
    assert recomputed.protocol["reference"] == f"VIRTUAL_imagenet{resolution}_labeled.npz"
    assert row(frame, "BigGAN-deep", resolution).protocol["evaluator"] == "authors"  # Brock et al.'s own


def test_adm_rows_drew_labels_uniformly_against_its_reference_batches(frame):
    for resolution, value in ((64, 2.07), (128, 5.91), (256, 10.94)):
        adm = row(frame, "ADM", resolution)
        assert adm.value == value
        assert adm.protocol == {**adm.protocol, "evaluator": "adm-evaluator", "labels": "random", "n": 50000,
                                "reference": f"VIRTUAL_imagenet{resolution}_labeled.npz"}


@pytest.mark.parametrize("model, resolution, value, evaluator, guided", [
    ("EDM", 64, 1.36, "authors", False), ("EDM2-XL", 64, 1.33, "edm2", False), ("RIN", 64, 1.23, "authors", False),
    ("ADM-G", 256, 4.59, "adm-evaluator", True), ("DiT-XL/2", 256, 2.27, "adm-evaluator", True),
    ("SiD2", 256, 1.38, "authors", True)])
def test_todays_records_are_a_context_group_with_their_sources(frame, model, resolution, value, evaluator, guided):
    record = row(frame, model, resolution)
    assert record.value == value and record.protocol["group"] == "context" and "arXiv:" in record.source
    assert record.protocol["evaluator"] == evaluator
    assert (record.protocol["guidance"] != "none") == guided


def test_an_unverified_number_says_so(frame):
    assert "NOT VERIFIED" in row(frame, "SiD2", 256).protocol["note"]


def test_each_model_is_one_registered_baseline(frame):
    assert frame.groupby("baseline")["model"].nunique().max() == 1
    assert {"cdm", "biggan-deep", "biggan-deep-adm-eval", "adm-upsampling", "dit-xl-2", "sid2"} <= set(frame.baseline)
