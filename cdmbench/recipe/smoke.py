"""``--smoke``: shrink any recipe so every stage runs end to end on a CPU in minutes.

``smoke(raw, num_classes)`` rewrites a raw (YAML-loaded) recipe before validation, so it works
for any recipe; the rules, per stage and section:

- backbone ``adm-unet``, or any backbone whose args name ``channels`` (``diffusers-unet2d``):
  channels 32, every channel_mult entry 1 (same length: the same downsampling), num_res_blocks
  1, num_head_channels 32 where set > 0; attention kept.
- schedule ``cosine``/``linear``: at most 100 timesteps. sampler: steps min(steps or T, 10),
  other args kept. A truncated ``gaussian`` augmentation's level is rounded to the new 1/T grid
  of the stage it conditions on.
- train: steps 2, batch_size 2 x grad_accumulation, checkpoint_every 1, log_every 1,
  val_bpd_images at most 2, eval_every at most 2 and eval_num_samples at most 16, precision fp32,
  compile false.
- sample: images_per_class 1, batch_size 8, num_classes min(classes, 4).
- evaluate: num_samples (and the search's) at most 16, batch_size 8, shard_size 8; ``cas`` and ``classifier``
  feature-network epochs at most 1; ``cas`` batch size at most 16 and without
  ``paper_protocol`` (so its training set is replaced only where ``replace_training_set`` says so).
- data: the procedural ``shapes`` dataset with the same number of classes (stand-in), at every
  stage's resolution; name: ``<name>-smoke`` (so the run directory is ``runs/<name>-smoke``).

``load_recipe(..., smoke=True)`` finds the class count (``prepare.recipe_classes``) and applies
``--set`` overrides around it: those under ``data`` first (they choose the real dataset whose
class count the stand-in copies), all others after ``smoke`` (so ``--set`` wins over smoke values).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

SUFFIX = "-smoke"
DISCRETE_SCHEDULES = ("cosine", "linear")
MAX_TIMESTEPS = 100
MAX_SAMPLER_STEPS = 10
SAMPLE_CLASSES = 4


def _args(node: Any) -> dict[str, Any] | None:
    """The ``args`` mapping of a raw component (created if missing); None if not a mapping."""
    if not isinstance(node, dict):
        return None
    args = node.setdefault("args", {})
    return args if isinstance(args, dict) else None


def _number(value: Any) -> bool:
    """A number smoke may shrink: NaN and infinities are left for validation to refuse by key."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and (isinstance(value, int) or math.isfinite(value)))


def _shrink_stage(stage: dict[str, Any], timesteps: dict[str, int | None]) -> None:
    backbone = stage.get("backbone")
    args = _args(backbone)
    adm = isinstance(backbone, dict) and backbone.get("name") == "adm-unet"
    if args is not None and (adm or "channels" in args):  # adm-unet's arguments (diffusers-unet2d too)
        args["channels"] = 32
        mult = args.get("channel_mult", (1, 2, 2, 2) if adm else None)  # adm-unet's default
        if isinstance(mult, (list, tuple)):
            args["channel_mult"] = [1] * len(mult)
        if adm or "num_res_blocks" in args:
            args["num_res_blocks"] = 1
        if _number(args.get("num_head_channels")) and args["num_head_channels"] > 0:
            args["num_head_channels"] = 32
    schedule = stage.get("schedule")
    T = None
    args = _args(schedule)
    if args is not None and schedule.get("name") in DISCRETE_SCHEDULES:
        T = args.get("timesteps", 1000)
        if _number(T):
            T = args["timesteps"] = min(int(T), MAX_TIMESTEPS)
    timesteps[stage.get("name")] = T if _number(T) else None
    sampler = stage.get("sampler")
    if isinstance(sampler, str):
        sampler = stage["sampler"] = {"name": sampler}
    args = _args(sampler)
    if args is not None:
        steps = args.get("steps")
        base = steps if _number(steps) and steps >= 1 else (T or MAX_SAMPLER_STEPS)
        args["steps"] = min(int(base), MAX_SAMPLER_STEPS)
    augmentation = stage.get("augmentation")
    cond_T = timesteps.get(stage.get("condition_on"))
    for aug in augmentation if isinstance(augmentation, list) else [augmentation]:
        args = _args(aug) if isinstance(aug, dict) else None
        if (args is not None and aug.get("name") == "gaussian" and args.get("mode") == "truncated"
                and cond_T and _number(args.get("level"))):
            args["level"] = max(1, round(args["level"] * cond_T)) / cond_T
    train = stage.get("train")
    if isinstance(train, dict):
        accumulation = train.get("grad_accumulation", 1)
        train.update(steps=2, batch_size=2 * (accumulation if _number(accumulation) else 1),
                     checkpoint_every=1, log_every=1, precision="fp32", compile=False)
        for key, most in (("val_bpd_images", 2), ("eval_every", 2), ("eval_num_samples", 16)):
            if _number(train.get(key)):
                train[key] = min(train[key], most)


