"""Training one stage: AdamW, EMA, checkpoints, and exact resume.

Every random draw of step k (batch order aside) comes from the global RNG re-seeded with
(seed, stage, k), and the batch order from a per-epoch permutation seeded with (seed, stage,
epoch), so a run resumed from the checkpoint of step k continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .cascade import StageModel, derive_seed, image_generators
from .checkpoint import resume_latest, save_checkpoint
from .data import ImageSet, to_float
from .diffusion import q_sample, training_loss as diffusion_loss
from .errors import CdmbenchError


def batch_indices(n: int, batch_size: int, step: int, seed: int, stage_index: int) -> Tensor:
    """Indices of step ``step``'s batch: consecutive slices of per-epoch random permutations."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, stage_index, epoch)))
        out.extend(perm[offset:offset + batch_size - len(out)].tolist())
    return torch.tensor(out)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for parameters and floating buffers."""
    e_params = [p for p in ema.parameters()]
    m_params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e_params, m_params, 1.0 - decay)
    for e, m in zip(ema.buffers(), model.buffers()):
        e.copy_(m)


def training_loss(stage: StageModel, model: nn.Module, data: ImageSet, idx: Tensor,
                  device: torch.device | str) -> Tensor:
    """The stage's loss on one batch: x_t ~ q(x_t | x_0) at uniform t, augmented low-res input,
    labels dropped to the null class with probability guidance.label_dropout."""
    r = stage.spec.resolution
    flip = torch.rand(len(idx)) < 0.5  # random horizontal flips, the same for x_0 and low-res

    def fetch(res: int) -> Tensor:
        x = data.images[res][idx]
        return to_float(torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x).to(device))

    x0, labels = fetch(r), data.labels[idx].to(device)
    low_res, aug_cond = None, None
    if stage.low_res is not None:
        low_res, aug_cond = stage.augmentation.train(fetch(stage.low_res))
    if stage.null_label is not None:
        drop = torch.rand(len(idx), device=device) < stage.spec.guidance.label_dropout
        labels = torch.where(drop, torch.full_like(labels, stage.null_label), labels)
    t, abar, noise_cond = stage.process.training_points(len(idx), device)
    eps = torch.randn_like(x0)
    x_t = q_sample(x0, abar, eps)
    output = stage.forward(model, x_t, noise_cond, labels, low_res, aug_cond)
    return diffusion_loss(stage.spec.loss, output=output, x0=x0, eps=eps, x_t=x_t, t=t, abar=abar,
                          process=stage.process, vlb_weight=stage.spec.vlb_weight).mean()


def train_stage(stage: StageModel, data: ImageSet, *, folder: Path, seed: int,
                metadata: dict[str, Any], device: torch.device | str,
                progress: bool = True) -> nn.Module:
    """Train (or resume) ``stage`` up to its recipe's step count; returns the EMA model.

    Every ``log_every`` steps a row (step, mean loss, images/s) goes to train_log.jsonl."""
    spec = stage.spec.train
    model = stage.backbone
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    ckpt_dir = folder / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    start = resume_latest(ckpt_dir, model=model, ema=ema, optimizer=optimizer)
    if start > spec.steps:
        raise CdmbenchError(f"{ckpt_dir} holds step {start}, beyond train.steps={spec.steps}; "
                            "raise train.steps or use another --out")
    log_path = folder / "train_log.jsonl"
    _truncate_log(log_path, start)
    losses: list[float] = []
    images, seconds = 0, 0.0
    model.train()
    bar = tqdm(range(start, spec.steps), initial=start, total=spec.steps,
               desc=f"train {stage.spec.name}", disable=not progress)
    for step in bar:
        tick = time.perf_counter()
        torch.manual_seed(derive_seed(seed, stage.index, step, 1))
        idx = batch_indices(len(data), spec.batch_size, step, seed, stage.index)
        loss = training_loss(stage, model, data, idx, device)
        if not math.isfinite(loss.item()):
            raise CdmbenchError(
                f"stage {stage.spec.name}: loss is {loss.item()} at step {step + 1}; lower "
                f"train.lr (now {spec.lr}). The last good checkpoint in {ckpt_dir} is kept.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema, model, spec.ema)
        seconds += time.perf_counter() - tick
        images += len(idx)
        losses.append(loss.item())
        done = step + 1
        if done % spec.log_every == 0 or done == spec.steps:
            window = losses[-spec.log_every:]
            row = {"step": done, "loss": sum(window) / len(window), "images_per_s": images / seconds}
            with open(log_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
        if done % spec.checkpoint_every == 0 or done == spec.steps:
            save_checkpoint(ckpt_dir, done, model=model, ema=ema, optimizer=optimizer,
                            metadata=metadata, keep=spec.keep_checkpoints)
    bar.close()
    return ema.eval()


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
            low_res, aug_cond = stage.augmentation.sample(
                to_float(data.images[stage.low_res][idx].to(device)), generators=gens)
        denoise = stage.denoiser(model, data.labels[idx].to(device), low_res, aug_cond, guidance_scale=1.0)
        generator = torch.Generator(device).manual_seed(derive_seed(seed, stage.index, lo, 2))
        total += stage.process.bits_per_dim(denoise, x0, generator=generator, progress=progress).sum().item()
    return total / n


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint a run resumes from."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


def read_log(folder: Path) -> list[dict[str, Any]]:
    path = folder / "train_log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
