"""Files that several processes may write at once (stages trained, evaluated and swept as
concurrent jobs on one run directory and one cache): atomic replacement and locks."""

from __future__ import annotations

import errno
import fcntl
import io
import math
import os
import re
import shutil
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from cdmbench.errors import CdmbenchError


@contextmanager
def _named(path: Path, always: bool = False) -> Iterator[None]:
    """An OSError without a file name (a write to a full disk) raised inside gets ``path``; with
    ``always``, every OSError does (a temporary file's name would mean nothing to the user)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None or always:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask: from /proc (Linux), else set and restored at once under a lock (the
    mask set meanwhile, 077, makes a file another thread creates then private, never open)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` gives a new file under the process's umask (0666 & ~umask): what a file
    written to a temporary name (``mkstemp``: 0600) and renamed must get, for others to read it."""
    return 0o666 & ~_umask()


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to a temporary file of this process beside ``path``, fsync, rename: a reader
    sees the old file or the new one, never a part, and concurrent writers do not collide. The
    file gets the mode an ordinary ``open()`` would (``file_mode``); an OSError names ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _named(path, always=True):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with _named(path, always=True), os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), file_mode())
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        with _named(path, always=True):
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` to ``path``, atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(path, buffer.getvalue())


def check_free_space(folder: Path, needed: int, fix: str) -> None:
    """CdmbenchError unless the disk of ``folder`` has ``needed`` bytes free. Sparse arrays take
    their space only as rows are written: check what is still to write on every start."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise CdmbenchError(f"no disk space for the arrays in {folder}: they need {needed} more bytes "
                            f"({needed / 2**30:.2f} GiB), {free / 2**30:.2f} GiB is free; {fix}")


_ELSEWHERE = "(cdmbench run --out DIR; $CDMBENCH_CACHE and $CDMBENCH_DATA_CACHE for caches)"
_SPACE = "{strerror} writing {path}. Free space there"
_PERMISSIONS = ("{strerror}: {path} (permissions: this user may not write there). Make that folder and file "
                f"writable for this user (chmod, chown) or write elsewhere {_ELSEWHERE}")
# errno of a failed write -> what to say: the system's message, the file, the cause and the fix
WRITE_FAILURES = {
    errno.ENOSPC: _SPACE, errno.EDQUOT: _SPACE, errno.EFBIG: _SPACE,
    errno.EACCES: _PERMISSIONS, errno.EPERM: _PERMISSIONS,
    errno.EROFS: ("{strerror} writing {path} (the file system there is read-only). Write to a writable "
                  f"disk {_ELSEWHERE} or remount that one read-write"),
}
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def write_failure(exc: BaseException, path: Path | str | None = None) -> tuple[int, str] | None:
    """(errno, message) of a write of ``path`` (default: the OSError's file) that failed with
    ``exc`` for lack of space, permissions or a read-only file system, else None; the message
    names the file, the cause and the fix. The errno is an OSError's, or the one the message of
    an error wrapping it names (safetensors: 'os error 13'; torch.save: the system's message)."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:
        text = str(exc)
        found = re.search(r"os error (\d+)", text)
        code = int(found.group(1)) if found else next((c for c in WRITE_FAILURES if os.strerror(c) in text), None)
    if code not in WRITE_FAILURES:
        return None
    path = path if path is not None else getattr(exc, "filename", None) or "a file"
    strerror = (exc.strerror if isinstance(exc, OSError) else None) or os.strerror(code)
    return code, WRITE_FAILURES[code].format(strerror=strerror, path=path)


def allocate_arrays(folder: Path, arrays: dict[str, tuple[type, tuple[int, ...]]], fix: str) -> None:
    """Create zero-filled ``.npy`` files (sparse: no disk used until written) in ``folder``,
    ``arrays`` naming each file's (dtype, shape), after checking that the disk has room for all
    of them: a full disk met later would be a SIGBUS in a process writing into a mapped array.
    ``fix`` ends the error message: how to free or choose space."""
    folder.mkdir(parents=True, exist_ok=True)
    check_free_space(folder, sum(np.dtype(dtype).itemsize * math.prod(shape) for dtype, shape in arrays.values()),
                     fix)
    for name, (dtype, shape) in arrays.items():
        np.lib.format.open_memmap(folder / name, mode="w+", dtype=dtype, shape=shape).flush()


def done_marker(folder: Path, shard: int) -> Path:
    """``folder/done/<shard>``: an empty file made once shard ``shard``'s rows are on disk."""
    return folder / "done" / f"{shard:06d}"


def write_rows(path: Path, start: int, rows: np.ndarray) -> None:
    """Write ``rows`` into the ``.npy`` file ``path`` from row ``start`` on, in place and durably
    (positioned writes, then fsync). Only those bytes are written, so processes, on one node or
    several sharing a file system, may fill disjoint rows of one file at once."""
    array = np.load(path, mmap_mode="r")
    if rows.dtype != array.dtype or rows.shape[1:] != array.shape[1:] or not 0 <= start <= len(array) - len(rows):
        raise ValueError(f"rows {rows.dtype} {rows.shape} from {start} do not fit {path} "
                         f"({array.dtype} {array.shape})")
    offset = array.offset + start * math.prod(array.shape[1:]) * array.itemsize
    del array
    data = memoryview(np.ascontiguousarray(rows)).cast("B")
    fd = os.open(path, os.O_WRONLY)
    try:
        with _named(path):
            while data:  # pwrite may write less than asked
                written = os.pwrite(fd, data, offset)
                data, offset = data[written:], offset + written
            os.fsync(fd)
    finally:
        os.close(fd)


def mapped_tensor(path: Path) -> torch.Tensor:
    """The ``.npy`` array at ``path`` as a tensor mapping the file read-only: only the rows that
    are indexed are read. Index it, never write into it (that would crash the process). Not a
    private copy-on-write mapping: Linux counts those against memory in full, and refuses one
    larger than memory + swap (ImageNet's training set at 256 px is 252 GB)."""
    with warnings.catch_warnings():  # torch warns that the array is not writable
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.load(path, mmap_mode="r"))


def cached_tensor(path: Path, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Load a tensor from the npz ``path``, or make, save (atomically) and return it as saved."""
    if not path.exists():
        save_npz(path, x=make().numpy())
    with np.load(path) as data:
        return torch.from_numpy(data["x"])


def append_text(path: Path, text: str) -> None:
    """Append ``text`` (whole lines) in one write under the file's lock, so lines of
    concurrent writers never interleave; all or nothing: a write cut short (a full disk) is
    cut off again, so no torn line is left for the next append to follow."""
    data = text.encode()
    with locked(path), _named(path), open(path, "ab", buffering=0) as fh:
        size = fh.seek(0, os.SEEK_END)
        try:
            while data:  # an unbuffered write may write less than asked, then fail
                data = data[fh.write(data):]
        except BaseException:
            fh.truncate(size)
            raise


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
