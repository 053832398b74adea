"""Checkpoints: one folder per step, written atomically, read back with integrity checks.

    <stage>/checkpoints/step-00001000/
        model.safetensors      weights; metadata holds the resolved recipe, stage and step
        ema.safetensors        EMA weights (used for sampling)
        optimizer.pt           optimizer state, loaded with weights_only=True (no pickle code)

A folder is written under a temporary name, fsynced and renamed, so a checkpoint folder either
is complete or does not exist. Only tensors, numbers and strings are stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError

PREFIX = "step-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(folder: Path, step: int, *, model: nn.Module, ema: nn.Module,
                    optimizer: torch.optim.Optimizer, metadata: dict[str, Any], keep: int,
                    milestone_every: int = 0) -> Path:
    """Write the checkpoint of ``step`` atomically and prune all but the ``keep`` newest and
    the milestones (steps that are multiples of ``milestone_every``, when > 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:08d}"
    tmp = folder / f".tmp-{PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta = {"step": str(step), **{k: json.dumps(v) for k, v in metadata.items()}}
    try:
        save_file(_state(model), tmp / "model.safetensors", metadata=meta)
        save_file(_state(ema), tmp / "ema.safetensors", metadata=meta)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(folder)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {final}: {exc.strerror or exc}; free space "
                              f"or choose another --out (earlier checkpoints are untouched)") from exc
    for old in list_checkpoints(folder)[:-keep]:
        if milestone_every and int(old.name[len(PREFIX):]) % milestone_every == 0:
            continue
        shutil.rmtree(old, ignore_errors=True)
    return final


def sha256_file(path: Path) -> str:
    """SHA-256 (hex) of a file, read in 1 MiB blocks: how weights are identified in results."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def load_checkpoint(path: Path, *, model: nn.Module, ema: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> int:
    """Restore a checkpoint in place; returns its step. Raises CheckpointError if unreadable."""
    try:
        model.load_state_dict(load_file(path / "model.safetensors"))
        ema.load_state_dict(load_file(path / "ema.safetensors"))
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc})") from exc
    return int(path.name[len(PREFIX):])


def load_ema(folder: Path, module: nn.Module) -> int:
    """Load the EMA weights of the newest readable checkpoint into ``module`` (for sampling)."""
    for path in reversed(list_checkpoints(folder)):
        try:
            module.load_state_dict(load_file(path / "ema.safetensors"))
            return int(path.name[len(PREFIX):])
        except Exception as exc:
            warnings.warn(f"checkpoint {path} is unreadable ({exc}); falling back to the previous one")
    raise CheckpointError(f"no readable checkpoint in {folder}")


def resume_latest(folder: Path, *, model: nn.Module, ema: nn.Module,
                  optimizer: torch.optim.Optimizer | None = None) -> int:
    """Restore the newest readable checkpoint (warning about any skipped); 0 when none exists."""
    for path in reversed(list_checkpoints(folder)):
        try:
            return load_checkpoint(path, model=model, ema=ema, optimizer=optimizer)
        except CheckpointError as exc:
            warnings.warn(f"{exc}; falling back to the previous checkpoint")
    return 0
