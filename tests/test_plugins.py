import os
import subprocess
import sys
import textwrap

import pytest

from cdmbench.cli import cli, main
from cdmbench.errors import CdmbenchError, PluginError, RecipeError, RegistryError
from cdmbench.plugins import BUILTIN_MODULES, load_plugins
from cdmbench.recipe.load import load_recipe
from cdmbench.testing import components

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


def _distribution(folder, name, entry_point):
    """An installed distribution ``name`` 1.0 in ``folder`` declaring ``entry_point``."""
    info = folder / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[cdmbench]\n{entry_point}\n")


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


def test_collision_between_plugins_names_both_and_fails_only_that_name(plugin_dir):
    (plugin_dir / "testplugin_clash.py").write_text(SCHEDULE_PLUGIN.format(name="cosine"))
    with pytest.warns(UserWarning, match="plugin 'testplugin_clash' failed to provide schedule 'cosine'"):
        plugins = load_plugins(["testplugin_clash"])
    both = "schedule 'cosine' is registered by plugins 'cdmbench.builtin.schedules' and 'testplugin_clash'"
    assert both in plugins.failures["testplugin_clash"]
    with pytest.raises(RegistryError, match=f"^{both}, so neither is used; uninstall or block one"):
        plugins["schedules"].get("cosine")
    assert plugins["schedules"].get("linear").plugin == "cdmbench.builtin.schedules"


BROKEN_REGISTRATIONS = '''
from cdmbench import hookimpl
from cdmbench.builtin.samplers import ddim


def positional(steps, eta=0.0):
    return ddim(steps=steps, eta=eta)


def unresolved(*, steps: "NoSuchType" = 5):
    return ddim(steps=steps)


def fine(*, steps: int = 5):
    return ddim(steps=steps)


@hookimpl
def cdmbench_register_samplers(register):
    register("Bad_Name", fine)
    register("not-callable", 42)
    register("positional", positional)
    register("star", lambda *args: ddim())
    register("unresolved", unresolved)
    register("fine-one", fine)
'''


def test_registrations_refused_at_the_door_fail_alone_and_say_why(plugin_dir, tiny_recipe):
    (plugin_dir / "testplugin_door.py").write_text(BROKEN_REGISTRATIONS)
    with pytest.warns(UserWarning, match="plugin 'testplugin_door' failed to provide sampler"):
        plugins = load_plugins(["testplugin_door"])
    failure = plugins.failures["testplugin_door"]
    for reason in ("sampler 'Bad_Name': names are lower-case kebab",
                   "sampler 'not-callable': its factory is not callable: 42",
                   "sampler 'positional': its factory positional takes positional parameters (steps, eta); "
                   "factories take keyword arguments only: def positional(*, steps, eta)",
                   "sampler 'star': its factory <lambda> takes positional parameters (*args)",
                   "sampler 'unresolved': a type hint of its factory unresolved does not resolve (NameError: "
                   "name 'NoSuchType' is not defined)"):
        assert f"plugin 'testplugin_door' cannot register {reason}" in failure
    assert plugins["samplers"].get("fine-one").plugin == "testplugin_door"  # the rest of the plugin is kept
    assert {"ddpm", "ddim"} <= set(plugins["samplers"].names())
    with pytest.raises(RegistryError, match=r"^sampler 'positional' is not available: plugin 'testplugin_door' "
                                            r"cannot register sampler 'positional': its factory positional takes "
                                            r"positional parameters"):
        plugins["samplers"].get("positional")
    # in a recipe: only the recipe that names it fails, at its path
    text = tiny_recipe.read_text().replace("seed: 0\n", "seed: 0\nplugins: [testplugin_door]\n", 1)
    tiny_recipe.write_text(text.replace("{name: ddpm, args: {steps: 4}}", "{name: fine-one, args: {steps: 4}}", 1))
    with pytest.warns(UserWarning):
        recipe, _ = load_recipe(tiny_recipe)
        assert recipe.stages[0].sampler.name == "fine-one"
        with pytest.raises(RecipeError, match="stages.base8.sampler.name: sampler 'unresolved' is not available: "
                                              ".*does not resolve"):
            load_recipe(tiny_recipe, overrides=["stages.base8.sampler={name: unresolved}"])


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


