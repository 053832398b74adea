"""The conformance kit (cdmbench.testing) over every built-in component, and its own failures."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdmbench.plugins import load_plugins
from cdmbench.testing import ConformanceError, check_backbone, check_component, check_sampler, components

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
    if (kind, name) == ("features", "classifier"):
        return {"epochs": 1}
    if (kind, name) == ("metrics", "cas"):
        return FAST_CLASSIFIER
    if kind == "metrics":  # fid, is: offline features
        return {"features": "classifier", "features_args": {"epochs": 1}}
    if (kind, name) == ("backbones", "adm-unet"):
        return {"channels": 32, "channel_mult": [1, 2], "attention_resolutions": [8]}
    return {}


def test_every_builtin_kind_is_covered():
    assert {c.kind for c in BUILTIN} == set(PLUGINS.registries)


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
