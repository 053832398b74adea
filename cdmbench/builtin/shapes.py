"""Dataset `shapes`: procedural class-conditional shapes with class-specific fine textures.

Each image is one shape (random size, position, rotation, colours) on a plain background. The
silhouette tells the class apart even at 8x8-16x16; inside it, a class-specific texture with a
period of ~0.15 image units (the image spans [-1, 1]) mostly averages away at 16x16 but is clear
at 32x32 and above, so a super-resolution stage has to learn class-dependent detail.

Geometry lives in continuous coordinates and is drawn from ``default_rng([seed, split, i])``, so
image i is the same picture at every resolution. Pixels are box averages over a supersampled
grid of at least ``MIN_GRID`` samples per side and ``MIN_SS`` per pixel (anti-aliasing).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import numpy as np

from cdmbench import hookimpl

MIN_GRID = 128    # supersampled samples per image side, at least ...
MIN_SS = 4        # ... and per pixel side
PERIOD = 0.15     # texture period in image units: 2.4 px at 32x32, 1.2 px at 16x16
CELL = PERIOD / math.sqrt(2)  # checker / speckle cell: diagonal period PERIOD
CHUNK_SAMPLES = 2 ** 20  # supersamples per image batch rendered at once (bounds memory)
MAX_OFFSET = 0.22  # shape centre within [-MAX_OFFSET, MAX_OFFSET]^2
SIZE_RANGE = (0.45, 0.62)  # shape scale s: shape-unit coordinates are image units / s
MIN_CONTRAST = 0.35  # |luminance(fg) - luminance(bg)| at least
SPECKLE = 16      # speckle texture lattice: cells per side (covers +-0.85 image units)
SPLITS = {"train": 0, "test": 1}
LUMA = np.array([0.299, 0.587, 0.114])  # RGB -> luminance
BALANCED_2X2 = np.array([[[1, 1], [0, 0]], [[0, 0], [1, 1]], [[1, 0], [1, 0]], [[0, 1], [0, 1]],
                         [[1, 0], [0, 1]], [[0, 1], [1, 0]]], dtype=np.float32)

Array = np.ndarray


class Frame(NamedTuple):
    """Supersampled coordinates in each shape's own frame, batched over N images."""

    x: Array       # (N, G, G) image units, origin at the shape centre, axes rotated with the
    y: Array       # shape, y pointing up
    s: Array       # (N, 1, 1) shape scale
    phase: Array   # (N, 1, 1) texture phase in [0, 1)
    speckle: Array  # (N, SPECKLE, SPECKLE) random 0/1 cells for the speckle texture


# --- helpers (np.mod and np.hypot are several times slower than these) ---

def _frac(u: Array) -> Array:
    return u - np.floor(u)


def _norm(x: Array, y: Array) -> Array:
    return np.sqrt(x * x + y * y)


# --- textures: float32 arrays in [0, 1], 1 where the texture colour shows ---

def _wave(u: Array, phase: Array) -> Array:
    """Square wave of period PERIOD along u."""
    return (_frac(u / PERIOD + phase) < 0.5).astype(np.float32)


# --- classes: (mask of the silhouette, texture), both (N, G, G) ---

def _disk(f: Frame) -> tuple[Array, Array]:
    """Disk with concentric rings."""
    r = _norm(f.x, f.y)
    return r <= 0.9 * f.s, _wave(r, f.phase)


def _square(f: Frame) -> tuple[Array, Array]:
    """Square with stripes parallel to a side."""
    return np.maximum(np.abs(f.x), np.abs(f.y)) <= 0.8 * f.s, _wave(f.y, f.phase)


def _triangle(f: Frame) -> tuple[Array, Array]:
    """Equilateral triangle with a thin outline inset from its edges."""
    # Largest projection onto the three edge normals (at 90, 210 and 330 degrees).
    sx, sy = math.sqrt(3) / 2 * f.x, -0.5 * f.y
    support = np.maximum(f.y, np.maximum(sy + sx, sy - sx))
    depth = 0.6 * f.s - support  # distance inside from the nearest edge
    return depth >= 0, ((depth >= 0.07) & (depth <= 0.12)).astype(np.float32)


