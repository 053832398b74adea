"""Stages of a cascade built from a recipe, and sampling chained through them.

A base stage maps class labels to images; a super-resolution (SR) stage also receives the
previous stage's image z_0, augmented (``Augmentation.sample``), and the augmentation's
conditioning vector.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .diffusion import GaussianDiffusion
from .interfaces import Augmentation, Sampler
from .plugins import Plugins
from .errors import RecipeError
from .recipe import Component, Recipe, Stage

IMAGE_CHANNELS = 3


@dataclass
class StageModel:
    """Everything one stage needs to train and sample."""

    spec: Stage
    index: int
    backbone: nn.Module
    diffusion: GaussianDiffusion
    sampler: Sampler
    augmentation: Augmentation
    low_res: int | None  # resolution of the conditioning stage, None for a base stage

    def predict(self, model: nn.Module, x_t: Tensor, noise_cond: Tensor, labels: Tensor,
                low_res: Tensor | None, aug_cond: Tensor | None) -> Tensor:
        return model(x_t, noise_cond, labels, low_res=low_res,
                     aug_cond=aug_cond if aug_cond is not None and aug_cond.shape[1] else None)


def make_component(plugins: Plugins, kind: str, spec: Component, path: str, **host):
    """Build a component; a factory's ValueError/TypeError becomes a RecipeError at ``path``."""
    try:
        return plugins[kind].get(spec.name).build(spec.args, **host)
    except (ValueError, TypeError) as exc:
        raise RecipeError(path, f"{kind[:-1]} '{spec.name}': {exc}") from exc


def build_stage(plugins: Plugins, recipe: Recipe, stage: Stage, *, num_classes: int,
                device: torch.device | str = "cpu") -> StageModel:
    """Instantiate a stage's components; host facts are injected into the factories."""
    index = recipe.stage_names().index(stage.name)
    path = f"stages.{stage.name}"
    schedule = make_component(plugins, "schedules", stage.schedule, f"{path}.schedule")
    low_res, cond_schedule = None, None
    if stage.condition_on is not None:
        cond = recipe.stage(stage.condition_on)
        low_res = cond.resolution
        cond_schedule = make_component(plugins, "schedules", cond.schedule,
                                       f"stages.{cond.name}.schedule")
    augmentation = make_component(plugins, "augmentations", stage.augmentation,
                                  f"{path}.augmentation", schedule=cond_schedule)
    torch.manual_seed(derive_seed(recipe.seed, index))  # the initial weights depend on the seed only
    with torch.device(device):  # "meta" builds the network without memory
        backbone = make_component(
            plugins, "backbones", stage.backbone, f"{path}.backbone", resolution=stage.resolution,
            in_channels=IMAGE_CHANNELS, out_channels=IMAGE_CHANNELS, num_classes=num_classes,
            low_res_channels=IMAGE_CHANNELS if low_res else 0, aug_dim=augmentation.cond_dim)
    sampler = make_component(plugins, "samplers", stage.sampler, f"{path}.sampler")
    return StageModel(stage, index, backbone, GaussianDiffusion(schedule.betas()),
                      sampler, augmentation, low_res)


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from a tuple of integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] & (2**63 - 1))


def image_generators(seed: int, stage_index: int, image_ids: list[int],
                     device: torch.device | str) -> list[torch.Generator]:
    """One generator per image, seeded by (seed, stage, image id) only."""
    return [torch.Generator(device).manual_seed(derive_seed(seed, stage_index, i)) for i in image_ids]


@torch.no_grad()
def sample_stage(stage: StageModel, model: nn.Module, labels: Tensor, *, seed: int,
                 image_ids: list[int], low_res: Tensor | None, device: torch.device | str,
                 progress: bool = True) -> Tensor:
    """Samples in [-1, 1] for ``labels``; ``low_res`` is the previous stage's z_0 (SR stages)."""
    gens = image_generators(seed, stage.index, image_ids, device)
    aug_cond = None
    if low_res is not None:
        low_res, aug_cond = stage.augmentation.sample(low_res, generators=gens)

    def model_fn(x_t: Tensor, noise_cond: Tensor) -> Tensor:
        return stage.predict(model, x_t, noise_cond, labels, low_res, aug_cond)

    shape = (IMAGE_CHANNELS, stage.spec.resolution, stage.spec.resolution)
    return stage.sampler.sample(model_fn=model_fn, diffusion=stage.diffusion, shape=shape,
                                generators=gens, device=device, progress=progress)


def sample_cascade(stages: list[StageModel], models: dict[str, nn.Module], labels: Tensor, *,
                   seed: int, batch_size: int, device: torch.device | str,
                   progress: bool = True) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Chain class labels -> base -> augmented low-res -> SR ...; returns images and seconds
    per stage. Stages must be listed so that each comes after the one it is conditioned on."""
    images: dict[str, Tensor] = {}
    seconds: dict[str, float] = {}
    labels = labels.to(device)
    for stage in stages:
        start = time.perf_counter()
        chunks = []
        for lo in tqdm(range(0, len(labels), batch_size), desc=f"sample {stage.spec.name}",
                       disable=not progress):
            hi = min(lo + batch_size, len(labels))
            cond = stage.spec.condition_on
            chunks.append(sample_stage(
                stage, models[stage.spec.name], labels[lo:hi], seed=seed, image_ids=list(range(lo, hi)),
                low_res=images[cond][lo:hi].to(device) if cond else None, device=device,
                progress=progress).cpu())
        images[stage.spec.name] = torch.cat(chunks)
        seconds[stage.spec.name] = time.perf_counter() - start
    return images, seconds
