"""docs/plugins.md is the plugin contract: every hook appears with its exact signature, and the
example plugin in it installs, is listed, passes the conformance kit and trains in a recipe."""

import inspect
import os
import re
import shlex
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import torch

from cdmbench import diffusion, hookspecs
from cdmbench.builtin.schedules import linear, log_snr
from cdmbench.interfaces import HOST_ARGS, Sampler
from cdmbench.registry import factory_problem
from cdmbench.testing import check_sampler

ROOT = Path(__file__).resolve().parents[2]
GUIDE = (ROOT / "docs" / "plugins.md").read_text()


def hook_functions():
    return [f for name, f in vars(hookspecs).items() if name.startswith("cdmbench_") and callable(f)]


def test_every_hook_is_documented_with_its_signature_and_host_facts():
    assert "register(name, factory, *, summary=\"\", requires=())" in GUIDE
    assert len(hook_functions()) == len(HOST_ARGS) + 1  # one per kind, plus commands
    for hook in hook_functions():
        signature = f"`{hook.__name__}{inspect.signature(hook)}`"
        assert signature in GUIDE, f"{signature} is not in docs/plugins.md"
        kind = hook.__name__.removeprefix("cdmbench_register_")
        if kind in HOST_ARGS:
            row = next(line for line in GUIDE.splitlines() if line.startswith(f"| {signature}"))
            for fact in HOST_ARGS[kind]:
                assert f"`{fact}`" in row, f"host fact {fact} of {kind} is not documented"


SAMPLER_SECTION = GUIDE.split("\n## What a sampler receives\n")[1].split("\n## ")[0]
# what a sampler author must find documented there, signature and all
SAMPLER_HELPERS = {
    "Grid", "Grid.abar", "Grid.noise_cond", "Grid.steps", "Grid.betas", "Prediction", "Prediction.x0",
    "Prediction.eps", "Prediction.var_frac", "Prediction.clipped", "Denoise", "randn_per_image", "q_sample",
    "posterior", "x0_from_eps", "eps_from_x0", "v_from", "x0_eps_from_v", "NOISE_COND_SCALE",
    "DiscreteProcess.continuous", "ContinuousProcess.continuous", "DiscreteProcess.grid", "ContinuousProcess.grid",
    "DiscreteProcess.T", "DiscreteProcess.betas", "DiscreteProcess.abar", "DiscreteProcess.level_index",
    "DiscreteProcess.noise_cond", "ContinuousProcess.schedule", "ContinuousProcess.abar_at",
}


def _annotation(annotation) -> str:
    if isinstance(annotation, str):  # the source text (from __future__ import annotations)
        return annotation
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def _signature(obj, name: str, annotated: bool = True) -> str:
    """``name(params) -> return`` as the code declares it (``self`` left out; a class: its fields)."""
    if isinstance(obj, property):
        return f"{name} -> {_annotation(inspect.signature(obj.fget).return_annotation)}"
    signature, params, star = inspect.signature(obj), [], False
    for p in signature.parameters.values():
        if p.name == "self":
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            params.append("*")
        star = star or p.kind in (p.KEYWORD_ONLY, p.VAR_POSITIONAL)
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if annotated and p.annotation is not p.empty:
            text += f": {_annotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {p.default!r}" if annotated else f"={p.default!r}"
        params.append(text)
    text = f"{name}({', '.join(params)})"
    if annotated and not inspect.isclass(obj) and signature.return_annotation is not signature.empty:
        text += f" -> {_annotation(signature.return_annotation)}"
    return text


def _instances() -> dict:
    process = diffusion.DiscreteProcess(linear(timesteps=100).betas())
    x = torch.zeros(1, 3, 2, 2)
    return {"Grid": process.grid(2), "Prediction": diffusion.Prediction(x, x), "DiscreteProcess": process,
            "ContinuousProcess": diffusion.ContinuousProcess(log_snr())}


