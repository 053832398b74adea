"""Components named in a recipe, built: any component from its ``{name, args}``, and the
class count of the recipe's dataset."""

from __future__ import annotations

import copy
from typing import Any

from cdmbench.errors import CdmbenchError, RecipeError
from cdmbench.plugins import Plugins, load_plugins
from cdmbench.recipe.schema import Component
from cdmbench.recipe.validate import _convert, check_component
from cdmbench.registry import BuildError

# what a built component of each kind must have (the rest of its contract is checked where it is
# called: cdmbench.cascade.stages checks the first call of samplers, augmentations and backbones)
REQUIRED = {"schedules": ("timesteps", "abar"), "augmentations": ("cond_dim", "train", "sample"),
            "samplers": ("check", "sample"),
            "loggers": ("start_stage", "log_scalars", "log_results", "log_image", "close")}


def make_component(plugins: Plugins, kind: str, spec: Component, path: str, **host):
    """Build a component of a recipe: the one place a recipe's factories are called
    (``Component.build``). A factory's ValueError/TypeError and a built object without what its
    kind needs are a RecipeError at ``path``, naming the component."""
    component = plugins[kind].get(spec.name)  # recipes are validated first: names are known
    try:
        built = component.build(spec.args, **host)
    except BuildError as exc:
        raise RecipeError(path, f"{kind[:-1]} '{spec.name}': {exc.reason}") from exc
    lacking = [a for a in REQUIRED.get(kind, ()) if not hasattr(built, a)]
    if kind == "backbones" and not callable(built):
        lacking = ["__call__ (a backbone is an nn.Module)"]
    if lacking:
        raise RecipeError(path, f"{kind[:-1]} '{spec.name}' of plugin '{component.plugin}': its factory "
                                f"returned a {type(built).__name__}, which has no {', '.join(lacking)}; see "
                                f"cdmbench.interfaces for what a {kind[:-1]} implements")
    return built


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
