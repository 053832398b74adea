"""The run directory: the resolved recipe with its environment, stage folders, results.

    <out>/run.yaml          resolved recipe + versions of cdmbench, plugins, torch, git commit,
                            machine; the dataset's class names
    <out>/results.jsonl     tidy result rows (see ``result_row``)
    <out>/report.md         the results table
    <out>/<stage>/          checkpoints/, train_log.jsonl, samples/
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import CdmbenchError
from .files import append_text, atomic_write
from .plugins import Plugins
from .recipe import Recipe

# Keys that may change between invocations of one run (training longer, sampling differently):
# recipe-level keys, and per-stage keys (dotted within a stage).
RESUMABLE_KEYS = ("sample", "device", "evaluate")
RESUMABLE_STAGE_KEYS = ("train.steps", "train.checkpoint_every", "train.keep_checkpoints",
                        "train.milestone_every", "train.log_every", "train.val_bpd_images",
                        "train.gradient_checkpointing", "train.cudnn_benchmark", "sampler",
                        "guidance.scale")


def git_commit() -> str | None:
    """The commit of the cdmbench source tree (with '-dirty' if modified), when in git."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def environment(plugins: Plugins) -> dict[str, Any]:
    from . import __version__

    cuda = torch.cuda.is_available()
    return {
        "cdmbench": __version__,
        "plugins": dict(sorted(plugins.versions.items())),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "cpus": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name(0) if cuda else None,
                    "gpus": torch.cuda.device_count() if cuda else 0},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _comparable(recipe: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(recipe))
    for key in RESUMABLE_KEYS:
        out.pop(key, None)
    for stage in out["stages"]:
        for key in RESUMABLE_STAGE_KEYS:
            *parents, last = key.split(".")
            node = stage
            for part in parents:
                node = node.get(part, {})
            node.pop(last, None)
    return out


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                name = x.get("name") if isinstance(x, dict) else i
                return _first_difference(x, y, f"{path}.{name}")
    return f"{path}: {a!r} -> {b!r}"


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    def stage(self, name: str) -> Path:
        return self.path / name

    @property
    def results_path(self) -> Path:
        return self.path / "results.jsonl"

    def prepare(self, recipe: Recipe, plugins: Plugins, class_names: list[str]) -> None:
        """Write run.yaml first (with the class names, so that sampling needs no dataset); a run
        directory of a different recipe is refused."""
        resolved = recipe.to_dict()
        run_yaml = self.path / "run.yaml"
        if run_yaml.exists():
            old = yaml.safe_load(run_yaml.read_text())["recipe"]
            if _comparable(old) != _comparable(resolved):
                raise CdmbenchError(
                    f"{self.path} holds a run of a different recipe "
                    f"({_first_difference(_comparable(old), _comparable(resolved))}); pass another "
                    "--out, or delete the folder to start over")
        self.path.mkdir(parents=True, exist_ok=True)
        doc = {"recipe": resolved, "environment": environment(plugins), "classes": list(class_names)}
        atomic_write(run_yaml, yaml.safe_dump(doc, sort_keys=False))

    def class_names(self) -> list[str] | None:
        """The dataset's class names as training saw them (None for runs older than the key)."""
        return yaml.safe_load((self.path / "run.yaml").read_text()).get("classes")

    def add_results(self, rows: list[dict[str, Any]]) -> None:
        append_text(self.results_path, "".join(json.dumps(row) + "\n" for row in rows))


def result_row(*, run: str, stage: str, metric: str, value: float | None, unit: str, n: int,
               higher_is_better: bool | None, protocol: dict[str, Any] | None = None,
               status: str = "ok", stderr: float | None = None) -> dict[str, Any]:
    """One tidy result row."""
    return {"run": run, "stage": stage, "metric": metric, "value": value, "stderr": stderr,
            "n": n, "unit": unit, "higher_is_better": higher_is_better,
            "protocol": protocol or {}, "status": status,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
