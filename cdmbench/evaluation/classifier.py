"""Image classifiers for evaluation (CAS): train a timm network on uint8 images, predict, cache.

Callers always hand over images as (N, 3, H, W) tensors, uint8 or float in [0, 255]; the
``Classifier`` wrapper normalises them itself. Training is SGD with Nesterov momentum 0.9 and
timm's learning-rate schedulers (a linear warm-up from 0, then cosine, or the paper's x0.1
steps), with random crops and flips drawn and applied batched on the device (``crops``): +-2 px
shifts at the images' resolution (``preprocessing="native"``), or Ravuri & Vinyals' random-resized
224 px crops and, for testing, the central crop (``"resnet224"``). Given a seed, the weights are
identical run to run on a CPU (GPU kernels may add tiny non-determinism), and so are those of a
training interrupted (SIGTERM, SIGINT, SIGKILL) and resumed from its state file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from torch import Tensor, nn

from cdmbench.data.images import to_device
from cdmbench.errors import Stopped  # noqa: F401 (what a stopped training raises: callers catch classifier.Stopped)
from cdmbench.evaluation import crops
from cdmbench.runtime import distributed
from cdmbench.runtime.progress import bar, note
from cdmbench.runtime.signals import StopSignal
from cdmbench.storage.files import atomic_write, locked
from cdmbench.training.checkpoint import weights_sha256

MOMENTUM = 0.9           # SGD's momentum (Nesterov's unless asked otherwise)
WARMUP_FRACTION = 5 / 90  # default linear warm-up: this share of training (the paper: 5 of 90 epochs)
STEP_MILESTONES = (30 / 90, 60 / 90, 80 / 90)  # default "step" schedule: x0.1 at these shares of training
STEP_DECAY = 0.1         # the "step" schedule's factor at each milestone
# how images reach the network: the training augmentation (the test view is the Classifier's)
AUGMENT = {"native": crops.shift_flip, "resnet224": crops.resized_crop_flip}
CACHE_VERSION = 2        # bump when training changes, so cached classifiers are retrained
LOSS_EVERY = 50          # steps between reads of the training loss (each waits for the GPU)
SAVE_EVERY_S = 600       # seconds between saves of the training state (when given a state file)
STATE_KEYS = {"settings", "step", "model", "optimizer", "shuffle", "augment"}  # what a state file holds

Data = tuple[Tensor, Tensor]


class Classifier(nn.Module):
    """A timm network that takes images in [0, 255] (uint8 or float) and normalises them: to
    [-1, 1] (``preprocessing="native"``), or, for ``"resnet224"`` (the TPU ResNet-50 code's), by
    ImageNet's mean and std, after taking in eval mode the test view (``crops.centre_crop``);
    training hands it images already cropped."""

    def __init__(self, net: nn.Module, preprocessing: str = "native"):
        super().__init__()
        self.net, self.preprocessing = net, preprocessing
        mean, std = ((0.5,) * 3, (0.5,) * 3) if preprocessing == "native" else (IMAGENET_DEFAULT_MEAN,
                                                                               IMAGENET_DEFAULT_STD)
        self.register_buffer("mean", 255 * torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", 255 * torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalise(self, images: Tensor) -> Tensor:
        if self.preprocessing == "resnet224" and not self.training:
            images = crops.centre_crop(images)
        return (images.float() - self.mean) / self.std

    def forward(self, images: Tensor) -> Tensor:
        return self.net(self.normalise(images))

    def features(self, images: Tensor) -> Tensor:
        """Penultimate (pre-logits) features, (N, D)."""
        return self.net.forward_head(self.net.forward_features(self.normalise(images)), pre_logits=True)


def build_classifier(*, arch: str, num_classes: int, seed: int = 0, preprocessing: str = "native") -> Classifier:
    """A freshly initialised ``Classifier`` (never downloads weights); init drawn from ``seed``."""
    if preprocessing not in AUGMENT:
        raise ValueError(f"preprocessing must be one of {sorted(AUGMENT)}, got {preprocessing!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Classifier(timm.create_model(arch, num_classes=num_classes, pretrained=False), preprocessing)


def _check_images(images: Tensor, name: str = "images") -> None:
    if not isinstance(images, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor (N, 3, H, W), got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        hint = " (channels-last? use .permute(0, 3, 1, 2))" if images.dim() == 4 and images.shape[-1] == 3 else ""
        raise ValueError(f"{name} must have shape (N, 3, H, W), got {tuple(images.shape)}{hint}")
    if len(images) == 0:
        raise ValueError(f"{name} is empty")
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise ValueError(f"{name} must be uint8 or float in [0, 255], got dtype {images.dtype}")
        if images.min() < 0 or images.max() > 255:
            raise ValueError(f"{name} are float with values in [{images.min():.3g}, {images.max():.3g}]; "
                             f"expected [0, 255] (pass uint8 images, not normalised ones)")


def _check_labels(labels: Tensor, *, n: int, num_classes: int, name: str = "labels") -> None:
    if not isinstance(labels, Tensor) or labels.dtype in (torch.bool, torch.uint8) or labels.is_floating_point() \
            or labels.is_complex():
        kind = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"{name} must be an integer (int64) tensor, got {kind}")
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match the images, got {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{name} must lie in [0, {num_classes - 1}] (num_classes={num_classes}), "
                         f"got values in [{int(labels.min())}, {int(labels.max())}]")


def schedule_epochs(epochs: int, schedule: str, warmup_epochs: float | None = None,
                    milestones: Sequence[float] | None = None) -> tuple[float, list[float]]:
    """(warm-up, milestones) in epochs: by default WARMUP_FRACTION of training, and for the "step"
    schedule STEP_MILESTONES of it (the paper's 5 and 30/60/80 of 90); "cosine" has none."""
    if schedule not in ("cosine", "step"):
        raise ValueError(f"schedule must be 'cosine' or 'step', got {schedule!r}")
    warmup = WARMUP_FRACTION * epochs if warmup_epochs is None else warmup_epochs
    if schedule == "cosine":
        if milestones:
            raise ValueError("milestones are the step schedule's: give schedule='step' or no milestones")
        if not 0 <= warmup < epochs:
            raise ValueError(f"warmup_epochs must lie in [0, epochs={epochs}), got {warmup}")
        return warmup, []
    steps = [m * epochs for m in STEP_MILESTONES] if milestones is None else list(milestones)
    if warmup < 0 or steps != sorted(steps):
        raise ValueError(f"warmup_epochs must be >= 0 and milestones ascending, got {warmup} and {steps}")
    return warmup, steps


def lr_scheduler(optimizer: torch.optim.Optimizer, *, schedule: str, epochs: int, steps_per_epoch: int,
                 warmup_epochs: float, milestones: Sequence[float]):
    """timm's scheduler of ``optimizer``'s learning rate (its ``lr``, the peak), by optimiser
    steps: ``step_update(step)`` before step ``step`` sets it. A linear warm-up from 0 over
    ``warmup_epochs``, then cosine to 0 at the end, or x STEP_DECAY at each of ``milestones``
    (epochs, from the start of training, as the TPU ResNet code counts them)."""
    warmup = warmup_epochs * steps_per_epoch
    if schedule == "cosine":
        return CosineLRScheduler(optimizer, t_initial=epochs * steps_per_epoch - warmup, warmup_t=warmup,
                                 warmup_prefix=True, t_in_epochs=False)
    # timm's convention applies milestone t at step t - 1: + 1 decays at the milestone itself
    return MultiStepLRScheduler(optimizer, decay_t=[m * steps_per_epoch + 1 for m in milestones],
                                decay_rate=STEP_DECAY, warmup_t=warmup, warmup_prefix=False, t_in_epochs=False)


def _augment(x: Tensor, generator: torch.Generator, part: slice, of: int, preprocessing: str) -> Tensor:
    """The training view of float images ``x``, part ``part`` of a batch of ``of`` (``AUGMENT``)."""
    return AUGMENT[preprocessing](x, generator, part, of)


def training_ranks(ranks: bool) -> tuple[int, int]:
    """(world size, rank) of the processes that train together: the torchrun process group's
    when ``ranks`` and one is joined, else (1, 0)."""
    return (distributed.world_size(), distributed.rank()) if ranks and distributed.joined() else (1, 0)


def train_classifier(images: Tensor, labels: Tensor, *, num_classes: int, arch: str = "resnet10t",
                     epochs: int, batch_size: int = 128, lr: float = 0.1, weight_decay: float = 5e-4,
                     schedule: str = "cosine", warmup_epochs: float | None = None,
                     milestones: Sequence[float] | None = None, nesterov: bool = True,
                     preprocessing: str = "native", seed: int = 0, device: str | torch.device = "cpu",
                     progress: bool = True, state: Path | None = None, ranks: bool = False) -> Classifier:
    """Train ``arch`` from scratch on uint8 ``images`` (N, 3, H, W) with int64 ``labels`` (N,).

    The defaults (lr 0.1 at batch 128, weight decay 5e-4, cosine, +-2 px shifts) suit small
    10-class sets at 16x16-64x64. ``lr`` is the peak, reached after ``warmup_epochs``;
    ``schedule="step"`` decays x0.1 at ``milestones`` (epochs; ``schedule_epochs`` gives the
    defaults: the paper's 5 and 30/60/80 of 90 epochs, scaled to ``epochs``). Weight decay on
    weights, not on norms and biases. SGD with momentum 0.9, Nesterov's unless ``nesterov`` is
    false. ``preprocessing``: "native" or "resnet224" (``AUGMENT``, ``Classifier``). Each batch is
    indexed where ``images`` lie and moved to ``device`` alone, so a memory-mapped set is never
    read whole. Returns the model in eval mode on ``device``.

    ``state``: a file (the caller's, for these images) where the training state is saved every
    SAVE_EVERY_S seconds and on SIGTERM / SIGINT, which then raise ``errors.Stopped`` (for SIGINT
    ``errors.Interrupted``, also a ``KeyboardInterrupt``); a call with the same file resumes from
    it. The caller deletes it once it has kept the weights.

    ``ranks``: every process of the torchrun process group trains it together, each called with
    the same arguments (its own ``device``): each takes an equal contiguous share of every
    batch, DDP averages the gradients as those of the whole batch, and batch norm normalises
    each share by its own statistics (as multi-GPU ImageNet training does; the running
    statistics are the first process's). The first process writes and reads the state; a
    state saved on another number of processes or another kind of device is not used.
    """
    _check_images(images)
    _check_labels(labels, n=len(images), num_classes=num_classes)
    if len(images) < 2:
        raise ValueError("need at least 2 training images (batch norm needs more than one per batch)")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
    warmup_epochs, milestones = schedule_epochs(epochs, schedule, warmup_epochs, milestones)
    world, rank = training_ranks(ranks)
    num_batches = math.ceil(len(images) / batch_size)  # near-equal batches: never a lone image
    if len(images) // num_batches < world:
        raise ValueError(f"batches of {len(images) // num_batches} images cannot be shared by {world} processes")
    device = torch.device(device)
    model = build_classifier(arch=arch, num_classes=num_classes, seed=seed,
                             preprocessing=preprocessing).to(device).train()
    runner = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None)

    decay = [p for p in model.parameters() if p.dim() > 1]  # no weight decay on norms and biases
    rest = [p for p in model.parameters() if p.dim() <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                                 {"params": rest, "weight_decay": 0.0}],
                                lr=lr, momentum=MOMENTUM, nesterov=nesterov)
    scheduler = lr_scheduler(optimizer, schedule=schedule, epochs=epochs, steps_per_epoch=num_batches,
                             warmup_epochs=warmup_epochs, milestones=milestones)
    shuffle = torch.Generator().manual_seed(seed)  # the same order in every process
    augment = torch.Generator(device=device).manual_seed(seed + 1)
    total = epochs * num_batches
    settings = json.dumps({"arch": arch, "num_classes": num_classes, "n": len(images), "epochs": epochs,
                           "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                           "schedule": schedule, "warmup_epochs": warmup_epochs, "milestones": milestones,
                           "nesterov": nesterov, "preprocessing": preprocessing, "seed": seed,
                           "device": device.type,
                           "processes": world,  # each process's batch norm sees its share of a batch
                           "labels_sha256": hashlib.sha256(labels.cpu().numpy().tobytes()).hexdigest()})
    saved = None if state is None else _resume(state, settings, together=world > 1)
    step = 0 if saved is None else saved["step"]
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        shuffle.set_state(saved["shuffle"])
        augment.set_state(saved["augment"])
    saved_at = time.monotonic()
    losses, summed = torch.zeros((), device=device), 0  # summed on the device, read every LOSS_EVERY steps
    with bar(total=total, initial=step, desc=f"train {arch}", unit="batch", progress=progress,
             disable=rank != 0) as shown, \
            (StopSignal() if state is not None else contextlib.nullcontext()) as stop:
        for epoch in range(step // num_batches, epochs):
            shown.set_description(f"train {arch} epoch {epoch + 1}/{epochs}")
            epoch_start = shuffle.get_state()  # saved with the state: it redraws this epoch's order
            order = torch.randperm(len(images), generator=shuffle).tensor_split(num_batches)
            for index in order[step - epoch * num_batches:]:
                scheduler.step_update(step)
                mine = slice(len(index) * rank // world, len(index) * (rank + 1) // world)
                # Only the share moves to the device (the images may be a memory-mapped dataset),
                # from pinned memory without waiting: the host gathers the next while the GPU computes.
                x = _augment(to_device(images[index[mine].to(images.device)], device).float(), augment,
                             mine, len(index), preprocessing)
                y = to_device(labels[index[mine].to(labels.device)], device).long()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    # the share's mean, weighted so that DDP's average is the whole batch's mean
                    loss = F.cross_entropy(runner(x), y) * (len(y) * world / len(index))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses += loss.detach()
                step, summed = step + 1, summed + 1
                if step % LOSS_EVERY == 0 or step == total:
                    shown.set_postfix(loss=f"{losses.item() / summed:.3f}")  # their mean
                    losses.zero_()
                    summed = 0
                shown.update()
                if stop is None:
                    continue
                stopping = stop.requested() if world > 1 else stop.received is not None  # all agree
                if rank == 0 and (stopping or time.monotonic() - saved_at >= SAVE_EVERY_S):
                    # the shuffle state that draws the order of epoch step // num_batches
                    ahead = epoch_start if step % num_batches else shuffle.get_state()
                    _save(state, settings, step, model, optimizer, ahead, augment)
                    saved_at = time.monotonic()
                if stopping:
                    if world > 1:  # torchrun stops every process once one exits: wait for the first's save
                        distributed.barrier()
                    raise stop.stopped(f"training {arch} stopped by {stop.name} after step {step} of {total}; "
                                       f"its state is in {state}: run the same command again to resume")
    return model.eval()


def _save(path: Path, settings: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
          epoch_start: Tensor, augment: torch.Generator) -> None:
    """Write the training state after ``step`` atomically (tensors, numbers and strings only);
    ``epoch_start``: the shuffle generator's state before the current epoch's order was drawn."""
    buffer = io.BytesIO()
    torch.save({"settings": settings, "step": step, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "shuffle": epoch_start,
                "augment": augment.get_state()}, buffer)
    atomic_write(path, buffer.getvalue())


def _resume(path: Path, settings: str, together: bool) -> dict | None:
    """The state saved in ``path`` for ``settings`` (with the device type and the number of
    processes), read by the first process (and sent to the others when they train
    ``together``); None (from scratch, with a warning) when it is unreadable, not a state, or was
    saved for other settings."""
    saved = reason = None
    if distributed.rank() == 0 or not together:
        if Path(path).exists():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # torch's message suggests weights_only=False: not for a damaged file
                reason = f"unreadable ({type(exc).__name__})"
            else:
                if not isinstance(saved, dict) or not STATE_KEYS <= saved.keys():
                    saved, reason = None, "not a training state"
                elif saved["settings"] != settings:
                    saved, reason = None, f"saved for other settings ({saved['settings']})"
        if reason is not None:
            warnings.warn(f"classifier training state {path} not used: {reason}; training from scratch", stacklevel=2)
    return distributed.broadcast(saved) if together else saved


@torch.no_grad()
def _batched(fn: Callable[[Tensor], Tensor], model: nn.Module, images: Tensor, batch_size: int,
             device: str | torch.device) -> Tensor:
    _check_images(images)
    was_training = model.training
    model.eval()
    try:
        return torch.cat([fn(chunk.to(device)).float().cpu() for chunk in images.split(batch_size)])
    finally:
        model.train(was_training)


def predict_logits(model: Classifier, images: Tensor, *, batch_size: int = 256,
                   device: str | torch.device = "cpu") -> Tensor:
    """Logits (N, K) of ``images`` (N, 3, H, W) in [0, 255], eval mode, on the CPU."""
    return _batched(model, model, images, batch_size, device)


def extract_features(model: Classifier, images: Tensor, *, batch_size: int = 256,
                     device: str | torch.device = "cpu") -> Tensor:
    """Penultimate pre-logits features (N, D) of ``images``, eval mode, on the CPU."""
    return _batched(model.features, model, images, batch_size, device)


def accuracy(logits: Tensor, labels: Tensor, k: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy as fractions, e.g. ``{"top1": 0.71, "top5": 0.98}``; k is capped at K."""
    _check_labels(labels, n=len(logits), num_classes=logits.shape[1])
    top = logits.topk(min(max(k), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None].to(top.device)
    return {f"top{j}": hits[:, :min(j, logits.shape[1])].any(dim=1).float().mean().item() for j in k}


def cached_classifier(*, key: dict, train_images: Tensor | Callable[[], Data],
                      train_labels: Tensor | None = None, num_classes: int, cache_dir: Path,
                      arch: str = "resnet10t", epochs: int, batch_size: int = 128, lr: float = 0.1,
                      weight_decay: float = 5e-4, schedule: str = "cosine", warmup_epochs: float | None = None,
                      milestones: Sequence[float] | None = None, nesterov: bool = True,
                      preprocessing: str = "native", seed: int = 0, device: str | torch.device = "cpu",
                      progress: bool = True, ranks: bool = False,
                      purpose: str = "") -> tuple[Classifier | None, str]:
    """Train once, then load from ``cache_dir/classifiers/<hash>.safetensors``. Before training,
    a line says what is trained, on how many images, ``purpose`` (why), and where it is kept.

    ``key`` (JSON-serialisable) names the training data, e.g. dataset, split, resolution and
    count; the file name hashes it with every training setting. ``train_images`` may be a
    callable returning ``(images, labels)`` (then leave ``train_labels`` None), so a cache hit
    never loads data. A file that does not load is retrained with a warning. An interrupted
    training resumes from ``<hash>.state.pt`` beside it (``train_classifier``'s ``state``).
    Returns the model (eval mode, on ``device``) and its weights' identity (``weights_sha256``).

    ``ranks``: every process of the torchrun process group calls it and trains on a cache miss
    (``train_classifier``'s ``ranks``; the number of processes is part of the key, as batch
    norm sees each one's share of a batch); the first process reads and writes the cache, and
    the others get (None, "") on a hit and (their copy, "") after training.
    """
    if callable(train_images) != (train_labels is None):
        raise ValueError("pass train_images and train_labels as tensors, or train_images as a callable "
                         "returning (images, labels) with train_labels=None")
    warmup_epochs, milestones = schedule_epochs(epochs, schedule, warmup_epochs, milestones)
    settings = {"key": key, "arch": arch, "epochs": epochs, "seed": seed, "num_classes": num_classes,
                "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "schedule": schedule,
                "warmup_epochs": warmup_epochs, "milestones": milestones, "nesterov": nesterov,
                "preprocessing": preprocessing, "version": CACHE_VERSION}
    world, rank = training_ranks(ranks)
    if world > 1:  # one process's classifiers keep their key
        settings["processes"] = world
    key_json = json.dumps(settings, sort_keys=True)
    name = hashlib.sha256(key_json.encode()).hexdigest()[:16]
    path = Path(cache_dir) / "classifiers" / f"{name}.safetensors"
    # concurrent evaluations train it once; the others wait and load it
    with locked(path) if rank == 0 else contextlib.nullcontext():
        cached = _load_cached(path, key_json, arch=arch, num_classes=num_classes, seed=seed,
                              preprocessing=preprocessing, device=device) if rank == 0 else None
        if (distributed.broadcast(cached is not None) if world > 1 else cached is not None):
            return cached or (None, "")
        images, labels = train_images() if callable(train_images) else (train_images, train_labels)
        if rank == 0:
            note(f"training a {arch} classifier for {epochs} epochs on {len(images):,} images of "
                 f"{images.shape[-1]}x{images.shape[-1]}" + (f": {purpose}" if purpose else "")
                 + f". Once: it is kept in {path} for later evaluations.")
        model = train_classifier(images, labels, num_classes=num_classes, arch=arch, epochs=epochs,
                                 batch_size=batch_size, lr=lr, weight_decay=weight_decay, schedule=schedule,
                                 warmup_epochs=warmup_epochs, milestones=milestones, nesterov=nesterov,
                                 preprocessing=preprocessing, seed=seed, device=device, progress=progress,
                                 state=path.with_suffix(".state.pt"), ranks=ranks)
        if rank != 0:
            return model, ""
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write(path, save(weights, metadata={"key": key_json}))  # complete or absent
        path.with_suffix(".state.pt").unlink(missing_ok=True)
        return model, weights_sha256(path)


def _load_cached(path: Path, key_json: str, *, arch: str, num_classes: int, seed: int, preprocessing: str,
                 device: str | torch.device) -> tuple[Classifier, str] | None:
    """The classifier cached in ``path`` under ``key_json`` and its identity, or None when there
    is none (or it is unreadable: then with a warning)."""
    if not path.exists():
        return None
    try:
        with safe_open(path, framework="pt") as fh:
            if (fh.metadata() or {}).get("key") != key_json:
                raise ValueError("its metadata key does not match")
        model = build_classifier(arch=arch, num_classes=num_classes, seed=seed, preprocessing=preprocessing)
        model.load_state_dict(load_file(path))
        return model.to(device).eval(), weights_sha256(path)
    except Exception as exc:
        warnings.warn(f"cached classifier {path} is unreadable ({type(exc).__name__}: {exc}); retraining", stacklevel=2)
        return None
