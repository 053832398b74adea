"""Conditioning augmentations: gaussian (non-truncated and truncated), blur, composition, and
how levels reach the backbone and the cascade."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from torch import Tensor

from cdmbench.builtin.augmentations import blur, gaussian, gaussian_kernels
from cdmbench.builtin.schedules import cosine, linear
from cdmbench.builtin.unet import adm_unet
from cdmbench.cascade.stages import Composition, build_stage, sample_cascade, sample_stage
from cdmbench.diffusion import noise_level_cond
from cdmbench.diffusion.process import make_process
from cdmbench.errors import RecipeError
from cdmbench.recipe.validate import parse_recipe
from tests.conftest import TINY_RECIPE


def test_gaussian_augmentation_per_example_levels():
    schedule = cosine(timesteps=1000)
    augmentation = gaussian(schedule=schedule, min_level=0.1, max_level=0.4)
    z0 = torch.full((4000, 1, 2, 2), 0.5)
    z_s, cond = augmentation.train(z0, generator=torch.Generator().manual_seed(0))
    s = cond[:, 0] / 1000
    assert cond.shape == (4000, 1) and s.min() >= 0.1 and s.max() <= 0.4
    assert s.std() == pytest.approx(0.3 / math.sqrt(12), rel=0.05)  # U(0.1, 0.4), per example
    # Given its level, each example is distributed as q(z_s | z_0): standardised noise is N(0, 1).
    abar = schedule.abar(s.double()).float().view(-1, 1, 1, 1)
    eps = (z_s - abar.sqrt() * z0) / (1 - abar).sqrt()
    assert eps.mean().item() == pytest.approx(0, abs=0.03)
    assert eps.std().item() == pytest.approx(1, rel=0.03)


def test_gaussian_augmentation_at_sampling_uses_fixed_level():
    schedule = cosine(timesteps=1000)
    augmentation = gaussian(schedule=schedule, max_level=0.5, level=0.2)
    z0 = torch.zeros(3000, 1, 1, 1)
    z_s, cond = augmentation.sample(z0, generators=[torch.Generator().manual_seed(i) for i in range(3000)])
    assert torch.all(cond == 200.0)
    assert z_s.var().item() == pytest.approx(1 - schedule.abar(torch.tensor(0.2)).item(), rel=0.06)
    with pytest.raises(ValueError, match="min_level <= max_level"):
        gaussian(schedule=schedule, min_level=0.5, max_level=0.2)


def test_blur_kernels_are_normalised_gaussians():
    sigma = torch.tensor([0.4, 0.5, 1.0, 3.0])
    k = gaussian_kernels(sigma, 3)
    assert torch.allclose(k.sum(dim=(1, 2)), torch.ones(4))
    assert torch.allclose(k, k.transpose(1, 2)) and torch.allclose(k, k.flip(1))
    ratio = k[:, 1, 0] / k[:, 1, 1]  # neighbour / centre = exp(-1 / (2 sigma^2))
    assert torch.allclose(ratio, torch.exp(-1 / (2 * sigma**2)), rtol=1e-5)


def test_blur_of_a_delta_is_the_kernel():
    aug = blur(min_sigma=0.5, max_sigma=0.5, p=1.0)
    delta = torch.zeros(1, 3, 7, 7)
    delta[:, :, 3, 3] = 1.0
    out, _ = aug.train(delta)
    assert torch.allclose(out[0, 0, 2:5, 2:5], gaussian_kernels(torch.tensor([0.5]), 3)[0], atol=1e-6)
    assert out[0, 0].sum().item() == pytest.approx(1.0)


def test_blur_fraction_sigma_range_conditioning_and_never_at_sampling():
    aug = blur(min_sigma=0.4, max_sigma=0.6, p=0.3, condition=True)
    z0 = torch.randn(4000, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    out, cond = aug.train(z0, generator=torch.Generator().manual_seed(1))
    changed = (out != z0).flatten(1).any(1)
    assert changed.float().mean().item() == pytest.approx(0.3, abs=0.03)  # 4000 draws: sd 0.007
    sigma = cond[:, 0] / 1000
    assert bool((sigma[~changed] == 0).all())
    assert sigma[changed].min() >= 0.4 and sigma[changed].max() <= 0.6 and sigma[changed].std() > 0.05
    same, sample_cond = aug.sample(z0[:5], generators=[torch.Generator() for _ in range(5)])
    assert torch.equal(same, z0[:5]) and torch.equal(sample_cond, torch.zeros(5, 1))
    assert blur().cond_dim == 0 and blur().train(z0[:4])[1].shape == (4, 0)
    with pytest.raises(ValueError, match="odd"):
        blur(size=4)


def test_composition_applies_in_order_and_concatenates_conditioning():
    schedule = cosine(timesteps=100)
    parts = [blur(p=1.0, condition=True), gaussian(schedule=schedule, min_level=0.2, max_level=0.2, level=0.1)]
    both = Composition(parts)
    assert both.cond_dim == 2 and both.truncation == 0.0
    z0 = torch.zeros(3, 3, 4, 4)
    _, cond = both.train(z0, generator=torch.Generator().manual_seed(0))
    assert cond.shape == (3, 2) and torch.allclose(cond[:, 1], torch.full((3,), 200.0))
    truncated = gaussian(schedule=schedule, max_level=0.3, level=0.2, mode="truncated")
    assert Composition([blur(), truncated]).truncation == 0.2
    with pytest.raises(ValueError, match="at most one"):
        Composition([truncated, truncated])


def test_the_level_reaches_the_backbone():
    torch.manual_seed(0)
    net = adm_unet(resolution=8, in_channels=3, out_channels=3, num_classes=0, low_res_channels=3,
                   aug_dim=1, channels=32, channel_mult=[1], num_res_blocks=1, attention_resolutions=[])
    for p in net.parameters():  # the output conv is zero-initialised
        torch.nn.init.normal_(p, std=0.05)
    x, low = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        a = net(x, t, low_res=low, aug_cond=torch.tensor([[100.0], [100.0]]))
        b = net(x, t, low_res=low, aug_cond=torch.tensor([[300.0], [100.0]]))
    assert not torch.allclose(a[0], b[0], atol=1e-4) and torch.allclose(a[1], b[1])


def tiny(*overrides):
    return parse_recipe(yaml.safe_load(TINY_RECIPE), overrides=list(overrides))


def random_models(stages) -> dict:
    """The stages' networks with random weights: an untrained U-Net's zero output convolution
    would make an SR sample independent of its low-res input."""
    torch.manual_seed(0)
    for st in stages:
        for p in st.backbone.parameters():
            torch.nn.init.normal_(p, std=0.05)
    return {st.spec.name: st.backbone.eval() for st in stages}


def test_truncated_cascade_passes_the_previous_sampler_stopped_at_s():
    recipe, plugins = tiny(
        "stages.sr16.augmentation={name: gaussian, args: {mode: truncated, max_level: 0.3, level: 0.2}}"
    )
    stages = [build_stage(plugins, recipe, s, num_classes=10) for s in recipe.stages]
    models = random_models(stages)
    labels = torch.tensor([1, 4, 7])
    images, _ = sample_cascade(stages, models, labels, seed=3, batch_size=2, device="cpu", progress=False)
    stopped = sample_stage(stages[0], models["base8"], labels, seed=3, image_ids=[0, 1, 2], low_res=None,
                           device="cpu", stop_at=0.2, progress=False)
    assert torch.allclose(images["base8"], stopped, atol=1e-5)  # z_s of the base, same seeds (batches of 2 vs 3)
    full = sample_stage(stages[0], models["base8"], labels, seed=3, image_ids=[0, 1, 2], low_res=None,
                        device="cpu", progress=False)
    assert not torch.allclose(stopped, full)
    z, cond = stages[1].augmentation.sample(stopped, generators=[torch.Generator() for _ in range(3)])
    assert torch.equal(z, stopped) and torch.all(cond == 200.0)  # passed on, level conditioned
    upsampled = sample_stage(stages[1], models["sr16"], labels, seed=3, image_ids=[0, 1, 2], low_res=stopped,
                             device="cpu", progress=False)
    assert torch.allclose(images["sr16"], upsampled, atol=1e-5)  # the SR stage got the base's z_s


def test_ground_truth_input_of_a_truncated_stage_is_taken_to_z_s():
    """A real low-res image z_0 given to a truncated stage becomes z_s ~ q(z_s | z_0) of the
    previous stage's process, at the level its sampler stops at; a non-truncated stage re-noises
    it itself, and the previous stage's output (z_s already) is passed on as it is."""
    recipe, plugins = tiny(
        "stages.sr16.augmentation={name: gaussian, args: {mode: truncated, max_level: 0.3, level: 0.2}}"
    )
    st = build_stage(plugins, recipe, recipe.stage("sr16"), num_classes=10)
    z0 = torch.linspace(-1, 1, 2000 * 3 * 8 * 8).view(2000, 3, 8, 8)

    def generators():
        return [torch.Generator().manual_seed(i) for i in range(2000)]

    z_s, cond = st.condition(z0, generators(), ground_truth=True)
    abar = st.cond_process.abar[st.cond_process.level_index(0.2)].item()  # step 10 of the base's 50
    eps = (z_s - abar**0.5 * z0) / (1 - abar) ** 0.5
    assert eps.mean().abs() < 0.01 and eps.std().item() == pytest.approx(1.0, abs=0.01)
    expected = torch.stack([torch.randn((3, 8, 8), generator=g) for g in generators()])
    assert torch.allclose(eps, expected, atol=1e-4) and torch.all(cond == 200.0)
    passed, _ = st.condition(z0, generators())
    assert torch.equal(passed, z0)


