"""Finding plugins and filling the registries.

Three sources, in this order: the built-in plugins (``cdmbench.builtin``), installed packages
that declare an entry point in the ``cdmbench`` group, and importable modules a recipe lists
under ``plugins:``. Environment variables select them: ``CDMBENCH_PLUGINS`` (comma-separated
names: load only these, besides the built-ins) and ``CDMBENCH_BLOCK_PLUGINS`` (never load these).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import warnings
from dataclasses import dataclass, field

import pluggy

from cdmbench import hookspecs
from cdmbench.errors import PluginError, RegistryError
from cdmbench.hookspecs import KINDS
from cdmbench.registry import Registry, suggestion

BUILTIN_MODULES = (
    "cdmbench.builtin.unet",
    "cdmbench.builtin.schedules",
    "cdmbench.builtin.samplers",
    "cdmbench.builtin.augmentations",
    "cdmbench.builtin.shapes",
    "cdmbench.builtin.datasets",
    "cdmbench.builtin.features",
    "cdmbench.builtin.dinov2",
    "cdmbench.builtin.metrics",
    "cdmbench.builtin.baselines",
    "cdmbench.builtin.loggers",
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


def _fail(failures: dict[str, str], name: str, error: str, warning: str) -> None:
    """Add ``error`` to plugin ``name``'s failures (keeping earlier ones) and warn."""
    failures[name] = f"{failures[name]}; {error}" if name in failures else error
    warnings.warn(f"plugin '{name}' {warning}", stacklevel=2)


def _register(pm: pluggy.PluginManager, plugin, name: str, failures: dict[str, str]) -> bool:
    """Register ``plugin``; a hook pluggy rejects (e.g. a misspelled argument) is a failure."""
    marker = f"{hookspecs.PROJECT}_impl"
    unknown = [a for a in dir(plugin) if hasattr(getattr(plugin, a, None), marker) and not hasattr(pm.hook, a)]
    if unknown:  # pluggy would keep a misspelled hook and never call it
        hooks = [h for h in dir(pm.hook) if h.startswith(f"{hookspecs.PROJECT}_")]
        reason = f"unknown hook '{unknown[0]}'; {suggestion(unknown[0], hooks)}"
        _fail(failures, name, f"registration failed: {reason}", f"cannot be registered: {reason}")
        return False
    try:
        pm.register(plugin, name=name)
        return True
    except pluggy.PluginValidationError as exc:
        pm.unregister(name=name)  # pluggy leaves it half-registered
        reason = str(exc)
    except ValueError as exc:  # the same object under another name; pluggy appends every plugin
        reason = str(exc).splitlines()[0]
    _fail(failures, name, f"registration failed: {reason}", f"cannot be registered: {reason}")
    return False


@dataclass
class Plugins:
    """The plugin manager and one registry per component kind."""

    manager: pluggy.PluginManager
    registries: dict[str, Registry]
    versions: dict[str, str | None]
    packages: dict[str, str] = field(default_factory=dict)  # plugin -> distribution name
    failures: dict[str, str] = field(default_factory=dict)  # plugin -> its errors, joined by "; "

    def __getitem__(self, kind: str) -> Registry:
        return self.registries[kind]

    def components_of(self, plugin: str) -> dict[str, list[str]]:
        return {kind: [c.name for c in reg if c.plugin == plugin]
                for kind, reg in self.registries.items()}


