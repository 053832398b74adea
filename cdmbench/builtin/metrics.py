"""Metrics `fid`, `sfid`, `precision-recall`, `is` and `cas`. Each returns result rows whose protocol
names the feature network and its hash, the resize mode, n, the samples' seeds, the evaluator and
the reference: a split of the recipe's dataset (evaluator "cdmbench") or an ADM reference batch
(evaluator "adm-evaluator", with the file's SHA-256)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cdmbench import hookimpl
from cdmbench.errors import CdmbenchError
from cdmbench.evaluation.metrics import (
    bootstrap_fid_stderr,
    frechet_distance,
    inception_score,
    precision_recall,
    rank_note,
    statistics,
)
from cdmbench.recipe.schema import Component
from cdmbench.storage.cache import digest
from cdmbench.storage.files import cached_tensor, locked

INCEPTION = "inception-2015-12-05"
ADM = "adm-evaluator"  # the shared vocabulary's evaluator names
OWN = "cdmbench"
LEGACY = "legacy_tensorflow"
ADM_IS_SPLIT = 5000  # rows per split of ADM's Inception Score


def _network(features: str, features_args: dict[str, Any] | None) -> Component:
    return Component(features, dict(features_args or {}))


def _mode(network, mode: str | None) -> str:
    mode = mode or network.modes[0]
    if mode not in network.modes:
        raise ValueError(f"feature network '{network.name}' supports modes {list(network.modes)}, "
                         f"not {mode!r}")
    return mode


def _splits(reference: list[str] | None, reference_batch: str | None, default: list[str]) -> list[str]:
    """The splits asked for: ``default`` unless an ADM batch is the reference (then none unless named)."""
    return list(reference) if reference is not None else [] if reference_batch else list(default)


def _reference_batch(context, batch: str, network, mode: str, what: str):
    """The checked ADM batch ``batch`` for the stage's samples and ``network``/``mode``."""
    from cdmbench.builtin import features
    from cdmbench.evaluation.reference_batches import open_reference_batch

    if not network.name.startswith(INCEPTION) or mode != LEGACY:
        raise CdmbenchError(f"{what}: the reference batch {batch} holds statistics of {INCEPTION} in {LEGACY} mode "
                            f"(ADM's evaluator); features '{network.name}' in mode {mode!r} cannot be compared "
                            f"with them: leave features and mode at their defaults")
    found = open_reference_batch(batch, context.cache_dir)
    if found.resolution != context.resolution:
        raise CdmbenchError(f"{what}: {found.name} holds {found.resolution}x{found.resolution} images; stage "
                            f"{context.stage or '?'} makes {context.resolution}x{context.resolution}: use the batch "
                            f"of that resolution")
    expected = {"pool": features.INCEPTION_DIMS, "spatial": features.SPATIAL_DIMS}
    if found.dims != expected:
        raise CdmbenchError(f"{what}: {found.path} has statistics of {found.dims} dimensions, not {expected}: it is "
                            "not an ADM reference batch of this Inception network")
    return found


def _batch_protocol(found) -> dict[str, Any]:
    return {"evaluator": ADM, "reference": found.name, "reference_sha256": found.sha256, "reference_split": "train"}


def _split_protocol(split: str, n: int, evaluator: str = OWN) -> dict[str, Any]:
    return {"evaluator": evaluator, "reference": f"{split} split", "reference_split": split, "reference_n": n}


def _frechet_name(network) -> tuple[str, str]:
    """(metric prefix, evaluator) of a Frechet distance on ``network``'s features: FD-DINOv2 is
    ``fd_dinov2`` as EDM2 computes it; any other network's is ``fid``, cdmbench's."""
    if network.name.startswith("dinov2"):
        return "fd_" + network.name.replace("-", "_"), "edm2" if network.name == "dinov2" else OWN
    return "fid", OWN


