"""The built-in `fashion-mnist`, `imagefolder` and `hf` datasets, on tiny files written here."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdmbench.builtin.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    fashion_mnist,
    hf,
    imagefolder,
    square_resize,
)
from cdmbench.errors import CdmbenchError

# ---------------------------------------------------------------------------- fashion-mnist


def write_idx(path: Path, array: np.ndarray) -> None:
    """``array`` (uint8) as an IDX file, gzipped when the name ends with .gz."""
    header = bytes((0, 0, 0x08, array.ndim)) + np.array(array.shape, ">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def grey_images(n: int, seed: int) -> np.ndarray:
    """n random 28x28 images with no zero pixel (so padding is told apart)."""
    return np.random.default_rng(seed).integers(1, 256, (n, 28, 28), dtype=np.uint8)


@pytest.fixture
def idx_dir(tmp_path) -> Path:
    """6 train images (gzip) and 4 test images (raw) in IDX files."""
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", grey_images(6, 0))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 9, 8, 7]))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", grey_images(4, 1))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([3, 4, 5, 6]))
    return tmp_path


@pytest.mark.parametrize("split, seed, labels", [("train", 0, [0, 1, 2, 9, 8, 7]),
                                                 ("test", 1, [3, 4, 5, 6])])
def test_fashion_mnist_items(idx_dir, split, seed, labels):
    ds = fashion_mnist(split=split, resolution=32, path=str(idx_dir))
    assert len(ds) == len(labels) and ds.num_classes == 10 and ds.benchmark == "fashion-mnist"
    assert ds.class_names == FASHION_MNIST_CLASSES and ds.class_names[0] == "T-shirt/top"
    originals = grey_images(len(labels), seed)
    for i, label in enumerate(labels):
        image, got = ds[i]
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert isinstance(got, int) and got == label
        assert (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all()
        assert np.array_equal(image[2:30, 2:30, 0], originals[i])  # centred
        border = np.ones((32, 32), bool)
        border[2:30, 2:30] = False
        assert (image[border] == 0).all()  # padded with black


def test_fashion_mnist_args(idx_dir):
    image, _ = fashion_mnist(split="train", resolution=16, path=str(idx_dir), pad_to=35)[0]
    assert image.shape == (35, 35, 3) and image[3:31, 3:31, 0].min() > 0 and image[31:, :].max() == 0
    assert len(fashion_mnist(split="train", resolution=32, path=str(idx_dir), num_images=4)) == 4
    with pytest.raises(ValueError, match="pad_to must be an integer >= 28"):
        fashion_mnist(split="train", resolution=16, path=str(idx_dir), pad_to=27)
    with pytest.raises(ValueError, match="set pad_to: 64"):
        fashion_mnist(split="train", resolution=64, path=str(idx_dir))
    with pytest.raises(ValueError, match="split must be one of train, test"):
        fashion_mnist(split="validation", resolution=32, path=str(idx_dir))


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:-7], "cannot be read"),
    (lambda data: data[:10] + bytes([data[10] ^ 0xFF]) + data[11:], "cannot be read"),  # zlib.error
    (lambda data: gzip.compress(gzip.decompress(data)[:-5]), "truncated or corrupt"),
    (lambda data: gzip.compress(b"\x00\x00\x0c\x03" + gzip.decompress(data)[4:]), "magic number 00000c03"),
    (lambda data: b"", "the file is empty"),
    (lambda data: b"not gzip at all", "cannot be read"),
], ids=["truncated-gzip", "corrupt-deflate", "truncated-data", "wrong-type", "empty", "not-gzip"])
def test_fashion_mnist_corrupt_file(idx_dir, damage, message):
    path = idx_dir / "train-images-idx3-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CdmbenchError, match=message) as info:
        fashion_mnist(split="train", resolution=32, path=str(idx_dir))
    assert str(path) in str(info.value) and "apt-get install --reinstall" in str(info.value)


def test_fashion_mnist_label_out_of_range(idx_dir):
    path = idx_dir / "train-labels-idx1-ubyte.gz"
    write_idx(path, np.array([0, 1, 2, 200, 8, 7]))
    with pytest.raises(CdmbenchError, match=r"holds label 200 \(item 3\), but the classes are 0..9") as info:
        fashion_mnist(split="train", resolution=32, path=str(idx_dir))
    assert str(path) in str(info.value) and "apt-get install --reinstall" in str(info.value)


def test_fashion_mnist_missing_files(tmp_path):
    folder = tmp_path / "nowhere"
    with pytest.raises(CdmbenchError) as info:
        fashion_mnist(split="test", resolution=32, path=str(folder))
    message = str(info.value)
    for part in (str(folder), "t10k-images-idx3-ubyte[.gz]", "t10k-labels-idx1-ubyte[.gz]",
                 "apt-get install dataset-fashion-mnist", "`path:`"):
        assert part in message


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(),
                    reason=f"{FASHION_MNIST_DIR} absent (apt-get install dataset-fashion-mnist)")
@pytest.mark.parametrize("split, n", [("train", 60000), ("test", 10000)])
def test_fashion_mnist_real_files(split, n):
    ds = fashion_mnist(split=split, resolution=32)
    assert len(ds) == n
    assert np.bincount(ds.labels, minlength=10).tolist() == [n // 10] * 10
    image, _ = ds[n - 1]
    assert image.shape == (32, 32, 3) and image[2:30, 2:30].max() > 0


# ---------------------------------------------------------------------------- shared resize

def test_square_resize_crops_centre_and_averages():
    stripes = np.zeros((10, 30, 3), np.uint8)  # red | green | blue thirds; the centre is green
    stripes[:, :10, 0] = stripes[:, 10:20, 1] = stripes[:, 20:, 2] = 255
    out = square_resize(Image.fromarray(stripes), 8)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert (out[..., 1] == 255).all() and out[..., [0, 2]].max() == 0
    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)  # pixel-level
    out = square_resize(Image.fromarray(checker), 16)  # area-like: averages to mid grey
    assert out.shape == (16, 16, 3) and np.abs(out.astype(int) - 128).max() <= 1


# ---------------------------------------------------------------------------- imagefolder

def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_imagefolder_flat(tmp_path):
    write_png(tmp_path / "dog" / "a.png", np.full((20, 40), 200, np.uint8))  # greyscale
    write_png(tmp_path / "cat" / "b.png", np.full((30, 50, 3), (10, 20, 30), np.uint8))
    write_png(tmp_path / "cat" / "sub" / "c.png", np.zeros((16, 16, 3), np.uint8))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = imagefolder(path=str(tmp_path), split="train", resolution=16)
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2 and ds.benchmark == str(tmp_path)
    assert len(ds) == 3 and [ds[i][1] for i in range(3)] == [0, 0, 1]
    for i in range(3):
        assert ds[i][0].shape == (16, 16, 3) and ds[i][0].dtype == np.uint8
    assert (ds[0][0] == (10, 20, 30)).all()
    assert (ds[2][0] == 200).all()  # greyscale -> RGB
    with pytest.raises(CdmbenchError, match="no test split"):
        imagefolder(path=str(tmp_path), split="test", resolution=16)


def test_imagefolder_splits(tmp_path):
    for split, cls in [("train", "a"), ("train", "b"), ("val", "b")]:
        write_png(tmp_path / split / cls / "x.png", np.zeros((8, 8, 3), np.uint8))
    test = imagefolder(path=str(tmp_path), split="test", resolution=8, split_names={"test": "val"},
                       benchmark="toy")
    assert test.class_names == ["a", "b"] and len(test) == 1 and test[0][1] == 1
    assert test.benchmark == "toy"
    with pytest.raises(CdmbenchError, match="no test split"):
        imagefolder(path=str(tmp_path), split="test", resolution=8)
    write_png(tmp_path / "val" / "c" / "x.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(CdmbenchError, match=r"class folders \['c'\]"):
        imagefolder(path=str(tmp_path), split="test", resolution=8, split_names={"test": "val"})


def test_imagefolder_errors(tmp_path):
    with pytest.raises(CdmbenchError, match="no folder"):
        imagefolder(path=str(tmp_path / "missing"), split="train", resolution=8)
    with pytest.raises(CdmbenchError, match="has no class subfolders"):
        imagefolder(path=str(tmp_path), split="train", resolution=8)
    (tmp_path / "empty-class").mkdir()
    empty = imagefolder(path=str(tmp_path), split="train", resolution=8)  # files listed on first use
    with pytest.raises(CdmbenchError, match="no image files under"):
        len(empty)
    (tmp_path / "empty-class" / "broken.png").write_bytes(b"not a png")
    ds = imagefolder(path=str(tmp_path), split="train", resolution=8)
    with pytest.raises(CdmbenchError, match="cannot read image .*broken.png"):
        ds[0]
    with pytest.raises(ValueError, match="split_names"):
        imagefolder(path=str(tmp_path), split="train", resolution=8, split_names={"val": "val"})


def transparent_images() -> dict[str, Image.Image]:
    """4x4 images whose pixel (0, 0) is fully transparent over a hidden colour (red or green), in
    each way files mark transparency; RGBA's pixel (0, 1) is black at alpha 128, the rest opaque."""
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[...] = (10, 20, 30, 255)
    rgba[0, 0] = (255, 0, 0, 0)  # hidden red
    rgba[0, 1] = (0, 0, 0, 128)  # half-transparent black
    la = np.full((4, 4, 2), (90, 255), np.uint8)
    la[0, 0] = (200, 0)
    palette = Image.fromarray(np.ones((4, 4), np.uint8), "P")  # index 1, dark blue, everywhere...
    palette.putpalette([0, 255, 0, 0, 0, 80] + [0] * 762)
    palette.putpixel((0, 0), 0)  # ...but (0, 0): index 0, green, the transparent one
    palette.info["transparency"] = 0
    pa = palette.convert("PA")
    return {"RGBA": Image.fromarray(rgba, "RGBA"), "LA": Image.fromarray(la, "LA"), "P": palette, "PA": pa}


