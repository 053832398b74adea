"""`cdmbench bench`: how fast a stage trains and the cascade samples on this device.

Training: images/s of the full step (forward, backward, AdamW, EMA) on synthetic data of the
stage's shapes, eager and compiled; FLOPs per training image counted by FlopCounterMode over one
real step; achieved TFLOP/s and MFU against a matmul ceiling measured in the same run (bf16 on
CUDA, fp32 on CPU); peak memory. Sampling: denoiser evaluations/s per stage at the sampling
batch size, and the cascade's images/s with each stage's sampler step count.
"""

from __future__ import annotations

import copy
import platform
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .cascade import IMAGE_CHANNELS, StageModel
from .data import ImageSet
from .train import train_step, update_ema


def matmul_ceiling(device: torch.device, *, size: int = 8192, repeats: int = 20) -> tuple[float, str]:
    """Measured matmul FLOP/s: bf16 on CUDA (the tensor-core peak training can reach), fp32 on
    CPU (a smaller size)."""
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    n = size if cuda else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start), f"{str(dtype).split('.')[-1]} {n}x{n} matmul"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_data(stage: StageModel, num_classes: int, n: int) -> ImageSet:
    """Random uint8 images at the stage's (and its conditioning stage's) resolution."""
    g = torch.Generator().manual_seed(0)
    sides = [stage.spec.resolution] + ([stage.low_res] if stage.low_res else [])
    images = {r: torch.randint(0, 256, (n, IMAGE_CHANNELS, r, r), dtype=torch.uint8, generator=g) for r in sides}
    return ImageSet(images, torch.arange(n) % num_classes, num_classes, [str(k) for k in range(num_classes)])


def training_speed(stage: StageModel, *, num_classes: int, device: torch.device, steps: int,
                   warmup: int, compile: bool) -> dict[str, Any]:
    """images/s, FLOPs per image and peak memory of the stage's training step."""
    spec = stage.spec.train
    model = copy.deepcopy(stage.backbone).to(device)
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, fused=device.type == "cuda" or None)
    runner = torch.compile(model) if compile else model
    data = synthetic_data(stage, num_classes, spec.batch_size)
    idx = torch.arange(spec.batch_size)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        train_step(stage, runner, data, idx, device)
        optimizer.step()
        update_ema(ema, model, spec.ema)

    with FlopCounterMode(display=False) as counter:  # one step of one image, eager
        train_step(stage, model, synthetic_data(stage, num_classes, 1), torch.arange(1), device)
    flops_per_image = counter.get_total_flops()
    model.zero_grad(set_to_none=True)
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - start
    return {"images_per_s": spec.batch_size * steps / seconds, "flops_per_image": flops_per_image,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


@torch.no_grad()
def denoiser_speed(stage: StageModel, *, num_classes: int, device: torch.device, batch_size: int,
                   repeats: int) -> float:
    """Denoiser evaluations (images x steps) per second at the sampling batch size."""
    model = stage.backbone.to(device).eval()
    r = stage.spec.resolution
    x = torch.randn(batch_size, IMAGE_CHANNELS, r, r, device=device)
    low = torch.randn(batch_size, IMAGE_CHANNELS, stage.low_res, stage.low_res, device=device) if stage.low_res else None
    aug = torch.zeros(batch_size, stage.augmentation.cond_dim, device=device)
    labels = torch.arange(batch_size, device=device) % num_classes
    t = torch.full((batch_size,), 500.0, device=device)
    stage.forward(model, x, t, labels, low, aug)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        stage.forward(model, x, t, labels, low, aug)
    _sync(device)
    return batch_size * repeats / (time.perf_counter() - start)


def environment(device: torch.device) -> dict[str, str]:
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "torch": torch.__version__, "platform": platform.platform()}
