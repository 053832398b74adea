"""Training one stage: AdamW, EMA, checkpoints, and exact resume.

Every random draw of step k (batch order aside) comes from the global RNG re-seeded with
(seed, stage, k), and the batch order from a per-epoch permutation seeded with (seed, stage,
epoch), so a run resumed from the checkpoint of step k continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cdmbench.cascade.stages import StageModel, derive_seed, image_generators
from cdmbench.data.images import ImageSet, to_device, to_float
from cdmbench.diffusion.process import q_sample
from cdmbench.diffusion.process import training_loss as diffusion_loss
from cdmbench.errors import CdmbenchError, Stopped
from cdmbench.runtime import distributed
from cdmbench.runtime.signals import StopSignal
from cdmbench.storage.files import atomic_write
from cdmbench.tracking.loggers import Loggers
from cdmbench.training.checkpoint import resume_latest, save_checkpoint
from cdmbench.training.posthoc_ema import SNAPSHOTS, PowerEMA, drop_snapshots_after, gamma_of, save_snapshot

SLOW_CHECKPOINT_S = 20  # a checkpoint slower than this to write is reported (a stop signal's grace time)


@functools.lru_cache(maxsize=2)  # a batch spans at most two epochs
def epoch_permutation(n: int, seed: int, stage_index: int, epoch: int) -> Tensor:
    """The order of the ``n`` training images in ``epoch``: drawn once per epoch, not per step
    (1.28 M ImageNet indices take ~15 ms to draw)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, stage_index, epoch)))


def batch_indices(n: int, batch_size: int, step: int, seed: int, stage_index: int) -> Tensor:
    """Indices of step ``step``'s batch: consecutive slices of per-epoch random permutations."""
    start, parts, have = step * batch_size, [], 0
    while have < batch_size:
        epoch, offset = divmod(start + have, n)
        parts.append(epoch_permutation(n, seed, stage_index, epoch)[offset:offset + batch_size - have])
        have += len(parts[-1])
    return torch.cat(parts)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for parameters and floating buffers."""
    e_params = [p for p in ema.parameters()]
    m_params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e_params, m_params, 1.0 - decay)
    for e, m in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(m)


@dataclass
class Batch:
    """One global batch with every random draw made for all of it, so that a process's slice
    (or a micro-batch) sees the same draws whatever the number of processes. Each process reads
    only its own images; the other processes' rows hold zeros (their draws are made, not used)."""

    x0: Tensor
    labels: Tensor
    low_res: Tensor | None
    aug_cond: Tensor | None
    t: Tensor
    abar: Tensor
    noise_cond: Tensor
    eps: Tensor
    x_t: Tensor

    def part(self, sl: slice) -> Batch:
        return Batch(**{k: None if v is None else v[sl] for k, v in vars(self).items()})


def make_batch(stage: StageModel, data: ImageSet, idx: Tensor, device: torch.device | str) -> Batch:
    """x_t ~ q(x_t | x_0) at uniform t, random flips (the same for x_0 and low-res; drawn even
    when train.flip is false, so the other draws are unchanged), the augmented low-res input,
    labels dropped to the null class with probability guidance.label_dropout."""
    flip = (torch.rand(len(idx)) < 0.5) & stage.spec.train.flip
    own = _process_rows(len(idx))

    def fetch(res: int) -> Tensor:
        x = data.images[res][idx[own]]
        x = to_device(torch.where(flip[own].view(-1, 1, 1, 1), x.flip(-1), x), device)
        if distributed.world_size() > 1:
            full = torch.zeros((len(idx), *x.shape[1:]), dtype=x.dtype, device=device)
            full[own] = x
            x = full
        return to_float(x)

    x0, labels = fetch(stage.spec.resolution), to_device(data.labels[idx], device)
    low_res, aug_cond = None, None
    if stage.low_res is not None:
        low_res, aug_cond = stage.train_condition(fetch(stage.low_res))
    if stage.null_label is not None:
        drop = torch.rand(len(idx), device=device) < stage.spec.guidance.label_dropout
        labels = torch.where(drop, torch.full_like(labels, stage.null_label), labels)
    t, abar, noise_cond = stage.process.training_points(len(idx), device)
    eps = torch.randn_like(x0)
    return Batch(x0, labels, low_res, aug_cond, t, abar, noise_cond, eps, q_sample(x0, abar, eps))


def batch_loss(stage: StageModel, model: nn.Module, b: Batch) -> Tensor:
    """Per-example loss of the stage on (a part of) a batch."""
    output = stage.forward(model, b.x_t, b.noise_cond, b.labels, b.low_res, b.aug_cond)
    return diffusion_loss(stage.spec.loss, output=output, x0=b.x0, eps=b.eps, x_t=b.x_t, t=b.t,
                          abar=b.abar, process=stage.process, vlb_weight=stage.spec.vlb_weight)


