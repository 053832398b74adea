"""``run``: validate a recipe, build every stage, train, sample the cascade, write results."""

from __future__ import annotations

import copy
import json
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from .bench import network_flops
from .cache import default_cache_dir, digest
from .cascade import StageModel, build_stage, make_component, sample_cascade
from .checkpoint import list_checkpoints, load_ema
from .errors import CdmbenchError, RecipeError, Stopped
from .files import atomic_write, locked
from .findings import findings_section
from .grids import save_grid
from .plugins import Plugins
from .prepare import make_dataset, recipe_classes, split_images
from .recipe import Component, Recipe, check_component, load_recipe, parse_recipe
from .report import (baseline_frame, comparison_table, flat_results, plot_sweeps, plot_training, read_results,
                     replicates_table, results_table, sweep_table, training_table)
from .rundir import SAMPLING_KEYS, RunDir, recipe_difference, result_row
from . import distributed
from .evaluate import (EvalContext, SampleSet, generate_samples, generate_training_set, load_chain, read_samples,
                       read_training_set)
from .sweep import apply_manifest, set_checked_level
from .train import check_batch, read_log, train_stage, validation_bpd

# How long a rank of an evaluation under torchrun waits for the others at a collective: ranks
# finish their shares of a million-image training set for CAS hours apart.
SHARDS_WAIT = timedelta(days=7)


def resolve_device(name: str) -> torch.device:
    """The recipe's device; under torchrun, "cuda"/"auto" mean this process's GPU (LOCAL_RANK)."""
    local = os.environ.get("LOCAL_RANK")
    if name in ("auto", "cuda") and local is not None and torch.cuda.is_available():
        torch.cuda.set_device(int(local))
        return torch.device(f"cuda:{local}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CdmbenchError(f"device '{name}' requested but CUDA is not available; set device: cpu "
                            "or auto (--set device=auto)")
    return torch.device(name)


def _build_all(plugins: Plugins, recipe: Recipe, num_classes: int, device) -> list[StageModel]:
    return [build_stage(plugins, recipe, s, num_classes=num_classes, device=device)
            for s in recipe.stages]


def build_chain(plugins: Plugins, recipe: Recipe, target: str, num_classes: int, device) -> list[StageModel]:
    """The stages that produce ``target``'s samples, base first, and only those: evaluating the
    middle stage of a cascade does not build (or hold in memory) the last."""
    names = [recipe.stage(target).name]
    while recipe.stage(names[0]).condition_on is not None:
        names.insert(0, recipe.stage(names[0]).condition_on)
    return [build_stage(plugins, recipe, recipe.stage(name), num_classes=num_classes, device=device)
            for name in names]


def describe(recipe: Recipe, plugins: Plugins, echo=print) -> pd.DataFrame:
    """Build every stage on the meta device (no memory, no data): parameters, FLOPs of a forward
    pass and of a training pass (forward + backward, with the recomputation when gradient
    checkpointing is on) for one image, and the whole training run's FLOPs (training pass x
    batch x steps). The class count (class-embedding parameters)
    is known for Hub ids, else read from the dataset (``recipe_classes``)."""
    num_classes, source = recipe_classes(recipe.to_dict(), plugins)
    echo(f"class embeddings for {num_classes} classes ({source})")
    rows = []
    stages = _build_all(plugins, recipe, num_classes, "meta")
    for st in stages:
        flops = network_flops(st)
        spec = st.spec.train
        rows.append({"stage": st.spec.name, "resolution": st.spec.resolution, "condition_on": st.spec.condition_on or "-",
                     "backbone": st.spec.backbone.name,
                     "parameters": sum(p.numel() for p in st.backbone.parameters()),
                     "GFLOP/forward": flops[0] / 1e9, "GFLOP/train image": flops[1] / 1e9,
                     "T": "continuous" if st.process.continuous else st.process.T, "train steps": spec.steps,
                     "batch": spec.batch_size, "train EFLOP": flops[1] * spec.batch_size * spec.steps / 1e18})
    return pd.DataFrame(rows).set_index("stage")


