"""Recipe validation: a raw (YAML-loaded) mapping, with ``--set`` overrides applied, converted to the
``schema`` dataclasses and checked against the registered components.

Strict: unknown keys, wrong types, numbers outside their field's bound (NaN and infinities
included; ``schema.Bound``), non-finite numbers in component ``args``, names that would not be one
path component, unknown component names and ``args`` a factory does not accept all fail here,
before any data or model is touched, with the dotted path of the bad key (stages are addressed by
name: ``stages.sr32.backbone.args.channels``).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import re
import types
import typing
from typing import Any, Union

import yaml

from cdmbench.diffusion.process import LOSSES
from cdmbench.errors import RecipeError, RegistryError
from cdmbench.interfaces import HOST_ARGS
from cdmbench.plugins import Plugins, load_plugins
from cdmbench.recipe.schema import (
    FORMAT_VERSION,
    MAX_SEARCH_POINTS,
    MAX_SIGMA_REL,
    REPLICATES,
    RUN_NAME_RE,
    SEARCH_KEY_RE,
    SEARCH_STRATEGIES,
    SIGMA_BOUND,
    STAGE_NAME_RE,
    Component,
    Recipe,
    Stage,
)
from cdmbench.recipe.yamlfile import parse_yaml
from cdmbench.registry import suggestion

DEVICE_RE = re.compile(r"auto|cpu|cuda(:[0-9]{1,4})?")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if isinstance(tp, type):
        return {"int": "an integer", "float": "a number", "str": "a string", "bool": "true/false",
                "list": "a list", "dict": "a mapping", "tuple": "a list"}.get(tp.__name__, tp.__name__)
    return str(tp).replace("typing.", "")



def _convert(value: Any, tp: Any, path: str) -> Any:
    """``value`` checked against (and converted to) the type hint ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, path)
            except RecipeError as exc:
                errors.append(exc)
        deeper = [exc for exc in errors if exc.path != path]  # the value has an option's shape
        if deeper:
            raise deeper[0]
        names = " or ".join(_type_name(o) for o in typing.get_args(tp))
        raise RecipeError(path, f"expected {names}, got {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise RecipeError(path, f"expected one of {', '.join(map(repr, typing.get_args(tp)))}, got {value!r}")
        return value
    if tp is Component and isinstance(value, str):  # a bare name: no args
        return Component(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(path, f"expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:  # tuple[int, str]: one type per item
            if len(value) != len(args):
                raise RecipeError(path, f"expected a list of {len(args)} items, got {value!r}")
            return [_convert(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, args, strict=True))]
        item = args[0] if args else Any
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise RecipeError(path, f"expected a mapping, got {value!r}")
        key_type, item = typing.get_args(tp) or (Any, Any)
        return {_convert(k, key_type, path): _convert(v, item, _join(path, str(k))) for k, v in value.items()}
    if tp is type(None):
        if value is not None:
            raise RecipeError(path, f"expected null, got {value!r}")
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise RecipeError(path, f"an integer of {value.bit_length()} bits is too large for a number; "
                                    "use a sensible value") from None
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise RecipeError(path, f"expected {_type_name(tp)}, got {value!r}")
        return value
    return value  # a type we cannot check (a plugin's own class): the factory checks it



def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(path, f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise RecipeError(_join(path, str(key)),
                              f"unknown key; {suggestion(str(key), fields)}")
    values = {}
    for name, f in fields.items():
        if name in data:
            sub = _join(path, name)
            values[name] = (_build_stages(data[name], sub) if name == "stages"
                            else _convert(data[name], hints[name], sub))
            if "bound" in f.metadata and values[name] is not None:  # NaN, inf and absurd sizes
                f.metadata["bound"].check(values[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(_join(path, name), "required key is missing")
    return cls(**values)


def parse_section(cls: type, data: Any, path: str) -> Any:
    """One section of the schema (a dataclass such as ``Launch``) from a raw mapping kept outside a
    recipe (a user's config file), checked as in a recipe; errors name ``path``."""
    return _build(cls, data, path)



def _build_stages(data: Any, path: str) -> list[Stage]:
    """The stages, with the copies that ``replicates: k`` asks for appended after all of them."""
    if not isinstance(data, list) or not data:
        raise RecipeError(path, "expected a non-empty list of stages")
    stages, copies = [], []
    for i, item in enumerate(data):
        name = item.get("name") if isinstance(item, dict) else None
        where = _join(path, name) if isinstance(name, str) else f"{path}[{i}]"
        count = 1
        if isinstance(item, dict) and "replicates" in item:
            item = dict(item)
            count = _convert(item.pop("replicates"), int, f"{where}.replicates")
            REPLICATES.check(count, f"{where}.replicates")
        stage = _build(Stage, item, where)
        stages.append(stage)
        copies += [dataclasses.replace(copy.deepcopy(stage), name=f"{stage.name}_r{k}", replicate_of=stage.name)
                   for k in range(2, count + 1)]
    return stages + copies



def complete(raw: dict[str, Any]) -> dict[str, Any]:
    """A resolved recipe (a run.yaml's) as this cdmbench writes it: keys added since at their
    defaults, so that comparing it with a new recipe sees real differences only."""
    return _build(Recipe, copy.deepcopy(raw), "").to_dict()



def _join(path: str, key: str) -> str:
    """``path.key``; a key that is not one printable line (a newline, a control character) as its repr,
    so that an error stays one line."""
    key = key if key.isprintable() else repr(key)
    return f"{path}.{key}" if path else key



def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to the raw recipe; stages by name."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise RecipeError("--set", f"expected key=value, got {assignment!r}")
    parts = key.split(".")
    if not key.isprintable():
        raise RecipeError("--set", f"{key!r} is not a key (it holds a newline or control character); "
                                   "write a dotted key such as stages.base16.train.steps")
    if not all(parts):
        raise RecipeError("--set", f"{key!r} has an empty part; write a dotted key such as "
                                   "stages.base16.train.steps")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):  # stages (and lists of components), addressed by name
            found = [j for j, item in enumerate(node) if isinstance(item, dict) and item.get("name") == part]
            if not found:  # a bare-string item (``metrics: [is]``) has no keys to set
                names = [item.get("name") for item in node if isinstance(item, dict)]
                what = "stage" if parts[0] == "stages" else "item with keys named"
                raise RecipeError(here, f"no {what} '{part}'; {suggestion(part, names)}")
            node = node[found[0]]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise RecipeError(here, f"cannot set a key inside {node!r}")
    if not isinstance(node, dict):
        raise RecipeError(key, "cannot set a key here")
    node[parts[-1]] = parse_yaml(text, f"--set value {text!r}", key, hint="quote a string, or write a "
                                 "list as [a, b] and a mapping as {k: v}")



def check_component(plugins: Plugins, kind: str, spec: Component, path: str) -> None:
    """The name is registered and ``args`` fit the factory's signature and type hints."""
    try:
        component = plugins[kind].get(spec.name)
    except RegistryError as exc:
        raise RecipeError(f"{path}.name", str(exc)) from None
    params = component.parameters()
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    try:  # resolved at registration (Registry.add refuses hints that do not resolve)
        hints = component.hints()
    except Exception as exc:  # a Component made without the registry
        raise RecipeError(path, f"{kind[:-1]} '{spec.name}' of plugin '{component.plugin}': a type hint of "
                                f"its factory does not resolve ({type(exc).__name__}: {exc})") from None
    host = HOST_ARGS[kind]
    for key, value in spec.args.items():
        where = _join(f"{path}.args", str(key))
        if key in host:
            raise RecipeError(where, f"is set by cdmbench from the run (host facts for {kind}: "
                                     f"{', '.join(host)}); remove it from the recipe")
        if key not in params and not takes_any:
            valid = [p for p in params if p not in host]
            raise RecipeError(where, f"{kind[:-1]} '{spec.name}' takes no argument '{key}'; "
                                     f"{suggestion(key, valid)}")
        if key in hints:
            spec.args[key] = _convert(value, hints[key], where)
        _finite(spec.args[key], where)
    for name, p in params.items():
        if (p.default is inspect.Parameter.empty and name not in host and name not in spec.args
                and p.kind is inspect.Parameter.KEYWORD_ONLY):
            raise RecipeError(f"{path}.args.{name}", f"required by {kind[:-1]} '{spec.name}'")



def _finite(value: Any, path: str) -> None:
    """A ``RecipeError`` at ``path`` for a NaN or infinite number anywhere in ``value`` (component args)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(path, f"must be a finite number, got {value!r}; set a number")
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _finite(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for k, item in value.items():
            _finite(item, _join(path, str(k)))



def _check(recipe: Recipe, plugins: Plugins) -> None:
    if recipe.cdmbench != FORMAT_VERSION:
        raise RecipeError("cdmbench", f"unsupported recipe format {recipe.cdmbench}; this "
                                      f"cdmbench reads format {FORMAT_VERSION}")
    if not RUN_NAME_RE.fullmatch(recipe.name):
        raise RecipeError("name", f"{recipe.name!r} cannot name a run directory (runs/<name>): use one "
                                  "path component of letters, digits, '.', '_', '+' and '-' that starts "
                                  "with a letter or digit, at most 128 characters, e.g. 'quickstart'")
    if not DEVICE_RE.fullmatch(recipe.device):
        raise RecipeError("device", f"expected auto, cpu, cuda or cuda:N, got {recipe.device!r}")
    check_component(plugins, "datasets", recipe.data, "data")
    seen: dict[str, Stage] = {}
    for stage in recipe.stages:
        path = _join("stages", stage.name)
        if not STAGE_NAME_RE.fullmatch(stage.replicate_of or stage.name):  # a copy: its stage's name
            raise RecipeError(f"{path}.name", f"{stage.name!r} is not a stage name: lower-case letters, "
                                              "digits, - and _, starting with a letter, at most 64 characters")
        if stage.name in seen:
            raise RecipeError(f"{path}.name", "two stages have this name")
        original = seen.get(stage.replicate_of) if stage.replicate_of else None
        if stage.replicate_of and (original is None or original.replicate_of is not None):
            raise RecipeError(f"{path}.replicate_of", f"'{stage.replicate_of}' is not an earlier stage "
                              "that is not itself a replicate; use `replicates: k` on the stage")
        if stage.replicate_of and not re.fullmatch(rf"{re.escape(stage.replicate_of)}_r[0-9]{{1,3}}", stage.name):
            raise RecipeError(f"{path}.name", f"a copy of stage '{stage.replicate_of}' is named "
                              f"{stage.replicate_of}_r<k>; use `replicates: k` on the stage")
        if stage.loss not in LOSSES:
            raise RecipeError(f"{path}.loss", f"unknown loss '{stage.loss}'; {suggestion(stage.loss, LOSSES)}")
        guided_by = _check_guide(recipe, stage, f"{path}.guidance")
        if stage.guidance.scale != 1.0 and stage.guidance.label_dropout == 0.0 and guided_by is None:
            raise RecipeError(f"{path}.guidance.scale", "guidance needs an unconditional model: "
                              "set guidance.label_dropout (e.g. 0.1) and train, or a guide network "
                              "(guidance.guide_step or guide_stage), or use scale 1")
        _check_interval(stage.guidance, f"{path}.guidance.interval")
        if stage.condition_on is None:
            if any(a.name != "none" for a in stage.augmentations()):
                raise RecipeError(f"{path}.augmentation", "only a stage with condition_on "
                                  "(a super-resolution stage) can augment its low-res input")
        else:
            prev = seen.get(stage.condition_on)
            if prev is None:
                raise RecipeError(f"{path}.condition_on",
                                  f"'{stage.condition_on}' is not an earlier stage; "
                                  f"{suggestion(stage.condition_on, seen)}")
            if prev.resolution >= stage.resolution:
                raise RecipeError(f"{path}.resolution", f"{stage.resolution} must exceed the "
                                  f"resolution of '{prev.name}' ({prev.resolution})")
        train = stage.train
        if train.val_bpd_images and stage.loss != "hybrid":
            raise RecipeError(f"{path}.train.val_bpd_images", "bits/dim needs the learned variance "
                              "of loss: hybrid and a count >= 0; set it to 0 or use loss: hybrid")
        if train.eval_every > train.steps:
            raise RecipeError(f"{path}.train.eval_every", f"must be at most steps ({train.steps}), got "
                              f"{train.eval_every}; lower it (the last step is always evaluated), or 0")
        _check_posthoc_ema(train, f"{path}.train.posthoc_ema")
        if stage.posthoc_sigma_rel is not None:
            if not train.posthoc_ema.sigma_rels:
                raise RecipeError(f"{path}.posthoc_sigma_rel", "needs post-hoc EMA snapshots: set "
                                  "train.posthoc_ema.sigma_rels (e.g. [0.05, 0.1]) and train, or set it to null")
            _check_sigma_rel(stage.posthoc_sigma_rel, f"{path}.posthoc_sigma_rel")
        if train.eval_every and guided_by is not None:
            raise RecipeError(f"{path}.train.eval_every", f"evaluations during training cannot guide with "
                              f"autoguidance's guide network ({guided_by}), which is loaded after training; set "
                              "eval_every to 0 and evaluate the trained run (cdmbench evaluate)")
        if train.eval_every and not recipe.evaluate.metrics:
            raise RecipeError(f"{path}.train.eval_every", "evaluates with evaluate.metrics, which is empty; "
                              "list metrics there (e.g. [fid]) or set eval_every to 0")
        if train.precision not in ("fp32", "bf16"):
            raise RecipeError(f"{path}.train.precision", f"expected fp32 or bf16, got {train.precision!r}")
        if train.batch_size % train.grad_accumulation:
            raise RecipeError(f"{path}.train.grad_accumulation", f"must divide batch_size "
                              f"({train.batch_size}), got {train.grad_accumulation}")
        for kind, spec, key in (("backbones", stage.backbone, "backbone"),
                                ("schedules", stage.schedule, "schedule"),
                                ("samplers", stage.sampler, "sampler")):
            check_component(plugins, kind, spec, f"{path}.{key}")
        many = isinstance(stage.augmentation, list)
        for i, spec in enumerate(stage.augmentations()):
            check_component(plugins, "augmentations", spec, f"{path}.augmentation" + (f"[{i}]" if many else ""))
        seen[stage.name] = stage
    if recipe.sample.precision not in ("train", "fp32", "bf16"):
        raise RecipeError("sample.precision", "expected train (each stage's train.precision), fp32 or "
                          f"bf16, got {recipe.sample.precision!r}")
    evaluate = recipe.evaluate
    if evaluate.labels not in ("random", "balanced"):
        raise RecipeError("evaluate.labels", "expected random (uniform class labels, as published rows draw "
                          f"them) or balanced (image i of class i mod K), got {evaluate.labels!r}")
    for i, metric in enumerate(evaluate.metrics):
        check_component(plugins, "metrics", metric, f"evaluate.metrics[{i}]")
    if evaluate.stage is not None and evaluate.stage not in seen:
        raise RecipeError("evaluate.stage", f"no stage '{evaluate.stage}'; {suggestion(evaluate.stage, seen)}")
    _check_search(recipe, plugins)
    logged: set[str] = set()
    for i, logger in enumerate(recipe.log_to):
        check_component(plugins, "loggers", logger, f"log_to[{i}]")
        if logger.name in logged:
            raise RecipeError(f"log_to[{i}]", f"logger '{logger.name}' is listed twice; list each logger once")
        logged.add(logger.name)



def assignment(key: str, value: Any) -> str:
    """``key=value`` as ``--set`` (``apply_override``) reads ``value`` back: YAML flow style."""
    text = yaml.safe_dump(value, default_flow_style=True, width=2**31).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def _check_search(recipe: Recipe, plugins: Plugins) -> None:
    """``evaluate.search``: sampling-time keys only (``SEARCH_KEY_RE``) of stages that exist, each
    candidate a valid setting of the recipe (checked alone; ``evaluation.search`` checks the joint
    points), a metric to optimise, and a grid of at most ``MAX_SEARCH_POINTS``."""
    search, path = recipe.evaluate.search, "evaluate.search"
    if not search.space:
        return
    if not search.metric:
        raise RecipeError(f"{path}.metric", "required with a space: name the result row to optimise, e.g. fid_train")
    if search.strategy not in SEARCH_STRATEGIES:
        raise RecipeError(f"{path}.strategy", f"expected grid or coordinate, got {search.strategy!r}")
    listed = [m.name for m in recipe.evaluate.metrics]
    for i, name in enumerate(search.metrics):
        if name not in listed:
            raise RecipeError(f"{path}.metrics[{i}]", f"'{name}' is not in evaluate.metrics; "
                                                      f"{suggestion(name, listed)}")
    if search.strategy == "grid" and math.prod(map(len, search.space.values())) > MAX_SEARCH_POINTS:
        raise RecipeError(f"{path}.space", f"a grid of {math.prod(map(len, search.space.values()))} points (over "
                                           f"{MAX_SEARCH_POINTS}); use strategy: coordinate, or fewer candidates")
    base = recipe.to_dict()
    base["evaluate"]["search"] = {}
    for key, values in search.space.items():
        where = f"{path}.space.{key}"
        if not SEARCH_KEY_RE.fullmatch(key):
            raise RecipeError(where, "is not a sampling-time key: a search changes how the trained weights are "
                                     "sampled, never how they were trained (train, backbone, schedule, loss, data "
                                     "need another training run); search a stage's sampler, guidance.scale, "
                                     "guidance.interval, guidance.guide_step, guidance.guide_stage, "
                                     "posthoc_sigma_rel or augmentation.args.level, or sample.precision")
        if key.startswith("stages.") and key.split(".")[1] not in recipe.stage_names():
            raise RecipeError(where, f"no stage '{key.split('.')[1]}'; "
                                     f"{suggestion(key.split('.')[1], recipe.stage_names())}")
        if not values or len({repr(v) for v in values}) < len(values):
            raise RecipeError(where, f"expected a non-empty list of different candidates, got {values!r}")
        for value in values:
            try:
                parse_recipe(copy.deepcopy(base), overrides=[assignment(key, value)], plugins=plugins)
            except RecipeError as exc:
                raise RecipeError(where, f"candidate {value!r}: {exc}") from None


def _check_sigma_rel(sigma_rel: float, path: str) -> None:
    """An EMA length sigma_rel lies in (0, sqrt(1/12)): longer than the plain average of all steps
    has no power-function profile."""
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise RecipeError(path, f"must be in (0, {MAX_SIGMA_REL:.4f}) (the plain average of all steps), got "
                                f"{sigma_rel}; EDM2 stores 0.05 and 0.10")


def _check_posthoc_ema(train, path: str) -> None:
    """Post-hoc EMA lengths each in (0, sqrt(1/12)), all different; snapshots at most every ``steps``."""
    sigma_rels = train.posthoc_ema.sigma_rels
    for i, sigma_rel in enumerate(sigma_rels):
        _check_sigma_rel(sigma_rel, f"{path}.sigma_rels[{i}]")
    if len(set(sigma_rels)) < len(sigma_rels):
        raise RecipeError(f"{path}.sigma_rels", f"lists a length twice ({sigma_rels}); list each once")
    if sigma_rels and train.posthoc_ema.snapshot_every > train.steps:
        raise RecipeError(f"{path}.snapshot_every", f"must be at most steps ({train.steps}), got "
                                                    f"{train.posthoc_ema.snapshot_every}; lower it")


GUIDE_MATCHES = ("resolution", "condition_on", "loss", "schedule", "augmentation")  # a guide stage's


def _check_guide(recipe: Recipe, stage: Stage, path: str) -> str | None:
    """Autoguidance's guide network, when set: one of an earlier step (below ``train.steps``) or
    another stage predicting the same thing from the same inputs (``GUIDE_MATCHES``), with a
    guidance scale other than 1. Returns what guides, or None."""
    guidance = stage.guidance
    if guidance.guide_step is not None and guidance.guide_stage is not None:
        raise RecipeError(f"{path}.guide_stage", "set one guide network: guide_step (an earlier checkpoint of "
                                                 "this stage) or guide_stage (another stage), not both")
    if guidance.guide_step is not None and guidance.guide_step >= stage.train.steps:
        raise RecipeError(f"{path}.guide_step", f"must be an earlier step than train.steps ({stage.train.steps}), "
                                                f"got {guidance.guide_step}")
    if guidance.guide_stage is not None:
        names = [s.name for s in recipe.stages if s.name != stage.name]
        if guidance.guide_stage not in names:
            raise RecipeError(f"{path}.guide_stage", f"'{guidance.guide_stage}' is not another stage of the "
                                                     f"recipe; {suggestion(guidance.guide_stage, names)}")
        other = recipe.stage(guidance.guide_stage)
        for key in GUIDE_MATCHES:
            if getattr(other, key) != getattr(stage, key):
                raise RecipeError(f"{path}.guide_stage", f"stage {other.name} has another {key} "
                                                         f"({getattr(other, key)!r} vs {getattr(stage, key)!r}); a "
                                                         f"guide stage predicts the same thing from the same inputs")
    guide = guidance.guide_stage or (None if guidance.guide_step is None else f"step {guidance.guide_step}")
    if guide is not None and guidance.scale == 1.0:
        raise RecipeError(f"{path}.scale", f"is 1 (no guidance) but a guide network is set ({guide}); set a "
                                           "scale, e.g. 2.0, or remove the guide")
    return guide


def _check_interval(guidance, path: str) -> None:
    """A guidance interval is two noise levels sigma, 0 < low < high <= 10^6, of a guided stage."""
    if guidance.interval is None:
        return
    low, high = guidance.interval
    if not (SIGMA_BOUND.contains(low) and SIGMA_BOUND.contains(high) and low < high):
        raise RecipeError(path, f"must be [low, high] with low < high, both in {SIGMA_BOUND.interval}, got "
                                f"[{low}, {high}]; e.g. [0.28, 5.42] (EDM2-XXL's)")
    if guidance.scale == 1.0:
        raise RecipeError(path, "limits guidance to an interval of noise levels, but guidance.scale is 1 (no "
                                "guidance); set a scale, or remove the interval")


def parse_recipe(raw: Any, *, overrides: tuple[str, ...] | list[str] = (),
                 plugins: Plugins | None = None) -> tuple[Recipe, Plugins]:
    """Validate a raw (YAML-loaded) recipe; returns it with the plugins it was checked against."""
    if not isinstance(raw, dict):
        raise RecipeError("", f"a recipe is a YAML mapping, got {type(raw).__name__}")
    for assignment in overrides:
        apply_override(raw, assignment)
    recipe = _build(Recipe, raw, "")
    plugins = plugins or load_plugins(recipe.plugins)
    _check(recipe, plugins)
    return recipe, plugins
