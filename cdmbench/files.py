"""Files that several processes may write at once (stages trained, evaluated and swept as
concurrent jobs on one run directory and one cache): atomic replacement and locks."""

from __future__ import annotations

import fcntl
import io
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to a temporary file of this process beside ``path``, fsync, rename: a reader
    sees the old file or the new one, never a part, and concurrent writers do not collide."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` to ``path``, atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(path, buffer.getvalue())


def cached_tensor(path: Path, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Load a tensor from the npz ``path``, or make, save (atomically) and return it as saved."""
    if not path.exists():
        save_npz(path, x=make().numpy())
    with np.load(path) as data:
        return torch.from_numpy(data["x"])


def append_text(path: Path, text: str) -> None:
    """Append ``text`` (whole lines) in one write under the file's lock, so lines of
    concurrent writers never interleave."""
    with locked(path), open(path, "ab") as fh:
        fh.write(text.encode())


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` for the block; other processes asking for it
    wait. Use it around check-then-make (a cache entry made once) and read-modify-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
