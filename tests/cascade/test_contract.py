"""The contract enforced where stages call their components: the first call of each sampler,
augmentation and backbone is checked for shape, dtype and finiteness (an error naming the
component and its plugin), and a factory or a sampler's ``check`` refusing its arguments is an
``error:`` line at the recipe path, not a traceback."""

from __future__ import annotations

import pytest
import torch
import yaml

from cdmbench.cascade.stages import StageModel, build_all, sample_cascade
from cdmbench.errors import CdmbenchError, RecipeError
from cdmbench.recipe.validate import parse_recipe
from tests.conftest import TINY_RECIPE
from tests.test_plugins import _cdmbench

WRONG_PLUGIN = '''
import torch
from cdmbench import hookimpl
from cdmbench.builtin.augmentations import gaussian
from cdmbench.builtin.samplers import ddim
from cdmbench.builtin.unet import adm_unet


def _broken(x, mode):
    if mode == "half-width":
        return x[..., ::2]
    if mode == "float64":
        return x.double()
    if mode == "nan":
        return x * float("nan")
    if mode == "list":
        return [x]
    return x


class WrongSampler:
    def __init__(self, mode, steps):
        self.mode, self.inner = mode, ddim(steps=steps)

    def check(self, process, *, learned_variance, stop_at=0.0):
        self.inner.check(process, learned_variance=learned_variance, stop_at=stop_at)

    def sample(self, **kw):
        return _broken(self.inner.sample(**kw), self.mode)


def wrong_sampler(*, mode: str = "half-width", steps: int = 1):
    if mode == "bad-steps" and steps > 1:
        raise TypeError(f"steps must be an int of at most 1, got {steps}")
    return WrongSampler(mode, steps)


class OldCheck:
    """A sampler whose check predates the contract's stop_at."""

    def check(self, process, learned_variance):
        pass

    def sample(self, **kw):
        raise AssertionError("not reached")


def old_check():
    return OldCheck()


class WrongAugmentation:
    def __init__(self, mode, inner):
        self.mode, self.inner, self.cond_dim = mode, inner, inner.cond_dim

    def train(self, z0, *, generator=None):
        image, cond = self.inner.train(z0, generator=generator)
        return (image, cond[:, :0]) if self.mode == "train-cond-width" else (image, cond)

    def sample(self, z0, *, generators):
        image, cond = self.inner.sample(z0, generators=generators)
        if self.mode == "cond-width":
            return image, torch.cat([cond, cond], dim=1)
        return _broken(image, self.mode), cond


def wrong_augmentation(*, schedule, mode: str = "cond-width"):
    return WrongAugmentation(mode, gaussian(schedule=schedule, max_level=0.3, level=0.1))


def wrong_backbone(*, mode: str = "channels", **host):
    model = adm_unet(**host, channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[])
    forward = model.forward

    def broken(x_t, noise_cond, class_labels=None, low_res=None, aug_cond=None):
        out = forward(x_t, noise_cond, class_labels, low_res, aug_cond)
        return out[:, :1] if mode == "channels" else _broken(out, mode)

    model.forward = broken
    return model


@hookimpl
def cdmbench_register_samplers(register):
    register("wrong-sampler", wrong_sampler)
    register("old-check", old_check)


@hookimpl
def cdmbench_register_augmentations(register):
    register("wrong-augmentation", wrong_augmentation)


@hookimpl
def cdmbench_register_backbones(register):
    register("wrong-backbone", wrong_backbone)
'''


def _chain(plugin_dir, *overrides: str):
    (plugin_dir / "testplugin_wrong.py").write_text(WRONG_PLUGIN)
    raw = yaml.safe_load(TINY_RECIPE)
    raw["plugins"] = ["testplugin_wrong"]
    fast = ["stages.base8.sampler.args.steps=1", "stages.sr16.sampler.args.steps=1"]
    recipe, plugins = parse_recipe(raw, overrides=[*fast, *overrides])
    return build_all(plugins, recipe, 10, "cpu")


def _sample(stages, n: int = 3):
    """Sample the cascade's stages (the first alone when the second is not to be tested)."""
    models = {st.spec.name: st.backbone.eval() for st in stages}
    return sample_cascade(stages, models, torch.arange(n), seed=0, batch_size=n, device="cpu", progress=False)


@pytest.mark.parametrize("mode, error", [
    ("half-width", r"returned its images with shape \(3, 3, 8, 4\); expected \(3, 3, 8, 8\)"),
    ("float64", r"returned its images as torch.float64; expected torch.float32"),
    ("nan", r"returned NaN or inf in its images on its first call"),
    ("list", r"returned list as its images, not a tensor of shape \(3, 3, 8, 8\)"),
])
def test_a_sampler_returning_the_wrong_images_is_named(plugin_dir, mode, error):
    stages = _chain(plugin_dir, f"stages.base8.sampler={{name: wrong-sampler, args: {{mode: {mode}}}}}")
    with pytest.raises(CdmbenchError, match=r"^sampler 'wrong-sampler' \(plugin 'testplugin_wrong'\) of stage "
                                            rf"base8 {error}"):
        _sample(stages[:1])


