"""`cdmbench evaluate` and `cdmbench sweep` (and ``prepare --metrics``): a trained run's samples
generated (or reused) and its metrics computed on them, rows recorded with their protocol."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

from cdmbench.cascade.stages import StageModel, build_chain, samplers_of
from cdmbench.data.prepare import make_dataset
from cdmbench.errors import CdmbenchError, Stopped
from cdmbench.evaluation.samples import (
    EvalContext,
    SampleSet,
    generate_samples,
    generate_training_set,
    load_chain,
    read_samples,
    read_training_set,
    sampling_protocol,
)
from cdmbench.evaluation.search import run_search, tag_rows, with_choice
from cdmbench.evaluation.sweep import MANIFEST, apply_sweep_levels, best_levels, set_checked_level, sweep
from cdmbench.plugins import Plugins
from cdmbench.recipe.components import make_component
from cdmbench.recipe.load import load_recipe
from cdmbench.recipe.schema import Component, Recipe
from cdmbench.recipe.validate import check_component
from cdmbench.reporting.write import write_report
from cdmbench.runtime import distributed
from cdmbench.runtime.device import resolve_device
from cdmbench.storage.cache import default_cache_dir, digest
from cdmbench.storage.files import atomic_write, locked
from cdmbench.storage.rundir import load_run, result_row
from cdmbench.tracking.loggers import log_run_results

# How long a rank of an evaluation under torchrun waits for the others at a collective: ranks
# finish their shares of a million-image training set for CAS hours apart.
SHARDS_WAIT = timedelta(days=7)



def evaluate(run_path: str | Path, *, stage: str | None = None, metrics: list[str] | None = None,
             num_samples: int | None = None, overrides: tuple[str, ...] | list[str] = (),
             progress: bool = True, echo=print, search: bool = True,
             search_only: bool = False) -> list[dict[str, Any]]:
    """Generate (or reuse) samples of a trained run and evaluate ``metrics`` on them; the rows go
    into the run's results.jsonl and report.md. Feature networks are loaded before sampling.
    With ``search``, the recipe's ``evaluate.search`` runs first (``search_run``; ``search_only``:
    only it), and the evaluation samples at its chosen point."""
    if search or search_only:
        search_run(run_path, stage=stage, overrides=overrides, progress=progress, echo=echo)
    if search_only:
        return []
    run_dir, recipe, plugins, dataset, chain, context, built, chosen_by = _evaluation_setup(
        run_path, stage, metrics, overrides, progress, echo)
    spec = recipe.evaluate
    target, resolution, n = context.stage, context.resolution, num_samples or spec.num_samples
    device = context.device
    rank, world, steps = _join_and_load(chain, run_dir.path, context, built)
    sampling = dict(run_path=run_dir.path, checkpoint_steps=steps, num_classes=dataset.num_classes,
                    seed=recipe.sample.seed, batch_size=spec.batch_size, shard_size=spec.shard_size,
                    device=device, progress=progress, rank=rank, world_size=world)
    folder, signature = generate_samples(chain, num_samples=n, labels=spec.labels, **sampling)
    training_set = None
    if any(getattr(m, "replaces_training_set", False) for m in built):
        # the training split's labels: read by the first rank only (the split may not be prepared)
        labels = distributed.broadcast(context.real("train")[1] if rank == 0 else None)
        echo(f"cas replaces the training set: {len(labels):,} generated images of {target}, one per "
             "training image")
        training_set = generate_training_set(chain, labels=labels, **sampling)
    distributed.barrier()  # under torchrun: every rank wrote its shards; rank 0 computes the metrics
    if training_set is not None:  # memory-mapped: every rank may train on it
        images, labels = read_training_set(training_set)
        context.training_set = SampleSet(images, labels, protocol={  # image i of training image i's class
            "n": len(labels), "labels": "training split",
            "seeds": f"sample seed {recipe.sample.seed}, images 0..{len(labels) - 1}",
            "samples": str(training_set.relative_to(run_dir.path)), "signature": training_set.name})
    if rank != 0:  # the metrics that train on every rank (their rows are rank 0's)
        for metric in [m for m in built if getattr(m, "all_ranks", False)]:
            metric.evaluate(context)
        return []
    context.samples, context.labels = read_samples(folder, n)
    context.protocol = {**samples_protocol(recipe, dataset, resolution, n, folder, run_dir.path, signature, chain),
                        **({"chosen_by": chosen_by} if chosen_by else {})}
    rows = []
    for metric in built:  # each metric's rows are kept as soon as they exist
        rows += (done := [result_row(run=recipe.name, stage=target, **row)
                          for row in tag_rows(metric_rows([metric], context, echo), run_dir.path, chosen_by)])
        run_dir.add_results(done)
    log_run_results(plugins, recipe, run_dir.path, rows, steps, echo=echo)
    echo(write_report(run_dir, recipe, plugins))
    return rows


def samples_protocol(recipe: Recipe, dataset, resolution: int, n: int, folder: Path, run_path: Path,
                     signature: dict[str, Any], chain: list[StageModel]) -> dict[str, Any]:
    """What every row of the samples in ``folder`` says of them."""
    return {"dataset": getattr(dataset, "benchmark", recipe.data.name), "resolution": resolution,
            "n": n, "labels": recipe.evaluate.labels, "seeds": f"sample seed {recipe.sample.seed}, images 0..{n - 1}",
            "samples": str(folder.relative_to(run_path)), "signature": digest(signature, 12),
            "samplers": samplers_of(chain), **sampling_protocol(chain)}


def search_run(run_path: str | Path, *, stage: str | None = None, overrides: tuple[str, ...] | list[str] = (),
               progress: bool = True, echo=print) -> dict[str, Any] | None:
    """Run (resume, or reuse) the run's ``evaluate.search`` over ``stage``'s samples, when it has
    one (``cdmbench.evaluation.search``): each point's rows recorded, the best point written to
    search.json; returns its ``chosen`` (None without a search, {} on ranks other than 0)."""
    run_dir, recipe, plugins = load_run(run_path, overrides)
    spec = recipe.evaluate.search
    if not spec.space:
        return None
    dataset, context, built = _metrics_setup(recipe, plugins, stage, spec.metrics or None, progress, echo)
    built = _without_training_sets(built, "search", echo)
    chain = build_chain(plugins, recipe, context.stage, dataset.num_classes, context.device)
    apply_sweep_levels(chain, run_dir.path, overrides)
    rank, world, steps = _join_and_load(chain, run_dir.path, context, built)
    del chain  # each point builds its own
    recorded: list[dict[str, Any]] = []

    def measure(point_recipe: Recipe, point_chain, folder: Path, signature, protocol) -> list[dict[str, Any]]:
        n = spec.num_samples
        context.recipe = point_recipe  # the recipe the samples were made with
        context.set_samples(*read_samples(folder, n), {**samples_protocol(
            point_recipe, dataset, context.resolution, n, folder, run_dir.path, signature, point_chain), **protocol})
        rows = [result_row(run=recipe.name, stage=context.stage, **row) for row in metric_rows(built, context, echo)]
        run_dir.add_results(rows)
        recorded.extend(rows)
        return rows

    chosen = run_search(spec, run_path=run_dir.path, recipe=recipe, stage=context.stage, overrides=list(overrides),
                        num_classes=dataset.num_classes, steps=steps, device=context.device,
                        batch_size=recipe.evaluate.batch_size, shard_size=recipe.evaluate.shard_size,
                        measure=measure, rank=rank, world_size=world, progress=progress, echo=echo)
    distributed.barrier()  # search.json's choice is written before any rank evaluates at it
    if rank == 0:
        echo(f"search chose {chosen['point']} by {chosen['metric']} {chosen['value']} "
             f"(in {run_dir.path / 'search.json'})")
        log_run_results(plugins, recipe, run_dir.path, recorded, steps, echo=echo)
    return chosen


def _without_training_sets(built: list, what: str, echo) -> list:
    """The metrics but those that replace the training set (a whole training set of samples per
    point of a sweep or search); a CdmbenchError when none is left."""
    replacing = [m for m in built if getattr(m, "replaces_training_set", False)]
    if replacing:
        echo(f"{what}: not computing cas with replace_training_set (the paper's protocol) at each point; "
             f"run cdmbench evaluate at the point the {what} chooses")
    kept = [m for m in built if m not in replacing]
    if not kept:
        raise CdmbenchError(f"no metric to {what}: pass --metrics fid,is, or --set evaluate.metrics=[...] "
                            "with a cas without paper_protocol and replace_training_set")
    return kept



def _join_and_load(chain: list[StageModel], run_path: Path, context: EvalContext,
                   built: list) -> tuple[int, int, dict[str, int]]:
    """(rank, world size, checkpoint steps) of a sampling job: it joins the torchrun process
    group, every rank loads the checkpoints rank 0 chose (a newer one may land meanwhile), and
    rank 0 prepares the metrics (feature networks: a missing file fails before sampling)."""
    rank, world = distributed.rank(), distributed.world_size()
    distributed.init(context.device, timeout=SHARDS_WAIT)  # ranks meet again after sampling
    steps = distributed.broadcast(load_chain(chain, run_path) if rank == 0 else None)
    if rank != 0:
        load_chain(chain, run_path, steps)
    for metric in built if rank == 0 else []:
        if hasattr(metric, "prepare"):
            metric.prepare(context)
    return rank, world, steps



def metric_rows(built: list, context, echo) -> list[dict[str, Any]]:
    """Every metric's rows; a metric that fails gives a row with status 'failed' and the error
    (one stopped by SIGTERM / SIGINT, or one that runs on every rank of a torchrun job, stops the
    job)."""
    rows = []
    for metric in built:
        try:
            rows += metric.evaluate(context)
        except Stopped:  # a signal: the job ends; the metric resumes in the next one
            raise
        except Exception as exc:  # the other metrics' rows are kept
            if getattr(metric, "all_ranks", False) and distributed.joined():
                raise  # the other ranks wait for this one: the job must end (torchrun stops them)
            error = str(exc) if isinstance(exc, (CdmbenchError, ValueError)) else f"{type(exc).__name__}: {exc}"
            echo(f"metric {metric.name} failed: {error}")
            protocol = context.protocol
            if getattr(metric, "replaces_training_set", False) and context.training_set is not None:
                protocol = {**protocol, **context.training_set.protocol}
            rows.append({"metric": metric.name, "value": None, "n": protocol["n"], "unit": "",
                         "higher_is_better": None, "status": "failed", "protocol": {**protocol, "error": error}})
    return rows



def _evaluation_setup(run_path, stage, metrics, overrides, progress, echo):
    """Recipe, the stages up to the evaluated one (with a sweep's chosen levels, then a search's
    chosen point), an EvalContext, the metrics of a run, and the rows' ``chosen_by`` (or None)."""
    run_dir, recipe, plugins = load_run(run_path, overrides)
    overrides, chosen_by = with_choice(run_dir.path, recipe, stage or recipe.evaluate.stage or recipe.stages[-1].name,
                                       overrides)
    if chosen_by:
        run_dir, recipe, plugins = load_run(run_path, overrides)
    dataset, context, built = _metrics_setup(recipe, plugins, stage, metrics, progress, echo)
    stages = build_chain(plugins, recipe, context.stage, dataset.num_classes, context.device)
    apply_sweep_levels(stages, run_dir.path, overrides)
    return run_dir, recipe, plugins, dataset, stages, context, built, chosen_by