def _final_step_done(folder: Path, steps: int) -> bool:
    ckpts = list_checkpoints(folder / "checkpoints")
    return bool(ckpts) and int(ckpts[-1].name.split("-")[1]) >= steps


def run(recipe_path: str | Path, *, out: str | Path | None = None, stage: str | None = None,
        overrides: tuple[str, ...] | list[str] = (), dry_run: bool = False,
        progress: bool = True, smoke: bool = False, echo=print) -> Path | pd.DataFrame:
    """Train the recipe's stages (or just ``stage``), sample the cascade, write results.

    ``smoke``: run a shrunk copy on generated stand-in data (``cdmbench.smoke``).
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
    stages = _build_all(plugins, recipe, dataset.num_classes, "meta")  # every stage checked before the data
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


def _fmt(frame: pd.DataFrame) -> str:
    return frame.to_string(float_format=lambda v: f"{v:.4g}")


def write_report(run_dir: RunDir, recipe: Recipe, plugins: Plugins) -> str:
    """report.md: the run's results, for metrics with published rows the comparison with them,
    the sample-time level sweeps (table and sweeps.png), CDM's augmentation findings checked on
    the rows (``findings``), training (table and training.png) and each stage's sample grid. Returns the results table as text."""
    results = read_results([run_dir.path])
    measured = results_table(results)
    table = _fmt(measured)
    text = f"# {recipe.name}\n\n```text\n{table}\n```\n"
    groups = recipe.replicates()
    runs = replicates_table(measured, groups)
    if not runs.empty:
        text += ("\n## Stages trained several times\n\nEach metric's mean over a stage's training "
                 "runs (`replicates: k`) and, as ±, its standard error over them (their standard "
                 "deviation over sqrt(runs); CDM's findings below take no less than the FID "
                 f"bootstrap's share).\n\n```text\n{_fmt(runs)}\n```\n")
    compared = comparison_table(results, baseline_frame(plugins))
    if not compared.empty:
        other_data = compared["comparable"].str.startswith("no: published rows are on")
        text += "\n## Beside published results\n\n"
        if other_data.all():  # one sentence instead of a row per metric
            text += f"None: {compared['comparable'].iloc[0].removeprefix('no: ')}.\n"
        else:
            text += ("A pair is comparable only when dataset, resolution, metric and protocol "
                     "(feature network, mode, n, reference split) match.\n\n"
                     f"```text\n{compared[~other_data].to_string(index=False)}\n```\n")
    sweeps = sweep_table(results)
    if not sweeps.empty:
        plot_sweeps(sweeps, run_dir.path / "sweeps.png", groups)
        swept = set(sweeps.index.get_level_values("stage"))
        shared_panel = any(len(swept.intersection(names)) > 1 for names in groups.values())
        text += ("\n## Sampling-level sweeps\n\nEach SR stage evaluated at sampling-time "
                 "augmentation levels s, on the previous stage's samples (generated) and on "
                 "downsampled training images (ground-truth); `cdmbench sweep`."
                 + (" In the plot a stage trained several times shares its panel with its swept "
                    "copies: each run's curve faint, their mean bold (± as in CDM's findings below)."
                    if shared_panel else "")
                 + f"\n\n```text\n{_fmt(sweeps)}\n```\n\n![metrics against s](sweeps.png)\n")
    text += findings_section(results, recipe)
    logs = {st.name: log for st in recipe.stages if (log := read_log(run_dir.stage(st.name)))}
    if logs:
        plot_training(logs, run_dir.path / "training.png")
        text += ("\n## Training\n\nThe last row of each stage's train_log.jsonl: loss and images/s "
                 "over its last log window, training time across resumes.\n\n"
                 f"```text\n{_fmt(training_table(logs))}\n```\n\n![training loss](training.png)\n")
    grids = [st.name for st in recipe.stages if (run_dir.path / st.name / "samples" / "grid.png").exists()]
    if grids:
        text += "\n## Samples\n\nOne row per class.\n\n" + "".join(
            f"**{name}**\n\n![{name}]({name}/samples/grid.png)\n\n" for name in grids)
    atomic_write(run_dir.path / "report.md", text)
    return table


