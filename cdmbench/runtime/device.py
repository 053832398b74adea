"""The device a job runs on: the recipe's ``device``, and this process's GPU under torchrun."""

from __future__ import annotations

import os

import torch

from cdmbench.errors import CdmbenchError


def resolve_device(name: str) -> torch.device:
    """The recipe's device; under torchrun, "cuda"/"auto" mean this process's GPU (LOCAL_RANK)."""
    local = os.environ.get("LOCAL_RANK")
    if name in ("auto", "cuda") and local is not None and torch.cuda.is_available():
        torch.cuda.set_device(int(local))
        return torch.device(f"cuda:{local}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CdmbenchError(f"device '{name}' requested but CUDA is not available; set device: cpu "
                            "or auto (--set device=auto)")
    return torch.device(name)
