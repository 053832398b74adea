"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2 section 3): power-function EMAs kept while training, and an EMA of any length
reconstructed after training from their snapshots.

A power-function EMA with exponent gamma updates at step t = 1, 2, ... as

    theta_hat_t = beta_t theta_hat_{t-1} + (1 - beta_t) theta_t,   beta_t = (1 - 1/t)^(gamma + 1),

which weighs step tau <= t by exactly (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1): the
integral over [tau - 1, tau] of the profile p_t(x) = (gamma + 1) x^gamma / t^(gamma+1) on [0, t].
Its length is sigma_rel, the profile's standard deviation over t:
sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)).

A snapshot stored at step t_i of the EMA with exponent gamma_i has profile p_i; the EMA of
exponent gamma at step t is approximated by the combination sum_i x_i snapshot_i whose profile
is closest to p in L2 on [0, infinity): x solves A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p>,
inner products in closed form (``profile_dot``).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file
from torch import Tensor

from cdmbench.errors import CdmbenchError
from cdmbench.recipe.schema import MAX_SIGMA_REL
from cdmbench.storage.files import atomic_write
from cdmbench.training.checkpoint import verified_file, write_folder


def sigma_rel_of(gamma: float) -> float:
    """The relative standard deviation of the power-function profile of exponent ``gamma``."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_of(sigma_rel: float) -> float:
    """The exponent gamma > 0 whose profile has ``sigma_rel``: the largest real root of
    sigma^2 (gamma + 2)^2 (gamma + 3) - (gamma + 1), a cubic in gamma."""
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must lie in (0, {MAX_SIGMA_REL:.4f}) (the plain average of all "
                         f"steps); got {sigma_rel}")
    s2 = sigma_rel**2
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def profile_dot(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """<p_a, p_b> = integral over [0, min(t_a, t_b)] of the two profiles' product, written with
    the ratio of the steps (<= 1) so that t^gamma cannot overflow."""
    if t_a > t_b:
        t_a, gamma_a, t_b, gamma_b = t_b, gamma_b, t_a, gamma_a
    return (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * t_b) * (t_a / t_b) ** gamma_b


def posthoc_coefficients(stored: Sequence[tuple[float, float]], target: tuple[float, float]) -> np.ndarray:
    """The coefficients x of the snapshots ``stored`` ((step, gamma) each) whose combination's
    profile is closest to the EMA ``target`` (step, gamma): the least-squares solution of
    A x = b (A may be singular when two snapshots share a profile)."""
    a = np.array([[profile_dot(*p, *q) for q in stored] for p in stored])
    b = np.array([profile_dot(*p, *target) for p in stored])
    return np.linalg.lstsq(a, b, rcond=None)[0]


class PowerEMA:
    """Power-function EMAs of ``params`` (name -> tensor, updated in place by training), one per
    exponent in ``gammas``; ``buffers`` (none in the built-in networks) are copied as they are,
    as ``train.ema``'s are."""

    def __init__(self, params: dict[str, Tensor], gammas: Sequence[float], buffers: dict[str, Tensor] | None = None):
        self.params, self.gammas, self.buffers = params, list(gammas), buffers or {}
        self.averages = [[p.detach().clone() for p in params.values()] for _ in self.gammas]

    @torch.no_grad()
    def update(self, t: int) -> None:
        """Fold in the parameters after training step ``t`` (1-based)."""
        current = [p.detach() for p in self.params.values()]
        for gamma, average in zip(self.gammas, self.averages, strict=True):
            torch._foreach_lerp_(average, current, 1 - (1 - 1 / t) ** (gamma + 1))

    def state_dict(self) -> dict[str, Tensor]:
        """Each EMA's tensors as ``<index>/<name>``, the buffers as ``buffers/<name>`` (on the CPU)."""
        state = {f"{i}/{name}": a.detach().cpu().contiguous()
                 for i, average in enumerate(self.averages) for name, a in zip(self.params, average, strict=True)}
        return state | {f"buffers/{name}": b.detach().cpu().contiguous() for name, b in self.buffers.items()}

    def check(self, state: dict[str, Tensor]) -> None:
        """ValueError unless ``state`` has exactly the keys and shapes ``state_dict`` gives."""
        own = {f"{i}/{name}": p.shape for i in range(len(self.gammas)) for name, p in self.params.items()}
        own |= {f"buffers/{name}": b.shape for name, b in self.buffers.items()}
        if own.keys() != state.keys() or any(own[k] != v.shape for k, v in state.items()):
            raise ValueError("the post-hoc EMAs do not fit the model or the recipe's sigma_rels (other keys or shapes)")

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for i, average in enumerate(self.averages):
            for name, a in zip(self.params, average, strict=True):
                a.copy_(state[f"{i}/{name}"])


# --- snapshots ---------------------------------------------------------------------------------

SNAPSHOTS = "posthoc_ema"  # <stage>/posthoc_ema/snapshot-<step>/
SNAPSHOT_PREFIX = "snapshot-"
SNAPSHOT_FILE = "posthoc_ema.safetensors"


