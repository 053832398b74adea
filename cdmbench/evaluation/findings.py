"""CDM's conditioning-augmentation findings (../shared/CDM.md), checked on a run's own rows.

1. Augmentation lowers the cascade's FID: every SR stage with augmentation against the stage
   without any (`none`) that conditions on the same stage at the same resolution, each
   evaluated on generated low-res inputs (`cdmbench evaluate`).
2. FID against the sampling level s (`cdmbench sweep`): with generated low-res inputs it first
   improves, then worsens (its minimum lies strictly inside the swept range); with ground-truth
   inputs it only worsens (its minimum is at the smallest s).

Each line states the numbers compared and whether the finding holds; nothing is judged by hand.
Where rows carry standard errors (FID's bootstrap), one value counts as lower than another only
when the difference exceeds ``NOISE`` standard errors of the difference; a pattern that the
point values show but the errors do not support is "undecided". A stage trained several times
(``replicates: k``) enters both findings as the mean of its runs, with their spread as its error.
"""

from __future__ import annotations

import math

import pandas as pd

from cdmbench.recipe.schema import Recipe, Stage
from cdmbench.reporting.tables import (
    features_label,
    is_during_training,
    is_search,
    is_sweep,
    pooled,
    pooled_curve,
    sweep_rows,
)


def _fid_rows(frame: pd.DataFrame, sweeps: bool) -> pd.DataFrame:
    """The ok FID rows (any reference split), sweep rows or the others (none made during
    training or at a search's points), with a metric label that names the feature network."""
    if frame.empty:
        return frame
    rows = frame[(frame["status"] == "ok") & frame["metric"].str.startswith("fid")
                 & (frame["protocol"].map(is_sweep) == sweeps) & ~frame["protocol"].map(is_during_training)
                 & ~frame["protocol"].map(is_search)].copy()
    rows["label"] = rows["metric"] + rows["protocol"].map(features_label)
    return rows


NOISE = 2.0  # standard errors a difference must exceed to count
UNDECIDED = f"undecided (the differences are within {NOISE:g} standard errors)"


def _error(row) -> float | None:
    stderr = getattr(row, "stderr", None)
    return None if stderr is None or math.isnan(stderr) else float(stderr)


def _below(a: float, a_err: float | None, b: float, b_err: float | None) -> bool:
    """a < b by more than NOISE standard errors of a - b, sqrt(a_err^2 + b_err^2) (the two rows'
    samples taken as independent; for a sweep's levels, which share seeds, that is cautious);
    without both errors, plainly a < b."""
    if a_err is None or b_err is None:
        return a < b
    return b - a > NOISE * math.hypot(a_err, b_err)


def _value(value: float, error: float | None) -> str:
    return f"{value:.4g}" + ("" if error is None else f" ± {error:.2g}")


def _augmentation(stage: Stage) -> str:
    parts = [a.name + (f" {a.args['mode']}" if "mode" in a.args else "") for a in stage.augmentations()]
    return " + ".join(parts)


def _estimate(rows: list) -> tuple[float, float | None]:
    """A stage's FID and its standard error from the rows of its training runs (``pooled``)."""
    return pooled([r.value for r in rows], [_error(r) for r in rows])


def _named(name: str, rows: list, augmentation: str) -> str:
    runs = "" if len(rows) == 1 else f", {len(rows)} training runs: " + ", ".join(f"{r.value:.4g}" for r in rows)
    return f"`{name}` ({augmentation}{runs})"


def augmentation_lowers_fid(frame: pd.DataFrame, recipe: Recipe) -> list[str]:
    """Finding 1, one line per (augmented stage, FID metric) with an unaugmented sibling; a stage
    with replicates counts as the mean of its training runs."""
    rows = _fid_rows(frame, sweeps=False)
    if rows.empty:
        return []
    fid = {(r.stage, r.label): r for r in rows.itertuples()}
    groups = recipe.replicates()
    roots = [st for st in recipe.stages if st.replicate_of is None]
    lines = []
    for plain in roots:
        if plain.condition_on is None or _augmentation(plain) != "none":
            continue
        for other in roots:
            if (other.condition_on, other.resolution) != (plain.condition_on, plain.resolution) or other is plain:
                continue
            for label in sorted({lab for st, lab in fid if st == other.name and (plain.name, lab) in fid}):
                ours, theirs = ([fid[n, label] for n in groups[st.name] if (n, label) in fid] for st in (other, plain))
                head = (f"- {_named(other.name, ours, _augmentation(other))} against "
                        f"{_named(plain.name, theirs, 'none')}, {label}: ")
                differs = _unlike(ours + theirs, plain.condition_on)
                if differs:
                    lines.append(head + f"not comparable ({differs})")
                    continue
                mine, base = _estimate(ours), _estimate(theirs)
                verdict = ("lower: holds" if _below(*mine, *base) else
                           "not lower: does not hold" if mine[0] >= base[0] else
                           "lower, " + UNDECIDED)
                lines.append(head + f"{_value(*mine)} vs {_value(*base)}, {verdict}")
    return lines


