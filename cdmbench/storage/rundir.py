"""The run directory: the resolved recipe with its environment, stage folders, results.

    <out>/run.yaml          resolved recipe + versions of cdmbench, plugins, torch, git commit,
                            machine (and those of earlier invocations); the dataset's class names
    <out>/results.jsonl     tidy result rows (see ``result_row``)
    <out>/report.md         the results table
    <out>/<stage>/          checkpoints/, train_log.jsonl, samples/
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import subprocess
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from cdmbench.errors import CdmbenchError, RecipeError
from cdmbench.plugins import Plugins
from cdmbench.recipe.schema import Recipe
from cdmbench.recipe.validate import complete, parse_recipe
from cdmbench.recipe.yamlfile import read_yaml
from cdmbench.storage.files import append_text, atomic_write

# Keys that may change between invocations of one run (training longer, sampling differently,
# logging to other trackers): recipe-level keys, and per-stage keys (dotted within a stage; in each
# of a list of augmentations).
RESUMABLE_KEYS = ("sample", "device", "evaluate", "log_to", "launch")
RESUMABLE_STAGE_KEYS = ("train.steps", "train.checkpoint_every", "train.keep_checkpoints",
                        "train.milestone_every", "train.log_every", "train.val_bpd_images",
                        "train.eval_every", "train.eval_num_samples",
                        "train.gradient_checkpointing", "train.cudnn_benchmark", "sampler",
                        "guidance.scale", "guidance.interval", "guidance.guide_step",
                        "guidance.guide_stage", "posthoc_sigma_rel",
                        "augmentation.args.level")
# Recipe-level keys that sampling and evaluating a trained run may change besides (data.args: the
# real images that evaluation compares with, e.g. fewer of them).
SAMPLING_KEYS = (*RESUMABLE_KEYS, "plugins", "data.args")


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
    from cdmbench import __version__

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


def _drop(node: Any, parts: list[str]) -> None:
    """Remove the key at path ``parts`` below ``node``; in each item of a list (augmentations)."""
    if isinstance(node, list):
        for item in node:
            _drop(item, parts)
    elif isinstance(node, dict) and len(parts) == 1:
        node.pop(parts[0], None)
    elif isinstance(node, dict):
        _drop(node.get(parts[0]), parts[1:])


def _comparable(recipe: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    out = json.loads(json.dumps(recipe))
    for key in keys:
        _drop(out, key.split("."))
    for stage in out["stages"]:
        for key in RESUMABLE_STAGE_KEYS:
            _drop(stage, key.split("."))
    return out


def _names(items: Any) -> list[str] | None:
    """The names of a list of named mappings (stages), else None."""
    if isinstance(items, list) and all(isinstance(x, dict) and "name" in x for x in items):
        return [x["name"] for x in items]
    return None


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    old, new = _names(a), _names(b)
    if old is not None and new is not None and set(old) != set(new):  # names, not whole stages
        return f"{path}: " + ", ".join([f"{n} removed" for n in old if n not in new]
                                       + [f"{n} added" for n in new if n not in old])
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                name = x.get("name") if isinstance(x, dict) else i
                return _first_difference(x, y, f"{path}.{name}")
    return f"{path}: {a!r} -> {b!r}"


def recipe_difference(old: dict[str, Any], new: dict[str, Any],
                      keys: tuple[str, ...] = RESUMABLE_KEYS) -> str | None:
    """The first difference ('key: old -> new') of two resolved recipes outside recipe-level
    ``keys`` and RESUMABLE_STAGE_KEYS, or None."""
    a, b = _comparable(old, keys), _comparable(new, keys)
    return None if a == b else _first_difference(a, b)


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    def stage(self, name: str) -> Path:
        """The stage's folder; ``name`` (validated by the recipe) is one path component, never a way out."""
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise CdmbenchError(f"stage name {name!r} is not one path component; stage names are lower-case "
                                "letters, digits, - and _")
        return self.path / name

    @property
    def results_path(self) -> Path:
        return self.path / "results.jsonl"

    def check(self, recipe: Recipe) -> None:
        """Refuse a run directory that holds a run of a different recipe, other than one with
        stages appended (cheap: before any data or model is built)."""
        run_yaml = self.path / "run.yaml"
        if run_yaml.exists():
            try:
                old = complete(read_run_yaml(run_yaml))
            except RecipeError as exc:
                raise CdmbenchError(f"{run_yaml} holds a recipe this cdmbench cannot read ({exc}); "
                                    "use the cdmbench version that wrote it, or another --out") from None
            new = recipe.to_dict()
            # stages appended (another arm of an ablation, replicates) leave the run's own as they
            # were: a stage's seeds derive from its position
            new["stages"] = new["stages"][:len(old["stages"])]
            difference = recipe_difference(old, new)
            if difference:
                raise CdmbenchError(f"{self.path} holds a run of a different recipe ({difference}); "
                                    "pass another --out, or delete the folder to start over")

    def prepare(self, recipe: Recipe, plugins: Plugins, class_names: list[str]) -> None:
        """Write run.yaml first (with the class names, so that sampling needs no dataset); a run
        directory of a different recipe is refused. Earlier invocations' environments that
        differ from this one (other code or machines trained the stages before) stay in
        ``earlier_environments``."""
        self.check(recipe)
        self.path.mkdir(parents=True, exist_ok=True)
        run_yaml, earlier, now = self.path / "run.yaml", [], environment(plugins)
        if run_yaml.exists():
            old = yaml.safe_load(run_yaml.read_text())
            earlier = old.get("earlier_environments", [])
            if {**old["environment"], "created": None} != {**now, "created": None}:
                earlier = [*earlier, old["environment"]]
        doc = {"recipe": recipe.to_dict(), "environment": now, "earlier_environments": earlier,
               "classes": list(class_names)}
        atomic_write(self.path / "run.yaml", yaml.safe_dump(doc, sort_keys=False))

    def class_names(self) -> list[str] | None:
        """The dataset's class names as training saw them (None for runs older than the key)."""
        return yaml.safe_load((self.path / "run.yaml").read_text()).get("classes")

    def add_results(self, rows: list[dict[str, Any]]) -> None:
        append_text(self.results_path, "".join(json.dumps(row) + "\n" for row in rows))

    def results(self) -> list[dict[str, Any]]:
        """Every row of results.jsonl as written, oldest first (none before the first is written);
        a line cut short (a writer killed mid-line) is skipped with a warning."""
        if not self.results_path.exists():
            return []
        rows = []
        for number, line in enumerate(self.results_path.read_text().splitlines(), 1):
            try:
                row = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                row = None
                warnings.warn(f"{self.results_path} line {number} is not a whole JSON row (a write cut "
                              "short?); skipped", stacklevel=2)
            if isinstance(row, dict):
                rows.append(row)
        return rows