def _expected(name: str, span: str) -> str:
    """What the code says ``span`` (documenting ``name``) must read."""
    top, _, attr = name.partition(".")
    owner = getattr(diffusion, top)
    if name == "Denoise":
        args, result = typing.get_args(diffusion.Denoise)
        return f"Denoise = Callable[[{', '.join(a.__name__ for a in args)}], {result.__name__}]"
    if not attr:
        return _signature(owner, name) if callable(owner) else f"{name} = {owner!r}"
    member = inspect.getattr_static(owner, attr, None)
    if inspect.isfunction(member) or isinstance(member, property):
        return _signature(member, name)
    instance = _instances()[top]  # a field or an attribute: the objects a sampler gets have it
    return span if hasattr(instance, attr) else f"{name} (no such attribute)"


def test_the_helpers_a_sampler_receives_are_documented_with_the_codes_signatures():
    """docs/plugins.md's "What a sampler receives" is the reference of cdmbench.diffusion for
    sampler authors: every helper is there, with the signature it has in the code."""
    claims = []
    for span in re.findall(r"`([^`\n]+)`", SAMPLER_SECTION):
        head = re.match(r"([A-Za-z_]\w*)(\.[A-Za-z_]\w*)?", span)
        if head and head.group(1) in diffusion.__all__ and (head.group(2) or span != head.group(0)):
            claims.append((head.group(0), span))
    assert SAMPLER_HELPERS <= {name for name, _ in claims}, SAMPLER_HELPERS - {name for name, _ in claims}
    for name, span in claims:
        code = _expected(name, span)
        assert span == code, f"docs/plugins.md documents `{span}`; the code has `{code}`"


def test_the_sampler_protocol_is_documented_with_its_signature():
    guide = GUIDE.replace('"', "'").replace("\n  ", " ")
    for method in ("check", "sample"):
        signature = _signature(getattr(Sampler, method), method, annotated=False)
        assert f"`{signature}`" in guide, f"{signature} is not in docs/plugins.md"


def test_the_example_sampler_passes_the_conformance_kit():
    source = re.search(r"<!-- sampler: heun -->\n```python\n(.*?)```", GUIDE, re.S).group(1)
    module = types.ModuleType("heun_example")
    exec(compile(source, "docs/plugins.md", "exec"), module.__dict__)
    assert factory_problem(module.heun) is None
    check_sampler(module.heun, {"steps": 10}, name="the example heun")


def test_the_readme_links_the_guide():
    assert "docs/plugins.md" in (ROOT / "README.md").read_text()


def _run(args, env, cwd=None):
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
def test_the_example_plugin_installs_conforms_and_trains(tmp_path):
    files = re.findall(r"<!-- file: (\S+) -->\n```\w+\n(.*?)```", GUIDE, re.S)
    assert {Path(p).name for p, _ in files} == {"pyproject.toml", "__init__.py", "test_conformance.py"}
    for path, text in files:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "--target", str(site), str(tmp_path / "cdmbench-sigmoid")], os.environ)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), *sys.path])}
    listed = _run([sys.executable, "-m", "cdmbench", "plugins"], env)
    assert "sigmoid 0.1.0 (package cdmbench-sigmoid)" in listed and "schedules: sigmoid" in listed
    tests = tmp_path / "cdmbench-sigmoid" / "tests"
    _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)], env)
    command = next(line for line in GUIDE.splitlines() if line.startswith("cdmbench run "))
    shrink = ["data.args.num_images=20", "sample.images_per_class=1", "stages.base16.train.steps=2",
              "stages.sr32.train.steps=2", "stages.base16.sampler.args.steps=2",
              "stages.sr32.sampler.args.steps=2"]
    args = shlex.split(command)[1:] + [a for item in shrink for a in ("--set", item)] + ["--no-progress"]
    args[args.index("--out") + 1] = str(tmp_path / "run")
    _run([sys.executable, "-m", "cdmbench", *args], env, cwd=ROOT)
    assert "name: sigmoid" in (tmp_path / "run" / "run.yaml").read_text()
    assert (tmp_path / "run" / "sr32" / "samples" / "grid.png").exists()
