"""`cdmbench bench`: how fast a stage trains and the cascade samples on this device.

Training: images/s of the full step (forward, backward, AdamW, EMA) on synthetic data of the
stage's shapes, eager and compiled; FLOPs per training image counted by FlopCounterMode over one
real step; achieved TFLOP/s and MFU against a matmul ceiling measured in the same run (bf16 on
CUDA, fp32 on CPU); peak memory. Sampling: denoiser evaluations/s per stage at the sampling
batch size, and the cascade's images/s with each stage's sampler step count. With ``profile``:
where a step's time goes, by phase (batch, forward + backward, optimizer, EMA; each timed alone)
and, within forward + backward, by operator kind (torch.profiler: GPU kernel time on CUDA, CPU
self time on a CPU), with the heaviest operators or kernels by name.
"""

from __future__ import annotations

import copy
import platform
import time
from collections import Counter
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from .cascade import IMAGE_CHANNELS, StageModel
from .data import ImageSet
from .train import Trainer, backward, make_batch, update_ema


def matmul_ceiling(device: torch.device, *, size: int = 8192, repeats: int = 20,
                   trials: int = 5) -> tuple[float, str]:
    """Measured matmul FLOP/s: bf16 on CUDA (the tensor-core peak training can reach), fp32 on
    CPU (a smaller size). The fastest of ``trials`` timings of ``repeats`` products: a ceiling
    is a peak, and a moment of contention (or clocks still ramping up) must not lower it."""
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    n = size if cuda else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    fastest = float("inf")
    for _ in range(trials):
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        _sync(device)
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * n**3 * repeats / fastest, f"{str(dtype).split('.')[-1]} {n}x{n} matmul, fastest of {trials}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_data(stage: StageModel, num_classes: int, n: int) -> ImageSet:
    """Random uint8 images at the stage's (and its conditioning stage's) resolution."""
    g = torch.Generator().manual_seed(0)
    sides = [stage.spec.resolution] + ([stage.low_res] if stage.low_res else [])
    images = {r: torch.randint(0, 256, (n, IMAGE_CHANNELS, r, r), dtype=torch.uint8, generator=g) for r in sides}
    return ImageSet(images, torch.arange(n) % num_classes, num_classes, [str(k) for k in range(num_classes)])


# Operator kinds, first match wins: (kind, substrings of a lower-cased aten op or kernel name).
# Inductor's fused Triton kernels are named after the ops they fuse ("triton_red_fused_native_
# group_norm_..."), conv kernels after their pass ("xmma_fprop/dgrad/wgrad", "implicit_gemm").
OP_KINDS = (
    ("attention", ("scaled_dot_product", "flash", "fmha", "efficient_attention", "_attention")),
    ("normalization", ("group_norm", "layer_norm", "batch_norm", "rowwisemoments", "fusedparams",
                       "internalgradients", "gammabeta")),  # the last four: eager GroupNorm's CUDA kernels
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm")),
    ("matmul", ("gemm", "aten::mm", "aten::addmm", "aten::bmm", "matmul", "cutlass")),
    ("memory and layout", ("copy", "memcpy", "memset", "clone", "aten::cat", "nchwtonhwc", "nhwctonchw",
                           "contiguous")),
)
OTHER = "elementwise and other"


def op_kind(name: str) -> str:
    """The kind of an aten operator or GPU kernel, from its name (``OP_KINDS``, else ``OTHER``)."""
    lowered = name.lower()
    if lowered.startswith("triton_") and "group_norm" not in lowered:
        return OTHER  # a fused pointwise/reduction kernel, even when named after a conv's bias add
    return next((kind for kind, keys in OP_KINDS if any(k in lowered for k in keys)), OTHER)


def _per_step(fn: Callable[[], Any], device: torch.device, steps: int) -> float:
    """Seconds per call of ``fn``, synchronised before and after each call."""
    total = 0.0
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        total += time.perf_counter() - start
    return total / steps