def export_report(run_path: str | Path, out: str | Path) -> Path:
    """Write a run's report.md afresh from its results (concurrent jobs on one run may have left
    an older one) and copy it with the figures it links (sweeps.png, grids) to ``out``, e.g.
    reports/<name>/ for committing."""
    import shutil

    run_dir, recipe, plugins = load_run(run_path)
    run_path, out = run_dir.path, Path(out)
    if not run_dir.results_path.is_file():
        raise CdmbenchError(f"{run_path} has no results yet; run `cdmbench run` or `cdmbench evaluate` first")
    write_report(run_dir, recipe, plugins)
    out.mkdir(parents=True, exist_ok=True)
    text = (run_path / "report.md").read_text()
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        (out / link).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_path / link, out / link)
    shutil.copyfile(run_path / "results.jsonl", out / "results.jsonl")
    flat_results(read_results([run_path])).to_csv(out / "results.csv", index=False)
    (out / "report.md").write_text(text)
    return out / "report.md"


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


def evaluate(run_path: str | Path, *, stage: str | None = None, metrics: list[str] | None = None,
             num_samples: int | None = None, overrides: tuple[str, ...] | list[str] = (),
             progress: bool = True, echo=print) -> list[dict[str, Any]]:
    """Generate (or reuse) samples of a trained run and evaluate ``metrics`` on them; the rows go
    into the run's results.jsonl and report.md. Feature networks are loaded before sampling."""
    run_dir, recipe, plugins, dataset, chain, context, built = _evaluation_setup(
        run_path, stage, metrics, overrides, progress, echo)
    spec = recipe.evaluate
    target, resolution, n = context.stage, context.resolution, num_samples or spec.num_samples
    device = context.device
    rank, world, steps = _join_and_load(chain, run_dir.path, context, built)
    sampling = dict(run_path=run_dir.path, checkpoint_steps=steps, num_classes=dataset.num_classes,
                    seed=recipe.sample.seed, batch_size=spec.batch_size, shard_size=spec.shard_size,
                    device=device, progress=progress, rank=rank, world_size=world)
    folder, signature = generate_samples(chain, num_samples=n, **sampling)
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
        context.training_set = SampleSet(images, labels, protocol={
            "n": len(labels), "seeds": f"sample seed {recipe.sample.seed}, images 0..{len(labels) - 1}",
            "samples": str(training_set.relative_to(run_dir.path)), "signature": training_set.name})
    if rank != 0:  # the metrics that train on every rank (their rows are rank 0's)
        for metric in [m for m in built if getattr(m, "all_ranks", False)]:
            metric.evaluate(context)
        return []
    context.samples, context.labels = read_samples(folder, n)
    context.protocol = {"dataset": getattr(dataset, "benchmark", recipe.data.name), "resolution": resolution,
                        "n": n, "seeds": f"sample seed {recipe.sample.seed}, images 0..{n - 1}",
                        "samples": str(folder.relative_to(run_dir.path)), "signature": digest(signature, 12),
                        "samplers": samplers_of(chain)}
    rows = []
    for metric in built:  # each metric's rows are kept as soon as they exist
        rows += (done := [result_row(run=recipe.name, stage=target, **row)
                          for row in _metric_rows([metric], context, echo)])
        run_dir.add_results(done)
    echo(write_report(run_dir, recipe, plugins))
    return rows


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


def _metric_rows(built: list, context, echo) -> list[dict[str, Any]]:
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