def test_a_truncated_stage_needs_a_previous_sampler_that_can_stop_there():
    with pytest.raises(RecipeError, match=r"stages.sr16.augmentation: truncated at level 0.3, stage base8's "
                                          r"sampler 'ddpm' must stop there: cannot sample 40 steps down to "
                                          r"level 0.3 from a 50-step process; choose 1..35"):
        recipe, plugins = tiny("stages.sr16.augmentation={name: gaussian, args: {mode: truncated, level: 0.3}}",
                               "stages.base8.sampler.args.steps=40")
        build_stage(plugins, recipe, recipe.stage("sr16"), num_classes=10)


def test_truncation_level_must_be_a_step_of_the_previous_stage():
    with pytest.raises(RecipeError, match=r"stages.sr16.augmentation: truncated at level 0.205, .*: level 0.205 is "
                                          r"not a step of this 50-step process"):
        recipe, plugins = tiny("stages.sr16.augmentation={name: gaussian, args: {mode: truncated, level: 0.205}}")
        build_stage(plugins, recipe, recipe.stage("sr16"), num_classes=10)


def test_a_list_of_augmentations_is_a_composition():
    recipe, plugins = tiny(
        "stages.sr16.augmentation=[{name: blur, args: {condition: true}}, {name: gaussian, args: {level: 0.1}}]"
    )
    st = build_stage(plugins, recipe, recipe.stage("sr16"), num_classes=10)
    assert isinstance(st.augmentation, Composition) and st.augmentation.cond_dim == 2
    assert st.backbone.aug_dim == 2
    with pytest.raises(RecipeError, match=r"stages.sr16.augmentation\[1\].name"):
        tiny("stages.sr16.augmentation=[{name: blur}, {name: gausian}]")


