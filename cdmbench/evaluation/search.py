"""Sampling-time searches (``evaluate.search``): CDM's search of the augmentation level s, EDM2's of
the post-hoc EMA length, guidance scales and intervals, sampler settings, each point evaluated on a
small sample, then the best point evaluated fully by ``cdmbench evaluate``.

A point maps ``--set`` keys to values (``{"stages.sr64.augmentation.args.level": 0.2}``) and is
applied over the run's recipe and the user's ``--set`` as overrides: every point is validated as a
recipe and its cascade built on the meta device, levels checked by ``set_checked_level``, before
any sampling (``check_points``). ``grid`` evaluates the joint Cartesian product; ``coordinate``
starts from every key's first candidate and sets one key at a time, in the declared order, to its
best candidate. A point's samples are ``generate_samples``' (npz shards keyed by their signature,
shared out over torchrun ranks), so a point sampled before, by a search or an evaluation, samples
nothing again; rank 0 computes the metrics. Each point's rows go into results.jsonl as soon as they
exist (protocol ``search: {id, point}``) and the point into ``<run>/search.json`` under the
search's id, a digest of the search block, the stage, the checkpoint steps and the base sampling
settings: a search killed midway resumes at its first unrecorded point, and a finished one is
reused. ``chosen`` in search.json is the newest finished search's best point; later ``evaluate``
and ``sample`` apply it (``with_choice``: after a sweep's cascade.json levels, before ``--set``),
and the evaluation's rows name it in ``chosen_by`` (``tag_rows``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any, Callable

from cdmbench.cascade.stages import build_chain
from cdmbench.errors import CdmbenchError
from cdmbench.evaluation.samples import generate_samples, load_chain
from cdmbench.evaluation.sweep import MANIFEST as SWEEP_MANIFEST
from cdmbench.evaluation.sweep import apply_sweep_levels, set_checked_level
from cdmbench.recipe.schema import Recipe, Search
from cdmbench.recipe.validate import assignment
from cdmbench.runtime import distributed
from cdmbench.storage.cache import digest
from cdmbench.storage.files import atomic_write, locked
from cdmbench.storage.rundir import load_run

MANIFEST = "search.json"
Point = dict[str, Any]


# --- points ----------------------------------------------------------------------------------

def point_overrides(point: Point) -> list[str]:
    """The point as ``--set`` assignments."""
    return [assignment(key, value) for key, value in point.items()]


def point_key(point: Point) -> str:
    """The point's identity in search.json (its keys in any order)."""
    return json.dumps(point, sort_keys=True)


def label(point: Point) -> str:
    """A point in words, e.g. ``sr64.augmentation.args.level=0.2, base32.guidance.scale=2``."""
    return ", ".join(f"{key.removeprefix('stages.')}={json.dumps(value)}" for key, value in point.items())


def grid(space: dict[str, list[Any]]) -> list[Point]:
    """Every point of the Cartesian product of the candidates, the last key varying fastest."""
    return [dict(zip(space, values, strict=True)) for values in itertools.product(*space.values())]


def coordinate_round(space: dict[str, list[Any]], current: Point, key: str) -> list[Point]:
    """Coordinate search's points for ``key``: ``current`` with each candidate of ``key``."""
    return [{**current, key: value} for value in space[key]]


def chain_names(recipe: Recipe, target: str) -> list[str]:
    """The stages that produce ``target``'s samples, base first."""
    names = [recipe.stage(target).name]
    while recipe.stage(names[0]).condition_on is not None:
        names.insert(0, recipe.stage(names[0]).condition_on)
    return names


def check_points(points: list[Point], *, run_path: Path, overrides: list[str], stage: str,
                 num_classes: int) -> None:
    """Each point as a recipe over the run's (``load_run``: sampling keys only) and its cascade
    built on the meta device (component arguments, truncation), its levels through
    ``set_checked_level``: a ``CdmbenchError`` naming the point before any sampling."""
    for point in points:
        try:
            _, recipe, plugins = load_run(run_path, [*overrides, *point_overrides(point)])
            chain = build_chain(plugins, recipe, stage, num_classes, "meta")
            for key, value in point.items():
                parts = key.split(".")
                if parts[2:] == ["augmentation", "args", "level"] and parts[1] in chain_names(recipe, stage):
                    set_checked_level(chain, parts[1], value, key)
        except CdmbenchError as exc:
            raise CdmbenchError(f"evaluate.search: point {label(point)}: {exc}") from None


# --- search.json -----------------------------------------------------------------------------

def read_manifest(run_path: Path) -> dict[str, Any]:
    path = Path(run_path) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {"searches": {}}


