"""The ``cdmbench`` command line; each command is a thin call into the API."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cdmbench.errors import CdmbenchError
from cdmbench.hookspecs import KINDS

SET_HELP = "Override a recipe value, e.g. --set stages.base16.train.steps=10 (repeatable)."
SMOKE_HELP = ("Shrink the recipe (widths, depths, steps, sample counts) and swap its data for "
              "generated shapes with the same resolutions and class count, to run every stage "
              "end to end on a CPU in minutes (run directory runs/<name>-smoke; --set still wins).")


class Group(click.Group):
    """Prints CdmbenchError messages, and a write that failed for space, permissions or a read-only
    file system, without a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CdmbenchError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            ctx.exit(2)
        except OSError as exc:  # a full disk, permissions, a read-only file system: the file, cause and fix
            from cdmbench.storage.files import write_failure

            failure = write_failure(exc)
            if failure is None:
                raise
            click.secho(f"error: {failure[1]} and run the same command again: what was finished (checkpoints, "
                        "prepared shards, samples, results) is kept and reused", fg="red", err=True)
            ctx.exit(2)


@click.group(cls=Group)
@click.version_option(package_name="cdmbench")
def cli():
    """Build, train, sample and evaluate Cascaded Diffusion Models from plugins."""


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--stage", help="Train only this stage (stages are independent jobs).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--dry-run", is_flag=True, help="Validate, build every model and print parameters "
                                              "and FLOPs; touch no data and write nothing.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory (default: runs/<recipe name>). Re-running resumes it.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
@click.option("--smoke", is_flag=True, help=SMOKE_HELP)
def run(recipe, stage, overrides, dry_run, out, progress, smoke):
    """Train every stage of RECIPE (resuming from the latest checkpoints), sample the cascade
    into per-stage grids and write results.jsonl and report.md."""
    from cdmbench.training.run import run as run_recipe

    result = run_recipe(recipe, out=out, stage=stage, overrides=overrides, dry_run=dry_run,
                        progress=progress, smoke=smoke, echo=click.echo)
    if dry_run:
        click.echo(_format(result))


@cli.command()
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--cluster", type=click.Choice(["slurm", "local"]), help="Where the jobs run (default: launch.cluster).")
@click.option("--stage", "stages", multiple=True, help="Train only this stage (repeatable; default: all, then sample).")
@click.option("--evaluate", is_flag=True, help="Also (a run directory: only) evaluate: sample shards as an array "
                                              "of launch.eval_array jobs, then the metrics as a job after them.")
@click.option("--metrics", help="With --evaluate: comma-separated metric names (default: evaluate.metrics).")
@click.option("--eval-stage", help="With --evaluate: the stage whose samples are evaluated (default: the last).")
@click.option("--num-samples", type=click.IntRange(min=1),
              help="With --evaluate: samples (default: evaluate.num_samples).")
@click.option("--nodes", type=click.IntRange(1, 10**4), help="Nodes per training job (default: launch.nodes).")
@click.option("--gpus-per-node", type=click.IntRange(0, 64),
              help="GPUs per node, one process each (default: launch.gpus_per_node).")
@click.option("--partition", help="SLURM partition (default: launch.partition).")
@click.option("--account", help="SLURM account (default: launch.account).")
@click.option("--time", help="Time limit per job, MINUTES, HH:MM:SS or D-HH:MM:SS (default: launch.time).")
@click.option("--signal", help="Signal to checkpoint and requeue on, e.g. USR2 (default: launch.signal).")
@click.option("--grace", "grace_s", type=click.IntRange(10, 86400),
              help="Seconds between that signal and the time limit (default: launch.grace_s).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--smoke", is_flag=True, help=SMOKE_HELP)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run directory (default: runs/<name>).")
@click.option("--dry-run", is_flag=True, help="Print the sbatch scripts (local: the jobs); submit nothing.")
def launch(target, cluster, stages, evaluate, metrics, eval_stage, num_samples, nodes, gpus_per_node, partition,
           account, time, signal, grace_s, overrides, smoke, out, dry_run):
    """Submit TARGET (a recipe: one job per stage, then the cascade's sampling after them; a run
    directory with --evaluate: its evaluation) through submitit to SLURM or this machine. Unset
    options come from the recipe's launch: block, then ~/.config/cdmbench/launch.yaml."""
    from cdmbench.launch.plan import launch as launch_jobs

    options = dict(cluster=cluster, nodes=nodes, gpus_per_node=gpus_per_node, partition=partition, account=account,
                   time=time, signal=signal, grace_s=grace_s)
    names = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    result = launch_jobs(target, stages=list(stages), evaluate=evaluate, metrics=names, eval_stage=eval_stage,
                         num_samples=num_samples, overrides=overrides, smoke=smoke, out=out, options=options,
                         dry_run=dry_run, echo=click.echo)
    if dry_run:
        click.echo(result)


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
def status(run_dir):
    """Show where RUN_DIR stands, from its files alone: each stage's step, last checkpoint, images/s
    and time left; each evaluation's sample shards; the jobs cdmbench launch submitted."""
    from cdmbench.launch.status import format_status
    from cdmbench.launch.status import status as run_status

    click.echo(format_status(run_status(run_dir)))


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True,
              help="The dataset split to prepare.")
