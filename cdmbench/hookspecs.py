"""The plugin contract: one hook per component kind, plus one for CLI commands.

A plugin is any module or object with functions decorated by ``cdmbench.hookimpl`` and named
like the specs below. Each component hook receives ``register``, a callback bound to that plugin:

    register(name, factory, *, summary="", requires=())

``name`` is lower-case kebab (``adm-unet``); ``factory`` is a callable taking keyword arguments
only; ``requires`` names the modules the component needs beyond the plugin's own (an optional
package): while one is not installed, the name is not available, with that reason. Recipe
``args`` are checked against the factory's signature before any work, and facts that come from
the run (resolution, channels, number of classes, ...) are injected by the host: see
``cdmbench.interfaces`` for what each kind's factory receives and must return.
"""

from __future__ import annotations

import pluggy

PROJECT = "cdmbench"
hookspec = pluggy.HookspecMarker(PROJECT)
# the component kinds, one registry and one register hook (cdmbench_register_<kind>) each
KINDS = ("backbones", "schedules", "augmentations", "samplers", "datasets", "features", "metrics",
         "baselines", "loggers")


@hookspec
def cdmbench_register_backbones(register):
    """Register denoising networks. factory(**args, **host facts) -> ``interfaces.Backbone``.

    Host facts: resolution, in_channels, out_channels, num_classes, low_res_channels, aug_dim.
    """


@hookspec
def cdmbench_register_schedules(register):
    """Register noise schedules. factory(**args) -> ``interfaces.Schedule``."""


@hookspec
def cdmbench_register_augmentations(register):
    """Register low-res conditioning augmentations. factory(**args, schedule=...) ->
    ``interfaces.Augmentation``; ``schedule`` is the conditioning stage's schedule."""


@hookspec
def cdmbench_register_samplers(register):
    """Register reverse-process samplers. factory(**args) -> ``interfaces.Sampler``."""


@hookspec
def cdmbench_register_datasets(register):
    """Register image sources. factory(**args, split=..., resolution=...) ->
    ``interfaces.Dataset``; ``resolution`` is the largest one the cascade needs."""


@hookspec
def cdmbench_register_features(register):
    """Register feature networks for metrics. factory(**args, num_classes=..., resolution=...,
    train_data=..., data_key=..., cache_dir=..., device=..., progress=...) ->
    ``interfaces.FeatureNetwork``;
    ``train_data()`` loads the training split (uint8 (N, 3, H, W) images, labels) for networks
    that are trained on the dataset, memory-mapped when it is prepared (index batches of it),
    ``data_key`` identifies that data for caching."""


@hookspec
def cdmbench_register_metrics(register):
    """Register sample-quality metrics. factory(**args) -> ``interfaces.Metric``."""


@hookspec
def cdmbench_register_baselines(register):
    """Register published result rows. factory() -> list of ``interfaces.BaselineRow``."""


@hookspec
def cdmbench_register_loggers(register):
    """Register experiment trackers. factory(**args, run_dir=..., run_name=..., config=...,
    resuming=...) -> ``interfaces.Logger``; ``run_dir`` is the run directory, ``run_name`` the
    recipe's name, ``config`` the resolved recipe (a dict) and ``resuming`` whether the run
    directory already held this run (continue its tracker run)."""


@hookspec
def cdmbench_add_commands(cli):
    """Add ``click`` commands to the ``cdmbench`` command group ``cli``."""
