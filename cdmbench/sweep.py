"""`cdmbench sweep`: evaluate an SR stage at many sampling-time augmentation levels s (CDM
section 4.3), on generated low-res inputs (the cascade) and on ground-truth ones: downsampled
training images (the metrics' references are test images, which an SR stage given their own
low-res copies would reproduce), taken to z_s first for a truncated stage.

The expensive part, the previous stages, runs once: non-truncated sweeps sample the previous
stage to z_0 once and only re-noise it per level; truncated sweeps stop the previous stage's
sampler at each s once. Those inputs (float32, so that a sweep at the level `cdmbench evaluate`
uses gives its numbers exactly) and each level's samples (uint8) are cached as
npz in the sweep folder, so a rerun, an added metric or a sweep killed midway samples no
finished input set or level again (the one in progress starts over; a sweep runs in one process).
Every level's metric rows go into results.jsonl as soon as they are computed
(protocol: level, inputs); the best level per metric goes into ``<run>/cascade.json``, which
later sampling (``cdmbench run``, ``cdmbench evaluate``) uses for that stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .cascade import StageModel, sample_cascade, sample_stage
from .checkpoint import ema_sha256
from .data import to_float, to_uint8
from .errors import CdmbenchError
from .cas import class_matched
from .evaluate import EvalContext, chain_to, digest, sample_signature
from .files import cached_tensor

MANIFEST = "cascade.json"
INPUTS = ("generated", "ground-truth")
GROUND_TRUTH_SPLIT = "train"  # where ground-truth low-res inputs come from


def gaussian_parts(augmentation) -> list:
    """The parts of a (possibly composed) augmentation that have a sampling level."""
    parts = getattr(augmentation, "parts", [augmentation])
    return [p for p in parts if hasattr(p, "level")]


def truncated(stage: StageModel) -> bool:
    """Whether the stage's Gaussian augmentation is truncated (whatever its level now)."""
    return any(getattr(p, "mode", None) == "truncated" for p in gaussian_parts(stage.augmentation))


def set_level(stage: StageModel, level: float) -> None:
    parts = gaussian_parts(stage.augmentation)
    if not parts:
        raise CdmbenchError(f"stage {stage.spec.name} has no augmentation with a level to sweep "
                            "(use augmentation gaussian)")
    if not 0.0 <= level <= 1.0:
        raise CdmbenchError(f"level {level} is outside [0, 1]")
    if level == 0 and truncated(stage):
        raise CdmbenchError(f"stage {stage.spec.name} is truncated: its level must be > 0 (the previous "
                            "stage's sampler stops there)")
    for part in parts:
        part.level = level


def set_checked_level(stages: list[StageModel], name: str, level: float, what: str) -> None:
    """Set stage ``name``'s sampling level; a truncated stage's must be one at which the previous
    stage's sampler can stop (else a CdmbenchError that names ``what``)."""
    by_name = {st.spec.name: st for st in stages}
    stage = by_name[name]
    set_level(stage, level)
    if stage.truncation > 0:
        cond = by_name[stage.spec.condition_on]
        try:
            cond.sampler.check(cond.process, learned_variance=cond.learned_variance, stop_at=stage.truncation)
        except ValueError as exc:
            raise CdmbenchError(f"{what}: stage {name} is truncated, and stage {cond.spec.name}'s "
                                f"sampler cannot stop there: {exc}") from None


def apply_manifest(stages: list[StageModel], run_path: Path) -> dict[str, Any]:
    """Set each stage's sampling level to the best one a sweep recorded, if any."""
    path = run_path / MANIFEST
    manifest = json.loads(path.read_text()) if path.exists() else {}
    for st in stages:
        chosen = manifest.get(st.spec.name)
        if chosen is not None:
            set_level(st, chosen["level"])
    return manifest


