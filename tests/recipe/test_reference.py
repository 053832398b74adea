"""docs/recipes.md's reference is generated from the schema: it is up to date, every schema field and every
key of the shipped recipes is in it, and a field without a docstring stops the generator."""

import dataclasses
import inspect
import re
from dataclasses import dataclass, field

import pytest
import yaml

from cdmbench.recipe import reference, schema
from tests.conftest import ROOT

PAGE = ROOT / "docs" / "recipes.md"


def rows(text: str) -> dict[str, list[str]]:
    """The reference's rows by key path: [type, default, (trained run,) meaning], unescaped."""
    found = {}
    for line in text.splitlines():
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) >= 4 and re.fullmatch(r"`[^`]+`", cells[0]):
            found[cells[0].strip("`")] = cells[1:]
    return found


def recipe_keys(node, path=""):
    """The dotted path of every key in a raw recipe (`[]` for list items), not below a component's args
    or a search's space (its keys are --set keys)."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else key
            yield here
            if key not in ("args", "space"):
                yield from recipe_keys(value, here)
    elif isinstance(node, list):
        for item in node:
            yield from recipe_keys(item, path + "[]")


def test_the_page_holds_the_generated_reference():
    assert reference.generated_part(PAGE.read_text()) == reference.markdown(), (
        f"docs/recipes.md is out of date with cdmbench/recipe/schema.py: run {reference.COMMAND}")


def test_write_rewrites_only_the_generated_part(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"# Intro\n\nhand-written\n{reference.BEGIN}\nstale\n{reference.END}\nafter\n")
    reference.main(["--write", str(page)])
    assert page.read_text() == (f"# Intro\n\nhand-written\n{reference.BEGIN}\n{reference.markdown()}"
                                f"{reference.END}\nafter\n")
    page.write_text("no markers")
    with pytest.raises(ValueError, match="no generated part"):
        reference.main(["--write", str(page)])


@dataclass
class Inner:
    """An inner section."""

    documented: int = 0
    """A documented key."""
    undocumented: int = 0


@dataclass
class Outer:
    """A schema with a key added without its docstring."""

    inner: Inner = field(default_factory=Inner)
    """The inner section."""


def test_a_key_without_a_docstring_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"recipe key inner\.undocumented \(.*Inner\.undocumented\) has no docstring"):
        reference.markdown(Outer)


@dataclass
class Undescribed:
    key: int = 0
    """A documented key of a section without a docstring."""


def test_a_section_without_a_docstring_is_an_error():
    with pytest.raises(ValueError, match=r"Undescribed has no docstring"):
        reference.markdown(Undescribed)


def test_every_schema_field_is_in_the_page_with_its_meaning():
    page = rows(PAGE.read_text())
    classes = [c for _, c in inspect.getmembers(schema, inspect.isclass)
               if dataclasses.is_dataclass(c) and c.__module__ == schema.__name__]
    assert {c.__name__ for c in classes} >= {"Recipe", "Component", "Train", "Guidance", "Stage", "Sample",
                                             "Evaluate"}
    missing = []
    for cls in classes:
        docs = reference.field_docs(cls)
        for f in dataclasses.fields(cls):
            meaning = docs.get(f.name)
            if not meaning or not any((path == f.name or path.endswith("." + f.name)) and cells[-1] == meaning
                                      for path, cells in page.items()):
                missing.append(f"{cls.__name__}.{f.name}")
    assert not missing, f"schema fields not in docs/recipes.md: {missing}; run {reference.COMMAND}"


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_key_of_a_shipped_recipe_is_in_the_page(recipe):
    page = rows(PAGE.read_text())
    missing = set()
    for path in recipe_keys(yaml.safe_load(recipe.read_text())):
        parent, _, leaf = path.rpartition(".")
        in_component = "component" in page.get(parent.removesuffix("[]"), [""])[0] and f"<component>.{leaf}" in page
        if path not in page and not in_component:
            missing.add(path)
    assert not missing, f"keys of {recipe.name} not in docs/recipes.md: {sorted(missing)}"


def test_the_page_shows_types_defaults_and_who_may_change_a_key():
    page = rows(PAGE.read_text())
    assert page["stages[].train.steps"][:3] == ["`int`", "required", "resume"]
    assert page["stages[].train.lr"][:3] == ["`float`", "`0.0001`", "no"]
    assert page["stages[].condition_on"][:2] == ["`str | null`", "`null`"]
    assert page["stages[].augmentation"][:3] == ["`component | list of component`", "`{name: none}`",
                                                 "`args.level`: resume"]
    assert page["data"][2] == "`args`: sampling" and page["plugins"][2] == "sampling"
    assert page["evaluate.metrics"][:2] == ["`list of component`", "`[]`"]
    assert page["stages[].replicates"][:2] == ["`int`", "`1`"]
    assert "`simple` (MSE of the noise eps, DDPM)" in page["stages[].loss"][-1]