def load_plugins(modules: tuple[str, ...] | list[str] = (), *, components: bool = True,
                 only: tuple[str, ...] | list[str] | None = None) -> Plugins:
    """A fresh plugin manager with the built-ins, installed entry points and ``modules``.

    ``components=False``: only the installed entry points, and nothing registered, which is what
    the command line needs for the commands plugins add (the built-ins add none, and importing
    them imports torch: seconds before ``cdmbench --help`` prints a line). ``only``: load only
    these installed plugins (besides the built-ins and ``modules``), as ``CDMBENCH_PLUGINS``
    does, which it replaces.

    A plugin that fails (its import, its hooks, a registration refused by ``Registry.add``) is
    recorded in ``Plugins.failures`` with a warning, and the others load normally."""
    from cdmbench import __version__

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    versions: dict[str, str | None] = {}
    packages: dict[str, str] = {}
    failures: dict[str, str] = {}
    blocked = _env_set("CDMBENCH_BLOCK_PLUGINS")
    restricted = only is not None or bool(_env_set("CDMBENCH_PLUGINS"))
    only = set(only) if only is not None else _env_set("CDMBENCH_PLUGINS")
    for name in blocked:
        pm.set_blocked(name)

    for name in BUILTIN_MODULES if components else ():
        if name not in blocked:
            pm.register(importlib.import_module(name), name=name)
            versions[name], packages[name] = __version__, "cdmbench"

    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if (restricted and ep.name not in only) or pm.is_blocked(ep.name):
            continue
        package = ep.dist.name if ep.dist else None
        if ep.name in packages or pm.has_plugin(ep.name):  # the first package with the name wins
            if packages.get(ep.name) != package:
                error = (f"the packages '{packages.get(ep.name)}' and '{package}' both provide it; "
                         f"'{package}' is not loaded")
                _fail(failures, ep.name, error, f"is provided twice: {error}")
            continue
        if package:
            packages[ep.name] = package
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party package must not break the others
            _fail(failures, ep.name, f"import of {ep.value} failed: {exc!r}",
                  f"({ep.value}) failed to import: {exc!r}")
            continue
        if _register(pm, plugin, ep.name, failures):
            versions[ep.name] = ep.dist.version if ep.dist else None

    for name in modules:
        if pm.is_blocked(name) or pm.has_plugin(name):
            continue
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and not f"{name}.".startswith(f"{exc.name}."):  # a dependency is missing
                raise PluginError(f"plugin module '{name}' needs the module '{exc.name}', which is "
                                  "not installed; install the package that provides it") from None
            raise PluginError(
                f"plugin module '{name}' cannot be imported ({exc}); install the package that "
                "provides it or add its folder to PYTHONPATH") from None
        except Exception as exc:
            raise PluginError(f"plugin module '{name}' failed to import: {exc!r}") from exc
        if pm.is_registered(module) or not _register(pm, module, name, failures):
            continue  # already loaded (e.g. through its entry point), or rejected
        package, versions[name] = _module_distribution(module)
        if package:
            packages[name] = package

    for name in sorted(only - set(packages) - set(versions)):
        _fail(failures, name, "named in CDMBENCH_PLUGINS, but no installed package provides it",
              f"is named in CDMBENCH_PLUGINS, but no installed package provides it; "
              f"{suggestion(name, [ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)])}")
    plugins = Plugins(pm, {kind: Registry(kind) for kind in KINDS}, versions, packages, failures)
    for kind in KINDS if components else ():
        _fill(plugins, kind)
        failed = {p: why for p, why in failures.items() if p not in versions}  # nothing of theirs loaded
        plugins.registries[kind].failed_plugins.update(failed)
    return plugins


def _missing_module(modules: str | tuple[str, ...] | list[str]) -> str | None:
    """The first of ``modules`` that is not installed, or None (found without importing it)."""
    for module in [modules] if isinstance(modules, str) else modules:
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except (ImportError, ValueError):  # a missing parent package; a module without a spec
            return module
    return None


def _fill(plugins: Plugins, kind: str) -> None:
    """Call each plugin's hook for ``kind`` with a ``register`` bound to that plugin. A refused
    registration (a bad name, a factory breaking the contract, a name another plugin registered)
    is a failure of that plugin alone: its other components are kept, and looking the name up says
    which plugin failed to provide it and why. A component whose ``requires`` names a module that
    is not installed (an optional package) is not available, with that reason, and is no failure.
    What a hook registers is kept only if the hook returns."""
    registry = plugins.registries[kind]
    hook = getattr(plugins.manager.hook, f"cdmbench_register_{kind}")
    for impl in hook.get_hookimpls():  # in registration order
        name, staged = impl.plugin_name, []

        def register(component, factory, *, summary: str = "", requires=(), _plugin=name, _staged=staged):
            _staged.append((component, factory, summary, requires))

        try:
            impl.function(register=register)
        except Exception as exc:
            reason = f"registering {kind} raised {exc!r}"
            _fail(plugins.failures, name, reason,
                  f"raised while registering {kind}: {exc!r}; its {kind} are not available")
            for component, *_ in staged:
                registry.unavailable(component, f"{kind[:-1]} '{component}' is not available: plugin "
                                                f"'{name}' failed to provide it: {reason}")
            registry.failed_plugins[name] = reason
            continue
        for component, factory, summary, requires in staged:
            module = _missing_module(requires)
            if module is not None:
                registry.unavailable(component, f"{kind[:-1]} '{component}' (plugin '{name}') is not available: it "
                                                f"needs the module '{module}', which is not installed; install "
                                                f"it (pip install {module.split('.')[0]}) or use another {kind[:-1]}")
                continue
            try:
                registry.add(component, factory, summary=summary, plugin=name,
                             version=plugins.versions.get(name))
            except RegistryError as exc:
                _fail(plugins.failures, name, str(exc), f"failed to provide {kind[:-1]} {component!r}: {exc}")
                registry.unavailable(component, f"{kind[:-1]} '{component}' is not available: {exc}")