def _ring(f: Frame) -> tuple[Array, Array]:
    """Annulus with radial spokes."""
    r = _norm(f.x, f.y) / f.s
    count = np.round(2 * np.pi * 0.75 * f.s / PERIOD)  # spacing ~PERIOD along the mid-circle
    arc = count * PERIOD / (2 * np.pi) * np.arctan2(f.y, f.x)
    return (r >= 0.55) & (r <= 0.95), _wave(arc, f.phase)


def _cross(f: Frame) -> tuple[Array, Array]:
    """Plus sign with a checkerboard."""
    ax, ay = np.abs(f.x) / f.s, np.abs(f.y) / f.s
    inside = ((ax <= 0.95) & (ay <= 0.32)) | ((ay <= 0.95) & (ax <= 0.32))
    checker = 2 * _frac((np.floor(f.x / CELL) + np.floor(f.y / CELL)) / 2)  # parity: 0 or 1
    return inside, checker


def _star(f: Frame) -> tuple[Array, Array]:
    """Five-pointed star with a lattice of dots."""
    outer, inner, half = 1.05, 0.48, np.pi / 5
    # Fold the angle into [0, pi/5] (tip on the x axis); the edge runs from the tip to the
    # inner vertex, and inside is the origin's side of that line.
    r = _norm(f.x, f.y) / f.s
    a = np.abs(_frac((np.arctan2(f.y, f.x) + half) / (2 * half)) * (2 * half) - half)
    px, py = r * np.cos(a), r * np.sin(a)
    ex, ey = inner * math.cos(half) - outer, inner * math.sin(half)
    inside = ex * py - ey * (px - outer) >= 0
    du = _frac(f.x / PERIOD + f.phase) - 0.5
    dv = _frac(f.y / PERIOD + f.phase) - 0.5
    return inside, (_norm(du, dv) * PERIOD <= 0.05).astype(np.float32)


def _ellipse(f: Frame) -> tuple[Array, Array]:
    """Ellipse (2:1) with wavy stripes along its long axis."""
    x, y = f.x / f.s, f.y / (0.52 * f.s)
    inside = x * x + y * y <= 1
    return inside, _wave(f.y + 0.035 * np.sin(f.x * (2 * np.pi / 0.3)), f.phase)


def _crescent(f: Frame) -> tuple[Array, Array]:
    """Crescent with a fine square mesh of thin lines."""
    x, y = f.x / f.s - 0.25, f.y / f.s  # shifted to bring the crescent's body near the centre
    inside = (_norm(x, y) <= 1.0) & (_norm(x - 0.5, y) >= 0.8)
    lines = (_frac(f.x / PERIOD + f.phase) < 0.25) | (_frac(f.y / PERIOD + f.phase) < 0.25)
    return inside, lines.astype(np.float32)


def _half_disk(f: Frame) -> tuple[Array, Array]:
    """Half disk with zigzag (chevron) stripes."""
    y = f.y / f.s + 0.4  # flat edge below the centre, so the shape is roughly centred
    inside = (_norm(f.x / f.s, y) <= 1.05) & (y >= 0)
    zig = np.abs(_frac(f.x / PERIOD) - 0.5) * PERIOD
    return inside, _wave(f.y + zig, f.phase)


def _heart(f: Frame) -> tuple[Array, Array]:
    """Upright heart with a fine random speckle."""
    x, y = f.x / (0.85 * f.s), f.y / (0.85 * f.s) + 0.29  # centroid at the origin
    u = x * x + y * y - 1
    inside = u * u * u <= x * x * y * y * y  # (x^2 + y^2 - 1)^3 <= x^2 y^3; `**` is slow
    # Each image's SPECKLE x SPECKLE random binary cells of side CELL, centred on the shape.
    n, k = f.speckle.shape[0], SPECKLE
    ix = np.clip(np.floor(f.x / CELL + k / 2), 0, k - 1).astype(np.intp)
    iy = np.clip(np.floor(f.y / CELL + k / 2), 0, k - 1).astype(np.intp)
    offset = (np.arange(n) * (k * k)).reshape(n, 1, 1)
    return inside, np.take(f.speckle.reshape(-1), offset + iy * k + ix)


