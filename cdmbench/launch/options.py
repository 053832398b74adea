"""The settings of ``cdmbench launch``: each from the command line, else the recipe's ``launch:``
block, else the user's config file (``~/.config/cdmbench/launch.yaml``, or the file
``$CDMBENCH_LAUNCH_CONFIG`` names), else ``DEFAULTS``; and the checks of the values no type states
(the time limit's format, the signal's name)."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
from pathlib import Path
from typing import Any

from cdmbench.errors import CdmbenchError, RecipeError
from cdmbench.recipe.schema import Launch
from cdmbench.recipe.validate import parse_section
from cdmbench.recipe.yamlfile import read_yaml

CONFIG_ENV = "CDMBENCH_LAUNCH_CONFIG"
DEFAULTS = Launch(cluster="slurm", time="24:00:00", nodes=1, gpus_per_node=1, signal="USR2", grace_s=300,
                  max_requeues=100, eval_array=8)
TIME_RE = re.compile(r"(?:(?P<days>\d+)-)?(?P<hours>\d+):(?P<minutes>\d{2}):(?P<seconds>\d{2})|(?P<only>\d+)")


def config_path() -> Path:
    """The user's launch settings: ``$CDMBENCH_LAUNCH_CONFIG``, else ``~/.config/cdmbench/launch.yaml``."""
    return Path(os.environ.get(CONFIG_ENV) or Path.home() / ".config" / "cdmbench" / "launch.yaml")


def user_config() -> Launch:
    """The keys of ``launch:`` in the user's config file (all null without one), checked as in a recipe."""
    path = config_path()
    if not path.exists():
        return Launch()
    data = read_yaml(path, "launch config file")
    try:
        return parse_section(Launch, {} if data is None else data, "")
    except RecipeError as exc:
        raise CdmbenchError(f"{path}: {exc} (the keys of a recipe's launch: block, docs/recipes.md)") from None


def time_minutes(value: str, key: str = "launch.time") -> int:
    """A SLURM time limit (``MINUTES``, ``HH:MM:SS``, ``D-HH:MM:SS``) in whole minutes, at least 1."""
    match = TIME_RE.fullmatch(str(value).strip())
    if match is None:
        raise RecipeError(key, f"{value!r} is no time limit; write MINUTES, HH:MM:SS or D-HH:MM:SS, e.g. 24:00:00")
    if match["only"] is not None:
        return max(1, int(match["only"]))
    seconds = (int(match["days"] or 0) * 86400 + int(match["hours"]) * 3600 + int(match["minutes"]) * 60
               + int(match["seconds"]))
    return max(1, -(-seconds // 60))


def signal_name(value: str, key: str = "launch.signal") -> str:
    """A signal's name as SLURM and submitit write it (``USR2``), checked to be one a job can catch."""
    name = str(value).upper().removeprefix("SIG")
    if not isinstance(getattr(signal, f"SIG{name}", None), signal.Signals) or name in ("KILL", "STOP", "TERM", "INT"):
        raise RecipeError(key, f"{value!r} cannot ask a job to checkpoint and requeue; name a signal such as "
                               "USR1 or USR2 (SIGTERM and SIGINT already save and stop)")
    return name


def resolve(recipe: Launch, given: dict[str, Any] | None = None) -> Launch:
    """Every launch setting: ``given`` (the command line's options; None: not given), else the
    recipe's, else the user config file's, else ``DEFAULTS``; the time and signal checked."""
    given, config = given or {}, user_config()
    values = {}
    for f in dataclasses.fields(Launch):
        chosen = (given.get(f.name), getattr(recipe, f.name), getattr(config, f.name), getattr(DEFAULTS, f.name))
        values[f.name] = next((v for v in chosen if v is not None), None)
    settings = Launch(**values)
    if settings.cluster not in ("slurm", "local"):
        raise RecipeError("launch.cluster", f"expected slurm or local, got {settings.cluster!r}")
    time_minutes(settings.time)
    settings.signal = signal_name(settings.signal)
    if settings.grace_s >= time_minutes(settings.time) * 60:
        raise RecipeError("launch.grace_s", f"{settings.grace_s} s is not shorter than the time limit "
                                            f"{settings.time}; lower it or raise launch.time")
    return settings
