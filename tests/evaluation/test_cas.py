"""Classification Accuracy Score on tiny separable data: high when samples carry the class, chance when not."""

import re

import pytest
import torch

import cdmbench.evaluation.cas as cdmbench_cas
from cdmbench.evaluation.cas import classification_accuracy_score, matched_real_subset
from cdmbench.evaluation.cas_protocol import PAPER, check_paper_protocol, paper_differences
from cdmbench.evaluation.classifier import train_classifier
from tests.evaluation.test_classifier import ARCH, colour_images

SETTINGS = {"num_classes": 8, "arch": ARCH, "epochs": 4, "batch_size": 16, "seed": 0, "device": "cpu",
            "progress": False}


@pytest.fixture(scope="module")
def real():
    train = colour_images(12, seed=10)  # more per class than the samples: the subset is matched
    val = colour_images(10, seed=11)
    return train, val


def rows_by(rows):
    return {(r["source"], r["metric"]): r for r in rows}


def test_cas_separable_samples(real):
    (train_images, train_labels), (val_images, val_labels) = real
    samples, sample_labels = colour_images(8, seed=12)
    rows = rows_by(classification_accuracy_score(
        samples=samples, sample_labels=sample_labels, real_train_images=train_images,
        real_train_labels=train_labels, real_val_images=val_images, real_val_labels=val_labels, **SETTINGS))
    assert set(rows) == {(s, m) for s in ("generated", "real data") for m in ("cas_top1", "cas_top5")}
    assert rows["generated", "cas_top1"]["value"] >= 0.9
    assert rows["real data", "cas_top1"]["value"] >= 0.9
    for row in rows.values():
        assert row["n"] == 64
        p = row["protocol"]
        assert (p["classifier"], p["epochs"], p["train_images"], p["train_images_per_class"],
                p["val_images"], p["seed"], p["scaled_down"]) == (ARCH, 4, 64, 8, 80, 0, True)
        assert "scaled down" in p["note"]
        assert p["cas"] == {"classifier": ARCH, "num_classes": 8, "train_images": 64, "train_set": "samples",
                            "epochs": 4, "batch_size": 16, "optimizer": "sgd", "momentum": 0.9, "nesterov": True,
                            "weight_decay": 5e-4, "lr_peak": 0.1, "lr_schedule": "cosine",
                            "warmup_epochs": pytest.approx(4 * 5 / 90), "lr_milestones": [],
                            "train_crop": "random shift +-2 px at native resolution", "flip": True,
                            "eval_crop": "none (native resolution)", "normalisation": "[-1, 1]"}
        # every setting but the optimiser's kind, momentum, Nesterov and flips differs from the paper's
        assert [d.split(":")[0] for d in p["paper_differences"]] == [
            k for k in PAPER if k not in ("optimizer", "momentum", "nesterov", "flip")]
        assert p["paper_differences"] == paper_differences(p)


def test_the_cached_reference_is_trained_once_per_class_counts(real, tmp_path, monkeypatch):
    import cdmbench.evaluation.classifier

    (train_images, train_labels), (val_images, val_labels) = real
    samples, sample_labels = colour_images(8, seed=12)
    trained, real_train = [], cdmbench.evaluation.classifier.train_classifier
    monkeypatch.setattr(cdmbench.evaluation.classifier, "train_classifier",
                        lambda *a, **k: trained.append(len(a[0])) or real_train(*a, **k))

    def score(labels, images=samples):
        return rows_by(classification_accuracy_score(
            samples=images, sample_labels=labels, real_train_images=train_images, real_train_labels=train_labels,
            real_val_images=val_images, real_val_labels=val_labels, cache=(tmp_path, {"data": "colours"}),
            **SETTINGS))

    first, again = score(sample_labels), score(sample_labels.flip(0))  # same class counts: a sweep's levels
    assert trained == [64]  # the reference, on 64 matched real images, once
    assert first["real data", "cas_top1"] == again["real data", "cas_top1"]
    score(sample_labels[:32], samples[:32])  # other class counts: another reference
    assert len(trained) == 2



