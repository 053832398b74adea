"""`cdmbench ema`: post-hoc EMAs of a trained stage (EDM2) reconstructed from its snapshots into
files that sampling and evaluation load by length (``stages[].posthoc_sigma_rel``)."""

from __future__ import annotations

from pathlib import Path

from cdmbench.errors import CdmbenchError
from cdmbench.storage.rundir import load_run
from cdmbench.training.checkpoint import list_checkpoints
from cdmbench.training.posthoc_ema import SNAPSHOTS, gamma_of, list_snapshots, posthoc_weights


def write_posthoc(run_path: str | Path, *, stage: str, sigma_rels: list[float], step: int | None = None,
                  echo=print) -> list[Path]:
    """The post-hoc EMA of each of ``sigma_rels`` at checkpoint ``step`` (default: the stage's
    newest) of stage ``stage``, written once (``posthoc_weights``); a line for each with how well
    its weighting of the steps matches the target's. Returns the files."""
    run_dir, recipe, _ = load_run(run_path)
    spec = recipe.stage(stage)  # an unknown name fails here, naming the stages
    folder = run_dir.stage(stage)
    if not spec.train.posthoc_ema.sigma_rels:
        raise CdmbenchError(f"stage {stage} was trained without post-hoc EMA snapshots; set "
                            f"stages.{stage}.train.posthoc_ema.sigma_rels (e.g. [0.05, 0.1]) and train it")
    for sigma_rel in sigma_rels:
        try:
            gamma_of(sigma_rel)
        except ValueError as exc:
            raise CdmbenchError(f"--sigma-rel {sigma_rel}: {exc}") from None
    if step is None:
        checkpoints = list_checkpoints(folder / "checkpoints")
        if not checkpoints:
            raise CdmbenchError(f"stage {stage} has no checkpoint in {folder / 'checkpoints'}; train it first")
        step = int(checkpoints[-1].name.split("-")[1])
    stored = [t for t, _ in list_snapshots(folder / SNAPSHOTS)]
    if not stored or stored[0] > step:
        raise CdmbenchError(f"stage {stage} has no post-hoc EMA snapshot up to step {step} in {folder / SNAPSHOTS}")
    paths = []
    for sigma_rel in sigma_rels:
        path, info = posthoc_weights(folder, sigma_rel, step)
        echo(f"{stage} sigma_rel {sigma_rel:g} at step {step}: {path} (from {info['snapshots']} snapshots of "
             f"sigma_rel {', '.join(f'{s:g}' for s in info['stored_sigma_rels'])}; its weighting of the steps is "
             f"{info['profile_error']:.2%} from the target's, relative L2)")
        paths.append(path)
    echo(f"sample or evaluate with one: --set stages.{stage}.posthoc_sigma_rel={sigma_rels[0]:g}")
    return paths
