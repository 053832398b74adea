"""`cdmbench sample`: images of chosen classes from a trained run's cascade.

Writes, under the output folder: the sampled stage's images as PNG files
(``images/<id>-class<label>.png``) and as one npz (uint8 NHWC ``images`` and ``labels``, ADM's
layout), a grid per stage of the chain (rows = classes) and ``sample.json``, the settings that
made them (checkpoint steps, samplers, sampling levels, guidance scales, seed, seconds). Image i
has the per-image seed (seed, i): the same seed, classes and counts give the same images, in
any batch size. Images go through the whole cascade CHUNK at a time, written as they come, so
memory holds a chunk's float images and the sampled stage's uint8 pixels (for the npz); a grid
shows a class's first GRID_COLUMNS images. Sampling levels come from the recipe, then
``cascade.json`` (a sweep's best), then ``search.json`` (a search's chosen point), then
``overrides`` and ``levels``. Sampling again into a folder replaces the sample there. The class
names come from run.yaml: sampling needs the checkpoints, not the dataset.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cdmbench.cascade.grids import save_grid
from cdmbench.cascade.stages import build_chain, sample_cascade, samplers_of
from cdmbench.data.images import to_uint8
from cdmbench.data.prepare import make_dataset
from cdmbench.errors import CdmbenchError, CheckpointError
from cdmbench.evaluation.samples import load_chain
from cdmbench.evaluation.search import with_choice
from cdmbench.evaluation.sweep import apply_sweep_levels, gaussian_parts, set_checked_level
from cdmbench.runtime.device import resolve_device
from cdmbench.runtime.progress import bar
from cdmbench.storage.files import atomic_write, save_npz
from cdmbench.storage.rundir import load_run

CHUNK = 1000      # images sampled through the whole cascade at once
GRID_COLUMNS = 16  # images of each class in a stage's grid, at most


def class_labels(classes: list[str] | None, class_names: list[str], default_count: int) -> list[int]:
    """Class indices from indices or names (default: the first ``default_count`` classes)."""
    if not classes:
        return list(range(default_count))
    labels = []
    for c in classes:
        if c.isdigit() and int(c) < len(class_names):
            labels.append(int(c))
        elif c in class_names:
            labels.append(class_names.index(c))
        else:
            shown = ", ".join(f"{i}={n}" for i, n in enumerate(class_names[:12]))
            raise CdmbenchError(f"unknown class {c!r}: give an index in 0..{len(class_names) - 1} or a "
                                f"class name ({shown}{', ...' if len(class_names) > 12 else ''})")
    return labels


def sample_run(run_path: str | Path, *, stage: str | None = None, classes: list[str] | None = None,
               per_class: int | None = None, seed: int | None = None,
               levels: dict[str, float] | None = None, batch_size: int | None = None,
               overrides: tuple[str, ...] | list[str] = (), out: str | Path | None = None,
               progress: bool = True, echo=print) -> Path:
    """Sample ``per_class`` images of each of ``classes`` (indices or names) from the trained
    stages that produce ``stage`` (default: the last), with each stage's EMA weights; returns the
    output folder (default: RUN/samples/<stage>-seed<seed>)."""
    run_dir, recipe, plugins = load_run(run_path, overrides)
    target = stage or recipe.stages[-1].name
    recipe.stage(target)  # an unknown name fails here, naming the stages
    overrides, chosen_by = with_choice(run_dir.path, recipe, target, overrides)  # a search's chosen point
    if chosen_by:
        run_dir, recipe, plugins = load_run(run_path, overrides)
    spec = recipe.sample
    seed = spec.seed if seed is None else seed
    per_class = spec.images_per_class if per_class is None else per_class
    if per_class < 1:
        raise CdmbenchError(f"--per-class {per_class}: sample at least one image per class")
    names = run_dir.class_names() or list(make_dataset(plugins, recipe, "train").class_names)
    device = resolve_device(recipe.device)
    chain = build_chain(plugins, recipe, target, len(names), device)
    apply_sweep_levels(chain, run_dir.path, overrides)
    by_name = {st.spec.name: st for st in chain}
    for name, level in (levels or {}).items():
        if name not in by_name:
            raise CdmbenchError(f"--level {name}={level}: {name} is not among the stages that make "
                                f"{target} ({', '.join(by_name)})")
        if not 0.0 <= level <= 1.0:
            raise CdmbenchError(f"--level {name}={level}: a level s must be in [0, 1]")
        set_checked_level(chain, name, level, f"--level {name}={level}")
    default_count = len(names) if spec.num_classes is None else min(spec.num_classes, len(names))
    chosen = class_labels(classes, names, default_count)
    labels = torch.tensor(chosen).repeat_interleave(per_class)
    try:
        steps = load_chain(chain, run_dir.path)
    except CheckpointError as exc:
        raise CdmbenchError(f"{exc}: train the stages first (cdmbench run RECIPE --out {run_dir.path})") from None
    out = Path(out) if out else run_dir.path / "samples" / f"{target}-seed{seed}"
    if (out / "sample.json").is_file():  # an earlier sample's files there would mix with these
        for old in [*out.glob("images/*-class*.png"), *out.glob("*_grid.png")]:
            old.unlink()
    echo(f"sampling {len(labels)} images of {target} ({len(chosen)} classes x {per_class}) into {out}")
    pixels = np.empty((len(labels), *(chain[-1].spec.resolution,) * 2, 3), dtype=np.uint8)  # NHWC
    in_grid = torch.cat([torch.arange(per_class) < GRID_COLUMNS] * len(chosen))
    shown: dict[str, list[Tensor]] = {st.spec.name: [] for st in chain}  # the grids' images
    seconds = dict.fromkeys(shown, 0.0)
    chunks = range(0, len(labels), CHUNK)
    for lo in bar(chunks, desc=f"sample {target} ({CHUNK} images a chunk)", unit="chunk", progress=progress,
                  disable=len(chunks) == 1):
        hi = min(lo + CHUNK, len(labels))
        images, took = sample_cascade(chain, {st.spec.name: st.backbone for st in chain}, labels[lo:hi],
                                      seed=seed, batch_size=batch_size or spec.batch_size, device=device,
                                      progress=progress and len(chunks) == 1, first_id=lo)
        for name, part in images.items():
            shown[name].append(part[in_grid[lo:hi]])
            seconds[name] += took[name]
        pixels[lo:hi] = to_uint8(images[target]).permute(0, 2, 3, 1).numpy()
        for i in range(lo, hi):
            buffer = io.BytesIO()
            Image.fromarray(pixels[i]).save(buffer, format="PNG")
            atomic_write(out / "images" / f"{i:05d}-class{int(labels[i])}.png", buffer.getvalue())
    for name, parts in shown.items():
        save_grid(torch.cat(parts), labels[in_grid], names, out / f"{name}_grid.png")
    save_npz(out / "samples.npz", images=pixels, labels=labels.numpy())
    settings: dict[str, Any] = {
        "run": str(run_dir.path), "stage": target, "classes": chosen, "per_class": per_class,
        "seed": seed, "image_ids": f"0..{len(labels) - 1}", "checkpoint_steps": steps,
        "samplers": samplers_of(chain),
        "levels": {st.spec.name: gaussian_parts(st.augmentation)[0].level
                   for st in chain if gaussian_parts(st.augmentation)},
        "guidance_scales": {st.spec.name: st.spec.guidance.scale for st in chain},
        "seconds": seconds, "device": str(device)}
    atomic_write(out / "sample.json", json.dumps(settings, indent=1))
    echo(f"wrote {len(labels)} images, {len(chain)} grid(s), samples.npz and sample.json to {out}")
    return out
