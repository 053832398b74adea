"""Checkpoints: one folder per step, written atomically, read back with integrity checks.

    <stage>/checkpoints/step-00001000/
        model.safetensors      weights; metadata holds the resolved recipe, stage and step, and
                               the noise conditioning of continuous processes (``NOISE_COND``)
        ema.safetensors        EMA weights (used for sampling)
        optimizer.pt           optimizer state, loaded with weights_only=True (no pickle code)
        posthoc_ema.safetensors  the post-hoc EMAs (train.posthoc_ema), when kept
        manifest.json          size and SHA-256 of each file above, checked on every load
    <stage>/checkpoints/corrupt-step-00001000/
        a checkpoint found unreadable when resuming, moved aside (never loaded nor pruned)

A folder is written under a temporary name, fsynced (files, folder) and renamed, so a checkpoint
folder either is complete or does not exist. Only tensors, numbers and strings are stored. A
folder without its manifest is corrupt (nothing could check its files): never loaded.

The weights' identity (``weights_sha256``, in evaluation caches and result rows) hashes the
tensors and metadata, not the file: safetensors writes metadata keys in another order in each
process, so the file's SHA-256 (the manifest's, for integrity) differs for identical weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from cdmbench.diffusion.process import NOISE_COND
from cdmbench.errors import CheckpointError
from cdmbench.runtime import distributed
from cdmbench.storage.files import SPACE_ERRNOS, file_mode, write_failure

PREFIX = "step-"
CORRUPT = "corrupt-"
MANIFEST = "manifest.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _step(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _write_manifest(path: Path) -> None:
    """Record the size and SHA-256 of every file of the checkpoint folder ``path``."""
    entries = {f.name: {"size": f.stat().st_size, "sha256": sha256_file(f)} for f in sorted(path.iterdir())}
    (path / MANIFEST).write_text(json.dumps(entries, indent=1))


def _replace(tmp: Path, final: Path) -> None:
    """Rename folder ``tmp`` to ``final``; a ``final`` already there (the same step saved again)
    is set aside first and put back if the rename fails, so it is lost only once replaced."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(folder: Path, step: int, *, model: nn.Module, ema: nn.Module,
                    optimizer: torch.optim.Optimizer, metadata: dict[str, Any], keep: int,
                    milestone_every: int = 0, extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write the checkpoint of ``step`` atomically (``write_folder``), then prune (``_prune``).
    ``extra``: more tensors to resume, each ``<name>.safetensors`` (the post-hoc EMAs)."""
    meta = {"step": str(step), "noise_cond": NOISE_COND, **{k: json.dumps(v) for k, v in metadata.items()}}

    def write(tmp: Path) -> None:
        save_file(_state(model), tmp / "model.safetensors", metadata=meta)
        save_file(_state(ema), tmp / "ema.safetensors", metadata=meta)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        for name, tensors in (extra or {}).items():
            save_file(tensors, tmp / f"{name}.safetensors", metadata=meta)

    final = write_folder(folder, f"{PREFIX}{step:08d}", write, what="checkpoint")
    _prune(folder, step, keep, milestone_every)
    return final


def write_folder(parent: Path, name: str, write: Callable[[Path], None], *, what: str) -> Path:
    """Write folder ``parent/name`` atomically: ``write(tmp)`` fills a temporary folder, whose files
    then get a manifest (size and SHA-256 each), the mode an ordinary ``open()`` would give
    (safetensors writes 0600 files) and an fsync, before it is renamed into place. A failed write
    (a full disk, a file-size limit, permissions, a read-only disk) leaves no partial folder, loses
    no folder written before, and raises CheckpointError saying why."""
    parent.mkdir(parents=True, exist_ok=True)
    final, tmp = parent / name, parent / f".tmp-{name}"
    for partial in parent.glob(".tmp-*"):  # left by writes killed midway (SIGKILL): ~10 GB each
        shutil.rmtree(partial, ignore_errors=True)
    for old in parent.glob(".old-*"):  # set aside by a write killed midway: put back unless replaced
        if (parent / old.name.removeprefix(".old-")).exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, parent / old.name.removeprefix(".old-"))
    try:
        tmp.mkdir()
        write(tmp)
        _write_manifest(tmp)
        for f in tmp.iterdir():
            os.chmod(f, file_mode())
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        _replace(tmp, final)
        _fsync_dir(parent)
    except Exception as exc:  # OSError, SafetensorError, RuntimeError (torch.save) on I/O failure
        shutil.rmtree(tmp, ignore_errors=True)
        failure = write_failure(exc, parent)
        if failure is None or failure[0] in SPACE_ERRNOS:
            free = shutil.disk_usage(parent).free / 2**30
            why = (f"{getattr(exc, 'strerror', None) or exc}; free space ({free:.2f} GiB left on that disk) "
                   "or choose another --out")
        else:
            why = failure[1]
        raise CheckpointError(f"cannot write {what} {final}: {why} (earlier {what}s are untouched)") from exc
    return final


def _prune(folder: Path, step: int, keep: int, milestone_every: int) -> None:
    """Delete the checkpoints up to ``step`` but the ``keep`` newest and the milestones (multiples
    of ``milestone_every``, when > 0). Later steps (a run resumed from an earlier one) are kept."""
    earlier = [p for p in list_checkpoints(folder) if _step(p) <= step]
    for old in earlier[:-keep]:
        if not (milestone_every and _step(old) % milestone_every == 0):
            shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path) -> str:
    """SHA-256 (hex) of a file, read in 1 MiB blocks: the file's integrity (the manifest)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(path: Path) -> str:
    """The identity of the weights in the safetensors file ``path``: the SHA-256 of its metadata
    (keys sorted) and its tensors' names, dtypes and shapes (names sorted), then of each tensor's
    bytes in that order. The same for the same weights whichever process (or safetensors version)
    wrote the file, where the file's own SHA-256 is not: safetensors writes the metadata keys in
    a per-process order. Remembered per file (path, size, modification time) in this process."""
    stat = os.stat(path)
    return _weights_sha256(str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)