def sweep(stages: list[StageModel], *, name: str, levels: list[float], inputs: list[str],
          context: EvalContext, metric_rows: Callable[[EvalContext], list[dict[str, Any]]],
          run_path: Path, num_samples: int, seed: int, batch_size: int, device,
          checkpoint_steps: dict[str, int], record: Callable[[list[dict[str, Any]]], None],
          progress: bool = True) -> list[dict[str, Any]]:
    """Rows (without run/stage) of every metric at every level and input kind; ``record`` gets
    each level's rows as soon as they exist. ``levels`` must have passed ``set_checked_level``
    (``runner.sweep_levels`` checks them before any work). The previous stages' outputs are
    cached under a key of everything they depend on: n, seed, and each previous stage's
    checkpoint step, weights, sampler and sampling level; the samples under a key of the swept
    stage's too. Ground-truth input i is a training image of class i % K, as generated input i
    is (drawn per class with the sample seed)."""
    by_name = {s.spec.name: s for s in stages}
    stage = by_name[name]
    if stage.spec.condition_on is None:
        raise CdmbenchError(f"stage {name} is a base stage; sweep an SR stage (one with condition_on)")
    prev = chain_to(stages, stage.spec.condition_on)
    is_truncated = truncated(stage)
    labels = torch.arange(num_samples) % context.num_classes

    def sampling(s: StageModel) -> list:
        step = checkpoint_steps[s.spec.name]
        return [s.spec.name, step, ema_sha256(run_path / s.spec.name / "checkpoints", step), s.spec.sampler.name,
                s.spec.sampler.args, s.spec.guidance.scale, s.sample_precision]

    folder = run_path / name / "sweep" / digest({  # each file in it is named by its level
        "n": num_samples, "seed": seed, "stages": [s.spec.name for s in prev + [stage]],
        "previous": sample_signature(prev, run_path=run_path, checkpoint_steps=checkpoint_steps, seed=seed,
                                     num_classes=context.num_classes)["stages"]}, 12)
    samples_folder = folder / digest([sampling(stage), [{"name": a.name, "args": a.args}
                                                        for a in stage.spec.augmentations()]], 12)
    models = {s.spec.name: s.backbone for s in prev + [stage]}

    def previous(stop: float) -> Tensor:
        images, _ = sample_cascade(prev, models, labels, seed=seed, batch_size=batch_size, device=device,
                                   progress=progress, stop_at={prev[-1].spec.name: stop})
        return images[prev[-1].spec.name]

    def upsample(low: Tensor, level: float, batch_labels: Tensor, ground_truth: bool) -> Tensor:
        set_level(stage, level)
        out = torch.empty((len(low), 3, stage.spec.resolution, stage.spec.resolution), dtype=torch.uint8)
        for i in range(0, len(low), batch_size):  # each batch made uint8 at once: float32 is 4x the size
            out[i:i + batch_size] = to_uint8(sample_stage(
                stage, models[name], batch_labels[i:i + batch_size].to(device), seed=seed,
                image_ids=list(range(i, min(i + batch_size, len(low)))), low_res=low[i:i + batch_size].to(device),
                device=device, ground_truth=ground_truth, progress=False)).cpu()
        return out

    rows = []
    for kind in inputs:
        extra = {}
        if kind == "ground-truth":  # training images: the metrics' references are test images
            real, real_labels = context.real_at(GROUND_TRUTH_SPLIT, stage.low_res)
            # image i of class i % K, as the generated inputs: a split may be ordered by class
            index = class_matched(labels, real_labels, num_classes=context.num_classes, seed=seed)
            low_all, kind_labels = to_float(real[index]), labels
            extra = {"inputs_split": GROUND_TRUTH_SPLIT}
        elif not is_truncated:  # the previous stage runs once; each level only re-noises
            low_all = cached_tensor(folder / "inputs-z0.npz", lambda: previous(0.0))
            kind_labels = labels
        for level in tqdm(levels, desc=f"sweep {name} ({kind} inputs)", disable=not progress):
            if kind == "generated" and is_truncated:  # z_s of the previous stage, once per level
                low_all = cached_tensor(folder / f"inputs-z_s-{level}.npz", lambda: previous(level))
                kind_labels = labels
            samples = cached_tensor(samples_folder / f"samples-{kind}-{level}.npz",
                                    lambda: upsample(low_all, level, kind_labels, kind == "ground-truth"))
            context.set_samples(samples, kind_labels.cpu(),
                                {"level": level, "inputs": kind, "truncated": is_truncated, **extra})
            level_rows = metric_rows(context)
            record(level_rows)
            rows += level_rows
    return rows


def best_levels(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per metric, the level with the best value on generated inputs."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["protocol"].get("inputs") != "generated" or row.get("value") is None:
            continue
        sign = 1 if row["higher_is_better"] else -1
        current = best.get(row["metric"])
        if current is None or sign * row["value"] > sign * current["value"]:
            best[row["metric"]] = {"level": row["protocol"]["level"], "value": row["value"]}
    return best
