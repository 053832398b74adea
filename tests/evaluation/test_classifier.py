"""Classifier training, prediction, features and the weights cache, on tiny separable data."""

import json

import pytest
import torch

from cdmbench.evaluation import classifier as C

ARCH = "test_resnet"  # timm's tiny test ResNet: the same code path as resnet10t, 4x faster
COLOURS = torch.tensor([[r, g, b] for r in (40, 215) for g in (40, 215) for b in (40, 215)])  # 8
TRAIN = {"arch": ARCH, "epochs": 4, "batch_size": 16, "progress": False}


def colour_images(n_per_class: int, *, num_classes: int = 8, resolution: int = 16,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c: a noisy image of colour c (a corner of the RGB cube); separable by colour alone."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    noise = 25 * torch.randn(len(labels), 3, resolution, resolution, generator=g)
    images = COLOURS[labels][:, :, None, None] + noise
    return images.round().clamp(0, 255).to(torch.uint8), labels


@pytest.fixture(scope="module")
def data():
    return colour_images(8), colour_images(10, seed=1)


@pytest.fixture(scope="module")
def model(data):
    (images, labels), _ = data
    return C.train_classifier(images, labels, num_classes=8, seed=0, **TRAIN)


def test_learns_separable_data(model, data):
    _, (test_images, test_labels) = data
    acc = C.accuracy(C.predict_logits(model, test_images), test_labels)
    assert acc["top1"] >= 0.95, acc
    assert not model.training


def test_same_seed_same_weights(model, data):
    (images, labels), _ = data
    again = C.train_classifier(images, labels, num_classes=8, seed=0, **TRAIN)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_predict_and_features_batched(model, data):
    _, (images, _) = data
    logits = C.predict_logits(model, images, batch_size=7)
    assert torch.allclose(logits, C.predict_logits(model, images.float()), atol=1e-5)  # float 0..255 too
    assert logits.shape == (len(images), 8)
    features = C.extract_features(model, images, batch_size=7)
    assert features.shape == (len(images), model.net.num_features)
    default = C.build_classifier(arch="resnet10t", num_classes=8)
    assert C.extract_features(default, images[:2]).shape == (2, 512)


def test_augment_flips_and_shifts():
    images = torch.zeros(64, 3, 16, 16)
    images[:, :, 8, 5] = 255  # one bright pixel, left of centre
    out = C._augment(images, torch.Generator().manual_seed(0))
    _, rows, cols = (out[:, 0] == 255).nonzero(as_tuple=True)
    assert len(rows) == 64  # one bright pixel in every image
    assert (rows - 8).abs().max() <= C.PAD
    flipped = cols > 7  # mirrored about the centre: column 5 -> 10
    assert 0 < flipped.sum() < 64
    assert ((torch.where(flipped, 15 - cols, cols) - 5).abs() <= C.PAD).all()
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 10  # shifts vary per image

def test_accuracy_topk_capped():
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    labels = torch.tensor([0, 1, 2])
    assert C.accuracy(logits, labels) == pytest.approx({"top1": 1 / 3, "top5": 1.0})
    assert C.accuracy(logits, labels, k=(2,)) == pytest.approx({"top2": 2 / 3})


@pytest.mark.parametrize("images, labels, message", [
    (torch.zeros(4, 3, 8, 8, dtype=torch.int32), torch.zeros(4, dtype=torch.long), "uint8 or float"),
    (torch.zeros(4, 8, 8, 3, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), "channels-last"),
    (torch.zeros(4, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), r"shape \(N, 3, H, W\)"),
    (torch.zeros(0, 3, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), "is empty"),
    (-torch.ones(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), "expected \\[0, 255\\]"),
    (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4), "integer"),
    (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), r"shape \(4,\)"),
    (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 2, 8]), r"\[0, 7\]"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, dtype=torch.long), "at least 2"),
])
def test_bad_input_errors(images, labels, message):
    with pytest.raises(ValueError, match=message):
        C.train_classifier(images, labels, num_classes=8, epochs=1, arch=ARCH, progress=False)


