"""``cdmbench status RUN``: where a run stands, from its directory alone (so it works from a login
node, with no scheduler, GPU or torch): each stage's step of its total, last checkpoint, images/s
and time left (train_log.jsonl, checkpoints/); each evaluation's sample shards done
(eval_samples/, and CAS's generated training sets); the jobs ``cdmbench launch`` submitted
(``launch.json``)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from cdmbench.errors import CdmbenchError

LAUNCH_FILE = "launch.json"
CHECKPOINT_RE = re.compile(r"step-(\d+)")
SHARD_RE = re.compile(r"shard-\d+-(\d+)-(\d+)\.npz")


def _last_log_row(folder: Path) -> dict[str, Any] | None:
    """The last whole row of ``<stage>/train_log.jsonl`` (a line cut short by a writer is skipped)."""
    path = folder / "train_log.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def _stage(run: Path, spec: dict[str, Any]) -> dict[str, Any]:
    folder, steps = run / spec["name"], spec["train"]["steps"]
    checkpoints = [int(m[1]) for p in (folder / "checkpoints").glob("step-*")
                   if p.is_dir() and (m := CHECKPOINT_RE.fullmatch(p.name))]
    row = _last_log_row(folder) or {}
    step, rate = row.get("step", 0), row.get("images_per_s")
    left = (steps - step) * spec["train"]["batch_size"] / rate if rate and step < steps else None
    return {"stage": spec["name"], "step": step, "steps": steps, "checkpoint": max(checkpoints, default=None),
            "images_per_s": rate, "seconds_left": 0.0 if step >= steps else left}


def _sample_folders(run: Path, stage: str, num_samples: int, shard_size: int) -> list[dict[str, Any]]:
    """Each evaluation sample folder of ``stage``: the shards of ``num_samples`` in ``shard_size``
    that a file holds whole, and the samples held from 0 on."""
    found = []
    for folder in sorted((run / stage / "eval_samples").glob("*/")):
        spans = [(int(m[1]), int(m[2])) for p in folder.glob("shard-*.npz") if (m := SHARD_RE.fullmatch(p.name))]
        total = math.ceil(num_samples / shard_size)
        done = sum(any(a <= k * shard_size and b >= min((k + 1) * shard_size, num_samples) for a, b in spans)
                   for k in range(total))
        held = 0
        while (reach := max((b for a, b in spans if a <= held < b), default=None)) is not None:
            held = reach
        found.append({"stage": stage, "folder": str(folder.relative_to(run)), "shards": done, "total": total,
                      "samples": min(held, num_samples), "num_samples": num_samples})
    for folder in sorted((run / stage / "training_sets").glob("*/")):  # CAS's generated training sets
        layout = folder / "layout.json"
        if layout.exists():
            layout_doc = json.loads(layout.read_text())
            total = math.ceil(layout_doc["num_images"] / layout_doc["shard_size"])
            found.append({"stage": stage, "folder": str(folder.relative_to(run)), "total": total,
                          "shards": len(list((folder / "done").glob("*"))), "num_samples": layout_doc["num_images"]})
    return found


def status(run_path: str | Path) -> dict[str, Any]:
    """Where the run in ``run_path`` stands: ``stages``, ``evaluations`` and ``launches`` (see the
    module docstring)."""
    run = Path(run_path)
    run_yaml, launch_file = run / "run.yaml", run / LAUNCH_FILE
    if not run_yaml.exists() and not launch_file.exists():
        raise CdmbenchError(f"{run} is not a run directory (no run.yaml, no {LAUNCH_FILE}); give the folder that "
                            "cdmbench run or cdmbench launch wrote (runs/<recipe name>)")
    launches = json.loads(launch_file.read_text())["launches"] if launch_file.exists() else []
    recipe = yaml.safe_load(run_yaml.read_text())["recipe"] if run_yaml.exists() else None
    stages = [_stage(run, spec) for spec in recipe["stages"]] if recipe else []
    layouts = {spec["name"]: (recipe["evaluate"]["num_samples"], recipe["evaluate"]["shard_size"])
               for spec in (recipe["stages"] if recipe else [])}
    for launch in launches:  # the evaluations launched: their sample count and shard size
        for job in launch["jobs"]:
            if "shard_size" in job:
                layouts[job["stage"]] = (job["num_samples"], job["shard_size"])
    evaluations = [e for stage, (n, size) in layouts.items() for e in _sample_folders(run, stage, n, size)]
    return {"run": str(run), "stages": stages, "evaluations": evaluations, "launches": launches}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds == 0:
        return "done"
    minutes = round(seconds / 60)
    return f"{minutes // 1440}d{minutes // 60 % 24:02d}h{minutes % 60:02d}m" if minutes >= 1440 else \
        f"{minutes // 60}h{minutes % 60:02d}m"


def format_status(state: dict[str, Any]) -> str:
    """``status``'s answer as the lines ``cdmbench status`` prints."""
    lines = [f"run {state['run']}"]
    if state["stages"]:
        lines.append(f"{'stage':<16} {'step':>17} {'checkpoint':>10} {'img/s':>9} {'time left':>10}")
    for s in state["stages"]:
        rate = "-" if s["images_per_s"] is None else f"{s['images_per_s']:.4g}"
        lines.append(f"{s['stage']:<16} {s['step']:>8}/{s['steps']:<8} {s['checkpoint'] or '-':>10} {rate:>9} "
                     f"{_duration(s['seconds_left']):>10}")
    for e in state["evaluations"]:
        held = f" ({e['samples']}/{e['num_samples']} samples)" if "samples" in e else f" ({e['num_samples']} images)"
        lines.append(f"{e['folder']}: {e['shards']}/{e['total']} shards{held}")
    if state["launches"]:
        last = state["launches"][-1]
        lines.append(f"jobs launched {last['time']} ({last['cluster']}):")
        lines += [f"  {job['name']}: {', '.join(job['job_ids'])}" for job in last["jobs"]]
    return "\n".join(lines)
