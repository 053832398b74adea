"""The built-in `shapes` dataset: determinism, shapes of outputs, separability, fine detail."""

from __future__ import annotations

import numpy as np
import pytest

from cdmbench.builtin import shapes as shapes_module
from cdmbench.builtin.shapes import shapes


def downsample(images: np.ndarray, factor: int) -> np.ndarray:
    """Area (box) downsampling of (N, H, W, C) images, as float64."""
    n, h, w, c = images.shape
    blocks = images.astype(np.float64).reshape(n, h // factor, factor, w // factor, factor, c)
    return blocks.mean(axis=(2, 4))


def detail_lost(images: np.ndarray, factor: int) -> np.ndarray:
    """Per-image mean |x - upsample(downsample(x))|: what area-downsampling by factor removes."""
    coarse = downsample(images, factor).repeat(factor, axis=1).repeat(factor, axis=2)
    return np.abs(images.astype(np.float64) - coarse).mean(axis=(1, 2, 3))


def test_registers_factory():
    registered = {}
    shapes_module.cdmbench_register_datasets(
        register=lambda name, factory, summary="": registered.update({name: factory}))
    assert registered == {"shapes": shapes}


def test_classes():
    ds = shapes(split="train", resolution=16)
    assert ds.num_classes >= 10
    assert len(ds.class_names) == ds.num_classes == len(set(ds.class_names))
    assert all(isinstance(name, str) and name for name in ds.class_names)


@pytest.mark.parametrize("resolution", [8, 16, 32, 64])
def test_items(resolution):
    ds = shapes(split="train", resolution=resolution, num_images=30)
    assert len(ds) == 30
    image, label = ds[7]
    assert image.shape == (resolution, resolution, 3) and image.dtype == np.uint8
    assert isinstance(label, int) and label == 7 % ds.num_classes
    images, labels = ds.batch([7, 3, 29, 7])
    assert images.shape == (4, resolution, resolution, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert labels.tolist() == [i % ds.num_classes for i in (7, 3, 29, 7)]
    assert np.array_equal(images[0], image) and np.array_equal(images[3], image)
    assert np.array_equal(images[1], ds[3][0])  # batching does not change pixels
    assert image.std() > 5  # not blank
    with pytest.raises(IndexError):
        ds[30]
    with pytest.raises(IndexError):
        ds.batch([0, 31])


def test_deterministic_and_splits_differ():
    a = shapes(split="train", resolution=32, seed=0)
    assert np.array_equal(a[5][0], shapes(split="train", resolution=32, seed=0)[5][0])
    assert not np.array_equal(a[5][0], shapes(split="train", resolution=32, seed=1)[5][0])
    assert not np.array_equal(a[5][0], shapes(split="test", resolution=32, seed=0)[5][0])
    assert not np.array_equal(a[5][0], a[15][0])  # same class, another image


def test_labels_balanced():
    ds = shapes(split="train", resolution=8, num_images=200)
    _, labels = ds.batch(range(len(ds)))
    assert np.bincount(labels).tolist() == [200 // ds.num_classes] * ds.num_classes
    assert [ds[i][1] for i in range(ds.num_classes)] == list(range(ds.num_classes))


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        shapes(split="val", resolution=16)
    with pytest.raises(ValueError, match="resolution"):
        shapes(split="train", resolution=0)
    with pytest.raises(ValueError, match="seed"):
        shapes(split="train", resolution=16, seed=-1)


def test_resolution_consistency():
    """Area-downsampling a render gives (nearly) the render at the lower resolution."""
    for high, low in ((32, 16), (32, 8), (64, 32)):
        hi = shapes(split="test", resolution=high).batch(range(50))[0]
        lo = shapes(split="test", resolution=low).batch(range(50))[0]
        assert np.abs(downsample(hi, high // low) - lo).mean() < 1.0  # measured 0.05-0.5


def _silhouette_features(images: np.ndarray) -> np.ndarray:
    """Colour-, position-, scale- and rotation-invariant features of the shape's silhouette:
    radial mass profile around the centroid and magnitudes of angular harmonics 1..6."""
    x = images.astype(np.float64) / 255
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)
    w = np.linalg.norm(x - np.median(border, axis=1)[:, None, None], axis=-1)
    w /= w.max(axis=(1, 2), keepdims=True) + 1e-8
    rows, cols = np.mgrid[:w.shape[1], :w.shape[2]].astype(np.float64)
    mass = w.sum((1, 2))
    u = cols - ((w * cols).sum((1, 2)) / mass)[:, None, None]
    v = rows - ((w * rows).sum((1, 2)) / mass)[:, None, None]
    r, theta = np.sqrt(u * u + v * v) / np.sqrt(mass)[:, None, None], np.arctan2(v, u)
    profile = [(w * ((r >= lo) & (r < lo + 0.15))).sum((1, 2)) / mass
               for lo in np.arange(0, 1.2, 0.15)]
    harmonics = [np.abs((w * r * np.exp(1j * k * theta)).sum((1, 2))) / (w * r).sum((1, 2))
                 for k in range(1, 7)]
    return np.stack(profile + harmonics, axis=1)


def test_classes_separable_at_16():
    """Nearest class mean on silhouette features: train-split means, test-split accuracy."""
    train = shapes(split="train", resolution=16)
    test = shapes(split="test", resolution=16)
    per_class = 50
    n = per_class * train.num_classes
    x_train, y_train = train.batch(range(n))
    x_test, y_test = test.batch(range(n))
    f_train, f_test = _silhouette_features(x_train), _silhouette_features(x_test)
    scale = f_train.std(axis=0)
    means = np.stack([f_train[y_train == c].mean(axis=0) for c in range(train.num_classes)]) / scale
    predicted = (((f_test / scale)[:, None] - means[None]) ** 2).sum(-1).argmin(axis=1)
    accuracy = (predicted == y_test).mean()
    assert accuracy > 0.8, accuracy  # measured 0.98; chance is 0.1


def _plain_disk(p: shapes_module.Params, resolution: int, supersample: int = 4) -> np.ndarray:
    """An untextured anti-aliased disk with the colours, centre and size of one image."""
    g = (np.arange(resolution * supersample) + 0.5) / (resolution * supersample) * 2 - 1
    inside = np.hypot(g[None, :] - p.centre[0], -g[:, None] - p.centre[1]) <= 0.9 * p.scale
    cover = inside.reshape(resolution, supersample, resolution, supersample).mean((1, 3))[..., None]
    return np.rint((p.bg * (1 - cover) + p.fg * cover) * 255)


@pytest.mark.parametrize("resolution, factor, ratio", [(64, 4, 1.8), (32, 2, 1.6)])
def test_fine_detail(resolution, factor, ratio):
    """Going down to 16x16 removes much more from the images than from untextured shapes of the
    same colours and sizes, in every class: the textures are detail only high resolutions show."""
    ds = shapes(split="train", resolution=resolution)
    images, labels = ds.batch(range(200))
    plain = np.stack([_plain_disk(ds.params(i), resolution) for i in range(200)])
    lost, lost_plain = detail_lost(images, factor), detail_lost(plain, factor)
    assert lost.mean() > ratio * lost_plain.mean()  # measured 2.3 (64) and 2.1 (32)
    for c in range(ds.num_classes):
        assert lost[labels == c].mean() > 1.3 * lost_plain[labels == c].mean(), ds.class_names[c]
