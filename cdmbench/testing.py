"""The conformance kit: checks a plugin author runs on their own components.

``check_component(component, args)`` builds a registered component from its defaults (plus
``args``), runs it on tiny CPU inputs and checks what the interfaces in ``cdmbench.interfaces``
promise: shapes, dtypes, finiteness, per-image seeds, that conditioning reaches a backbone, that a
sampler lands on the data of an exact denoiser. A failed check raises ``ConformanceError`` (an
``AssertionError``) naming the component and what it got. With pytest::

    from cdmbench.testing import check_component, components

    @pytest.mark.parametrize("component", components("my-plugin", alone=True), ids=str)
    def test_conformance(component):
        check_component(component)

``alone=True`` loads the built-ins and the plugin under test only, so another installed plugin
(broken, or registering one of its names) cannot change what is tested.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import math
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from cdmbench.diffusion.process import (
    NOISE_COND_SCALE,
    ContinuousProcess,
    DiscreteProcess,
    Prediction,
    eps_from_x0,
    noise_level_cond,
)
from cdmbench.errors import CdmbenchError
from cdmbench.interfaces import BaselineRow
from cdmbench.plugins import BUILTIN_MODULES, ENTRY_POINT_GROUP, Plugins, load_plugins
from cdmbench.recipe.components import REQUIRED
from cdmbench.registry import Component, factory_problem

ROW_KEYS = {"metric", "value", "unit", "n", "higher_is_better", "protocol"}


class ConformanceError(AssertionError):
    """A component does not do what its kind's interface promises."""


