"""Classifier training, prediction, features and the weights cache, on tiny separable data."""

import json
import math

import pytest
import torch

from cdmbench.evaluation import classifier as C
from cdmbench.evaluation import crops

ARCH = "test_resnet"  # timm's tiny test ResNet: the same code path as resnet10t, 4x faster
COLOURS = torch.tensor([[r, g, b] for r in (40, 215) for g in (40, 215) for b in (40, 215)])  # 8
# 32 steps: enough for every seed tried (0-2) to reach 1.0 on the test colours (16 left some at 0.75-0.89)
TRAIN = {"arch": ARCH, "epochs": 8, "batch_size": 16, "progress": False}


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
    out = crops.shift_flip(images, torch.Generator().manual_seed(0))
    _, rows, cols = (out[:, 0] == 255).nonzero(as_tuple=True)
    assert len(rows) == 64  # one bright pixel in every image
    assert (rows - 8).abs().max() <= crops.PAD
    flipped = cols > 7  # mirrored about the centre: column 5 -> 10
    assert 0 < flipped.sum() < 64
    assert ((torch.where(flipped, 15 - cols, cols) - 5).abs() <= crops.PAD).all()
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 10  # shifts vary per image

# --- the paper's preprocessing (crops.py) and learning-rate schedule ---------------------------


def ramp_images(n: int, height: int, width: int) -> torch.Tensor:
    """Channel 0 holds each pixel's column, channel 1 its row: a crop says where it came from."""
    cols = torch.arange(width, dtype=torch.float).expand(height, width)
    rows = torch.arange(height, dtype=torch.float)[:, None].expand(height, width)
    return torch.stack([cols, rows, torch.zeros(height, width)]).expand(n, 3, height, width).contiguous()