@functools.lru_cache(maxsize=64)
def _weights_sha256(path: str, size: int, mtime_ns: int, inode: int) -> str:
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
        metadata = header.pop("__metadata__", None) or {}
        names = sorted(header)
        described = {"metadata": metadata, "tensors": [[n, header[n]["dtype"], header[n]["shape"]] for n in names]}
        h = hashlib.sha256(json.dumps(described, sort_keys=True, separators=(",", ":")).encode())
        for name in names:
            begin, end = header[name]["data_offsets"]
            fh.seek(8 + length + begin)
            left = end - begin
            while left:
                block = fh.read(min(left, 1 << 20))
                if not block:
                    raise ValueError(f"{path} ends inside tensor {name}")
                h.update(block)
                left -= len(block)
    return h.hexdigest()


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def verified_file(path: Path, name: str) -> Path:
    """File ``name`` of checkpoint ``path``, after checking its size and SHA-256 against the
    folder's manifest.json. A folder without one is corrupt: every checkpoint is written with
    it, and without it nothing checks the files (a deleted manifest must not switch checks off)."""
    file = path / name
    if not (path / MANIFEST).exists():
        raise ValueError(f"{MANIFEST} is missing, so its files cannot be checked (corrupt)")
    entry = json.loads((path / MANIFEST).read_text()).get(name)
    if entry is None:
        raise ValueError(f"{name} is missing from {MANIFEST}")
    if file.stat().st_size != entry["size"] or sha256_file(file) != entry["sha256"]:
        raise ValueError(f"{name} does not match its size and SHA-256 in {MANIFEST} (corrupt)")
    return file


DISCRETE_SCHEDULES = ("linear", "cosine")  # built-ins whose noise conditioning never changed


