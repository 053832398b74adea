"""Quality during training (``train.eval_every``): every N steps, and at the last, a stage's EMA
weights are evaluated with the recipe's ``evaluate.metrics`` on ``train.eval_num_samples``
samples, their classes drawn as evaluation's (``evaluate.labels``), and the rows go to
results.jsonl with the step and the training images seen in their protocol (``during_training:
true``), which the report's tables leave out (``reporting.tables.is_during_training``) and
``reporting.curves`` plots.

Each stage is measured alone: a base stage samples from its own EMA; an SR stage is conditioned on
ground-truth low-res inputs, as ``cdmbench sweep --inputs ground-truth`` samples them (sample i:
a training image of sample i's class, augmented at the stage's sampling level; ``protocol.inputs``
says so). Sample i is seeded by (sample seed, stage, i), as evaluation's, whatever the number of
processes or the batch size.

It leaves training as it was: samples draw from per-image generators, the global RNG is restored
after it (CAS's classifiers seed it), the EMA samples in eval mode (its mode restored) under
``torch.no_grad``, and the weights, the optimizer and the data order are not touched; a run with
evaluations reaches the weights of one without.

Feature networks and reference statistics are made or read from the cache when the evaluation is
built, before any stage trains, so a missing feature file fails first. Every process builds it:
one makes each missing cache entry under its file lock while the others wait (no collective that
could time out). Under torchrun each process samples an equal share of the rows; rank 0 gathers
them, computes the metrics and writes the rows while the others wait at a barrier (torch's
timeout, 30 minutes by default, bounds the metrics' time).

A step whose evaluation results.jsonl holds (a row of the stage with the same protocol: steps
trained again after a crash, a run resumed or run again) is not evaluated again; a run resumed
from a due step that a stop left unevaluated evaluates it first.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import torch
from torch import Tensor, nn

from cdmbench.cascade.stages import StageModel, sample_cascade, samplers_of
from cdmbench.data.images import ImageSet, to_uint8
from cdmbench.errors import CdmbenchError
from cdmbench.evaluation.cas import class_matched
from cdmbench.evaluation.evaluate import metric_rows, metrics_context
from cdmbench.evaluation.samples import sample_labels, sampling_protocol
from cdmbench.evaluation.sweep import GROUND_TRUTH_SPLIT, gaussian_parts, ground_truth_samples
from cdmbench.plugins import Plugins
from cdmbench.recipe.schema import Recipe, Stage
from cdmbench.runtime import distributed
from cdmbench.storage.rundir import RunDir, result_row
from cdmbench.tracking.loggers import Loggers


def _own_rng(device: torch.device | str):
    """A context after which the global RNG (the CPU's, and the GPU's of ``device``) is as before it."""
    device = torch.device(device)
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """``model`` in eval mode, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class TrainingEvaluation:
    """The evaluations of stage ``spec`` while it trains. Built before training (its metrics
    prepared, the evaluations results.jsonl holds read); ``__call__(stage, step, ema)`` is the
    trainer's ``after_step`` with the stage bound (``functools.partial``). Its rows go to
    results.jsonl and to the run's ``loggers``."""

    def __init__(self, recipe: Recipe, plugins: Plugins, run_dir: RunDir, spec: Stage, dataset,
                 data: ImageSet, *, loggers: Loggers, progress: bool = True, echo=print):
        self.recipe, self.run_dir, self.spec, self.data, self.echo = recipe, run_dir, spec, data, echo
        self.loggers = loggers
        self.dataset_name = getattr(dataset, "benchmark", recipe.data.name)
        self.context, built = metrics_context(recipe, plugins, spec.name, dataset.num_classes,
                                              recipe.evaluate.metrics, progress, echo)
        skipped = [m.name for m in built if getattr(m, "replaces_training_set", False)]
        self.metrics = [m for m in built if not getattr(m, "replaces_training_set", False)]
        if skipped:
            echo(f"{spec.name}: {', '.join(skipped)} not computed during training: it trains on a generated "
                 "copy of the whole training set, which cdmbench evaluate makes")
        if not self.metrics:
            raise CdmbenchError(f"stages.{spec.name}.train.eval_every: no metric of evaluate.metrics can be "
                                "computed during training; add fid or is, or set eval_every to 0")
        n = spec.train.eval_num_samples
        self.labels = sample_labels(0, n, num_classes=dataset.num_classes, seed=recipe.sample.seed,
                                    mode=recipe.evaluate.labels)
        self.index = None  # ground-truth input i of an SR stage: a training image of sample i's class
        if spec.condition_on is not None:
            try:
                self.index = class_matched(self.labels, data.labels, num_classes=dataset.num_classes,
                                           seed=recipe.sample.seed)
            except ValueError as exc:
                raise CdmbenchError(f"stages.{spec.name}.train.eval_num_samples={n}: each sample of an SR stage is "
                                    f"conditioned on another training image of its class, and {exc}; lower "
                                    "eval_num_samples") from None
        with _own_rng(self.context.device):  # a classifier feature network seeds the global RNG
            for metric in self.metrics:
                if hasattr(metric, "prepare"):
                    metric.prepare(self.context)
        held = [row["protocol"] for row in run_dir.results() if row.get("stage") == spec.name
                and row.get("protocol", {}).get("during_training")] if distributed.is_main() else None
        self.held = distributed.broadcast(held)  # every process skips the same steps

    def due(self, step: int) -> bool:
        """Whether step ``step`` is evaluated: every ``eval_every`` steps and the last."""
        every = self.spec.train.eval_every
        return step > 0 and (step % every == 0 or step == self.spec.train.steps)

    def protocol(self, stage: StageModel, step: int) -> dict[str, Any]:
        """What determines the samples of step ``step``, as their rows record it (JSON types)."""
        n, spec = len(self.labels), self.spec
        protocol = {"dataset": self.dataset_name, "resolution": spec.resolution, "n": n,
                    "labels": self.recipe.evaluate.labels,
                    "seeds": f"sample seed {self.recipe.sample.seed}, images 0..{n - 1}",
                    "samplers": samplers_of([stage]), **sampling_protocol([stage]), "during_training": True,
                    "step": step,
                    "train_images": step * spec.train.batch_size, "weights": f"EMA, decay {spec.train.ema}"}
        if stage.low_res is not None:
            protocol.update(inputs="ground-truth", inputs_split=GROUND_TRUTH_SPLIT,
                            levels=[p.level for p in gaussian_parts(stage.augmentation)])
        return json.loads(json.dumps(protocol))

    def _samples(self, stage: StageModel, ema: nn.Module, lo: int, hi: int) -> Tensor:
        """uint8 samples lo..hi of ``ema``'s weights (none when a process's share is empty)."""
        seed, batch_size, device = self.recipe.sample.seed, self.recipe.evaluate.batch_size, self.context.device
        if lo == hi:
            return torch.empty((0, 3, self.spec.resolution, self.spec.resolution), dtype=torch.uint8)
        if self.index is None:
            images, _ = sample_cascade([stage], {stage.spec.name: ema}, self.labels[lo:hi], seed=seed,
                                       batch_size=batch_size, device=device, progress=False, first_id=lo)
            return to_uint8(images[stage.spec.name])
        return ground_truth_samples(stage, ema, self.data.images[stage.low_res], self.index[lo:hi],
                                    self.labels[lo:hi], first_id=lo, seed=seed, batch_size=batch_size,
                                    device=device)

    def __call__(self, stage: StageModel, step: int, ema: nn.Module) -> None:
        """Evaluate ``ema`` at ``step`` when it is due and not recorded yet; every process calls it."""
        if not self.due(step):
            return
        protocol = self.protocol(stage, step)
        if any(all(held.get(k) == v for k, v in protocol.items()) for held in self.held):
            return
        began = time.perf_counter()
        n, world, rank = len(self.labels), distributed.world_size(), distributed.rank()
        with _own_rng(self.context.device):  # the metrics may train (a scaled-down cas): with gradients
            with _eval_mode(ema), torch.no_grad():
                part = self._samples(stage, ema, rank * n // world, (rank + 1) * n // world)
            parts = distributed.gather(part)
            if parts is not None:
                self.context.set_samples(torch.cat(parts), self.labels, protocol)
                rows = [result_row(run=self.recipe.name, stage=self.spec.name, **row)
                        for row in metric_rows(self.metrics, self.context, self.echo)]
                self.run_dir.add_results(rows)
                self.loggers.log_results(rows, {self.spec.name: step})
                self.echo(f"eval {self.spec.name} step {step}: " + ", ".join(map(_shown, rows))
                          + f" ({time.perf_counter() - began:.1f} s)")
        self.held.append(protocol)
        distributed.barrier()


def _shown(row: dict[str, Any]) -> str:
    """'fid_train 12.3 ± 0.45' (or 'failed') for a progress line."""
    if row["value"] is None:
        return f"{row['metric']} failed"
    return f"{row['metric']} {row['value']:.4g}" + ("" if row.get("stderr") is None else f" ± {row['stderr']:.2g}")
