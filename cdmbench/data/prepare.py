"""`cdmbench prepare`: a dataset split preprocessed once into memory-mapped uint8 arrays.

Every image is centre-cropped and area-downsampled to each resolution of the cascade exactly as
``data.load_images`` does, and stored on disk under

    <data cache>/<digest>/          digest of (data name and args, split, resolutions)
        images-<r>.npy              uint8 (N, 3, r, r), one file per resolution r
        labels.npy                  int64 (N,)
        layout.json                 N, resolutions, shard size: the arrays' shape
        done/<k>                    shard k (images kS .. (k+1)S - 1) is written
        manifest.json               written last: the cache is complete

The data cache is ``$CDMBENCH_DATA_CACHE``, else ``<cdmbench cache>/datasets``. Worker processes
fill the shards (each builds its own dataset from the recipe); a shard is marked done only
after its rows are flushed to disk, so an interrupted prepare resumes at the shards not done.
Training and evaluation (``split_images``) map the arrays read-only (``files.mapped_tensor``) and read
only the rows of each batch, so a dataset larger than memory is used from disk through the page
cache.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from cdmbench.data.images import ImageSet, load_images, resize_items
from cdmbench.errors import CdmbenchError
from cdmbench.interfaces import Dataset
from cdmbench.plugins import Plugins, load_plugins
from cdmbench.recipe.components import make_component
from cdmbench.recipe.load import load_recipe
from cdmbench.recipe.schema import Component, Recipe
from cdmbench.runtime.progress import bar
from cdmbench.storage.cache import default_cache_dir, digest
from cdmbench.storage.files import allocate_arrays, atomic_write, check_free_space, done_marker, mapped_tensor

FORMAT = 1
MANIFEST = "manifest.json"
LAYOUT = "layout.json"
CHUNK = 64  # images resized at once inside a shard (bounds a worker's memory)
FREE_SPACE = "free space or set CDMBENCH_DATA_CACHE to a folder on a larger disk"
MEMORY_SHARE = 0.5  # data not prepared is read into memory only if it takes at most this share


def make_dataset(plugins: Plugins, recipe: Recipe, split: str) -> Dataset:
    """The recipe's dataset for ``split``, its images at the cascade's largest resolution. When
    the split is prepared, its manifest stands in (``PreparedDataset``): the dataset itself (a
    Hub dataset asks the Hub, on every rank) is built only if an image is read from it."""

    def build() -> Dataset:
        return make_component(plugins, "datasets", recipe.data, "data", split=split,
                              resolution=max(resolutions(recipe)))

    manifest = cache_folder(recipe, split) / MANIFEST
    return PreparedDataset(json.loads(manifest.read_text()), build) if manifest.exists() else build()


class PreparedDataset:
    """A prepared split's length, classes and benchmark name, from its manifest; items come from
    the dataset itself, built on first use."""

    def __init__(self, manifest: dict[str, Any], build: Callable[[], Dataset]):
        self.num_classes, self.class_names = manifest["num_classes"], manifest["class_names"]
        self.benchmark = manifest.get("benchmark", manifest["data"]["name"])
        self._length, self._build = manifest["num_images"], build

    @functools.cached_property
    def _dataset(self) -> Dataset:
        return self._build()

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self._dataset[index]


def resolutions(recipe: Recipe) -> list[int]:
    return sorted({s.resolution for s in recipe.stages})


def data_cache_root() -> Path:
    """``$CDMBENCH_DATA_CACHE``, else ``<cdmbench cache>/datasets``."""
    return Path(os.environ.get("CDMBENCH_DATA_CACHE") or default_cache_dir() / "datasets")


def _resolved(value: Any) -> Any:
    """A string naming an existing file or folder as its absolute path, anything else as is."""
    if isinstance(value, str) and value and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def cache_folder(recipe: Recipe, split: str) -> Path:
    """Where ``split`` of the recipe's data is prepared for the recipe's resolutions. Data args
    that name local paths enter the key resolved, so ``data/x`` run from the project folder and
    its absolute path share one cache, and the same relative path elsewhere does not."""
    args = {k: _resolved(v) for k, v in recipe.data.args.items()}
    key = {"format": FORMAT, "data": {"name": recipe.data.name, "args": args},
           "split": split, "resolutions": resolutions(recipe)}
    return data_cache_root() / digest(key)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1))


class _Shards:
    """Writes shards of one prepare into its arrays (in the main process or a worker)."""

    def __init__(self, *, folder: Path, plugin_modules: list[str], data: Component, split: str,
                 resolutions: list[int], shard_size: int, num_images: int):
        self.folder, self.plugin_modules, self.data, self.split = folder, plugin_modules, data, split
        self.resolutions, self.shard_size, self.num_images = resolutions, shard_size, num_images
        self.dataset: Dataset | None = None  # built on first use, in the process that writes

    def write(self, shard: int) -> int:
        """Resize shard ``shard``'s images into the arrays, flush, mark it done; returns its size."""
        if self.dataset is None:
            self.dataset = make_component(load_plugins(self.plugin_modules), "datasets", self.data,
                                          "data", split=self.split, resolution=max(self.resolutions))
        lo, hi = shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_images)
        arrays = {r: np.load(self.folder / f"images-{r}.npy", mmap_mode="r+") for r in self.resolutions}
        labels = np.load(self.folder / "labels.npy", mmap_mode="r+")
        for a in range(lo, hi, CHUNK):
            b = min(a + CHUNK, hi)
            try:
                images, chunk_labels = resize_items(self.dataset, range(a, b), self.resolutions)
            except CdmbenchError as exc:  # a plain CdmbenchError crosses processes intact
                raise CdmbenchError(f"images {lo}..{hi - 1}: {exc}") from None
            for r in self.resolutions:
                arrays[r][a:b] = images[r].numpy()
            labels[a:b] = chunk_labels
        for array in [*arrays.values(), labels]:
            array.flush()
        done_marker(self.folder, shard).touch()
        return hi - lo


