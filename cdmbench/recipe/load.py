"""A recipe file -> a validated ``Recipe`` (YAML, then ``--smoke``, then ``--set``).

The file is read strictly (``cdmbench.recipe.yamlfile``, re-exported here): a regular UTF-8 file, no
duplicate keys, alias expansion and nesting bounded; anything else is one ``error:`` line."""

from __future__ import annotations

from pathlib import Path

from cdmbench.errors import RecipeError
from cdmbench.plugins import Plugins
from cdmbench.recipe.schema import Recipe
from cdmbench.recipe.validate import parse_recipe
from cdmbench.recipe.yamlfile import StrictLoader, parse_yaml, read_yaml

__all__ = ["StrictLoader", "load_recipe", "parse_yaml", "read_yaml"]


def load_recipe(path: str | Path, *, overrides: tuple[str, ...] | list[str] = (),
                plugins: Plugins | None = None, smoke: bool = False,
                echo=print) -> tuple[Recipe, Plugins]:
    """Read and validate the recipe at ``path`` (see ``parse_recipe``).

    ``smoke``: shrink it first (``cdmbench.recipe.smoke``: tiny models, few steps, generated stand-in
    data with the real class count, name ``<name>-smoke``). Overrides of ``data`` keys apply
    before shrinking (they choose the real dataset whose class count is copied); all others
    apply after it, so ``--set`` wins over smoke values. ``echo`` gets the class-count note."""
    raw = read_yaml(Path(path))
    if not isinstance(raw, dict):
        raise RecipeError("", f"{path} holds {_what(raw)}, not a recipe: a recipe is a YAML mapping of "
                              "keys (cdmbench, name, data, stages, ...); see docs/recipes.md")
    if smoke:
        from cdmbench.recipe.smoke import smoke_recipe

        raw, overrides = smoke_recipe(raw, overrides, plugins, echo)
    return parse_recipe(raw, overrides=overrides, plugins=plugins)


def _what(raw: object) -> str:
    """What a YAML document holds, in words (for a document that is no mapping)."""
    if raw is None:
        return "no YAML value (an empty file, or only comments)"
    kind = {list: "a list", str: "a string", int: "an integer", float: "a number", bool: "true/false"}
    return kind.get(type(raw), f"a {type(raw).__name__}") + f" ({str(raw)[:40]!r})"
