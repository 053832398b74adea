"""`cdmbench run`: validate a recipe, build every stage, train the stages this job trains (with
evaluations during training where ``train.eval_every`` asks), sample the cascade into grids and
write the results and report.md.

Running a finished run again adds no result row: a row already in results.jsonl (all but its
time equal) is not written again, the validation bound is computed only for weights it was not
computed for, and the grids are sampled again only when their checkpoints or settings changed
(or a grid is missing)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from cdmbench.cascade.cost import describe
from cdmbench.cascade.grids import save_grid
from cdmbench.cascade.stages import StageModel, attach_guide, build_all, build_stage, guide_of, sample_cascade
from cdmbench.data.prepare import make_dataset, split_images
from cdmbench.errors import CdmbenchError, RecipeError
from cdmbench.evaluation.during_training import TrainingEvaluation
from cdmbench.evaluation.samples import chain_to, load_guide, load_posthoc, sample_signature
from cdmbench.evaluation.sweep import apply_sweep_levels
from cdmbench.plugins import Plugins
from cdmbench.recipe.load import load_recipe
from cdmbench.recipe.schema import Recipe
from cdmbench.reporting.write import write_report
from cdmbench.runtime import distributed
from cdmbench.runtime.device import resolve_device
from cdmbench.storage.cache import digest
from cdmbench.storage.rundir import RunDir, result_row
from cdmbench.tracking.loggers import Loggers, open_loggers
from cdmbench.training.checkpoint import ema_weights_sha256, list_checkpoints, load_ema
from cdmbench.training.trainer import check_batch, read_log, train_stage, validation_bpd


def _recorded(run_dir: RunDir, stage: str | None = None, metric: str | None = None) -> list[dict[str, Any]]:
    """The rows results.jsonl holds (of ``stage`` and ``metric`` when given), each without its time."""
    return [{k: v for k, v in row.items() if k != "time"} for row in run_dir.results()
            if stage in (None, row.get("stage")) and metric in (None, row.get("metric"))]


def _add_new(run_dir: RunDir, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Append the ``rows`` that results.jsonl does not hold yet (all but the time equal), and
    return them: running a finished run again records nothing twice."""
    held = _recorded(run_dir)
    new = [row for row in rows if {k: v for k, v in row.items() if k != "time"} not in held]
    if new:
        run_dir.add_results(new)
    return new


def _training_rows(recipe: Recipe, st: StageModel, log: list[dict[str, Any]], device) -> list[dict[str, Any]]:
    """The final loss and the throughput over the whole training: images seen (steps x global
    batch) / training seconds, across resumes, from the last log row (whose images_per_s is
    only the window since the row before, e.g. 50 steps of a loaded machine)."""
    last = log[-1]
    rows = [result_row(run=recipe.name, stage=st.spec.name, metric="train_loss", value=last["loss"], unit="",
                       n=last["step"], higher_is_better=False, protocol={"loss": st.spec.loss})]
    if last.get("seconds"):
        images = last["step"] * st.spec.train.batch_size
        value, protocol = images / last["seconds"], {
            "device": str(device), "over": "all training steps, across resumes: images / training seconds",
            "images": images, "seconds": last["seconds"]}
    else:  # a log written before training seconds were
        value, protocol = last["images_per_s"], {"device": str(device), "over": "the last log window"}
    rows.append(result_row(run=recipe.name, stage=st.spec.name, metric="train_throughput", value=value,
                           unit="img/s", n=last["step"], higher_is_better=True, protocol=protocol))
    return rows


def _final_step_done(folder: Path, steps: int) -> bool:
    ckpts = list_checkpoints(folder / "checkpoints")
    return bool(ckpts) and int(ckpts[-1].name.split("-")[1]) >= steps


