"""Classification Accuracy Score (Ravuri & Vinyals 2019), scaled down unless asked for the paper's.

Train a classifier on generated samples, which replace the training set class for class, and
report its top-1/top-5 accuracy on the real validation set. The same classifier trained with the
same settings on as many real training images per class is the reference row. Each row's protocol
names every setting (``protocol["cas"]``) and those that are not the paper's
(``protocol["paper_differences"]``; the paper's protocol and its checks are in ``cas_protocol``).
No file I/O here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cdmbench.evaluation.cas_protocol import (  # noqa: F401 (PAPER and the checks: importable from here too)
    PAPER,
    cas_settings,
    check_paper_protocol,
    paper_differences,
    paper_training,
)
from cdmbench.evaluation.classifier import (
    MOMENTUM,
    Classifier,
    _check_labels,
    accuracy,
    cached_classifier,
    predict_logits,
    schedule_epochs,
    train_classifier,
    training_ranks,
)

# the scaled-down CAS's training (small sets at 16x16-64x64), beside the paper's ``paper_training()``
SCALED_DOWN = {"lr": 0.1, "weight_decay": 5e-4, "schedule": "cosine", "warmup_epochs": None, "milestones": None,
               "nesterov": True, "preprocessing": "native"}


def class_matched(sample_labels: Tensor, real_labels: Tensor, *, num_classes: int, seed: int = 0) -> Tensor:
    """Indices into the real set: entry i is an image of class ``sample_labels[i]``, each class's
    images drawn at random without replacement (``seed``); raises ValueError if a class has too
    few real images."""
    sample_labels, real_labels = sample_labels.cpu(), real_labels.cpu()
    generator = torch.Generator().manual_seed(seed)
    index = torch.empty(len(sample_labels), dtype=torch.long)
    for c in range(num_classes):
        wanted = (sample_labels == c).nonzero().flatten()
        pool = (real_labels == c).nonzero().flatten()
        if len(pool) < len(wanted):
            raise ValueError(f"class {c} has {len(wanted)} samples but only {len(pool)} real "
                             f"images; the real reference needs at least as many: evaluate fewer "
                             f"samples, or draw their classes evenly (evaluate.labels: balanced)")
        index[wanted] = pool[torch.randperm(len(pool), generator=generator)[:len(wanted)]]
    return index


def matched_real_subset(sample_labels: Tensor, real_labels: Tensor, *, num_classes: int,
                        seed: int = 0) -> Tensor:
    """Indices into the real set with as many images of each class as ``sample_labels`` has,
    in order (a memory-mapped set is read front to back)."""
    return class_matched(sample_labels, real_labels, num_classes=num_classes, seed=seed).sort().values


def _note(*, arch: str, epochs: int, n: int) -> str:
    return (f"scaled down: {arch} for {epochs} epochs on {n:,} images at the samples' resolution "
            f"(paper: ResNet-50, 90 epochs, {PAPER['train_images']:,} ImageNet images); "
            f"not comparable with published CAS (paper_differences lists each setting)")


def classification_accuracy_score(*, samples: Tensor, sample_labels: Tensor,
                                  real_train_images: Tensor | None, real_train_labels: Tensor | None,
                                  real_val_images: Tensor | None, real_val_labels: Tensor | None, num_classes: int,
                                  arch: str = "resnet10t", epochs: int, batch_size: int = 128,
                                  seed: int = 0, device: str | torch.device = "cpu", progress: bool = True,
                                  paper_protocol: bool = False, replaced: bool = False,
                                  reference: Classifier | None = None,
                                  cache: tuple[Path, dict] | None = None,
                                  samples_key: dict | None = None, ranks: bool = False) -> list[dict[str, Any]]:
    """CAS top-1/top-5 (fractions) of ``samples`` and of the matched real-data reference.

    All images are (N, 3, H, W) uint8 at one resolution. ``replaced``: the samples replace the
    real training set, one per image. ``paper_protocol`` trains and tests as the paper does
    (``cas_protocol.PAPER``: ResNet-50, 90 epochs at batch 1024, SGD with Nesterov momentum,
    weight decay 1e-4, lr warmed up to 0.4 over 5 epochs and x0.1 at 30/60/80, random-resized
    224 px crops, the central crop for testing; ImageNet's training set replaced) and raises a
    ValueError naming each setting that is not the paper's; otherwise the scaled-down CAS
    (``SCALED_DOWN``) trains at the samples' resolution.
    ``reference``: a classifier already trained on ``matched_real_subset(...)`` with the same
    settings (e.g. from ``cached_classifier``); then no real-data classifier is trained and the
    real training set may be None. ``cache``: (cache dir, key naming the real training data):
    the reference is trained once per class counts and settings (``cached_classifier``), and so
    is the classifier of the samples when ``samples_key`` names them (e.g. their signature); a
    cached classifier's interrupted training resumes (the paper protocol's takes hours).
    ``ranks``: every process of the torchrun process group calls this with the same arguments
    and the classifiers train on all of them (``train_classifier``'s ``ranks``); the first
    process tests them and returns the rows, the others return [] and may pass no validation set.
    Returns one row per (metric, source).
    """
    world, rank = training_ranks(ranks)
    _check_labels(sample_labels, n=len(samples), num_classes=num_classes, name="sample_labels")
    if rank == 0:
        _check_labels(real_val_labels, n=len(real_val_images), num_classes=num_classes, name="real_val_labels")
        if samples.shape[1:] != real_val_images.shape[1:]:
            raise ValueError(f"samples {tuple(samples.shape[1:])} and real_val_images "
                             f"{tuple(real_val_images.shape[1:])} must have the same (3, H, W)")
    if paper_protocol:
        check_paper_protocol(arch=arch, epochs=epochs, num_classes=num_classes, batch_size=batch_size,
                             train_images=len(samples), replaced=replaced)
    options = paper_training() if paper_protocol else SCALED_DOWN
    train = {"num_classes": num_classes, "arch": arch, "epochs": epochs, "batch_size": batch_size,
             "seed": seed, "device": device, "progress": progress, **options}

    counts = torch.bincount(sample_labels.cpu(), minlength=num_classes)
    if reference is None:
        if real_train_images is None or real_train_labels is None:
            raise ValueError("pass real_train_images and real_train_labels, or a trained reference classifier")
        if real_train_images.shape[1:] != samples.shape[1:]:
            raise ValueError(f"real_train_images {tuple(real_train_images.shape[1:])} and samples "
                             f"{tuple(samples.shape[1:])} must have the same (3, H, W)")

        def matched() -> tuple[Tensor, Tensor]:
            index = matched_real_subset(sample_labels, real_train_labels, num_classes=num_classes, seed=seed)
            if len(index) == len(real_train_labels):  # the whole set (a replaced training set): not copied
                return real_train_images, real_train_labels
            return (real_train_images[index.to(real_train_images.device)],
                    real_train_labels[index.to(real_train_labels.device)])

        if cache is None:
            reference = train_classifier(*matched(), **train, ranks=ranks)
        else:  # one per class counts: every level of a sweep shares it
            reference, _ = cached_classifier(key={**cache[1], "cas_reference_counts": counts.tolist()},
                                             train_images=matched, cache_dir=cache[0], **train, ranks=ranks,
                                             purpose="CAS's classifier on real images (the cas_real rows)")
    if cache is None or samples_key is None:
        generated = train_classifier(samples, sample_labels, **train, ranks=ranks)
    else:
        generated, _ = cached_classifier(key={"cas_samples": samples_key, "n": len(samples)}, train_images=samples,
                                         train_labels=sample_labels, cache_dir=cache[0], **train, ranks=ranks,
                                         purpose="CAS's classifier on the generated images")
    if rank != 0:
        return []
    classifiers = {"generated": generated, "real data": reference}
    per_class = int(counts[0]) if bool((counts == counts[0]).all()) else counts.tolist()
    warmup_epochs, milestones = schedule_epochs(epochs, options["schedule"], options["warmup_epochs"],
                                                options["milestones"])
    settings = cas_settings(classifier=arch, num_classes=num_classes, train_images=len(samples), replaced=replaced,
                            epochs=epochs, batch_size=batch_size, momentum=MOMENTUM, nesterov=options["nesterov"],
                            weight_decay=options["weight_decay"], lr=options["lr"], schedule=options["schedule"],
                            warmup_epochs=warmup_epochs, milestones=milestones,
                            preprocessing=options["preprocessing"])
    differences = paper_differences({"cas": settings})
    protocol = {"classifier": arch, "epochs": epochs, "batch_size": batch_size, "train_images": len(samples),
                "train_images_per_class": per_class, "val_images": len(real_val_images),
                "resolution": samples.shape[-1], "seed": seed, "scaled_down": bool(differences),
                "processes": world,  # batch norm normalises each process's share of a batch
                "cas": settings, "paper_differences": differences,
                "note": "paper protocol" if not differences else _note(arch=arch, epochs=epochs, n=len(samples))}

    rows = []
    for source, model in classifiers.items():
        logits = predict_logits(model, real_val_images, batch_size=2 * batch_size, device=device)
        for name, value in accuracy(logits, real_val_labels.cpu()).items():
            rows.append({"metric": f"cas_{name}", "value": value, "n": len(samples), "source": source,
                         "protocol": dict(protocol)})
    return rows
