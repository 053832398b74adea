"""Checkpoints: retention after a fallback, write failures, manifests, all-or-nothing loads, fsync."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cdmbench.errors import CheckpointError
from cdmbench.training.checkpoint import load_checkpoint, load_ema, resume_latest, save_checkpoint, sha256_file


def modules(seed: int):
    torch.manual_seed(seed)
    model, ema = nn.Linear(64, 64), nn.Linear(64, 64)
    return model, ema, torch.optim.AdamW(model.parameters())


def save(folder: Path, step: int, keep: int = 3, seed: int | None = None) -> Path:
    model, ema, opt = modules(step if seed is None else seed)
    model(torch.ones(1, 64)).sum().backward()
    opt.step()  # optimizer state to store
    return save_checkpoint(folder, step, model=model, ema=ema, optimizer=opt, metadata={"stage": "s"},
                           keep=keep)


def steps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def flip_middle_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-len(data) // 4] ^= 0xFF  # in the tensor data, past the JSON header
    file.write_bytes(bytes(data))


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_corrupt_newest_checkpoint_is_moved_aside_and_pruning_keeps_the_good_ones(tmp_path):
    save(tmp_path, 100)
    bad = save(tmp_path, 200)
    (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:100])
    model, ema, opt = modules(0)
    with pytest.warns(UserWarning, match=r"step-00000200 is unreadable.*moved to .*corrupt-step-00000200"):
        assert resume_latest(tmp_path, model=model, ema=ema, optimizer=opt) == 100
    save(tmp_path, 150, keep=1)
    assert steps(tmp_path) == ["corrupt-step-00000200", "step-00000150"]
    assert load_checkpoint(tmp_path / "step-00000150", model=model, ema=ema, optimizer=opt) == 150


def test_moving_aside_replaces_an_older_corrupt_folder(tmp_path):
    (tmp_path / "corrupt-step-00000200").mkdir(parents=True)
    (tmp_path / "corrupt-step-00000200" / "old").write_text("x")
    bad = save(tmp_path, 200)
    (bad / "optimizer.pt").write_bytes(b"")
    with pytest.warns(UserWarning, match="moved to"):
        assert resume_latest(tmp_path, **dict(zip(("model", "ema", "optimizer"), modules(0), strict=True))) == 0
    assert steps(tmp_path / "corrupt-step-00000200") == ["ema.safetensors", "manifest.json",
                                                          "model.safetensors", "optimizer.pt"]


def test_pruning_never_deletes_the_saved_step_nor_later_ones(tmp_path):
    for step in (100, 200, 300):
        save(tmp_path, step, keep=1)
    save(tmp_path, 250, keep=1)  # e.g. a run resumed from an earlier step
    assert steps(tmp_path) == ["step-00000250", "step-00000300"]


@pytest.mark.slow
def test_a_file_size_limit_raises_checkpoint_error_and_leaves_no_partial_folder(tmp_path):
    first = save(tmp_path, 1)
    child = f"""
import resource, signal, sys, torch
from pathlib import Path
from torch import nn
from cdmbench.training.checkpoint import save_checkpoint
from cdmbench.errors import CheckpointError
model = nn.Linear(64, 64)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    save_checkpoint(Path({str(tmp_path)!r}), 2, model=model, ema=model,
                    optimizer=torch.optim.AdamW(model.parameters()), metadata={{}}, keep=3)
except CheckpointError as exc:
    print(exc)
    sys.exit(3)
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert done.returncode == 3, done.stderr
    message = done.stdout
    assert f"cannot write checkpoint {tmp_path / 'step-00000002'}: " in message
    assert "GiB left on that disk" in message and "choose another --out" in message
    assert steps(tmp_path) == ["step-00000001"]  # no .tmp- folder left
    model, ema, opt = modules(0)
    assert load_checkpoint(first, model=model, ema=ema, optimizer=opt) == 1


def test_the_manifest_lists_every_file_and_checkpoints_without_one_still_load(tmp_path):
    path = save(tmp_path, 5)
    manifest = json.loads((path / "manifest.json").read_text())
    files = ["ema.safetensors", "model.safetensors", "optimizer.pt"]
    assert sorted(manifest) == files
    for name in files:
        file = path / name
        assert manifest[name] == {"size": file.stat().st_size, "sha256": sha256_file(file)}
    (path / "manifest.json").unlink()  # as written by earlier versions
    model, ema, opt = modules(0)
    assert load_checkpoint(path, model=model, ema=ema, optimizer=opt) == 5