_worker_shards: _Shards | None = None


def _init_worker(shards: _Shards) -> None:
    global _worker_shards
    _worker_shards = shards
    torch.set_num_threads(1)  # one process per core


def _write_in_worker(shard: int) -> int:
    return _worker_shards.write(shard)


def _write_in_pool(shards: _Shards, todo: list[int], workers: int, shown: tqdm) -> None:
    """Write shards ``todo`` in ``workers`` processes; a worker that dies (OOM killer, SIGBUS)
    raises BrokenProcessPool, where a multiprocessing Pool would wait for its shard forever."""
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context(), _init_worker, (shards,))
    try:
        for future in as_completed([pool.submit(_write_in_worker, k) for k in todo]):
            shown.update(future.result())
    finally:
        pool.shutdown(cancel_futures=True)  # after a failure, no further shard starts


def _allocate(folder: Path, layout: dict[str, Any]) -> None:
    """Create the arrays for ``layout`` (sparse files) unless a prepare with it was started."""
    path = folder / LAYOUT
    if path.exists():
        old = json.loads(path.read_text())
        if old != layout:
            raise CdmbenchError(
                f"{folder} holds an unfinished prepare of {old['num_images']} images in shards of "
                f"{old['shard_size']}; now there are {layout['num_images']} images in shards of "
                f"{layout['shard_size']}: pass --shard-size {old['shard_size']} if only that "
                "changed, else delete the folder and prepare again")
        return
    n = layout["num_images"]
    arrays = {f"images-{r}.npy": (np.uint8, (n, 3, r, r)) for r in layout["resolutions"]}
    allocate_arrays(folder, {**arrays, "labels.npy": (np.int64, (n,))}, FREE_SPACE)
    (folder / "done").mkdir(exist_ok=True)
    _write_json(path, layout)


