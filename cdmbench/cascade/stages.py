"""Stages of a cascade built from a recipe, and sampling chained through them.

A base stage maps class labels to images; a super-resolution (SR) stage also receives the
previous stage's image z_0, augmented (``Augmentation.sample``), and the augmentation's
conditioning vector.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from cdmbench.diffusion.process import (
    LOSSES,
    Denoise,
    Prediction,
    Process,
    make_process,
    prediction_from_output,
    randn_per_image,
)
from cdmbench.errors import CdmbenchError, RecipeError
from cdmbench.interfaces import Augmentation, Sampler
from cdmbench.plugins import Plugins
from cdmbench.recipe.components import make_component
from cdmbench.recipe.schema import Recipe, Stage
from cdmbench.runtime.progress import bar

IMAGE_CHANNELS = 3


@dataclass
class StageModel:
    """Everything one stage needs to train and sample."""

    spec: Stage
    index: int
    backbone: nn.Module
    process: Process
    sampler: Sampler
    augmentation: Augmentation
    low_res: int | None  # resolution of the conditioning stage, None for a base stage
    null_label: int | None  # the "no class" label of classifier-free guidance, if trained
    sample_precision: str = "fp32"  # the network's precision when sampling: fp32 or bf16 (autocast)
    cond_process: Process | None = None  # the process of the stage it is conditioned on (SR stages)
    # role (backbone, sampler, augmentation) -> the component and its plugin, for error messages
    labels: dict[str, str] = field(default_factory=dict)
    checked: set[str] = field(default_factory=set)  # the roles whose first call was checked
    guide: nn.Module | None = None  # autoguidance's weaker network (guidance.guide_step / guide_stage), loaded

    @property
    def prediction(self) -> str:
        return LOSSES[self.spec.loss]

    @property
    def learned_variance(self) -> bool:
        return self.spec.loss == "hybrid"

    @property
    def truncation(self) -> float:
        """The level s at which the previous stage's sampler stops for this stage (0: it samples
        clean data z_0). Optional for a plugin augmentation."""
        return truncation_of(self.augmentation)

    def condition(self, low_res: Tensor, generators: list[torch.Generator], *,
                  ground_truth: bool = False) -> tuple[Tensor, Tensor]:
        """The augmented low-res input and its conditioning vector. ``low_res`` is the previous
        stage's output (z_0, or z_s at ``truncation``), or with ``ground_truth`` a real image
        z_0, which a truncated stage first takes to z_s ~ q(z_s | z_0) of the previous stage's
        process, at the level its sampler stops at."""
        s = self.truncation
        if ground_truth and s > 0:
            abar = self.cond_process.grid(1, s).abar[-1].item()
            eps = randn_per_image(tuple(low_res.shape[1:]), generators, low_res.device)
            low_res = abar**0.5 * low_res + (1 - abar)**0.5 * eps
        return self._checked_augmentation("augmentation", low_res,
                                          self.augmentation.sample(low_res, generators=generators))

    def train_condition(self, low_res: Tensor) -> tuple[Tensor, Tensor]:
        """The augmented low-res input of a training batch and its conditioning vector (the
        augmentation's ``train``, its first call checked like ``condition``'s)."""
        return self._checked_augmentation("augmentation.train", low_res, self.augmentation.train(low_res))

    def _checked_augmentation(self, role: str, low_res: Tensor, out):
        """``out`` of the augmentation's ``role`` call, its first one checked: the image as
        ``low_res`` and a (B, cond_dim) conditioning vector."""
        if role not in self.checked:
            image, cond = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
            if (self.check_output("augmentation", "image", image, tuple(low_res.shape), low_res.dtype)
                    & self.check_output("augmentation", "conditioning", cond,
                                        (len(low_res), self.augmentation.cond_dim))):
                self.checked.add(role)
        return out

    def forward(self, model: nn.Module, x_t: Tensor, noise_cond: Tensor, labels: Tensor,
                low_res: Tensor | None, aug_cond: Tensor | None) -> Tensor:
        out = model(x_t, noise_cond, labels, low_res=low_res,
                    aug_cond=aug_cond if aug_cond is not None and aug_cond.shape[1] else None)
        if "backbone" not in self.checked:
            channels = x_t.shape[1] * (2 if self.learned_variance else 1)
            if self.check_output("backbone", "output", out, (len(x_t), channels, *x_t.shape[2:]),
                                 None if _autocast_on(x_t.device) else x_t.dtype):
                self.checked.add("backbone")
        return out

    def check_output(self, role: str, what: str, value, shape: tuple[int, ...],
                     dtype: torch.dtype | None = torch.float32) -> bool:
        """What the first call of a stage's ``role`` (sampler, augmentation, backbone) returned:
        a tensor of ``shape`` and ``dtype`` (any floating type for None), finite, or a
        CdmbenchError naming the component and its plugin. On the meta device (``--dry-run``) only
        shape and dtype, and False: the values are left for the first real call."""
        label = f"{self.labels.get(role, role)} of stage {self.spec.name}"
        if not isinstance(value, Tensor):
            raise CdmbenchError(f"{label} returned {type(value).__name__} as its {what}, not a tensor "
                                f"of shape {shape}; see cdmbench.interfaces for what a {role} returns")
        if tuple(value.shape) != tuple(shape):
            raise CdmbenchError(f"{label} returned its {what} with shape {tuple(value.shape)}; expected "
                                f"{tuple(shape)} (see cdmbench.interfaces.{role.capitalize()})")
        if (dtype is not None and value.dtype != dtype) or not value.is_floating_point():
            raise CdmbenchError(f"{label} returned its {what} as {value.dtype}; expected "
                                f"{dtype or 'a floating-point type'}")
        if value.device.type == "meta":
            return False
        if not bool(torch.isfinite(value).all()):
            raise CdmbenchError(f"{label} returned NaN or inf in its {what} on its first call")
        return True

    def autocast(self, device: torch.device | str, precision: str | None = None):
        """The context the network samples in: bf16 autocast when ``precision`` (default: the
        stage's sampling precision) is bf16."""
        precision = precision or self.sample_precision
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def denoiser(self, model: nn.Module, labels: Tensor, low_res: Tensor | None,
                 aug_cond: Tensor | None, *, guidance_scale: float | None = None,
                 precision: str | None = None) -> Denoise:
        """The model with its conditioning bound, as the samplers call it. With a guidance
        scale w != 1 the prediction is uncond + w (cond - uncond) (the variance stays cond's),
        where uncond is the network's prediction for the null label, or with autoguidance
        (``guide``) the weaker network's conditional prediction; at the noise levels sigma in the
        stage's ``guidance.interval`` (all when it has none); at the others, and with w = 1, the
        conditional model alone, in one pass. The network runs in ``precision`` (default: the
        stage's sampling precision); the sampler's arithmetic stays in float32."""
        w = self.spec.guidance.scale if guidance_scale is None else guidance_scale
        interval = self.spec.guidance.interval

        def conditional(x_t: Tensor, noise_cond: Tensor, net: nn.Module = model) -> Tensor:
            with self.autocast(x_t.device, precision):
                return self.forward(net, x_t, noise_cond, labels, low_res, aug_cond).float()

        def guided(x_t: Tensor, noise_cond: Tensor) -> Tensor:
            if self.guide is None and guide_of(self.spec) is not None:
                raise CdmbenchError(f"stage {self.spec.name}: autoguidance's guide network ({guide_of(self.spec)}) "
                                    "is not loaded; sample through cdmbench sample, evaluate or run")
            if self.guide is not None:
                cond, uncond = conditional(x_t, noise_cond), conditional(x_t, noise_cond, self.guide)
            else:
                with self.autocast(x_t.device, precision):
                    both = self.forward(model, x_t.repeat(2, 1, 1, 1), noise_cond.repeat(2),
                                        torch.cat([labels, torch.full_like(labels, self.null_label)]),
                                        None if low_res is None else low_res.repeat(2, 1, 1, 1),
                                        None if aug_cond is None else aug_cond.repeat(2, 1)).float()
                cond, uncond = both.chunk(2)
            c = x_t.shape[1]
            return torch.cat([uncond[:, :c] + w * (cond[:, :c] - uncond[:, :c]), cond[:, c:]], dim=1)

        def denoise(x_t: Tensor, abar: Tensor, noise_cond: Tensor) -> Prediction:
            inside = guidance_applies(abar, interval) if w != 1.0 else torch.zeros_like(abar, dtype=torch.bool)
            if bool(inside.all()):
                out = guided(x_t, noise_cond)
            elif not bool(inside.any()):
                out = conditional(x_t, noise_cond)
            else:  # levels on both sides of the interval in one batch
                out = torch.where(inside.view(-1, 1, 1, 1), guided(x_t, noise_cond), conditional(x_t, noise_cond))
            return prediction_from_output(out, x_t, abar, prediction=self.prediction,
                                          learned_variance=self.learned_variance)
        return denoise


def guidance_applies(abar: Tensor, interval: tuple[float, float] | None) -> Tensor:
    """Whether guidance applies at each level abar: its sigma = sqrt((1 - abar) / abar) lies in
    ``interval`` (low, high], or there is no interval (bool, abar's shape)."""
    if interval is None:
        return torch.ones_like(abar, dtype=torch.bool)
    sigma = ((1 - abar.double()) / abar.double()).sqrt()
    return (sigma > interval[0]) & (sigma <= interval[1])


def _autocast_on(device: torch.device) -> bool:
    """Whether autocast is on for ``device``'s type (a backbone then returns a lower precision)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type without autocast (meta)
        return False


def truncation_of(augmentation) -> float:
    return getattr(augmentation, "truncation", 0.0)


class Composition:
    """Several augmentations applied in order; their conditioning vectors concatenate."""

    def __init__(self, parts: list):
        truncated = [p for p in parts if truncation_of(p) > 0]
        if len(truncated) > 1:
            raise ValueError("at most one augmentation of a stage can be truncated")
        self.parts = parts
        self.cond_dim = sum(p.cond_dim for p in parts)

    @property
    def truncation(self) -> float:
        return max(truncation_of(p) for p in self.parts)

    def train(self, z0: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        conds = []
        for part in self.parts:
            z0, cond = part.train(z0, generator=generator)
            conds.append(cond)
        return z0, torch.cat(conds, dim=1)

    def sample(self, z0: Tensor, *, generators: list[torch.Generator]) -> tuple[Tensor, Tensor]:
        conds = []
        for part in self.parts:
            z0, cond = part.sample(z0, generators=generators)
            conds.append(cond)
        return z0, torch.cat(conds, dim=1)


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
    many = isinstance(stage.augmentation, list)
    parts = [make_component(plugins, "augmentations", spec,
                            f"{path}.augmentation" + (f"[{i}]" if many else ""), schedule=cond_schedule)
             for i, spec in enumerate(stage.augmentations())]
    try:
        augmentation = Composition(parts) if many else parts[0]
    except ValueError as exc:
        raise RecipeError(f"{path}.augmentation", str(exc)) from None
    cond_process = make_process(cond_schedule) if cond_schedule is not None else None
    if truncation_of(augmentation) > 0:  # the previous stage's sampler must be able to stop there
        check_truncation(plugins, recipe.stage(stage.condition_on), cond_process, truncation_of(augmentation),
                         f"{path}.augmentation")
    process = make_process(schedule)
    learned_variance = stage.loss == "hybrid"
    if learned_variance and process.continuous:
        raise RecipeError(f"{path}.loss", "the hybrid loss's variational bound needs a discrete "
                          f"schedule; '{stage.schedule.name}' is continuous: use loss simple or v, "
                          "or a schedule with timesteps (cosine, linear)")
    sampler = make_component(plugins, "samplers", stage.sampler, f"{path}.sampler")
    _check_sampler(sampler, process, learned_variance, 0.0, f"{path}.sampler", f"sampler '{stage.sampler.name}'")
    # Classifier-free guidance trains an extra "null" class, the last label.
    null_label = num_classes if stage.guidance.label_dropout > 0 else None
    torch.manual_seed(derive_seed(recipe.seed, index))  # the initial weights depend on the seed only
    with torch.device(device):  # "meta" builds the network without memory
        backbone = make_component(
            plugins, "backbones", stage.backbone, f"{path}.backbone", resolution=stage.resolution,
            in_channels=IMAGE_CHANNELS,
            out_channels=IMAGE_CHANNELS * (2 if learned_variance else 1),
            num_classes=num_classes + (null_label is not None),
            low_res_channels=IMAGE_CHANNELS if low_res else 0, aug_dim=augmentation.cond_dim)
    if stage.train.gradient_checkpointing:
        if not hasattr(backbone, "set_gradient_checkpointing"):
            raise RecipeError(f"{path}.train.gradient_checkpointing", f"backbone "
                              f"'{stage.backbone.name}' has no set_gradient_checkpointing method; "
                              "set it to false or use a backbone that supports it (adm-unet)")
        backbone.set_gradient_checkpointing(True)
    sample_precision = stage.train.precision if recipe.sample.precision == "train" else recipe.sample.precision
    labels = {"backbone": _label(plugins, "backbones", stage.backbone),
              "sampler": _label(plugins, "samplers", stage.sampler),
              "augmentation": " + ".join(_label(plugins, "augmentations", a) for a in stage.augmentations())}
    return StageModel(stage, index, backbone, process, sampler, augmentation, low_res, null_label,
                      sample_precision, cond_process, labels)


def _label(plugins: Plugins, kind: str, spec) -> str:
    """A component as errors name it: its kind, name, plugin and version."""
    component = plugins[kind].get(spec.name)
    version = f" {component.version}" if component.version else ""
    return f"{kind[:-1]} '{spec.name}' (plugin '{component.plugin}'{version})"


def _check_sampler(sampler: Sampler, process: Process, learned_variance: bool, stop_at: float, path: str,
                   what: str) -> None:
    """RecipeError at ``path`` when ``sampler.check`` refuses ``process`` (ValueError) or does
    not take the arguments of the contract (TypeError)."""
    try:
        sampler.check(process, learned_variance=learned_variance, stop_at=stop_at)
    except ValueError as exc:
        raise RecipeError(path, f"{what}: {exc}") from None
    except TypeError as exc:
        raise RecipeError(path, f"{what}: check(process, learned_variance=..., stop_at=...) raised "
                                f"TypeError ({exc}); a sampler's check takes (process, *, learned_variance, "
                                "stop_at=0.0) (cdmbench.interfaces.Sampler)") from None


def check_truncation(plugins: Plugins, cond: Stage, cond_process: Process, level: float, path: str) -> None:
    """RecipeError at ``path`` unless stage ``cond``'s sampler can stop its process at ``level``."""
    sampler = make_component(plugins, "samplers", cond.sampler, f"stages.{cond.name}.sampler")
    _check_sampler(sampler, cond_process, cond.loss == "hybrid", level, path,
                   f"truncated at level {level}, stage {cond.name}'s sampler '{cond.sampler.name}' must stop there")


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
                 stop_at: float = 0.0, ground_truth: bool = False, progress: bool = True) -> Tensor:
    """Samples in [-1, 1] for ``labels`` (or z_s at ``stop_at`` > 0); ``low_res`` is the
    previous stage's output (SR stages): z_0, or z_s when this stage's augmentation is
    truncated; with ``ground_truth``, real images z_0 (``StageModel.condition``)."""
    gens = image_generators(seed, stage.index, image_ids, device)
    aug_cond = None
    if low_res is not None:
        low_res, aug_cond = stage.condition(low_res, gens, ground_truth=ground_truth)
    shape = (IMAGE_CHANNELS, stage.spec.resolution, stage.spec.resolution)
    x = stage.sampler.sample(denoise=stage.denoiser(model, labels, low_res, aug_cond),
                             process=stage.process, shape=shape, generators=gens,
                             device=device, stop_at=stop_at, progress=progress)
    if "sampler" not in stage.checked and stage.check_output("sampler", "images", x, (len(gens), *shape)):
        stage.checked.add("sampler")
    return x


