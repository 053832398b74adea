"""Datasets `fashion-mnist`, `imagefolder` and `hf`: images from files on disk or the Hugging Face
Hub, as (uint8 (H, W, 3) array, label) items.

`imagefolder` and `hf` centre-crop every image to a square and resize it to the cascade's largest
resolution with ADM's preprocessing (``square_resize``), images with transparency first composited
onto a fixed ``background`` (``to_rgb``); `fashion-mnist` pads its 28x28 images.
Each dataset has a ``benchmark`` attribute naming what the data is (e.g. "imagenet"), which
results use to find comparable published numbers.
"""

from __future__ import annotations

import functools
import gzip
import math
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageColor, UnidentifiedImageError

from cdmbench import hookimpl
from cdmbench.errors import CdmbenchError

SPLITS = ("train", "test")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_URL = "https://github.com/zalandoresearch/fashion-mnist"
FASHION_MNIST_FILES = {  # split -> (images, labels), each raw or with ".gz"
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
IDX_UBYTE = 0x08  # IDX type code of unsigned bytes
IDX_FIX = ("replace it with an intact copy (apt-get install --reinstall dataset-fashion-mnist, or "
           f"download it again from {FASHION_MNIST_URL})")

# Hub ids of known benchmarks (the ``benchmark`` published results are filed under).
HUB_BENCHMARKS = {"ILSVRC/imagenet-1k": "imagenet", "imagenet-1k": "imagenet",
                  "zalando-datasets/fashion_mnist": "fashion-mnist",
                  "fashion_mnist": "fashion-mnist"}


# ---------------------------------------------------------------------------- shared helpers

WHITE = (255, 255, 255)
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")  # PIL modes with an alpha channel


def background_colour(dataset: str, value: Any) -> tuple[int, int, int]:
    """``value`` (a colour name such as "white" or "#808080", or [R, G, B] of integers 0..255) as
    an RGB tuple; ValueError otherwise."""
    if isinstance(value, str):
        try:
            return ImageColor.getrgb(value)[:3]
        except ValueError:
            pass
    elif (isinstance(value, (list, tuple)) and len(value) == 3
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)):
        return tuple(int(v) for v in value)
    raise ValueError(f"{dataset}: background must be a colour name (white, black, \"#808080\", ...) or "
                     f"[R, G, B] with integers 0..255, got {value!r}")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """``image`` as RGB. One with transparency (an alpha channel: RGBA, LA, PA, ...; or a
    transparent colour or palette index: the ``transparency`` info) is composited onto
    ``background``, so what a transparent pixel hides is never seen and a half-transparent one
    is the alpha blend; others are converted as they are."""
    palette_alpha = image.mode == "P" and image.palette is not None and image.palette.mode.endswith("A")
    if not (image.mode in ALPHA_MODES or "transparency" in image.info or palette_alpha):
        return image if image.mode == "RGB" else image.convert("RGB")
    rgba = image.convert("RGBA")  # applies a transparent colour or palette index as alpha
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def square_resize(image: Image.Image, resolution: int, background: tuple[int, int, int] = WHITE) -> np.ndarray:
    """``image`` as RGB (``to_rgb``: transparency composited onto ``background``), centre-cropped
    to a square and resized to ``resolution``, uint8 (resolution, resolution, 3). As ADM: halve
    with a 2x2 box filter while the side is at least twice the target, then one bicubic resize."""
    image = to_rgb(image, background)
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    while image.width >= 2 * resolution:
        image = image.reduce(2)
    return np.asarray(image.resize((resolution, resolution), Image.Resampling.BICUBIC))


def _check_int(dataset: str, name: str, value: Any, least: int) -> None:
    """ValueError unless ``value`` is an integer >= ``least``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"{dataset}: {name} must be an integer >= {least}, got {value!r}")


def _check_split(dataset: str, split: str) -> None:
    """ValueError unless ``split`` is one of cdmbench's splits."""
    if split not in SPLITS:
        raise ValueError(f"{dataset}: split must be one of {', '.join(SPLITS)}, got {split!r}")


def _split_names(dataset: str, split_names: dict[str, str] | None) -> dict[str, str]:
    """The default mapping of cdmbench splits to the source's, updated by ``split_names``."""
    names = {s: s for s in SPLITS}
    for key, value in (split_names or {}).items():
        if key not in SPLITS or not isinstance(value, str):
            raise ValueError(f"{dataset}: split_names maps cdmbench splits ({', '.join(SPLITS)}) "
                             "to the source's split names, e.g. {test: validation}; got "
                             f"{key!r}: {value!r}")
        names[key] = value
    return names


