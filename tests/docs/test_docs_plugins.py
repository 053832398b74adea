"""docs/plugins.md is the plugin contract: every hook appears with its exact signature, and the
example plugin in it installs, is listed, passes the conformance kit and trains in a recipe."""

import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cdmbench import hookspecs
from cdmbench.interfaces import HOST_ARGS

ROOT = Path(__file__).resolve().parents[2]
GUIDE = (ROOT / "docs" / "plugins.md").read_text()


def hook_functions():
    return [f for name, f in vars(hookspecs).items() if name.startswith("cdmbench_") and callable(f)]


def test_every_hook_is_documented_with_its_signature_and_host_facts():
    assert "register(name, factory, *, summary=\"\")" in GUIDE
    assert len(hook_functions()) == len(HOST_ARGS) + 1  # one per kind, plus commands
    for hook in hook_functions():
        signature = f"`{hook.__name__}{inspect.signature(hook)}`"
        assert signature in GUIDE, f"{signature} is not in docs/plugins.md"
        kind = hook.__name__.removeprefix("cdmbench_register_")
        if kind in HOST_ARGS:
            row = next(line for line in GUIDE.splitlines() if line.startswith(f"| {signature}"))
            for fact in HOST_ARGS[kind]:
                assert f"`{fact}`" in row, f"host fact {fact} of {kind} is not documented"


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
