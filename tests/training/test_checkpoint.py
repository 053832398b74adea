"""Checkpoints: retention after a fallback, write failures, manifests, all-or-nothing loads, fsync,
the weights' identity."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import cdmbench.training.checkpoint
from cdmbench.errors import CheckpointError
from cdmbench.training.checkpoint import (
    load_checkpoint,
    load_ema,
    resume_latest,
    save_checkpoint,
    sha256_file,
    weights_sha256,
)

ROOT = Path(__file__).resolve().parents[2]


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


def test_the_manifest_lists_every_file(tmp_path):
    path = save(tmp_path, 5)
    manifest = json.loads((path / "manifest.json").read_text())
    files = ["ema.safetensors", "model.safetensors", "optimizer.pt"]
    assert sorted(manifest) == files
    for name in files:
        file = path / name
        assert manifest[name] == {"size": file.stat().st_size, "sha256": sha256_file(file)}


def test_deleting_the_manifest_does_not_switch_the_check_off(tmp_path):
    """Flipped bytes in the EMA weights of a checkpoint whose manifest is gone were sampled with
    no warning: a checkpoint without a manifest is corrupt. Resuming moves it aside and falls
    back; sampling skips it with a warning, and with no other checkpoint refuses to sample."""
    save(tmp_path / "a", 1)
    bad = save(tmp_path / "a", 2)
    flip_middle_byte(bad / "ema.safetensors")
    (bad / "manifest.json").unlink()
    missing = r"step-00000002 is unreadable \(ValueError: manifest.json is missing, so its files cannot be checked"
    module = nn.Linear(64, 64)
    with pytest.warns(UserWarning, match=missing + r".*falling back to the previous one"):
        assert load_ema(tmp_path / "a", module) == 1
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        load_ema(tmp_path / "a", module, step=2)
    model, ema, opt = modules(0)
    with pytest.warns(UserWarning, match=missing + r".*moved to .*corrupt-step-00000002; falling back"):
        assert resume_latest(tmp_path / "a", model=model, ema=ema, optimizer=opt) == 1
    assert steps(tmp_path / "a") == ["corrupt-step-00000002", "step-00000001"]

    only = save(tmp_path / "b", 3)
    (only / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="unreadable"), pytest.raises(
            CheckpointError, match=r"no readable checkpoint in .*b \(step-00000003: ValueError: manifest.json is "
                                   r"missing.*\); none is sampled or evaluated: train the stage again"):
        load_ema(tmp_path / "b", module)


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


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no-manifest"])
def test_a_failed_resume_leaves_the_modules_unchanged(tmp_path, manifest):
    path = save(tmp_path, 3, seed=7)
    (path / "optimizer.pt").write_bytes((path / "optimizer.pt").read_bytes()[:200])
    if not manifest:
        (path / "manifest.json").unlink(missing_ok=True)
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


def test_a_checkpoint_set_aside_by_a_write_killed_midway_is_put_back_unless_replaced(tmp_path):
    """Saving a step again sets its folder aside (.old-) until the new one is renamed in: killed
    between the two renames, the next checkpoint puts it back; one already replaced is removed."""
    os.replace(save(tmp_path, 150), tmp_path / ".old-step-00000150")
    save(tmp_path, 100)
    (tmp_path / ".old-step-00000100").mkdir()
    save(tmp_path, 200)
    assert steps(tmp_path) == ["step-00000100", "step-00000150", "step-00000200"]
    assert load_checkpoint(tmp_path / "step-00000150", **dict(zip(("model", "ema", "optimizer"), modules(0),
                                                                  strict=True))) == 150


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


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_checkpoint_that_cannot_be_written_says_why_and_loses_none_written_before(tmp_path, monkeypatch, code):
    """A read-only disk or a folder this user may not write (simulated: tests run as root, whom
    chmod does not stop) is named as such, not as a full disk; saving a step again whose rename
    fails keeps the checkpoint that step had."""
    import safetensors.torch

    first = save(tmp_path, 1)
    before = sha256_file(first / "ema.safetensors")

    def refused(*args, **kwargs):  # as safetensors says it: a message, no errno attribute
        raise safetensors.SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} "
                                          f"(os error {code})")

    monkeypatch.setattr(cdmbench.training.checkpoint, "save_file", refused)
    cause = {errno.EROFS: "(the file system there is read-only). Write to a writable disk",
             errno.EACCES: "(permissions: this user may not write there). Make that folder and file writable"}[code]
    with pytest.raises(CheckpointError) as info:
        save(tmp_path, 2)
    message = str(info.value)
    assert message.startswith(f"cannot write checkpoint {tmp_path / 'step-00000002'}: {os.strerror(code)}")
    assert cause in message and message.endswith("(earlier checkpoints are untouched)")
    assert "free space" not in message
    assert steps(tmp_path) == ["step-00000001"]

    monkeypatch.setattr(cdmbench.training.checkpoint, "save_file", safetensors.torch.save_file)
    replace = os.replace

    def no_rename_into_place(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise OSError(code, os.strerror(code), str(src))
        return replace(src, dst)

    monkeypatch.setattr(cdmbench.training.checkpoint.os, "replace", no_rename_into_place)
    with pytest.raises(CheckpointError, match=re.escape(cause)):
        save(tmp_path, 1, seed=5)  # other weights for the same step
    assert steps(tmp_path) == ["step-00000001"] and sha256_file(first / "ema.safetensors") == before
    monkeypatch.setattr(cdmbench.training.checkpoint.os, "replace", replace)
    assert load_checkpoint(first, **dict(zip(("model", "ema", "optimizer"), modules(0), strict=True))) == 1


SAVE_IN_A_PROCESS = """
import sys, torch
from pathlib import Path
from torch import nn
from cdmbench.training.checkpoint import save_checkpoint
torch.manual_seed(0)
model, ema = nn.Linear(8, 8), nn.Linear(8, 8)
save_checkpoint(Path(sys.argv[1]), 1, model=model, ema=ema, optimizer=torch.optim.AdamW(model.parameters()),
                metadata={key: key * 3 for key in "abcdefgh"}, keep=1)