def check_batch(batch_size: int, accumulation: int) -> None:
    world = distributed.world_size()
    if batch_size % (world * accumulation):
        raise CdmbenchError(f"train.batch_size {batch_size} is the global batch; it must divide "
                            f"evenly into {world} processes x {accumulation} accumulation steps")


def _process_rows(batch_size: int) -> slice:
    """This process's equal, contiguous share of a global batch."""
    per_rank = batch_size // distributed.world_size()
    return slice(distributed.rank() * per_rank, (distributed.rank() + 1) * per_rank)


def _micro_batches(batch_size: int, accumulation: int) -> list[slice]:
    """This process's share of a global batch, in micro-batches."""
    rows = _process_rows(batch_size)
    micro = (rows.stop - rows.start) // accumulation
    return [slice(rows.start + k * micro, rows.start + (k + 1) * micro) for k in range(accumulation)]


def train_step(stage: StageModel, model: nn.Module, data: ImageSet, idx: Tensor,
               device: torch.device | str) -> Tensor:
    """Forward and backward of this process's share of the global batch ``idx``; returns the
    global batch's mean loss (the same value in every process)."""
    return backward(stage, model, make_batch(stage, data, idx, device))


def backward(stage: StageModel, model: nn.Module, batch: Batch) -> Tensor:
    """Forward and backward of this process's share of ``batch``, in micro-batches; returns the
    batch's mean loss (the same value in every process)."""
    spec = stage.spec.train
    device = batch.x0.device
    slices = _micro_batches(len(batch.x0), spec.grad_accumulation)
    total = torch.zeros((), device=device)
    for k, sl in enumerate(slices):
        last = k == len(slices) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync, torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                                  enabled=spec.precision == "bf16"):
            loss = batch_loss(stage, model, batch.part(sl)).mean() / len(slices)
        loss.backward()
        total += loss.detach()
    return distributed.mean(total)


def _learning_rate(spec, step: int) -> float:
    """Linear warm-up over train.warmup_steps, then constant."""
    return spec.lr * min(1.0, (step + 1) / spec.warmup_steps) if spec.warmup_steps else spec.lr


class Trainer:
    """A stage's weights, their EMA and AdamW, and one training step on them. ``runner`` is what
    the step calls: the same weights, wrapped for DDP and/or compiled by ``wrap``.

    A step makes no host-device synchronisation: the loss stays on the device (the caller reads
    it when it logs), batches are copied from pinned memory, and AdamW is fused (one kernel for
    all parameters, on CPUs too, with no per-parameter read of the step count)."""

    def __init__(self, stage: StageModel, model: nn.Module, device: torch.device | str):
        self.stage, self.spec, self.device = stage, stage.spec.train, device
        torch.backends.cudnn.benchmark = self.spec.cudnn_benchmark
        if self.spec.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = self.runner = model
        self.ema = copy.deepcopy(model).requires_grad_(False)
        sigma_rels = self.spec.posthoc_ema.sigma_rels  # EDM2's power-function EMAs, when kept
        self.posthoc = PowerEMA(dict(model.named_parameters()), [gamma_of(s) for s in sigma_rels],
                                dict(model.named_buffers())) if sigma_rels else None
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.spec.lr,
                                           weight_decay=self.spec.weight_decay, fused=True)

    def wrap(self, compile: bool) -> None:
        """DDP under torchrun, then ``torch.compile``; call after loading a checkpoint."""
        if distributed.world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel

            index = torch.device(self.device).index if torch.device(self.device).type == "cuda" else None
            self.runner = DistributedDataParallel(self.model, device_ids=None if index is None else [index])
        if compile:
            self.runner = torch.compile(self.runner)

    def step(self, data: ImageSet, idx: Tensor, step: int) -> Tensor:
        """Training step ``step`` on the global batch ``idx``; returns (mean loss, gradient norm
        before clipping) on the device."""
        for group in self.optimizer.param_groups:
            group["lr"] = _learning_rate(self.spec, step)
        self.optimizer.zero_grad(set_to_none=True)
        loss = train_step(self.stage, self.runner, data, idx, self.device)
        if self.spec.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        self.optimizer.step()
        update_ema(self.ema, self.model, self.spec.ema)
        if self.posthoc is not None:
            self.posthoc.update(step + 1)
        return torch.stack([loss, norm.to(loss.dtype)])


