"""What each component kind must implement. Plugins may subclass these or just match them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from cdmbench.hookspecs import KINDS  # noqa: F401  (public here too)

# Facts the host passes to factories of each kind; a recipe may not set them in `args`.
HOST_ARGS: dict[str, tuple[str, ...]] = {
    "backbones": ("resolution", "in_channels", "out_channels", "num_classes", "low_res_channels",
                  "aug_dim"),
    "schedules": (),
    "augmentations": ("schedule",),
    "samplers": (),
    "datasets": ("split", "resolution"),
    "features": ("num_classes", "resolution", "train_data", "data_key", "cache_dir", "device",
                 "progress"),
    "metrics": (),
    "baselines": (),
    "loggers": ("run_dir", "run_name", "config", "resuming"),
}


class Backbone(nn.Module):
    """A denoiser: forward(x_t, noise_cond, class_labels, low_res, aug_cond) -> prediction.

    x_t: (B, C, H, W); noise_cond: (B,) float, the process's conditioning value of the level,
    about [0, 1000]: 1000 t / T for step t of a discrete process, the noise level itself for a
    continuous one (``cdmbench.diffusion.noise_level_cond``: 500 - 25 log-SNR);
    class_labels: (B,) long or None; low_res: (B, C, h, w) previous-stage image (SR stages) or
    None; aug_cond: (B, aug_dim) augmentation conditioning or None. Returns (B, out_channels, H, W).

    Optional: ``set_gradient_checkpointing(enabled: bool)``, called when a recipe sets
    ``train.gradient_checkpointing``; the backbone then recomputes activations in backward when
    in training mode, with unchanged gradients.
    """

    def forward(self, x_t: Tensor, noise_cond: Tensor, class_labels: Tensor | None = None,
                low_res: Tensor | None = None, aug_cond: Tensor | None = None) -> Tensor:
        raise NotImplementedError


@runtime_checkable
class Schedule(Protocol):
    """A noise schedule: abar(t) for continuous t in [0, 1] and, unless ``timesteps`` is None
    (a continuous schedule), its T-step discretisation."""

    timesteps: int | None

    def abar(self, t: Tensor) -> Tensor:
        """abar(t) = prod (1 - beta) up to t, for t in [0, 1] (float64)."""

    def betas(self) -> Tensor:
        """beta_1..beta_T of the discrete process (float64, shape (T,)); discrete schedules only."""


@runtime_checkable
class Augmentation(Protocol):
    """What happens to the low-res conditioning image z_0 of an SR stage.

    ``train`` runs on ground-truth low-res images during training, ``sample`` on the previous
    stage's output at sampling time. Both return the image handed to the backbone and the
    conditioning vector (B, cond_dim) describing what was done (level s, ...).
    """

    cond_dim: int

    def train(self, z0: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        ...

    def sample(self, z0: Tensor, *, generators: list[torch.Generator]) -> tuple[Tensor, Tensor]:
        ...


@runtime_checkable
class Sampler(Protocol):
    """Draws x_0 (or z_s) by running the reverse process of a ``cdmbench.diffusion.process`` process.

    ``denoise(x_t, abar, noise_cond) -> Prediction`` is the model with its class labels, low-res
    input and guidance bound; ``process.grid(steps, stop_at, spacing)`` gives the levels to visit
    and the ``noise_cond`` of each, placed by a ``cdmbench.diffusion.Spacing`` (None: uniform in t).
    """

    def check(self, process: Any, *, learned_variance: bool, stop_at: float = 0.0) -> None:
        """Raise ValueError saying what to change when this sampler cannot sample ``process``
        down to level ``stop_at`` (called when a recipe is validated, before any work; with
        ``stop_at`` > 0 when a truncated stage is conditioned on this one)."""

    def sample(self, *, denoise: Callable[[Tensor, Tensor, Tensor], Any], process: Any,
               shape: tuple[int, ...], generators: list[torch.Generator],
               device: torch.device | str = "cpu", stop_at: float = 0.0,
               progress: bool = True) -> Tensor:
        """One generator per image (per-image seeds); returns x_0 in [-1, 1] of shape
        (B, *shape), or z_s at level ``stop_at`` > 0."""


@runtime_checkable
class Dataset(Protocol):
    """An image source: ``ds[i]`` is (uint8 array (H, W, 3), integer label)."""

    num_classes: int
    class_names: list[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...


@runtime_checkable
class FeatureNetwork(Protocol):
    """A network that maps images to features (for FID) and class probabilities (for IS).

    ``modes``: the resize modes it supports (the first is its default), e.g. clean-fid's
    ``legacy_tensorflow`` and ``clean`` for Inception, ``native`` for a network that reads the
    images at their own resolution. ``sha256`` identifies the weights and goes into every result.
    """

    name: str
    sha256: str
    modes: tuple[str, ...]

    def features(self, images: Tensor, *, mode: str) -> Tensor:
        """uint8 (B, 3, H, W) -> float64 (B, D) features."""

    def probabilities(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) -> float64 (B, K) class probabilities."""


@runtime_checkable
class Metric(Protocol):
    """A sample-quality metric. ``evaluate(context)`` (an ``evaluate.EvalContext``: samples,
    labels, real data, feature networks) returns result rows (``rundir.result_row`` keyword
    dicts without run and stage); every value carries its protocol. An optional
    ``prepare(context)`` loads what the metric needs (feature networks) before any sampling, so
    a missing file fails early. An optional ``replaces_training_set = True`` asks ``cdmbench
    evaluate`` for ``context.training_set``: one generated image per training image; with
    ``all_ranks = True`` too, every torchrun rank calls ``evaluate`` (rank 0's rows are kept;
    the others have no ``context.samples``), for training on all GPUs together."""

    name: str

    def evaluate(self, context: Any) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class BaselineRow:
    """One published number with the protocol it was measured under."""

    model: str
    dataset: str
    resolution: int
    metric: str
    value: float
    source: str
    protocol: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Logger(Protocol):
    """An experiment tracker a run's numbers and sample grids also go to (the run directory keeps
    them all: train_log.jsonl, results.jsonl, the grids). Only the main process of a torchrun job
    opens loggers; ``cdmbench run`` opens them once and ``evaluate``/``sweep`` once more each,
    with ``resuming`` true (continue the same tracker run). Every method gets the stage's name and
    the training step of the weights concerned: the step the logger plots against."""

    def start_stage(self, stage: str, step: int) -> None:
        """Stage ``stage`` (re)starts training after step ``step`` (its checkpoint's; 0 from
        scratch): what was logged for it after ``step`` came from a job that was cut short, and a
        tracker that can drop it does (TensorBoard purges it)."""

    def log_scalars(self, stage: str, values: dict[str, float], step: int) -> None:
        """One training log row of ``stage`` at step ``step``: ``loss``, ``grad_norm``,
        ``images_per_s`` (since the previous row), ``seconds`` (training time across resumes) and,
        on GPUs, ``peak_memory_gib``."""

    def log_results(self, stage: str, rows: list[dict[str, Any]], step: int) -> None:
        """Result rows of ``stage`` as results.jsonl holds them (``rundir.result_row``: metric,
        value (None when status is 'failed'), stderr, n, unit, higher_is_better, protocol, status,
        time), measured on the weights of step ``step``."""

    def log_image(self, stage: str, name: str, path: Path, step: int) -> None:
        """An image file of ``stage`` (``name`` ``samples``: its sample grid, one row per class)
        sampled from the weights of step ``step``."""

    def close(self) -> None:
        """Flush and end the tracker run; called once, also when the command fails."""