class FID:
    """The Frechet distance of the samples' features to each reference: metric ``fid_<split>``
    (``fd_dinov2_<split>`` on DINOv2) against a split, ``fid_train`` against an ADM reference batch
    (statistics of ImageNet's training set); its stderr the bootstrap estimate over ``bootstrap``
    resamples of the samples (none when 0). With ``spatial``, sFID (``sfid_<split>``): the same
    on Inception's spatial features (``InceptionFeatures.spatial``)."""

    def __init__(self, features: Component, mode: str | None, reference: list[str], reference_batch: str | None,
                 bootstrap: int, spatial: bool = False):
        self.spec, self.mode, self.reference, self.bootstrap = features, mode, reference, bootstrap
        self.reference_batch, self.spatial = reference_batch, spatial
        self.name = "sfid" if spatial else "fid"

    def _network(self, context):
        network = context.feature_network(self.spec)
        if not self.spatial:
            return network, {"features": network.name}
        if not hasattr(network, "spatial"):
            raise CdmbenchError(f"sfid: feature network '{network.name}' has no spatial features; sFID reads "
                                f"Inception's mixed_6/conv: use features {INCEPTION}")
        from cdmbench.builtin.features import SPATIAL_FEATURES

        return network.spatial(), {"features": network.name, "spatial_features": SPATIAL_FEATURES}

    def prepare(self, context) -> None:
        network, _ = self._network(context)
        mode = _mode(network, self.mode)
        if self.reference_batch:
            _reference_batch(context, self.reference_batch, network, mode, self.name)
        for split in self.reference:
            context.reference_statistics(network, mode, split)

    def evaluate(self, context) -> list[dict[str, Any]]:
        network, described = self._network(context)
        mode = _mode(network, self.mode)
        prefix, evaluator = ("sfid", OWN) if self.spatial else _frechet_name(network)
        features = context.sample_features(network, mode)
        references = []  # (metric suffix, mu, sigma, protocol)
        for split in self.reference:
            ref_mu, ref_sigma, ref_n = context.reference_statistics(network, mode, split)
            references.append((split, ref_mu, ref_sigma, _split_protocol(split, ref_n, evaluator)))
        if self.reference_batch:
            found = _reference_batch(context, self.reference_batch, network, mode, self.name)
            references.append(("train", *found.statistics("spatial" if self.spatial else "pool"),
                               {**_batch_protocol(found), "reference_statistics": "precomputed in the batch by "
                                "ADM's evaluator (TensorFlow) over ImageNet's training set"}))
        mu, sigma = statistics(features)
        errors = (bootstrap_fid_stderr(features, [r[1:3] for r in references], resamples=self.bootstrap)
                  if self.bootstrap else [None] * len(references))
        spread = {"stderr": f"std over {self.bootstrap} bootstrap resamples of the samples"} if self.bootstrap else {}
        n, dims = len(context.samples), features.shape[1]
        rows = []
        for (suffix, ref_mu, ref_sigma, reference), stderr in zip(references, errors, strict=True):
            rows.append({"metric": f"{prefix}_{suffix}", "value": frechet_distance(mu, sigma, ref_mu, ref_sigma),
                         "stderr": stderr, "n": n, "unit": "", "higher_is_better": False,
                         "protocol": {**context.protocol, **described, "features_sha256": network.sha256,
                                      "mode": mode, **reference, **spread,
                                      **rank_note(n, dims, reference.get("reference_n"))}})
        return rows


