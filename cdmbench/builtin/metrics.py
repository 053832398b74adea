"""Metrics `fid`, `is` and `cas`. Each returns result rows whose protocol names the feature
network and its hash, the resize mode, n, the reference split and the samples' seeds."""

from __future__ import annotations

from typing import Any

from cdmbench import hookimpl
from cdmbench.errors import CdmbenchError
from cdmbench.evaluation.metrics import bootstrap_fid_stderr, frechet_distance, inception_score, statistics
from cdmbench.recipe.schema import Component

INCEPTION = "inception-2015-12-05"


def _network(features: str, features_args: dict[str, Any] | None) -> Component:
    return Component(features, dict(features_args or {}))


def _mode(network, mode: str | None) -> str:
    mode = mode or network.modes[0]
    if mode not in network.modes:
        raise ValueError(f"feature network '{network.name}' supports modes {list(network.modes)}, "
                         f"not {mode!r}")
    return mode


class FID:
    """FID of the samples against each reference split: metric ``fid_<split>``, its stderr the
    bootstrap estimate over ``bootstrap`` resamples of the samples (none when 0)."""

    name = "fid"

    def __init__(self, features: Component, mode: str | None, reference: list[str], bootstrap: int):
        self.spec, self.mode, self.reference, self.bootstrap = features, mode, reference, bootstrap

    def prepare(self, context) -> None:
        network = context.feature_network(self.spec)
        mode = _mode(network, self.mode)
        for split in self.reference:
            context.reference_statistics(network, mode, split)

    def evaluate(self, context) -> list[dict[str, Any]]:
        network = context.feature_network(self.spec)
        mode = _mode(network, self.mode)
        features = context.sample_features(network, mode)
        mu, sigma = statistics(features)
        references = {split: context.reference_statistics(network, mode, split) for split in self.reference}
        errors = (bootstrap_fid_stderr(features, [r[:2] for r in references.values()], resamples=self.bootstrap)
                  if self.bootstrap else [None] * len(references))
        spread = {"stderr": f"std over {self.bootstrap} bootstrap resamples of the samples"} if self.bootstrap else {}
        rows = []
        for (split, (ref_mu, ref_sigma, ref_n)), stderr in zip(references.items(), errors, strict=True):
            rows.append({"metric": f"fid_{split}", "value": frechet_distance(mu, sigma, ref_mu, ref_sigma),
                         "stderr": stderr, "n": len(context.samples), "unit": "", "higher_is_better": False,
                         "protocol": {**context.protocol, "features": network.name,
                                      "features_sha256": network.sha256, "mode": mode,
                                      "reference_split": split, "reference_n": ref_n, **spread}})
        return rows


class InceptionScore:
    """exp(E KL(p(y|x) || p(y))) over ``splits`` splits (stderr: their std). With a network
    other than Inception the metric is named ``is_<network>``: an analogous score, not IS."""

    name = "is"

    def __init__(self, features: Component, splits: int):
        self.spec, self.splits = features, splits

    def prepare(self, context) -> None:
        context.feature_network(self.spec)

    def evaluate(self, context) -> list[dict[str, Any]]:
        network = context.feature_network(self.spec)
        probs = context.sample_probabilities(network)
        mean, std = inception_score(probs, splits=self.splits)
        metric = "is" if network.name == INCEPTION else f"is_{network.name}"
        return [{"metric": metric, "value": mean, "stderr": std, "n": len(context.samples), "unit": "",
                 "higher_is_better": True,
                 "protocol": {**context.protocol, "features": network.name,
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
            progress=context.progress, paper_protocol=self.paper_protocol,
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


def fid(*, features: str = INCEPTION, features_args: dict[str, Any] | None = None,
        mode: str | None = None, reference: list[str] = ("train", "test"), bootstrap: int = 10) -> FID:
    """``mode``: legacy_tensorflow (default for Inception; comparable with papers) or clean.
    ``bootstrap``: resamples of the samples whose FIDs' standard deviation is the row's stderr
    (what differences between rows exceed noise; 0: none)."""
    if not reference:
        raise ValueError("reference: give at least one split, e.g. [train, test]")
    if bootstrap < 0 or bootstrap == 1:
        raise ValueError(f"bootstrap={bootstrap}; give 0 (no stderr) or at least 2 resamples, e.g. 10")
    return FID(_network(features, features_args), mode, list(reference), bootstrap)


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
    ``paper_protocol``). The paper's protocol is resnet50, 90 epochs at batch 1024, full
    ImageNet, its training set replaced: ``paper_protocol: true`` (with those settings and
    test_split the validation set) trains that way and marks the rows as not scaled down."""
    if replace_training_set is None:
        replace_training_set = paper_protocol
    if paper_protocol and not replace_training_set:
        raise ValueError("paper_protocol trains on one generated image per training image: leave "
                         "replace_training_set unset or true")
    return CAS(arch, epochs, batch_size, test_split, seed, paper_protocol, replace_training_set)


@hookimpl
def cdmbench_register_metrics(register):
    register("fid", fid, summary="Frechet Inception Distance via clean-fid, vs train and test splits")
    register("is", inception_score_metric, summary="Inception Score, 10 splits, output bias dropped")
    register("cas", cas, summary="Classification Accuracy Score: train on samples, test on real data")