def test_the_classifier_of_samples_a_key_names_is_trained_once(real, tmp_path, monkeypatch):
    """The paper protocol's classifier trains for hours: cached, its training resumes when stopped."""
    import cdmbench.evaluation.classifier

    (train_images, train_labels), (val_images, val_labels) = real
    samples, sample_labels = colour_images(8, seed=12)
    trained, real_train = [], cdmbench.evaluation.classifier.train_classifier
    monkeypatch.setattr(cdmbench.evaluation.classifier, "train_classifier",
                        lambda *a, **k: trained.append(k["state"].name) or real_train(*a, **k))

    def score(key):
        return rows_by(classification_accuracy_score(
            samples=samples, sample_labels=sample_labels, real_train_images=train_images,
            real_train_labels=train_labels, real_val_images=val_images, real_val_labels=val_labels,
            cache=(tmp_path, {"data": "colours"}), samples_key=key, **SETTINGS))

    first = score({"signature": "abc"})
    assert len(trained) == 2 and all(name.endswith(".state.pt") for name in trained)  # reference and samples'
    assert score({"signature": "abc"}) == first and len(trained) == 2  # both loaded
    score({"signature": "other"})
    assert len(trained) == 3  # other samples: their own classifier

def test_cas_shuffled_labels_near_chance(real):
    """Labels independent of the images carry no class information, so E[top-1] = 1/8.

    Each colour's val images are all right or all wrong in the worst case, so the number of
    colours right is at worst Binomial(8, 1/8): P(top-1 > 0.5) = P(>= 5 of 8) ~ 0.1%; top-5
    (chance 5/8) likewise stays below 1 unless the shuffle leaked class information.
    """
    (train_images, train_labels), (val_images, val_labels) = real
    samples, sample_labels = colour_images(8, seed=12)
    shuffled = sample_labels[torch.randperm(len(sample_labels), generator=torch.Generator().manual_seed(0))]
    index = matched_real_subset(sample_labels, train_labels, num_classes=8)
    reference = train_classifier(train_images[index], train_labels[index], **SETTINGS)  # trained once here
    rows = rows_by(classification_accuracy_score(
        samples=samples, sample_labels=shuffled, real_train_images=None, real_train_labels=None,
        real_val_images=val_images, real_val_labels=val_labels, reference=reference, **SETTINGS))
    assert rows["generated", "cas_top1"]["value"] <= 0.5
    assert rows["generated", "cas_top5"]["value"] < 1.0
    assert rows["real data", "cas_top1"]["value"] >= 0.9


def test_matched_subset_and_errors(real):
    (_, train_labels), (val_images, val_labels) = real
    sample_labels = torch.tensor([0, 0, 0, 3, 7])
    index = matched_real_subset(sample_labels, train_labels, num_classes=8)
    assert torch.equal(train_labels[index].bincount(minlength=8), sample_labels.bincount(minlength=8))
    with pytest.raises(ValueError, match="class 0 has 13 samples but only 12 real images"):
        matched_real_subset(torch.zeros(13, dtype=torch.long), train_labels, num_classes=8)
    small = torch.zeros(5, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="same \\(3, H, W\\)"):
        classification_accuracy_score(samples=small, sample_labels=sample_labels, real_train_images=None,
                                      real_train_labels=None, real_val_images=val_images,
                                      real_val_labels=val_labels, **SETTINGS)
    with pytest.raises(ValueError, match="paper_protocol needs"):
        classification_accuracy_score(samples=val_images, sample_labels=val_labels, real_train_images=None,
                                      real_train_labels=None, real_val_images=val_images,
                                      real_val_labels=val_labels, paper_protocol=True, **SETTINGS)


def test_a_replaced_training_set_is_matched_by_the_whole_real_set_uncopied(real, monkeypatch):
    """One sample per real training image: the reference trains on the real set as it is (at
    ImageNet scale a memory-mapped array that an index would copy into memory)."""
    import cdmbench.evaluation.cas

    (train_images, train_labels), (val_images, val_labels) = real
    seen = []
    monkeypatch.setattr(cdmbench.evaluation.cas, "train_classifier",
                        lambda images, labels, **k: seen.append((images, labels)) or train_classifier(
                            images, labels, **k))
    samples = train_images.flip(0)  # stands in for generated images, one per training image
    classification_accuracy_score(samples=samples, sample_labels=train_labels.flip(0),
                                  real_train_images=train_images, real_train_labels=train_labels,
                                  real_val_images=val_images, real_val_labels=val_labels,
                                  **{**SETTINGS, "epochs": 1})
    assert seen[0][0] is train_images and seen[0][1] is train_labels and seen[1][0] is samples


