"""Files on disk: atomic writes and locks, caches, the run directory."""
