"""Published class-conditional ImageNet results, each with its provenance (../shared/CDM.md).

Two groups (``protocol["group"]``): ``cdm``, the rows of CDM's Table 1 and the baselines it is
compared with (no guidance), and ``context``, later records shown for where the field stands
(some guided, one latent). Every row's protocol says, in the shared vocabulary of result rows:
``evaluator`` (``authors``: the paper's own pipeline; ``adm-evaluator``: guided-diffusion's
evaluations/evaluator.py against its reference batch; ``edm2``: EDM2's calculate_metrics),
``reference`` (what the samples are compared with), ``labels`` (``random``: uniform class labels
as ADM, EDM, EDM2 and DiT draw them; ``training split``: one sample per training image, of its
class, as CAS trains), ``n`` (samples) and ``guidance``; what the source does not say is
``NOT_STATED``, and ``note`` says what is uncertain. A measured row is comparable with a published
one only when these match (``reporting.tables.comparability``).

Metrics: ``fid_train`` / ``fid_test`` (FID against the training set, or an ADM reference batch,
whose statistics are of the training set / against the validation set), ``is`` (10 splits),
``cas_top1`` / ``cas_top5`` (ResNet-50, 90 epochs, trained on samples replacing ImageNet's
training set) and ``cas_real_top1`` / ``cas_real_top5`` (the same classifier trained on real data).
"""

from __future__ import annotations

import functools
import re
from typing import Any, NamedTuple

from cdmbench import hookimpl
from cdmbench.interfaces import BaselineRow

NOT_STATED = "not stated in the source"

CDM_TABLE = "Ho et al. 2021, CDM (arXiv:2106.15282), Table 1"
BIGGAN = "Brock et al. 2019, BigGAN (arXiv:1809.11096), as cited in CDM Table 1"
ADM = "Dhariwal & Nichol 2021, ADM (arXiv:2105.05233)"
ADM_CITED = f"{ADM}, as cited in CDM Table 1"
CAS_PAPER = "Ravuri & Vinyals 2019, Classification Accuracy Score (arXiv:1905.10887)"
EDM = "Karras et al. 2022, EDM (arXiv:2206.00364), Table 2"
EDM2 = "Karras et al. 2024, EDM2 (arXiv:2312.02696), ImageNet-64 results"
RIN = "Jabri, Fleet & Chen 2023, RIN (arXiv:2212.11972), ImageNet 64x64 results"
DIT = "Peebles & Xie 2023, DiT (arXiv:2212.09748), ImageNet 256x256 results"
SID2 = "Hoogeboom et al. 2024, SiD2 (arXiv:2410.19324), ImageNet 256x256 results"

UNGUIDED = {"guidance": "none"}


def adm_evaluator(resolution: int, labels: str = "random") -> dict[str, Any]:
    """ADM's evaluator against its reference batch of ``resolution`` (statistics of the whole
    training set), on 50,000 samples."""
    return {"evaluator": "adm-evaluator", "reference": f"VIRTUAL_imagenet{resolution}_labeled.npz",
            "labels": labels, "n": 50000}


def authors(reference: str = NOT_STATED, labels: str = NOT_STATED, n: int | str = 50000) -> dict[str, Any]:
    """The paper's own pipeline."""
    return {"evaluator": "authors", "reference": reference, "labels": labels, "n": n}


# CDM's own pipeline (../shared/CDM.md): 50k samples, TF Inception, the whole training set or the
# validation set as reference; its label sampling is not stated.
CDM_TRAIN = authors("ImageNet train split (all images)")
CDM_VAL = authors("ImageNet validation split")
CDM_IS = authors("none (IS has no reference)")
# CAS: one sample per ImageNet training image, of its class; top-1/5 on the real validation set.
CAS_RUN = authors("ImageNet validation split (the classifier's test set)", "training split", 1281167)
ADM_GRID = ("ADM's comparison with the state of the art (Table 5 in arXiv v4; the table number is not "
            "confirmed from stored text)")


class Published(NamedTuple):
    model: str
    resolution: int
    metric: str
    value: float
    source: str
    protocol: dict[str, Any]
    group: str = "cdm"