def test_random_resized_crops_have_the_papers_geometry():
    """Crops of 8-100 % of the area, aspect ratio 3/4-4/3, as measured on the cropped pixels of a
    coordinate ramp: a crop of width w maps output columns S/4 and 3S/4 to w/2 apart."""
    n, side, size = 400, 64, 32
    out = crops.resized_crop_flip(ramp_images(n, side, side), torch.Generator().manual_seed(3), size=size)
    assert out.shape == (n, 3, size, size)
    q1, q3 = size // 4, 3 * size // 4
    widths = 2 * (out[:, 0, size // 2, q3] - out[:, 0, size // 2, q1])  # negative when flipped
    heights = 2 * (out[:, 1, q3, size // 2] - out[:, 1, q1, size // 2])
    drawn = crops.crop_boxes(n, side, side, torch.Generator().manual_seed(3))  # the same first draws
    # bicubic (a = -0.75) reproduces a ramp to within ~0.1 between pixel centres
    assert torch.allclose(widths.abs(), drawn[:, 3], atol=0.25) and torch.allclose(heights, drawn[:, 2], atol=0.25)
    area = widths.abs() * heights / side**2
    rounding = 2 * 0.75 / (0.08 * side**2) ** 0.5  # each side rounded to whole pixels, measured to 0.25
    assert area.min() >= 0.08 * (1 - rounding) and area.max() <= 1.0 + 1e-3
    assert area.min() < 0.12 and area.max() > 0.9  # the whole range is drawn
    aspect = widths.abs() / heights
    assert aspect.min() >= 0.75 * (1 - rounding) and aspect.max() <= 4 / 3 * (1 + rounding)
    flipped = (widths < 0).float().mean()
    assert 0.42 < flipped < 0.58  # Binomial(400, 1/2): 3.2 standard deviations
    left = out[:, 0, size // 2, 0].where(widths > 0, out[:, 0, size // 2, -1])  # the crop's first column
    assert left.min() >= -0.5 and out[:, 0].max() <= side - 0.5  # inside the image


def test_random_resized_crops_are_224_deterministic_and_shared_by_parts():
    images = ramp_images(6, 128, 128) * 2
    seeded = [crops.resized_crop_flip(images, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert seeded[0].shape == (6, 3, 224, 224)
    assert torch.equal(seeded[0], seeded[1]) and not torch.equal(seeded[0], seeded[2])
    # two processes holding halves of a batch draw for the whole batch and apply their half's draws
    halves = [crops.resized_crop_flip(images[part], torch.Generator().manual_seed(0), part, 6)
              for part in (slice(0, 3), slice(3, 6))]
    assert torch.equal(torch.cat(halves), seeded[0])


def test_random_resized_crops_resample_as_torchvision_resized_crop(monkeypatch):
    """Given a box, the batched resampling is torchvision's bicubic resized_crop (no antialias),
    away from the crop's edges, where it reads the image beyond the crop instead of repeating it."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2.functional import resized_crop

    images = 255 * torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    box = torch.tensor([3.0, 5.0, 20.0, 25.0])  # top, left, height, width
    monkeypatch.setattr(crops, "crop_boxes", lambda n, *args, **kwargs: box.expand(n, 4))
    out = crops.resized_crop_flip(images, torch.Generator().manual_seed(1), size=48)
    expected = resized_crop(images, 3, 5, 20, 25, [48, 48], interpolation=InterpolationMode.BICUBIC, antialias=False)
    for got, want in zip(out, expected, strict=True):
        error = [(got - view).abs()[:, 6:-6, 6:-6].max() for view in (want, want.flip(-1))]
        assert min(error) < 1e-3 < max(error)  # one of them: flipped or not


def test_the_test_view_is_the_tpu_codes_central_crop():
    """The central 224/256 of the shorter side, offsets rounded up, resized bicubic to 224."""
    def framed(height, width, top, left, bottom, right):
        image = torch.zeros(1, 3, height, width)
        image[..., top:height - bottom, left:width - right] = 255
        return image

    # 128 -> the central 112 (8 px off each side); 130 -> 113, 17 px off: 9 above/left, 8 below/right
    for image in (framed(128, 128, 8, 8, 8, 8), framed(130, 130, 9, 9, 8, 8), framed(128, 160, 8, 24, 8, 24)):
        view = crops.centre_crop(image)
        assert view.shape == (1, 3, 224, 224) and torch.allclose(view, torch.full_like(view, 255), atol=1e-3)
    for off_by_one in (framed(128, 128, 9, 8, 8, 8), framed(130, 130, 8, 8, 9, 9)):
        assert crops.centre_crop(off_by_one).min() < 200  # the frame shows
    image = torch.zeros(1, 3, 128, 128, dtype=torch.uint8)
    image[..., 62:66, 62:66] = 255  # a 4 px square at the centre: 8 px wide in the view, centred
    view = crops.centre_crop(image)[0, 0]
    assert view.dtype == torch.float
    # the view's central pixels read source 63.25 and 63.75 (offset 8, x2): all 4 taps in the square
    assert torch.allclose(view[111:113, 111:113], torch.tensor(255.0))
    assert view[104, 111].abs() < 1e-3 and view[111, 119].abs() < 1e-3  # taps 58-61 and 66-69: black
    weights = view.clamp(min=0)
    centre = [(weights.sum(1 - d) * torch.arange(224.0)).sum() / weights.sum() for d in (0, 1)]
    assert torch.allclose(torch.stack(centre), torch.tensor([111.5, 111.5]), atol=1e-4)


def test_a_resnet224_classifier_tests_on_the_central_view_with_imagenet_normalisation():
    from timm.data import IMAGENET_DEFAULT_MEAN

    model = C.build_classifier(arch=ARCH, num_classes=8, preprocessing="resnet224")
    seen = []
    model.net.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    mean_colour = (255 * torch.tensor(IMAGENET_DEFAULT_MEAN)).view(1, 3, 1, 1).expand(2, 3, 32, 32)
    C.predict_logits(model, mean_colour)
    assert seen[-1].shape == (2, 3, 224, 224) and seen[-1].abs().max() < 1e-5  # ImageNet's mean: 0
    model.train()(torch.zeros(2, 3, 224, 224))  # training hands it crops already: no test view
    assert seen[-1].shape == (2, 3, 224, 224)
    with pytest.raises(ValueError, match="preprocessing must be one of"):
        C.build_classifier(arch=ARCH, num_classes=8, preprocessing="resnet")


def learning_rates(schedule: str, steps, *, epochs=90, per_epoch=10, warmup=5.0, milestones=(30, 60, 80)):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4)
    scheduler = C.lr_scheduler(optimizer, schedule=schedule, epochs=epochs, steps_per_epoch=per_epoch,
                               warmup_epochs=warmup, milestones=milestones)
    rates = []
    for step in steps:
        scheduler.step_update(step)
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


def test_the_papers_learning_rate_schedule():
    """resnet_main.py: 0.4 * epoch / 5 for the first 5 epochs (from 0, per step), then 0.4,
    x0.1 from epochs 30, 60 and 80 (epoch = step / steps per epoch)."""
    steps = [0, 1, 10, 25, 49, 50, 299, 300, 599, 600, 799, 800, 899]  # 10 steps an epoch
    paper = [0, 0.008, 0.08, 0.2, 0.392, 0.4, 0.4, 0.04, 0.04, 0.004, 0.004, 4e-4, 4e-4]
    assert learning_rates("step", steps) == pytest.approx(paper, rel=1e-12)
    cosine = learning_rates("cosine", [0, 25, 50, 475, 899], milestones=())
    assert cosine == pytest.approx([0, 0.2, 0.4, 0.2, 0.2 * (1 + math.cos(math.pi * 849 / 850))])


def test_schedule_epochs_scale_the_papers_shares_and_check_their_input():
    for epochs, schedule, warmup, milestones in ((90, "step", 5, [30, 60, 80]), (18, "step", 1, [6, 12, 16]),
                                                 (18, "cosine", 1, [])):
        got = C.schedule_epochs(epochs, schedule)
        assert got[0] == pytest.approx(warmup) and got[1] == pytest.approx(milestones)
    assert C.schedule_epochs(2, "step", 5, [30, 60, 80]) == (5, [30, 60, 80])  # given: kept
    for args, message in (((4, "linear"), "schedule must be"), ((4, "cosine", 4), r"warmup_epochs must lie in \[0"),
                          ((4, "cosine", None, [2]), "milestones are the step schedule's"),
                          ((4, "step", 1, [3, 2]), "milestones ascending")):
        with pytest.raises(ValueError, match=message):
            C.schedule_epochs(*args)


def test_training_follows_the_schedule_step_by_step(monkeypatch):
    """64 images in batches of 16: 4 steps an epoch; warm-up over 1 epoch, x0.1 from epoch 1.5."""
    rates, real = [], C.lr_scheduler

    def recording(optimizer, **kwargs):
        scheduler = real(optimizer, **kwargs)
        step_update = scheduler.step_update
        scheduler.step_update = lambda step: (step_update(step), rates.append(optimizer.param_groups[0]["lr"]))
        return scheduler

    monkeypatch.setattr(C, "lr_scheduler", recording)
    images, labels = colour_images(8)
    C.train_classifier(images, labels, num_classes=8, seed=0, lr=0.4, schedule="step", warmup_epochs=1,
                       milestones=[1.5], **{**TRAIN, "epochs": 2})
    assert rates == pytest.approx([0, 0.1, 0.2, 0.3, 0.4, 0.4, 0.04, 0.04])


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
        with pytest.raises(C.Stopped, match=f"stopped by SIGTERM after step {stop_after} of 32.*state.pt: run "
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
    # float summation order, amplified over 10 steps (measured: median 5.5e-7, max 1.5e-4); a
    # wrong share or draw would move every weight by ~1e-2
    assert diffs.median() < 1e-6 and diffs.max() < 5e-4, diffs.max()
    assert all(torch.equal(first["model"][k], second["model"][k]) for k in one)  # DDP keeps them equal
    [cached] = (tmp_path / "classifiers").glob("*.safetensors")
    assert first["trained"] == (True, C.weights_sha256(cached)) and first["hit"] == first["trained"]
    assert second["trained"] == (True, "") and second["hit"] == (False, "")  # the first process owns the cache
    with safe_open(cached, framework="pt") as fh:
        assert json.loads(fh.metadata()["key"])["processes"] == 2  # batch norm saw shares of 2
    assert "after step 3 of 10" in first["stopped"] and "SIGTERM after step 3 of 10" in second["stopped"]
    assert first["resumed"] and second["resumed"]  # to the uninterrupted 2-process weights
