"""The conformance kit (cdmbench.testing) over every built-in component, and its own failures."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdmbench.builtin.samplers import ddim
from cdmbench.errors import CdmbenchError
from cdmbench.plugins import load_plugins
from cdmbench.testing import (
    ACCURACY_STEPS,
    ConformanceError,
    check_backbone,
    check_component,
    check_logger,
    check_sampler,
    check_schedule,
    components,
)
from tests.test_plugins import SCHEDULE_PLUGIN, _distribution

PLUGINS = load_plugins()
BUILTIN = [c for reg in PLUGINS.registries.values() for c in reg if c.plugin.startswith("cdmbench.builtin")]
FAST_CLASSIFIER = {"arch": "resnet10t", "epochs": 1}


def _args(component, tmp_path: Path) -> dict:
    """What a component needs beyond its defaults here (a data folder, a cheap classifier)."""
    kind, name = component.kind, component.name
    if (kind, name) == ("datasets", "imagefolder"):
        for k, cls in enumerate(["a", "b"]):
            (tmp_path / cls).mkdir()
            Image.fromarray(np.full((20, 24, 3), 60 * k, np.uint8)).save(tmp_path / cls / "0.png")
        return {"path": str(tmp_path)}
    if (kind, name) == ("datasets", "hf"):
        from datasets import ClassLabel, Dataset, Features
        from datasets import Image as HFImage
        ds = Dataset.from_dict({"image": [Image.fromarray(np.zeros((12, 12, 3), np.uint8))] * 2, "label": [0, 1]},
                               features=Features({"image": HFImage(), "label": ClassLabel(names=["x", "y"])}))
        ds.save_to_disk(str(tmp_path / "hf"))
        return {"path": str(tmp_path / "hf")}
    if (kind, name) == ("datasets", "fashion-mnist") and not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("dataset-fashion-mnist is not installed")
    if (kind, name) == ("features", "inception-2015-12-05"):
        pytest.skip("the Inception weights are not available offline (tests/evaluation/test_evaluation.py "
                    "checks their loader and its error)")
    if (kind, name) == ("features", "dinov2"):  # ViT-S/14 of random weights in the official layout
        from tests.builtin.test_dinov2 import SMALL, save_official
        save_official(tmp_path / "dinov2_vits14_pretrain.pth")
        return {"path": str(tmp_path / "dinov2_vits14_pretrain.pth"), "arch": SMALL}
    if (kind, name) == ("features", "classifier"):
        return {"epochs": 1}
    if (kind, name) == ("metrics", "cas"):
        return FAST_CLASSIFIER
    if (kind, name) == ("metrics", "sfid"):
        pytest.skip("sFID reads Inception's mixed_6/conv, whose weights are not available offline "
                    "(tests/evaluation/test_reference_batches.py runs it on a stand-in)")
    if kind == "metrics":  # fid, is: offline features
        return {"features": "classifier", "features_args": {"epochs": 1}}
    if (kind, name) == ("backbones", "adm-unet"):
        return {"channels": 32, "channel_mult": [1, 2], "attention_resolutions": [8]}
    return {}


def test_every_builtin_kind_is_covered():
    """(a built-in whose optional package is missing, tensorboard, is covered where it is installed)"""
    optional = {kind for kind, reg in PLUGINS.registries.items()
                if any("(plugin 'cdmbench.builtin." in why for why in reg.unavailable_names().values())}
    assert {c.kind for c in BUILTIN} | optional == set(PLUGINS.registries)


@pytest.mark.slow
@pytest.mark.parametrize("component", BUILTIN, ids=lambda c: f"{c.kind}:{c.name}")
def test_builtin_components_conform(component, tmp_path):
    check_component(component, _args(component, tmp_path))


def test_components_lists_one_plugin_and_rejects_unknown_ones():
    assert {c.name for c in components("cdmbench.builtin.schedules", PLUGINS)} == {"linear", "cosine", "log-snr"}
    with pytest.raises(Exception, match="no components from plugin 'nope'"):
        components("nope", PLUGINS)


# The kit must fail broken components, with a message that says what is wrong.

def test_a_backbone_that_ignores_class_labels_fails():
    real = PLUGINS["backbones"].get("adm-unet").factory

    def deaf(**kw):
        model = real(**{**kw, "channels": 32, "channel_mult": [1, 2], "attention_resolutions": []})
        forward = model.forward
        model.forward = lambda x_t, noise_cond, class_labels=None, low_res=None, aug_cond=None: forward(
            x_t, noise_cond, None if class_labels is None else class_labels * 0, low_res, aug_cond)
        return model

    with pytest.raises(ConformanceError, match="changing class_labels does not change the output"):
        check_backbone(deaf, {})


def test_a_backbone_that_checks_the_documented_level_range_passes():
    """noise_cond and aug_cond are on [0, 1000): the kit must not feed values beyond it."""
    real = PLUGINS["backbones"].get("adm-unet").factory

    def strict(**kw):
        model = real(**{**kw, "channels": 32, "channel_mult": [1, 2], "attention_resolutions": []})
        forward = model.forward

        def checked(x_t, noise_cond, class_labels=None, low_res=None, aug_cond=None):
            for name, levels in (("noise_cond", noise_cond), ("aug_cond", aug_cond)):
                if levels is not None and not bool(((levels >= 0) & (levels < 1000)).all()):
                    raise ValueError(f"{name} outside [0, 1000)")
            return forward(x_t, noise_cond, class_labels, low_res, aug_cond)

        model.forward = checked
        return model

    check_backbone(strict, {})


def test_a_sampler_with_a_shifted_level_mapping_fails():
    real = PLUGINS["samplers"].get("ddim").factory

    def shifted(**kw):
        sampler = real(**kw)
        sample = sampler.sample

        def wrong(*, denoise, **rest):  # hands the model the conditioning of the next step
            return sample(denoise=lambda x, abar, nc: denoise(x, abar, nc + 1), **rest)
        sampler.sample = wrong
        return sampler

    with pytest.raises(ConformanceError, match="passed noise_cond"):
        check_sampler(shifted, {})


def test_a_sampler_that_shares_noise_across_the_batch_fails():
    real = PLUGINS["samplers"].get("ddpm").factory

    def shared(**kw):
        sampler = real(**{"steps": 20, **kw})
        sample = sampler.sample
        sampler.sample = lambda *, generators, **rest: sample(generators=[generators[0]] * len(generators), **rest)
        return sampler

    with pytest.raises(ConformanceError, match="depends on its batch|variance"):
        check_sampler(shared, {})


def test_the_sampler_check_tests_the_contract_not_the_authors_step_count():
    """ddim at 10 steps samples N(0, 0.25) with variance 0.12: the accuracy test runs at the kit's
    step count, the rest of the contract at the author's."""
    check_component(PLUGINS["samplers"].get("ddim"), {"steps": 10})
    seen = []

    def recording(*, steps: int = 50):
        seen.append(steps)
        return ddim(steps=steps)

    check_sampler(recording, {"steps": 10})
    assert seen == [10, ACCURACY_STEPS]