def op_times(fn: Callable[[], Any], device: torch.device, steps: int) -> Counter:
    """Seconds per call of ``fn`` by operator name: GPU kernel time on CUDA, CPU self time on a
    CPU (torch.profiler)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    times: Counter = Counter()
    for event in prof.events():
        if cuda and event.device_type == DeviceType.CUDA:
            times[event.name] += event.device_time_total / 1e6 / steps
        elif not cuda and event.device_type == DeviceType.CPU and event.name.startswith("aten::"):
            times[event.name] += event.self_cpu_time_total / 1e6 / steps
    return times


def time_breakdown(trainer: Trainer, data: ImageSet, steps: int, top: int = 8) -> dict[str, Any]:
    """Milliseconds per training step by phase, and forward + backward by operator kind and by
    its ``top`` heaviest operators or kernels."""
    stage, spec, device = trainer.stage, trainer.spec, torch.device(trainer.device)
    idx = torch.arange(spec.batch_size)
    batch = make_batch(stage, data, idx, device)

    def forward_backward() -> None:
        trainer.optimizer.zero_grad(set_to_none=True)
        backward(stage, trainer.runner, batch)

    phases = {"batch (noise, flips, augmentation, transfer)": lambda: make_batch(stage, data, idx, device),
              "forward + backward": forward_backward}
    if spec.grad_clip:
        phases["gradient clipping"] = lambda: torch.nn.utils.clip_grad_norm_(trainer.model.parameters(),
                                                                             spec.grad_clip)
    phases["optimizer (fused AdamW)"] = trainer.optimizer.step
    phases["EMA"] = lambda: update_ema(trainer.ema, trainer.model, spec.ema)
    ms = {name: 1e3 * _per_step(fn, device, steps) for name, fn in phases.items()}
    ops = op_times(forward_backward, device, steps)
    kinds: Counter = Counter()
    for name, seconds in ops.items():
        kinds[op_kind(name)] += 1e3 * seconds
    return {"phases": ms, "kinds": dict(kinds.most_common()),
            "top": {name: 1e3 * seconds for name, seconds in ops.most_common(top)},
            "profiled": "GPU kernel time" if device.type == "cuda" else "CPU self time"}


def network_flops(stage: StageModel) -> tuple[int, int]:
    """FLOPs of the stage's network for one image: a forward pass, and a training pass (forward
    + backward, with the recomputation when gradient checkpointing is on). The stage is built on
    the meta device (``build_stage(..., device="meta")``): no memory, no time, and every
    attention backend counts as its matmuls (on a CPU, FlopCounterMode would count SDPA's fused
    kernel as 0)."""
    model = stage.backbone
    r = stage.spec.resolution
    x = torch.zeros(1, IMAGE_CHANNELS, r, r, device="meta")
    low = torch.zeros(1, IMAGE_CHANNELS, stage.low_res, stage.low_res, device="meta") if stage.low_res else None
    aug = torch.zeros(1, stage.augmentation.cond_dim, device="meta")
    labels = torch.zeros(1, dtype=torch.long, device="meta")
    flops = []
    for train in (False, True):
        model.train(train)
        with FlopCounterMode(display=False) as counter:
            out = stage.forward(model, x, torch.zeros(1, device="meta"), labels, low, aug)
            if train:
                out.float().sum().backward()
        flops.append(counter.get_total_flops())
    return flops[0], flops[1]


def training_speed(stage: StageModel, *, num_classes: int, device: torch.device, steps: int,
                   warmup: int, compile: bool, profile: bool = False) -> dict[str, Any]:
    """images/s and peak memory of the stage's training step; with ``profile`` also its
    ``time_breakdown``."""
    spec = stage.spec.train
    trainer = Trainer(stage, copy.deepcopy(stage.backbone).to(device), device)
    trainer.wrap(compile)
    data = synthetic_data(stage, num_classes, spec.batch_size)
    idx = torch.arange(spec.batch_size)

    def step() -> None:
        trainer.step(data, idx, spec.warmup_steps)  # the learning rate after warm-up

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
    speed = {"images_per_s": spec.batch_size * steps / seconds,
             "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    if profile:
        speed["breakdown"] = time_breakdown(trainer, data, steps)
    return speed


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
    with stage.autocast(device):
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