def _shrink_metric(metric: Any) -> Any:
    if isinstance(metric, str):
        metric = {"name": metric}
    args = _args(metric)
    if args is None:
        return metric
    if metric.get("name") == "cas":
        args["epochs"] = min(args.get("epochs", 1), 1) if _number(args.get("epochs")) else 1
        args["paper_protocol"] = False  # it needs ImageNet's 1.28M images
        args["batch_size"] = min(args["batch_size"], 16) if _number(args.get("batch_size")) else 16
    if args.get("features") == "classifier":
        features_args = args.get("features_args") or {}
        if isinstance(features_args, dict):
            epochs = features_args.get("epochs")
            features_args["epochs"] = min(epochs, 1) if _number(epochs) else 1
            args["features_args"] = features_args
    return metric


def smoke(raw: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """A shrunk copy of the raw recipe ``raw`` (see the module docstring); ``num_classes`` is the
    class count of the generated stand-in data. Keys it cannot read are left for validation."""
    if not isinstance(raw, dict):
        return raw
    out = copy.deepcopy(raw)
    name = out.get("name")
    if isinstance(name, str) and not name.endswith(SUFFIX):
        out["name"] = name + SUFFIX
    timesteps: dict[str, int | None] = {}
    for stage in out.get("stages") or []:
        if isinstance(stage, dict):
            _shrink_stage(stage, timesteps)
    sample = out.get("sample")
    sample = out["sample"] = sample if isinstance(sample, dict) else {}
    sample.update(images_per_class=1, batch_size=8, num_classes=min(num_classes, SAMPLE_CLASSES))
    evaluate = out.get("evaluate")
    evaluate = out["evaluate"] = evaluate if isinstance(evaluate, dict) else {}
    n = evaluate.get("num_samples")
    evaluate.update(num_samples=min(n, 16) if _number(n) else 16, batch_size=8, shard_size=8)
    if isinstance(evaluate.get("metrics"), list):
        evaluate["metrics"] = [_shrink_metric(m) for m in evaluate["metrics"]]
    search = evaluate.get("search")
    if isinstance(search, dict):
        n = search.get("num_samples")
        search["num_samples"] = min(n, 16) if _number(n) else 16
    out["data"] = {"name": "shapes", "args": {"num_images": max(2 * num_classes, 32),
                                              "num_classes": num_classes}}
    return out


def _is_data_override(assignment: str) -> bool:
    key = assignment.partition("=")[0]
    return key == "data" or key.startswith("data.")


def smoke_recipe(raw: Any, overrides: tuple[str, ...] | list[str] = (), plugins=None,
                 echo: Callable[[str], Any] = print) -> tuple[Any, list[str]]:
    """``raw`` shrunk for ``--smoke`` and the overrides still to apply: ``data`` overrides are
    applied first (they pick the real dataset whose class count the stand-in copies), the rest
    are returned, to be applied after ``smoke`` so that they win over its values."""
    from cdmbench.recipe.components import recipe_classes
    from cdmbench.recipe.validate import apply_override

    if not isinstance(raw, dict):
        return raw, list(overrides)
    raw = copy.deepcopy(raw)
    for assignment in overrides:
        if _is_data_override(assignment):
            apply_override(raw, assignment)
    count, source = recipe_classes(raw, plugins)
    echo(f"smoke: stand-in data with {count} classes ({source})")
    return smoke(raw, count), [a for a in overrides if not _is_data_override(a)]
