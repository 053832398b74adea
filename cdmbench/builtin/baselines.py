"""Published class-conditional ImageNet results (no guidance), as in ../shared/CDM.md.

Metrics: ``fid_train`` / ``fid_test`` (FID against the training set / the held-out set, which
for ImageNet is its validation set: recipes map cdmbench's ``test`` split to it with
``split_names: {test: validation}``; 50k samples, TF Inception: clean-fid's
``legacy_tensorflow``), ``is`` (10 splits), ``cas_top1`` / ``cas_top5``
(ResNet-50, 90 epochs, trained on samples replacing ImageNet's training set), and
``cas_real_top1`` / ``cas_real_top5`` (the same classifier trained on real data).
"""

from __future__ import annotations

import functools

from cdmbench import hookimpl
from cdmbench.interfaces import BaselineRow

CDM_TABLE = "Ho et al. 2021, CDM (arXiv:2106.15282), Table 1"
BIGGAN = "Brock et al. 2019, BigGAN (arXiv:1809.11096), as cited in CDM Table 1"
ADM_RETRAIN = "Dhariwal & Nichol 2021, ADM (arXiv:2105.05233): BigGAN-deep retrained at 64x64, as cited in CDM Table 1"
CAS_PAPER = "Ravuri & Vinyals 2019, Classification Accuracy Score (arXiv:1905.10887)"

FID = {"n": 50000, "features": "inception-2015-12-05", "mode": "legacy_tensorflow"}
IS = {"n": 50000, "features": "inception-2015-12-05", "splits": 10}
CAS = {"classifier": "resnet50", "epochs": 90, "scaled_down": False, "test_split": "test"}

# (model, resolution, metric, value, source, extra protocol)
PUBLISHED = [
    ("CDM", 32, "fid_train", 1.11, CDM_TABLE, {}),
    ("CDM", 32, "fid_test", 1.99, CDM_TABLE, {}),
    ("CDM", 32, "is", 26.01, CDM_TABLE, {}),
    ("BigGAN-deep", 64, "fid_train", 4.06, ADM_RETRAIN, {}),
    ("Improved DDPM", 64, "fid_train", 2.92, CDM_TABLE, {}),
    ("ADM", 64, "fid_train", 2.07, CDM_TABLE, {}),
    ("CDM", 64, "fid_train", 1.48, CDM_TABLE, {}),
    ("CDM", 64, "fid_test", 2.48, CDM_TABLE, {}),
    ("CDM", 64, "is", 67.95, CDM_TABLE, {}),
    ("BigGAN-deep", 128, "fid_train", 5.7, BIGGAN, {}),
    ("BigGAN-deep", 128, "is", 124.5, BIGGAN, {}),
    ("BigGAN-deep", 128, "cas_top1", 40.64, CAS_PAPER, {"truncation": 1.5}),
    ("BigGAN-deep", 128, "cas_top5", 64.44, CAS_PAPER, {"truncation": 1.5}),
    ("ADM", 128, "fid_train", 5.91, CDM_TABLE, {}),
    ("CDM", 128, "fid_train", 3.52, CDM_TABLE, {}),
    ("CDM", 128, "fid_test", 3.76, CDM_TABLE, {}),
    ("CDM", 128, "is", 128.80, CDM_TABLE, {}),
    ("CDM", 128, "cas_top1", 59.84, CDM_TABLE, {}),
    ("CDM", 128, "cas_top5", 81.79, CDM_TABLE, {}),
    ("real data", 128, "cas_real_top1", 68.82, CAS_PAPER, {}),
    ("real data", 128, "cas_real_top5", 88.79, CAS_PAPER, {}),
    ("BigGAN-deep", 256, "fid_train", 6.9, BIGGAN, {}),
    ("BigGAN-deep", 256, "is", 171.4, BIGGAN, {}),
    ("BigGAN-deep", 256, "cas_top1", 42.65, CAS_PAPER, {"truncation": 1.5}),
    ("BigGAN-deep", 256, "cas_top5", 65.92, CAS_PAPER, {"truncation": 1.5}),
    ("VQ-VAE-2", 256, "fid_train", 31.11, CDM_TABLE, {}),
    ("VQ-VAE-2", 256, "cas_top1", 54.83, CAS_PAPER, {}),
    ("VQ-VAE-2", 256, "cas_top5", 77.59, CAS_PAPER, {}),
    ("Improved DDPM", 256, "fid_train", 12.26, CDM_TABLE, {}),
    ("SR3", 256, "fid_train", 11.30, CDM_TABLE, {}),
    ("ADM", 256, "fid_train", 10.94, CDM_TABLE, {}),
    ("ADM", 256, "is", 100.98, CDM_TABLE, {}),
    ("ADM + upsampling", 256, "fid_train", 7.49, CDM_TABLE, {}),
    ("ADM + upsampling", 256, "is", 127.49, CDM_TABLE, {}),
    ("CDM", 256, "fid_train", 4.88, CDM_TABLE, {}),
    ("CDM", 256, "fid_test", 4.63, CDM_TABLE, {}),
    ("CDM", 256, "is", 158.71, CDM_TABLE, {}),
    ("CDM", 256, "cas_top1", 63.02, CDM_TABLE, {}),
    ("CDM", 256, "cas_top5", 84.06, CDM_TABLE, {}),
    ("real data", 256, "cas_real_top1", 73.09, CAS_PAPER, {}),
    ("real data", 256, "cas_real_top5", 91.47, CAS_PAPER, {}),
]


def protocol_of(metric: str, resolution: int, extra: dict) -> dict:
    if metric.startswith("fid_"):
        base = {**FID, "reference_split": metric.removeprefix("fid_")}
    elif metric == "is":
        base = dict(IS)
    else:
        base = dict(CAS)
    return {"dataset": "imagenet", "resolution": resolution, **base, **extra}


def rows_of(model: str) -> list[BaselineRow]:
    return [BaselineRow(model=m, dataset="imagenet", resolution=r, metric=metric, value=value,
                        source=source, protocol=protocol_of(metric, r, extra))
            for m, r, metric, value, source, extra in PUBLISHED if m == model]


def _slug(model: str) -> str:
    return model.lower().replace(" + ", "-").replace(" ", "-")


@hookimpl
def cdmbench_register_baselines(register):
    for model in dict.fromkeys(m for m, *_ in PUBLISHED):
        register(_slug(model), functools.partial(rows_of, model),  # a factory without parameters
                 summary=f"{model}: published ImageNet rows ({len(rows_of(model))})")
