"""Finding plugins and filling the registries.

Three sources, in this order: the built-in plugins (``cdmbench.builtin``), installed packages
that declare an entry point in the ``cdmbench`` group, and importable modules a recipe lists
under ``plugins:``. Environment variables select them: ``CDMBENCH_PLUGINS`` (comma-separated
names: load only these, besides the built-ins) and ``CDMBENCH_BLOCK_PLUGINS`` (never load these).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import warnings
from dataclasses import dataclass, field

import pluggy

from . import hookspecs
from .errors import PluginError, RegistryError
from .interfaces import KINDS
from .registry import Registry

BUILTIN_MODULES = (
    "cdmbench.builtin.unet",
    "cdmbench.builtin.schedules",
    "cdmbench.builtin.samplers",
    "cdmbench.builtin.augmentations",
    "cdmbench.builtin.shapes",
    "cdmbench.builtin.datasets",
    "cdmbench.builtin.features",
    "cdmbench.builtin.metrics",
    "cdmbench.builtin.baselines",
)
ENTRY_POINT_GROUP = "cdmbench"


def _env_set(var: str) -> set[str]:
    return {s.strip() for s in os.environ.get(var, "").split(",") if s.strip()}


def _module_distribution(module) -> tuple[str | None, str | None]:
    """(name, version) of the installed distribution that provides ``module``, if any."""
    top = module.__name__.split(".")[0]
    for dist in importlib.metadata.packages_distributions().get(top, []):
        return dist, importlib.metadata.version(dist)
    return None, None


@dataclass
class Plugins:
    """The plugin manager and one registry per component kind."""

    manager: pluggy.PluginManager
    registries: dict[str, Registry]
    versions: dict[str, str | None]
    packages: dict[str, str] = field(default_factory=dict)  # plugin -> distribution name
    failures: dict[str, str] = field(default_factory=dict)  # plugin -> import or register error

    def __getitem__(self, kind: str) -> Registry:
        return self.registries[kind]

    def components_of(self, plugin: str) -> dict[str, list[str]]:
        return {kind: [c.name for c in reg if c.plugin == plugin]
                for kind, reg in self.registries.items()}


def load_plugins(modules: tuple[str, ...] | list[str] = ()) -> Plugins:
    """A fresh plugin manager with the built-ins, installed entry points and ``modules``."""
    from . import __version__

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    versions: dict[str, str | None] = {}
    packages: dict[str, str] = {}
    failures: dict[str, str] = {}
    only, blocked = _env_set("CDMBENCH_PLUGINS"), _env_set("CDMBENCH_BLOCK_PLUGINS")
    for name in blocked:
        pm.set_blocked(name)

    for name in BUILTIN_MODULES:
        if name not in blocked:
            pm.register(importlib.import_module(name), name=name)
            versions[name], packages[name] = __version__, "cdmbench"

    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if (only and ep.name not in only) or pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party package must not break the others
            failures[ep.name] = f"import of {ep.value} failed: {exc!r}"
            warnings.warn(f"plugin '{ep.name}' ({ep.value}) failed to import: {exc!r}")
            continue
        pm.register(plugin, name=ep.name)
        versions[ep.name] = ep.dist.version if ep.dist else None
        if ep.dist:
            packages[ep.name] = ep.dist.name

    for name in modules:
        if pm.is_blocked(name) or pm.has_plugin(name):
            continue
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise PluginError(
                f"plugin module '{name}' cannot be imported ({exc}); install the package that "
                "provides it or add its folder to PYTHONPATH") from None
        if pm.is_registered(module):  # already loaded, e.g. through its entry point
            continue
        pm.register(module, name=name)
        package, versions[name] = _module_distribution(module)
        if package:
            packages[name] = package

    plugins = Plugins(pm, {kind: Registry(kind) for kind in KINDS}, versions, packages, failures)
    for kind in KINDS:
        _fill(plugins, kind)
    return plugins


def _fill(plugins: Plugins, kind: str) -> None:
    """Call each plugin's hook for ``kind`` with a ``register`` bound to that plugin."""
    registry = plugins.registries[kind]
    hook = getattr(plugins.manager.hook, f"cdmbench_register_{kind}")
    for impl in hook.get_hookimpls():  # in registration order
        name = impl.plugin_name

        def register(component, factory, *, summary: str = "", _plugin=name):
            registry.add(component, factory, summary=summary, plugin=_plugin,
                         version=plugins.versions.get(_plugin))

        try:
            impl.function(register=register)
        except RegistryError:
            raise
        except Exception as exc:
            plugins.failures[name] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"plugin '{name}' raised while registering {kind}: {exc!r}; "
                          "its components are not available")
