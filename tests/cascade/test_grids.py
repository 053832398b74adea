"""Sample grids: rows per class, labelled in a font with Latin, Greek and Cyrillic letters."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from cdmbench.cascade.grids import LABEL_WIDTH, label_font, save_grid

MISSING = "\U0010fffd"  # a private-use code point no font draws: the missing-glyph box (.notdef)


def bitmap(font, text: str) -> np.ndarray:
    """``text`` drawn in ``font``, black on white, cropped to its ink."""
    image = Image.new("L", (200, 40), 255)
    ImageDraw.Draw(image).text((5, 5), text, font=font, fill=0)
    ink = np.asarray(image) < 128
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


@pytest.fixture
def fresh_font():
    label_font.cache_clear()
    yield
    label_font.cache_clear()


@pytest.mark.parametrize("letter", ["É", "ü", "ß", "Ω", "λ", "Ж", "д"])
def test_the_label_font_draws_latin_greek_and_cyrillic_letters(letter):
    font = label_font()
    box = bitmap(font, MISSING)
    assert np.array_equal(bitmap(font, "\U0010fffe"), box)  # the reference is the box indeed
    assert not np.array_equal(bitmap(font, letter), box), f"{letter!r} draws as the missing-glyph box"


def test_pils_default_font_draws_boxes_for_the_same_letters():
    """What the grids used before, and the fallback: É is the missing-glyph box there (the check
    above tells a font without these letters apart)."""
    default = ImageFont.load_default()
    assert np.array_equal(bitmap(default, "É"), bitmap(default, MISSING))


def grid(tmp_path, names: list[str]) -> np.ndarray:
    images = torch.zeros(4, 3, 8, 8)  # mid grey
    labels = torch.tensor([0, 0, 1, 1])
    return np.asarray(Image.open(save_grid(images, labels, names, tmp_path / f"{len(list(tmp_path.iterdir()))}.png")))


def test_a_grid_labels_its_rows_in_any_script_with_the_same_layout(tmp_path):
    named = grid(tmp_path, ["Éü Ωλ", "Жд"])
    boxes = grid(tmp_path, [MISSING * 5, MISSING * 2])
    tile, pad = 64, 2  # 8 px enlarged to 64
    assert named.shape == boxes.shape == (2 * (tile + pad), LABEL_WIDTH + 2 * (tile + pad), 3)
    labels_named, labels_boxes = named[:, :LABEL_WIDTH], boxes[:, :LABEL_WIDTH]
    for row in range(2):  # each row's label has ink, and not the boxes'
        part = slice(row * (tile + pad), (row + 1) * (tile + pad))
        assert (labels_named[part] < 128).any()
        assert not np.array_equal(labels_named[part], labels_boxes[part])
    assert np.array_equal(named[:, LABEL_WIDTH:], boxes[:, LABEL_WIDTH:])  # the tiles: unchanged
    assert (named[:tile, LABEL_WIDTH:LABEL_WIDTH + tile] == 128).all()


def test_without_the_font_grids_fall_back_to_pils_default_with_a_warning(tmp_path, monkeypatch, fresh_font):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.warns(UserWarning, match="no DejaVu Sans font .*letters beyond ASCII show as boxes"):
        fallback = grid(tmp_path, ["cat", "dog"])
    assert "DejaVu" not in str(getattr(label_font(), "path", ""))  # PIL's default
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the font is found (or not) once
        assert np.array_equal(grid(tmp_path, ["cat", "dog"]), fallback)
    monkeypatch.undo()
    label_font.cache_clear()
    assert not np.array_equal(grid(tmp_path, ["cat", "dog"]), fallback)  # DejaVu Sans again


def test_importing_the_grids_does_not_import_matplotlib():
    code = "import sys, cdmbench.cascade.grids; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"
