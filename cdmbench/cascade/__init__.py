"""The cascade: stages built from a recipe, sampling chained through them, grids, `cdmbench sample`."""
