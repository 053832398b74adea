"""Where a sampler's grid puts its levels: a ``Spacing``.

A spacing is a monotone coordinate u(abar) of the noise level; a grid's levels are evenly spaced
in u between the process's noisiest level and its end (``ContinuousProcess.grid``), or, for a
discrete process, are the trained steps nearest to that (respacing, IDDPM section 4):

- ``uniform-t``: evenly spaced in t of the trained schedule (DDPM, IDDPM), or of ``schedule``,
  a sampling schedule named apart from the training one (CDM chose its 100-step samplers'
  schedules after training);
- ``log-snr``: evenly spaced in lambda = log(abar / (1 - abar)) (DPM-Solver, Lu et al. 2022);
- ``edm``: evenly spaced in sigma^(1 / rho), sigma = sqrt((1 - abar) / abar), rho = 7 (Karras
  et al. 2022, eq. 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cdmbench.interfaces import Schedule

SPACINGS = ("uniform-t", "log-snr", "edm")
BISECTIONS = 60  # halvings of [0, 1] when inverting a sampling schedule: below float64's resolution


@dataclass(frozen=True)
class Spacing:
    kind: str = "uniform-t"
    rho: float = 7.0  # edm only
    schedule: Schedule | None = None  # uniform-t only: t of this sampling schedule

    def __post_init__(self):
        if self.kind not in SPACINGS:
            raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}, got {self.kind!r}")
        if self.schedule is not None and self.kind != "uniform-t":
            raise ValueError(f"a sampling schedule gives uniform-t spacing in its t; spacing {self.kind} "
                             "is set by the noise levels alone: drop the schedule or use spacing uniform-t")
        if not self.rho > 0:
            raise ValueError(f"rho must be > 0, got {self.rho}")

    @property
    def trained(self) -> bool:
        """Evenly spaced in t of the trained schedule (the processes build these grids themselves)."""
        return self.kind == "uniform-t" and self.schedule is None

    def __str__(self) -> str:
        if self.kind == "edm":
            return f"edm (rho {self.rho:g})"
        if self.schedule is not None:
            return f"uniform-t of {type(self.schedule).__name__}"
        return self.kind

    def coordinate(self, abar: Tensor) -> Tensor:
        """u(abar), float64: increasing with the noise for edm and a schedule's t, decreasing for
        log-snr."""
        abar = abar.double()
        if self.kind == "log-snr":
            return log_snr(abar)
        if self.kind == "edm":
            return ((1 - abar) / abar) ** (0.5 / self.rho)
        return _schedule_time(self.schedule, abar)

    def level(self, u: Tensor) -> Tensor:
        """abar(u), the inverse of ``coordinate``."""
        if self.kind == "log-snr":
            return torch.sigmoid(u)
        if self.kind == "edm":
            return 1 / (1 + u ** (2 * self.rho))
        return self.schedule.abar(u).double()

    def levels(self, start: Tensor, end: Tensor, n: int) -> Tensor:
        """``n`` levels evenly spaced in u from ``start`` (the noisiest) to ``end``, both kept exact."""
        ends = self.coordinate(torch.stack([start, end]))
        if not bool(torch.isfinite(ends).all()):
            raise ValueError(f"spacing {self} cannot place levels between abar {start.item():.3g} and "
                             f"{end.item():.3g} (an infinite {self.kind} coordinate); use spacing uniform-t")
        abar = self.level(torch.linspace(ends[0].item(), ends[1].item(), n, dtype=torch.float64))
        abar[0], abar[-1] = start, end
        return abar

    def nearest_steps(self, abar: Tensor, n: int) -> Tensor:
        """``n`` of the trained steps k = K - 1 .. 0 (levels ``abar`` (K,), decreasing in k),
        strictly decreasing from K - 1 to 0, each the nearest to n levels evenly spaced in u."""
        u = self.coordinate(abar).numpy()
        targets = np.linspace(u[-1], u[0], n)
        k = np.arange(len(u), dtype=np.float64)
        if u[-1] < u[0]:  # np.interp needs increasing abscissae
            u, k = u[::-1], k[::-1]
        nearest = np.rint(np.interp(targets, u, k)).astype(np.int64)
        kept = [len(abar) - 1]
        for i in range(1, n):  # distinct steps: at least one below the last, room left for the rest
            kept.append(int(min(max(nearest[i], n - 1 - i), kept[-1] - 1)))
        return torch.tensor(kept, dtype=torch.long)


def log_snr(abar: Tensor) -> Tensor:
    """lambda = log(abar / (1 - abar)) (Kingma et al. 2021), float64."""
    abar = abar.double()
    return abar.log() - (-abar).log1p()


def _schedule_time(schedule: Schedule, abar: Tensor) -> Tensor:
    """t at which ``schedule`` reaches each level abar, by bisection (abar(t) decreases in t):
    0 or 1 for a level outside its range."""
    lo, hi = torch.zeros_like(abar), torch.ones_like(abar)
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2
        past = schedule.abar(mid).double() < abar  # mid is noisier than the level
        lo, hi = torch.where(past, lo, mid), torch.where(past, mid, hi)
    return (lo + hi) / 2