def test_cache_trains_once(tmp_path, monkeypatch, capsys, model, data):
    (images, labels), _ = data
    kwargs = dict(num_classes=8, cache_dir=tmp_path, seed=0, device="cpu", purpose="the colours test", **TRAIN)
    first, digest = C.cached_classifier(key={"data": "colours"}, train_images=images,
                                        train_labels=labels, **kwargs)
    assert torch.equal(first.state_dict()["net.fc.weight"], model.state_dict()["net.fc.weight"])
    [path] = (tmp_path / "classifiers").glob("*.safetensors")
    said = capsys.readouterr().out  # what is trained, why, and where it is kept
    assert said.startswith(f"training a {ARCH} classifier for {TRAIN['epochs']} epochs on {len(images):,} images "
                           f"of {images.shape[-1]}x{images.shape[-1]}: the colours test. Once: it is kept in {path}")
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".lock"]  # no temp files

    def fail(*args, **kwargs):
        raise AssertionError("retrained or loaded data on a cache hit")

    monkeypatch.setattr(C, "train_classifier", fail)
    second, digest2 = C.cached_classifier(key={"data": "colours"}, train_images=fail, **kwargs)
    assert digest2 == digest and capsys.readouterr().out == ""
    assert not second.training
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(AssertionError, match="cache hit"):  # another key is another file
        C.cached_classifier(key={"data": "other"}, train_images=fail, **kwargs)


def test_concurrent_users_of_the_cache_train_once(tmp_path, monkeypatch, data):
    import threading
    import time

    (images, labels), _ = data
    trained = []
    real = C.train_classifier

    def slow(*args, **kwargs):  # long enough for the other user to ask meanwhile
        trained.append(1)
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "train_classifier", slow)
    kwargs = dict(key={"data": "colours"}, train_images=lambda: (images, labels), num_classes=8,
                  cache_dir=tmp_path, seed=0, device="cpu", **TRAIN)
    digests = []
    users = [threading.Thread(target=lambda: digests.append(C.cached_classifier(**kwargs)[1])) for _ in range(2)]
    for user in users:
        user.start()
    for user in users:
        user.join()
    assert len(trained) == 1 and len(digests) == 2 and digests[0] == digests[1]


def test_corrupt_cache_is_retrained(tmp_path, data):
    (images, labels), _ = data
    kwargs = dict(key={"data": "colours"}, train_images=lambda: (images, labels), num_classes=8,
                  cache_dir=tmp_path, seed=0, device="cpu", **TRAIN)
    _, digest = C.cached_classifier(**kwargs)
    [path] = (tmp_path / "classifiers").glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:1000])  # a truncated file
    with pytest.warns(UserWarning, match="unreadable.*retraining"):
        _, digest2 = C.cached_classifier(**kwargs)
    assert digest2 == digest  # retrained to the same weights, written whole again


