"""cdmbench: build, train, sample and evaluate Cascaded Diffusion Models from plugins."""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("cdmbench")

from . import interfaces  # noqa: E402
from .errors import CdmbenchError, RecipeError  # noqa: E402
from .recipe import load_recipe  # noqa: E402
from .runner import run  # noqa: E402

__all__ = ["CdmbenchError", "RecipeError", "hookimpl", "interfaces", "load_recipe", "run",
           "__version__"]
