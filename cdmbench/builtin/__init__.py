"""The built-in components. Each module is an ordinary plugin using only the public hooks."""
