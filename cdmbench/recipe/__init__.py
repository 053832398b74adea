"""Recipes: the YAML schema, its validation, overrides and the --smoke shrink."""