def sample_cascade(stages: list[StageModel], models: dict[str, nn.Module], labels: Tensor, *,
                   seed: int, batch_size: int, device: torch.device | str, progress: bool = True,
                   first_id: int = 0, stop_at: dict[str, float] | None = None,
                   given: dict[str, Tensor] | None = None) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Chain class labels -> base -> augmented low-res -> SR ...; returns images in [-1, 1] and
    seconds per stage. Stages must be listed so that each comes after the one it is
    conditioned on. Image i of the batch is image ``first_id + i`` (its seed).

    A stage whose output feeds a truncated augmentation is also sampled to that level s (z_s);
    ``stop_at`` makes a stage stop at a level instead of sampling to clean data (a sweep's
    truncated inputs). The returned image of such a stage is its z_s.

    ``given``: the outputs of stages not listed that a listed stage is conditioned on (z_0, or
    z_s at that stage's truncation level), e.g. a previous stage sampled once for several."""
    levels: dict[str, set[float]] = {st.spec.name: set() for st in stages}
    outputs: dict[tuple[str, float], Tensor] = {}
    for st in stages:
        cond = st.spec.condition_on
        if cond in levels:
            levels[cond].add(st.truncation)
        elif cond is not None:
            outputs[(cond, st.truncation)] = (given or {})[cond]
    for name, wanted in levels.items():
        if not wanted:  # nobody here conditions on it: clean data, or the level asked for
            wanted.add((stop_at or {}).get(name, 0.0))
    seconds: dict[str, float] = {}
    labels = labels.to(device)
    for stage in stages:
        start = time.perf_counter()
        cond = stage.spec.condition_on
        for level in sorted(levels[stage.spec.name]):
            chunks = []
            for lo in bar(range(0, len(labels), batch_size), desc=f"sample {stage.spec.name}", unit="batch",
                          progress=progress):
                hi = min(lo + batch_size, len(labels))
                low_res = outputs[(cond, stage.truncation)][lo:hi].to(device) if cond else None
                chunks.append(sample_stage(
                    stage, models[stage.spec.name], labels[lo:hi], seed=seed,
                    image_ids=list(range(first_id + lo, first_id + hi)), low_res=low_res,
                    device=device, stop_at=level, progress=progress).cpu())
            outputs[(stage.spec.name, level)] = torch.cat(chunks)
        seconds[stage.spec.name] = time.perf_counter() - start
    images = {name: outputs[(name, min(wanted))] for name, wanted in levels.items()}
    return images, seconds


def build_chain(plugins: Plugins, recipe: Recipe, target: str, num_classes: int, device) -> list[StageModel]:
    """The stages that produce ``target``'s samples, base first, and only those: evaluating the
    middle stage of a cascade does not build (or hold in memory) the last."""
    names = [recipe.stage(target).name]
    while recipe.stage(names[0]).condition_on is not None:
        names.insert(0, recipe.stage(names[0]).condition_on)
    chain = [build_stage(plugins, recipe, recipe.stage(name), num_classes=num_classes, device=device)
             for name in names]
    for st in chain:
        attach_guide(plugins, recipe, st, num_classes, device)
    return chain


def guide_of(stage: Stage) -> str | None:
    """The stage whose weights guide ``stage`` by autoguidance (itself at ``guide_step``), or None."""
    guidance = stage.guidance
    return guidance.guide_stage or (stage.name if guidance.guide_step is not None else None)


def attach_guide(plugins: Plugins, recipe: Recipe, st: StageModel, num_classes: int, device) -> None:
    """Build the network of ``st``'s autoguidance guide (weights loaded later), if it has one."""
    name = guide_of(st.spec)
    if name is not None:
        st.guide = build_stage(plugins, recipe, recipe.stage(name), num_classes=num_classes, device=device).backbone


def samplers_of(chain: list[StageModel]) -> dict[str, str]:
    """Each stage's sampler as it goes into a result's protocol, e.g. {"sr32": "ddim {'steps': 50}"},
    with ", bf16" when its network samples in bf16, its guidance when it has any, e.g.
    ", guidance 3.0 at sigma (0.28, 5.42]", and ", post-hoc EMA sigma_rel 0.08" when it samples
    with one (``posthoc_sigma_rel``)."""
    return {st.spec.name: f"{st.spec.sampler.name} {st.spec.sampler.args}".strip()
            + (", bf16" if st.sample_precision == "bf16" else "") + _guidance_of(st.spec.guidance)
            + ("" if st.spec.posthoc_sigma_rel is None else f", post-hoc EMA sigma_rel {st.spec.posthoc_sigma_rel:g}")
            for st in chain}


def _guidance_of(guidance) -> str:
    if guidance.scale == 1.0:
        return ""
    interval = "" if guidance.interval is None else " at sigma ({}, {}]".format(*guidance.interval)
    guide = (f" by stage {guidance.guide_stage}" if guidance.guide_stage else
             f" by step {guidance.guide_step}" if guidance.guide_step is not None else "")
    return f", {'autoguidance' if guide else 'guidance'} {guidance.scale:g}{guide}{interval}"


def build_all(plugins: Plugins, recipe: Recipe, num_classes: int, device) -> list[StageModel]:
    return [build_stage(plugins, recipe, s, num_classes=num_classes, device=device)
            for s in recipe.stages]
