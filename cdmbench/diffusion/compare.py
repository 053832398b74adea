"""`cdmbench compare-samplers`: every registered sampler x step count x grid spacing on the
analytic Gaussian mixture (``cdmbench.diffusion.mixture``) with its exact denoiser, so the only
error is the sampler's own.

Rows: sampler, grid (``GRIDS``, for samplers that take a ``spacing``; ``trained`` for the
others: their own spacing), steps, denoiser evaluations (a second-order step such as Heun's
takes two), mean / covariance / component-weight / sliced-Wasserstein error of the samples, and
wall time. A row of exact samples gives the Monte Carlo noise floor.
"""

from __future__ import annotations

import inspect
import platform
import time
from pathlib import Path

import pandas as pd
import torch

from cdmbench.builtin.schedules import cosine
from cdmbench.diffusion.mixture import GaussianMixture
from cdmbench.diffusion.process import DiscreteProcess
from cdmbench.plugins import Plugins
from cdmbench.runtime.progress import bar

ERRORS = ("sw_error", "mean_error", "cov_error", "weight_error")
# grid label -> sampler args (``cdmbench.diffusion.spacing``): the trained schedule's t, log-SNR,
# EDM's sigmas, and t of another (sampling) schedule than the process's
GRIDS = {"uniform-t": {}, "log-snr": {"spacing": "log-snr"}, "edm": {"spacing": "edm"},
         "linear schedule": {"schedule": {"name": "linear"}}}


