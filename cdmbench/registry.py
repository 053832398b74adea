"""One registry per component kind: names, the plugin (and version) behind each, collisions,
the names a failed plugin was to provide, and "did you mean" suggestions for unknown names.

The contract is enforced at the door: ``Registry.add`` refuses a name that is not lower-case
kebab, a factory that is not callable, takes positional parameters or ``*args``, or whose
parameters' type hints do not resolve, and a name another plugin registered (then neither is
used). The plugin loader records such a refusal on the plugin (``Registry.unavailable``), so that
only what uses that name fails, with the reason.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import inspect
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from cdmbench.errors import CdmbenchError, RegistryError

NAME_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def close_matches(name: str, candidates, n: int = 3) -> list[str]:
    """The nearest valid names to ``name``, best first."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)


def suggestion(name: str, candidates) -> str:
    near = close_matches(name, candidates, n=1)
    if near:
        return f"did you mean '{near[0]}'?"
    return "valid: " + (", ".join(sorted(candidates)) or "(none registered)")


def _annotated(factory: Callable[..., Any]) -> Any:
    """The Python function whose annotations are ``factory``'s parameters' (None if there is none):
    the function itself, a partial's function, a class's ``__init__``, an object's ``__call__``."""
    while isinstance(factory, functools.partial):
        factory = factory.func
    if inspect.isclass(factory):
        factory = factory.__init__
    elif not (inspect.isfunction(factory) or inspect.ismethod(factory)):
        factory = inspect.getattr_static(type(factory), "__call__", None)  # a callable object
    factory = inspect.unwrap(factory) if factory is not None else None
    return factory if inspect.isfunction(factory) or inspect.ismethod(factory) else None


def parameter_hints(factory: Callable[..., Any]) -> dict[str, Any]:
    """The resolved type hints of ``factory``'s parameters (not its return value). Raises what
    ``typing.get_type_hints`` raises (NameError, ...) for a hint that does not resolve."""
    function = _annotated(factory)
    if function is None:
        return {}
    annotations = {k: v for k, v in (getattr(function, "__annotations__", None) or {}).items() if k != "return"}
    holder = types.SimpleNamespace(__annotations__=annotations, __globals__=getattr(function, "__globals__", {}))
    return typing.get_type_hints(holder)


def factory_problem(factory: Callable[..., Any]) -> str | None:
    """What breaks the factory contract (keyword arguments only, type hints that resolve), or None."""
    if not callable(factory):
        return f"its factory is not callable: {factory!r}"
    label = (getattr(factory, "__qualname__", None) or type(factory).__name__).split(".<locals>.")[-1]
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError) as exc:
        return f"the signature of its factory {label} cannot be read ({exc}); use a Python function"
    star = [p.name for p in params.values() if p.kind is inspect.Parameter.VAR_POSITIONAL]
    positional = [p.name for p in params.values() if p.kind in POSITIONAL]
    if star or positional:
        what = ", ".join([*positional, *(f"*{s}" for s in star)])
        return (f"its factory {label} takes positional parameters ({what}); factories take keyword "
                f"arguments only: def {label.rsplit('.', 1)[-1]}(*, {', '.join(positional) or '...'})")
    try:
        parameter_hints(factory)
    except Exception as exc:  # NameError, TypeError, SyntaxError: an annotation that does not resolve
        return (f"a type hint of its factory {label} does not resolve ({type(exc).__name__}: {exc}); "
                "import the names its annotations use at the top of the factory's module")
    return None