def test_truncated_and_nontruncated_consumers_of_one_stage():
    """Two SR stages on one base: the base is sampled to z_0 for one and to z_s for the other."""
    raw = yaml.safe_load(TINY_RECIPE)
    truncated = {**raw["stages"][1], "name": "sr16t",
                 "augmentation": {"name": "gaussian", "args": {"mode": "truncated", "level": 0.2}}}
    raw["stages"].append(truncated)
    recipe, plugins = parse_recipe(raw)
    stages = [build_stage(plugins, recipe, s, num_classes=10) for s in recipe.stages]
    models = random_models(stages)
    labels = torch.tensor([2, 5])
    images, _ = sample_cascade(stages, models, labels, seed=1, batch_size=2, device="cpu", progress=False)
    common = dict(seed=1, image_ids=[0, 1], device="cpu", progress=False)
    clean = sample_stage(stages[0], models["base8"], labels, low_res=None, **common)
    stopped = sample_stage(stages[0], models["base8"], labels, low_res=None, stop_at=0.2, **common)
    assert torch.equal(images["base8"], clean)
    assert torch.equal(images["sr16"], sample_stage(stages[1], models["sr16"], labels, low_res=clean, **common))
    assert torch.equal(images["sr16t"], sample_stage(stages[2], models["sr16t"], labels, low_res=stopped, **common))
    assert not torch.allclose(
        images["sr16t"], sample_stage(stages[2], models["sr16t"], labels, low_res=clean, **common)
    )


