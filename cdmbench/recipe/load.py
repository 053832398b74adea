"""A recipe file -> a validated ``Recipe`` (YAML, then ``--smoke``, then ``--set``)."""

from __future__ import annotations

from pathlib import Path

import yaml

from cdmbench.errors import RecipeError
from cdmbench.plugins import Plugins
from cdmbench.recipe.schema import Recipe
from cdmbench.recipe.validate import parse_recipe


def load_recipe(path: str | Path, *, overrides: tuple[str, ...] | list[str] = (),
                plugins: Plugins | None = None, smoke: bool = False,
                echo=print) -> tuple[Recipe, Plugins]:
    """Read and validate the recipe at ``path`` (see ``parse_recipe``).

    ``smoke``: shrink it first (``cdmbench.recipe.smoke``: tiny models, few steps, generated stand-in
    data with the real class count, name ``<name>-smoke``). Overrides of ``data`` keys apply
    before shrinking (they choose the real dataset whose class count is copied); all others
    apply after it, so ``--set`` wins over smoke values. ``echo`` gets the class-count note."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError("", f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError("", f"{path} is not valid YAML: {exc}") from None
    if smoke:
        from cdmbench.recipe.smoke import smoke_recipe

        raw, overrides = smoke_recipe(raw, overrides, plugins, echo)
    return parse_recipe(raw, overrides=overrides, plugins=plugins)