def sweep_levels(run_path: str | Path, *, stage: str, levels: list[float], inputs: list[str],
                 metrics: list[str] | None = None, num_samples: int | None = None,
                 overrides: tuple[str, ...] | list[str] = (), progress: bool = True,
                 echo=print) -> dict[str, Any]:
    """Evaluate SR ``stage`` at each sampling level on generated and/or ground-truth inputs;
    record every row and write the best level (by the first metric) to the run's manifest."""
    from .sweep import MANIFEST, best_levels, sweep

    run_dir, recipe, plugins, dataset, chain, context, built = _evaluation_setup(
        run_path, stage, metrics, overrides, progress, echo)
    st = recipe.stage(stage)
    if st.condition_on is None:
        raise CdmbenchError(f"stage {stage} is a base stage; sweep an SR stage (one with condition_on)")
    replacing = [m for m in built if getattr(m, "replaces_training_set", False)]
    if replacing:  # a whole training set of samples per level
        echo("sweep: not computing cas with replace_training_set (the paper's protocol) at each level; "
             "run cdmbench evaluate at the level the sweep chooses")
        built = [m for m in built if m not in replacing]
        if not built:
            raise CdmbenchError("no metric to sweep: pass --metrics fid,is, or --set evaluate.metrics=[...] "
                                "with a cas without paper_protocol and replace_training_set")
    for level in levels:  # the cheap checks and the checkpoints before the metrics' preparation
        set_checked_level(chain, stage, level, f"--levels {level}")
    rank, world, steps = _join_and_load(chain, run_dir.path, context, built)
    n = num_samples or recipe.evaluate.num_samples
    context.protocol = {"dataset": getattr(dataset, "benchmark", recipe.data.name),
                        "resolution": st.resolution, "n": n,
                        "seeds": f"sample seed {recipe.sample.seed}, images 0..{n - 1}",
                        "samplers": samplers_of(chain)}
    rows = sweep(chain, name=stage, levels=levels, inputs=inputs, context=context,
                 metric_rows=lambda ctx: _metric_rows(built, ctx, echo), run_path=run_dir.path,
                 num_samples=n, seed=recipe.sample.seed, batch_size=recipe.evaluate.batch_size,
                 shard_size=recipe.evaluate.shard_size, device=context.device, checkpoint_steps=steps,
                 progress=progress, rank=rank, world_size=world,
                 record=lambda level_rows: run_dir.add_results(
                     [result_row(run=recipe.name, stage=stage, **row) for row in level_rows]))
    if rank != 0:
        return {}
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


def samplers_of(chain: list[StageModel]) -> dict[str, str]:
    """Each stage's sampler as it goes into a result's protocol, e.g. {"sr32": "ddim {'steps': 50}"},
    with ", bf16" when its network samples in bf16."""
    return {st.spec.name: f"{st.spec.sampler.name} {st.spec.sampler.args}".strip()
            + (", bf16" if st.sample_precision == "bf16" else "") for st in chain}