class BuildError(CdmbenchError):
    """A factory refused its arguments (it raised ValueError or TypeError), or could not build
    what they ask for (MemoryError, OverflowError, or torch's RuntimeError for sizes it cannot
    allocate)."""

    def __init__(self, component: Component, reason: str):
        self.component, self.reason = component, reason
        super().__init__(f"{component.kind[:-1]} '{component.name}' (plugin '{component.plugin}'): {reason}")


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    factory: Callable[..., Any]
    summary: str
    plugin: str
    version: str | None

    def parameters(self) -> dict[str, inspect.Parameter]:
        """The factory's keyword parameters (what a recipe's ``args`` may set)."""
        return dict(inspect.signature(self.factory).parameters)

    def hints(self) -> dict[str, Any]:
        """The factory's parameters' type hints (resolved at registration)."""
        return parameter_hints(self.factory)

    def build(self, args: dict[str, Any], **host: Any) -> Any:
        """Call the factory with the recipe's ``args`` and the host facts it declares; a
        ValueError or TypeError it raises (bad arguments) is a ``BuildError`` naming the component.
        Every factory call goes through here."""
        params = self.parameters()
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        try:
            return self.factory(**args, **{k: v for k, v in host.items() if takes_any or k in params})
        except (ValueError, TypeError) as exc:
            raise BuildError(self, str(exc) or type(exc).__name__) from exc
        except (MemoryError, OverflowError, RuntimeError) as exc:  # sizes the machine cannot hold
            raise BuildError(self, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                                   "its arguments ask for more than this machine can build: use smaller "
                                   "sizes") from exc


class Registry:
    """Components of one kind, by name, and the names that are not available and why."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Component] = {}
        self._unavailable: dict[str, str] = {}  # name -> why (a failed plugin, a collision)
        self._claimed: dict[str, list[str]] = {}  # colliding name -> the plugins registering it
        self.failed_plugins: dict[str, str] = {}  # plugins that failed to load -> why (set by the loader)

    def add(self, name: str, factory: Callable[..., Any], *, summary: str, plugin: str,
            version: str | None) -> None:
        """Register ``name``; a RegistryError says why it is refused. A name a second plugin
        registers is used by neither: it stays unavailable, naming both."""
        what = f"{self.kind[:-1]} {name!r}" if not isinstance(name, str) else f"{self.kind[:-1]} '{name}'"
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise RegistryError(f"plugin '{plugin}' cannot register {what}: names are lower-case "
                                "kebab, e.g. 'adm-unet'")
        problem = factory_problem(factory)
        if problem:
            raise RegistryError(f"plugin '{plugin}' cannot register {what}: {problem}")
        claimed = self._claimed.get(name)
        if name in self._items or claimed:
            plugins = claimed or [self._items.pop(name).plugin]
            self._claimed[name] = plugins = [*plugins, plugin]
            distinct = list(dict.fromkeys(plugins))
            if len(distinct) == 1:
                message = (f"{what} is registered twice by plugin '{plugin}', so it is not used; "
                           "register each name once")
            else:
                message = (f"{what} is registered by plugins {' and '.join(f'{p!r}' for p in distinct)}, so "
                           f"{'neither' if len(distinct) == 2 else 'none'} is used; uninstall or block "
                           "one of them (CDMBENCH_BLOCK_PLUGINS)")
            self._unavailable[name] = message
            raise RegistryError(message)
        self._items[name] = Component(self.kind, name, factory, summary, plugin, version)

    def unavailable(self, name: Any, message: str) -> None:
        """Record that a failed plugin was to provide ``name``: looking it up raises ``message``
        (a name another plugin provides, or that collides, keeps its own)."""
        if isinstance(name, str) and name not in self._items and name not in self._claimed:
            self._unavailable[name] = message

    def get(self, name: str) -> Component:
        try:
            return self._items[name]
        except KeyError:
            pass
        if name in self._unavailable:
            raise RegistryError(self._unavailable[name]) from None
        failed = "".join(f"; plugin '{p}' failed to load, and may provide it: {why}"
                         for p, why in self.failed_plugins.items())
        raise RegistryError(f"unknown {self.kind[:-1]} '{name}'; {suggestion(name, self._items)}{failed}")

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self):
        return iter(sorted(self._items.values(), key=lambda c: c.name))

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return sorted(self._items)

    def unavailable_names(self) -> dict[str, str]:
        """Names that a failed plugin was to provide, or that collide, with why."""
        return dict(self._unavailable)

    def match(self, pattern: str) -> list[Component]:
        return [c for c in self if fnmatch.fnmatch(c.name, pattern)]