def test_a_hook_raising_part_way_keeps_none_of_its_components_and_every_error(plugin_dir):
    (plugin_dir / "testplugin_half.py").write_text(textwrap.dedent('''
        from cdmbench import hookimpl
        from cdmbench.builtin.schedules import cosine

        @hookimpl
        def cdmbench_register_schedules(register):
            register("half-one", cosine)
            raise RuntimeError("boom after one")

        @hookimpl
        def cdmbench_register_samplers(register):
            raise ValueError("no sampler")
    '''))
    with pytest.warns(UserWarning, match="testplugin_half"):
        plugins = load_plugins(["testplugin_half"])
    assert "half-one" not in plugins["schedules"]
    with pytest.raises(RegistryError, match=r"^schedule 'half-one' is not available: plugin 'testplugin_half' "
                                            r"failed to provide it: registering schedules raised "
                                            r"RuntimeError\('boom after one'\)"):
        plugins["schedules"].get("half-one")
    assert "boom after one" in plugins.failures["testplugin_half"]
    assert "no sampler" in plugins.failures["testplugin_half"]
    with pytest.raises(CdmbenchError, match="no components from plugin 'testplugin_half'; it failed: "
                                            ".*boom after one.*no sampler"):
        components("testplugin_half", plugins)


OPTIONAL_REGISTRATIONS = '''
from cdmbench import hookimpl
from cdmbench.builtin.samplers import ddim


def fine(*, steps: int = 5):
    return ddim(steps=steps)


@hookimpl
def cdmbench_register_samplers(register):
    register("needs-missing", fine, requires=("cdmbench_no_such_module",))
    register("needs-present", fine, requires=("json",))
'''


def test_a_component_requiring_a_missing_module_is_not_available_and_its_plugin_loads(plugin_dir, recwarn):
    """An optional package is no failure: the name says what to install, the rest is kept."""
    (plugin_dir / "testplugin_optional.py").write_text(OPTIONAL_REGISTRATIONS)
    plugins = load_plugins(["testplugin_optional"])
    assert "testplugin_optional" not in plugins.failures and not recwarn.list
    assert plugins["samplers"].get("needs-present").plugin == "testplugin_optional"
    with pytest.raises(RegistryError, match=r"^sampler 'needs-missing' \(plugin 'testplugin_optional'\) is not "
                                            r"available: it needs the module 'cdmbench_no_such_module', which is "
                                            r"not installed; install it \(pip install cdmbench_no_such_module\) "
                                            r"or use another sampler$"):
        plugins["samplers"].get("needs-missing")


def test_a_hook_with_a_wrong_argument_name_is_a_failure_of_its_plugin(plugin_dir):
    (plugin_dir / "testplugin_badarg.py").write_text(textwrap.dedent('''
        from cdmbench import hookimpl
        from cdmbench.builtin.augmentations import gaussian

        @hookimpl
        def cdmbench_register_augmentations(register):
            register("badarg-aug", gaussian)

        @hookimpl
        def cdmbench_register_samplers(reg):
            pass
    '''))
    with pytest.warns(UserWarning, match="plugin 'testplugin_badarg' cannot be registered"):
        plugins = load_plugins(["testplugin_badarg"])
    assert "{'reg'}" in plugins.failures["testplugin_badarg"]
    assert "testplugin_badarg" not in plugins.versions and "badarg-aug" not in plugins["augmentations"]
    assert "ddpm" in plugins["samplers"]


@pytest.mark.parametrize("source, error", [
    ("raise RuntimeError('needs CUDA')", r"failed to import: RuntimeError\('needs CUDA'\)"),
    ("import no_such_dependency_xyz", (r"needs the module 'no_such_dependency_xyz', which is not "
                                       r"installed; install the package that provides it$")),
], ids=["raises", "missing-dependency"])
def test_a_recipe_plugin_module_failing_at_import_is_a_plugin_error(plugin_dir, source, error):
    (plugin_dir / "testplugin_raising.py").write_text(source)
    with pytest.raises(PluginError, match=f"plugin module 'testplugin_raising' {error}"):
        load_plugins(["testplugin_raising"])