# name, renderer, largest |rotation| in radians
CLASSES: tuple[tuple[str, Callable[[Frame], tuple[Array, Array]], float], ...] = (
    ("disk (concentric rings)", _disk, np.pi),
    ("square (stripes)", _square, np.pi),
    ("triangle (inset outline)", _triangle, np.pi),
    ("ring (radial spokes)", _ring, np.pi),
    ("cross (checkerboard)", _cross, np.pi),
    ("star (dots)", _star, np.pi),
    ("ellipse (wavy stripes)", _ellipse, np.pi),
    ("crescent (mesh)", _crescent, np.pi),
    ("half disk (zigzag)", _half_disk, np.pi),
    ("heart (speckle)", _heart, 0.4),
)


class Params(NamedTuple):
    """One image's random draws (independent of resolution)."""

    centre: Array  # (2,)
    scale: float
    angle: float
    phase: float
    speckle: Array  # (SPECKLE, SPECKLE)
    fg: Array      # (3,) colours in [0, 1]
    bg: Array
    tex: Array


def _draw(rng: np.random.Generator, max_angle: float) -> Params:
    centre = rng.uniform(-MAX_OFFSET, MAX_OFFSET, 2)
    scale = rng.uniform(*SIZE_RANGE)
    angle = rng.uniform(-max_angle, max_angle)
    phase = rng.uniform()
    # Balanced speckle: each 2x2 block of cells has two on, so it has no coarse structure.
    blocks = BALANCED_2X2[rng.integers(0, len(BALANCED_2X2), (SPECKLE // 2, SPECKLE // 2))]
    speckle = blocks.transpose(0, 2, 1, 3).reshape(SPECKLE, SPECKLE)
    bg = rng.uniform(size=3)
    # Foreground: the first of some random colours that contrasts enough with the background.
    candidates = rng.uniform(size=(16, 3))
    contrast = np.abs(candidates @ LUMA - bg @ LUMA) >= MIN_CONTRAST
    fg = candidates[contrast.argmax()] if contrast.any() else np.full(3, float(bg @ LUMA < 0.5))
    # Texture colour: the foreground pushed towards black (light fg) or white (dark fg).
    tex = fg + 0.6 * (float(fg @ LUMA <= 0.5) - fg)
    return Params(centre, scale, angle, phase, speckle, fg, bg, tex)


def _supersampling(resolution: int) -> int:
    """Supersamples per pixel side."""
    return max(MIN_SS, math.ceil(MIN_GRID / resolution))


def _render(label: int, params: Sequence[Params], resolution: int) -> Array:
    """Images of one class, (N, resolution, resolution, 3) uint8."""
    n = len(params)
    ss = _supersampling(resolution)
    g = resolution * ss
    grid = ((np.arange(g, dtype=np.float32) + 0.5) * (2.0 / g) - 1.0)
    gx, gy = grid[None, None, :], -grid[None, :, None]  # x right, y up; row 0 at the top

    def col(values) -> Array:
        return np.asarray(values, dtype=np.float32).reshape(n, 1, 1)

    cx, cy = col([p.centre[0] for p in params]), col([p.centre[1] for p in params])
    cos, sin = col([math.cos(p.angle) for p in params]), col([math.sin(p.angle) for p in params])
    # Rotate image coordinates into each shape's frame: R(-angle) (point - centre).
    x = cos * gx + (sin * gy - (cos * cx + sin * cy))
    y = cos * gy - (sin * gx + (cos * cy - sin * cx))
    frame = Frame(x, y, col([p.scale for p in params]), col([p.phase for p in params]),
                  np.stack([p.speckle for p in params]))
    inside, texture = CLASSES[label][1](frame)

    def box(a: Array) -> Array:
        # Average ss x ss blocks: rows with a strided sum, then columns by slicing (both fast).
        rows = a.reshape(n, resolution, ss, g).sum(axis=2)
        return sum(rows[..., k::ss] for k in range(ss)) / (ss * ss)

    cover = box(inside.astype(np.float32))[..., None]   # fraction of the pixel inside the shape
    textured = box(inside * texture)[..., None]         # ... inside and showing the texture
    fg, bg, tex = (np.array([getattr(p, k) for p in params], np.float32)[:, None, None, :]
                   for k in ("fg", "bg", "tex"))
    rgb = bg * (1 - cover) + fg * (cover - textured) + tex * textured
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)


class ShapesDataset:
    """``num_images`` lazily rendered images; label of image i is ``i % num_classes``. With more
    than the ten base classes, class k draws base class ``k % 10`` (names get a ``#k // 10``
    suffix), so the images only tell apart ten groups of classes."""

    num_classes = len(CLASSES)
    class_names = [name for name, _, _ in CLASSES]

    def __init__(self, *, split: str, resolution: int, num_images: int, seed: int,
                 num_classes: int = len(CLASSES)):
        self.split, self.resolution, self.seed = split, resolution, seed
        self.num_images = num_images
        self._split_id = SPLITS[split]
        if num_classes != len(CLASSES):
            self.num_classes = num_classes
            base = len(CLASSES)
            self.class_names = [CLASSES[k % base][0] + (f" #{k // base}" if k >= base else "")
                                for k in range(num_classes)]

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[Array, int]:
        images, labels = self.batch([index])
        return images[0], int(labels[0])

    def params(self, index: int) -> Params:
        """The random draws behind image ``index``."""
        rng = np.random.default_rng([self.seed, self._split_id, index])
        return _draw(rng, CLASSES[index % self.num_classes % len(CLASSES)][2])

    def batch(self, indices: Sequence[int]) -> tuple[Array, Array]:
        """Images (N, H, W, 3) uint8 and labels (N,) int64, rendered class by class."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        bad = idx[(idx < -self.num_images) | (idx >= self.num_images)]
        if bad.size:
            raise IndexError(f"shapes index {bad[0]} out of range for {self.num_images} images")
        idx = np.where(idx < 0, idx + self.num_images, idx)
        labels = idx % self.num_classes
        out = np.empty((idx.size, self.resolution, self.resolution, 3), np.uint8)
        grid = self.resolution * _supersampling(self.resolution)
        per_chunk = max(1, CHUNK_SAMPLES // grid ** 2)
        for label in np.unique(labels):
            where = np.flatnonzero(labels == label)
            for chunk in np.array_split(where, math.ceil(where.size / per_chunk)):
                params = [self.params(int(i)) for i in idx[chunk]]
                out[chunk] = _render(int(label) % len(CLASSES), params, self.resolution)
        return out, labels


def shapes(*, split: str, resolution: int, num_images: int = 10000, seed: int = 0,
           num_classes: int = len(CLASSES)) -> ShapesDataset:
    """Procedural shapes dataset; see the module docstring. ``num_classes`` other than 10
    relabels image i as ``i % num_classes`` drawn as base class ``(i % num_classes) % 10``
    (a stand-in with a dataset's class count, e.g. for ``--smoke``)."""
    if split not in SPLITS:
        raise ValueError(f"shapes: split must be one of {sorted(SPLITS)}, got {split!r}")
    for name, value, least in (("resolution", resolution, 1), ("num_images", num_images, 0),
                               ("seed", seed, 0), ("num_classes", num_classes, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"shapes: {name} must be an integer >= {least}, got {value!r}")
    return ShapesDataset(split=split, resolution=int(resolution), num_images=int(num_images),
                         seed=int(seed), num_classes=int(num_classes))


@hookimpl
def cdmbench_register_datasets(register):
    register("shapes", shapes, summary="procedural class-conditional shapes and textures; "
                                       "any resolution, no download")
