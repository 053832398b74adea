"""Malformed input (issue 25): every malformed recipe, recipe file, run.yaml and ``--set`` is refused
with exit status 2 and one ``error:`` line that names the key or the file: no traceback, no hang.

The cases are generated deterministically (``random.Random(SEED)``) by mutating
``recipes/quickstart.yaml`` and the tiny recipe of ``tests/conftest.py``: NaN, infinities, huge,
negative and wrongly typed values at every numeric key of the schema (found from the schema, so a
new key is fuzzed too), NaN and infinities at every numeric component argument, unknown and
duplicate keys, alias bombs, binary and non-UTF-8 bytes, special files, non-mapping YAML, names
that would leave the run directory and malformed ``--set``. Each runs in-process (``CliRunner``)
under a 10 s alarm (about 10 s for all of them); a few run the real program (``python -m cdmbench``,
marked slow) to check its exit status and stderr.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import re
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from click.testing import CliRunner

from cdmbench.cli import cli
from cdmbench.errors import RecipeError
from cdmbench.recipe import schema
from cdmbench.recipe.load import load_recipe
from cdmbench.recipe.reference import field_docs
from cdmbench.recipe.yamlfile import MAX_BYTES, MAX_NODES, parse_yaml
from tests.conftest import ROOT, TINY_RECIPE

SEED = 25
LIMIT_S = 10
BASES = {"quickstart": (ROOT / "recipes" / "quickstart.yaml").read_text(), "tiny": TINY_RECIPE}
NUMBERS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "huge": 10**30, "negative": -1}
WRONG_TYPES = {"string": "many", "list": [1], "mapping": {"a": 1}, "bool": True}
BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True))


class Hang(BaseException):
    """Raised by the alarm: a BaseException, so that CliRunner does not swallow it."""


@dataclasses.dataclass
class Case:
    """One malformed input: ``make(tmp)`` writes what it needs and returns the command line;
    the error line must contain ``names`` (the key or the file)."""

    id: str
    make: Callable[[Path], list[str]]
    names: str | Callable[[Path], str]


# --- the keys ------------------------------------------------------------------------------------------


def schema_numeric_keys() -> list[str]:
    """Every numeric key of the schema as a dotted template (``stages.{stage}.train.lr``)."""
    keys = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if f.name == "stages":
                walk(schema.Stage, "stages.{stage}.")
                keys.append("stages.{stage}.replicates")
            elif dataclasses.is_dataclass(tp) and tp is not schema.Component:
                walk(tp, f"{prefix}{f.name}.")
            elif tp in (int, float) or tp == (int | None):
                keys.append(prefix + f.name)

    walk(schema.Recipe, "")
    return keys


def component_numbers(raw: Any, path: str = "", in_args: bool = False) -> list[str]:
    """Dotted paths (list items as ``[i]``, stages by name) of every number inside component args."""
    if isinstance(raw, bool):
        return []
    if isinstance(raw, (int, float)):
        return [path] if in_args else []
    if isinstance(raw, dict):
        return [p for k, v in raw.items() for p in component_numbers(v, f"{path}.{k}" if path else k,
                                                                       in_args or k == "args")]
    if isinstance(raw, list):
        return [p for i, v in enumerate(raw) for p in component_numbers(
            v, f"{path}.{v['name']}" if path == "stages" else f"{path}[{i}]", in_args)]
    return []


def _parts(path: str) -> list[str | int]:
    return [int(p) if p.isdigit() else p for p in re.split(r"\.|\[(\d+)\]", path) if p]


def set_key(raw: dict, path: str, value: Any) -> dict:
    """A copy of ``raw`` with ``path`` (stages by name, ``[i]`` list items) set to ``value``."""
    raw = copy.deepcopy(raw)
    node: Any = raw
    parts = _parts(path)
    for part in parts[:-1]:
        if isinstance(node, list) and isinstance(part, str):
            node = next(s for s in node if s.get("name") == part)
        elif isinstance(node, list):
            node = node[part]
        else:
            node = node.setdefault(part, {})
    node[parts[-1]] = value
    return raw


# --- the cases -----------------------------------------------------------------------------------------


def write(tmp: Path, name: str, content: str | bytes) -> Path:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def recipe_case(id_: str, raw: dict, names: str, command: str = "validate") -> Case:
    text = yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
    args = ["run", "--dry-run"] if command == "run" else [command]
    return Case(id_, lambda tmp: [*args, str(write(tmp, "recipe.yaml", text))], names)


def text_case(id_: str, text: str | bytes, names: str = "recipe.yaml") -> Case:
    return Case(id_, lambda tmp: ["validate", str(write(tmp, "recipe.yaml", text))], names)


def set_case(id_: str, assignment: str, names: str) -> Case:
    return Case(id_, lambda tmp: ["validate", str(write(tmp, "recipe.yaml", BASES["tiny"])), "--set", assignment],
                names)


def numeric_cases(rng: random.Random) -> list[Case]:
    cases = []
    for base, text in BASES.items():
        raw = yaml.safe_load(text)
        stages = [s["name"] for s in raw["stages"]]
        for template in schema_numeric_keys():
            key = template.format(stage=rng.choice(stages))
            kinds = list(NUMBERS) if base == "quickstart" else [rng.choice(list(NUMBERS))]
            for kind in kinds:
                cases.append(recipe_case(f"{base}-{key}-{kind}", set_key(raw, key, NUMBERS[kind]), key))
            kind = rng.choice(list(WRONG_TYPES))
            cases.append(recipe_case(f"{base}-{key}-{kind}", set_key(raw, key, WRONG_TYPES[kind]), key))
        for key in component_numbers(raw):
            kind = rng.choice(["nan", "inf", "-inf"])
            named = key.split("[")[0] if key.endswith("]") else key  # list items: the arg's path
            cases.append(recipe_case(f"{base}-{key}-{kind}", set_key(raw, key, NUMBERS[kind]), named))
    return cases


def _typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(len(word) - 1)
    swapped = word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return swapped if swapped != word else word + "s"


def unknown_key_cases(rng: random.Random) -> list[Case]:
    cases = []
    for base, text in BASES.items():
        raw = yaml.safe_load(text)
        stage = rng.choice([s["name"] for s in raw["stages"]])
        for section, cls in (("", schema.Recipe), (f"stages.{stage}.", schema.Stage),
                             (f"stages.{stage}.train.", schema.Train), (f"stages.{stage}.guidance.", schema.Guidance),
                             ("sample.", schema.Sample), ("evaluate.", schema.Evaluate)):
            key = section + _typo(rng.choice([f.name for f in dataclasses.fields(cls)]), rng)
            cases.append(recipe_case(f"{base}-unknown-{key}", set_key(raw, key, 1), key))
    return cases


def duplicate_key_cases(rng: random.Random) -> list[Case]:
    """A line of the recipe written twice: 'name: x' -> a duplicate key, named with its line."""
    cases = []
    for base, text in BASES.items():
        lines = text.splitlines(keepends=True)
        plain = [i for i, line in enumerate(lines) if re.match(r"\s*(- )?[a-z_]+: \S", line)
                 and not line.lstrip().startswith("- ")
                 and line.count("{") == line.count("}")]  # not the first line of a flow mapping
        for i in sorted(rng.sample(plain, 4)):
            key = re.match(r"\s*([a-z_]+):", lines[i]).group(1)
            doubled = "".join(lines[:i + 1] + [lines[i]] + lines[i + 1:])
            cases.append(text_case(f"{base}-duplicate-line{i + 1}-{key}", doubled, f"duplicate key '{key}' on line "
                                                                                  f"{i + 2}"))
        flow = text.replace("{steps: ", "{steps: 3, steps: ", 1)  # inside a flow mapping
        cases.append(text_case(f"{base}-duplicate-in-flow-steps", flow, "duplicate key 'steps'"))
    return cases


def file_cases(rng: random.Random) -> list[Case]:
    quick = BASES["quickstart"]
    noise = bytes(rng.randrange(256) for _ in range(512))

    def fifo(tmp: Path) -> list[str]:
        os.mkfifo(tmp / "pipe.yaml")
        return ["validate", str(tmp / "pipe.yaml")]

    def folder(tmp: Path) -> list[str]:
        (tmp / "folder.yaml").mkdir()
        return ["validate", str(tmp / "folder.yaml")]

    return [
        text_case("binary-noise", noise + b"\0"),
        text_case("binary-png-header", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + noise),
        text_case("latin-1", ("# caf\u00e9 au lait\n" + quick).encode("latin-1")),
        text_case("utf-16", quick.encode("utf-16")),
        text_case("invalid-utf-8-mid-file", quick.encode()[:200] + b"\xff\xfe" + quick.encode()[200:]),
        text_case("empty", ""),
        text_case("only-comments", "# nothing here\n# at all\n"),
        text_case("too-large", "# " + "x" * MAX_BYTES + "\n"),
        Case("fifo", fifo, "pipe.yaml"),
        Case("directory", folder, "folder.yaml"),
        Case("missing", lambda tmp: ["validate", str(tmp / "nope.yaml")], "nope.yaml"),
        Case("dev-null", lambda tmp: ["validate", "/dev/null"], "/dev/null"),
    ]


def yaml_structure_cases() -> list[Case]:
    return [
        text_case("billion-laughs", BILLION_LAUGHS),
        text_case("billion-laughs-in-args", BASES["tiny"].replace(
            "data: {name: shapes, args: {num_images: 40}}",
            "data: {name: shapes, args: {num_images: 40}}\nx:\n  " + BILLION_LAUGHS.replace("\n", "\n  "))),
        text_case("recursive-alias", "a: &a [1, *a]\n"),
        text_case("deep-nesting", "a: " + "[" * 5000 + "]" * 5000 + "\n"),
        text_case("undefined-alias", BASES["tiny"].replace("seed: 0", "seed: *nothing")),
        text_case("python-tag", BASES["tiny"].replace("seed: 0", "seed: !!python/object/apply:os.system [ls]")),
        text_case("bad-int-tag", BASES["tiny"].replace("seed: 0", "seed: !!int zero")),
        text_case("bad-date", BASES["tiny"].replace("seed: 0", "seed: 2001-13-45")),
        text_case("huge-binary-int", BASES["tiny"].replace("seed: 0", "seed: 0b" + "1" * 20000)),
        text_case("5000-digit-int", BASES["tiny"].replace("seed: 0", "seed: " + "9" * 5000)),
        text_case("tab-indent", BASES["tiny"].replace("  - name: base8", "\t- name: base8")),
        text_case("unclosed-flow", BASES["tiny"].replace("{steps: 4,", "{steps: 4,[", 1)),
        text_case("list", "[1, 2, 3]\n"),
        text_case("scalar", "just a sentence\n"),
        text_case("integer", "42\n"),
        text_case("null", "~\n"),
        text_case("two-documents", BASES["tiny"] + "---\n" + BASES["tiny"]),
        text_case("unhashable-key", "? [a, b]\n: 1\n"),
    ]


def name_cases() -> list[Case]:
    raw = yaml.safe_load(BASES["tiny"])
    cases = [recipe_case(f"run-name-{name!r}", set_key(raw, "name", name), "name: ")
             for name in ("", "/tmp/x", "../../x", ".", "..", "a/b", "a\\b", "x\n", "x" * 200, "-rf", " lead", "a\0b")]
    cases += [recipe_case("run-name-int", set_key(raw, "name", 5), "name: ")]
    for name in ("../x", "Base", "a/b", "", "x" * 100, "..", "x\n"):
        bad = copy.deepcopy(raw)
        bad["stages"][0]["name"] = name
        bad["stages"][1]["condition_on"] = name
        cases.append(recipe_case(f"stage-name-{name!r}", bad, ".name: "))
    return cases


def set_cases() -> list[Case]:
    return [set_case(f"set-{a!r}", a, names) for a, names in (
        ("seed", "--set: expected key=value"), ("=3", "--set"), ("stages..x=1", "--set"), (".seed=1", "--set"),
        ("seed.=1", "--set"), ("seed=[1", "seed: --set value"), ("seed={a: 1, a: 2}", "duplicate key 'a'"),
        ("stages.nosuch.train.steps=1", "stages.nosuch"), ("name.x=1", "name"), ("stages=5", "stages"),
        ("stages.base8=3", "stages.base8"), ("seed=*a", "seed"), ("seed=!!python/object:os.system x", "seed"),
        ("data.args=" + BILLION_LAUGHS.replace("\n", ", ").join("{}"), "data.args"),
        ("stages.base8.train.lr=.nan", "stages.base8.train.lr"), ("stages.base8.train.grad_clip=.nan",
                                                                   "stages.base8.train.grad_clip"),
        ("stages.sr16.augmentation.args.level=.inf", "stages.sr16.augmentation.args.level"),
        ("stages.base8.guidance.scale=.inf", "stages.base8.guidance.scale"),
        ("name=../../x", "name"), ("device=cuda:x", "device"), ("stages.sr16.replicates=1000000000", "replicates"),
    )]


def build_cases() -> list[Case]:
    """Only seen when the stages are built: ``run --dry-run``."""
    raw = yaml.safe_load(BASES["quickstart"])
    return [
        recipe_case("build-channels-1e9", set_key(raw, "stages.base16.backbone.args.channels", 10**9),
                    "stages.base16", command="run"),
        recipe_case("build-attention-never", set_key(raw, "stages.sr32.backbone.args.attention_resolutions", [3]),
                    "stages.sr32.backbone", command="run"),
        recipe_case("build-sampler-steps", set_key(raw, "stages.base16.sampler.args.steps", 10**12),
                    "stages.base16.sampler", command="run"),
        recipe_case("build-huge-batch", set_key(raw, "stages.base16.train.batch_size", 10**12),
                    "stages.base16.train.batch_size", command="run"),
    ]


def smoke_cases() -> list[Case]:
    """``--smoke`` shrinks numbers before validation: a NaN must still reach it (and be refused)."""
    raw = yaml.safe_load(BASES["tiny"])
    cases = []
    for key, value in (("stages.base8.schedule.args.timesteps", float("nan")),
                       ("stages.sr16.schedule.args.timesteps", float("inf")),
                       ("stages.sr16.augmentation.args.level", float("nan")),
                       ("stages.base8.guidance.scale", float("-inf")),
                       ("stages.base8.train.lr", float("nan")), ("name", "../x")):
        text = yaml.safe_dump(set_key(raw, key, value), sort_keys=False)
        cases.append(Case(f"smoke-{key}-{value}", lambda tmp, text=text: [
            "validate", str(write(tmp, "recipe.yaml", text)), "--smoke"], key))
    return cases


def run_yaml_cases() -> list[Case]:
    """A run directory whose run.yaml is malformed: ``cdmbench sample RUN``, ``cdmbench run --out RUN``."""
    good = {"recipe": yaml.safe_load(BASES["tiny"]), "environment": {}, "classes": ["a"]}

    def run_dir(content: str | bytes | None, command: str = "sample") -> Callable[[Path], list[str]]:
        def make(tmp: Path) -> list[str]:
            (tmp / "run").mkdir()
            if content is None:
                (tmp / "run" / "run.yaml").mkdir()
            else:
                write(tmp / "run", "run.yaml", content)
            if command == "run":
                return ["run", str(write(tmp, "tiny.yaml", BASES["tiny"])), "--out", str(tmp / "run"), "--no-progress"]
            return ["sample", str(tmp / "run")]
        return make

    nan_lr = copy.deepcopy(good)
    nan_lr["recipe"]["stages"][0]["train"]["lr"] = float("nan")
    return [Case(f"run-yaml-{name}", run_dir(content), "run.yaml") for name, content in (
        ("list", "[1, 2]\n"), ("scalar", "hello\n"), ("empty", ""), ("no-recipe", "environment: {}\n"),
        ("recipe-not-mapping", "recipe: [1]\n"), ("duplicate-key", "recipe: {}\nrecipe: {}\n"),
        ("binary", b"\0\1\2\xff"), ("latin-1", "recipe: caf\u00e9\n".encode("latin-1")), ("directory", None),
        ("billion-laughs", BILLION_LAUGHS), ("nan-lr", yaml.safe_dump(nan_lr)))] + [
        Case(f"run-out-run-yaml-{name}", run_dir(content, "run"), "run.yaml") for name, content in (
            ("list", "[1, 2]\n"), ("duplicate-key", "recipe: {}\nrecipe: {}\n"), ("binary", b"\0\1"),
            ("nan-lr", yaml.safe_dump(nan_lr)))]


def all_cases() -> list[Case]:
    rng = random.Random(SEED)
    return (numeric_cases(rng) + unknown_key_cases(rng) + duplicate_key_cases(rng) + file_cases(rng)
            + yaml_structure_cases() + name_cases() + set_cases() + build_cases() + smoke_cases() + run_yaml_cases())


CASES = all_cases()


# --- the checks ----------------------------------------------------------------------------------------


def _alarm(signum, frame):
    raise Hang(f"no answer within {LIMIT_S} s")


def invoke(args: list[str]):
    """The command in-process, stopped by an alarm after LIMIT_S seconds; (result, seconds)."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, LIMIT_S)
    start = time.monotonic()
    try:
        result = CliRunner().invoke(cli, args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return result, time.monotonic() - start


def check_refused(exit_code: int, stderr: str, names: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert exit_code == 2, stderr
    errors = [line for line in stderr.splitlines() if line.lower().startswith("error:")]
    assert len(errors) == 1, stderr
    assert names in errors[0], f"{names!r} not in {errors[0]!r}"


def test_there_are_enough_cases_and_their_ids_are_unique():
    assert len(CASES) >= 100
    assert len({c.id for c in CASES}) == len(CASES)
    kinds = {c.id.split("-")[0] for c in CASES}
    assert {"quickstart", "tiny", "binary", "fifo", "billion", "run", "stage", "set", "build", "smoke"} <= kinds


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input_is_one_error_line_with_exit_status_2(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a run that were wrongly started would write runs/ here
    result, seconds = invoke(case.make(tmp_path))
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    check_refused(result.exit_code, result.stderr, case.names(tmp_path) if callable(case.names) else case.names)
    assert seconds < LIMIT_S
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # three starts of python with torch: ~10 s on the 2-core VM
def test_the_real_program_exits_2_with_one_error_line(tmp_path):
    """``python -m cdmbench``: the exit status and stderr as a shell sees them (three at once)."""
    os.mkfifo(tmp_path / "pipe.yaml")
    write(tmp_path, "bomb.yaml", BILLION_LAUGHS)
    write(tmp_path, "tiny.yaml", BASES["tiny"])
    commands = {
        "pipe.yaml": ["validate", str(tmp_path / "pipe.yaml")],
        "bomb.yaml": ["validate", str(tmp_path / "bomb.yaml")],
        "stages.base8.train.lr": ["run", str(tmp_path / "tiny.yaml"), "--dry-run",
                                  "--set", "stages.base8.train.lr=.nan"],
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {names: subprocess.Popen([sys.executable, "-m", "cdmbench", *args], cwd=tmp_path, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for names, args in commands.items()}
    for names, proc in procs.items():
        try:
            _, stderr = proc.communicate(timeout=120)  # the start (importing torch) is slow on a loaded CPU
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        check_refused(proc.returncode, stderr, names)


# --- the pieces ----------------------------------------------------------------------------------------


def test_every_numeric_key_has_a_bound_that_its_docstring_states():
    """The bounds live with the schema; docs/recipes.md (generated from the docstrings) shows them."""
    found = []
    for cls in (schema.Recipe, schema.Stage, schema.Train, schema.Guidance, schema.Sample, schema.Evaluate):
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] in (int, float) or hints[f.name] == (int | None):
                found.append(f.name)
                if f.name == "cdmbench":  # the format version: exactly FORMAT_VERSION
                    continue
                bound = f.metadata.get("bound")
                assert bound is not None, f"{cls.__name__}.{f.name} has no bound"
                assert bound.interval in docs[f.name], f"{cls.__name__}.{f.name}: {bound.interval} not in its docstring"
    assert len(found) >= 25
    assert schema.REPLICATES.interval in schema.REPLICATES_DOC


def test_bounds_refuse_nan_infinities_and_absurd_values_and_keep_the_edges():
    bound = schema.Bound(0.0, 1.0, open_low=True)
    assert bound.interval == "(0, 1]"
    assert bound.contains(1.0) and bound.contains(1e-12)
    assert not any(bound.contains(v) for v in (0.0, 1.0000001, float("nan"), float("inf"), -float("inf")))
    with pytest.raises(RecipeError, match=r"lr: must be a finite number in \(0, 1\], got nan"):
        bound.check(float("nan"), "lr")
    assert schema.Bound(1, 2**20).interval == "[1, 2^20]"
    assert schema.Bound(0, 2**63 - 1).interval == "[0, 2^63 - 1]"
    assert schema.Bound(1, 10**9).interval == "[1, 10^9]" and schema.Bound(4, 4096).interval == "[4, 4096]"


def test_values_at_the_bounds_are_valid(tiny_recipe):
    overrides = ["stages.base8.train.batch_size=8", "stages.base8.train.lr=1", "stages.base8.train.grad_clip=0",
                 "stages.base8.train.steps=1000000000", "seed=9223372036854775807", "sample.batch_size=1048576",
                 "stages.sr16.resolution=4096", "stages.base8.guidance.label_dropout=0.5",
                 "stages.base8.guidance.scale=100", "name=a.b_c+d-1"]
    recipe, _ = load_recipe(tiny_recipe, overrides=overrides)
    assert recipe.stage("base8").train.steps == 10**9 and recipe.name == "a.b_c+d-1"


def test_duplicate_keys_name_the_key_its_path_and_both_lines(tiny_recipe):
    tiny_recipe.write_text(tiny_recipe.read_text().replace("lr: 1.0e-3,", "lr: 1.0e-3, lr: 2.0e-3,", 1))
    with pytest.raises(RecipeError) as info:
        load_recipe(tiny_recipe)
    assert info.value.path == "stages.base8.train.lr"
    assert "duplicate key 'lr' on line 14 (first on line 14)" in str(info.value)
    with pytest.raises(RecipeError, match=r"duplicate key 'seed' on line 3 \(first on line 2\)"):
        parse_yaml("name: x\nseed: 1\nseed: 2\n", "f.yaml")


def test_anchors_aliases_and_merge_keys_within_the_budget_still_work(tiny_recipe):
    text = tiny_recipe.read_text().replace("train: {steps: 4,", "train: &train {steps: 4,", 1)
    text = text.replace("    train: {steps: 4, batch_size: 8, lr: 1.0e-3, ema: 0.9, checkpoint_every: 2, "
                        "log_every: 1}\n    sampler: {name: ddpm, args: {steps: 4}}\nsample",
                        "    train: {<<: *train, steps: 6}\n    sampler: {name: ddpm, args: {steps: 4}}\nsample")
    tiny_recipe.write_text(text)
    recipe, _ = load_recipe(tiny_recipe)
    assert recipe.stage("sr16").train.steps == 6 and recipe.stage("sr16").train.lr == 1.0e-3
    assert parse_yaml("a: &a [1, 2]\nb: [*a, *a]\n", "f") == {"a": [1, 2], "b": [[1, 2], [1, 2]]}


def test_an_alias_bomb_is_refused_in_well_under_a_second():
    start = time.monotonic()
    with pytest.raises(RecipeError, match=f"expands to more than {MAX_NODES} values"):
        parse_yaml(BILLION_LAUGHS, "bomb.yaml")
    assert time.monotonic() - start < 0.5


def test_special_files_say_what_they_are_and_a_fifo_does_not_block(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "folder").mkdir()
    for name, kind in (("pipe", "a named pipe (FIFO)"), ("folder", "a directory")):
        with pytest.raises(RecipeError, match=re.escape(f"{tmp_path / name} is {kind}, not a recipe file")):
            load_recipe(tmp_path / name)
    with pytest.raises(RecipeError, match="is a character device"):
        load_recipe("/dev/null")
    with pytest.raises(RecipeError, match=r"is not UTF-8 text \(byte 0xe9 on line 2\)"):
        write(tmp_path, "latin.yaml", "a: 1\nb: caf\u00e9\n".encode("latin-1"))
        load_recipe(tmp_path / "latin.yaml")


def test_a_huge_batch_is_refused_before_any_work(tmp_path, monkeypatch):
    """It hung: the trainer stitched epoch permutations of the 5000 images together until it had
    10^12 indices (2 x 10^8 permutations, memory growing), and SIGTERM waits for the step to end."""
    monkeypatch.chdir(tmp_path)
    result, seconds = invoke(["run", str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(tmp_path / "out"),
                              "--no-progress", "--set", "stages.base16.train.batch_size=1000000000000"])
    check_refused(result.exit_code, result.stderr, "stages.base16.train.batch_size: must be in [1, 2^20]")
    assert seconds < LIMIT_S and not (tmp_path / "out").exists()