"""


@pytest.mark.slow
def test_identical_weights_saved_by_two_processes_have_one_identity(tmp_path):
    """safetensors writes the metadata keys in a per-process order, so the files of two processes
    differ (with 9 keys, 1 in 9! alike by chance); the identity hashes their content."""
    for name in ("a", "b"):
        done = subprocess.run([sys.executable, "-c", SAVE_IN_A_PROCESS, str(tmp_path / name)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    a, b = (tmp_path / name / "step-00000001" / "ema.safetensors" for name in ("a", "b"))
    assert weights_sha256(a) == weights_sha256(b)
    assert cdmbench.training.checkpoint.ema_weights_sha256(tmp_path / "a", 1) == weights_sha256(a)
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other.safetensors"  # one changed value, dtype or metadata value is another identity
    tensors = load_file(a)
    for changed, metadata in [({**tensors, "bias": tensors["bias"] + 1}, None),
                              ({**tensors, "bias": tensors["bias"].double()}, None),
                              (tensors, {"step": "2"})]:
        save_file(changed, other, metadata=metadata)
        assert weights_sha256(other) != weights_sha256(a)


RESAVE = """
import sys
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from cdmbench.training import checkpoint
path = Path(sys.argv[1])
for name in ("model", "ema"):
    with safe_open(path / f"{name}.safetensors", "pt") as fh:
        metadata = fh.metadata()
    save_file(load_file(path / f"{name}.safetensors"), path / f"{name}.safetensors", metadata=metadata)
(path / checkpoint.MANIFEST).unlink()
checkpoint._write_manifest(path)
"""


@pytest.mark.slow
def test_evaluation_samples_are_reused_after_another_process_saves_the_weights_again(tiny_recipe, tmp_path,
                                                                                      monkeypatch):
    """A checkpoint written again by another process (its file's bytes differ) holds the same
    weights: the evaluation samples of its signature are found, not sampled again."""
    import cdmbench.evaluation.samples as samples
    from cdmbench.cascade.stages import build_chain
    from cdmbench.storage.rundir import load_run
    from cdmbench.training.run import run

    out = run(tiny_recipe, out=tmp_path / "run", stage="base8", progress=False, echo=lambda *_: None,
              overrides=["stages.base8.train.steps=1"])
    _, recipe, plugins = load_run(out)
    chain = build_chain(plugins, recipe, "base8", 10, "cpu")

    def generate():
        steps = samples.load_chain(chain, out)
        return samples.generate_samples(chain, run_path=out, checkpoint_steps=steps, num_samples=3, num_classes=10,
                                        seed=0, batch_size=3, shard_size=3, device="cpu", progress=False)[0]

    first = generate()
    ema = out / "base8" / "checkpoints" / "step-00000001" / "ema.safetensors"
    written = sha256_file(ema)
    for _ in range(10):  # until the other process's metadata order differs (3 keys: 5 in 6 do)
        done = subprocess.run([sys.executable, "-c", RESAVE, str(ema.parent)], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        if sha256_file(ema) != written:
            break
    assert sha256_file(ema) != written
    monkeypatch.setattr(samples, "_sample_rows", lambda *a, **k: pytest.fail("sampled again"))
    assert generate() == first
