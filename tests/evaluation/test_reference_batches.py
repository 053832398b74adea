"""ADM reference batches, sFID's spatial features and precision/recall against a batch, with a
random-weight TorchScript stand-in of Inception whose ``layers`` chain as the real file's do."""

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cdmbench.builtin import features as features_module
from cdmbench.builtin.features import SPATIAL_DIMS, inception, legacy_resize
from cdmbench.builtin.metrics import fid, precision_recall_metric, sfid
from cdmbench.errors import CdmbenchError
from cdmbench.evaluation.metrics import statistics
from cdmbench.evaluation.reference_batches import check_layout, file_sha256, locate, open_reference_batch
from cdmbench.recipe.schema import Component

DIMS = 64  # pool features of the stand-in (2048 in the real network)
STATS = {"pool": "fid_train", "spatial": "sfid_train"}


class Mixed(nn.Module):
    """A block with a ``conv`` branch, as the real mixed_6 (whose conv has 192 channels)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, 8, 1), nn.ReLU())
        self.tower = nn.Conv2d(channels, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x)], 1)


class SpatialStandIn(nn.Module):
    """The TorchScript Inception's interface: forward(x in [0, 255], return_features, use_fp16,
    no_output_bias), resizing inside as the real one does, and ``layers`` whose children run one
    by one give the pool features, mixed_6 at 17 x 17."""

    def __init__(self, dims: int = DIMS, side: int = 17):
        super().__init__()
        self.layers = nn.Sequential(OrderedDict([
            ("conv", nn.Conv2d(3, 8, 3, stride=2)), ("pool1", nn.AdaptiveAvgPool2d(side)), ("mixed_6", Mixed(8)),
            ("mixed_7", nn.Conv2d(16, dims, 3)), ("pool2", nn.AdaptiveAvgPool2d(1))]))
        self.output = nn.Linear(dims, 1008)

    def forward(self, x: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        features = self.layers(legacy_resize(x)).reshape(x.shape[0], -1)
        if return_features:
            return features
        return (features @ self.output.weight.t()).softmax(dim=1)


def make_network(tmp_path, monkeypatch, side: int = 17, kind: type = SpatialStandIn):
    """The stand-in loaded as Inception; ``side`` < 17 shrinks the spatial features (7 side^2-d) so
    that their 2023 x 2023 eigendecompositions do not take the test's time."""
    monkeypatch.setattr(features_module, "INCEPTION_DIMS", DIMS)
    monkeypatch.setattr(features_module, "SPATIAL_DIMS", 7 * side * side)
    torch.manual_seed(0)
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(kind(side=side)).save(str(path))
    return inception(path=str(path), cache_dir=tmp_path, device="cpu")


@pytest.fixture
def network(tmp_path, monkeypatch):
    return make_network(tmp_path, monkeypatch)


@pytest.fixture
def small_network(tmp_path, monkeypatch):
    return make_network(tmp_path, monkeypatch, side=4)


def images(n: int, seed: int, side: int = 16) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, side, side), dtype=np.uint8))


