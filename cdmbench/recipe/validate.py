"""Recipe validation: a raw (YAML-loaded) mapping, with ``--set`` overrides applied, converted to the
``schema`` dataclasses and checked against the registered components.

Strict: unknown keys, wrong types, unknown component names and ``args`` a factory does not
accept all fail here, before any data or model is touched, with the dotted path of the bad key
(stages are addressed by name: ``stages.sr32.backbone.args.channels``).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import types
import typing
from typing import Any, Union

import yaml

from cdmbench.diffusion.process import LOSSES
from cdmbench.errors import RecipeError, RegistryError
from cdmbench.interfaces import HOST_ARGS
from cdmbench.plugins import Plugins, load_plugins
from cdmbench.recipe.schema import FORMAT_VERSION, STAGE_NAME_RE, Component, Recipe, Stage
from cdmbench.registry import suggestion


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
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
        return float(value)
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
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(_join(path, name), "required key is missing")
    return cls(**values)



def _build_stages(data: Any, path: str) -> list[Stage]:
    """The stages, with the copies that ``replicates: k`` asks for appended after all of them."""
    if not isinstance(data, list) or not data:
        raise RecipeError(path, "expected a non-empty list of stages")
    stages, copies = [], []
    for i, item in enumerate(data):
        name = item.get("name") if isinstance(item, dict) else None
        where = f"{path}.{name}" if isinstance(name, str) else f"{path}[{i}]"
        count = 1
        if isinstance(item, dict) and "replicates" in item:
            item = dict(item)
            count = _convert(item.pop("replicates"), int, f"{where}.replicates")
        if count < 1:
            raise RecipeError(f"{where}.replicates", f"must be >= 1 (trainings of this stage), got {count}")
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
    return f"{path}.{key}" if path else key



def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to the raw recipe; stages by name."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise RecipeError("--set", f"expected key=value, got {assignment!r}")
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):  # stages, addressed by name
            names = [s.get("name") for s in node if isinstance(s, dict)]
            if part not in names:
                raise RecipeError(here, f"no stage '{part}'; {suggestion(part, names)}")
            node = node[names.index(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise RecipeError(here, f"cannot set a key inside {node!r}")
    if not isinstance(node, dict):
        raise RecipeError(key, "cannot set a key here")
    try:
        node[parts[-1]] = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(key, f"--set value {text!r} is not valid YAML ({exc.problem or exc}); quote a "
                               "string, or write a list as [a, b] and a mapping as {k: v}") from None



def check_component(plugins: Plugins, kind: str, spec: Component, path: str) -> None:
    """The name is registered and ``args`` fit the factory's signature and type hints."""
    try:
        component = plugins[kind].get(spec.name)
    except RegistryError as exc:
        raise RecipeError(f"{path}.name", str(exc)) from None
    params = component.parameters()
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    try:
        hints = typing.get_type_hints(component.factory)
    except Exception:  # unresolvable annotations in a plugin: skip the type check
        hints = {}
    host = HOST_ARGS[kind]
    for key, value in spec.args.items():
        where = f"{path}.args.{key}"
        if key in host:
            raise RecipeError(where, f"is set by cdmbench from the run (host facts for {kind}: "
                                     f"{', '.join(host)}); remove it from the recipe")
        if key not in params and not takes_any:
            valid = [p for p in params if p not in host]
            raise RecipeError(where, f"{kind[:-1]} '{spec.name}' takes no argument '{key}'; "
                                     f"{suggestion(key, valid)}")
        if key in hints:
            spec.args[key] = _convert(value, hints[key], where)
    for name, p in params.items():
        if (p.default is inspect.Parameter.empty and name not in host and name not in spec.args
                and p.kind is inspect.Parameter.KEYWORD_ONLY):
            raise RecipeError(f"{path}.args.{name}", f"required by {kind[:-1]} '{spec.name}'")