def run(recipe_path: str | Path, *, out: str | Path | None = None, stage: str | None = None,
        overrides: tuple[str, ...] | list[str] = (), dry_run: bool = False,
        progress: bool = True, smoke: bool = False, echo=print) -> Path | pd.DataFrame:
    """Train the recipe's stages (or just ``stage``), sample the cascade, write results.

    ``smoke``: run a shrunk copy on generated stand-in data (``cdmbench.recipe.smoke``).
    Returns the run directory, or with ``dry_run`` the table of stages (nothing is written)."""
    recipe, plugins = load_recipe(recipe_path, overrides=overrides, smoke=smoke, echo=echo)
    if stage is not None:
        recipe.stage(stage)  # unknown stage names fail here
    if dry_run:
        return describe(recipe, plugins, echo)
    device = resolve_device(recipe.device)
    distributed.init(device)  # under torchrun; only rank 0 writes
    for spec in recipe.stages:  # every stage to train fits the processes, before any trains
        if stage in (None, spec.name):
            try:
                check_batch(spec.train.batch_size, spec.train.grad_accumulation)
            except CdmbenchError as exc:
                raise RecipeError(f"stages.{spec.name}.train.batch_size",
                                  str(exc).removeprefix("train.batch_size ")) from None
    main = distributed.is_main()
    run_dir = RunDir(Path(out) if out else Path("runs") / recipe.name)
    run_dir.check(recipe)  # before the dataset (a Hub dataset takes long) and the models
    dataset = make_dataset(plugins, recipe, "train")
    stages = build_all(plugins, recipe, dataset.num_classes, "meta")  # every stage checked before the data
    resuming = (run_dir.path / "run.yaml").exists()  # an earlier invocation's run: its tracker runs go on
    if main:
        run_dir.prepare(recipe, plugins, dataset.class_names)
    distributed.barrier()
    echo(f"run directory: {run_dir.path}  (device: {device}, processes: {distributed.world_size()})")

    def materialise(i: int) -> StageModel:
        """Stage i on the device (only the stages this job trains or samples take its memory)."""
        stages[i] = build_stage(plugins, recipe, stages[i].spec, num_classes=dataset.num_classes, device=device)
        apply_sweep_levels(stages[i:i + 1], run_dir.path, overrides)
        return stages[i]

    loggers = open_loggers(plugins, recipe, run_dir.path, resuming=resuming, echo=echo)  # the main process's
    try:
        data = split_images(recipe, dataset, "train", progress=progress, echo=echo)  # every job trains a stage
        evaluations = {spec.name: TrainingEvaluation(recipe, plugins, run_dir, spec, dataset, data, loggers=loggers,
                                                     progress=progress, echo=echo)  # a missing network fails here
                       for spec in recipe.stages if stage in (None, spec.name) and spec.train.eval_every}
        models: dict[str, torch.nn.Module] = {}
        metadata = {"recipe": recipe.to_dict()}
        for i, st in enumerate(stages):
            folder = run_dir.stage(st.spec.name)
            if stage in (None, st.spec.name):
                st = materialise(i)
                evaluation = evaluations.get(st.spec.name)
                after_step = None if evaluation is None else functools.partial(evaluation, st)
                models[st.spec.name] = train_stage(st, data, folder=folder, seed=recipe.seed,
                                                   metadata={**metadata, "stage": st.spec.name},
                                                   device=device, progress=progress, echo=echo, loggers=loggers,
                                                   after_step=after_step)
                log = read_log(folder) if main else []
                if log:
                    loggers.log_results(_add_new(run_dir, _training_rows(recipe, st, log, device)),
                                        {st.spec.name: log[-1]["step"]})
                if st.spec.train.val_bpd_images and main:
                    _report_bpd(recipe, run_dir, st, models[st.spec.name], plugins, device, progress, echo, loggers)

        if not main:  # the other processes only train
            return run_dir.path
        steps = {name: recipe.stage(name).train.steps for name in models}  # trained here: to the last step
        for i, st in enumerate(stages):  # stages trained by earlier jobs, loaded now for sampling
            folder = run_dir.stage(st.spec.name)
            if st.spec.name not in models and _final_step_done(folder, st.spec.train.steps):
                st = materialise(i)
                steps[st.spec.name] = load_ema(folder / "checkpoints", st.backbone)
                models[st.spec.name] = st.backbone.eval()
        for st in stages:  # a stage sampled with a post-hoc EMA (posthoc_sigma_rel), with a guide network
            if st.spec.name in models and st.spec.posthoc_sigma_rel is not None:
                load_posthoc(st, run_dir.path, steps[st.spec.name])
                models[st.spec.name] = st.backbone.eval()
            if st.spec.name in models and guide_of(st.spec) is not None:
                attach_guide(plugins, recipe, st, dataset.num_classes, device)
                steps.update(load_guide(st, run_dir.path))
        chain = []
        for st in stages:
            if st.spec.name in models and (st.spec.condition_on is None or st.spec.condition_on in
                                            {c.spec.name for c in chain}):
                chain.append(st)
            else:
                echo(f"stage {st.spec.name} not sampled: it or a stage it conditions on is not trained "
                     f"yet (cdmbench run RECIPE --stage NAME)")
        if chain:
            _sample_and_report(recipe, run_dir, chain, models, steps, dataset, device, progress, echo, loggers)
        echo(write_report(run_dir, recipe, plugins))
        return run_dir.path
    finally:
        loggers.close()