def test_class_matched_draws_an_image_of_each_samples_class():
    real_labels = torch.arange(3).repeat_interleave(5)  # a split ordered by class, as imagefolder lists it
    wanted = torch.arange(9) % 3
    index = cdmbench_cas.class_matched(wanted, real_labels, num_classes=3, seed=0)
    assert torch.equal(real_labels[index], wanted) and len(set(index.tolist())) == 9  # without replacement
    assert not torch.equal(index, cdmbench_cas.class_matched(wanted, real_labels, num_classes=3, seed=1))
    assert torch.equal(index, cdmbench_cas.class_matched(wanted, real_labels, num_classes=3, seed=0))
    with pytest.raises(ValueError, match="class 0 has 6 samples but only 5 real images"):
        cdmbench_cas.class_matched(torch.zeros(6, dtype=torch.long), real_labels, num_classes=3)


# --- Ravuri & Vinyals' protocol: recorded setting by setting, checked before any sampling ------

def changed(value):
    """Another value of a setting's type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2
    return value[:-1] if isinstance(value, list) else value + " (changed)"


def test_the_papers_settings_have_no_differences_even_through_json():
    import json

    assert paper_differences({"cas": dict(PAPER)}) == []
    assert paper_differences(json.loads(json.dumps({"cas": PAPER}))) == []  # as results.jsonl holds it
    assert len(paper_differences({})) == len(paper_differences(None)) == len(PAPER)  # no cas entry: all missing


def test_a_row_without_nesterov_is_not_the_papers():
    assert paper_differences({"cas": {**PAPER, "nesterov": False}}) == ["nesterov: False (paper: True)"]
    without = {k: v for k, v in PAPER.items() if k != "nesterov"}
    assert paper_differences({"cas": without}) == ["nesterov: missing (paper: True)"]


@pytest.mark.parametrize("key", list(PAPER))
def test_each_setting_missing_or_changed_is_exactly_one_difference(key):
    other = changed(PAPER[key])
    assert other != PAPER[key]
    assert paper_differences({"cas": {**PAPER, key: other}}) == [f"{key}: {other!r} (paper: {PAPER[key]!r})"]
    missing = {k: v for k, v in PAPER.items() if k != key}
    assert paper_differences({"cas": missing}) == [f"{key}: missing (paper: {PAPER[key]!r})"]


def test_the_papers_settings_are_those_of_the_tpu_resnet_code():
    assert PAPER == {
        "classifier": "resnet50", "num_classes": 1000, "train_images": 1_281_167, "train_set": "replaced",
        "epochs": 90, "batch_size": 1024, "optimizer": "sgd", "momentum": 0.9, "nesterov": True,
        "weight_decay": 1e-4, "lr_peak": 0.4, "lr_schedule": "step x0.1", "warmup_epochs": 5,
        "lr_milestones": [30, 60, 80], "train_crop": "random-resized 224 (8-100%, aspect 3/4-4/3, bicubic)",
        "flip": True, "eval_crop": "centre 224/256 of the shorter side, bicubic to 224",
        "normalisation": "imagenet mean/std"}


PAPER_ARGS = {"arch": "resnet50", "epochs": 90, "num_classes": 1000, "batch_size": 1024, "train_images": 1_281_167}


@pytest.mark.parametrize("change, message", [
    ({"arch": "resnet18"}, "needs {'classifier': 'resnet50'}, got {'classifier': 'resnet18'}: set the cas arg "
                           "arch: resnet50"),
    ({"epochs": 30}, "needs {'epochs': 90}, got {'epochs': 30}: set the cas arg epochs: 90"),
    ({"batch_size": 256}, "needs {'batch_size': 1024}, got {'batch_size': 256}: set the cas arg batch_size: 1024"),
    ({"num_classes": 10}, "got {'num_classes': 10}: the paper's protocol is on ImageNet's 1000 classes"),
    ({"train_images": 50_000}, "the paper's protocol replaces all 1,281,167 ImageNet training images"),
    ({"replaced": False}, "got {'train_set': 'samples'}: set the cas arg replace_training_set: true"),
    ({"epochs": 30, "batch_size": 256}, "needs {'epochs': 90, 'batch_size': 1024}, got {'epochs': 30, "
                                        "'batch_size': 256}: set the cas arg epochs: 90; set the cas arg batch_size"),
])
def test_check_paper_protocol_names_each_setting_and_its_fix(change, message):
    check_paper_protocol(**PAPER_ARGS)  # the paper's: no error
    with pytest.raises(ValueError, match=re.escape(f"paper_protocol {message}" if "needs" in message else message)):
        check_paper_protocol(**{**PAPER_ARGS, **change})


def test_the_cas_metric_refuses_other_settings_before_sampling():
    from types import SimpleNamespace

    from cdmbench.builtin.metrics import cas
    from cdmbench.errors import CdmbenchError

    imagenet = SimpleNamespace(num_classes=1000, real=lambda split: (None, range(1_281_167)))  # labels' length only
    cas(arch="resnet50", epochs=90, batch_size=1024, paper_protocol=True).prepare(imagenet)
    with pytest.raises(CdmbenchError, match=re.escape(
            "cas: paper_protocol needs {'classifier': 'resnet50'}, got {'classifier': 'resnet10t'}: set the cas arg "
            "arch: resnet50; or set paper_protocol: false for a scaled-down CAS")):
        cas(epochs=90, batch_size=1024, paper_protocol=True).prepare(imagenet)


def paper_shaped(monkeypatch, n: int) -> None:
    """The test-only path: PAPER shrunk to 8 colours, ``n`` images, 2 epochs at batch 16
    (warm-up 1 epoch, x0.1 from epoch 1); every other setting stays the paper's."""
    for key, value in {"classifier": ARCH, "num_classes": 8, "train_images": n, "epochs": 2, "batch_size": 16,
                       "warmup_epochs": 1, "lr_milestones": [1]}.items():
        monkeypatch.setitem(PAPER, key, value)


