"""What each job of ``cdmbench launch`` runs: submitit callables for a stage's training, the
cascade's sampling once every stage is trained, an evaluation array element's sample shards, and
the metrics once every element is done.

Every job resumes from what is on disk (checkpoints, grids, shards), so a requeued job is the same
job run again: each is a ``submitit.helpers.Checkpointable`` that resubmits itself unchanged. In a
job of several processes (SLURM tasks, one per GPU) each joins the process group from SLURM's
variables (submitit's ``TorchDistributedEnvironment``: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), as under torchrun.

Preemption: submitit handles the requeue signal (``launch.signal``) outside the training loop; inside
it, ``$CDMBENCH_STOP_SIGNALS`` makes the same signal stop training as SIGTERM does (the step in flight
finishes and is checkpointed), and the job then hands the signal back to submitit, which resubmits
the job and exits. SIGTERM (``scancel``) saves and stops without requeueing."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdmbench.errors import CdmbenchError, Stopped

try:
    import submitit
except ImportError:  # an optional dependency: the extra `slurm`
    raise CdmbenchError("cdmbench launch needs submitit: pip install 'cdmbench[slurm]' (or pip install "
                        "submitit)") from None
from cdmbench.runtime.signals import STOP_SIGNALS_ENV


def _join_process_group() -> None:
    """In a submitit job of several processes, the torch.distributed variables from SLURM's (or the
    local executor's); every process keeps all the node's GPUs and takes LOCAL_RANK's."""
    env = submitit.helpers.TorchDistributedEnvironment()
    if env.world_size > 1:
        env.export(set_cuda_visible_devices=False, overwrite=True)


@dataclass
class Job(submitit.helpers.Checkpointable):
    """A job's work (``work``), run with the preemption signal stopping training cleanly."""

    signal: str  # the requeue signal's name, e.g. "USR2" (``launch.signal``)

    def __call__(self) -> Any:
        _join_process_group()
        os.environ[STOP_SIGNALS_ENV] = self.signal
        try:
            return self.work()
        except Stopped as stopped:
            signum = getattr(signal, f"SIG{self.signal}")
            if getattr(stopped, "signum", None) != signum or not callable(signal.getsignal(signum)):
                raise  # SIGTERM / SIGINT, or no submitit handler: stop
            print(f"{stopped}; the job requeues itself", flush=True)
            signal.raise_signal(signum)  # submitit's handler: checkpoint (resubmit self), requeue, exit
            return None  # a process other than rank 0: the requeue ends it

    def work(self) -> Any:
        raise NotImplementedError


@dataclass
class TrainStage(Job):
    """``cdmbench run RECIPE --stage STAGE`` (which also samples the stages trained so far)."""

    recipe: Path = Path()
    out: Path = Path()
    stage: str | None = None
    overrides: list[str] = field(default_factory=list)
    smoke: bool = False

    def work(self) -> Path:
        from cdmbench.training.run import run

        return run(self.recipe, out=self.out, stage=self.stage, overrides=self.overrides, smoke=self.smoke,
                   progress=False)


@dataclass
class SampleCascade(TrainStage):
    """``cdmbench run RECIPE`` once every stage is trained: the cascade's grids, results and report."""


@dataclass
class EvaluationShards(Job):
    """Array element ``element`` of ``elements``: the evaluation sample shards k with k mod
    ``elements`` = ``element`` (and those of CAS's generated training set, when a metric asks for
    one), with no process group: the elements never meet."""

    run: Path = Path()
    element: int = 0
    elements: int = 1
    stage: str | None = None
    metrics: list[str] | None = None
    num_samples: int | None = None
    overrides: list[str] = field(default_factory=list)

    def work(self) -> Path:
        return generate_shards(self.run, element=self.element, elements=self.elements, stage=self.stage,
                               metrics=self.metrics, num_samples=self.num_samples, overrides=self.overrides)


@dataclass
class Metrics(Job):
    """``cdmbench evaluate RUN`` once every array element is done: it finds every shard, samples
    nothing and computes the metrics."""

    run: Path = Path()
    stage: str | None = None
    metrics: list[str] | None = None
    num_samples: int | None = None
    overrides: list[str] = field(default_factory=list)

    def work(self) -> list[dict[str, Any]]:
        from cdmbench.evaluation.evaluate import evaluate

        return evaluate(self.run, stage=self.stage, metrics=self.metrics, num_samples=self.num_samples,
                        overrides=self.overrides, progress=False)


def generate_shards(run: Path, *, element: int, elements: int, stage: str | None = None,
                    metrics: list[str] | None = None, num_samples: int | None = None,
                    overrides: list[str] | tuple[str, ...] = (), progress: bool = False) -> Path:
    """Write element ``element`` of ``elements``'s share of a trained run's evaluation samples (as
    rank ``element`` of ``elements`` would under torchrun, ``generate_samples``); shards already
    written are skipped. Returns the samples' folder."""
    from cdmbench.cascade.stages import build_chain
    from cdmbench.data.prepare import make_dataset
    from cdmbench.evaluation.evaluate import metrics_context
    from cdmbench.evaluation.samples import generate_samples, generate_training_set, load_chain
    from cdmbench.evaluation.sweep import apply_sweep_levels
    from cdmbench.recipe.schema import Component
    from cdmbench.runtime.device import resolve_device
    from cdmbench.storage.rundir import load_run

    run_dir, recipe, plugins = load_run(run, overrides)
    spec = recipe.evaluate
    target = stage or spec.stage or recipe.stages[-1].name
    recipe.stage(target)
    dataset = make_dataset(plugins, recipe, "train")
    device = resolve_device(recipe.device)
    chain = build_chain(plugins, recipe, target, dataset.num_classes, device)
    apply_sweep_levels(chain, run_dir.path, overrides)
    sampling = dict(run_path=run_dir.path, checkpoint_steps=load_chain(chain, run_dir.path),
                    num_classes=dataset.num_classes, seed=recipe.sample.seed, batch_size=spec.batch_size,
                    shard_size=spec.shard_size, device=device, progress=progress, rank=element,
                    world_size=elements)
    folder, _ = generate_samples(chain, num_samples=num_samples or spec.num_samples, **sampling)
    by_name = {m.name: m for m in spec.metrics}
    chosen = [by_name.get(name, Component(name)) for name in metrics] if metrics else spec.metrics
    context, built = metrics_context(recipe, plugins, target, dataset.num_classes, chosen, progress, print)
    if any(getattr(m, "replaces_training_set", False) for m in built):  # CAS's paper protocol
        generate_training_set(chain, labels=context.real("train")[1], **sampling)
    return folder
