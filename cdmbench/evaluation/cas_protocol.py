"""Ravuri & Vinyals' CAS protocol as data: the settings a CAS row records, and how they differ.

A CAS row's ``protocol["cas"]`` names every setting its classifiers were trained and tested
with (``cas_settings``). The paper's (``PAPER``) are those of their appendix and of the TPU
ResNet-50 code they ran (tensorflow/tpu, models/official/resnet: resnet_main.py,
resnet_preprocessing.py): ResNet-50, ImageNet's training set replaced by one sample per image,
90 epochs at batch 1024, SGD with Nesterov momentum 0.9, weight decay 1e-4, the learning rate
warmed up linearly from 0 to 0.4 over 5 epochs and x0.1 at epochs 30, 60 and 80,
random-resized 224 px crops and flips, tested on the central crop. ``paper_differences`` lists
every setting of a row that is not the paper's: a row is comparable with published CAS only when
it is empty. Imports no torch, so reports and baselines can use it.
"""

from __future__ import annotations

from typing import Any, Mapping

# How images reach the classifier (cdmbench.evaluation.crops implements both).
PREPROCESSING = {
    "native": {"train_crop": "random shift +-2 px at native resolution", "flip": True,
               "eval_crop": "none (native resolution)", "normalisation": "[-1, 1]"},
    "resnet224": {"train_crop": "random-resized 224 (8-100%, aspect 3/4-4/3, bicubic)", "flip": True,
                  "eval_crop": "centre 224/256 of the shorter side, bicubic to 224",
                  "normalisation": "imagenet mean/std"},
}

PAPER: dict[str, Any] = {
    "classifier": "resnet50", "num_classes": 1000, "train_images": 1_281_167, "train_set": "replaced",
    "epochs": 90, "batch_size": 1024, "optimizer": "sgd", "momentum": 0.9, "nesterov": True,
    "weight_decay": 1e-4, "lr_peak": 0.4, "lr_schedule": "step x0.1", "warmup_epochs": 5,
    "lr_milestones": [30, 60, 80], **PREPROCESSING["resnet224"],
}

# what to change when a setting is not the paper's: the cas metric's args, or the data
FIX = {"classifier": "set the cas arg arch: {}", "epochs": "set the cas arg epochs: {}",
       "batch_size": "set the cas arg batch_size: {}",
       "num_classes": "the paper's protocol is on ImageNet's {} classes",
       "train_images": "the paper's protocol replaces all {:,} ImageNet training images",
       "train_set": "set the cas arg replace_training_set: true"}


def cas_settings(*, classifier: str, num_classes: int, train_images: int, replaced: bool, epochs: int,
                 batch_size: int, momentum: float, nesterov: bool, weight_decay: float, lr: float,
                 schedule: str, warmup_epochs: float, milestones: list[float],
                 preprocessing: str) -> dict[str, Any]:
    """What a CAS row records in ``protocol["cas"]``: every training and test setting, under
    ``PAPER``'s names (``replaced``: the samples replace the training set, one per image)."""
    return {"classifier": classifier, "num_classes": num_classes, "train_images": train_images,
            "train_set": "replaced" if replaced else "samples", "epochs": epochs, "batch_size": batch_size,
            "optimizer": "sgd", "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay,
            "lr_peak": lr, "lr_schedule": "step x0.1" if schedule == "step" else schedule,
            "warmup_epochs": warmup_epochs, "lr_milestones": list(milestones), **PREPROCESSING[preprocessing]}


def paper_training() -> dict[str, Any]:
    """The ``train_classifier`` settings of the paper's protocol beyond the network, the number
    of epochs and the batch size."""
    return {"lr": PAPER["lr_peak"], "weight_decay": PAPER["weight_decay"], "schedule": "step",
            "warmup_epochs": PAPER["warmup_epochs"], "milestones": PAPER["lr_milestones"],
            "nesterov": PAPER["nesterov"], "preprocessing": "resnet224"}


def paper_differences(protocol: Mapping[str, Any] | None) -> list[str]:
    """Every setting of a CAS row's ``protocol`` (its ``cas`` entry) that is not the paper's, as
    ``"nesterov: False (paper: True)"`` or ``"nesterov: missing (paper: True)"``; [] when the row
    was made under the paper's protocol."""
    given = (protocol or {}).get("cas") or {}
    differ = []
    for key, paper in PAPER.items():
        if key not in given:
            differ.append(f"{key}: missing (paper: {paper!r})")
        elif given[key] != paper:
            differ.append(f"{key}: {given[key]!r} (paper: {paper!r})")
    return differ


def check_paper_protocol(*, arch: str, epochs: int, num_classes: int, batch_size: int, train_images: int,
                         replaced: bool = True) -> None:
    """ValueError naming every setting that would make a ``paper_protocol`` CAS differ from the
    paper's, and how to fix each; called before any sampling."""
    settings = cas_settings(classifier=arch, num_classes=num_classes, train_images=train_images,
                            replaced=replaced, epochs=epochs, batch_size=batch_size, momentum=PAPER["momentum"],
                            **paper_training())
    wrong = [key for key in PAPER if settings[key] != PAPER[key]]
    if wrong:
        fixes = "; ".join(FIX[key].format(PAPER[key]) for key in wrong)
        raise ValueError(f"paper_protocol needs {({k: PAPER[k] for k in wrong})}, got "
                         f"{({k: settings[k] for k in wrong})}: {fixes}")