def _metrics_setup(recipe: Recipe, plugins: Plugins, stage: str | None, metrics: list[str] | None,
                   progress: bool, echo):
    """The dataset, an EvalContext for ``stage``'s samples (default: evaluate.stage or the last
    stage) and the chosen metrics (default: evaluate.metrics), built."""
    spec = recipe.evaluate
    specs = {m.name: m for m in spec.metrics}
    chosen = [specs.get(name, Component(name)) for name in metrics] if metrics else spec.metrics
    if not chosen:
        raise CdmbenchError("no metrics to evaluate: pass --metrics fid,is,cas or set "
                            "evaluate.metrics in the recipe")
    for i, m in enumerate(chosen):
        check_component(plugins, "metrics", m, f"metrics[{i}]")
    target = stage or spec.stage or recipe.stages[-1].name
    recipe.stage(target)
    dataset = make_dataset(plugins, recipe, "train")
    return (dataset, *metrics_context(recipe, plugins, target, dataset.num_classes, chosen, progress, echo))


def metrics_context(recipe: Recipe, plugins: Plugins, stage: str, num_classes: int, chosen: list[Component],
                    progress: bool, echo) -> tuple[EvalContext, list]:
    """An EvalContext for ``stage``'s samples (none set yet) and the ``chosen`` metrics, built."""
    context = EvalContext(samples=None, labels=None, num_classes=num_classes,
                          resolution=recipe.stage(stage).resolution, recipe=recipe, plugins=plugins,
                          device=resolve_device(recipe.device), cache_dir=default_cache_dir(), protocol={},
                          progress=progress, stage=stage, echo=echo)
    return context, [make_component(plugins, "metrics", m, f"metrics.{m.name}") for m in chosen]



