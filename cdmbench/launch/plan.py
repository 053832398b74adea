"""``cdmbench launch``: a recipe, or a trained run, into the jobs that train, sample and evaluate it,
checked before anything is submitted, then submitted (``submit``) or, with ``--dry-run``, printed.

    train <stage>   one job per stage, concurrently (a stage needs nothing of the stage it is
                    conditioned on until sampling), on nodes x GPUs processes
    sample          ``cdmbench run RECIPE`` after every stage's job: the cascade's grids, report
    shards          ``--evaluate``: an array, element i of W writing the evaluation shards
                    k mod W = i (after the training jobs, when it trains too)
    metrics         ``cdmbench evaluate`` after every element: it finds every shard and samples nothing
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cdmbench.errors import CdmbenchError, RecipeError
from cdmbench.launch.jobs import EvaluationShards, Metrics, SampleCascade, TrainStage
from cdmbench.launch.options import resolve
from cdmbench.launch.submit import Planned, sbatch_scripts, shape, submit
from cdmbench.recipe.schema import Component, Launch, Recipe


def _check_batches(recipe: Recipe, stages: list[str], settings: Launch) -> None:
    """Every stage's global batch divides into the job's processes x accumulation steps."""
    nodes, tasks, _ = shape(Planned("", [], trains=True), settings)
    for name in stages:
        train = recipe.stage(name).train
        if train.batch_size % (nodes * tasks * train.grad_accumulation):
            raise RecipeError(f"stages.{name}.train.batch_size",
                              f"{train.batch_size} does not divide into {nodes} node(s) x {tasks} process(es) x "
                              f"{train.grad_accumulation} accumulation step(s); choose --nodes and "
                              "--gpus-per-node whose product divides it")


def _evaluation(recipe: Recipe, plugins, settings: Launch, run_path: Path, after: list[str], *, stage: str | None,
                metrics: list[str] | None, num_samples: int | None, overrides: list[str]) -> list[Planned]:
    """The shards array and the metrics job after it, their metrics checked."""
    from cdmbench.recipe.validate import check_component

    spec = recipe.evaluate
    target = stage or spec.stage or recipe.stages[-1].name
    recipe.stage(target)
    by_name = {m.name: m for m in spec.metrics}
    chosen = [by_name.get(name, Component(name)) for name in metrics] if metrics else spec.metrics
    if not chosen:
        raise CdmbenchError("no metrics to evaluate: pass --metrics fid,is,cas or set evaluate.metrics in the recipe")
    for i, m in enumerate(chosen):
        check_component(plugins, "metrics", m, f"metrics[{i}]")
    n = num_samples or spec.num_samples
    elements = min(settings.eval_array, math.ceil(n / spec.shard_size))  # no element without a shard
    common = dict(signal=settings.signal, run=run_path, stage=target, metrics=metrics, num_samples=n,
                  overrides=overrides)
    shards = [EvaluationShards(element=i, elements=elements, **common) for i in range(elements)]
    info = {"stage": target, "num_samples": n, "shard_size": spec.shard_size, "elements": elements}
    return [Planned("shards", shards, after=after, info=info),
            Planned("metrics", [Metrics(**common)], after=["shards"], info={"stage": target})]


def launch(target: str | Path, *, stages: list[str] | None = None, evaluate: bool = False,
           metrics: list[str] | None = None, eval_stage: str | None = None, num_samples: int | None = None,
           overrides: tuple[str, ...] | list[str] = (), smoke: bool = False, out: str | Path | None = None,
           options: dict[str, Any] | None = None, dry_run: bool = False, echo=print) -> dict[str, list[str]] | str:
    """Launch a recipe's training (``stages``, default all, then the cascade's sampling) and with
    ``evaluate`` its evaluation, or a run directory's evaluation. ``options``: the command line's
    launch settings (None: not given). Returns each job's ids, or with ``dry_run`` the sbatch
    scripts (SLURM) or the jobs in words (local), submitting nothing."""
    from cdmbench.recipe.load import load_recipe
    from cdmbench.storage.rundir import load_run

    overrides, target = list(overrides), Path(target)
    if target.is_dir():
        if not evaluate or stages:
            raise CdmbenchError(f"{target} is a run directory: launch its evaluation with --evaluate (without "
                                "--stage), or launch its recipe file to train")
        run_dir, recipe, plugins = load_run(target, overrides)
        run_path, training = run_dir.path.resolve(), []
    else:
        recipe, plugins = load_recipe(target, overrides=overrides, smoke=smoke, echo=echo)
        run_path = Path(out or Path("runs") / recipe.name).resolve()
        training = list(dict.fromkeys(stages or recipe.stage_names()))
        for name in training:
            recipe.stage(name)  # an unknown name fails here, naming the nearest
    settings = resolve(recipe.launch, options)
    _check_batches(recipe, training, settings)
    plan = [Planned(f"train {name}", [TrainStage(signal=settings.signal, recipe=target.resolve(), out=run_path,
                                                 stage=name, overrides=overrides, smoke=smoke)],
                    trains=True, info={"stage": name}) for name in training]
    if training and not stages:
        plan.append(Planned("sample", [SampleCascade(signal=settings.signal, recipe=target.resolve(), out=run_path,
                                                     overrides=overrides, smoke=smoke)],
                            after=[job.name for job in plan]))
    if evaluate:
        plan += _evaluation(recipe, plugins, settings, run_path, [f"train {name}" for name in training],
                            stage=eval_stage, metrics=metrics, num_samples=num_samples, overrides=overrides)
    if dry_run and settings.cluster == "slurm":
        return sbatch_scripts(plan, settings, run_path / "launch", recipe.name)
    if dry_run:
        return "\n".join(f"{job.name}: {len(job.calls)} job(s) of {shape(job, settings)[1]} process(es)"
                         + (f", after {', '.join(job.after)}" if job.after else "") for job in plan)
    echo(f"run directory: {run_path}  ({settings.cluster}; cdmbench status {run_path})")
    return submit(plan, settings, run_path=run_path, run_name=recipe.name, echo=echo)
