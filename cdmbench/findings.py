"""CDM's conditioning-augmentation findings (../shared/CDM.md), checked on a run's own rows.

1. Augmentation lowers the cascade's FID: every SR stage with augmentation against the stage
   without any (`none`) that conditions on the same stage at the same resolution, each
   evaluated on generated low-res inputs (`cdmbench evaluate`).
2. FID against the sampling level s (`cdmbench sweep`): with generated low-res inputs it first
   improves, then worsens (its minimum lies strictly inside the swept range); with ground-truth
   inputs it only worsens (its minimum is at the smallest s).

Each line states the numbers compared and whether the finding holds; nothing is judged by hand.
"""

from __future__ import annotations

import pandas as pd

from .recipe import Recipe, Stage
from .report import features_label, is_sweep, sweep_rows


def _fid_rows(frame: pd.DataFrame, sweeps: bool) -> pd.DataFrame:
    """The ok FID rows (any reference split), sweep rows or the others, with a metric label that
    names the feature network."""
    if frame.empty:
        return frame
    rows = frame[(frame["status"] == "ok") & frame["metric"].str.startswith("fid")
                 & (frame["protocol"].map(is_sweep) == sweeps)].copy()
    rows["label"] = rows["metric"] + rows["protocol"].map(features_label)
    return rows


def _augmentation(stage: Stage) -> str:
    parts = [a.name + (f" {a.args['mode']}" if "mode" in a.args else "") for a in stage.augmentations()]
    return " + ".join(parts)


def augmentation_lowers_fid(frame: pd.DataFrame, recipe: Recipe) -> list[str]:
    """Finding 1, one line per (augmented stage, FID metric) with an unaugmented sibling."""
    rows = _fid_rows(frame, sweeps=False)
    if rows.empty:
        return []
    fid = {(r.stage, r.label): r for r in rows.itertuples()}
    lines = []
    for plain in recipe.stages:
        if plain.condition_on is None or _augmentation(plain) != "none":
            continue
        for other in recipe.stages:
            if (other.condition_on, other.resolution) != (plain.condition_on, plain.resolution) or other is plain:
                continue
            for label in sorted({lab for st, lab in fid if st == other.name and (plain.name, lab) in fid}):
                ours, theirs = fid[other.name, label], fid[plain.name, label]
                head = f"- `{other.name}` ({_augmentation(other)}) against `{plain.name}` (none), {label}: "
                differs = _unlike(ours, theirs, plain.condition_on)
                if differs:
                    lines.append(head + f"not comparable ({differs})")
                    continue
                verdict = "lower: holds" if ours.value < theirs.value else "not lower: does not hold"
                lines.append(head + f"{ours.value:.4g} vs {theirs.value:.4g}, {verdict}")
    return lines


def _unlike(a, b, previous: str) -> str:
    """What makes two stages' FID rows incomparable: sample counts, or the samples of the stage
    both are conditioned on; empty when nothing does."""
    if a.n != b.n:
        return f"n {a.n} vs {b.n}"
    first, second = (r.protocol.get("samplers", {}).get(previous) for r in (a, b))
    return "" if first == second else f"{previous} sampled by {first} vs {second}"


def fid_against_level(frame: pd.DataFrame) -> list[str]:
    """Finding 2, one line per swept (stage, samplers, inputs, FID metric) with at least 3 levels:
    sweeps that differ in any stage's sampler are separate curves."""
    rows = _fid_rows(sweep_rows(frame), sweeps=True)
    if rows.empty:
        return []
    lines = []
    for (stage, samplers, inputs, label), group in rows.groupby(["stage", "samplers", "inputs", "label"], sort=True):
        curve = group.sort_values("s")
        if len(curve) < 3:
            continue
        s, value = curve["s"].tolist(), curve["value"].tolist()
        best = value.index(min(value))
        if inputs == "generated":
            holds = 0 < best < len(value) - 1
            claim = "first improves, then worsens"
        else:
            holds = best == 0
            claim = "only worsens"
        points = ", ".join(f"{a:g}: {v:.4g}" for a, v in zip(s, value))
        lines.append(f"- `{stage}`{f' ({samplers})' if samplers else ''}, {inputs} inputs, {label} at s = "
                     f"{points}; best at s = {s[best]:g}. {claim.capitalize()}: "
                     f"{'holds' if holds else 'does not hold'}")
    return lines


def findings_section(frame: pd.DataFrame, recipe: Recipe) -> str:
    """Markdown for report.md: both findings as far as the run has the rows, or ''."""
    first, second = augmentation_lowers_fid(frame, recipe), fid_against_level(frame)
    if not first and not second:
        return ""
    text = "\n## CDM's findings, checked on this run\n\n"
    if first:
        text += ("Conditioning augmentation lowers the cascade's FID (each SR stage as `cdmbench "
                 "evaluate` measured it, on generated inputs):\n\n" + "\n".join(first) + "\n\n")
    if second:
        text += ("FID against the sampling level s: with generated inputs it first improves, then "
                 "worsens (best s inside the swept range); with ground-truth inputs it only worsens "
                 "(best at the smallest s):\n\n" + "\n".join(second) + "\n")
    return text
