"""Checkpoints record the noise conditioning they were trained with; one trained before
continuous processes were conditioned on the noise level is refused, not sampled wrongly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from cdmbench.diffusion.process import NOISE_COND
from cdmbench.errors import CheckpointError
from cdmbench.training.checkpoint import MANIFEST, _write_manifest, load_ema, resume_latest, save_checkpoint


def recipe(schedule: str) -> dict:
    return {"stages": [{"name": "base", "schedule": {"name": "cosine", "args": {}}},
                       {"name": "sr", "condition_on": "base", "schedule": {"name": schedule, "args": {}}}]}


def save(folder: Path, step: int, schedule: str, *, old: bool) -> None:
    """A checkpoint of stage sr; ``old``: as an earlier cdmbench wrote it, without ``noise_cond``."""
    torch.manual_seed(step)
    model, ema = nn.Linear(4, 4), nn.Linear(4, 4)
    path = save_checkpoint(folder, step, model=model, ema=ema, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                           metadata={"recipe": recipe(schedule), "stage": "sr"}, keep=5)
    if old:
        for name in ("model.safetensors", "ema.safetensors"):
            with safe_open(path / name, framework="pt") as fh:
                meta = fh.metadata()
            del meta["noise_cond"]
            save_file(load_file(path / name), path / name, metadata=meta)
        (path / MANIFEST).unlink()
        _write_manifest(path)


def test_a_checkpoint_records_the_noise_conditioning(tmp_path):
    save(tmp_path, 1, "log-snr", old=False)
    with safe_open(tmp_path / "step-00000001" / "ema.safetensors", framework="pt") as fh:
        assert fh.metadata()["noise_cond"] == NOISE_COND
    assert load_ema(tmp_path, nn.Linear(4, 4)) == 1


def test_an_old_continuous_checkpoint_is_refused_with_the_fix_and_left_in_place(tmp_path):
    save(tmp_path, 1, "log-snr", old=True)
    message = (r"trained by an earlier cdmbench, whose continuous schedules conditioned the network on 1000 t.*"
               r"\(schedule log-snr\) would sample wrongly: train the stage again")
    with pytest.raises(CheckpointError, match=message):
        load_ema(tmp_path, nn.Linear(4, 4))
    model, ema = nn.Linear(4, 4), nn.Linear(4, 4)
    with pytest.raises(CheckpointError, match=message):  # not taken for corrupt, nor moved aside
        resume_latest(tmp_path, model=model, ema=ema)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]


def test_an_old_checkpoint_of_discrete_schedules_still_loads(tmp_path):
    save(tmp_path, 1, "linear", old=True)
    assert load_ema(tmp_path, nn.Linear(4, 4)) == 1
    assert json.loads((tmp_path / "step-00000001" / MANIFEST).read_text())  # a valid folder