def assert_composited(out: np.ndarray, mode: str, colour: tuple[int, int, int]) -> None:
    """``out``, a ``transparent_images()[mode]`` read as RGB, shows ``colour`` where it is transparent."""
    assert tuple(out[0, 0]) == colour  # not the colour under the transparent pixel
    assert tuple(out[0, 0]) == colour  # not the colour under the transparent pixel
    opaque = {"RGBA": (10, 20, 30), "LA": (90, 90, 90), "P": (0, 0, 80), "PA": (0, 0, 80)}[mode]
    assert tuple(out[3, 3]) == opaque
    if mode == "RGBA":  # alpha 128 of black over the background: the blend
        blend = [c * (255 - 128) / 255 for c in colour]
        assert np.abs(out[0, 1] - np.array(blend)).max() <= 1, (out[0, 1], blend)


@pytest.mark.parametrize("mode, suffix", [("RGBA", "png"), ("LA", "png"), ("P", "png"), ("P", "gif")])
@pytest.mark.parametrize("background, colour", [(None, (255, 255, 255)), ("black", (0, 0, 0)),
                                                ([0, 128, 255], (0, 128, 255)), ("#102030", (16, 32, 48))])
def test_imagefolder_composites_transparency_onto_the_background(tmp_path, mode, suffix, background, colour):
    (tmp_path / "c").mkdir()
    transparent_images()[mode].save(tmp_path / "c" / f"x.{suffix}")
    with Image.open(tmp_path / "c" / f"x.{suffix}") as saved:  # the file keeps the mode and the transparency
        assert saved.mode == mode and (mode != "P" or saved.info["transparency"] == 0)
    args = {} if background is None else {"background": background}
    out = imagefolder(path=str(tmp_path), split="train", resolution=4, **args)[0][0]
    assert_composited(out, mode, colour)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "PA"])