PUBLISHED = [
    Published("CDM", 32, "fid_train", 1.11, CDM_TABLE, CDM_TRAIN),
    Published("CDM", 32, "fid_test", 1.99, CDM_TABLE, CDM_VAL),
    Published("CDM", 32, "is", 26.01, CDM_TABLE, CDM_IS),
    Published("BigGAN-deep", 64, "fid_train", 4.06, f"{ADM}: BigGAN-deep retrained at 64x64, as cited in CDM Table 1",
              {**adm_evaluator(64, NOT_STATED), "note": f"{ADM_GRID}; sample batch biggan_deep_imagenet64.npz"}),
    Published("Improved DDPM", 64, "fid_train", 2.92, CDM_TABLE,
              {**adm_evaluator(64, NOT_STATED), "note": "first reported by Nichol & Dhariwal 2021 "
               "(arXiv:2102.09672); ADM lists it and publishes the IDDPM sample batch for its evaluator"}),
    Published("ADM", 64, "fid_train", 2.07, ADM_CITED, adm_evaluator(64)),
    Published("CDM", 64, "fid_train", 1.48, CDM_TABLE, CDM_TRAIN),
    Published("CDM", 64, "fid_test", 2.48, CDM_TABLE, CDM_VAL),
    Published("CDM", 64, "is", 67.95, CDM_TABLE, CDM_IS),
    Published("BigGAN-deep", 128, "fid_train", 5.7, BIGGAN, authors()),
    Published("BigGAN-deep", 128, "is", 124.5, BIGGAN, authors("none (IS has no reference)")),
    Published("BigGAN-deep", 128, "cas_top1", 40.64, CAS_PAPER, {**CAS_RUN, "truncation": 1.5}),
    Published("BigGAN-deep", 128, "cas_top5", 64.44, CAS_PAPER, {**CAS_RUN, "truncation": 1.5}),
    Published("BigGAN-deep, ADM eval", 128, "fid_train", 6.02, f"{ADM}: BigGAN-deep recomputed",
              {**adm_evaluator(128, NOT_STATED), "truncation": 1.0,
               "note": f"{ADM_GRID}; sample batch biggan_deep_trunc1_imagenet128.npz"}),
    Published("ADM", 128, "fid_train", 5.91, ADM_CITED, adm_evaluator(128)),
    Published("CDM", 128, "fid_train", 3.52, CDM_TABLE, CDM_TRAIN),
    Published("CDM", 128, "fid_test", 3.76, CDM_TABLE, CDM_VAL),
    Published("CDM", 128, "is", 128.80, CDM_TABLE, CDM_IS),
    Published("CDM", 128, "cas_top1", 59.84, CDM_TABLE, CAS_RUN),
    Published("CDM", 128, "cas_top5", 81.79, CDM_TABLE, CAS_RUN),
    Published("real data", 128, "cas_real_top1", 68.82, CAS_PAPER, CAS_RUN),
    Published("real data", 128, "cas_real_top5", 88.79, CAS_PAPER, CAS_RUN),
    Published("BigGAN-deep", 256, "fid_train", 6.9, BIGGAN, authors()),
    Published("BigGAN-deep", 256, "is", 171.4, BIGGAN, authors("none (IS has no reference)")),
    Published("BigGAN-deep", 256, "cas_top1", 42.65, CAS_PAPER, {**CAS_RUN, "truncation": 1.5}),
    Published("BigGAN-deep", 256, "cas_top5", 65.92, CAS_PAPER, {**CAS_RUN, "truncation": 1.5}),
    Published("BigGAN-deep, ADM eval", 256, "fid_train", 6.95, f"{ADM}: BigGAN-deep recomputed",
              {**adm_evaluator(256, NOT_STATED), "truncation": 1.0,
               "note": f"{ADM_GRID}; sample batch biggan_deep_trunc1_imagenet256.npz"}),
    Published("VQ-VAE-2", 256, "fid_train", 31.11, CDM_TABLE,
              {**authors(), "note": "which pipeline computed it is not stated in CDM Table 1"}),
    Published("VQ-VAE-2", 256, "cas_top1", 54.83, CAS_PAPER, CAS_RUN),
    Published("VQ-VAE-2", 256, "cas_top5", 77.59, CAS_PAPER, CAS_RUN),
    Published("Improved DDPM", 256, "fid_train", 12.26, CDM_TABLE,
              {**authors(), "note": "which pipeline computed it is not stated in CDM Table 1"}),
    Published("SR3", 256, "fid_train", 11.30, CDM_TABLE,
              {**authors(), "note": "Saharia et al. 2021's own evaluation, as cited in CDM Table 1"}),
    Published("ADM", 256, "fid_train", 10.94, ADM_CITED, adm_evaluator(256)),
    Published("ADM", 256, "is", 100.98, ADM_CITED, {**adm_evaluator(256), "reference": "none (IS has no reference)"}),
    Published("ADM + upsampling", 256, "fid_train", 7.49, ADM_CITED, adm_evaluator(256)),
    Published("ADM + upsampling", 256, "is", 127.49, ADM_CITED,
              {**adm_evaluator(256), "reference": "none (IS has no reference)"}),
    Published("CDM", 256, "fid_train", 4.88, CDM_TABLE, CDM_TRAIN),
    Published("CDM", 256, "fid_test", 4.63, CDM_TABLE, CDM_VAL),
    Published("CDM", 256, "is", 158.71, CDM_TABLE, CDM_IS),
    Published("CDM", 256, "cas_top1", 63.02, CDM_TABLE, CAS_RUN),
    Published("CDM", 256, "cas_top5", 84.06, CDM_TABLE, CAS_RUN),
    Published("real data", 256, "cas_real_top1", 73.09, CAS_PAPER, CAS_RUN),
    Published("real data", 256, "cas_real_top5", 91.47, CAS_PAPER, CAS_RUN),
    # --- today's records, for context -----------------------------------------------------------
    Published("EDM", 64, "fid_train", 1.36, EDM,
              {**authors("EDM's ImageNet-64 training-set statistics", "random"), "guidance": "none",
               "note": "EDM's fid.py (the same TF Inception weights); the minimum of three FIDs of 50k samples; "
                       "ADM's architecture retrained, stochastic sampler"}, "context"),
    Published("EDM2-XL", 64, "fid_train", 1.33, EDM2,
              {"evaluator": "edm2", "reference": "EDM2's img64 training-set statistics", "labels": "random",
               "n": 50000, "guidance": "none",
               "note": "post-hoc EMA chosen for FID (generate_images.py preset edm2-img64-xl-fid: fid = 1.33)"},
              "context"),
    Published("RIN", 64, "fid_train", 1.23, RIN,
              {**authors(n=NOT_STATED), "guidance": "none",
               "note": "the evaluation's reference, labels and n are not confirmed from stored text"}, "context"),
    Published("ADM-G", 256, "fid_train", 4.59, f"{ADM}, abstract and Table 5",
              {**adm_evaluator(256), "guidance": "classifier guidance, scale 1.0"}, "context"),
    Published("DiT-XL/2", 256, "fid_train", 2.27, DIT,
              {**adm_evaluator(256), "guidance": "classifier-free guidance, scale 1.5",
               "note": "latent diffusion (Stable Diffusion's VAE); 250 DDPM steps; ADM's TensorFlow evaluation "
                       "suite, as the paper states"}, "context"),
    Published("SiD2", 256, "fid_train", 1.38, SID2,
              {**authors(n=NOT_STATED), "guidance": "classifier-free guidance with a guidance interval",
               "note": "pixel space. NOT VERIFIED: 1.38 comes from a third-party benchmark listing (wizwand.com), "
                       "which also lists 1.72 for this model at 256; the paper's own table was not available as "
                       "stored text. Its reference, labels and n are not confirmed either"}, "context"),
]