def test_a_failing_add_commands_hook_keeps_the_other_plugins_commands(plugin_dir, monkeypatch, capsys):
    (plugin_dir / "testplugin_cmd_bad.py").write_text(textwrap.dedent('''
        import click
        from cdmbench import hookimpl

        @hookimpl
        def cdmbench_add_commands(cli):
            cli.add_command(click.Command("half", callback=lambda: None))
            import no_such_click_extension
    '''))
    (plugin_dir / "testplugin_cmd_good.py").write_text(textwrap.dedent('''
        import click
        from cdmbench import hookimpl

        @hookimpl
        def cdmbench_add_commands(cli):
            cli.add_command(click.Command("hello", callback=lambda: click.echo("hello from a plugin")))
    '''))
    monkeypatch.setattr("cdmbench.plugins.load_plugins",
                        lambda **kw: load_plugins(["testplugin_cmd_bad", "testplugin_cmd_good"], **kw))
    monkeypatch.setattr(cli, "commands", dict(cli.commands))
    monkeypatch.setattr(sys, "argv", ["cdmbench", "hello"])
    with pytest.warns(UserWarning, match="plugin 'testplugin_cmd_bad' raised while adding commands: "
                                         "ModuleNotFoundError"), pytest.raises(SystemExit) as exit:
        main()
    assert exit.value.code == 0 and "hello from a plugin" in capsys.readouterr().out
    assert "half" not in cli.commands


def test_blocked_plugin_is_not_loaded(monkeypatch):
    monkeypatch.setenv("CDMBENCH_BLOCK_PLUGINS", "cdmbench.builtin.samplers")
    plugins = load_plugins()
    assert "ddpm" not in plugins["samplers"] and "adm-unet" in plugins["backbones"]


@pytest.mark.slow
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
    _distribution(tmp_path, "cdmbench-broken", "broken = cdmbench_no_such_module")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning, match="plugin 'broken'.*failed to import"):
        plugins = load_plugins()
    assert "No module named 'cdmbench_no_such_module'" in plugins.failures["broken"]
    assert "ddpm" in plugins["samplers"] and "broken" not in plugins.versions
    with pytest.raises(RegistryError, match="unknown sampler 'brokens-sampler'; .*; plugin 'broken' failed to "
                                            "load, and may provide it: import of cdmbench_no_such_module failed"):
        plugins["samplers"].get("brokens-sampler")
    monkeypatch.setenv("CDMBENCH_BLOCK_PLUGINS", "broken")
    assert "broken" not in load_plugins().failures


def test_two_packages_with_one_entry_point_name_load_the_first_and_name_both(plugin_dir):
    for dist, component in (("cdmbench-dupa", "dupa-sched"), ("cdmbench-dupb", "dupb-sched")):
        module = f"testplugin_{dist[9:]}"
        (plugin_dir / f"{module}.py").write_text(SCHEDULE_PLUGIN.format(name=component))
        _distribution(plugin_dir, dist, f"dupe = {module}")
    with pytest.warns(UserWarning, match="plugin 'dupe' is provided twice"):
        plugins = load_plugins()
    first = plugins.packages["dupe"]
    second = ({"cdmbench-dupa", "cdmbench-dupb"} - {first}).pop()
    assert plugins.failures["dupe"] == (f"the packages '{first}' and '{second}' both provide it; "
                                        f"'{second}' is not loaded")
    assert [f"{first[9:]}-sched"] == [n for n in plugins["schedules"].names() if n.startswith("dup")]


def test_a_misspelled_hook_is_a_failure_of_its_plugin(plugin_dir):
    """pluggy keeps an implementation of an unknown hook and never calls it: a plugin whose
    samplers silently never appear."""
    (plugin_dir / "testplugin_typo.py").write_text(textwrap.dedent('''
        from cdmbench import hookimpl
        from cdmbench.builtin.samplers import ddim

        @hookimpl
        def cdmbench_register_sampler(register):
            register("typo-ddim", ddim)
    '''))
    with pytest.warns(UserWarning, match="plugin 'testplugin_typo' cannot be registered: unknown hook "
                                         "'cdmbench_register_sampler'; did you mean 'cdmbench_register_samplers'"):
        plugins = load_plugins(["testplugin_typo"])
    assert "unknown hook" in plugins.failures["testplugin_typo"]


