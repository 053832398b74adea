"""ADM's reference batches: the npz files guided-diffusion's evaluations/README publishes
(``VIRTUAL_imagenet64_labeled.npz``, ...), found on this machine, checked and identified.

A batch holds ``arr_0`` (uint8 (N, H, W, 3) images, N = 10,000: precision and recall's
reference) and the Inception statistics of the whole ImageNet training set that ADM's
evaluator computed with the TensorFlow graph: ``mu``, ``sigma`` (pool_3, 2048-d) and ``mu_s``,
``sigma_s`` (the first 7 channels of mixed_6/conv, 7 x 17 x 17 = 2023-d). Nothing downloads: a
missing file is an error naming its URL and where to put it. The layout is checked from the npz
headers, so ``open_reference_batch`` reads no image; its SHA-256 is remembered per (path, size,
modification time) in the cache, so a 2 GB batch is hashed once.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cdmbench.errors import CdmbenchError
from cdmbench.storage.cache import digest
from cdmbench.storage.files import atomic_write
from cdmbench.training.checkpoint import sha256_file

ENV = "CDMBENCH_REFERENCE_BATCHES"  # a folder holding the batches
URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/{res}/{name}"
KNOWN = {f"VIRTUAL_imagenet{r}{'_labeled' if r < 512 else ''}.npz": r for r in (64, 128, 256, 512)}
STATISTICS = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}


def download_url(name: str) -> str | None:
    """Where guided-diffusion publishes the batch ``name`` (None for a name it does not list)."""
    return URL.format(res=KNOWN[name], name=name) if name in KNOWN else None


def candidates(batch: str, cache_dir: Path) -> list[Path]:
    """Where ``batch`` is looked for: a path (it has a folder part) is itself; a bare file name is
    looked for in $CDMBENCH_REFERENCE_BATCHES, then in ``<cache>/reference_batches/``."""
    if os.sep in batch or batch.startswith("~"):
        return [Path(batch).expanduser()]
    env = os.environ.get(ENV)
    return ([Path(env).expanduser() / batch] if env else []) + [cache_dir / "reference_batches" / batch]


def locate(batch: str, cache_dir: Path) -> Path:
    """The file of ``batch``, or a CdmbenchError saying where to get it and where to put it."""
    places = candidates(batch, cache_dir)
    for place in places:
        if place.is_file():
            return place
    name = Path(batch).name
    url = download_url(name)
    get = f"Download {url}" if url else f"Get {name} (guided-diffusion's evaluations/README lists the batches)"
    raise CdmbenchError(
        f"the reference batch {name} is not on this machine (looked in: {', '.join(map(str, places))}). {get} "
        f"and put it at {places[-1]}, or in the folder ${ENV}, or give its path as the metric's "
        "reference_batch. Nothing is downloaded at run time.")


def _headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each array of the npz ``path``, read from the headers only."""
    with zipfile.ZipFile(path) as archive:
        out = {}
        for member in archive.namelist():
            if not member.endswith(".npy"):
                continue
            with archive.open(member) as fh:
                read = {(1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0}.get(np.lib.format.read_magic(fh))
                if read is None:
                    raise ValueError(f"{member} has an npy format version numpy cannot read")
                shape, _, dtype = read(fh)
            out[member.removesuffix(".npy")] = (tuple(shape), dtype)
        return out


@dataclass(frozen=True)
class ReferenceBatch:
    """A checked ADM reference batch: its file, SHA-256, number and side of images, and the
    dimensions of its pool and spatial statistics."""

    path: Path
    sha256: str
    num_images: int
    resolution: int
    dims: dict[str, int]  # "pool" -> 2048, "spatial" -> 2023

    @property
    def name(self) -> str:
        return self.path.name

    def statistics(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma), float64, of ``kind`` "pool" or "spatial", as ADM's evaluator computed them."""
        mu, sigma = STATISTICS[kind]
        with np.load(self.path) as data:
            return data[mu].astype(np.float64), data[sigma].astype(np.float64)

    def images(self) -> Tensor:
        """``arr_0`` as uint8 (N, 3, H, W) (a view of the NHWC array, read whole: 2 GB at 256x256)."""
        with np.load(self.path) as data:
            return torch.from_numpy(data["arr_0"]).permute(0, 3, 1, 2)


def check_layout(path: Path) -> tuple[int, int, dict[str, int]]:
    """(N, resolution, {kind: dims}) of an ADM-layout npz, or a CdmbenchError naming what is wrong."""
    try:
        arrays = _headers(path)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CdmbenchError(f"{path} is not a readable npz file ({exc}); download it again") from None
    missing = [key for key in ("arr_0", *STATISTICS["pool"], *STATISTICS["spatial"]) if key not in arrays]
    if missing:
        raise CdmbenchError(f"{path} lacks {', '.join(missing)}: an ADM reference batch holds arr_0, mu, sigma, "
                            "mu_s and sigma_s (guided-diffusion's evaluations/README)")
    shape, dtype = arrays["arr_0"]
    if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2] or dtype != np.uint8:
        raise CdmbenchError(f"{path}: arr_0 is {dtype} {shape}; an ADM reference batch holds uint8 square RGB "
                            "images (N, H, H, 3)")
    dims = {}
    for kind, (mu, sigma) in STATISTICS.items():
        d = arrays[mu][0]
        if len(d) != 1 or arrays[sigma][0] != (*d, *d):
            raise CdmbenchError(f"{path}: {mu} {arrays[mu][0]} and {sigma} {arrays[sigma][0]} are not a (D,) mean "
                                "and its (D, D) covariance")
        dims[kind] = d[0]
    return shape[0], shape[1], dims


def file_sha256(path: Path, cache_dir: Path) -> str:
    """The SHA-256 of ``path``, remembered in the cache per (resolved path, size, mtime)."""
    stat = path.stat()
    key = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo = cache_dir / "file_sha256" / f"{digest(key)}.json"
    try:
        return json.loads(memo.read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        value = sha256_file(path)
        atomic_write(memo, json.dumps({**key, "sha256": value}))
        return value


def open_reference_batch(batch: str, cache_dir: Path) -> ReferenceBatch:
    """Find (``locate``), check (``check_layout``) and identify the reference batch ``batch``."""
    path = locate(batch, cache_dir)
    num_images, resolution, dims = check_layout(path)
    return ReferenceBatch(path, file_sha256(path, cache_dir), num_images, resolution, dims)