def _first_non_finite(steps: list[Tensor]) -> tuple[list[list[float]], int | None]:
    """The steps' (loss, gradient norm) as floats (one host read for all of them) and the index
    of the first step where either is NaN or infinite, if any."""
    values = torch.stack(steps).tolist()
    return values, next((i for i, v in enumerate(values) if not all(map(math.isfinite, v))), None)


def _stopped(stage: StageModel, stop: StopSignal, step: int, ckpt_dir: Path) -> Stopped:
    return stop.stopped(f"stage {stage.spec.name}: stopped by {stop.name} after step {step}; its checkpoint "
                        f"is in {ckpt_dir}: run the same command again to resume")


def _non_finite(loss: float, grad_norm: float) -> str:
    if not math.isfinite(loss):
        return f"loss is {loss}"
    return f"gradient norm is {grad_norm} (loss {loss:.4g})"


def train_stage(stage: StageModel, data: ImageSet, *, folder: Path, seed: int,
                metadata: dict[str, Any], device: torch.device | str,
                progress: bool = True, echo=print, loggers: Loggers | None = None,
                after_step: Callable[[int, nn.Module], None] | None = None) -> nn.Module:
    """Train (or resume) ``stage`` up to its recipe's step count; returns the EMA model.

    Every ``log_every`` steps a row (step, mean loss and images/s since the previous row, training
    seconds so far across resumes, peak GPU memory) goes to train_log.jsonl and the run's
    ``loggers`` (told first which step the stage starts from), and without a progress bar (batch
    jobs) to ``echo`` as a line with the time left. The host reads the losses only then and
    before a checkpoint: a NaN or infinite loss stops the run there, naming the step it first
    appeared at, before a checkpoint of the spoiled weights is written.

    ``after_step(steps done, EMA model)`` is called after each step and its checkpoint, unless a
    stop was asked for, and once with the step a resumed run starts from (evaluation during
    training, ``cdmbench.evaluation.during_training``, which must leave training as it was)."""
    spec = stage.spec.train
    check_batch(spec.batch_size, spec.grad_accumulation)
    trainer = Trainer(stage, stage.backbone, device)
    ckpt_dir = folder / "checkpoints"
    main = distributed.is_main()
    if main:
        folder.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    posthoc = {} if trainer.posthoc is None else {"posthoc_ema": trainer.posthoc}
    start = resume_latest(ckpt_dir, model=trainer.model, ema=trainer.ema, optimizer=trainer.optimizer, extra=posthoc)
    snapshots = folder / SNAPSHOTS
    if main and posthoc:
        drop_snapshots_after(snapshots, start)
    trainer.wrap(spec.compile)
    if start > spec.steps:
        raise CdmbenchError(f"{ckpt_dir} holds step {start}, beyond train.steps={spec.steps}; "
                            "raise train.steps or use another --out")
    if after_step is not None:
        after_step(start, trainer.ema)
    log_path = folder / "train_log.jsonl"
    earlier = _truncate_log(log_path, start) if main else []
    elapsed = earlier[-1].get("seconds", 0.0) if earlier else 0.0  # training time before this resume
    loggers = loggers or Loggers()
    loggers.start_stage(stage.spec.name, start)
    pending: list[Tensor] = []  # (loss, gradient norm) per step on the device, not yet read
    window: list[list[float]] = []  # those read since the last log row
    images, seconds = 0, 0.0  # trained in that window
    total = 0.0  # seconds trained since this start
    said_slow = False  # whether a slow checkpoint was reported
    trainer.model.train()
    bar = tqdm(range(start, spec.steps), initial=start, total=spec.steps,
               desc=f"train {stage.spec.name}", disable=not (progress and main))
    with StopSignal() as stop:
        for step in bar:
            tick = time.perf_counter()
            torch.manual_seed(derive_seed(seed, stage.index, step, 1))
            idx = batch_indices(len(data), spec.batch_size, step, seed, stage.index)
            pending.append(trainer.step(data, idx, step))
            images += len(idx)
            done = step + 1
            stopping = stop.requested()
            log_now = done % spec.log_every == 0 or done == spec.steps
            save_now = done % spec.checkpoint_every == 0 or done == spec.steps or stopping
            if log_now or save_now:  # every process sees the same (averaged) losses
                values, bad = _first_non_finite(pending)
                if bad is not None:
                    raise CdmbenchError(f"stage {stage.spec.name}: {_non_finite(*values[bad])} at step "
                                        f"{done - len(values) + bad + 1}; lower train.lr (now {spec.lr}) or "
                                        f"set train.grad_clip. The last good checkpoint in {ckpt_dir} is kept.")
                window += values
                pending.clear()
            step_time = time.perf_counter() - tick  # reading the losses waited for the GPU's steps
            seconds, total = seconds + step_time, total + step_time
            if main and (log_now or save_now):  # a row at each checkpoint too: a resume loses no steps
                row = {"step": done, "loss": sum(v[0] for v in window) / len(window),
                       "grad_norm": sum(v[1] for v in window) / len(window), "images_per_s": images / seconds,
                       "seconds": elapsed + total}
                if torch.device(device).type == "cuda":
                    row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                with open(log_path, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                loggers.log_scalars(stage.spec.name, {k: v for k, v in row.items() if k != "step"}, done)
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.3g}")
                if bar.disable:
                    memory = f", {row['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in row else ""
                    left = round((spec.steps - done) * total / (done - start))
                    echo(f"train {stage.spec.name} step {done}/{spec.steps}: loss {row['loss']:.4f}, "
                         f"{row['images_per_s']:.0f} img/s{memory}, {left // 60}m{left % 60:02d}s left")
            if log_now or save_now:
                window.clear()
                images, seconds = 0, 0.0
            if main and posthoc and (done % spec.posthoc_ema.snapshot_every == 0 or done == spec.steps):
                save_snapshot(snapshots, done, trainer.posthoc, spec.posthoc_ema.sigma_rels)
            if save_now:
                if main:
                    began = time.perf_counter()
                    save_checkpoint(ckpt_dir, done, model=trainer.model, ema=trainer.ema,
                                    optimizer=trainer.optimizer, metadata=metadata,
                                    keep=spec.keep_checkpoints, milestone_every=spec.milestone_every,
                                    extra={name: p.state_dict() for name, p in posthoc.items()})
                    took = time.perf_counter() - began
                    if took > SLOW_CHECKPOINT_S and not said_slow:
                        said_slow = True
                        echo(f"a checkpoint of {stage.spec.name} takes {took:.0f} s to write: a preempted job "
                             f"must get that long between SIGTERM and SIGKILL (torchrun's agent waits 30 s; a "
                             f"scheduler's grace time) to save its last steps, else up to checkpoint_every="
                             f"{spec.checkpoint_every} steps are trained again")
                distributed.barrier()
            if stopping:
                raise _stopped(stage, stop, done, ckpt_dir)
            if after_step is not None:
                after_step(done, trainer.ema)
        if stop.requested():  # during the last step's checkpoint: the stage is done, the job is not
            raise _stopped(stage, stop, spec.steps, ckpt_dir)
    bar.close()
    return trainer.ema.eval()