def _report_bpd(recipe: Recipe, run_dir: RunDir, st: StageModel, model, plugins: Plugins,
                device, progress: bool, echo, loggers: Loggers) -> None:
    """The validation bound of the stage's final weights, unless results.jsonl holds it (for the
    same weights, T, number of images asked for and an SR stage's sampling levels, at which its
    ground-truth inputs are augmented): it samples all T steps per image."""
    spec = st.spec.train
    checkpoints = run_dir.stage(st.spec.name) / "checkpoints"
    protocol = {"split": "test", "bound": "VLB, all T steps", "T": st.process.T, "checkpoint_step": spec.steps,
                "weights": ema_weights_sha256(checkpoints, spec.steps), "val_bpd_images": spec.val_bpd_images}
    if st.low_res:  # the sampling levels (as in evaluation samples' signature)
        protocol["levels"] = [p.level for p in getattr(st.augmentation, "parts", [st.augmentation])
                              if hasattr(p, "level")]
    if any(row.get("protocol") == protocol for row in _recorded(run_dir, st.spec.name, "val_bpd")):
        return
    resolutions = [st.spec.resolution] + ([st.low_res] if st.low_res else [])
    test = split_images(recipe, make_dataset(plugins, recipe, "test"), "test", resolutions,
                        limit=spec.val_bpd_images, progress=progress, echo=echo)
    bpd = validation_bpd(st, model, test, seed=recipe.seed, device=device, progress=progress)
    rows = [result_row(run=recipe.name, stage=st.spec.name, metric="val_bpd", value=bpd, unit="bits/dim",
                       n=len(test), higher_is_better=False, protocol=protocol)]
    run_dir.add_results(rows)
    loggers.log_results(rows, {st.spec.name: spec.steps})


def _sample_and_report(recipe: Recipe, run_dir: RunDir, chain: list[StageModel], models: dict[str, Any],
                       steps: dict[str, int], dataset, device, progress: bool, echo, loggers: Loggers) -> None:
    """Sample the grids and record each stage's sampling time, both logged too; nothing when every
    grid is there and results.jsonl holds the rows of these checkpoints and settings (a finished run
    again)."""
    spec = recipe.sample
    classes = dataset.num_classes if spec.num_classes is None else min(spec.num_classes, dataset.num_classes)
    labels = torch.arange(classes).repeat_interleave(spec.images_per_class)
    protocols = {st.spec.name: {  # the signature: what determines the pixels (as evaluation samples')
        "sampler": st.spec.sampler.name, "sampler_args": json.loads(json.dumps(st.spec.sampler.args)),
        "precision": st.sample_precision, "device": str(device), "batch_size": spec.batch_size,
        "checkpoint_steps": {s.spec.name: steps[s.spec.name] for s in chain_to(chain, st.spec.name)},
        "signature": digest(sample_signature(chain_to(chain, st.spec.name), run_path=run_dir.path,
                                             checkpoint_steps=steps, seed=spec.seed, num_classes=classes), 12)}
        for st in chain}
    grids = {st.spec.name: run_dir.stage(st.spec.name) / "samples" / "grid.png" for st in chain}
    if all(grids[name].exists() and any(row.get("n") == len(labels) and row.get("protocol") == protocols[name]
                                        for row in _recorded(run_dir, name, "sample_time")) for name in grids):
        for name, path in grids.items():
            echo(f"{name}: {path} (sampled before with these checkpoints and settings)")
        return
    images, seconds = sample_cascade(chain, models, labels, seed=spec.seed,
                                     batch_size=spec.batch_size, device=device, progress=progress)
    rows = []
    for st in chain:
        name = st.spec.name
        path = save_grid(images[name], labels, dataset.class_names, grids[name])
        loggers.log_image(name, "samples", path, steps[name])
        echo(f"{name}: {path}")
        rows.append(result_row(run=recipe.name, stage=name, metric="sample_time", value=seconds[name],
                               unit="s", n=len(labels), higher_is_better=False, protocol=protocols[name]))
    run_dir.add_results(rows)
    loggers.log_results(rows, steps)


