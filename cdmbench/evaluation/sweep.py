"""`cdmbench sweep`: evaluate an SR stage at many sampling-time augmentation levels s (CDM
section 4.3), on generated low-res inputs (the cascade) and on ground-truth ones: downsampled
training images (the metrics' references are test images, which an SR stage given their own
low-res copies would reproduce), taken to z_s first for a truncated stage.

On generated inputs a level's samples are exactly those `cdmbench evaluate` makes at that level
(``evaluate.generate_samples``: npz shards, shared out over the ranks under torchrun, kept when
a sweep is cut short), so evaluating at the chosen level samples nothing again. The expensive
part, the previous stages, runs once: their output is cached per shard (float32), once for all
levels of a non-truncated sweep (each level only re-noises z_0) and once per level of a
truncated one (the previous stage's sampler stops at s). Samples from ground-truth inputs are
npz shards too, shared out over the ranks, per level under ``<stage>/sweep/<key>/level-<s>/``.
A rerun, an added metric or a sweep killed midway samples no finished shard again. Every
level's metric rows go into results.jsonl as soon as they are computed (protocol: level,
inputs); the best level per metric goes into ``<run>/cascade.json``, which later sampling
(``cdmbench run``, ``cdmbench evaluate``) uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from cdmbench.cascade.stages import StageModel, sample_stage
from cdmbench.data.images import to_float, to_uint8
from cdmbench.errors import CdmbenchError
from cdmbench.evaluation.cas import class_matched
from cdmbench.evaluation.samples import (
    EvalContext,
    chain_to,
    digest,
    generate_samples,
    read_samples,
    sample_labels,
    sample_signature,
    write_shards,
)
from cdmbench.runtime import distributed
from cdmbench.runtime.progress import bar

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
          run_path: Path, num_samples: int, seed: int, batch_size: int, shard_size: int, device,
          checkpoint_steps: dict[str, int], record: Callable[[list[dict[str, Any]]], None],
          progress: bool = True, rank: int = 0, world_size: int = 1) -> list[dict[str, Any]]:
    """Rows (without run/stage) of every metric at every level and input kind, computed by rank 0;
    ``record`` gets each level's rows as soon as they exist. ``levels`` must have passed
    ``set_checked_level`` (``runner.sweep_levels`` checks them before any work).

    On generated inputs a level's samples are ``evaluate.generate_samples``' at that level: in
    npz shards shared out over the ranks, with the previous stage's outputs cached per shard in
    ``eval_outputs`` under a key of everything they depend on (and the truncation level), so a
    non-truncated sweep samples the previous stage once and a truncated one once per level.
    Ground-truth input i is a training image of the class generated input i has (``sample_labels``;
    drawn per class with the sample seed); their samples are npz shards per level under ``<stage>/sweep/``,
    shared out over the ranks as well."""
    chain = chain_to(stages, name)
    *prev, stage = chain
    if not prev:
        raise CdmbenchError(f"stage {name} is a base stage; sweep an SR stage (one with condition_on)")
    is_truncated = truncated(stage)
    mode = context.recipe.evaluate.labels
    labels = sample_labels(0, num_samples, num_classes=context.num_classes, seed=seed, mode=mode)
    [swept] = sample_signature([stage], run_path=run_path, checkpoint_steps=checkpoint_steps, seed=seed,
                               num_classes=context.num_classes)["stages"]
    del swept["levels"]  # each file in the folder is named by its level
    ground_truth_folder = run_path / name / "sweep" / digest(  # row i's input does not depend on N
        {"seed": seed, "stage": swept, "inputs": context.data_key(GROUND_TRUTH_SPLIT), "labels": mode}, 12)

    index = None  # ground-truth input i: a training image of generated input i's class

    def upsample(lo: int, hi: int) -> Tensor:
        """Stage ``name``'s samples lo..hi, at the level set on it, from ground-truth low-res images."""
        nonlocal index
        real, real_labels = context.real_at(GROUND_TRUTH_SPLIT, stage.low_res)
        if index is None:
            index = class_matched(labels, real_labels, num_classes=context.num_classes, seed=seed)
        return ground_truth_samples(stage, stage.backbone, real, index[lo:hi], labels[lo:hi], first_id=lo,
                                    seed=seed, batch_size=batch_size, device=device)

    rows = []
    for kind in inputs:
        extra = {"inputs_split": GROUND_TRUTH_SPLIT} if kind == "ground-truth" else {}
        for level in bar(levels, desc=f"sweep {name} ({kind} inputs)", unit="level", progress=progress,
                         disable=rank != 0):
            set_level(stage, level)
            if kind == "generated":
                folder, _ = generate_samples(chain, run_path=run_path, checkpoint_steps=checkpoint_steps,
                                             num_samples=num_samples, num_classes=context.num_classes, seed=seed,
                                             batch_size=batch_size, shard_size=shard_size, device=device,
                                             labels=mode, progress=False, rank=rank, world_size=world_size)
                named = folder.name
            else:  # training images: the metrics' references are test images
                folder, named = ground_truth_folder / f"level-{level}", f"{ground_truth_folder.name}-{level}"
                write_shards(folder, labels=labels, shard_size=shard_size, rank=rank, world_size=world_size,
                             progress=False, make=lambda k, lo, hi: upsample(lo, hi))
            distributed.barrier()  # every rank's shards of this level are written
            if rank != 0:
                continue
            samples, _ = read_samples(folder, num_samples)
            context.set_samples(samples, labels, {"level": level, "inputs": kind, "truncated": is_truncated,
                                                  "signature": named, **extra})
            level_rows = metric_rows(context)
            record(level_rows)
            rows += level_rows
    return rows


def ground_truth_samples(stage: StageModel, model: nn.Module, real: Tensor, index: Tensor, labels: Tensor, *,
                         first_id: int, seed: int, batch_size: int, device) -> Tensor:
    """uint8 samples of SR ``stage`` with weights ``model``, at the level set on it, for ``labels``:
    sample i (seeded as image ``first_id + i``) conditioned on the ground-truth low-res image
    ``real[index[i]]`` (uint8 at the stage's low-res resolution; a memory map is read per batch)."""
    out = torch.empty((len(labels), 3, stage.spec.resolution, stage.spec.resolution), dtype=torch.uint8)
    for i in range(0, len(labels), batch_size):  # each batch made uint8 at once: float32 is 4x the size
        j = min(i + batch_size, len(labels))
        out[i:j] = to_uint8(sample_stage(
            stage, model, labels[i:j].to(device), seed=seed, image_ids=list(range(first_id + i, first_id + j)),
            low_res=to_float(real[index[i:j].to(real.device)]).to(device), device=device,
            ground_truth=True, progress=False)).cpu()
    return out


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


def apply_sweep_levels(stages: list[StageModel], run_path: Path,
                       overrides: tuple[str, ...] | list[str]) -> None:
    """The levels a sweep chose (cascade.json), except on stages whose level ``overrides`` set:
    the recipe's level, then cascade.json's, then --set's."""
    keys = [o.partition("=")[0].split(".") for o in overrides]
    explicit = {k[1] for k in keys if len(k) > 3 and k[0] == "stages" and k[2] == "augmentation"
                and k[-1] == "level"}
    apply_manifest([st for st in stages if st.spec.name not in explicit], run_path)