def _unlike(rows: list, previous: str) -> str:
    """What makes stages' FID rows incomparable: sample counts, or the samples of the stage all
    are conditioned on; empty when nothing does."""
    counts = sorted({r.n for r in rows})
    if len(counts) > 1:
        return "n " + " vs ".join(map(str, counts))
    samplers = list(dict.fromkeys(str(r.protocol.get("samplers", {}).get(previous)) for r in rows))
    return "" if len(samplers) == 1 else f"{previous} sampled by " + " vs ".join(samplers)


def fid_against_level(frame: pd.DataFrame, recipe: Recipe) -> list[str]:
    """Finding 2, one line per swept (stage, samplers, inputs, FID metric) with at least 3 levels:
    sweeps that differ in any stage's sampler are separate curves. A stage with swept replicates
    is one curve: at each level all its swept runs share, their mean and spread (``pooled_curve``)."""
    rows = _fid_rows(sweep_rows(frame), sweeps=True)
    if rows.empty:
        return []
    run_of = {st.name: st.replicate_of or st.name for st in recipe.stages}
    rows["group"] = rows["stage"].map(lambda name: run_of.get(name, name))
    lines = []
    for (stage, samplers, inputs, label), group in rows.groupby(["group", "samplers", "inputs", "label"], sort=True):
        runs = list(dict.fromkeys(group["stage"]))
        curve = pooled_curve(group)
        if len(curve) < 3:
            continue
        shared, points = [s for s, _, _ in curve], [(v, e) for _, v, e in curve]
        value = [v for v, _ in points]
        best = value.index(min(value))
        if inputs == "generated":
            claim = "first improves, then worsens"
            verdict = _improves_then_worsens(points, best)
        else:
            claim = "only worsens"
            verdict = _only_worsens(points)
        shown = ", ".join(f"{a:g}: {_value(*point)}" for a, point in zip(shared, points, strict=True))
        about = "; ".join(([samplers] if samplers else [])
                          + ([f"{len(runs)} training runs"] if len(runs) > 1 else []))
        lines.append(f"- `{stage}`{f' ({about})' if about else ''}, {inputs} inputs, {label} at s = "
                     f"{shown}; best at s = {shared[best]:g}. {claim.capitalize()}: {verdict}")
    return lines


def _improves_then_worsens(points: list[tuple[float, float | None]], best: int) -> str:
    """Holds when a level inside the range is lower than both ends; undecided when only the
    point values say so."""
    first, last = points[0], points[-1]
    if any(_below(*p, *first) and _below(*p, *last) for p in points[1:-1]):
        return "holds"
    return UNDECIDED if 0 < best < len(points) - 1 else "does not hold"


def _only_worsens(points: list[tuple[float, float | None]]) -> str:
    """Does not hold when a larger level is lower than the smallest; holds when none is and the
    largest is higher; undecided otherwise (a flat curve)."""
    first = points[0]
    if any(_below(*p, *first) for p in points[1:]):
        return "does not hold"
    return "holds" if _below(*first, *points[-1]) else UNDECIDED


def findings_section(frame: pd.DataFrame, recipe: Recipe) -> str:
    """Markdown for report.md: both findings as far as the run has the rows, or ''."""
    first, second = augmentation_lowers_fid(frame, recipe), fid_against_level(frame, recipe)
    if not first and not second:
        return ""
    text = "\n## CDM's findings, checked on this run\n\n"
    if first:
        text += ("Conditioning augmentation lowers the cascade's FID (each SR stage as `cdmbench "
                 "evaluate` measured it, on generated inputs). ± is one standard error: over the "
                 "training runs of a stage with replicates (`replicates: k`), else over the samples "
                 "only (the bootstrap), which leaves the spread between training runs out:\n\n"
                 + "\n".join(first) + "\n\n")
    if second:
        text += ("FID against the sampling level s: with generated inputs it first improves, then "
                 "worsens (best s inside the swept range); with ground-truth inputs it only worsens "
                 "(best at the smallest s). A stage whose replicates were swept too is one curve: "
                 "at each level all its runs have, their mean, ± as above:\n\n" + "\n".join(second) + "\n")
    return text