def prepare_metrics(recipe_path: str | Path, *, overrides: tuple[str, ...] | list[str] = (),
                    stage: str | None = None, progress: bool = True, smoke: bool = False,
                    echo=print) -> None:
    """Make, before any sample exists, what the recipe's evaluation metrics need for ``stage``'s
    samples: feature networks (a classifier trained once) and real-data reference statistics,
    in the cache that ``cdmbench evaluate`` and ``cdmbench sweep`` read; e.g. while the stages
    train."""
    recipe, plugins = load_recipe(recipe_path, overrides=overrides, smoke=smoke, echo=echo)
    _, context, built = _metrics_setup(recipe, plugins, stage, None, progress, echo)
    for metric in built:
        if hasattr(metric, "prepare"):
            metric.prepare(context)
    echo(f"evaluation of {context.stage} prepared in {context.cache_dir}")


def sweep_levels(run_path: str | Path, *, stage: str, levels: list[float], inputs: list[str],
                 metrics: list[str] | None = None, num_samples: int | None = None,
                 overrides: tuple[str, ...] | list[str] = (), progress: bool = True,
                 echo=print) -> dict[str, Any]:
    """Evaluate SR ``stage`` at each sampling level on generated and/or ground-truth inputs;
    record every row and write the best level (by the first metric) to the run's manifest."""
    run_dir, recipe, plugins, dataset, chain, context, built, _ = _evaluation_setup(
        run_path, stage, metrics, overrides, progress, echo)
    st = recipe.stage(stage)
    if st.condition_on is None:
        raise CdmbenchError(f"stage {stage} is a base stage; sweep an SR stage (one with condition_on)")
    built = _without_training_sets(built, "sweep", echo)
    for level in levels:  # the cheap checks and the checkpoints before the metrics' preparation
        set_checked_level(chain, stage, level, f"--levels {level}")
    rank, world, steps = _join_and_load(chain, run_dir.path, context, built)
    n = num_samples or recipe.evaluate.num_samples
    recorded: list[dict[str, Any]] = []  # the rows results.jsonl got, for the loggers

    def record(level_rows: list[dict[str, Any]]) -> None:
        rows = [result_row(run=recipe.name, stage=stage, **row) for row in level_rows]
        run_dir.add_results(rows)
        recorded.extend(rows)

    context.protocol = {"dataset": getattr(dataset, "benchmark", recipe.data.name),
                        "resolution": st.resolution, "n": n, "labels": recipe.evaluate.labels,
                        "seeds": f"sample seed {recipe.sample.seed}, images 0..{n - 1}",
                        "samplers": samplers_of(chain), **sampling_protocol(chain)}
    rows = sweep(chain, name=stage, levels=levels, inputs=inputs, context=context,
                 metric_rows=lambda ctx: metric_rows(built, ctx, echo), run_path=run_dir.path,
                 num_samples=n, seed=recipe.sample.seed, batch_size=recipe.evaluate.batch_size,
                 shard_size=recipe.evaluate.shard_size, device=context.device, checkpoint_steps=steps,
                 progress=progress, rank=rank, world_size=world,
                 record=record)
    if rank != 0:
        return {}
    log_run_results(plugins, recipe, run_dir.path, recorded, steps, echo=echo)
    best = best_levels(rows)
    primary = next((r["metric"] for r in rows if r["metric"] in best), None)
    if primary is not None:
        path = run_dir.path / MANIFEST
        with locked(path):  # concurrent sweeps of other stages update it too
            manifest = json.loads(path.read_text()) if path.exists() else {}
            manifest[stage] = {"level": best[primary]["level"], "metric": primary, "by_metric": best}
            atomic_write(path, json.dumps(manifest, indent=1))
        echo(f"best level for {stage} by {primary}: {best[primary]['level']} (written to {path})")
    echo(write_report(run_dir, recipe, plugins))
    return best