def _update(run_path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Read-modify-write search.json under its lock (concurrent searches of other stages)."""
    path = run_path / MANIFEST
    with locked(path):
        manifest = read_manifest(run_path)
        change(manifest)
        atomic_write(path, json.dumps(manifest, indent=1))


def reference_of(row: dict[str, Any]) -> list[Any]:
    """What a row's number compares the samples with: its protocol's reference (file and hash, or
    split), or for a metric without one (IS) the metric itself."""
    protocol = row["protocol"]
    found = [protocol.get(k) for k in ("reference", "reference_sha256", "reference_split")]
    return found if any(v is not None for v in found) else ["metric", row["metric"]]


def _best(entries: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The entry with the best value of ``metric`` (its rows' higher_is_better), the first of ties."""
    scored = [e for e in entries if e["values"].get(metric) is not None]
    if not scored:
        raise CdmbenchError(f"evaluate.search: no point has a value of {metric} (every evaluation of it failed; "
                            "see the failed rows in results.jsonl)")
    sign = 1 if scored[0]["higher_is_better"][metric] else -1
    return max(scored, key=lambda e: sign * e["values"][metric])


# --- the search ------------------------------------------------------------------------------

def search_id(spec: Search, *, stage: str, recipe: Recipe, steps: dict[str, int], overrides: list[str],
              run_path: Path) -> str:
    """Names one search: its block, stage, checkpoint steps, sample seed, the user's ``--set``,
    and the sampling settings of the chain's stages (recipe and cascade.json) the points start from."""
    names = chain_names(recipe, stage)
    sweep = Path(run_path) / SWEEP_MANIFEST
    levels = json.loads(sweep.read_text()) if sweep.exists() else {}
    base = {name: {key: dataclasses.asdict(recipe.stage(name))[key] for key in
                   ("sampler", "guidance", "posthoc_sigma_rel", "augmentation")} | {"swept": levels.get(name)}
            for name in names}
    return digest({"search": dataclasses.asdict(spec), "stage": stage, "checkpoint_steps": steps,
                   "seed": recipe.sample.seed, "precision": recipe.sample.precision, "overrides": list(overrides),
                   "base": base}, 12)


def run_search(spec: Search, *, run_path: Path, recipe: Recipe, stage: str, overrides: list[str],
               num_classes: int, steps: dict[str, int], device, batch_size: int, shard_size: int,
               measure: Callable[..., list[dict[str, Any]]],
               rank: int = 0, world_size: int = 1, progress: bool = True, echo=print) -> dict[str, Any]:
    """Run (or resume, or reuse) the search of ``spec`` over ``stage``'s samples; returns search.json's
    ``chosen``. ``steps``: the stages' checkpoint steps every point samples with. ``measure(recipe,
    chain, folder, signature, protocol)`` (rank 0) evaluates a point's samples in ``folder`` and
    records its rows with ``protocol`` added; every rank samples."""
    overrides, echo = list(overrides), echo if rank == 0 else (lambda *_: None)
    sid = search_id(spec, stage=stage, recipe=recipe, steps=steps, overrides=overrides, run_path=run_path)
    record = distributed.broadcast(read_manifest(run_path)["searches"].get(sid) if rank == 0 else None)
    if record is None:
        record = {"stage": stage, "metric": spec.metric, "strategy": spec.strategy, "n_search": spec.num_samples,
                  "space": spec.space, "checkpoint_steps": steps, "overrides": overrides, "points": [],
                  "done": False}
    if record["done"]:
        echo(f"search {sid} of {stage} done before ({len(record['points'])} points): reused, not run again")
        return _finish(run_path, sid, record) if rank == 0 else {}
    done = {point_key(e["point"]): e for e in record["points"]}
    stage_steps = {name: step for name, step in steps.items() if "/" not in name}  # guides: each point's own

    def evaluate(points: list[Point]) -> list[dict[str, Any]]:
        """Each point's entry: recorded before (a resumed search), or sampled and measured now."""
        check_points([p for p in points if point_key(p) not in done], run_path=run_path, overrides=overrides,
                     stage=stage, num_classes=num_classes)
        entries = []
        for point in points:
            if point_key(point) in done:
                echo(f"search {sid}: {label(point)} evaluated before: not evaluated again")
            else:
                entry = _evaluate_point(point, sid=sid, spec=spec, run_path=run_path, overrides=overrides,
                                        stage=stage, num_classes=num_classes, steps=stage_steps, device=device,
                                        batch_size=batch_size, shard_size=shard_size, measure=measure,
                                        rank=rank, world_size=world_size, progress=progress, echo=echo)
                done[point_key(point)] = entry
                if rank == 0:
                    record["points"].append(entry)
                    _update(run_path, lambda m, r=record: m["searches"].__setitem__(sid, r))
            entries.append(done[point_key(point)])
        return entries

    echo(f"search {sid} of {stage}: {spec.strategy} over {', '.join(spec.space)} by {spec.metric} on "
         f"{spec.num_samples:,} samples a point")
    if spec.strategy == "grid":
        evaluate(grid(spec.space))
    else:
        current = {key: values[0] for key, values in spec.space.items()}
        for key in spec.space:  # rank 0 measured: it chooses for every rank
            entries = evaluate(coordinate_round(spec.space, current, key))
            current = distributed.broadcast(_best(entries, spec.metric)["point"] if rank == 0 else None)
    if rank != 0:
        return {}
    record["done"] = True
    return _finish(run_path, sid, record)


def _evaluate_point(point: Point, *, sid: str, spec: Search, run_path: Path, overrides: list[str], stage: str,
                    num_classes: int, steps: dict[str, int], device, batch_size: int, shard_size: int,
                    measure, rank: int, world_size: int, progress: bool, echo) -> dict[str, Any]:
    """Sample ``point`` (every rank its shards) and, on rank 0, measure it: its search.json entry."""
    point_set = [*overrides, *point_overrides(point)]
    _, recipe, plugins = load_run(run_path, point_set)
    chain = build_chain(plugins, recipe, stage, num_classes, device)
    apply_sweep_levels(chain, run_path, point_set)
    loaded = distributed.broadcast(load_chain(chain, run_path, steps) if rank == 0 else None)
    if rank != 0:
        load_chain(chain, run_path, loaded)
    folder, signature = generate_samples(chain, run_path=run_path, checkpoint_steps=loaded,
                                         num_samples=spec.num_samples, num_classes=num_classes,
                                         seed=recipe.sample.seed, batch_size=batch_size, shard_size=shard_size,
                                         device=device, labels=recipe.evaluate.labels, progress=progress,
                                         rank=rank, world_size=world_size)
    distributed.barrier()  # every rank's shards of this point are written
    if rank != 0:
        return {"point": point}
    rows = measure(recipe, chain, folder, signature, {"search": {"id": sid, "point": point}})
    if not any(r["metric"] == spec.metric for r in rows):
        raise CdmbenchError(f"evaluate.search.metric: the metrics gave no row '{spec.metric}' (they gave "
                            f"{', '.join(sorted({r['metric'] for r in rows})) or 'none'}); name one of those")
    values = {r["metric"]: r["value"] for r in rows}
    echo(f"search {sid}: {label(point)}: {spec.metric} {values[spec.metric]}")
    return {"point": point, "signature": digest(signature, 12), "values": values,
            "higher_is_better": {r["metric"]: r["higher_is_better"] for r in rows},
            "references": {r["metric"]: reference_of(r) for r in rows}}


def _finish(run_path: Path, sid: str, record: dict[str, Any]) -> dict[str, Any]:
    """Record the search's best point, make it search.json's ``chosen``, and return that."""
    best = _best(record["points"], record["metric"])
    chosen = {"search": sid, "stage": record["stage"], "metric": record["metric"], "n_search": record["n_search"],
              "point": best["point"], "value": best["values"][record["metric"]],
              "reference": best["references"][record["metric"]]}
    record["best"] = best["point"]

    def change(manifest: dict[str, Any]) -> None:
        manifest["searches"][sid] = record
        manifest["chosen"] = chosen

    _update(run_path, change)
    return chosen


# --- applying the choice ---------------------------------------------------------------------

def _overridden(key: str, overrides: list[str] | tuple[str, ...]) -> bool:
    """Whether a ``--set`` in ``overrides`` sets ``key``, a key inside it or a key it is inside."""
    return any(key == k or key.startswith(k + ".") or k.startswith(key + ".")
               for k in (o.partition("=")[0] for o in overrides))


def with_choice(run_path: Path, recipe: Recipe, target: str,
                overrides: list[str] | tuple[str, ...]) -> tuple[list[str], dict[str, Any] | None]:
    """``overrides`` with search.json's chosen point before them (its keys of ``target``'s chain,
    except those ``overrides`` set), and the ``chosen_by`` of the rows sampled so (None when no
    chosen key applies)."""
    chosen = read_manifest(run_path).get("chosen")
    if chosen is None:
        return list(overrides), None
    names = chain_names(recipe, target)
    applied = {key: value for key, value in chosen["point"].items()
               if (not key.startswith("stages.") or key.split(".")[1] in names) and not _overridden(key, overrides)}
    if not applied:
        return list(overrides), None
    chosen_by = {"search": chosen["search"], "metric": chosen["metric"], "n_search": chosen["n_search"],
                 "point": applied}
    return [*point_overrides(applied), *overrides], chosen_by


def tag_rows(rows: list[dict[str, Any]], run_path: Path, chosen_by: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Rows sampled at a chosen point: ``tuned_on_reference`` in their protocol, true where the
    search chose by a number against the same reference as the row's."""
    if chosen_by is None:
        return rows
    record = read_manifest(run_path)["searches"][chosen_by["search"]]
    best = next(e for e in record["points"] if point_key(e["point"]) == point_key(record["best"]))
    reference = best["references"][record["metric"]]
    return [{**row, "protocol": {**row["protocol"], "tuned_on_reference": reference_of(row) == reference}}
            for row in rows]