@torch.no_grad()
def validation_bpd(stage: StageModel, model: nn.Module, data: ImageSet, *, seed: int,
                   device: torch.device | str, progress: bool = True) -> float:
    """Mean variational bound on -log p(x_0) in bits/dim over ``data`` (hybrid-loss stages), for
    SR stages conditioned on the ground-truth low-res image augmented as at sampling time."""
    total, n = 0.0, len(data)
    for lo in range(0, n, stage.spec.train.batch_size):
        idx = torch.arange(lo, min(lo + stage.spec.train.batch_size, n))
        x0 = to_float(data.images[stage.spec.resolution][idx].to(device))
        low_res, aug_cond = None, None
        if stage.low_res is not None:
            gens = image_generators(seed, stage.index, idx.tolist(), device)
            low_res, aug_cond = stage.condition(to_float(data.images[stage.low_res][idx].to(device)), gens,
                                                ground_truth=True)
        denoise = stage.denoiser(model, data.labels[idx].to(device), low_res, aug_cond, guidance_scale=1.0,
                                 precision="fp32")  # a likelihood: in full precision
        generator = torch.Generator(device).manual_seed(derive_seed(seed, stage.index, lo, 2))
        total += stage.process.bits_per_dim(denoise, x0, generator=generator, progress=progress).sum().item()
    return total / n


def _truncate_log(path: Path, step: int) -> list[dict[str, Any]]:
    """Drop log rows written after the checkpoint a run resumes from; returns the rows kept."""
    if not path.exists():
        return []
    rows = [row for row in read_log(path.parent) if row["step"] <= step]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))  # a crash here keeps the old log
    return rows


def read_log(folder: Path) -> list[dict[str, Any]]:
    """The rows of <stage>/train_log.jsonl. A last line cut short (a crash while appending) is
    dropped: the resume that follows rewrites the log from its checkpoint's step."""
    path = folder / "train_log.jsonl"
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number < len(lines):
                raise CdmbenchError(f"{path} line {number} is not JSON ({exc}); delete that line") from None
    return rows