def compare_samplers(plugins: Plugins, *, steps: list[int], num_samples: int, timesteps: int = 1000,
                     seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Errors of every sampler that takes ``steps`` and needs no other argument (with x_0
    clipping off where it can be turned off), on each of ``GRIDS`` when it takes a ``spacing``,
    on a cosine process of ``timesteps`` steps."""
    mixture = GaussianMixture.default()
    process = DiscreteProcess(cosine(timesteps=timesteps).betas())
    exact = mixture.sample(num_samples, torch.Generator().manual_seed(seed))
    floor = mixture.sample(num_samples, torch.Generator().manual_seed(seed + 1))
    rows = [{"sampler": "exact samples", "grid": "", "steps": 0, "evaluations": 0,
             "sw_error": mixture.sliced_wasserstein(floor, exact), **mixture.errors(floor), "seconds": 0.0}]
    jobs = []
    for component in plugins["samplers"]:
        params = component.parameters()
        required = [p for p in params.values() if p.default is inspect.Parameter.empty]
        if "steps" in params and not required:
            extra = {"clip_x0": False} if "clip_x0" in params else {}
            grids = GRIDS if "spacing" in params else {"trained": {}}
            jobs += [(component.name, component, grid, n, {**extra, **args})  # all T steps: one grid
                     for grid, args in grids.items() for n in steps if n < timesteps or (n == timesteps and not args)]
    for name, component, grid, n, extra in bar(jobs, desc="samplers", unit="sampler", progress=progress):
        sampler = component.build({"steps": n, **extra})
        try:
            sampler.check(process, learned_variance=False)
        except ValueError as exc:  # e.g. a scheduler whose own spacing cannot take n steps
            rows.append({"sampler": name, "grid": grid, "steps": n, "seconds": None, "note": str(exc)})
            continue
        generators = [torch.Generator().manual_seed(seed * num_samples + i) for i in range(num_samples)]
        calls = []

        def denoise(*args):
            calls.append(1)  # noqa: B023 (called in this iteration only)
            return mixture.denoise(*args)

        start = time.perf_counter()
        x = sampler.sample(denoise=denoise, process=process, shape=(mixture.dim, 1, 1),
                           generators=generators, progress=False)
        seconds = time.perf_counter() - start
        rows.append({"sampler": name, "grid": grid, "steps": n, "evaluations": len(calls),
                     "sw_error": mixture.sliced_wasserstein(x, exact), **mixture.errors(x), "seconds": seconds})
    return pd.DataFrame(rows)


def write_report(table: pd.DataFrame, out: Path, *, command: str, num_samples: int,
                 timesteps: int) -> list[Path]:
    """samplers.csv, samplers.md (the table and how it was made) and samplers.png (error vs
    denoiser evaluations, one line per sampler and grid, the exact-sample floor dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    csv, md, png = out / "samplers.csv", out / "samplers.md", out / "samplers.png"
    table.to_csv(csv, index=False)
    floor = table[table.sampler == "exact samples"].iloc[0]
    measured = table[table.sampler != "exact samples"]
    styles = dict(zip(["trained", *GRIDS], ["-", "-", "--", ":", "-."], strict=True))
    colours = {name: f"C{i}" for i, name in enumerate(sorted(set(measured.sampler)))}
    fig, axes = plt.subplots(1, len(ERRORS), figsize=(5 * len(ERRORS), 4.5))
    for ax, error in zip(axes, ERRORS, strict=True):
        for (name, grid), group in measured.groupby(["sampler", "grid"]):
            ax.plot(group.evaluations, group[error], marker="o", markersize=3, color=colours[name],
                    linestyle=styles[grid], label=name if grid in ("trained", "uniform-t") else None)
            # NaN (refused): no point
        ax.axhline(floor[error], color="grey", linestyle="--", label="exact samples")
        ax.set(xscale="log", yscale="log", xlabel="denoiser evaluations", title=error)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"samplers on a 2-d Gaussian mixture with its exact denoiser, {num_samples} samples, "
                 f"cosine T={timesteps}; grids: uniform-t solid, log-snr dashed, edm dotted, linear schedule dash-dot")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    ran = measured.dropna(subset=["evaluations"]).astype({"evaluations": int})  # not the refused
    wide = ran[ran.grid.isin(["trained", "uniform-t"])].pivot(index="evaluations", columns="sampler",
                                                               values="sw_error")
    grids = ran[ran.grid != "trained"].pivot_table(index=["sampler", "steps"], columns="grid", values="sw_error")
    md.write_text(
        "# Samplers on an analytic Gaussian mixture\n\n"
        "Three-component 2-d isotropic Gaussian mixture (`cdmbench.diffusion.mixture.GaussianMixture.default`),\n"
        f"sampled through its exact denoiser on a cosine process with T = {timesteps}, "
        f"{num_samples} samples per row, x_0 clipping off.\n"
        "Errors: the sliced 2-Wasserstein distance to as many exact samples (256 directions),\n"
        "||sample mean - mean||, ||sample covariance - covariance||_F, and the total\n"
        "variation between the component weights and the samples' mean posterior weights.\n"
        "`exact samples` is the Monte Carlo floor (other exact samples). Grids (`grid`, sampler args\n"
        "`spacing` and `schedule`, docs/components.md): the trained steps nearest to levels evenly spaced in\n"
        "t of the cosine schedule (`uniform-t`), in log-SNR (`log-snr`), in EDM's sigma^(1/7) (`edm`), or in t\n"
        "of the linear schedule (`linear schedule`); `trained` is a plugin sampler's own spacing.\n"
        "Seconds are wall time with a free denoiser (per-image noise generation dominates);\n"
        "with a network, cost is proportional to denoiser\n"
        "evaluations, which a second-order solver (Heun) makes two of per step: compare at equal evaluations.\n"
        "Every registered sampler that needs no argument but `steps` is run, plugins' included\n"
        "(`diffusers-*`: plugins/cdmbench-diffusers); a row with a `note` is one the sampler refused.\n\n"
        f"Made by `{command}` on {platform.platform()} ({platform.machine()}), torch {torch.__version__}.\n\n"
        "![errors vs denoiser evaluations](samplers.png)\n\n"
        "## Sliced-Wasserstein error by denoiser evaluations (uniform-t grid)\n\n```text\n"
        f"{wide.to_string(float_format=lambda v: f'{v:.4f}')}\n```\n\n"
        "## Sliced-Wasserstein error by grid\n\n```text\n"
        f"{grids.to_string(float_format=lambda v: f'{v:.4f}')}\n```\n\n"
        "## All rows\n\n```text\n"
        f"{table.to_string(index=False, float_format=lambda v: f'{v:.4f}')}\n```\n")
    return [csv, md, png]