def test_a_sampler_ignoring_its_steps_fails_the_accuracy_test():
    def three_steps(*, steps: int = 50):
        return ddim(steps=3)

    with pytest.raises(ConformanceError, match=rf"sampled N\(0, 0.25\) with variance 0.0\d+ at {ACCURACY_STEPS} steps"):
        check_sampler(three_steps, {})


def test_a_logger_that_cannot_take_a_failed_result_row_or_lacks_a_method_fails():
    class Printing:  # formats every value: a failed row's is None
        def start_stage(self, stage, step): ...
        def log_scalars(self, stage, values, step): ...
        def log_results(self, stage, rows, step):
            return [f"{row['metric']}: {row['value']:.3f}" for row in rows]
        def log_image(self, stage, name, path, step): ...
        def close(self): ...

    def printing(*, run_dir: Path):
        return Printing()

    with pytest.raises(ConformanceError, match=r"logger: log_results raised TypeError\(.*NoneType.*\(a new run\)"):
        check_logger(printing, {})
    del Printing.close
    with pytest.raises(ConformanceError, match="logger: the logger has no close"):
        check_logger(printing, {})


def test_a_factory_breaking_the_contract_fails_the_kit():
    def positional(timesteps=10):
        return PLUGINS["schedules"].get("cosine").factory(timesteps=timesteps)

    with pytest.raises(ConformanceError, match=r"takes positional parameters \(timesteps\); factories take keyword"):
        check_schedule(positional, {})


def test_components_alone_loads_only_the_plugin_under_test(plugin_dir):
    """Another installed plugin, broken or registering the same names, cannot stop its tests."""
    (plugin_dir / "testplugin_mine.py").write_text(SCHEDULE_PLUGIN.format(name="mine-constant"))
    (plugin_dir / "testplugin_theirs.py").write_text(SCHEDULE_PLUGIN.format(name="mine-constant").replace(
        'register("mine-constant", constant, summary="constant betas")',
        'register("mine-constant", constant)\n    register("cosine", constant)'))
    _distribution(plugin_dir, "cdmbench-mine", "mine = testplugin_mine")
    _distribution(plugin_dir, "cdmbench-theirs", "theirs = testplugin_theirs")
    _distribution(plugin_dir, "cdmbench-gone", "gone = testplugin_not_there")
    with pytest.warns(UserWarning, match="registered by plugins"), pytest.raises(
            CdmbenchError, match="no components from plugin 'mine'"):
        components("mine")  # every installed plugin: its one name collides
    assert [c.name for c in components("mine", alone=True)] == ["mine-constant"]
    assert {c.name for c in components("cdmbench.builtin.schedules", alone=True)} == {"linear", "cosine", "log-snr"}
    (plugin_dir / "testplugin_module.py").write_text(SCHEDULE_PLUGIN.format(name="module-constant"))
    assert [c.plugin for c in components("testplugin_module", alone=True)] == ["testplugin_module"]
    with pytest.raises(ValueError, match="not both"):
        components("mine", PLUGINS, alone=True)
