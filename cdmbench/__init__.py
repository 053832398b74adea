"""cdmbench: build, train, sample and evaluate Cascaded Diffusion Models from plugins.

The package reads like the data path of a recipe (docs/architecture.md):

    recipe/ -> plugins (builtin/) -> cascade/ -> training/ -> evaluation/ -> reporting/

with the diffusion maths in diffusion/, data in data/, how a job runs in runtime/ and files on
disk in storage/. The plugin contract is at the top: ``hookimpl`` (here), ``hookspecs``,
``interfaces``, ``registry``, ``plugins``, ``errors`` and the conformance kit ``testing``.

Importing ``cdmbench`` is cheap (no torch): ``load_recipe`` and ``run`` load on first use."""

import importlib

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("cdmbench")

_LAZY = {"load_recipe": "cdmbench.recipe.load", "run": "cdmbench.training.run",
         "CdmbenchError": "cdmbench.errors", "RecipeError": "cdmbench.errors", "interfaces": None}


def __getattr__(name: str):
    """``cdmbench.load_recipe``, ``cdmbench.run``, ... imported when first asked for (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'cdmbench' has no attribute {name!r}")
    if _LAZY[name] is None:
        return importlib.import_module(f"cdmbench.{name}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = ["CdmbenchError", "RecipeError", "hookimpl", "interfaces", "load_recipe", "run", "__version__"]