def load_run(run_path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> tuple[RunDir, Recipe, Plugins]:
    """A run directory and the recipe it was trained with (from run.yaml), with ``overrides`` of
    sampling settings only: those of the trained weights are refused."""
    run_dir = RunDir(Path(run_path))
    run_yaml = run_dir.path / "run.yaml"
    if not run_yaml.is_file():
        raise CdmbenchError(f"{run_dir.path} is not a run directory (no run.yaml); give the folder "
                            "that cdmbench run wrote (runs/<recipe name>)")
    raw = yaml.safe_load(run_yaml.read_text())["recipe"]
    trained, _ = parse_recipe(copy.deepcopy(raw))
    recipe, plugins = parse_recipe(raw, overrides=overrides)
    difference = recipe_difference(trained.to_dict(), recipe.to_dict(), SAMPLING_KEYS)
    if difference:
        raise CdmbenchError(f"{run_dir.path} was trained with a different recipe ({difference}); "
                            "sampling and evaluation may only change sampling settings (sample, "
                            "evaluate, device, plugins, data.args, and each stage's sampler, "
                            "guidance.scale and augmentation level)")
    return run_dir, recipe, plugins


def apply_sweep_levels(stages: list[StageModel], run_path: Path,
                       overrides: tuple[str, ...] | list[str]) -> None:
    """The levels a sweep chose (cascade.json), except on stages whose level ``overrides`` set:
    the recipe's level, then cascade.json's, then --set's."""
    keys = [o.partition("=")[0].split(".") for o in overrides]
    explicit = {k[1] for k in keys if len(k) > 3 and k[0] == "stages" and k[2] == "augmentation"
                and k[-1] == "level"}
    apply_manifest([st for st in stages if st.spec.name not in explicit], run_path)


def _evaluation_setup(run_path, stage, metrics, overrides, progress, echo):
    """Recipe, the stages up to the evaluated one (with a sweep's chosen levels), an EvalContext
    and the metrics of a run."""
    run_dir, recipe, plugins = load_run(run_path, overrides)
    dataset, context, built = _metrics_setup(recipe, plugins, stage, metrics, progress, echo)
    stages = build_chain(plugins, recipe, context.stage, dataset.num_classes, context.device)
    apply_sweep_levels(stages, run_dir.path, overrides)
    return run_dir, recipe, plugins, dataset, stages, context, built


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
    context = EvalContext(samples=None, labels=None, num_classes=dataset.num_classes,
                          resolution=recipe.stage(target).resolution, recipe=recipe, plugins=plugins,
                          device=resolve_device(recipe.device), cache_dir=default_cache_dir(), protocol={},
                          progress=progress, stage=target, echo=echo)
    built = [make_component(plugins, "metrics", m, f"metrics.{m.name}") for m in chosen]
    return dataset, context, built


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


def _breakdown_tables(breakdowns: dict[str, dict[str, Any]]) -> str:
    """Markdown: ms per step by phase, by operator kind and by heaviest operator, one column per
    measured variant (backbone, eager or compiled)."""
    def table(key: str) -> str:
        frame = pd.DataFrame({what: b[key] for what, b in breakdowns.items()}).fillna(0.0)
        return _fmt(frame.rename_axis(key))

    profiled = ", ".join(sorted({b["profiled"] for b in breakdowns.values()}))
    return ("\n## Where a training step's time goes (ms per step)\n\n"
            "Phases are timed one at a time with the device synchronised around each, so they add "
            "up to a little more than a step. Forward + backward by operator kind and its heaviest "
            f"operators come from torch.profiler ({profiled}).\n\n"
            + "".join(f"```text\n{table(key)}\n```\n\n" for key in ("phases", "kinds", "top")))


def bench(recipe_path: str | Path, *, stage: str, overrides: tuple[str, ...] | list[str] = (),
          steps: int = 10, warmup: int = 3, compile: bool | None = None,
          out: str | Path = "reports/bench", command: str = "", backbones: list[str] | None = None,
          smoke: bool = False, profile: bool = False, echo=print) -> Path:
    """Measure ``stage``'s training step and the cascade's sampling on this device; writes
    <out>/<recipe>-<stage>-<device>.md and .json. Touches no data (synthetic batches).
    ``backbones``: measure the training step with each of these backbones (the stage's args),
    side by side. ``profile``: add where each training step's time goes (``time_breakdown``)."""
    from .bench import denoiser_speed, environment, matmul_ceiling, training_speed

    recipe, plugins = load_recipe(recipe_path, overrides=overrides, smoke=smoke, echo=echo)
    recipe.stage(stage)
    device = resolve_device(recipe.device)
    num_classes, _ = recipe_classes(recipe.to_dict(), plugins)  # synthetic batches: no data needed
    stages = build_chain(plugins, recipe, stage, num_classes, device)
    target = stages[-1]
    variants = {}  # backbone name -> the stage built with it (validated before any timing)
    flops = {}  # backbone name -> FLOPs of a training image (counted once, on the meta device)
    for name in backbones or [target.spec.backbone.name]:
        swapped, _ = load_recipe(recipe_path, overrides=[*overrides, f"stages.{stage}.backbone.name={name}"],
                                 plugins=plugins, smoke=smoke, echo=lambda *_: None)
        variants[name] = target if name == target.spec.backbone.name else build_stage(
            plugins, swapped, swapped.stage(stage), num_classes=num_classes, device=device)
        flops[name] = network_flops(build_stage(plugins, swapped, swapped.stage(stage), num_classes=num_classes,
                                                device="meta"))[1]
    ceiling, ceiling_kind = matmul_ceiling(device)
    env = {**environment(device), "ceiling": f"{ceiling / 1e12:.2f} TFLOP/s ({ceiling_kind}, measured)",
           "precision": target.spec.train.precision, "channels_last": str(target.spec.train.channels_last),
           "gradient_checkpointing": str(target.spec.train.gradient_checkpointing),
           "cudnn_benchmark": str(target.spec.train.cudnn_benchmark),
           "command": command or f"cdmbench bench {recipe_path} --stage {stage}"}
    tag = env["device"].split(" (")[0].replace(" ", "-").lower()
    path = Path(out) / f"{recipe.name}-{stage}-{tag}.md"
    rows, breakdowns = [], {}

    def write() -> str:
        """The figures so far, so that a bench cut short (a compile that outlasts a job's
        time) keeps what it measured."""
        table = _fmt(pd.DataFrame(rows).set_index("what"))
        warning = ("\nMFU above 100%: the ceiling was measured below the device's peak (another job "
                   "busy on it?); rerun on an idle device.\n" if any(r.get("MFU", 0) > 1 for r in rows) else "")
        where = _breakdown_tables(breakdowns) if breakdowns else ""
        atomic_write(path, f"# bench: {recipe.name}, stage {stage}\n\n"
                     + "".join(f"- {k}: {v}\n" for k, v in env.items())
                     + "\nMFU = FLOP/image (the network's forward + backward, FlopCounterMode on the meta device) x images/s / ceiling.\n\n"
                     f"```text\n{table}\n```\n" + warning + where)
        atomic_write(path.with_suffix(".json"), json.dumps(
            {"environment": env, "rows": rows, "breakdown": breakdowns}, indent=1, default=str))
        return table + warning + ("\n" + where if where else "")

    modes = [False, True] if (device.type == "cuda" if compile is None else compile) else [False]
    for name, variant in variants.items():
        for compiled in modes:
            what = f"{name} ({'compiled' if compiled else 'eager'})"
            echo(f"measuring train {stage} {what}")
            speed = training_speed(variant, num_classes=num_classes, device=device, steps=steps,
                                   warmup=warmup, compile=compiled, profile=profile)
            achieved = flops[name] * speed["images_per_s"]
            if profile:
                breakdowns[what] = speed["breakdown"]
            rows.append({"what": f"train {stage} {what}",
                         "batch": variant.spec.train.batch_size, "images/s": speed["images_per_s"],
                         "GFLOP/image": flops[name] / 1e9, "TFLOP/s": achieved / 1e12,
                         "MFU": achieved / ceiling, "peak GiB": speed["peak_memory_gib"],
                         "parameters (M)": sum(p.numel() for p in variant.backbone.parameters()) / 1e6})
            echo(f"  {speed['images_per_s']:.1f} img/s, MFU {achieved / ceiling:.1%} (written: {path})")
            write()
    seconds_per_image = 0.0
    batch = recipe.sample.batch_size
    for st, after in zip(stages, [*stages[1:], None]):
        evals = denoiser_speed(st, num_classes=num_classes, device=device, batch_size=batch, repeats=3)
        stop = after.truncation if after else 0.0  # a truncated next stage takes z_s: fewer steps
        per_image = st.process.grid(st.sampler.steps, stop).steps * (1 if st.spec.guidance.scale == 1 else 2)
        seconds_per_image += per_image / evals
        rows.append({"what": f"sample {st.spec.name} ({per_image} evaluations/image, {st.sample_precision})",
                     "batch": batch, "images/s": evals / per_image})
    rows.append({"what": f"sample cascade to {stage}", "batch": batch, "images/s": 1 / seconds_per_image})
    echo(write())
    echo(f"written: {path}")
    return path