@click.option(
    "--workers", type=click.IntRange(min=0), help="Processes (default: one per CPU the job may use; 0: none)."
)
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Images per shard, the unit of work and of resuming.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.option("--metrics", "metrics_of", metavar="STAGE",
              help="Also make what evaluate.metrics need for STAGE's samples (feature classifier, "
                   "reference statistics), e.g. while the stages train.")
@click.option("--smoke", is_flag=True, help=SMOKE_HELP)
def prepare(recipe, overrides, split, workers, shard_size, progress, metrics_of, smoke):
    """Preprocess RECIPE's data once (centre crop, area downsampling to every resolution of the
    cascade) into memory-mapped uint8 arrays under $CDMBENCH_DATA_CACHE (default
    ~/.cache/cdmbench/datasets); resumable. `cdmbench run` then trains from them and evaluation
    reads them (prepare --split test too)."""
    from cdmbench.data.prepare import prepare as prepare_data
    from cdmbench.evaluation.evaluate import prepare_metrics

    prepare_data(recipe, overrides=overrides, split=split, workers=workers, shard_size=shard_size,
                 progress=progress, smoke=smoke, echo=click.echo)
    if metrics_of:
        prepare_metrics(recipe, overrides=overrides, stage=metrics_of, progress=progress, smoke=smoke,
                        echo=click.echo)


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--smoke", is_flag=True, help=SMOKE_HELP)
def validate(recipe, overrides, smoke):
    """Check RECIPE strictly and build every stage's model (without memory or data)."""
    from cdmbench.cascade.cost import describe
    from cdmbench.recipe.load import load_recipe

    parsed, plugins = load_recipe(recipe, overrides=overrides, smoke=smoke, echo=click.echo)
    click.echo(_format(describe(parsed, plugins, click.echo)))
    click.echo(f"{recipe}: ok")


@cli.command()
def plugins():
    """List the loaded plugins, their versions and the components each provides."""
    from cdmbench.plugins import load_plugins

    loaded = load_plugins()  # a broken plugin is listed with its failure, never an error
    for name in loaded.versions:
        package = loaded.packages.get(name)
        click.echo(f"{name} {loaded.versions[name] or '(no version)'}"
                   + (f" (package {package})" if package else ""))
        for kind, names in loaded.components_of(name).items():
            if names:
                click.echo(f"    {kind}: {', '.join(names)}")
    for name, error in loaded.failures.items():
        click.secho(f"{name}: failed: {error}", fg="red")


@cli.command(name="ls")
@click.argument("kind", required=False, type=click.Choice(KINDS))
@click.option("--pattern", default="*", help="Glob on component names, e.g. 'adm*'.")
def ls(kind, pattern):
    """List registered components (of KIND) with the plugin that provides each."""
    from cdmbench.plugins import load_plugins

    loaded = load_plugins()
    rows = [(k, c) for k in ([kind] if kind else KINDS) for c in loaded[k].match(pattern)]
    width = max([20] + [len(c.name) + 1 for _, c in rows])
    for k, c in rows:
        click.echo(f"{k:<14} {c.name:<{width}} {c.plugin:<30} {c.summary}")


@cli.command()
@click.argument("run_dirs", nargs=-1, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="One run: write its report afresh and copy it here (report.md, report.html, the "
                   "figures, results.jsonl and .csv, run.yaml and the train logs, so that `cdmbench "
                   "report --out DIR DIR` rewrites it later), e.g. reports/<name>, to commit. Several "
                   "runs: write their comparison here (comparison.md, comparison.html, comparison.png).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write every result row of RUN_DIRS here, one column per protocol field.")