def check_noise_cond(path: Path) -> None:
    """CheckpointError when checkpoint ``path`` was trained before continuous processes were
    conditioned on the noise level (its metadata has no ``noise_cond``: it saw 1000 t) and its
    stage, or the stage it is conditioned on, may have a continuous schedule. Refused, not
    unreadable: never skipped nor moved aside. An unreadable file is left to the loading."""
    try:
        with safe_open(path / "ema.safetensors", framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception:
        return
    if "noise_cond" in meta or "recipe" not in meta:
        return
    stages = {st["name"]: st for st in json.loads(meta["recipe"]).get("stages", [])}
    stage = stages.get(json.loads(meta.get("stage", "null")), {})
    names = {st["schedule"]["name"] for st in (stage, stages.get(stage.get("condition_on"), {})) if "schedule" in st}
    suspect = sorted(names - set(DISCRETE_SCHEDULES))
    if suspect:
        raise CheckpointError(f"checkpoint {path} was trained by an earlier cdmbench, whose continuous schedules "
                              f"conditioned the network on 1000 t; this one conditions it on the noise level "
                              f"(log-SNR), so these weights (schedule {', '.join(suspect)}) would sample "
                              "wrongly: train the stage again, or sample it with the cdmbench version that trained it")


def _check_fits(module: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Raise unless ``state`` has exactly the keys and shapes of ``module``'s state, so that
    loading it cannot stop part way."""
    own = module.state_dict()
    if own.keys() != state.keys() or any(own[k].shape != v.shape for k, v in state.items()):
        raise ValueError(f"{name} does not fit the model (other keys or shapes)")


def load_checkpoint(path: Path, *, model: nn.Module, ema: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, verify: bool = True,
                    extra: dict[str, Any] | None = None) -> int:
    """Restore a checkpoint in place; returns its step. Every file is read and checked first
    (against the manifest's SHA-256 too unless ``verify`` is false: another process did), so on
    CheckpointError (unreadable or corrupt) the modules are unchanged. ``extra``: objects with
    ``check(state)`` (ValueError when it does not fit) and ``load_state_dict``, restored from
    ``<name>.safetensors`` (``save_checkpoint``'s ``extra``)."""

    def file(name: str) -> Path:
        return verified_file(path, name) if verify else path / name

    check_noise_cond(path)
    try:
        weights = load_file(file("model.safetensors"))
        ema_weights = load_file(file("ema.safetensors"))
        _check_fits(model, weights, "model.safetensors")
        _check_fits(ema, ema_weights, "ema.safetensors")
        opt_state = None if optimizer is None else torch.load(file("optimizer.pt"), weights_only=True)
        extra_states = {name: load_file(file(f"{name}.safetensors")) for name in extra or {}}
        for name, state in extra_states.items():
            extra[name].check(state)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc})") from exc
    model.load_state_dict(weights)
    ema.load_state_dict(ema_weights)
    if optimizer is not None:
        optimizer.load_state_dict(opt_state)
    for name, state in extra_states.items():
        extra[name].load_state_dict(state)
    return _step(path)


def ema_weights_sha256(folder: Path, step: int) -> str:
    """The identity (``weights_sha256``) of the EMA weights of checkpoint ``step`` in ``folder``:
    what identifies the weights that sampled, in evaluation caches and result rows."""
    return weights_sha256(folder / f"{PREFIX}{step:08d}" / "ema.safetensors")


def _ema_state(path: Path, module: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint ``path``'s EMA weights, checked against its manifest and ``module``."""
    state = load_file(verified_file(path, "ema.safetensors"))
    _check_fits(module, state, "ema.safetensors")
    return state


def load_ema(folder: Path, module: nn.Module, step: int | None = None) -> int:
    """Load the EMA weights of the newest readable checkpoint into ``module`` (for sampling);
    unreadable ones are skipped with a warning and left in place. With ``step``, that
    checkpoint's (the one another process chose), or CheckpointError."""
    if step is not None:
        path = folder / f"{PREFIX}{step:08d}"
        check_noise_cond(path)
        try:
            state = _ema_state(path, module)
        except Exception as exc:
            raise CheckpointError(f"checkpoint {path}, which the first process chose, is unreadable here "
                                  f"({type(exc).__name__}: {exc}); the run directory must be one file system "
                                  "that every node shares") from exc
        module.load_state_dict(state)
        return step
    unreadable = []
    for path in reversed(list_checkpoints(folder)):
        check_noise_cond(path)
        try:
            state = _ema_state(path, module)
        except Exception as exc:
            unreadable.append(f"{path.name}: {type(exc).__name__}: {exc}")
            warnings.warn(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); "
                          "falling back to the previous one", stacklevel=2)
            continue
        module.load_state_dict(state)
        return _step(path)
    if unreadable:
        raise CheckpointError(f"no readable checkpoint in {folder} ({'; '.join(unreadable)}); none is sampled "
                              "or evaluated: train the stage again (cdmbench run resumes from the last "
                              "readable checkpoint, moving the corrupt ones aside)")
    raise CheckpointError(f"no readable checkpoint in {folder}")


def _move_aside(path: Path) -> Path:
    """Rename checkpoint ``path`` to ``corrupt-step-*``, replacing an older folder of that name."""
    aside = path.with_name(CORRUPT + path.name)
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    return aside


def resume_latest(folder: Path, *, model: nn.Module, ema: nn.Module,
                  optimizer: torch.optim.Optimizer | None = None, extra: dict[str, Any] | None = None) -> int:
    """Restore the newest readable checkpoint; 0 when none exists. The main process chooses it,
    moving each unreadable one aside (with a warning saying where), so that pruning never keeps
    it in place of the readable ones; under torchrun every other process then restores that same
    checkpoint, or stops (ranks resumed at different steps would train apart)."""
    if distributed.joined() and not distributed.is_main():
        step = distributed.broadcast(None)
        if step:
            try:
                load_checkpoint(folder / f"{PREFIX}{step:08d}", model=model, ema=ema, optimizer=optimizer,
                                verify=False, extra=extra)  # the first process checked its SHA-256 (~10 GB at sr256)
            except CheckpointError as exc:
                raise CheckpointError(f"{exc}: the first process resumed from it; the run directory must be "
                                      "one file system that every node shares") from exc
        return step
    step = 0
    for path in reversed(list_checkpoints(folder)):
        check_noise_cond(path)
        try:
            step = load_checkpoint(path, model=model, ema=ema, optimizer=optimizer, extra=extra)
            break
        except CheckpointError as exc:
            warnings.warn(f"{exc}; moved to {_move_aside(path)}; falling back to the previous checkpoint", stacklevel=2)
    return distributed.broadcast(step)