class PrecisionRecall:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN balls, as ADM's
    evaluator computes them, on pool features: rows ``precision`` and ``recall`` against each
    reference: a split's images (at most ``reference_images`` of them, drawn with ``seed``) or an
    ADM batch's ``arr_0`` (10,000 images). The reference features are cached."""

    name = "precision-recall"

    def __init__(self, features: Component, mode: str | None, reference: list[str], reference_batch: str | None,
                 k: int, reference_images: int, seed: int):
        self.spec, self.mode, self.reference, self.reference_batch = features, mode, reference, reference_batch
        self.k, self.reference_images, self.seed = k, reference_images, seed

    def _references(self, context, network, mode: str) -> list[tuple[np.ndarray, dict[str, Any]]]:
        """(features, protocol) of each reference, from the cache or computed and cached."""
        out = []
        for split in self.reference:
            images = context.real(split)[0]  # memory-mapped: rows are read only when the cache lacks them
            rows, subset = torch.arange(len(images)), {}
            if len(images) > self.reference_images:
                subset = {"reference_subset": f"{self.reference_images} of {len(images)} images drawn without "
                                              f"replacement, seed {self.seed}"}
                rows = np.sort(np.random.default_rng(self.seed).choice(len(images), self.reference_images,
                                                                       replace=False))
            key = {**context.data_key(split), **subset}
            features = _cached_features(context, network, mode, key,
                                        lambda images=images, rows=rows: images[torch.as_tensor(rows)])
            out.append((features, {**_split_protocol(split, len(features)), **subset}))
        if self.reference_batch:
            found = _reference_batch(context, self.reference_batch, network, mode, self.name)
            features = _cached_features(context, network, mode, {"reference_sha256": found.sha256}, found.images)
            out.append((features, {**_batch_protocol(found), "reference_n": found.num_images}))
        return out

    def prepare(self, context) -> None:
        network = context.feature_network(self.spec)
        self._references(context, network, _mode(network, self.mode))

    def evaluate(self, context) -> list[dict[str, Any]]:
        network = context.feature_network(self.spec)
        mode = _mode(network, self.mode)
        fake = context.sample_features(network, mode)
        rows = []
        for real, reference in self._references(context, network, mode):
            values = precision_recall(real, fake, k=self.k, device=context.device)
            for metric, value in zip(("precision", "recall"), values, strict=True):
                rows.append({"metric": metric, "value": value, "n": len(context.samples), "unit": "",
                             "higher_is_better": True,
                             "protocol": {**context.protocol, "features": network.name,
                                          "features_sha256": network.sha256, "mode": mode, "k": self.k,
                                          "distances": "squared Euclidean, float32", **reference}})
        return rows


def _cached_features(context, network, mode: str, key: dict[str, Any], images) -> np.ndarray:
    """float32 (N, D) features of the reference images ``images()``, cached under ``key``."""
    key = {**key, "features": network.name, "sha256": network.sha256, "mode": mode}
    path = context.cache_dir / "reference_features" / f"{digest(key)}.npz"
    with locked(path):
        return cached_tensor(path, lambda: context.features(network, images(), mode).float()).numpy()


class InceptionScore:
    """exp(E KL(p(y|x) || p(y))) over ``splits`` splits (stderr: their std). With a network
    other than Inception the metric is named ``is_<network>``: an analogous score, not IS. ADM's
    evaluator splits into parts of 5000 rows (the same logits, no output bias): when n is
    5000 x splits the row is its computation, evaluator "adm-evaluator"."""

    name = "is"

    def __init__(self, features: Component, splits: int):
        self.spec, self.splits = features, splits

    def prepare(self, context) -> None:
        """A features-only network (dinov2) refuses here, before any sampling: two blank images."""
        network = context.feature_network(self.spec)
        network.probabilities(torch.zeros(2, 3, context.resolution, context.resolution, dtype=torch.uint8))

    def evaluate(self, context) -> list[dict[str, Any]]:
        network = context.feature_network(self.spec)
        probs = context.sample_probabilities(network)
        mean, std = inception_score(probs, splits=self.splits)
        metric = "is" if network.name == INCEPTION else f"is_{network.name}"
        as_adm = network.name == INCEPTION and len(context.samples) == ADM_IS_SPLIT * self.splits
        return [{"metric": metric, "value": mean, "stderr": std, "n": len(context.samples), "unit": "",
                 "higher_is_better": True,
                 "protocol": {**context.protocol, "features": network.name, "evaluator": ADM if as_adm else OWN,
                              "features_sha256": network.sha256, "splits": self.splits,
                              "mode": "legacy_tensorflow" if network.name == INCEPTION else "native",
                              "stderr": f"std over {self.splits} splits"}}]


