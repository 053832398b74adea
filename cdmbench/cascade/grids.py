"""Sample grids: one row per class, labelled with the class name (DejaVu Sans, matplotlib's font:
Latin, Greek and Cyrillic letters in any script's class names)."""

from __future__ import annotations

import functools
import io
import textwrap
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from cdmbench.data.images import to_uint8
from cdmbench.storage.files import atomic_write

MIN_TILE = 64  # small images are enlarged (nearest) to at least this many pixels a side
LABEL_WIDTH = 96
LABEL_FONT_SIZE = 9  # DejaVu Sans at 9 px is no wider than PIL's default font at 10: labels fit as before


@functools.cache
def label_font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans, shipped with matplotlib (imported here, not when the command line starts);
    PIL's default font, with a warning, where it cannot be loaded (its letters are ASCII only:
    others draw as boxes)."""
    try:
        import matplotlib
        from matplotlib import font_manager

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        if not path.is_file():  # a matplotlib packaged without its fonts: a system copy
            path = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"),
                                         fallback_to_default=False)
        return ImageFont.truetype(str(path), LABEL_FONT_SIZE)
    except (ImportError, OSError, ValueError) as exc:
        warnings.warn(f"sample grids: no DejaVu Sans font ({exc}); class names are drawn with PIL's default "
                      "font, in which letters beyond ASCII show as boxes", stacklevel=2)
        return ImageFont.load_default()


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
        lines = textwrap.wrap(class_names[c], 15)[:4]  # the font is ~5-6 px per character
        draw.multiline_text((4, y + tile // 2 - 6 * len(lines)), "\n".join(lines), fill="black",
                            font=label_font())
        for col, i in enumerate(torch.nonzero(labels == c).flatten().tolist()):
            img = Image.fromarray(pixels[i]).resize((tile, tile), Image.NEAREST)
            grid.paste(img, (LABEL_WIDTH + col * (tile + pad), y))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    atomic_write(path, buffer.getvalue())
    return path