def events_of_4_and_7_steps(watch, device: str = "cpu") -> tuple[list[str], list[str]]:
    """What ``watch()`` (a context manager yielding a list it fills) collects while the classifier
    trains 4 and then 7 steps, fewer than LOSS_EVERY (after a first run: cuDNN's set-up)."""
    images, labels = colour_images(8)

    def events(batches: int) -> list[str]:
        with watch() as found:
            C.train_classifier(images, labels, num_classes=8, seed=0, device=device,
                               **{**TRAIN, "epochs": 1, "batch_size": len(images) // batches})
        return found

    events(3)
    return events(3), events(6)  # 64 images in batches of 21 and 10: 4 and 7 steps


def test_steps_between_loss_reads_read_nothing_on_the_host():
    """On a GPU a host read waits for every queued kernel, so the next batch could not be gathered
    (from a memory-mapped set) while the GPU trains: 4 and 7 steps read the same."""
    from tests.training.test_run import host_reads

    short, long = events_of_4_and_7_steps(host_reads)
    assert len(short) == len(long), (short, long)


def _stop_at(monkeypatch, call: int) -> None:
    """SIGTERM this process in the ``call``-th batch's augmentation (step ``call`` - 1)."""
    import os
    import signal

    calls, real = [], C._augment

    def augment(*args):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(C, "_augment", augment)


@pytest.mark.parametrize("stop_after", [6, 8])  # mid-epoch, and at the end of epoch 2 (4 batches each)
def test_a_stopped_training_saves_its_state_and_resumes_to_the_same_weights(tmp_path, monkeypatch, model, data,
                                                                             stop_after):
    (images, labels), _ = data
    kwargs = dict(key={"data": "colours"}, train_images=images, train_labels=labels, num_classes=8,
                  cache_dir=tmp_path, seed=0, device="cpu", **TRAIN)
    with monkeypatch.context() as patch:
        _stop_at(patch, stop_after)
        with pytest.raises(C.Stopped, match=f"stopped by SIGTERM after step {stop_after} of 16.*state.pt: run "
                                            "the same command again to resume"):
            C.cached_classifier(**kwargs)
    [state] = (tmp_path / "classifiers").glob("*.state.pt")
    assert torch.load(state, weights_only=True)["step"] == stop_after
    assert not list((tmp_path / "classifiers").glob("*.safetensors"))  # no weights of a half-trained model
    resumed, _ = C.cached_classifier(**kwargs)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # as the uninterrupted fixture, BN statistics included
    assert not state.exists()  # removed once the weights are kept


def test_a_state_saved_for_other_settings_is_not_used(tmp_path, monkeypatch, model, data):
    (images, labels), _ = data
    state = tmp_path / "train.state.pt"
    with monkeypatch.context() as patch:
        _stop_at(patch, 3)
        with pytest.raises(C.Stopped):
            C.train_classifier(images, labels, num_classes=8, seed=1, state=state, **TRAIN)  # another seed
    with pytest.warns(UserWarning, match="saved for other settings.*training from scratch"):
        again = C.train_classifier(images, labels, num_classes=8, seed=0, state=state, **TRAIN)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    # a state saved on a GPU (its generator state is 16 bytes, a CPU one's 5056) is not restored on a CPU
    state.unlink()
    with monkeypatch.context() as patch:
        _stop_at(patch, 3)
        with pytest.raises(C.Stopped):
            C.train_classifier(images, labels, num_classes=8, seed=0, state=state, **TRAIN)
    saved = torch.load(state, weights_only=True)
    settings = json.loads(saved["settings"])
    assert settings["device"] == "cpu" and settings["processes"] == 1
    torch.save({**saved, "settings": json.dumps({**settings, "device": "cuda"}),
                "augment": torch.zeros(16, dtype=torch.uint8)}, state)
    with pytest.warns(UserWarning, match="saved for other settings.*cuda.*training from scratch"):
        again = C.train_classifier(images, labels, num_classes=8, seed=0, state=state, **TRAIN)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    for junk, reason in ((b"not a state", r"unreadable \(UnpicklingError\)"), ([1, 2], "not a training state")):
        state.write_bytes(junk) if isinstance(junk, bytes) else torch.save(junk, state)
        with pytest.warns(UserWarning, match=f"not used: {reason}; training from scratch"):
            C.train_classifier(images, labels, num_classes=8, seed=0, state=state, **{**TRAIN, "epochs": 1})


@pytest.mark.slow
def test_sigkill_and_restart_of_a_training_reach_the_weights_of_an_uninterrupted_one(tmp_path):
    """The state is saved after every step (SAVE_EVERY_S = 0); the kill lands anywhere, mid-write too."""
    import signal
    import subprocess
    import sys
    import time

    settings = {**TRAIN, "epochs": 16, "batch_size": 4}  # 256 steps
    state = tmp_path / "train.state.pt"
    child = (
        "import torch; from cdmbench.evaluation import classifier as C\n"
        "from tests.evaluation.test_classifier import colour_images\n"
        f"C.SAVE_EVERY_S = 0\n"
        f"C.train_classifier(*colour_images(8), num_classes=8, seed=0, state={str(state)!r}, **{settings!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    proc.kill()
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == -signal.SIGKILL, out.decode()[-2000:]
    step = torch.load(state, weights_only=True)["step"]
    assert 0 < step < 256
    resumed = C.train_classifier(*colour_images(8), num_classes=8, seed=0, state=state, **settings)
    straight = C.train_classifier(*colour_images(8), num_classes=8, seed=0, **settings)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


TWO_PROCESSES = """
import os
import signal
import sys
import torch
from cdmbench.evaluation import classifier as C
from cdmbench.runtime import distributed
from tests.evaluation.test_classifier import colour_images

distributed.init(torch.device("cpu"))
out, settings = sys.argv[1], eval(sys.argv[2])
images, labels = colour_images(8)
model = C.train_classifier(images, labels, num_classes=8, seed=0, ranks=True, **settings)
cache = dict(key={"data": "colours"}, train_images=images, train_labels=labels, num_classes=8, cache_dir=out,
             seed=0, ranks=True, **settings)
trained, hit = C.cached_classifier(**cache), C.cached_classifier(**cache)

# SIGTERM reaches the second process only, in its third batch: both stop after step 3, and resume
calls, augment = [], C._augment
def stopping(*args):
    calls.append(1)
    if len(calls) == 3 and distributed.rank() == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return augment(*args)
C._augment = stopping
try:
    C.train_classifier(images, labels, num_classes=8, seed=0, ranks=True, state=f"{out}/state.pt", **settings)
except C.Stopped as stop:
    stopped = str(stop)
C._augment = augment
resumed = C.train_classifier(images, labels, num_classes=8, seed=0, ranks=True, state=f"{out}/state.pt", **settings)
torch.save({"model": model.state_dict(), "trained": (trained[0] is not None, trained[1]),
            "hit": (hit[0] is not None, hit[1]), "stopped": stopped,
            "resumed": all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                             resumed.state_dict().values()))},
           f"{out}/rank{distributed.rank()}.pt")
"""


@pytest.mark.slow
def test_two_processes_train_a_classifier_to_the_weights_of_one(tmp_path):
    """Each process takes its share of every batch (uneven: batches of 13 and 12 images) and
    draws the whole batch's augmentation; the network has no batch norm, whose statistics are
    each share's."""
    import os
    import subprocess
    import sys

    from safetensors import safe_open

    settings = {"arch": "test_efficientnet_gn", "epochs": 2, "batch_size": 13, "progress": False}
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESSES)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                           str(tmp_path), repr(settings)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 0, done.stdout + done.stderr
    one = C.train_classifier(*colour_images(8), num_classes=8, seed=0, **settings).state_dict()
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    diffs = torch.cat([(first["model"][k] - one[k]).abs().flatten() for k in one])
    assert diffs.median() < 1e-6 and diffs.max() < 1e-4, diffs.max()  # float summation order
    assert all(torch.equal(first["model"][k], second["model"][k]) for k in one)  # DDP keeps them equal
    [cached] = (tmp_path / "classifiers").glob("*.safetensors")
    assert first["trained"] == (True, C.weights_sha256(cached)) and first["hit"] == first["trained"]
    assert second["trained"] == (True, "") and second["hit"] == (False, "")  # the first process owns the cache
    with safe_open(cached, framework="pt") as fh:
        assert json.loads(fh.metadata()["key"])["processes"] == 2  # batch norm saw shares of 2
    assert "after step 3 of 10" in first["stopped"] and "SIGTERM after step 3 of 10" in second["stopped"]
    assert first["resumed"] and second["resumed"]  # to the uninterrupted 2-process weights