def test_square_resize_composites_transparency(mode):
    assert_composited(square_resize(transparent_images()[mode], 4), mode, (255, 255, 255))
    assert_composited(square_resize(transparent_images()[mode], 4, (1, 2, 3)), mode, (1, 2, 3))


def test_imagefolder_background_must_be_a_colour(tmp_path):
    write_png(tmp_path / "c" / "x.png", np.zeros((4, 4, 3), np.uint8))
    for bad in ("no-such-colour", [256, 0, 0], [1, 2], [True, 0, 0], [0.5, 0, 0], 7):
        with pytest.raises(ValueError, match="imagefolder: background must be a colour name"):
            imagefolder(path=str(tmp_path), split="train", resolution=4, background=bad)


def test_imagefolder_skips_hidden_files(tmp_path):
    write_png(tmp_path / "cat" / "a.png", np.zeros((8, 8, 3), np.uint8))
    write_png(tmp_path / "cat" / "sub" / "b.png", np.zeros((8, 8, 3), np.uint8))
    write_png(tmp_path / "cat" / ".x.png", np.zeros((8, 8, 3), np.uint8))  # hidden, and readable
    (tmp_path / "cat" / "._a.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # a macOS resource fork
    write_png(tmp_path / "cat" / ".thumbnails" / "a.png", np.zeros((4, 4, 3), np.uint8))
    write_png(tmp_path / ".hidden-class" / "a.png", np.zeros((8, 8, 3), np.uint8))
    ds = imagefolder(path=str(tmp_path), split="train", resolution=8)
    assert ds.class_names == ["cat"]
    assert [p.relative_to(tmp_path).as_posix() for p in ds.items[0]] == ["cat/a.png", "cat/sub/b.png"]
    assert all(ds[i][0].shape == (8, 8, 3) for i in range(len(ds)))  # the resource fork is not read


# ---------------------------------------------------------------------------- hf

def hf_rows(n: int, label_feature=None):
    """A tiny datasets.Dataset of n RGB images (pixel value 10 * i) with labels i % 3."""
    import datasets

    features = datasets.Features({"image": datasets.Image(),
                                  "label": label_feature or datasets.ClassLabel(names=["x", "y", "z"]),
                                  "extra": datasets.Value("string")})
    images = [Image.fromarray(np.full((12, 20, 3), 10 * i, np.uint8)) for i in range(n)]
    return datasets.Dataset.from_dict(
        {"image": images, "label": [i % 3 for i in range(n)], "extra": ["-"] * n}, features=features)


def test_hf_saved_dataset_dict(tmp_path):
    import datasets

    datasets.DatasetDict(train=hf_rows(4), validation=hf_rows(2)).save_to_disk(tmp_path / "d")
    ds = hf(path=str(tmp_path / "d"), split="train", resolution=8)
    assert len(ds) == 4 and ds.class_names == ["x", "y", "z"] and ds.num_classes == 3
    assert ds.benchmark == str(tmp_path / "d")
    image, label = ds[3]
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8 and (image == 30).all()
    assert isinstance(label, int) and label == 0
    test = hf(path=str(tmp_path / "d"), split="test", resolution=8,
              split_names={"test": "validation"}, benchmark="toy")
    assert len(test) == 2 and test[1][1] == 1 and test.benchmark == "toy"
    with pytest.raises(ValueError, match="split_names"):
        hf(path=str(tmp_path / "d"), split="test", resolution=8)


def test_hf_saved_dataset_and_columns(tmp_path):
    import datasets

    hf_rows(5, datasets.Value("int64")).save_to_disk(tmp_path / "d")
    ds = hf(path=str(tmp_path / "d"), split="train", resolution=4)
    assert len(ds) == 5 and ds.class_names == ["0", "1", "2"]
    with pytest.raises(ValueError, match="not 'test'"):  # a plain Dataset is the train split
        hf(path=str(tmp_path / "d"), split="test", resolution=4)
    with pytest.raises(ValueError, match="no column 'img'"):
        hf(path=str(tmp_path / "d"), split="train", resolution=4, image_column="img")
    with pytest.raises(ValueError, match="not images"):
        hf(path=str(tmp_path / "d"), split="train", resolution=4, image_column="extra")
    with pytest.raises(ValueError, match="not integer class labels"):
        hf(path=str(tmp_path / "d"), split="train", resolution=4, label_column="extra")


def test_hf_selects_its_columns_once(tmp_path, monkeypatch):
    import datasets

    hf_rows(4).save_to_disk(tmp_path / "d")
    ds = hf(path=str(tmp_path / "d"), split="train", resolution=4)
    select, calls = datasets.Dataset.select_columns, []

    def counted(self, *args, **kwargs):
        calls.append(args)
        return select(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "select_columns", counted)
    assert [ds[i][1] for i in range(len(ds))] == [0, 1, 2, 0] and ds[3][0].max() == 30
    assert calls == [(["image", "label"],)]  # not once per item (it cost 4x the row read)


def test_hf_composites_transparency_onto_the_background(tmp_path):
    import datasets

    images = transparent_images()
    png = io.BytesIO()
    images["P"].save(png, format="PNG")  # as a file holds it (datasets would store the image as TIFF)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a"])})
    datasets.Dataset.from_dict({"image": [images["RGBA"], {"bytes": png.getvalue(), "path": None}],
                                "label": [0, 0]}, features=features).save_to_disk(tmp_path / "d")
    ds = hf(path=str(tmp_path / "d"), split="train", resolution=4)
    assert ds.data[0]["image"].mode == "RGBA" and ds.data[1]["image"].mode == "P"  # decoded with transparency
    (rgba, _), (palette, _) = ds[0], ds[1]
    assert tuple(rgba[0, 0]) == tuple(palette[0, 0]) == (255, 255, 255)  # not red, not green
    assert np.abs(rgba[0, 1].astype(int) - 127).max() <= 1 and tuple(rgba[3, 3]) == (10, 20, 30)
    grey = hf(path=str(tmp_path / "d"), split="train", resolution=4, background=[128, 128, 128])
    assert tuple(grey[0][0][0, 0]) == (128, 128, 128)
    with pytest.raises(ValueError, match="hf: background must be"):
        hf(path=str(tmp_path / "d"), split="train", resolution=4, background="transparent-ish")


def test_hf_unlabelled_row(tmp_path):
    hf_rows(2).map(lambda row: {"label": -1}).save_to_disk(tmp_path / "d")
    ds = hf(path=str(tmp_path / "d"), split="train", resolution=4)
    with pytest.raises(CdmbenchError, match="no label .*split_names"):
        ds[0]


def test_hf_offline_hub_id_says_what_to_do(tmp_path):
    """With HF_DATASETS_OFFLINE=1 and an empty cache, a Hub id fails without network access."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    code = ("from cdmbench.builtin.datasets import hf\n"
            "hf(path='ILSVRC/imagenet-1k', split='train', resolution=32)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "CdmbenchError" in out.stderr
    for part in ("'ILSVRC/imagenet-1k'", "HF_DATASETS_OFFLINE=1", "save_to_disk", "path: DIR"):
        assert part in out.stderr


# ---------------------------------------------------------------------------- registration

def test_registered():
    out = subprocess.run([sys.executable, "-m", "cdmbench", "ls", "datasets"], capture_output=True,
                         text=True, check=True, timeout=120).stdout
    plugins = {line.split()[1]: line.split()[2] for line in out.splitlines()}
    for name in ("fashion-mnist", "imagefolder", "hf"):
        assert plugins.get(name) == "cdmbench.builtin.datasets"


def test_hub_dataset_reads_metadata_first_and_images_on_first_use(monkeypatch):
    """validate / --dry-run need only the class names: a Hub id must not download the split."""
    import types

    import datasets

    from cdmbench.builtin import datasets as plugin

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    builder = types.SimpleNamespace(info=types.SimpleNamespace(features=features))
    monkeypatch.setattr(datasets, "load_dataset_builder", lambda path, cache_dir=None: builder)
    loads = []

    def load_split(path, name, cache_dir):
        loads.append(name)
        image = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
        return datasets.Dataset.from_dict({"image": [image], "label": [1]}, features=features)

    monkeypatch.setattr(plugin, "_load_split", load_split)
    ds = plugin.hf(path="someone/some-dataset", split="test", resolution=4, split_names={"test": "validation"})
    assert ds.class_names == ["a", "b"] and ds.num_classes == 2 and loads == []
    image, label = ds[0]
    assert loads == ["validation"] and label == 1 and image.shape == (4, 4, 3)
