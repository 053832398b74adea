"""Sample grids: one row per class, labelled with the class name."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from cdmbench.data.images import to_uint8
from cdmbench.storage.files import atomic_write

MIN_TILE = 64  # small images are enlarged (nearest) to at least this many pixels a side
LABEL_WIDTH = 96


def save_grid(images: Tensor, labels: Tensor, class_names: list[str], path: Path) -> Path:
    """Write images (N, 3, r, r) in [-1, 1] as a grid, rows = classes in label order."""
    r = images.shape[-1]
    scale = max(1, -(-MIN_TILE // r))
    tile = r * scale
    classes = sorted(set(labels.tolist()))
    per_row = max(int((labels == c).sum()) for c in classes)
    pad = 2
    grid = Image.new("RGB", (LABEL_WIDTH + per_row * (tile + pad), len(classes) * (tile + pad)), "white")
    draw = ImageDraw.Draw(grid)
    pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()
    for row, c in enumerate(classes):
        y = row * (tile + pad)
        lines = textwrap.wrap(class_names[c], 15)[:4]  # the default font is ~6 px per character
        draw.multiline_text((4, y + tile // 2 - 6 * len(lines)), "\n".join(lines), fill="black")
        for col, i in enumerate(torch.nonzero(labels == c).flatten().tolist()):
            img = Image.fromarray(pixels[i]).resize((tile, tile), Image.NEAREST)
            grid.paste(img, (LABEL_WIDTH + col * (tile + pad), y))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    atomic_write(path, buffer.getvalue())
    return path