def test_a_plugin_named_in_cdmbench_plugins_but_not_installed_is_reported(monkeypatch):
    monkeypatch.setenv("CDMBENCH_PLUGINS", "cdmbench-difusers")
    with pytest.warns(UserWarning, match="plugin 'cdmbench-difusers' is named in CDMBENCH_PLUGINS, but no "
                                         "installed package provides it"):
        plugins = load_plugins()
    assert "cdmbench-difusers" in plugins.failures and "ddpm" in plugins["samplers"]


BROKEN_PACKAGE = '''
from cdmbench import hookimpl
from cdmbench.builtin.augmentations import blur
from cdmbench.builtin.samplers import ddim


def bad_sampler(steps=4):
    return ddim(steps=steps)


@hookimpl
def cdmbench_register_samplers(register):
    register("bad-sampler", bad_sampler)


@hookimpl
def cdmbench_register_augmentations(register):
    register("blur", blur)  # the built-in's name
'''


def _cdmbench(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """``cdmbench ARGS`` as the console script runs it: (exit status, stdout, stderr)."""
    monkeypatch.setattr(cli, "commands", dict(cli.commands))
    monkeypatch.setattr(sys, "argv", ["cdmbench", *args])
    with pytest.raises(SystemExit) as exit:
        main()
    out, err = capsys.readouterr()
    return exit.value.code or 0, out, err


def test_a_broken_plugin_package_beside_a_good_one_fails_alone(plugin_dir, tiny_recipe, monkeypatch, capsys):
    (plugin_dir / "testplugin_goodep.py").write_text(SCHEDULE_PLUGIN.format(name="good-constant"))
    (plugin_dir / "testplugin_badep.py").write_text(BROKEN_PACKAGE)
    _distribution(plugin_dir, "cdmbench-goodep", "goodep = testplugin_goodep")
    _distribution(plugin_dir, "cdmbench-badep", "badep = testplugin_badep")
    _distribution(plugin_dir, "cdmbench-gone", "gone = testplugin_not_there")
    with pytest.warns(UserWarning, match="plugin 'gone'"):
        status, out, err = _cdmbench(monkeypatch, capsys, "--help")
    assert status == 0 and "Usage: " in out and "Build, train, sample" in out
    with pytest.warns(UserWarning, match="plugin 'gone'"):
        status, out, _ = _cdmbench(monkeypatch, capsys, "--version")
    assert status == 0 and "cdmbench, version" in out

    with pytest.warns(UserWarning, match="plugin 'badep' failed to provide sampler 'bad-sampler'"):
        status, out, _ = _cdmbench(monkeypatch, capsys, "plugins")
    assert status == 0
    assert "goodep 1.0 (package cdmbench-goodep)\n    schedules: good-constant" in out
    assert "badep 1.0 (package cdmbench-badep)" in out
    failed = {line.split(": failed: ")[0]: line for line in out.splitlines() if ": failed: " in line}
    assert set(failed) == {"badep", "gone"}
    assert ("plugin 'badep' cannot register sampler 'bad-sampler': its factory bad_sampler takes positional "
            "parameters (steps); factories take keyword arguments only: def bad_sampler(*, steps)") in failed["badep"]
    assert ("augmentation 'blur' is registered by plugins 'cdmbench.builtin.augmentations' and 'badep', so "
            "neither is used") in failed["badep"]
    assert "import of testplugin_not_there failed: ModuleNotFoundError" in failed["gone"]

    good = tiny_recipe.read_text().replace("{name: cosine, args: {timesteps: 50}}", "{name: good-constant}", 1)
    tiny_recipe.write_text(good)
    with pytest.warns(UserWarning):
        status, out, err = _cdmbench(monkeypatch, capsys, "validate", str(tiny_recipe))
    assert status == 0 and f"{tiny_recipe}: ok" in out, err

    with pytest.warns(UserWarning):
        status, out, err = _cdmbench(monkeypatch, capsys, "validate", str(tiny_recipe),
                                     "--set", "stages.base8.sampler={name: bad-sampler}")
    assert status == 2 and err.startswith(
        "error: stages.base8.sampler.name: sampler 'bad-sampler' is not available: plugin 'badep' cannot register "
        "sampler 'bad-sampler': its factory bad_sampler takes positional parameters (steps)"), err
    with pytest.warns(UserWarning):
        status, out, err = _cdmbench(monkeypatch, capsys, "validate", str(tiny_recipe),
                                     "--set", "stages.sr16.augmentation={name: blur}")
    assert status == 2 and err.startswith(
        "error: stages.sr16.augmentation.name: augmentation 'blur' is registered by plugins "
        "'cdmbench.builtin.augmentations' and 'badep', so neither is used; uninstall or block one of them"), err


def test_a_plugin_command_cannot_replace_another(plugin_dir, monkeypatch, capsys):
    (plugin_dir / "testplugin_cmd_clash.py").write_text(textwrap.dedent('''
        import click
        from cdmbench import hookimpl

        @hookimpl
        def cdmbench_add_commands(cli):
            cli.add_command(click.Command("plugins", callback=lambda: click.echo("hijacked")))
    '''))
    monkeypatch.setattr("cdmbench.plugins.load_plugins",
                        lambda **kw: load_plugins(["testplugin_cmd_clash"], **kw))
    with pytest.warns(UserWarning, match="plugin 'testplugin_cmd_clash' adds the command\\(s\\) plugins, which "
                                         "exist already; its own are not used"):
        status, out, _ = _cdmbench(monkeypatch, capsys, "plugins")
    assert status == 0 and "hijacked" not in out and "cdmbench.builtin.samplers" in out


def test_a_hint_that_does_not_resolve_is_an_error_not_an_unchecked_argument():
    """check_component used to skip the type check of a factory whose hints did not resolve."""
    from cdmbench.recipe.schema import Component as Spec
    from cdmbench.recipe.validate import check_component
    from cdmbench.registry import Component

    def factory(*, steps: "NoSuchType" = 5):  # noqa: F821
        return steps

    component = Component("samplers", "unchecked", factory, "", "p", None)  # made without Registry.add
    registry = type("One", (), {"get": lambda self, name: component})()
    with pytest.raises(RecipeError, match=r"^stages.base8.sampler: sampler 'unchecked' of plugin 'p': a type hint "
                                          r"of its factory does not resolve \(NameError"):
        check_component({"samplers": registry}, "samplers", Spec("unchecked", {"steps": "ten"}), "stages.base8.sampler")


def test_a_plugin_factorys_type_hints_check_a_recipe(plugin_dir, tiny_recipe):
    (plugin_dir / "testplugin_typed.py").write_text(SCHEDULE_PLUGIN.format(name="typed-constant"))
    text = tiny_recipe.read_text().replace("seed: 0\n", "seed: 0\nplugins: [testplugin_typed]\n", 1)
    tiny_recipe.write_text(text.replace("{name: cosine, args: {timesteps: 50}}", "{name: typed-constant}", 1))
    with pytest.raises(RecipeError, match="stages.base8.schedule.args.timesteps: expected an integer, got 'ten'"):
        load_recipe(tiny_recipe, overrides=["stages.base8.schedule.args.timesteps=ten"])


def test_a_baselines_factory_that_raises_is_an_error_naming_it(plugin_dir):
    from cdmbench.reporting.tables import baseline_frame

    (plugin_dir / "testplugin_rows.py").write_text(textwrap.dedent('''
        from cdmbench import hookimpl

        def rows():
            raise ValueError("the table file is missing; reinstall the package")

        @hookimpl
        def cdmbench_register_baselines(register):
            register("my-rows", rows)
    '''))
    with pytest.raises(CdmbenchError, match=r"^baseline 'my-rows' \(plugin 'testplugin_rows'\): the table file is "
                                            "missing; reinstall the package$"):
        baseline_frame(load_plugins(["testplugin_rows"]))
