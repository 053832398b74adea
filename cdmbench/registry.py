"""One registry per component kind: names, the plugin (and version) behind each, collisions,
and "did you mean" suggestions for unknown names."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

from cdmbench.errors import RegistryError

NAME_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


def close_matches(name: str, candidates, n: int = 3) -> list[str]:
    """The nearest valid names to ``name``, best first."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)


def suggestion(name: str, candidates) -> str:
    near = close_matches(name, candidates, n=1)
    if near:
        return f"did you mean '{near[0]}'?"
    return "valid: " + (", ".join(sorted(candidates)) or "(none registered)")


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

    def build(self, args: dict[str, Any], **host: Any) -> Any:
        """Call the factory with the recipe's ``args`` and the host facts it declares."""
        params = self.parameters()
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        return self.factory(**args, **{k: v for k, v in host.items() if takes_any or k in params})


class Registry:
    """Components of one kind, by name."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Component] = {}

    def add(self, name: str, factory: Callable[..., Any], *, summary: str, plugin: str,
            version: str | None) -> None:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise RegistryError(
                f"plugin '{plugin}' registers {self.kind[:-1]} {name!r}: names are lower-case "
                "kebab, e.g. 'adm-unet'")
        if not callable(factory):
            raise RegistryError(f"plugin '{plugin}' registers {self.kind[:-1]} '{name}' with a "
                                f"factory that is not callable: {factory!r}")
        if name in self._items:
            first = self._items[name].plugin
            raise RegistryError(
                f"{self.kind[:-1]} '{name}' is registered by two plugins: '{first}' and "
                f"'{plugin}'; uninstall or block one of them (CDMBENCH_BLOCK_PLUGINS)")
        self._items[name] = Component(self.kind, name, factory, summary, plugin, version)

    def get(self, name: str) -> Component:
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.kind[:-1]} '{name}'; {suggestion(name, self._items)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self):
        return iter(sorted(self._items.values(), key=lambda c: c.name))

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return sorted(self._items)

    def match(self, pattern: str) -> list[Component]:
        return [c for c in self if fnmatch.fnmatch(c.name, pattern)]