# ---------------------------------------------------------------------------- fashion-mnist

def read_idx(path: Path, ndim: int) -> np.ndarray:
    """The uint8 array with ``ndim`` dimensions stored in IDX file ``path`` (raw or gzip)."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:  # bad, corrupt or truncated gzip stream
        raise CdmbenchError(f"{path} cannot be read ({exc}); {IDX_FIX}") from None
    magic = bytes((0, 0, IDX_UBYTE, ndim))
    header = 4 + 4 * ndim  # magic, then one big-endian uint32 per dimension
    if len(data) < header or data[:4] != magic:
        found = data[:4].hex() or "missing: the file is empty"
        raise CdmbenchError(f"{path} is not an IDX file of uint8 with {ndim} dimensions (magic "
                            f"number {found}, expected {magic.hex()}); {IDX_FIX}")
    shape = tuple(int(n) for n in np.frombuffer(data, ">u4", ndim, 4))
    if len(data) - header != math.prod(shape):
        raise CdmbenchError(
            f"{path} is truncated or corrupt: its header promises {'x'.join(map(str, shape))} = "
            f"{math.prod(shape)} bytes of data, the file holds {len(data) - header}; {IDX_FIX}")
    return np.frombuffer(data, np.uint8, math.prod(shape), header).reshape(shape)


def _find_idx(folder: Path, split: str) -> tuple[Path, Path]:
    """The split's image and label files in ``folder``, raw preferred over gzip."""
    found, missing = [], []
    for name in FASHION_MNIST_FILES[split]:
        candidates = [folder / name, folder / f"{name}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        found.append(path)
        if path is None:
            missing.append(f"{name}[.gz]")
    if missing:
        raise CdmbenchError(
            f"fashion-mnist: {folder} lacks {' and '.join(missing)} (the {split} split); install "
            f"them with `apt-get install dataset-fashion-mnist` (into {FASHION_MNIST_DIR}), or "
            f"download the IDX files from {FASHION_MNIST_URL} and set `path:` to their folder")
    return found[0], found[1]


class FashionMNIST:
    """28x28 grey images padded with black to ``pad_to`` and repeated into 3 channels."""

    num_classes = len(FASHION_MNIST_CLASSES)
    class_names = list(FASHION_MNIST_CLASSES)
    benchmark = "fashion-mnist"

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, pad_to: int):
        self.images, self.labels = images, labels
        margins = [pad_to - n for n in images.shape[1:]]
        self._pad = [(m // 2, m - m // 2) for m in margins]  # centred

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        grey = np.pad(self.images[index], self._pad)
        return np.repeat(grey[:, :, None], 3, axis=2), int(self.labels[index])


def fashion_mnist(*, split: str, resolution: int, path: str = FASHION_MNIST_DIR, pad_to: int = 32,
                  num_images: int | None = None) -> FashionMNIST:
    """Fashion-MNIST (60000 train, 10000 test) from its IDX files in ``path``; at most
    ``num_images`` of them (the first in the files)."""
    _check_split("fashion-mnist", split)
    _check_int("fashion-mnist", "pad_to", pad_to, 28)
    if num_images is not None:
        _check_int("fashion-mnist", "num_images", num_images, 1)
    if resolution > pad_to:
        raise ValueError(f"fashion-mnist: the images are {pad_to}x{pad_to} (pad_to) but the "
                         f"cascade's largest stage is {resolution}x{resolution}; set pad_to: "
                         f"{resolution} or lower the stage resolutions to at most {pad_to}")
    image_file, label_file = _find_idx(Path(path).expanduser(), split)
    images, labels = read_idx(image_file, 3), read_idx(label_file, 1)
    if len(images) != len(labels):
        raise CdmbenchError(f"fashion-mnist: {image_file} holds {len(images)} images but "
                            f"{label_file} {len(labels)} labels; replace them with a matching pair "
                            f"(apt-get install --reinstall dataset-fashion-mnist)")
    bad = np.flatnonzero(labels >= len(FASHION_MNIST_CLASSES))
    if bad.size:
        raise CdmbenchError(f"fashion-mnist: {label_file} holds label {labels[bad[0]]} (item "
                            f"{bad[0]}), but the classes are 0..{len(FASHION_MNIST_CLASSES) - 1}; "
                            f"{IDX_FIX}")
    if images.shape[1] > pad_to or images.shape[2] > pad_to:
        raise ValueError(f"fashion-mnist: pad_to ({pad_to}) is smaller than the images in "
                         f"{image_file} ({images.shape[1]}x{images.shape[2]}); set pad_to to at "
                         "least their size")
    return FashionMNIST(images[:num_images], labels[:num_images], pad_to=pad_to)


# ---------------------------------------------------------------------------- imagefolder

def _image_suffixes() -> set[str]:
    """File name extensions of the image formats PIL can open."""
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _subfolders(folder: Path) -> list[str]:
    """Sorted names of the visible subfolders of ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


class ImageFolder:
    """Image files read lazily, one per item, with ``square_resize`` (transparency composited onto
    ``background``). The files are listed on first use, so a run or evaluation that reads a
    prepared cache never walks the folder."""

    def __init__(self, folder: Path, *, class_names: list[str], resolution: int, benchmark: str,
                 background: tuple[int, int, int] = WHITE):
        self.folder = folder
        self.class_names, self.num_classes = class_names, len(class_names)
        self.resolution, self.benchmark, self.background = resolution, benchmark, background

    @functools.cached_property
    def items(self) -> tuple[list[Path], list[int]]:
        """The image files and their labels."""
        return _list_images(self.folder, self.class_names)

    def __len__(self) -> int:
        return len(self.items[0])

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        files, labels = self.items
        path = files[index]
        try:
            with Image.open(path) as image:
                return square_resize(image, self.resolution, self.background), labels[index]
        except (UnidentifiedImageError, OSError) as exc:
            raise CdmbenchError(f"imagefolder: cannot read image {path} ({exc}); replace or "
                                "delete the file") from None


def _split_folders(root: Path, names: dict[str, str], split: str) -> tuple[Path, Path]:
    """The train folder (its subfolders name the classes) and the folder of ``split``."""
    if not root.is_dir():
        raise CdmbenchError(f"imagefolder: no folder {root}; set `path:` to a folder with one "
                            "subfolder of images per class")
    split_layout = (root / names["train"]).is_dir()
    train_dir = root / names["train"] if split_layout else root
    folder = train_dir if split == "train" else root / names[split]
    if (not split_layout and split != "train") or not folder.is_dir():
        raise CdmbenchError(f"imagefolder: no {split} split: {folder} does not exist; make "
                            f"{root}/{names['train']}/<class>/ and {root}/{names[split]}/<class>/, "
                            f"or map {split} to an existing folder with split_names")
    return train_dir, folder


def _hidden(path: Path, top: Path) -> bool:
    """Whether ``path`` or a folder between it and ``top`` is hidden (its name starts with ".": e.g.
    macOS's "._x.png" resource forks, .thumbnails/)."""
    return any(part.startswith(".") for part in path.relative_to(top).parts)


def _list_images(folder: Path, class_names: list[str]) -> tuple[list[Path], list[int]]:
    """The visible image files under ``folder/<class>/`` (at any depth) and their labels."""
    suffixes = _image_suffixes()
    files, labels = [], []
    for label, name in enumerate(class_names):
        found = sorted(p for p in (folder / name).rglob("*")
                       if p.suffix.lower() in suffixes and not _hidden(p, folder / name))
        files += found
        labels += [label] * len(found)
    if not files:
        raise CdmbenchError(f"imagefolder: no image files under {folder}/<class>/ (PIL reads "
                            ".png, .jpg, .webp, ...); add images or point `path:` elsewhere")
    return files, labels


def imagefolder(*, path: str, split: str, resolution: int,
                split_names: dict[str, str] | None = None,
                benchmark: str | None = None, background: str | list[int] = "white") -> ImageFolder:
    """Images in one subfolder per class; class names are the sorted subfolder names.

    Layout: if ``path`` has a subfolder named ``split_names["train"]`` (default ``train``), each
    split is ``path/<split_names[split]>/<class>/...`` (e.g. ``split_names: {test: val}``);
    otherwise ``path/<class>/...`` is the train split and there is no test split. Classes come
    from the train folder; another split may lack some of them but not add any. Images are the
    files under each class folder (at any depth) that PIL can open; hidden files and folders
    (names starting with ".", e.g. macOS's "._x.png") are skipped. ``benchmark`` (default: the
    folder) names the data for comparisons with published results. Images with transparency
    (RGBA, LA, a PNG or GIF with a transparent colour) are composited onto ``background``: a
    colour name ("white", the default; "black", "#808080") or [R, G, B] with integers 0..255.
    """
    names = _split_names("imagefolder", split_names)
    fill = background_colour("imagefolder", background)
    _check_split("imagefolder", split)
    _check_int("imagefolder", "resolution", resolution, 1)
    root = Path(path).expanduser()
    train_dir, folder = _split_folders(root, names, split)
    class_names = _subfolders(train_dir)
    if not class_names:
        raise CdmbenchError(f"imagefolder: {train_dir} has no class subfolders; put the images "
                            f"in {root}/<class>/ or, with splits, {root}/{names['train']}/<class>/ "
                            f"and {root}/{names['test']}/<class>/")
    extra = set(_subfolders(folder)) - set(class_names)
    if extra:
        raise CdmbenchError(f"imagefolder: {folder} has class folders {sorted(extra)} that "
                            f"{train_dir} lacks; every class needs training images")
    return ImageFolder(folder, class_names=class_names, resolution=resolution,
                       benchmark=benchmark or str(root), background=fill)


# ---------------------------------------------------------------------------- hf

class HFDataset:
    """A Hugging Face ``datasets.Dataset`` with an image and an integer label column, decoded
    lazily, one row per item, with ``square_resize`` (transparency composited onto
    ``background``)."""

    def __init__(self, data: Any | Callable[[], Any], *, image_column: str, label_column: str,
                 class_names: list[str], resolution: int, benchmark: str,
                 background: tuple[int, int, int] = WHITE):
        self._data = data  # or a function that loads it: Hub data is fetched on first use only
        self.image_column, self.label_column = image_column, label_column
        self.class_names, self.num_classes = class_names, len(class_names)
        self.resolution, self.benchmark, self.background = resolution, benchmark, background

    @functools.cached_property
    def data(self) -> Any:
        """The image and label columns, selected once; Hub data is loaded here, on first use."""
        if callable(self._data):
            self._data = self._data()
        return self._data.select_columns([self.image_column, self.label_column])

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        row = self.data[index]
        label = int(row[self.label_column])
        if label < 0:  # e.g. ImageNet's test split, published without labels
            raise CdmbenchError(f"hf: row {index} has no label ({self.label_column} = {label}); "
                                "use a labelled split, e.g. split_names: {test: validation}")
        return square_resize(row[self.image_column], self.resolution, self.background), label


def _hub_error(path: str, exc: Exception) -> CdmbenchError:
    """What to do when ``datasets`` cannot load ``path``."""
    from datasets.exceptions import DatasetNotFoundError

    if isinstance(exc, ConnectionError):
        fix = ("the Hub is unreachable or offline mode is on (HF_DATASETS_OFFLINE=1 or "
               "HF_HUB_OFFLINE=1) and the dataset is not in the cache (cache_dir, or HF_HOME): "
               "run once with network access and offline mode off to fill the cache, or on a "
               f"machine with network run `datasets.load_dataset({path!r}).save_to_disk(DIR)`, "
               "copy DIR here and set `path: DIR`")
    elif isinstance(exc, DatasetNotFoundError):
        fix = (f"check the id on https://huggingface.co/datasets/{path}; if the dataset is gated "
               "(ImageNet is), accept its terms there and log in with `hf auth login` "
               "(`huggingface-cli login` in older versions) or set HF_TOKEN; or set `path:` to a "
               "local copy written by `save_to_disk`")
    else:
        fix = ("set `path:` to a folder written by `save_to_disk`, a folder of data files "
               "(parquet, ...), or a Hub id such as ILSVRC/imagenet-1k")
    return CdmbenchError(f"hf: cannot load {path!r} ({exc}); {fix}")


def _load_split(path: str, name: str, cache_dir: str | None) -> Any:
    """Split ``name`` of ``path``: a ``save_to_disk`` folder, a folder of data files, or a Hub id.
    A saved ``Dataset`` (not a ``DatasetDict``) is the "train" split."""
    import datasets

    local = Path(path).expanduser()
    if local.is_dir():
        try:
            saved = datasets.load_from_disk(str(local))
        except FileNotFoundError:  # not a save_to_disk folder: data files, read below
            pass
        else:
            if isinstance(saved, datasets.Dataset):
                saved = datasets.DatasetDict(train=saved)
            if name not in saved:
                raise ValueError(f"hf: {local} has splits {sorted(saved)}, not {name!r}; map "
                                 "cdmbench's splits to them with split_names, e.g. "
                                 "{test: validation}")
            return saved[name]
    try:
        return datasets.load_dataset(str(local) if local.is_dir() else path, split=name,
                                     cache_dir=cache_dir)
    except (ConnectionError, FileNotFoundError) as exc:
        raise _hub_error(path, exc) from None
    except ValueError as exc:  # an unknown split name
        raise ValueError(f"hf: {path}: {exc}; if the split is unknown, map cdmbench's splits "
                         "to the dataset's with split_names, e.g. {test: validation}") from None


def _class_names(data: Any, label_column: str) -> list[str]:
    """The label feature's names for a ClassLabel, else "0".."K-1" for K = the largest label + 1."""
    import datasets

    feature = data.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if not (isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))):
        raise ValueError(f"hf: label_column {label_column!r} holds {feature}, not integer class "
                         "labels; name an integer or ClassLabel column")
    return [str(k) for k in range(max(data[label_column], default=-1) + 1)]


def hf(*, path: str, split: str, resolution: int, image_column: str = "image",
       label_column: str = "label", split_names: dict[str, str] | None = None,
       cache_dir: str | None = None, benchmark: str | None = None,
       background: str | list[int] = "white") -> HFDataset:
    """A Hugging Face dataset: ``path`` is a Hub id (e.g. ILSVRC/imagenet-1k), a folder written by
    ``save_to_disk``, or a folder of data files. ``split_names`` maps cdmbench's splits to the
    dataset's (default train -> train, test -> test; ImageNet: ``{test: validation}``).
    ``benchmark`` (default: known for a few Hub ids, else ``path``) names the data for
    comparisons with published results. Images with transparency are composited onto
    ``background`` (as ``imagefolder``: a colour name, default "white", or [R, G, B])."""
    import datasets

    names = _split_names("hf", split_names)
    fill = background_colour("hf", background)
    _check_split("hf", split)
    _check_int("hf", "resolution", resolution, 1)
    features = None if Path(path).expanduser().is_dir() else _hub_features(path, cache_dir)
    if features is not None:  # a Hub id: metadata now (validate, --dry-run), images on first use
        _check_columns(path, features, image_column, label_column)
        label = features[label_column]
        if isinstance(label, datasets.ClassLabel):
            return HFDataset(lambda: _load_split(path, names[split], cache_dir), image_column=image_column,
                             label_column=label_column, class_names=list(label.names),
                             resolution=resolution, benchmark=benchmark or HUB_BENCHMARKS.get(path, path),
                             background=fill)
    data = _load_split(path, names[split], cache_dir)
    _check_columns(path, data.features, image_column, label_column)
    return HFDataset(data, image_column=image_column, label_column=label_column,
                     class_names=_class_names(data, label_column), resolution=resolution,
                     benchmark=benchmark or HUB_BENCHMARKS.get(path, path), background=fill)


def _hub_features(path: str, cache_dir: str | None) -> Any:
    """The features a Hub dataset declares (no data download), or None if it declares none."""
    import datasets

    try:
        return datasets.load_dataset_builder(path, cache_dir=cache_dir).info.features
    except (ConnectionError, FileNotFoundError) as exc:
        raise _hub_error(path, exc) from None


def _check_columns(path: str, features: Any, image_column: str, label_column: str) -> None:
    import datasets


    for column in (image_column, label_column):
        if column not in features:
            raise ValueError(f"hf: {path} has no column {column!r}; its columns are "
                             f"{list(features)}: set image_column and label_column")
    if not isinstance(features[image_column], datasets.Image):
        raise ValueError(f"hf: image_column {image_column!r} holds {features[image_column]}, "
                         "not images; name a column of the datasets.Image feature type")


@hookimpl
def cdmbench_register_datasets(register):
    register("fashion-mnist", fashion_mnist,
             summary="Fashion-MNIST from its IDX files (apt-get install dataset-fashion-mnist); "
                     "28x28 padded to 32x32")
    register("imagefolder", imagefolder,
             summary="a folder of images, one subfolder per class (optional train/test level); "
                     "transparency composited onto `background` (default white)")
    register("hf", hf, summary="Hugging Face datasets: Hub id (e.g. ILSVRC/imagenet-1k) or a "
                               "save_to_disk folder")