def save_snapshot(folder: Path, step: int, power: PowerEMA, sigma_rels: Sequence[float]) -> Path:
    """``folder``/snapshot-<step>/ with the EMAs after ``step``, written as checkpoints are
    (atomically, with a manifest: ``write_folder``); its metadata names each EMA's sigma_rel."""
    metadata = {"step": str(step), "sigma_rels": json.dumps(list(sigma_rels))}
    return write_folder(folder, f"{SNAPSHOT_PREFIX}{step:08d}",
                        lambda tmp: save_file(power.state_dict(), tmp / SNAPSHOT_FILE, metadata=metadata),
                        what="post-hoc EMA snapshot")


def list_snapshots(folder: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete snapshot, oldest first."""
    if not folder.is_dir():
        return []
    return sorted((int(p.name.removeprefix(SNAPSHOT_PREFIX)), p) for p in folder.iterdir()
                  if p.is_dir() and p.name.startswith(SNAPSHOT_PREFIX))


def drop_snapshots_after(folder: Path, step: int) -> None:
    """Delete the snapshots after ``step``: a run resumed from the checkpoint of ``step`` makes them
    again, from the same weights."""
    for later, path in list_snapshots(folder):
        if later > step:
            shutil.rmtree(path)


def _stored(path: Path) -> list[float]:
    """The sigma_rels of snapshot ``path``'s EMAs, in order, after checking its file against its manifest."""
    try:
        with safe_open(verified_file(path, SNAPSHOT_FILE), framework="pt") as fh:
            return json.loads(fh.metadata()["sigma_rels"])
    except Exception as exc:
        raise CdmbenchError(f"post-hoc EMA snapshot {path} is unreadable ({type(exc).__name__}: {exc}); delete it "
                            "(the reconstruction then uses the others)") from None


def reconstruct(folder: Path, sigma_rel: float, step: int | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The EMA of length ``sigma_rel`` at ``step`` (default: the newest snapshot's) from the
    snapshots up to it, each checked against its manifest: its state dict (the stored dtypes; the
    buffers of the last snapshot) and what made it, with ``profile_error``, the relative L2
    distance of its weighting of the steps from the target's (``profile_dot``'s norm)."""
    snapshots = [(t, path) for t, path in list_snapshots(folder) if step is None or t <= step]
    if not snapshots:
        raise CdmbenchError(f"no post-hoc EMA snapshots in {folder}" + (f" up to step {step}" if step else "")
                            + "; train the stage with train.posthoc_ema.sigma_rels set")
    step = snapshots[-1][0] if step is None else step
    sigma_rels = {path: _stored(path) for _, path in snapshots}  # each file hashed once
    stored = [(t, gamma_of(s), path, i) for t, path in snapshots for i, s in enumerate(sigma_rels[path])]
    target = (step, gamma_of(sigma_rel))
    x = posthoc_coefficients([(t, g) for t, g, _, _ in stored], target)
    combined: dict[str, Tensor] = {}
    for _, path in snapshots:  # one snapshot in memory at a time
        state = load_file(path / SNAPSHOT_FILE)
        for c, (_, _, at, i) in zip(x, stored, strict=True):
            if at != path:
                continue
            for key, tensor in state.items():
                if key.startswith(f"{i}/"):
                    name = key.split("/", 1)[1]
                    combined[name] = combined.get(name, 0) + float(c) * tensor.double()
    weights = {name: tensor.to(state[f"0/{name}"].dtype) for name, tensor in combined.items()}
    weights |= {key.split("/", 1)[1]: tensor for key, tensor in state.items() if key.startswith("buffers/")}
    a = np.array([[profile_dot(p, g, q, h) for q, h, _, _ in stored] for p, g, _, _ in stored])
    b = np.array([profile_dot(p, g, *target) for p, g, _, _ in stored])
    error = max(0.0, x @ a @ x - 2 * x @ b + profile_dot(*target, *target)) ** 0.5
    info = {"sigma_rel": sigma_rel, "gamma": target[1], "step": step, "snapshots": len(snapshots),
            "stored_sigma_rels": sorted({s for values in sigma_rels.values() for s in values}),
            "profile_error": error / profile_dot(*target, *target) ** 0.5}
    return weights, info


def posthoc_path(stage_dir: Path, sigma_rel: float, step: int) -> Path:
    """Where the post-hoc EMA of ``sigma_rel`` at ``step`` is kept once reconstructed."""
    return stage_dir / SNAPSHOTS / f"sigma_rel-{sigma_rel:.4f}-step-{step:08d}.safetensors"


def posthoc_weights(stage_dir: Path, sigma_rel: float, step: int) -> tuple[Path, dict[str, Any]]:
    """The file of the post-hoc EMA of ``sigma_rel`` at ``step`` of the stage in ``stage_dir``,
    reconstructed from its snapshots (``reconstruct``) and written atomically the first time;
    and what made it (its metadata)."""
    path = posthoc_path(stage_dir, sigma_rel, step)
    if not path.is_file():
        weights, info = reconstruct(stage_dir / SNAPSHOTS, sigma_rel, step)
        atomic_write(path, save(weights, metadata={k: json.dumps(v) for k, v in info.items()}))
    with safe_open(path, framework="pt") as fh:
        return path, {k: json.loads(v) for k, v in (fh.metadata() or {}).items()}