def protocol_of(row: Published) -> dict[str, Any]:
    """The row's protocol: dataset, resolution, its group, guidance (none unless given), the
    metric's settings and its provenance."""
    if row.metric.startswith("fid_"):
        metric = {"features": "inception-2015-12-05", "reference_split": row.metric.removeprefix("fid_")}
    elif row.metric == "is":
        metric = {"features": "inception-2015-12-05", "splits": 10}
    else:
        metric = {"classifier": "resnet50", "epochs": 90, "scaled_down": False, "test_split": "test"}
    return {"dataset": "imagenet", "resolution": row.resolution, "group": row.group, **UNGUIDED, **metric,
            **row.protocol}


def rows_of(model: str) -> list[BaselineRow]:
    return [BaselineRow(model=row.model, dataset="imagenet", resolution=row.resolution, metric=row.metric,
                        value=row.value, source=row.source, protocol=protocol_of(row))
            for row in PUBLISHED if row.model == model]


def _slug(model: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")


@hookimpl
def cdmbench_register_baselines(register):
    groups = {row.model: row.group for row in PUBLISHED}
    for model, group in groups.items():
        register(_slug(model), functools.partial(rows_of, model),  # a factory without parameters
                 summary=f"{model}: published ImageNet rows ({len(rows_of(model))})"
                 + (", a later record shown for context" if group == "context" else ""))