class CAS:
    """Classification Accuracy Score: a classifier trained on the samples, tested on the real
    ``test_split``; the same classifier trained on as many real images is the reference. With
    ``replaces_training_set`` it trains on the context's ``training_set`` (one generated image
    per training image, of its class) instead of the evaluation samples, on every process of a
    torchrun evaluation (``all_ranks``: each process calls ``evaluate``; the first's rows count)."""

    name = "cas"

    def __init__(self, arch: str, epochs: int, batch_size: int, test_split: str, seed: int,
                 paper_protocol: bool, replaces_training_set: bool):
        self.arch, self.epochs, self.batch_size, self.test_split, self.seed = (
            arch, epochs, batch_size, test_split, seed)
        self.paper_protocol, self.replaces_training_set = paper_protocol, replaces_training_set
        self.all_ranks = replaces_training_set  # hours of training: shared out; other CAS is short

    def prepare(self, context) -> None:
        """The paper protocol's settings and the training set's size, before any sampling."""
        from cdmbench.evaluation.cas import check_paper_protocol

        if self.paper_protocol:
            try:
                check_paper_protocol(arch=self.arch, epochs=self.epochs, num_classes=context.num_classes,
                                     batch_size=self.batch_size, train_images=len(context.real("train")[1]))
            except ValueError as exc:
                raise CdmbenchError(f"cas: {exc}; or set paper_protocol: false for a scaled-down CAS") from None

    def evaluate(self, context) -> list[dict[str, Any]]:
        from cdmbench.evaluation.cas import classification_accuracy_score
        from cdmbench.evaluation.classifier import training_ranks

        samples, labels, described = context.samples, context.labels, {}
        if self.replaces_training_set:
            if context.training_set is None:
                raise CdmbenchError("cas with replace_training_set trains on one generated image per "
                                    "training image, which cdmbench evaluate makes; this evaluation "
                                    "has none (a sweep does not make them)")
            samples, labels = context.training_set.images, context.training_set.labels
            described = context.training_set.protocol
        signature = described.get("signature", context.protocol.get("signature"))  # names the samples' pixels
        train_images, train_labels = context.real("train")
        first = training_ranks(self.all_ranks)[1] == 0  # the process that tests the classifiers
        val_images, val_labels = context.real(self.test_split) if first else (None, None)
        rows = classification_accuracy_score(
            samples=samples, sample_labels=labels, real_train_images=train_images,
            real_train_labels=train_labels, real_val_images=val_images, real_val_labels=val_labels,
            num_classes=context.num_classes, arch=self.arch, epochs=self.epochs,
            batch_size=self.batch_size, seed=self.seed, device=context.device,
            progress=context.progress, paper_protocol=self.paper_protocol, replaced=self.replaces_training_set,
            cache=(context.cache_dir, context.data_key("train")),
            samples_key=None if signature is None else {"signature": signature}, ranks=self.all_ranks)
        out = []
        for row in rows:
            real = row["source"] != "generated"
            out.append({"metric": row["metric"].replace("cas_", "cas_real_") if real else row["metric"],
                        "value": 100 * row["value"], "n": row["n"], "unit": "%", "higher_is_better": True,
                        "protocol": {**context.protocol, **described, **row["protocol"],
                                     "train_on": row["source"], "test_split": self.test_split}})
        return out


def _frechet_metric(name: str, features: str, features_args: dict[str, Any] | None, mode: str | None,
                    reference: list[str] | None, reference_batch: str | None, bootstrap: int) -> FID:
    splits = _splits(reference, reference_batch, ["train", "test"])
    if not splits and not reference_batch:
        raise ValueError("reference: give at least one split, e.g. [train, test], or a reference_batch")
    if bootstrap < 0 or bootstrap == 1:
        raise ValueError(f"bootstrap={bootstrap}; give 0 (no stderr) or at least 2 resamples, e.g. 10")
    return FID(_network(features, features_args), mode, splits, reference_batch, bootstrap, spatial=name == "sfid")


def fid(*, features: str = INCEPTION, features_args: dict[str, Any] | None = None, mode: str | None = None,
        reference: list[str] | None = None, reference_batch: str | None = None, bootstrap: int = 10) -> FID:
    """``mode``: legacy_tensorflow (default for Inception; comparable with papers) or clean.
    ``reference``: splits of the recipe's dataset (default [train, test]; [] with a
    reference_batch). ``reference_batch``: an ADM reference batch (a file name, looked for in
    $CDMBENCH_REFERENCE_BATCHES and the cache, or a path), e.g. VIRTUAL_imagenet64_labeled.npz.
    ``bootstrap``: resamples of the samples whose FIDs' standard deviation is the row's stderr
    (what differences between rows exceed noise; 0: none)."""
    return _frechet_metric("fid", features, features_args, mode, reference, reference_batch, bootstrap)


