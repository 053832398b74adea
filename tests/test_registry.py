import pytest

from cdmbench.errors import RegistryError
from cdmbench.registry import Registry


def make(kind="schedules"):
    reg = Registry(kind)
    reg.add("cosine", lambda *, timesteps=10: timesteps, summary="", plugin="a", version="1")
    reg.add("linear", lambda: 0, summary="", plugin="a", version="1")
    return reg


def test_collision_names_both_plugins():
    reg = make()
    with pytest.raises(RegistryError, match="'cosine' is registered by two plugins: 'a' and 'b'"):
        reg.add("cosine", lambda: 1, summary="", plugin="b", version=None)


def test_unknown_name_suggests_closest():
    with pytest.raises(RegistryError, match=r"unknown schedule 'cosin'; did you mean 'cosine'\?"):
        make().get("cosin")


def test_unknown_name_without_close_match_lists_all():
    with pytest.raises(RegistryError, match="valid: cosine, linear"):
        make().get("zzzzzz")


@pytest.mark.parametrize("bad", ["Cosine", "my_schedule", "-x", "a--b", ""])
def test_names_are_lower_kebab(bad):
    with pytest.raises(RegistryError, match="lower-case kebab"):
        make().add(bad, lambda: 0, summary="", plugin="p", version=None)


def test_records_plugin_and_version_and_matches_globs():
    reg = make()
    assert (reg.get("linear").plugin, reg.get("linear").version) == ("a", "1")
    assert [c.name for c in reg.match("cos*")] == ["cosine"]


def test_build_injects_only_declared_host_facts():
    reg = make()
    assert reg.get("cosine").build({}, timesteps=7, resolution=32) == 7
    assert reg.get("linear").build({}, resolution=32) == 0
