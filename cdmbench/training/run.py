"""`cdmbench run`: validate a recipe, build every stage, train the stages this job trains,
sample the cascade into grids and write the results and report.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from cdmbench.cascade.cost import describe
from cdmbench.cascade.grids import save_grid
from cdmbench.cascade.stages import StageModel, build_all, build_stage, sample_cascade
from cdmbench.data.prepare import make_dataset, split_images
from cdmbench.errors import CdmbenchError, RecipeError
from cdmbench.evaluation.sweep import apply_sweep_levels
from cdmbench.plugins import Plugins
from cdmbench.recipe.load import load_recipe
from cdmbench.recipe.schema import Recipe
from cdmbench.reporting.write import write_report
from cdmbench.runtime import distributed
from cdmbench.runtime.device import resolve_device
from cdmbench.storage.rundir import RunDir, result_row
from cdmbench.training.checkpoint import list_checkpoints, load_ema
from cdmbench.training.trainer import check_batch, read_log, train_stage, validation_bpd


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
    if main:
        run_dir.prepare(recipe, plugins, dataset.class_names)
    distributed.barrier()
    echo(f"run directory: {run_dir.path}  (device: {device}, processes: {distributed.world_size()})")

    def materialise(i: int) -> StageModel:
        """Stage i on the device (only the stages this job trains or samples take its memory)."""
        stages[i] = build_stage(plugins, recipe, stages[i].spec, num_classes=dataset.num_classes, device=device)
        apply_sweep_levels(stages[i:i + 1], run_dir.path, overrides)
        return stages[i]

    data = None
    models: dict[str, torch.nn.Module] = {}
    metadata = {"recipe": recipe.to_dict()}
    for i, st in enumerate(stages):
        folder = run_dir.stage(st.spec.name)
        if stage in (None, st.spec.name):
            st = materialise(i)
            if data is None:
                data = split_images(recipe, dataset, "train", progress=progress, echo=echo)
            models[st.spec.name] = train_stage(st, data, folder=folder, seed=recipe.seed,
                                               metadata={**metadata, "stage": st.spec.name},
                                               device=device, progress=progress, echo=echo)
            log = read_log(folder) if main else []
            if log:
                run_dir.add_results([
                    result_row(run=recipe.name, stage=st.spec.name, metric="train_loss",
                               value=log[-1]["loss"], unit="", n=log[-1]["step"],
                               higher_is_better=False, protocol={"loss": st.spec.loss}),
                    result_row(run=recipe.name, stage=st.spec.name, metric="train_throughput",
                               value=log[-1]["images_per_s"], unit="img/s", n=log[-1]["step"],
                               higher_is_better=True, protocol={"device": str(device)})])
            if st.spec.train.val_bpd_images and main:
                _report_bpd(recipe, run_dir, st, models[st.spec.name], plugins, device, progress, echo)

    if not main:  # the other processes only train
        return run_dir.path
    for i, st in enumerate(stages):  # stages trained by earlier jobs, loaded now for sampling
        folder = run_dir.stage(st.spec.name)
        if st.spec.name not in models and _final_step_done(folder, st.spec.train.steps):
            st = materialise(i)
            load_ema(folder / "checkpoints", st.backbone)
            models[st.spec.name] = st.backbone.eval()
    chain = []
    for st in stages:
        if st.spec.name in models and (st.spec.condition_on is None or st.spec.condition_on in
                                        {c.spec.name for c in chain}):
            chain.append(st)
        else:
            echo(f"stage {st.spec.name} not sampled: it or a stage it conditions on is not trained "
                 f"yet (cdmbench run RECIPE --stage NAME)")
    if chain:
        _sample_and_report(recipe, run_dir, chain, models, dataset, device, progress, echo)
    echo(write_report(run_dir, recipe, plugins))
    return run_dir.path


def _report_bpd(recipe: Recipe, run_dir: RunDir, st: StageModel, model, plugins: Plugins,
                device, progress: bool, echo) -> None:
    resolutions = [st.spec.resolution] + ([st.low_res] if st.low_res else [])
    test = split_images(recipe, make_dataset(plugins, recipe, "test"), "test", resolutions,
                        limit=st.spec.train.val_bpd_images, progress=progress, echo=echo)
    bpd = validation_bpd(st, model, test, seed=recipe.seed, device=device, progress=progress)
    run_dir.add_results([result_row(
        run=recipe.name, stage=st.spec.name, metric="val_bpd", value=bpd, unit="bits/dim",
        n=len(test), higher_is_better=False,
        protocol={"split": "test", "bound": "VLB, all T steps", "T": st.process.T})])


def _sample_and_report(recipe: Recipe, run_dir: RunDir, chain: list[StageModel],
                       models: dict[str, Any], dataset, device, progress: bool, echo) -> None:
    spec = recipe.sample
    classes = dataset.num_classes if spec.num_classes is None else min(spec.num_classes, dataset.num_classes)
    labels = torch.arange(classes).repeat_interleave(spec.images_per_class)
    images, seconds = sample_cascade(chain, models, labels, seed=spec.seed,
                                     batch_size=spec.batch_size, device=device, progress=progress)
    rows = []
    for st in chain:
        name = st.spec.name
        path = save_grid(images[name], labels, dataset.class_names,
                         run_dir.stage(name) / "samples" / "grid.png")
        echo(f"{name}: {path}")
        rows.append(result_row(run=recipe.name, stage=name, metric="sample_time", value=seconds[name],
                               unit="s", n=len(labels), higher_is_better=False,
                               protocol={"sampler": st.spec.sampler.name,
                                         "sampler_args": json.loads(json.dumps(st.spec.sampler.args)),
                                         "precision": st.sample_precision, "device": str(device),
                                         "batch_size": spec.batch_size}))
    run_dir.add_results(rows)