def sfid(*, features: str = INCEPTION, features_args: dict[str, Any] | None = None, mode: str | None = None,
         reference: list[str] | None = None, reference_batch: str | None = None, bootstrap: int = 10) -> FID:
    """sFID: as ``fid`` on the first 7 channels of Inception's mixed_6/conv (2023 dimensions)."""
    return _frechet_metric("sfid", features, features_args, mode, reference, reference_batch, bootstrap)


def precision_recall_metric(*, features: str = INCEPTION, features_args: dict[str, Any] | None = None,
                            mode: str | None = None, reference: list[str] | None = None,
                            reference_batch: str | None = None, k: int = 3, reference_images: int = 10000,
                            seed: int = 0) -> PrecisionRecall:
    """``k``: the neighbour whose distance is a ball's radius (3, as ADM). ``reference``: splits
    (default [train]; [] with a reference_batch), each at most ``reference_images`` images (ADM's
    batches hold 10,000) drawn with ``seed``. ``reference_batch``: as for fid."""
    splits = _splits(reference, reference_batch, ["train"])
    if not splits and not reference_batch:
        raise ValueError("reference: give at least one split, e.g. [train], or a reference_batch")
    if k < 1 or reference_images <= k:
        raise ValueError(f"k={k}, reference_images={reference_images}: need k >= 1 and more than k reference "
                         "images, e.g. k: 3, reference_images: 10000")
    return PrecisionRecall(_network(features, features_args), mode, splits, reference_batch, k, reference_images,
                           seed)


def inception_score_metric(*, features: str = INCEPTION, features_args: dict[str, Any] | None = None,
                           splits: int = 10) -> InceptionScore:
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    return InceptionScore(_network(features, features_args), splits)


def cas(*, arch: str = "resnet10t", epochs: int = 40, batch_size: int = 128, test_split: str = "test",
        seed: int = 0, paper_protocol: bool = False, replace_training_set: bool | None = None) -> CAS:
    """Top-1 / top-5 in percent. Scaled down by default: trained on the evaluation samples
    (what matters is optimiser steps: ~300+ at 32x32, ~1000 at 16x16, so raise epochs for few
    samples). ``replace_training_set``: train on one generated image per training image, of its
    class, as Ravuri & Vinyals do (``cdmbench evaluate`` samples them; default: as
    ``paper_protocol``). ``paper_protocol: true`` trains and tests as Ravuri & Vinyals
    (``cdmbench.evaluation.cas_protocol.PAPER``: resnet50, 90 epochs at batch 1024, full
    ImageNet, its training set replaced, SGD with Nesterov momentum, their learning-rate
    schedule, random-resized 224 px crops; test_split the validation set) and refuses other
    arch, epochs, batch_size or data before any sampling. Every row's protocol names each
    setting (``cas``) and those that are not the paper's (``paper_differences``)."""
    if replace_training_set is None:
        replace_training_set = paper_protocol
    if paper_protocol and not replace_training_set:
        raise ValueError("paper_protocol trains on one generated image per training image: leave "
                         "replace_training_set unset or true")
    return CAS(arch, epochs, batch_size, test_split, seed, paper_protocol, replace_training_set)


@hookimpl
def cdmbench_register_metrics(register):
    register("fid", fid, summary="Frechet Inception Distance vs train and test splits or an ADM reference batch")
    register("sfid", sfid, summary="sFID: FID on Inception's spatial features (mixed_6/conv, 2023-d), as ADM")
    register("precision-recall", precision_recall_metric,
             summary="improved precision and recall (k = 3), as ADM's evaluator")
    register("is", inception_score_metric, summary="Inception Score, 10 splits, output bias dropped")
    register("cas", cas, summary="Classification Accuracy Score: train on samples, test on real data")