def adm_batch(path: Path, network, x: torch.Tensor) -> Path:
    """An ADM-layout npz of ``x`` with statistics by ``network``, as ADM's evaluator would write it."""
    pool = network.features(x, mode="legacy_tensorflow")
    spatial = network.spatial().features(x, mode="legacy_tensorflow")
    (mu, sigma), (mu_s, sigma_s) = statistics(pool), statistics(spatial)
    np.savez(path, arr_0=x.permute(0, 2, 3, 1).numpy(), mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    return path


class Context:
    """What the metrics ask of an evaluation, with the stand-in as every feature network."""

    def __init__(self, network, samples, cache_dir, resolution=16):
        self.network, self.samples, self.cache_dir, self.resolution = network, samples, cache_dir, resolution
        self.protocol, self.stage, self.device = {"n": len(samples)}, "base16", "cpu"

    def feature_network(self, spec):
        return self.network

    def features(self, network, images, mode):
        return network.features(images, mode=mode)

    def sample_features(self, network, mode):
        return network.features(self.samples, mode=mode)


@pytest.mark.slow
def test_spatial_features_are_mixed_6_conv_first_7_channels_flattened_as_tensorflow(network):
    x = images(5, 0)
    spatial = network.spatial()
    f = spatial.features(x, mode="legacy_tensorflow")
    assert f.shape == (5, SPATIAL_DIMS) == (5, 2023) and f.dtype == torch.float64
    assert torch.equal(f, spatial.features(x, mode="legacy_tensorflow"))  # deterministic
    assert torch.allclose(spatial.features(x[2:3], mode="legacy_tensorflow"), f[2:3], atol=1e-6)  # per image
    with torch.no_grad():  # the hand-run chain: (H, W, C) order, channel fastest, as TensorFlow's NHWC
        tap = network.model.layers.mixed_6.conv(network.model.layers.pool1(network.model.layers.conv(
            legacy_resize(x.float()))))
    assert torch.allclose(f, tap[:, :7].permute(0, 2, 3, 1).reshape(5, -1).double(), atol=1e-6)
    assert not torch.allclose(f, tap[:, :7].reshape(5, -1).double())
    assert spatial.sha256 == network.sha256 and spatial.name != network.name  # cached apart from pool features
    clean = spatial.features(x, mode="clean")
    assert clean.shape == (5, 2023) and not torch.allclose(clean, f)


class Unchained(SpatialStandIn):
    """Its features are not what its layers give when run one by one."""

    def forward(self, x: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        return self.layers(legacy_resize(x)).reshape(x.shape[0], -1) + 1


def test_a_network_whose_layers_do_not_chain_cannot_give_spatial_features(tmp_path, monkeypatch):
    network = make_network(tmp_path, monkeypatch, kind=Unchained)
    with pytest.raises(CdmbenchError, match="do not expose mixed_6/conv.*sFID cannot be computed"):
        network.spatial()


def test_a_missing_batch_names_its_url_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CDMBENCH_REFERENCE_BATCHES", str(tmp_path / "batches"))
    with pytest.raises(CdmbenchError) as error:
        locate("VIRTUAL_imagenet64_labeled.npz", tmp_path / "cache")
    message = str(error.value)
    assert ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/64/"
            "VIRTUAL_imagenet64_labeled.npz") in message
    assert str(tmp_path / "batches" / "VIRTUAL_imagenet64_labeled.npz") in message
    assert str(tmp_path / "cache" / "reference_batches" / "VIRTUAL_imagenet64_labeled.npz") in message
    assert "CDMBENCH_REFERENCE_BATCHES" in message and "Nothing is downloaded" in message
    with pytest.raises(CdmbenchError, match="imagenet/512/VIRTUAL_imagenet512.npz"):
        locate("VIRTUAL_imagenet512.npz", tmp_path)
    found = tmp_path / "cache" / "reference_batches" / "VIRTUAL_imagenet64_labeled.npz"
    found.parent.mkdir(parents=True)
    found.write_bytes(b"x")
    assert locate("VIRTUAL_imagenet64_labeled.npz", tmp_path / "cache") == found
    (tmp_path / "batches").mkdir()
    (tmp_path / "batches" / found.name).write_bytes(b"y")  # the environment's folder comes first
    assert locate(found.name, tmp_path / "cache") == tmp_path / "batches" / found.name
    assert locate(str(found), tmp_path / "nowhere") == found  # a path is itself


def test_a_batch_of_the_wrong_layout_says_what_is_wrong(tmp_path):
    base = {"arr_0": np.zeros((4, 8, 8, 3), np.uint8), "mu": np.zeros(3), "sigma": np.eye(3),
            "mu_s": np.zeros(2), "sigma_s": np.eye(2)}
    np.savez(tmp_path / "good.npz", **base)
    assert check_layout(tmp_path / "good.npz") == (4, 8, {"pool": 3, "spatial": 2})
    cases = {"lacks mu_s, sigma_s": {k: v for k, v in base.items() if not k.endswith("_s")},
             "uint8 square RGB": {**base, "arr_0": np.zeros((4, 3, 8, 8), np.uint8)},
             "not a \\(D,\\) mean": {**base, "sigma": np.eye(4)}}
    for match, arrays in cases.items():
        np.savez(tmp_path / "bad.npz", **arrays)
        with pytest.raises(CdmbenchError, match=match):
            check_layout(tmp_path / "bad.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(CdmbenchError, match="not a readable npz"):
        check_layout(tmp_path / "text.npz")


def test_the_sha256_of_a_batch_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    import hashlib

    import cdmbench.evaluation.reference_batches as module

    path = tmp_path / "b.npz"
    path.write_bytes(b"one")
    assert file_sha256(path, tmp_path) == hashlib.sha256(b"one").hexdigest()
    monkeypatch.setattr(module, "sha256_file", lambda p: pytest.fail("hashed again"))
    assert file_sha256(path, tmp_path) == hashlib.sha256(b"one").hexdigest()
    monkeypatch.undo()
    path.write_bytes(b"two!")
    assert file_sha256(path, tmp_path) == hashlib.sha256(b"two!").hexdigest()


@pytest.mark.slow
def test_a_batchs_own_images_have_fid_and_sfid_zero_against_it(small_network, tmp_path):
    """Its statistics made by the same network, as ADM's evaluator makes them: FID ~0 and sFID ~0."""
    network, x = small_network, images(40, 1)
    batch = adm_batch(tmp_path / "VIRTUAL_test16.npz", network, x)
    context = Context(network, x, tmp_path / "cache")
    rows = {}
    for metric in (fid(reference_batch=str(batch), bootstrap=0), sfid(reference_batch=str(batch), bootstrap=0)):
        metric.prepare(context)
        rows.update({r["metric"]: r for r in metric.evaluate(context)})
    assert set(rows) == {"fid_train", "sfid_train"}
    scale = {kind: np.trace(open_reference_batch(str(batch), tmp_path).statistics(kind)[1]) for kind in STATS}
    for kind, metric in STATS.items():  # 0 up to the rounding of Tr(S)-sized terms (S singular: n < D)
        assert abs(rows[metric]["value"]) < 1e-6 * scale[kind]
    protocol = rows["sfid_train"]["protocol"]
    assert protocol["evaluator"] == "adm-evaluator" and protocol["reference"] == "VIRTUAL_test16.npz"
    assert protocol["reference_sha256"] == open_reference_batch(str(batch), tmp_path).sha256
    assert protocol["spatial_features"].startswith("mixed_6/conv") and protocol["features"] == network.name
    assert protocol["note"].startswith("n=40 < 112 feature dimensions")
    other = fid(reference_batch=str(batch), bootstrap=0).evaluate(Context(network, images(40, 2), tmp_path))
    assert other[0]["value"] > 1e-2 * scale["pool"]  # other images are not at distance 0


@pytest.mark.slow
def test_precision_and_recall_against_a_batchs_own_images_are_one(small_network, tmp_path):
    network, x = small_network, images(30, 3)
    batch = adm_batch(tmp_path / "VIRTUAL_test16.npz", network, x)
    metric = precision_recall_metric(reference_batch=str(batch))
    context = Context(network, x, tmp_path / "cache")
    metric.prepare(context)
    rows = metric.evaluate(context)
    assert [(r["metric"], r["value"]) for r in rows] == [("precision", 1.0), ("recall", 1.0)]
    assert rows[0]["protocol"]["reference_n"] == 30 and rows[0]["protocol"]["k"] == 3
    assert len(list((tmp_path / "cache" / "reference_features").glob("*.npz"))) == 1  # cached for the next
    far = Context(network, torch.full((30, 3, 16, 16), 255, dtype=torch.uint8), tmp_path / "cache")
    assert [r["value"] for r in metric.evaluate(far)] == [0.0, 0.0]  # 30 copies of one white image


@pytest.mark.slow
def test_a_batch_is_checked_before_any_sampling(small_network, tmp_path):
    network = small_network
    batch = adm_batch(tmp_path / "VIRTUAL_test16.npz", network, images(20, 4))
    with pytest.raises(CdmbenchError, match="holds 16x16 images; stage base16 makes 32x32"):
        fid(reference_batch=str(batch)).prepare(Context(network, images(20, 4), tmp_path, resolution=32))
    with pytest.raises(CdmbenchError, match="in legacy_tensorflow mode .*mode 'clean' cannot be compared"):
        sfid(reference_batch=str(batch), mode="clean").prepare(Context(network, images(20, 4), tmp_path))
    with pytest.raises(CdmbenchError, match="VIRTUAL_imagenet64_labeled.npz is not on this machine"):
        precision_recall_metric(reference_batch="VIRTUAL_imagenet64_labeled.npz").prepare(
            Context(network, images(20, 4), tmp_path))


def test_sfid_needs_a_network_with_spatial_features(tmp_path):
    plain = type("Net", (), {"name": "classifier", "sha256": "0" * 64, "modes": ("native",)})()
    metric = sfid(features="classifier")
    with pytest.raises(CdmbenchError, match="'classifier' has no spatial features"):
        metric.prepare(Context(plain, images(4, 0), tmp_path))


def test_metric_arguments_choose_the_references():
    assert fid().reference == ["train", "test"] and fid().reference_batch is None
    assert fid(reference_batch="b.npz").reference == []
    assert fid(reference=["train", "test"], reference_batch="b.npz").reference == ["train", "test"]
    assert precision_recall_metric().reference == ["train"]
    assert sfid().name == "sfid" and sfid().spec == Component("inception-2015-12-05", {})
    with pytest.raises(ValueError, match="at least one split.*or a reference_batch"):
        fid(reference=[])
    with pytest.raises(ValueError, match="need k >= 1 and more than k reference images"):
        precision_recall_metric(k=3, reference_images=3)


class SplitContext:
    """Fixed sample features and a split's features, for the rows' protocol."""

    def __init__(self, name: str, samples: np.ndarray, split: np.ndarray):
        self.network = type("Net", (), {"name": name, "sha256": "0" * 64, "modes": ("native",)})()
        self.samples, self.split, self.protocol = samples, split, {"n": len(samples)}

    def feature_network(self, spec):
        return self.network

    def sample_features(self, network, mode):
        return self.samples

    def reference_statistics(self, network, mode, split):
        return (*statistics(self.split), len(self.split))


def test_rows_against_a_split_name_cdmbench_the_split_and_a_rank_deficient_covariance():
    rng = np.random.default_rng(0)
    [row] = fid(reference=["test"], bootstrap=0).evaluate(
        SplitContext("classifier", rng.normal(size=(30, 40)), rng.normal(size=(50, 40))))
    assert row["metric"] == "fid_test"
    assert {k: row["protocol"][k] for k in ("evaluator", "reference", "reference_split", "reference_n")} == {
        "evaluator": "cdmbench", "reference": "test split", "reference_split": "test", "reference_n": 50}
    assert row["protocol"]["note"].startswith("n=30 < 40 feature dimensions")
    [row] = fid(reference=["train"], bootstrap=0).evaluate(
        SplitContext("dinov2", rng.normal(size=(60, 8)), rng.normal(size=(70, 8))))
    assert row["metric"] == "fd_dinov2_train" and row["protocol"]["evaluator"] == "edm2"
    assert "note" not in row["protocol"]


def test_is_rows_are_adms_computation_when_its_splits_are_5000_rows():
    from cdmbench.builtin.metrics import inception_score_metric

    class ISContext:
        def __init__(self, n):
            self.samples, self.protocol = torch.zeros(n, 1), {}
            self.network = type("Net", (), {"name": "inception-2015-12-05", "sha256": "0" * 64})()

        def feature_network(self, spec):
            return self.network

        def sample_probabilities(self, network):
            return torch.full((len(self.samples), 4), 0.25, dtype=torch.float64)

    assert inception_score_metric(splits=2).evaluate(ISContext(10000))[0]["protocol"]["evaluator"] == "adm-evaluator"
    assert inception_score_metric(splits=2).evaluate(ISContext(1000))[0]["protocol"]["evaluator"] == "cdmbench"