@pytest.mark.parametrize("mode, error", [
    ("cond-width", r"returned its conditioning with shape \(3, 2\); expected \(3, 1\)"),
    ("half-width", r"returned its image with shape \(3, 3, 8, 4\); expected \(3, 3, 8, 8\)"),
    ("nan", r"returned NaN or inf in its image"),
])
def test_an_augmentation_returning_the_wrong_tensors_is_named(plugin_dir, mode, error):
    stages = _chain(plugin_dir, f"stages.sr16.augmentation={{name: wrong-augmentation, args: {{mode: {mode}}}}}")
    with pytest.raises(CdmbenchError, match=r"^augmentation 'wrong-augmentation' \(plugin 'testplugin_wrong'\) "
                                            rf"of stage sr16 {error}"):
        _sample(stages)


def test_an_augmentation_training_with_the_wrong_conditioning_is_named(plugin_dir):
    """The trainer's call (augmentation.train) is checked too, on the first training batch."""
    from cdmbench.training.bench import synthetic_data
    from cdmbench.training.trainer import make_batch

    stages = _chain(plugin_dir, "stages.sr16.augmentation={name: wrong-augmentation, args: {mode: train-cond-width}}")
    data = synthetic_data(stages[1], 10, 4)
    with pytest.raises(CdmbenchError, match=r"^augmentation 'wrong-augmentation' \(plugin 'testplugin_wrong'\) "
                                            r"of stage sr16 returned its conditioning with shape \(4, 0\); "
                                            r"expected \(4, 1\)"):
        make_batch(stages[1], data, torch.arange(4), "cpu")
    assert make_batch(stages[0], synthetic_data(stages[0], 10, 4), torch.arange(4), "cpu").low_res is None


@pytest.mark.parametrize("mode, error", [
    ("channels", r"returned its output with shape \(3, 1, 8, 8\); expected \(3, 3, 8, 8\)"),
    ("float64", r"returned its output as torch.float64; expected torch.float32"),
    ("nan", r"returned NaN or inf in its output"),
])
def test_a_backbone_returning_the_wrong_output_is_named(plugin_dir, mode, error):
    stages = _chain(plugin_dir, f"stages.base8.backbone={{name: wrong-backbone, args: {{mode: {mode}}}}}")
    with pytest.raises(CdmbenchError, match=r"^backbone 'wrong-backbone' \(plugin 'testplugin_wrong'\) of stage "
                                            rf"base8 {error}"):
        _sample(stages[:1])


def test_only_the_first_call_is_checked(plugin_dir, monkeypatch):
    stages = _chain(plugin_dir)
    calls = []
    check = StageModel.check_output
    monkeypatch.setattr(StageModel, "check_output", lambda self, role, *a, **k: calls.append(role) or check(
        self, role, *a, **k))
    first, _ = _sample(stages)
    assert [st.checked for st in stages] == [{"backbone", "sampler"}, {"backbone", "sampler", "augmentation"}]
    assert sorted(set(calls)) == ["augmentation", "backbone", "sampler"]
    count = len(calls)
    again, _ = _sample(stages)
    assert len(calls) == count and torch.equal(first["sr16"], again["sr16"])


def test_a_factory_refusing_its_arguments_is_an_error_line(plugin_dir, tiny_recipe, monkeypatch, capsys):
    """cdmbench validate: exit status 2 and one line naming the recipe path, no traceback."""
    (plugin_dir / "testplugin_wrong.py").write_text(WRONG_PLUGIN)
    tiny_recipe.write_text(tiny_recipe.read_text().replace("seed: 0\n", "seed: 0\nplugins: [testplugin_wrong]\n", 1))
    status, _, err = _cdmbench(monkeypatch, capsys, "validate", str(tiny_recipe), "--set",
                               "stages.base8.sampler={name: wrong-sampler, args: {mode: bad-steps, steps: 2}}")
    assert (status, err) == (2, "error: stages.base8.sampler: sampler 'wrong-sampler': steps must be an int of at "
                                "most 1, got 2\n")


def test_a_sampler_check_without_the_contracts_arguments_is_a_recipe_error(plugin_dir):
    with pytest.raises(RecipeError, match=r"^stages.base8.sampler: sampler 'old-check': check\(process, "
                                          r"learned_variance=..., stop_at=...\) raised TypeError .*a sampler's "
                                          r"check takes \(process, \*, learned_variance, stop_at=0.0\)"):
        _chain(plugin_dir, "stages.base8.sampler={name: old-check}")