def _check(recipe: Recipe, plugins: Plugins) -> None:
    if recipe.cdmbench != FORMAT_VERSION:
        raise RecipeError("cdmbench", f"unsupported recipe format {recipe.cdmbench}; this "
                                      f"cdmbench reads format {FORMAT_VERSION}")
    if recipe.device not in ("auto", "cpu", "cuda") and not recipe.device.startswith("cuda:"):
        raise RecipeError("device", f"expected auto, cpu, cuda or cuda:N, got {recipe.device!r}")
    for path, seed in (("seed", recipe.seed), ("sample.seed", recipe.sample.seed)):
        if seed < 0:
            raise RecipeError(path, f"must be >= 0 (seeds derive per-image generators), got {seed}")
    check_component(plugins, "datasets", recipe.data, "data")
    seen: dict[str, Stage] = {}
    for stage in recipe.stages:
        path = f"stages.{stage.name}"
        if not STAGE_NAME_RE.match(stage.name):
            raise RecipeError(f"{path}.name", "stage names are lower-case letters, digits, - and _")
        if stage.name in seen:
            raise RecipeError(f"{path}.name", "two stages have this name")
        original = seen.get(stage.replicate_of) if stage.replicate_of else None
        if stage.replicate_of and (original is None or original.replicate_of is not None):
            raise RecipeError(f"{path}.replicate_of", f"'{stage.replicate_of}' is not an earlier stage "
                              "that is not itself a replicate; use `replicates: k` on the stage")
        if stage.resolution < 4:
            raise RecipeError(f"{path}.resolution", f"must be >= 4, got {stage.resolution}")
        if stage.loss not in LOSSES:
            raise RecipeError(f"{path}.loss", f"unknown loss '{stage.loss}'; {suggestion(stage.loss, LOSSES)}")
        if stage.vlb_weight < 0:
            raise RecipeError(f"{path}.vlb_weight", "must be >= 0")
        if not 0.0 <= stage.guidance.label_dropout < 1.0:
            raise RecipeError(f"{path}.guidance.label_dropout", "must be in [0, 1)")
        if stage.guidance.scale < 0:
            raise RecipeError(f"{path}.guidance.scale", "must be >= 0")
        if stage.guidance.scale != 1.0 and stage.guidance.label_dropout == 0.0:
            raise RecipeError(f"{path}.guidance.scale", "guidance needs an unconditional model: "
                              "set guidance.label_dropout (e.g. 0.1) and train, or use scale 1")
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
        for key in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(train, key) < 1:
                raise RecipeError(f"{path}.train.{key}", "must be >= 1")
        if train.val_bpd_images < 0 or (train.val_bpd_images and stage.loss != "hybrid"):
            raise RecipeError(f"{path}.train.val_bpd_images", "bits/dim needs the learned variance "
                              "of loss: hybrid and a count >= 0; set it to 0 or use loss: hybrid")
        if train.milestone_every < 0:
            raise RecipeError(f"{path}.train.milestone_every", "must be >= 0")
        if train.precision not in ("fp32", "bf16"):
            raise RecipeError(f"{path}.train.precision", f"expected fp32 or bf16, got {train.precision!r}")
        for key in ("warmup_steps", "grad_clip"):
            if getattr(train, key) < 0:
                raise RecipeError(f"{path}.train.{key}", "must be >= 0")
        if train.grad_accumulation < 1 or train.batch_size % train.grad_accumulation:
            raise RecipeError(f"{path}.train.grad_accumulation", f"must be >= 1 and divide "
                              f"batch_size ({train.batch_size})")
        if not 0.0 <= train.ema < 1.0:
            raise RecipeError(f"{path}.train.ema", "must be in [0, 1)")
        if train.lr <= 0:
            raise RecipeError(f"{path}.train.lr", "must be > 0")
        for kind, spec, key in (("backbones", stage.backbone, "backbone"),
                                ("schedules", stage.schedule, "schedule"),
                                ("samplers", stage.sampler, "sampler")):
            check_component(plugins, kind, spec, f"{path}.{key}")
        many = isinstance(stage.augmentation, list)
        for i, spec in enumerate(stage.augmentations()):
            check_component(plugins, "augmentations", spec, f"{path}.augmentation" + (f"[{i}]" if many else ""))
        seen[stage.name] = stage
    if recipe.sample.images_per_class < 1 or recipe.sample.batch_size < 1:
        raise RecipeError("sample", "images_per_class and batch_size must be >= 1")
    if recipe.sample.precision not in ("train", "fp32", "bf16"):
        raise RecipeError("sample.precision", "expected train (each stage's train.precision), fp32 or "
                          f"bf16, got {recipe.sample.precision!r}")
    if recipe.sample.num_classes is not None and recipe.sample.num_classes < 1:
        raise RecipeError("sample.num_classes", "must be >= 1 or null (every class)")
    evaluate = recipe.evaluate
    for i, metric in enumerate(evaluate.metrics):
        check_component(plugins, "metrics", metric, f"evaluate.metrics[{i}]")
    for key in ("num_samples", "batch_size", "shard_size"):
        if getattr(evaluate, key) < 1:
            raise RecipeError(f"evaluate.{key}", "must be >= 1")
    if evaluate.stage is not None and evaluate.stage not in seen:
        raise RecipeError("evaluate.stage", f"no stage '{evaluate.stage}'; {suggestion(evaluate.stage, seen)}")



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