def delivered(call) -> tuple[float, Tensor]:
    """The abar to which ``call(z_0)`` -> (z, conditioning) takes z_0, and its conditioning: run on
    z_0 = 0 and z_0 = 1 with the same noise, z(1) - z(0) = sqrt(abar)."""
    (zero, cond), (one, cond_one) = call(torch.zeros(8, 3, 8, 8)), call(torch.ones(8, 3, 8, 8))
    assert torch.equal(cond, cond_one)
    return ((one.double() - zero.double()) ** 2).mean().item(), cond


@pytest.mark.parametrize("schedule", ["{name: linear, args: {timesteps: 1000}}",
                                      "{name: linear, args: {timesteps: 4000}}",
                                      "{name: cosine, args: {timesteps: 1000}}", "{name: log-snr}"])
def test_truncated_nontruncated_and_training_deliver_one_abar_and_conditioning(schedule):
    """At level s, the previous stage's sampler stops at (truncated), a ground-truth z_0 is taken
    to (truncated, sweeps), and z_0 is noised to (non-truncated, training) one abar, with one
    conditioning value. The linear schedule's abar(s) was its betas' continuous-time limit: 6 %
    from the discrete abar of step sT - 1 at s = 0.95."""
    def gens():
        return [torch.Generator().manual_seed(i) for i in range(8)]

    def train(st):
        def call(z0):
            torch.manual_seed(0)  # the same noise for both calls
            return st.train_condition(z0)
        return call

    stages = {}
    for mode in ("nontruncated", "truncated"):
        recipe, plugins = tiny(f"stages.base8.schedule={schedule}", "stages.sr16.augmentation={name: gaussian, "
                               f"args: {{mode: {mode}, level: 0.5}}}}")
        base, stages[mode] = (build_stage(plugins, recipe, stage, num_classes=10) for stage in recipe.stages)
    for s in (0.1, 0.25, 0.5, 0.95):
        got = {}
        for mode, st in stages.items():
            st.augmentation.min_level = st.augmentation.max_level = st.augmentation.level = s
            got[mode] = delivered(lambda z0, st=st: st.condition(z0, gens(), ground_truth=True))
            got[f"{mode} training"] = delivered(train(st))
        stops = base.process.grid(base.sampler.steps, s, base.sampler.spacing).abar[-1].item()
        for mode, (abar, cond) in got.items():
            assert abar == pytest.approx(stops, rel=1e-4), (s, mode)  # float32 images; 6e-2 was the gap
            assert torch.equal(cond, got["truncated"][1]), (s, mode)
        if base.process.continuous:
            assert cond[0, 0].item() == pytest.approx(noise_level_cond(torch.tensor(stops)).item(), rel=1e-6)
        else:  # a trained step's own abar, conditioned as 1000 s
            assert stops == base.process.abar[base.process.level_index(s)].item() and cond[0, 0].item() == 1000 * s

def test_the_linear_schedules_abar_is_its_discrete_process_at_every_step():
    schedule = linear(timesteps=1000)
    steps = schedule.abar(torch.arange(1, 1001, dtype=torch.float64) / 1000)
    assert torch.allclose(steps, make_process(schedule).abar, rtol=1e-12)
    t = torch.linspace(0, 1, 5001, dtype=torch.float64)
    assert schedule.abar(t)[0].item() == 1.0 and bool((schedule.abar(t).diff() < 0).all())