def test_a_flipped_byte_is_detected_and_resume_falls_back(tmp_path):
    save(tmp_path, 1)
    bad = save(tmp_path, 2)
    flip_middle_byte(bad / "model.safetensors")
    model, ema, opt = modules(0)
    with pytest.raises(CheckpointError, match=r"step-00000002 is unreadable.*model\.safetensors does not"):
        load_checkpoint(bad, model=model, ema=ema, optimizer=opt)
    with pytest.warns(UserWarning, match="moved to"):
        assert resume_latest(tmp_path, model=model, ema=ema, optimizer=opt) == 1
    assert steps(tmp_path) == ["corrupt-step-00000002", "step-00000001"]


def test_load_ema_skips_a_corrupt_ema_file_and_leaves_it_in_place(tmp_path):
    good = save(tmp_path, 1)
    flip_middle_byte(save(tmp_path, 2) / "ema.safetensors")
    module = nn.Linear(64, 64)
    with pytest.warns(UserWarning, match=r"step-00000002 is unreadable.*ema\.safetensors does not match"):
        assert load_ema(tmp_path, module) == 1
    _, ema, _ = modules(0)
    load_checkpoint(good, model=nn.Linear(64, 64), ema=ema)
    assert same(weights(module), weights(ema))
    assert steps(tmp_path) == ["step-00000001", "step-00000002"]


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "legacy"])
def test_a_failed_resume_leaves_the_modules_unchanged(tmp_path, manifest):
    path = save(tmp_path, 3, seed=7)
    (path / "optimizer.pt").write_bytes((path / "optimizer.pt").read_bytes()[:200])
    if not manifest:
        (path / "manifest.json").unlink(missing_ok=True)  # as written by earlier versions
    model, ema, opt = modules(0)
    before = weights(model), weights(ema)
    with pytest.warns(UserWarning, match="step-00000003 is unreadable"):
        assert resume_latest(tmp_path, model=model, ema=ema, optimizer=opt) == 0
    assert same(weights(model), before[0]) and same(weights(ema), before[1])


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_files_and_the_folder_are_fsynced_before_the_rename_and_the_parent_after(tmp_path, monkeypatch):
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), replace(a, b))[1])
    final = save(tmp_path, 4)
    tmp = str(tmp_path / ".tmp-step-00000004")
    renamed = events.index(("replace", tmp))
    synced = {path for kind, path in events[:renamed] if kind == "fsync"}
    assert synced >= {tmp} | {f"{tmp}/{p.name}" for p in final.iterdir()}
    assert ("fsync", str(tmp_path)) in events[renamed:]


def test_folders_of_writes_killed_midway_are_removed_by_the_next_checkpoint(tmp_path):
    """A SIGKILL during a write leaves its temporary folder (the size of a checkpoint) behind."""
    save(tmp_path, 100)
    for step in (105, 205):
        (tmp_path / f".tmp-step-{step:08d}").mkdir()
        (tmp_path / f".tmp-step-{step:08d}" / "model.safetensors").write_bytes(b"x" * 1000)
    save(tmp_path, 200)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000100", "step-00000200"]


def _resume_as_rank(rank: int, folders: list[str], port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model, ema, opt = modules(0)
    try:
        result = str(resume_latest(Path(folders[rank]), model=model, ema=ema, optimizer=opt))
    except CheckpointError as exc:
        result = str(exc)
    Path(out, str(rank)).write_text(result)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False])
def test_every_rank_resumes_from_the_checkpoint_the_first_chose(tmp_path, shared):
    """On node-local disks (one folder per rank here) rank 1 would resume from another step."""
    import socket

    import torch.multiprocessing as mp

    first, other = tmp_path / "node0", tmp_path / "node1"
    save(first, 2), save(first, 4), save(other, 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folders = [str(first), str(first if shared else other)]
    mp.start_processes(_resume_as_rank, args=(folders, port, str(tmp_path)), nprocs=2, start_method="spawn")
    results = [(tmp_path / str(rank)).read_text() for rank in (0, 1)]
    if shared:
        assert results == ["4", "4"]
    else:
        assert results[0] == "4" and results[1].startswith(f"checkpoint {other / 'step-00000004'} is unreadable")
        assert results[1].endswith("the first process resumed from it; the run directory must be one file "
                                   "system that every node shares")


def test_a_process_told_the_checkpoint_was_verified_does_not_hash_it_again(tmp_path):
    path = save(tmp_path, 3)
    flip_middle_byte(path / "ema.safetensors")  # a tensor's byte: still loads, but not the file written
    model, ema, opt = modules(0)
    with pytest.raises(CheckpointError, match="does not match its size and SHA-256"):
        load_checkpoint(path, model=model, ema=ema, optimizer=opt)
    assert load_checkpoint(path, model=model, ema=ema, optimizer=opt, verify=False) == 3