def components(plugin: str, plugins: Plugins | None = None, *, alone: bool = False) -> list[Component]:
    """Every component the plugin named ``plugin`` registers (for pytest parametrisation).

    ``alone``: load the built-ins and this plugin only (an installed entry point's name, or an
    importable module), not the other installed plugins, so that none of theirs can break or
    shadow it."""
    if plugins is not None and alone:
        raise ValueError("components(): give plugins or alone=True, not both")
    if alone:
        installed = {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
        builtin = plugin in BUILTIN_MODULES
        plugins = load_plugins([] if builtin or plugin in installed else [plugin],
                               only=[plugin] if plugin in installed else [])
    plugins = plugins or load_plugins()
    found = [c for reg in plugins.registries.values() for c in reg if c.plugin == plugin]
    if not found:
        reason = (f"it failed: {plugins.failures[plugin]}" if plugin in plugins.failures
                  else f"loaded plugins: {', '.join(plugins.versions)}")
        raise CdmbenchError(f"no components from plugin '{plugin}'; {reason}")
    return found


def check_component(component: Component, args: dict[str, Any] | None = None, **options: Any) -> None:
    """Run the checks of ``component.kind`` on ``component`` built with ``args``."""
    check = CHECKS[component.kind]
    check(component.factory, dict(args or {}), name=f"{component.kind[:-1]} '{component.name}'", **options)


def _build(factory: Callable, args: dict[str, Any], **host: Any) -> Any:
    """Call ``factory`` with ``args`` and the host facts it declares (as the registry does), once
    it keeps the contract ``Registry.add`` enforces."""
    problem = factory_problem(factory)
    if problem:
        raise ConformanceError(f"{getattr(factory, '__qualname__', factory)!r}: {problem}")
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return factory(**args, **{k: v for k, v in host.items() if takes_any or k in params})


def _expect(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise ConformanceError(f"{name}: {what}")


def _generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


# --- backbones -------------------------------------------------------------------------------

BACKBONE_HOSTS = {  # a class-conditional base and a super-resolution stage with learned variance
    "base": dict(resolution=16, in_channels=3, out_channels=3, num_classes=4, low_res_channels=0, aug_dim=0),
    "super-resolution": dict(resolution=16, in_channels=3, out_channels=6, num_classes=0,
                             low_res_channels=3, aug_dim=1),
}


def _inputs(host: dict[str, int], b: int, seed: int) -> dict[str, Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    r, low = host["resolution"], host["resolution"] // 2
    return {
        "x_t": torch.randn(b, host["in_channels"], r, r, generator=g),
        "noise_cond": torch.rand(b, generator=g) * 1000,
        "class_labels": torch.randint(0, host["num_classes"], (b,), generator=g) if host["num_classes"] else None,
        "low_res": (torch.rand(b, host["low_res_channels"], low, low, generator=g) * 2 - 1
                    if host["low_res_channels"] else None),
        "aug_cond": torch.rand(b, host["aug_dim"], generator=g) * 1000 if host["aug_dim"] else None,
    }


def check_backbone(factory: Callable, args: dict[str, Any], *, name: str = "backbone") -> None:
    """Builds a base and an SR model; output shape/dtype/finiteness, eval determinism, batch
    independence, each conditioning input changes the output, every parameter gets a gradient,
    a missing required input raises ValueError."""
    for kind, host in BACKBONE_HOSTS.items():
        label = f"{name} ({kind})"
        model = _build(factory, args, **host)
        _expect(isinstance(model, nn.Module), label, f"factory returned {type(model).__name__}, not an nn.Module")
        with torch.no_grad():  # break zero initialisations so that every input can show
            g = torch.Generator().manual_seed(0)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        model.eval()
        inputs = _inputs(host, 3, seed=1)
        with torch.no_grad():
            out = model(**inputs)
            want = (3, host["out_channels"], host["resolution"], host["resolution"])
            _expect(tuple(out.shape) == want, label, f"output shape {tuple(out.shape)}, expected {want}")
            _expect(out.dtype == torch.float32, label, f"output dtype {out.dtype} for float32 input")
            _expect(bool(torch.isfinite(out).all()), label, "output has NaN or inf")
            _expect(torch.equal(out, model(**inputs)), label, "two eval-mode calls differ")
            alone = model(**{k: None if v is None else v[1:2] for k, v in inputs.items()})
            _expect(torch.allclose(alone, out[1:2], atol=1e-4, rtol=1e-3), label,
                    "an image's output depends on the rest of its batch")
            for key, other in (("noise_cond", (inputs["noise_cond"].flip(0) + 100) % 1000),  # within [0, 1000)
                               ("class_labels", None if inputs["class_labels"] is None
                                else (inputs["class_labels"] + 1) % host["num_classes"]),
                               ("low_res", None if inputs["low_res"] is None else -inputs["low_res"]),
                               ("aug_cond", None if inputs["aug_cond"] is None
                                else (inputs["aug_cond"].flip(0) + 100) % 1000)):
                if other is not None:
                    changed = model(**{**inputs, key: other})
                    _expect(not torch.allclose(changed, out), label, f"changing {key} does not change the output")
            missing = "class_labels" if host["num_classes"] else "low_res"
            try:
                model(**{**inputs, missing: None})
            except ValueError:
                pass
            else:
                raise ConformanceError(f"{label}: calling without {missing} must raise ValueError")
        model.train()
        model(**inputs).square().mean().backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        _expect(not unused, label, f"parameters without a gradient (DDP fails on them): {unused[:5]}")


# --- schedules -------------------------------------------------------------------------------

def check_schedule(factory: Callable, args: dict[str, Any], *, name: str = "schedule") -> None:
    """abar(t) is float64, finite, non-increasing from ~1 to ~0; a discrete schedule's betas lie
    in (0, 1] and describe the same process as abar."""
    schedule = _build(factory, args)
    _expect(hasattr(schedule, "timesteps"), name, "no `timesteps` attribute (an int, or None if continuous)")
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    abar = schedule.abar(t)
    _expect(isinstance(abar, Tensor) and abar.shape == t.shape and abar.dtype == torch.float64, name,
            f"abar(t) of a (101,) float64 t must be (101,) float64, got {getattr(abar, 'dtype', type(abar))}")
    _expect(bool(torch.isfinite(abar).all() and (abar > 0).all() and (abar <= 1).all()), name,
            "abar(t) must lie in (0, 1]")
    _expect(bool((abar[1:] <= abar[:-1] + 1e-12).all()), name, "abar(t) must not increase with t")
    _expect(abar[0] > 0.99 and abar[-1] < 0.05, name,
            f"abar(0) = {abar[0]:.4f} and abar(1) = {abar[-1]:.4f}: expected ~1 (data) and ~0 (noise)")
    if schedule.timesteps is not None:
        T = schedule.timesteps
        betas = schedule.betas()
        _expect(betas.shape == (T,) and betas.dtype == torch.float64, name, f"betas() must be ({T},) float64")
        _expect(bool(((betas > 0) & (betas <= 1)).all()), name, "betas must lie in (0, 1]")
        cumprod = torch.cumprod(1 - betas, 0)
        steps = schedule.abar(torch.arange(1, T + 1, dtype=torch.float64) / T)
        gap = (cumprod - steps).abs().max().item()
        _expect(gap < 0.02, name, f"cumprod(1 - betas) differs from abar(k / T) by {gap:.3f}")
    else:
        ContinuousProcess(schedule).grid(10)  # a continuous schedule must give a sampling grid


# --- augmentations ---------------------------------------------------------------------------

def check_augmentation(factory: Callable, args: dict[str, Any], *, name: str = "augmentation") -> None:
    """train/sample keep the image's shape and return (B, cond_dim) finite conditioning; seeded
    calls repeat; sampling is per image (independent of the batch)."""
    from cdmbench.builtin.schedules import cosine

    aug = _build(factory, args, schedule=cosine(timesteps=100))
    _expect(isinstance(getattr(aug, "cond_dim", None), int) and aug.cond_dim >= 0, name,
            "cond_dim must be an int >= 0")
    z0 = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for where, call in (("train", lambda: aug.train(z0.clone(), generator=torch.Generator().manual_seed(1))),
                        ("sample", lambda: aug.sample(z0.clone(), generators=_generators(range(4))))):
        image, cond = call()
        _expect(image.shape == z0.shape and image.dtype == z0.dtype, name,
                f"{where}: image {tuple(image.shape)} {image.dtype}, expected {tuple(z0.shape)} {z0.dtype}")
        _expect(tuple(cond.shape) == (4, aug.cond_dim), name,
                f"{where}: conditioning {tuple(cond.shape)}, expected (4, {aug.cond_dim})")
        _expect(bool(torch.isfinite(image).all() and torch.isfinite(cond).all()), name, f"{where}: NaN or inf")
        again = call()
        _expect(torch.equal(image, again[0]) and torch.equal(cond, again[1]), name,
                f"{where}: the same seed gives different results")
    batch, _ = aug.sample(z0.clone(), generators=_generators(range(4)))
    alone, _ = aug.sample(z0[2:3].clone(), generators=_generators([2]))
    _expect(torch.allclose(alone, batch[2:3]), name, "sample: an image depends on its batch")
    level = getattr(aug, "truncation", 0.0)
    _expect(0.0 <= level < 1.0, name, f"truncation {level} must be in [0, 1)")


# --- samplers --------------------------------------------------------------------------------

def _exact_denoiser(process, data_mean: float, data_var: float, calls: list) -> Callable:
    """E[x_0 | x_t] for data N(mean, var) per pixel (var = 0: a point mass); checks that
    noise_cond is the process's conditioning for abar."""
    if process.continuous:
        t = torch.linspace(0, 1, 10001, dtype=torch.float64)
        abar_table = process.abar_at(t)
        cond = noise_level_cond(abar_table)  # the noise level itself, whatever the grid
    else:
        cond = torch.arange(process.T, dtype=torch.float64) * NOISE_COND_SCALE / process.T
        abar_table = process.abar
    # interpolated in sigma, as fractional-timestep solvers do
    cond, sigma = cond.numpy(), ((1 - abar_table) / abar_table).sqrt().numpy()

    def denoise(x_t: Tensor, abar: Tensor, noise_cond: Tensor) -> Prediction:
        calls.append(len(x_t))
        s = torch.from_numpy(np.interp(noise_cond.double().cpu().numpy(), cond, sigma))
        expected = 1 / (1 + s**2)
        if not torch.allclose(abar.double().cpu(), expected, rtol=2e-3, atol=1e-6):
            raise ConformanceError(f"the sampler passed noise_cond {noise_cond[:2].tolist()} with abar "
                                   f"{abar[:2].tolist()}; the process conditions abar "
                                   f"{expected[:2].tolist()} on those values")
        a = abar.to(x_t.dtype).view(-1, *[1] * (x_t.ndim - 1))
        x0 = data_mean + a.sqrt() * data_var / (a * data_var + 1 - a) * (x_t - a.sqrt() * data_mean)
        return Prediction(x0, eps_from_x0(x_t, a, x0))
    return denoise


ACCURACY_STEPS = 100  # the steps of the sampler check's accuracy test, for a factory taking ``steps``


def check_sampler(factory: Callable, args: dict[str, Any], *, name: str = "sampler", n: int = 256) -> None:
    """On DDPM's linear 1000-step process and on a continuous process (unless the sampler's
    ``check`` refuses it with ValueError): an exact denoiser of a point mass c is sampled to c;
    the ``noise_cond`` handed to the denoiser is the process's for its ``abar``; per-image seeds;
    an early stop at s gives z_s with q(z_s | c)'s moments or raises ValueError. These use
    ``args``. The accuracy test, N(0, 0.25) sampled to a variance in (0.125, 0.375), runs at
    ``ACCURACY_STEPS`` steps when the factory takes ``steps`` (``args`` otherwise): it tests the
    contract (a wrong level mapping fails it), not the solver's accuracy at the author's step count
    (ddim at 10 steps gives 0.12)."""
    from cdmbench.builtin.schedules import linear, log_snr

    sampler = _build(factory, args)
    takes_steps = "steps" in inspect.signature(factory).parameters
    accurate = _build(factory, {**args, "steps": ACCURACY_STEPS}) if takes_steps else sampler
    for label, process in ((f"{name} (discrete)", DiscreteProcess(linear(timesteps=1000).betas())),
                           (f"{name} (continuous)", ContinuousProcess(log_snr(logsnr_min=-15, logsnr_max=15)))):
        try:
            sampler.check(process, learned_variance=False)
        except ValueError:
            if not process.continuous:
                raise
            continue

        def run(denoise, seeds, stop_at=0.0, sampler=sampler) -> Tensor:
            # noqa below: run is called in this iteration only, with this iteration's process
            return sampler.sample(denoise=denoise, process=process, shape=(1, 2, 2),  # noqa: B023
                                  generators=_generators(seeds), stop_at=stop_at, progress=False)

        calls: list = []
        point = run(_exact_denoiser(process, 0.3, 0.0, calls), range(8))
        _expect(tuple(point.shape) == (8, 1, 2, 2), label, f"output shape {tuple(point.shape)}, expected (8, 1, 2, 2)")
        _expect(bool(torch.isfinite(point).all()), label, "output has NaN or inf")
        _expect(torch.allclose(point, torch.full_like(point, 0.3), atol=1e-3), label,
                f"with an exact denoiser of the point mass 0.3 it returned {point.flatten()[:4].tolist()}")
        _expect(len(calls) > 0, label, "the denoiser was never called")
        gauss = _exact_denoiser(process, 0.0, 0.25, [])
        x = run(gauss, range(8))
        _expect(torch.allclose(run(gauss, [5]), x[5:6], atol=1e-5), label,
                "an image depends on its batch (use one generator per image)")
        _expect(torch.equal(run(gauss, range(4)), x[:4]), label, "the same seeds give different images")
        try:
            accurate.check(process, learned_variance=False)
            steps, solver = (ACCURACY_STEPS, accurate) if takes_steps else (args.get("steps", "its default"), sampler)
        except ValueError:  # it cannot take the kit's step count here: the author's
            steps, solver = args.get("steps", "its default"), sampler
        var = run(gauss, range(n), sampler=solver).var().item()
        _expect(0.125 < var < 0.375, label, f"sampled N(0, 0.25) with variance {var:.3f} at {steps} steps")
        s = 0.2
        try:
            z = run(_exact_denoiser(process, 0.3, 0.0, []), range(n), stop_at=s)
        except ValueError:
            continue  # the sampler cannot stop early and says so
        abar_s = (process.abar[process.level_index(s)] if not process.continuous
                  else process.abar_at(torch.tensor([s], dtype=torch.float64))).item()
        mean, var = z.mean().item(), z.var().item()
        _expect(abs(mean - math.sqrt(abar_s) * 0.3) < 0.1 and abs(var / (1 - abar_s) - 1) < 0.3, label,
                f"stopped at s={s}: mean {mean:.3f}, variance {var:.3f}; q(z_s | 0.3) has "
                f"{math.sqrt(abar_s) * 0.3:.3f} and {1 - abar_s:.3f}")


# --- datasets --------------------------------------------------------------------------------

def check_dataset(factory: Callable, args: dict[str, Any], *, name: str = "dataset") -> None:
    """Items are (uint8 (H, W, 3), label in range), repeatable; class names match the count;
    an unknown split raises ValueError."""
    ds = _build(factory, args, split="train", resolution=16)
    _expect(len(ds) > 0, name, "the train split is empty")
    _expect(isinstance(ds.num_classes, int) and ds.num_classes >= 1, name, f"num_classes = {ds.num_classes!r}")
    _expect(len(ds.class_names) == ds.num_classes, name,
            f"{len(ds.class_names)} class names for {ds.num_classes} classes")
    for i in (0, len(ds) - 1):
        image, label = ds[i]
        image = np.asarray(image)
        _expect(image.dtype.name == "uint8" and image.ndim == 3 and image.shape[2] == 3, name,
                f"item {i} is {image.dtype} {image.shape}; expected uint8 (H, W, 3)")
        _expect(0 <= int(label) < ds.num_classes, name, f"item {i} has label {label}")
        _expect((np.asarray(ds[i][0]) == image).all(), name, f"item {i} differs when read twice")
    try:
        _build(factory, args, split="no-such-split", resolution=16)
    except (ValueError, CdmbenchError):
        pass
    else:
        raise ConformanceError(f"{name}: an unknown split must raise ValueError naming the valid ones")


# --- feature networks ------------------------------------------------------------------------

def _shapes_data(n: int = 64, resolution: int = 16) -> tuple[Tensor, Tensor]:
    """Real images from the built-in shapes dataset, uint8 (N, 3, r, r), and labels."""
    from cdmbench.builtin.shapes import shapes
    from cdmbench.data.images import load_images

    data = load_images(shapes(split="train", resolution=resolution, num_images=n, num_classes=4),
                       [resolution], progress=False)
    return data.images[resolution], data.labels


def check_features(factory: Callable, args: dict[str, Any], *, name: str = "features",
                   cache_dir: str | Path | None = None) -> None:
    """Name, SHA-256 and modes; features are float64 (B, D), finite, per image; probabilities
    are rows of a distribution, or a CdmbenchError saying the network has none (DINOv2)."""
    images, labels = _shapes_data()
    with tempfile.TemporaryDirectory() as tmp:
        net = _build(factory, args, num_classes=4, resolution=16, train_data=lambda: (images, labels),
                      data_key={"data": "shapes", "n": len(images)}, cache_dir=Path(cache_dir or tmp),
                      device="cpu", progress=False)
        _expect(isinstance(net.name, str) and net.name, name, "no name")
        _expect(
            isinstance(net.sha256, str) and len(net.sha256) == 64, name, f"sha256 {net.sha256!r} is not a hex digest"
        )
        _expect(len(net.modes) >= 1, name, "modes is empty")
        batch = images[:5]
        f = net.features(batch, mode=net.modes[0])
        _expect(f.dtype == torch.float64 and f.ndim == 2 and len(f) == 5, name,
                f"features of 5 images: {f.dtype} {tuple(f.shape)}, expected float64 (5, D)")
        _expect(bool(torch.isfinite(f).all()), name, "features have NaN or inf")
        _expect(torch.allclose(net.features(batch[:2], mode=net.modes[0]), f[:2], atol=1e-4, rtol=1e-4),
                name, "an image's features depend on its batch")
        try:
            p = net.probabilities(batch)
        except CdmbenchError:  # features only: IS refuses the network with this message
            return
        _expect(p.ndim == 2 and len(p) == 5 and bool((p >= 0).all()), name, "probabilities must be (5, K), >= 0")
        _expect(
            torch.allclose(p.sum(1), torch.ones(5, dtype=p.dtype), atol=1e-4), name, "probabilities do not sum to 1"
        )


# --- metrics ---------------------------------------------------------------------------------

METRIC_RECIPE = """
cdmbench: 1
name: conformance
device: cpu
data: {name: shapes, args: {num_images: 96, num_classes: 4}}
stages:
  - name: base16
    resolution: 16
    backbone: {name: adm-unet, args: {channels: 32, channel_mult: [1, 2], num_res_blocks: 1, attention_resolutions: []}}
    schedule: {name: cosine, args: {timesteps: 10}}
    train: {steps: 1, batch_size: 2}
    sampler: {name: ddim, args: {steps: 2}}
"""


def check_metric(factory: Callable, args: dict[str, Any], *, name: str = "metric") -> None:
    """prepare (if any) and evaluate on real shapes images as the samples; every row carries
    metric, a finite value, unit, n, direction and protocol."""
    from cdmbench.evaluation.samples import EvalContext
    from cdmbench.recipe.load import load_recipe

    metric = _build(factory, args)
    _expect(isinstance(getattr(metric, "name", None), str), name, "no `name` attribute")
    images, labels = _shapes_data(96)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(METRIC_RECIPE)
        recipe, plugins = load_recipe(path, echo=lambda *_: None)
        context = EvalContext(samples=images, labels=labels, num_classes=4, resolution=16, recipe=recipe,
                              plugins=plugins, device="cpu", cache_dir=Path(tmp), protocol={"n": len(images)},
                              progress=False, stage="base16")
        if hasattr(metric, "prepare"):
            metric.prepare(context)
        rows = metric.evaluate(context)
    _expect(isinstance(rows, list) and rows, name, "evaluate returned no rows")
    for row in rows:
        _expect(ROW_KEYS <= set(row), name, f"a row lacks {sorted(ROW_KEYS - set(row))}")
        _expect(isinstance(row["value"], (int, float)) and math.isfinite(row["value"]), name,
                f"row {row['metric']}: value {row['value']!r} is not a finite number")
        _expect(isinstance(row["protocol"], dict), name, f"row {row['metric']}: protocol must be a dict")


# --- baselines -------------------------------------------------------------------------------

def check_baselines(factory: Callable, args: dict[str, Any], *, name: str = "baselines") -> None:
    """A non-empty list of BaselineRow with finite values, a resolution and a source."""
    rows = _build(factory, args)
    _expect(isinstance(rows, list) and rows, name, "the factory returned no rows")
    for row in rows:
        _expect(isinstance(row, BaselineRow), name, f"{row!r} is not a BaselineRow")
        _expect(math.isfinite(row.value) and row.resolution > 0 and row.source, name,
                f"row {row.model}/{row.metric}: needs a finite value, a resolution and a source")


# --- loggers ---------------------------------------------------------------------------------

def check_logger(factory: Callable, args: dict[str, Any], *, name: str = "logger") -> None:
    """A run logged as ``cdmbench run`` logs it (a stage started, a training row, result rows with a
    failed one, its sample grid, closed), then continued as ``cdmbench evaluate`` continues it
    (``resuming``): every method exists and takes those calls."""
    from PIL import Image

    from cdmbench.storage.rundir import result_row

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        grid = run_dir / "base16" / "samples" / "grid.png"
        grid.parent.mkdir(parents=True)
        Image.new("RGB", (32, 16), (200, 40, 40)).save(grid)
        rows = [result_row(run="conformance", stage="base16", metric="train_loss", value=0.5, unit="", n=2,
                           higher_is_better=False, protocol={"loss": "simple"}),
                result_row(run="conformance", stage="base16", metric="fid", value=None, unit="", n=8,
                           higher_is_better=None, protocol={"error": "no features"}, status="failed")]
        for resuming in (False, True):
            logger = _build(factory, args, run_dir=run_dir, run_name="conformance",
                            config={"cdmbench": 1, "name": "conformance"}, resuming=resuming)
            lacking = [m for m in REQUIRED["loggers"] if not callable(getattr(logger, m, None))]
            _expect(not lacking, name, f"the logger has no {', '.join(lacking)}")
            calls = [("start_stage", ("base16", 0)),
                     ("log_scalars", ("base16", {"loss": 0.5, "grad_norm": 1.0, "images_per_s": 10.0,
                                                 "seconds": 0.1}, 2)),
                     ("log_results", ("base16", rows, 2)), ("log_image", ("base16", "samples", grid, 2)),
                     ("close", ())]
            for method, call in calls if not resuming else calls[2:]:
                try:
                    getattr(logger, method)(*call)
                except Exception as exc:
                    raise ConformanceError(f"{name}: {method} raised {exc!r} "
                                           f"({'resuming' if resuming else 'a new run'})") from exc


CHECKS: dict[str, Callable[..., None]] = {
    "backbones": check_backbone, "schedules": check_schedule, "augmentations": check_augmentation,
    "samplers": check_sampler, "datasets": check_dataset, "features": check_features,
    "metrics": check_metric, "baselines": check_baselines, "loggers": check_logger,
}