def result_row(*, run: str, stage: str, metric: str, value: float | None, unit: str, n: int,
               higher_is_better: bool | None, protocol: dict[str, Any] | None = None,
               status: str = "ok", stderr: float | None = None) -> dict[str, Any]:
    """One tidy result row."""
    return {"run": run, "stage": stage, "metric": metric, "value": value, "stderr": stderr,
            "n": n, "unit": unit, "higher_is_better": higher_is_better,
            "protocol": protocol or {}, "status": status,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def read_run_yaml(run_yaml: Path) -> dict[str, Any]:
    """The resolved recipe in ``run_yaml``, read strictly (a regular UTF-8 file, no duplicate keys,
    bounded aliases); a ``RecipeError`` naming the file when it is not a run.yaml that cdmbench wrote."""
    doc = read_yaml(run_yaml, "run.yaml")
    raw = doc.get("recipe") if isinstance(doc, dict) else None
    if not isinstance(raw, dict):
        raise RecipeError("", f"{run_yaml} is not a run.yaml that cdmbench wrote (it has no `recipe:` mapping)")
    return raw


def load_run(run_path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> tuple[RunDir, Recipe, Plugins]:
    """A run directory and the recipe it was trained with (from run.yaml), with ``overrides`` of
    sampling settings only: those of the trained weights are refused."""
    run_dir = RunDir(Path(run_path))
    run_yaml = run_dir.path / "run.yaml"
    if not run_dir.path.is_dir() or not run_yaml.exists():
        raise CdmbenchError(f"{run_dir.path} is not a run directory (no run.yaml); give the folder "
                            "that cdmbench run wrote (runs/<recipe name>)")
    try:
        raw = read_run_yaml(run_yaml)
    except RecipeError as exc:
        raise CdmbenchError(f"{exc}; give the folder that cdmbench run wrote, or run the recipe again "
                            "into a new --out") from None
    try:
        trained, _ = parse_recipe(copy.deepcopy(raw))
    except RecipeError as exc:
        raise CdmbenchError(f"{run_yaml} holds a recipe this cdmbench cannot read ({exc}); install the "
                            "plugins it names, or use the cdmbench version that wrote it") from None
    recipe, plugins = parse_recipe(raw, overrides=overrides)
    difference = recipe_difference(trained.to_dict(), recipe.to_dict(), SAMPLING_KEYS)
    if difference:
        raise CdmbenchError(f"{run_dir.path} was trained with a different recipe ({difference}); "
                            "sampling and evaluation may only change sampling settings (sample, "
                            "evaluate, device, plugins, data.args, and each stage's sampler, "
                            "guidance (scale, interval, guide), posthoc_sigma_rel and augmentation level)")
    return run_dir, recipe, plugins