def prepare(recipe_path: str | Path, *, overrides: tuple[str, ...] | list[str] = (),
            split: str = "train", workers: int | None = None, shard_size: int = 1000,
            progress: bool = True, smoke: bool = False, echo=print) -> Path:
    """Preprocess ``split`` of the recipe's data to every resolution of its cascade into the data
    cache, with ``workers`` processes (default: one per CPU this process may use; 0: in this
    process). Resumes an interrupted prepare; returns the cache folder."""
    if shard_size < 1 or (workers is not None and workers < 0):
        raise CdmbenchError(f"shard size must be >= 1 and workers >= 0, got {shard_size} and {workers}")
    recipe, plugins = load_recipe(recipe_path, overrides=overrides, smoke=smoke, echo=echo)
    folder = cache_folder(recipe, split)
    if (folder / MANIFEST).exists():
        echo(f"already prepared: {folder}")
        return folder
    dataset = make_dataset(plugins, recipe, split)
    n = len(dataset)
    if n == 0:
        raise CdmbenchError(f"the {split} split of data '{recipe.data.name}' is empty")
    layout = {"format": FORMAT, "num_images": n, "resolutions": resolutions(recipe),
              "shard_size": shard_size}
    _allocate(folder, layout)
    shards = _Shards(folder=folder, plugin_modules=recipe.plugins, data=recipe.data, split=split,
                     resolutions=layout["resolutions"], shard_size=shard_size, num_images=n)
    todo = [k for k in range(math.ceil(n / shard_size)) if not done_marker(folder, k).exists()]
    workers = min(len(os.sched_getaffinity(0)) if workers is None else workers, len(todo))  # the CPUs a job may use
    left = sum(min(shard_size, n - k * shard_size) for k in todo)
    check_free_space(folder, left * sum(3 * r * r for r in layout["resolutions"]), FREE_SPACE)  # on a resume too
    echo(f"prepare {recipe.data.name} ({split}, {n} images) at {layout['resolutions']} px into "
         f"{folder}: {len(todo)} shards to write, {workers or 'no'} worker processes")
    shown = bar(total=n, initial=n - left, unit="img", desc="prepare", progress=progress)
    try:
        if workers == 0:
            shards.dataset = dataset
            for k in todo:
                shown.update(shards.write(k))
        else:
            _write_in_pool(shards, todo, workers, shown)
    except (CdmbenchError, BrokenProcessPool) as exc:
        reason = ("a preprocessing worker process died (out of memory or disk space?)"
                  if isinstance(exc, BrokenProcessPool) else exc)
        written = sum(1 for _ in (folder / "done").iterdir())
        raise CdmbenchError(f"prepare stopped: {reason}. {written} shards are written in {folder} "
                            "and kept; fix the problem and run the same command to resume") from None
    finally:
        shown.close()
    _write_json(folder / MANIFEST, {
        **layout, "data": {"name": recipe.data.name, "args": recipe.data.args}, "split": split,
        "num_classes": dataset.num_classes, "class_names": list(dataset.class_names),
        "benchmark": getattr(dataset, "benchmark", recipe.data.name),
        "arrays": {f"images-{r}.npy": f"uint8 ({n}, 3, {r}, {r})" for r in layout["resolutions"]}
        | {"labels.npy": f"int64 ({n},)"}})
    echo(f"prepared: {folder} (cdmbench run and evaluate use it for this data and these resolutions)")
    return folder


def load_prepared(folder: Path) -> ImageSet:
    """The prepared images of ``folder`` as an ImageSet whose image tensors map the files: only
    the rows a batch indexes are read."""
    manifest = json.loads((folder / MANIFEST).read_text())
    images = {r: mapped_tensor(folder / f"images-{r}.npy") for r in manifest["resolutions"]}
    labels = torch.from_numpy(np.load(folder / "labels.npy"))
    return ImageSet(images, labels, manifest["num_classes"], manifest["class_names"])


_said: set[tuple[Path, str]] = set()  # (cache folder, message): each is said once per process


def split_images(recipe: Recipe, dataset: Dataset, split: str, needed: list[int] | None = None, *,
                 limit: int | None = None, progress: bool = True, echo=print) -> ImageSet:
    """``split`` of the recipe's data (``dataset``) at the resolutions ``needed`` (default: the
    cascade's), its first ``limit`` images or all: the prepared arrays, memory-mapped, when
    ``cdmbench prepare --split SPLIT`` wrote them at these resolutions, else read into memory."""
    needed = needed or resolutions(recipe)
    folder = cache_folder(recipe, split)

    def say(message: str) -> None:
        if (folder, message) not in _said:
            _said.add((folder, message))
            echo(message)

    if (folder / MANIFEST).exists():
        data = load_prepared(folder)
        missing = sorted(set(needed) - set(data.images))
        if not missing:
            if data.class_names != list(dataset.class_names):
                raise CdmbenchError(f"the prepared data in {folder} has other class names than the "
                                    f"dataset ({data.num_classes} classes, now {dataset.num_classes}): "
                                    "the data changed since it was prepared; delete the folder and "
                                    "run cdmbench prepare again")
            say(f"{split} data: {len(data)} prepared images, memory-mapped from {folder}")
            return ImageSet({r: data.images[r][:limit] for r in needed}, data.labels[:limit],
                            data.num_classes, data.class_names)
        say(f"{split} data at {missing} px: not a resolution of the cascade, so not prepared; "
            "reading every image into memory")
    command = "cdmbench prepare RECIPE" + ("" if split == "train" else f" --split {split}")
    if not (folder / MANIFEST).exists():
        unfinished = f" (an unfinished one is in {folder})" if folder.exists() else ""
        say(f"{split} data: reading every image into memory; for a large dataset run `{command}` "
            f"once{unfinished} to preprocess it to disk")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    size = n * sum(3 * r * r for r in needed)
    processes, available = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), _available_memory()
    if available is not None and size * processes > available * MEMORY_SHARE:
        raise CdmbenchError(f"{split} data: {n} images at {needed} px take {size / 2**30:.1f} GiB in memory in "
                            f"each of {processes} process(es) on this node, more than the "
                            f"{available / 2**30:.1f} GiB available; run `{command}` once (at the "
                            "cascade's resolutions) so that they are read from disk")
    return load_images(dataset, needed, limit=limit, progress=progress)


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
