import os
import subprocess
import sys
import textwrap

import pytest

from cdmbench.errors import PluginError, RegistryError
from cdmbench.plugins import BUILTIN_MODULES, load_plugins
from cdmbench.recipe import load_recipe

SCHEDULE_PLUGIN = '''
import torch
from cdmbench import hookimpl


class Constant:
    """beta_t = beta for every step."""

    def __init__(self, timesteps, beta):
        self.timesteps, self.beta = timesteps, beta

    def betas(self):
        return torch.full((self.timesteps,), self.beta, dtype=torch.float64)

    def abar(self, t):
        return (1 - self.beta) ** (torch.as_tensor(t, dtype=torch.float64) * self.timesteps)


def constant(*, timesteps: int = 100, beta: float = 0.02):
    return Constant(timesteps, beta)


@hookimpl
def cdmbench_register_schedules(register):
    register("{name}", constant, summary="constant betas")
'''


def test_builtins_register_the_first_components():
    plugins = load_plugins()
    assert set(plugins.versions) >= set(BUILTIN_MODULES)
    assert plugins["backbones"].get("adm-unet").plugin == "cdmbench.builtin.unet"
    assert {"linear", "cosine"} <= set(plugins["schedules"].names())
    assert {"none", "gaussian"} <= set(plugins["augmentations"].names())
    assert "ddpm" in plugins["samplers"] and "shapes" in plugins["datasets"]


def test_recipe_plugin_module_is_loaded_and_used(plugin_dir, tiny_recipe):
    (plugin_dir / "testplugin_sched.py").write_text(SCHEDULE_PLUGIN.format(name="constant-beta"))
    text = tiny_recipe.read_text().replace("seed: 0\n", "seed: 0\nplugins: [testplugin_sched]\n", 1)
    text = text.replace("{name: cosine, args: {timesteps: 50}}",
                        "{name: constant-beta, args: {timesteps: 20, beta: 0.05}}", 1)
    tiny_recipe.write_text(text)
    recipe, plugins = load_recipe(tiny_recipe)
    component = plugins["schedules"].get("constant-beta")
    assert component.plugin == "testplugin_sched"
    assert recipe.stages[0].schedule.args == {"timesteps": 20, "beta": 0.05}
    # The factory's signature is enforced for plugin components too.
    with pytest.raises(Exception, match="takes no argument 'betta'; did you mean 'beta'"):
        load_recipe(tiny_recipe, overrides=["stages.base8.schedule.args.betta=0.1"])


def test_missing_recipe_plugin_module(tiny_recipe):
    text = tiny_recipe.read_text().replace("seed: 0\n", "seed: 0\nplugins: [no_such_module_xyz]\n", 1)
    tiny_recipe.write_text(text)
    with pytest.raises(PluginError, match="'no_such_module_xyz' cannot be imported"):
        load_recipe(tiny_recipe)


def test_collision_between_plugins_names_both(plugin_dir):
    (plugin_dir / "testplugin_clash.py").write_text(SCHEDULE_PLUGIN.format(name="cosine"))
    with pytest.raises(RegistryError, match="'cdmbench.builtin.schedules' and 'testplugin_clash'"):
        load_plugins(["testplugin_clash"])


def test_plugin_raising_while_registering_does_not_break_others(plugin_dir):
    (plugin_dir / "testplugin_broken.py").write_text(textwrap.dedent('''
        from cdmbench import hookimpl

        @hookimpl
        def cdmbench_register_samplers(register):
            raise RuntimeError("boom")
    '''))
    with pytest.warns(UserWarning, match="testplugin_broken"):
        plugins = load_plugins(["testplugin_broken"])
    assert "boom" in plugins.failures["testplugin_broken"]
    assert "ddpm" in plugins["samplers"]


def test_blocked_plugin_is_not_loaded(monkeypatch):
    monkeypatch.setenv("CDMBENCH_BLOCK_PLUGINS", "cdmbench.builtin.samplers")
    plugins = load_plugins()
    assert "ddpm" not in plugins["samplers"] and "adm-unet" in plugins["backbones"]


def test_installed_package_found_through_entry_point(tmp_path):
    """A real package, pip-installed into a temporary folder, shows up via its entry point."""
    src = tmp_path / "src"
    (src / "cdmbench_testsched").mkdir(parents=True)
    (src / "cdmbench_testsched" / "__init__.py").write_text(SCHEDULE_PLUGIN.format(name="ep-constant"))
    (src / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "cdmbench-testsched"
        version = "4.5.6"

        [project.entry-points.cdmbench]
        testsched = "cdmbench_testsched"
    '''))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(src)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *sys.path])}
    out = subprocess.run([sys.executable, "-m", "cdmbench", "ls", "schedules"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert any(line.split()[1:3] == ["ep-constant", "testsched"] for line in out.splitlines())
    out = subprocess.run([sys.executable, "-m", "cdmbench", "plugins"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "testsched 4.5.6" in out and "schedules: ep-constant" in out


def test_an_installed_plugin_that_fails_to_import_is_reported_by_name(tmp_path, monkeypatch):
    """A package whose entry point cannot be imported is a failure of that plugin only."""
    dist = tmp_path / "cdmbench_broken-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cdmbench-broken\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[cdmbench]\nbroken = cdmbench_no_such_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning, match="plugin 'broken'.*failed to import"):
        plugins = load_plugins()
    assert "No module named 'cdmbench_no_such_module'" in plugins.failures["broken"]
    assert "ddpm" in plugins["samplers"] and "broken" not in plugins.versions
    monkeypatch.setenv("CDMBENCH_BLOCK_PLUGINS", "broken")
    assert "broken" not in load_plugins().failures
