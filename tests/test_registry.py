import functools

import pytest

from cdmbench.errors import CdmbenchError, RegistryError
from cdmbench.registry import BuildError, Registry, factory_problem


def make(kind="schedules"):
    reg = Registry(kind)
    reg.add("cosine", lambda *, timesteps=10: timesteps, summary="", plugin="a", version="1")
    reg.add("linear", lambda: 0, summary="", plugin="a", version="1")
    return reg


def test_collision_names_both_plugins_and_neither_is_used():
    reg = make()
    with pytest.raises(RegistryError, match="'cosine' is registered by plugins 'a' and 'b', so neither is used"):
        reg.add("cosine", lambda: 1, summary="", plugin="b", version=None)
    assert "cosine" not in reg and reg.names() == ["linear"]
    with pytest.raises(RegistryError, match="'cosine' is registered by plugins 'a' and 'b'.*CDMBENCH_BLOCK_PLUGINS"):
        reg.get("cosine")
    with pytest.raises(RegistryError, match="plugins 'a' and 'b' and 'c', so none is used"):
        reg.add("cosine", lambda: 2, summary="", plugin="c", version=None)
    with pytest.raises(RegistryError, match="registered twice by plugin 'a', so it is not used"):
        reg.add("linear", lambda: 0, summary="", plugin="a", version="1")


def test_unknown_name_suggests_closest():
    with pytest.raises(RegistryError, match=r"unknown schedule 'cosin'; did you mean 'cosine'\?"):
        make().get("cosin")


def test_unknown_name_without_close_match_lists_all():
    with pytest.raises(RegistryError, match="valid: cosine, linear"):
        make().get("zzzzzz")


@pytest.mark.parametrize("bad", ["Cosine", "my_schedule", "-x", "a--b", ""])
def test_names_are_lower_kebab(bad):
    with pytest.raises(RegistryError, match="cannot register schedule .*: names are lower-case kebab"):
        make().add(bad, lambda: 0, summary="", plugin="p", version=None)


def test_records_plugin_and_version_and_matches_globs():
    reg = make()
    assert (reg.get("linear").plugin, reg.get("linear").version) == ("a", "1")
    assert [c.name for c in reg.match("cos*")] == ["cosine"]


def test_build_injects_only_declared_host_facts():
    reg = make()
    assert reg.get("cosine").build({}, timesteps=7, resolution=32) == 7
    assert reg.get("linear").build({}, resolution=32) == 0


def _positional(timesteps, beta=0.1):
    return timesteps


def _star(*args, timesteps=1):
    return timesteps


def _positional_only(timesteps, /, *, beta=0.1):
    return timesteps


def _defaulted(model="adm"):  # a closure's default (lambda model=model: ...) is a parameter too
    return model


def _unresolved(*, size: "NoSuchSize" = 3):  # noqa: F821
    return size


class _UnresolvedClass:
    def __init__(self, *, size: "NoSuchSize" = 3):  # noqa: F821
        self.size = size


def _unresolved_return(*, size: int = 3) -> "NoSuchResult":  # noqa: F821  (not a parameter: not checked)
    return size


def _keyword_only(*, timesteps: int = 10, **rest):
    return timesteps


class _KeywordClass:
    def __init__(self, *, timesteps: int = 10):
        self.timesteps = timesteps


@pytest.mark.parametrize("factory, reason", [
    (_positional, r"its factory _positional takes positional parameters \(timesteps, beta\); factories take "
                  r"keyword arguments only: def _positional\(\*, timesteps, beta\)"),
    (_star, r"its factory _star takes positional parameters \(\*args\)"),
    (_positional_only, r"its factory _positional_only takes positional parameters \(timesteps\)"),
    (_defaulted, r"its factory _defaulted takes positional parameters \(model\)"),
    (_unresolved, r"a type hint of its factory _unresolved does not resolve \(NameError: name 'NoSuchSize'"),
    (_UnresolvedClass, r"a type hint of its factory _UnresolvedClass does not resolve \(NameError"),
    (3, r"its factory is not callable: 3"),
], ids=["positional", "star-args", "positional-only", "defaulted", "hint", "class-hint", "not-callable"])
def test_factories_breaking_the_contract_are_refused_at_the_door(factory, reason):
    reg = make()
    with pytest.raises(RegistryError, match=f"plugin 'p' cannot register schedule 'bad': {reason}"):
        reg.add("bad", factory, summary="", plugin="p", version=None)
    assert "bad" not in reg


@pytest.mark.parametrize("factory", [_keyword_only, _KeywordClass, _unresolved_return, lambda: 0,
                                     functools.partial(_positional, 5, 0.2)],
                         ids=["keyword-only", "class", "return-hint", "no-parameters", "partial"])
def test_keyword_only_factories_pass_the_door(factory):
    assert factory_problem(factory) is None
    reg = make()
    reg.add("good", factory, summary="", plugin="p", version=None)
    assert reg.get("good").factory is factory


def test_a_name_a_failed_plugin_was_to_provide_says_which_and_why():
    reg = make()
    reg.unavailable("euler", "sampler 'euler' is not available: plugin 'p' failed to provide it: boom")
    reg.unavailable("cosine", "not this: cosine is provided")  # a provided name keeps working
    with pytest.raises(RegistryError, match="^sampler 'euler' is not available: plugin 'p' failed to provide "
                                            "it: boom$"):
        reg.get("euler")
    assert reg.get("cosine").plugin == "a"
    reg.failed_plugins["broken"] = "import of broken failed: ImportError('x')"
    with pytest.raises(RegistryError, match="unknown schedule 'zzz'; valid: cosine, linear; plugin 'broken' "
                                            "failed to load, and may provide it: import of broken failed"):
        reg.get("zzz")


def test_a_factory_refusing_its_arguments_is_a_build_error_naming_the_component():
    reg = make()

    def picky(*, timesteps: int = 10):
        if timesteps > 5:
            raise TypeError(f"timesteps {timesteps} > 5")
        return timesteps

    reg.add("picky", picky, summary="", plugin="p", version="2")
    with pytest.raises(BuildError, match=r"^schedule 'picky' \(plugin 'p'\): timesteps 7 > 5$") as caught:
        reg.get("picky").build({"timesteps": 7})
    assert isinstance(caught.value, CdmbenchError) and caught.value.reason == "timesteps 7 > 5"
