"""Where cdmbench caches what it computes once, and the digests that name cache entries."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def default_cache_dir() -> Path:
    """``$CDMBENCH_CACHE``, else ``~/.cache/cdmbench``."""
    return Path(os.environ.get("CDMBENCH_CACHE", Path.home() / ".cache" / "cdmbench"))


def digest(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]
