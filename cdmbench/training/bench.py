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
import json
import platform
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from cdmbench.cascade.cost import network_flops
from cdmbench.cascade.stages import IMAGE_CHANNELS, StageModel, build_chain, build_stage
from cdmbench.data.images import ImageSet
from cdmbench.recipe.components import recipe_classes
from cdmbench.recipe.load import load_recipe
from cdmbench.reporting import markdown
from cdmbench.reporting.document import frame_table
from cdmbench.runtime.device import resolve_device
from cdmbench.storage.files import atomic_write
from cdmbench.training.trainer import Trainer, backward, make_batch, update_ema


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
    low = (
        torch.randn(batch_size, IMAGE_CHANNELS, stage.low_res, stage.low_res, device=device) if stage.low_res else None
    )
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


def _breakdown_tables(breakdowns: dict[str, dict[str, Any]]) -> str:
    """Markdown: ms per step by phase, by operator kind and by heaviest operator, one column per
    measured variant (backbone, eager or compiled)."""
    def table(key: str) -> str:
        frame = pd.DataFrame({what: b[key] for what, b in breakdowns.items()}).fillna(0.0)
        return markdown.table(frame_table(frame.rename_axis(key)))

    profiled = ", ".join(sorted({b["profiled"] for b in breakdowns.values()}))
    return ("\n## Where a training step's time goes (ms per step)\n\n"
            "Phases are timed one at a time with the device synchronised around each, so they add "
            "up to a little more than a step. Forward + backward by operator kind and its heaviest "
            f"operators come from torch.profiler ({profiled}).\n\n"
            + "".join(f"{table(key)}\n\n" for key in ("phases", "kinds", "top")))



def bench(recipe_path: str | Path, *, stage: str, overrides: tuple[str, ...] | list[str] = (),
          steps: int = 10, warmup: int = 3, compile: bool | None = None,
          out: str | Path = "reports/bench", command: str = "", backbones: list[str] | None = None,
          smoke: bool = False, profile: bool = False, echo=print) -> Path:
    """Measure ``stage``'s training step and the cascade's sampling on this device; writes
    <out>/<recipe>-<stage>-<device>.md and .json. Touches no data (synthetic batches).
    ``backbones``: measure the training step with each of these backbones (the stage's args),
    side by side. ``profile``: add where each training step's time goes (``time_breakdown``)."""
    from cdmbench.training.bench import denoiser_speed, environment, matmul_ceiling, training_speed

    recipe, plugins = load_recipe(recipe_path, overrides=overrides, smoke=smoke, echo=echo)
    recipe.stage(stage)
    device = resolve_device(recipe.device)
    num_classes, _ = recipe_classes(recipe.to_dict(), plugins)  # synthetic batches: no data needed
    stages = build_chain(plugins, recipe, stage, num_classes, device)
    target = stages[-1]
    variants = {}  # backbone name -> the stage built with it (validated before any timing)
    flops = {}  # backbone name -> FLOPs of a training image (counted once, on the meta device)
    for name in backbones or [target.spec.backbone.name]:
        swapped, _ = load_recipe(recipe_path, overrides=[*overrides, f"stages.{stage}.backbone.name={name}"],
                                 plugins=plugins, smoke=smoke, echo=lambda *_: None)
        variants[name] = target if name == target.spec.backbone.name else build_stage(
            plugins, swapped, swapped.stage(stage), num_classes=num_classes, device=device)
        flops[name] = network_flops(build_stage(plugins, swapped, swapped.stage(stage), num_classes=num_classes,
                                                device="meta"))[1]
    ceiling, ceiling_kind = matmul_ceiling(device)
    env = {**environment(device), "ceiling": f"{ceiling / 1e12:.2f} TFLOP/s ({ceiling_kind}, measured)",
           "precision": target.spec.train.precision, "channels_last": str(target.spec.train.channels_last),
           "gradient_checkpointing": str(target.spec.train.gradient_checkpointing),
           "cudnn_benchmark": str(target.spec.train.cudnn_benchmark),
           "command": command or f"cdmbench bench {recipe_path} --stage {stage}"}
    tag = env["device"].split(" (")[0].replace(" ", "-").lower()
    path = Path(out) / f"{recipe.name}-{stage}-{tag}.md"
    rows, breakdowns = [], {}

    def write() -> str:
        """The figures so far, so that a bench cut short (a compile that outlasts a job's
        time) keeps what it measured."""
        table = markdown.table(frame_table(pd.DataFrame(rows).set_index("what")))
        warning = ("\nMFU above 100%: the ceiling was measured below the device's peak (another job "
                   "busy on it?); rerun on an idle device.\n" if any(r.get("MFU", 0) > 1 for r in rows) else "")
        where = _breakdown_tables(breakdowns) if breakdowns else ""
        atomic_write(
            path,
            f"# bench: {recipe.name}, stage {stage}\n\n"
            + "".join(f"- {k}: {v}\n" for k, v in env.items())
            + "\nMFU = FLOP/image (the network's forward + backward, FlopCounterMode on the meta device)"
            " x images/s / ceiling.\n\n"
            f"{table}\n" + warning + where,
        )
        atomic_write(path.with_suffix(".json"), json.dumps(
            {"environment": env, "rows": rows, "breakdown": breakdowns}, indent=1, default=str))
        return table + warning + ("\n" + where if where else "")

    modes = [False, True] if (device.type == "cuda" if compile is None else compile) else [False]
    for name, variant in variants.items():
        for compiled in modes:
            what = f"{name} ({'compiled' if compiled else 'eager'})"
            echo(f"measuring train {stage} {what}")
            speed = training_speed(variant, num_classes=num_classes, device=device, steps=steps,
                                   warmup=warmup, compile=compiled, profile=profile)
            achieved = flops[name] * speed["images_per_s"]
            if profile:
                breakdowns[what] = speed["breakdown"]
            rows.append({"what": f"train {stage} {what}",
                         "batch": variant.spec.train.batch_size, "images/s": speed["images_per_s"],
                         "GFLOP/image": flops[name] / 1e9, "TFLOP/s": achieved / 1e12,
                         "MFU": achieved / ceiling, "peak GiB": speed["peak_memory_gib"],
                         "parameters (M)": sum(p.numel() for p in variant.backbone.parameters()) / 1e6})
            echo(f"  {speed['images_per_s']:.1f} img/s, MFU {achieved / ceiling:.1%} (written: {path})")
            write()
    seconds_per_image = 0.0
    batch = recipe.sample.batch_size
    for st, after in zip(stages, [*stages[1:], None], strict=True):
        evals = denoiser_speed(st, num_classes=num_classes, device=device, batch_size=batch, repeats=3)
        stop = after.truncation if after else 0.0  # a truncated next stage takes z_s: fewer steps
        per_image = st.process.grid(st.sampler.steps, stop).steps * (1 if st.spec.guidance.scale == 1 else 2)
        seconds_per_image += per_image / evals
        rows.append({"what": f"sample {st.spec.name} ({per_image} evaluations/image, {st.sample_precision})",
                     "batch": batch, "images/s": evals / per_image})
    rows.append({"what": f"sample cascade to {stage}", "batch": batch, "images/s": 1 / seconds_per_image})
    echo(write())
    echo(f"written: {path}")
    return path