def report(run_dirs, out, csv_path):
    """Print the results of RUN_DIRS (default: every run under ./runs except --smoke runs) as a
    table, beside the published rows they are comparable with; several runs side by side: each
    stage's components, metrics with their standard errors, and cost (training images, time,
    device, FLOPs; sampling time per image)."""
    from cdmbench.reporting.write import print_report, run_dirs_to_report

    print_report(run_dirs_to_report(list(run_dirs)), out=out, csv_path=csv_path, echo=click.echo)


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--stage", help="Evaluate this stage's samples (default: evaluate.stage or the last stage).")
@click.option("--metrics", help="Comma-separated metric names, e.g. fid,is,cas (default: evaluate.metrics).")
@click.option(
    "--num-samples",
    type=click.IntRange(min=1),
    help="Samples to generate and evaluate (default: evaluate.num_samples).",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
@click.option("--search/--no-search", default=True, show_default=True,
              help="Run the recipe's evaluate.search first (resumed, or reused when done) and evaluate its chosen "
                   "point; --no-search evaluates as configured (a search's earlier choice still applies).")
@click.option("--search-only", is_flag=True, help="Run the recipe's evaluate.search only, not the full evaluation.")
def evaluate(run_dir, stage, metrics, num_samples, overrides, progress, search, search_only):
    """Sample a trained run (labels as evaluate.labels says, per-image seeds, resumable npz shards)
    and compute metrics (FID, IS, CAS, ...); rows go to RUN_DIR/results.jsonl and report.md."""
    from cdmbench.evaluation.evaluate import evaluate as run_evaluate

    names = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    run_evaluate(run_dir, stage=stage, metrics=names, num_samples=num_samples, overrides=overrides,
                 progress=progress, echo=click.echo, search=search, search_only=search_only)


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--stage", help="Sample up to this stage (default: the last).")
@click.option("--classes", help="Comma-separated class indices or names (a name with a comma: "
                                "its index) (default: the recipe's sample.num_classes first "
                                "classes, or all).")
@click.option("--per-class", type=click.IntRange(min=1), help="Images per class (default: sample.images_per_class).")
@click.option("--seed", type=click.IntRange(min=0), help="Image i gets the seed (seed, i) (default: sample.seed).")
@click.option("--level", "levels", multiple=True, metavar="STAGE=S",
              help="Sampling-time augmentation level of an SR stage (repeatable; default: the "
                   "recipe's, or the best of a sweep in cascade.json).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per batch (default: sample.batch_size).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set stages.sr32.sampler.args.steps=100 (repeatable).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (default: RUN_DIR/samples/<stage>-seed<seed>).")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
def sample(run_dir, stage, classes, per_class, seed, levels, batch_size, overrides, out, progress):
    """Sample chosen classes from a trained run's cascade: PNG files, a grid per stage, an npz
    and sample.json (the settings that made them)."""
    from cdmbench.cascade.sample import sample_run

    chosen = {}
    for item in levels:
        name, _, value = item.partition("=")
        try:
            chosen[name.strip()] = float(value)
        except ValueError:
            raise click.BadParameter(f"expected STAGE=S with a number S, got {item!r}", param_hint="--level") from None
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    sample_run(run_dir, stage=stage, classes=names, per_class=per_class, seed=seed, levels=chosen,
               batch_size=batch_size, overrides=overrides, out=out, progress=progress, echo=click.echo)


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--stage", required=True, help="The stage trained with train.posthoc_ema.")
@click.option("--sigma-rel", "sigma_rels", required=True,
              help="Comma-separated EMA lengths sigma_rel in (0, 0.2887), e.g. 0.03,0.05,0.08.")
@click.option("--step", type=click.IntRange(min=1), help="At this checkpoint step (default: the newest).")
def ema(run_dir, stage, sigma_rels, step):
    """Reconstruct post-hoc EMAs of any length (EDM2) from a stage's snapshots into files that
    sample, evaluate and sweep use with --set stages.STAGE.posthoc_sigma_rel=S."""
    from cdmbench.training.ema import write_posthoc

    try:
        values = [float(v) for v in sigma_rels.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {sigma_rels!r}",
                                 param_hint="--sigma-rel") from None
    write_posthoc(run_dir, stage=stage, sigma_rels=values, step=step, echo=click.echo)


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--stage", required=True, help="The SR stage whose sampling level is swept.")
@click.option("--levels", required=True, help="Comma-separated levels s in [0, 1], e.g. 0,0.05,0.1,0.2.")
@click.option("--inputs", default="generated,ground-truth", show_default=True,
              help="Low-res inputs: generated (the cascade), ground-truth, or both.")
@click.option("--metrics", help="Comma-separated metric names (default: evaluate.metrics).")
@click.option("--num-samples", type=click.IntRange(min=1), help="Samples per level (default: evaluate.num_samples).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
def sweep(run_dir, stage, levels, inputs, metrics, num_samples, overrides, progress):
    """Evaluate an SR stage of a trained run at many sampling-time augmentation levels (previous
    stages run once and are cached); the best level goes to RUN_DIR/cascade.json and is used by
    later sampling."""
    from cdmbench.evaluation.evaluate import sweep_levels
    from cdmbench.evaluation.sweep import INPUTS

    try:
        values = [float(v) for v in levels.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {levels!r}", param_hint="--levels") from None
    kinds = [k.strip() for k in inputs.split(",") if k.strip()]
    if not kinds or any(k not in INPUTS for k in kinds):
        raise click.BadParameter(f"choose from {', '.join(INPUTS)}, got {inputs!r}", param_hint="--inputs")
    names = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    sweep_levels(run_dir, stage=stage, levels=values, inputs=kinds, metrics=names,
                 num_samples=num_samples, overrides=overrides, progress=progress, echo=click.echo)


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--stage", required=True, help="The stage whose training step is measured.")
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True, help="Timed training steps.")
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Untimed steps first (compilation, caches).",
)
@click.option("--compile/--no-compile", "compile_", default=None,
              help="Also measure the torch.compile'd step (default: on CUDA).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("reports/bench"),
              show_default=True, help="Folder for the table (.md) and figures (.json).")
@click.option("--backbone", "backbones", multiple=True, metavar="NAME",
              help="Measure the stage's training step with this backbone instead, same args "
                   "(repeatable: side by side in one table, e.g. adm-unet and diffusers-unet2d).")
@click.option("--smoke", is_flag=True, help=SMOKE_HELP)
@click.option("--profile", is_flag=True,
              help="Add where a training step's time goes: batch, forward + backward, optimizer and "
                   "EMA, and forward + backward by operator kind (torch.profiler).")
def bench(recipe, stage, steps, warmup, compile_, overrides, out, backbones, smoke, profile):
    """Measure a stage's training step (images/s, FLOPs, MFU against a measured matmul ceiling,
    peak memory; eager and compiled) and the cascade's sampling throughput, on synthetic data."""
    from cdmbench.training.bench import bench as run_bench

    command = " ".join(["cdmbench", *sys.argv[1:]]) if sys.argv else ""
    run_bench(recipe, stage=stage, overrides=overrides, steps=steps, warmup=warmup, compile=compile_,
              out=out, command=command, backbones=list(backbones), smoke=smoke, profile=profile,
              echo=click.echo)


@cli.command(name="compare-samplers")
@click.option("--steps", default="10,20,50,100,250,1000", show_default=True,
              help="Comma-separated step counts.")
@click.option("--num-samples", type=click.IntRange(min=2), default=4000, show_default=True,
              help="Samples per sampler and step count.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("reports/samplers"),
              show_default=True, help="Folder for samplers.csv, samplers.md and samplers.png.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def compare_samplers(steps, num_samples, out, progress):
    """Run every registered sampler at each step count on a Gaussian mixture with its exact
    denoiser and write the distribution errors and wall times, to choose a sampler."""
    from cdmbench.diffusion.compare import compare_samplers as compare
    from cdmbench.diffusion.compare import write_report
    from cdmbench.plugins import load_plugins

    try:
        counts = sorted({int(n) for n in steps.split(",")})
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {steps!r}", param_hint="--steps") from None
    if not 1 <= counts[0] <= counts[-1] <= 1000:
        raise click.BadParameter(f"step counts must be in 1..1000 (the process's T), got {steps!r}",
                                 param_hint="--steps")
    table = compare(load_plugins(), steps=counts, num_samples=num_samples, progress=progress)
    command = f"cdmbench compare-samplers --steps {steps} --num-samples {num_samples}"
    for path in write_report(table, out, command=command, num_samples=num_samples, timesteps=1000):
        click.echo(path)
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def _format(frame) -> str:
    return frame.to_string(float_format=lambda v: f"{v:.4g}")


def main() -> None:
    import warnings

    from cdmbench.plugins import load_plugins

    try:  # a broken plugin is its own failure: every command, --help and --version still work
        impls = load_plugins(components=False).manager.hook.cdmbench_add_commands.get_hookimpls()
    except Exception as exc:
        warnings.warn(f"the plugins' commands are not available: {exc}", stacklevel=2)
        impls = []
    for impl in impls:  # one by one: a broken plugin must not take the others' commands
        commands = dict(cli.commands)
        try:
            impl.function(cli=cli)
        except Exception as exc:
            cli.commands = commands
            warnings.warn(f"plugin '{impl.plugin_name}' raised while adding commands: {exc!r}; "
                          "its commands are not available", stacklevel=2)
            continue
        replaced = [name for name, command in commands.items() if cli.commands.get(name) is not command]
        if replaced:  # a plugin may add commands, not replace cdmbench's or another plugin's
            cli.commands.update({name: commands[name] for name in replaced})
            warnings.warn(f"plugin '{impl.plugin_name}' adds the command(s) {', '.join(replaced)}, which "
                          "exist already; its own are not used: rename them", stacklevel=2)
    cli()
