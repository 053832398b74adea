"""Components named in a recipe, built: any component from its ``{name, args}``, and the
class count of the recipe's dataset."""

from __future__ import annotations

import copy
from typing import Any

from cdmbench.errors import CdmbenchError, RecipeError
from cdmbench.plugins import Plugins, load_plugins
from cdmbench.recipe.schema import Component
from cdmbench.recipe.validate import _convert, check_component


def make_component(plugins: Plugins, kind: str, spec: Component, path: str, **host):
    """Build a component; a factory's ValueError/TypeError becomes a RecipeError at ``path``."""
    try:
        return plugins[kind].get(spec.name).build(spec.args, **host)
    except (ValueError, TypeError) as exc:
        raise RecipeError(path, f"{kind[:-1]} '{spec.name}': {exc}") from exc


# class counts of known Hub datasets: --smoke, --dry-run and bench need no network or data for them
KNOWN_CLASSES = {"ILSVRC/imagenet-1k": 1000, "imagenet-1k": 1000,
                 "zalando-datasets/fashion_mnist": 10, "fashion_mnist": 10}



DEFAULT_CLASSES = 10



def recipe_classes(raw: dict[str, Any], plugins=None) -> tuple[int, str]:
    """The class count of the recipe's dataset and where it came from: ``KNOWN_CLASSES`` for a
    known Hub id (no network, no data), else the dataset itself if it can be built, else
    ``DEFAULT_CLASSES``."""
    data = raw.get("data") if isinstance(raw, dict) else None
    args = data.get("args") if isinstance(data, dict) else None
    path = args.get("path") if isinstance(args, dict) else None
    if isinstance(path, str) and path in KNOWN_CLASSES:
        return KNOWN_CLASSES[path], f"the known class count of {path}"
    try:
        spec = _convert(copy.deepcopy(data), Component, "data")
        plugins = plugins or load_plugins(raw.get("plugins") or [])
        check_component(plugins, "datasets", spec, "data")
        sides = [s.get("resolution") for s in raw.get("stages") or [] if isinstance(s, dict)]
        resolution = max((r for r in sides if isinstance(r, int) and not isinstance(r, bool)), default=32)
        dataset = make_component(plugins, "datasets", spec, "data", split="train", resolution=resolution)
        return int(dataset.num_classes), f"as {spec.name} has"
    except CdmbenchError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return DEFAULT_CLASSES, f"a default: the recipe's data could not be built: {first[:120]}"
