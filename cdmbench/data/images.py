"""Datasets -> uint8 image tensors at every resolution a cascade needs.

Each source image is centre-cropped to a square and area-downsampled to each resolution (ADM's
preprocessing), so a stage's targets and its low-res inputs come from the same image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cdmbench.errors import CdmbenchError
from cdmbench.interfaces import Dataset
from cdmbench.runtime.progress import bar


@dataclass
class ImageSet:
    """images[r]: uint8 (N, 3, r, r) for every resolution r; labels: int64 (N,)."""

    images: dict[int, Tensor]
    labels: Tensor
    num_classes: int
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def area_resize(images: Tensor, resolution: int) -> Tensor:
    """Centre-crop uint8 (N, 3, H, W) to a square and area-resize to ``resolution``."""
    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    images = images[..., top:top + side, left:left + side]
    if side == resolution:
        return images
    out = F.interpolate(images.float(), size=(resolution, resolution), mode="area")
    return out.round().clamp(0, 255).to(torch.uint8)


def resize_items(dataset: Dataset, indices: range, resolutions: list[int]) -> tuple[dict[int, Tensor], list[int]]:
    """Items ``indices`` of ``dataset`` as uint8 (n, 3, r, r) for every resolution r, and their
    labels."""
    top = max(resolutions)
    batch, labels = [], []
    for i in indices:
        image, label = dataset[i]
        image = np.array(image)  # a writable copy (PIL's arrays are read-only)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise CdmbenchError(f"dataset item {i} is {image.dtype} {image.shape}; datasets "
                                "must yield uint8 (H, W, 3) arrays")
        batch.append(area_resize(torch.from_numpy(image).permute(2, 0, 1)[None], top))
        labels.append(int(label))
    batch_t = torch.cat(batch)
    return {r: area_resize(batch_t, r) for r in resolutions}, labels


def load_images(dataset: Dataset, resolutions: list[int], *, limit: int | None = None,
                progress: bool = True, chunk: int = 256) -> ImageSet:
    """Read every image of ``dataset`` (or the first ``limit``) into memory at each resolution."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise CdmbenchError("the dataset is empty")
    out: dict[int, list[Tensor]] = {r: [] for r in resolutions}
    labels: list[int] = []
    for lo in bar(range(0, n, chunk), desc="load data", unit="img", unit_scale=chunk, progress=progress):
        images, batch_labels = resize_items(dataset, range(lo, min(lo + chunk, n)), resolutions)
        for r in resolutions:
            out[r].append(images[r])
        labels += batch_labels
    return ImageSet({r: torch.cat(v) for r, v in out.items()}, torch.tensor(labels),
                    dataset.num_classes, list(dataset.class_names))


def to_device(x: Tensor, device: torch.device | str) -> Tensor:
    """``x`` on ``device``; to a GPU from pinned memory without waiting, so that the host
    prepares the next batch while the GPU computes."""
    if torch.device(device).type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def to_float(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(images: Tensor) -> Tensor:
    """float [-1, 1] -> uint8 [0, 255]. NaN or infinite values (a diverged model, an overflow in
    low precision) are an error: they would pass as black or white pixels."""
    bad = int((~torch.isfinite(images)).reshape(len(images), -1).any(1).sum())
    if bad:
        raise CdmbenchError(f"{bad} of {len(images)} sampled images hold NaN or infinite values; the "
                            "weights may have diverged (see train_log.jsonl), or try sample.precision=fp32")
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