@pytest.mark.slow
def test_a_paper_protocol_run_end_to_end_at_a_tiny_scale(real, monkeypatch):
    import cdmbench.evaluation.cas

    (train_images, train_labels), (val_images, val_labels) = real
    samples = torch.randint(0, 256, train_images.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    args = dict(samples=samples, sample_labels=train_labels, real_train_images=train_images,
                real_train_labels=train_labels, real_val_images=val_images, real_val_labels=val_labels,
                paper_protocol=True, replaced=True, **{**SETTINGS, "epochs": 2})
    with pytest.raises(ValueError, match="paper_protocol needs"):  # unshrunk, the production check refuses
        classification_accuracy_score(**args)
    paper_shaped(monkeypatch, len(samples))
    trained, real_train = [], cdmbench.evaluation.cas.train_classifier
    monkeypatch.setattr(cdmbench.evaluation.cas, "train_classifier",
                        lambda *a, **k: trained.append(k) or real_train(*a, **k))
    rows = rows_by(classification_accuracy_score(**args))
    assert len(trained) == 2 and all(k["preprocessing"] == "resnet224" and k["nesterov"] is True and k["lr"] == 0.4
                                     and k["weight_decay"] == 1e-4 and k["schedule"] == "step"
                                     and k["warmup_epochs"] == 1 and k["milestones"] == [1] for k in trained)
    assert set(rows) == {(s, m) for s in ("generated", "real data") for m in ("cas_top1", "cas_top5")}
    for row in rows.values():
        assert 0 <= row["value"] <= 1
        p = row["protocol"]
        assert p["cas"] == PAPER and p["paper_differences"] == [] and p["scaled_down"] is False
        assert p["note"] == "paper protocol"


def test_the_protocol_module_loads_no_torch():
    """Reports and baselines read it: ``cdmbench report`` starts without torch."""
    import subprocess
    import sys

    code = "import sys, cdmbench.evaluation.cas_protocol; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
