"""Stages built from recipes: guidance, learned variance, compatibility checks, and the
hybrid-loss / v-prediction / continuous-schedule paths end to end."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from cdmbench.cascade.stages import build_stage
from cdmbench.errors import RecipeError
from cdmbench.recipe.validate import parse_recipe
from cdmbench.training.run import run
from tests.conftest import TINY_RECIPE


def tiny(*overrides: str):
    return parse_recipe(yaml.safe_load(TINY_RECIPE), overrides=list(overrides))


def stage(name: str, *overrides: str):
    recipe, plugins = tiny(*overrides)
    return build_stage(plugins, recipe, recipe.stage(name), num_classes=10)


def test_guidance_scale_interpolates_conditional_and_unconditional():
    st = stage("base8", "stages.base8.guidance.label_dropout=0.1", "stages.base8.guidance.scale=3.0")
    assert st.null_label == 10 and st.backbone.class_embed.num_embeddings == 11
    model = st.backbone.eval()
    for p in model.parameters():  # the zero-initialised output conv would make every case equal
        torch.nn.init.normal_(p, std=0.05)
    g = torch.Generator().manual_seed(0)
    x_t, labels = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([0, 3, 5, 9])
    abar, cond = st.process.abar[[5, 10, 20, 40]], torch.tensor([5.0, 10, 20, 40]) * 1000 / 50

    def eps(w):
        return st.denoiser(model, labels, None, None, guidance_scale=w)(x_t, abar, cond).eps

    with torch.no_grad():
        conditional = model(x_t, cond, labels)
        unconditional = model(x_t, cond, torch.full_like(labels, 10))
        assert torch.allclose(eps(1.0), conditional, atol=1e-5)
        assert torch.allclose(eps(0.0), unconditional, atol=1e-5)
        assert torch.allclose(eps(3.0), unconditional + 3 * (conditional - unconditional), atol=1e-4)
        assert not torch.allclose(conditional, unconditional, atol=1e-3)
        assert torch.allclose(st.denoiser(model, labels, None, None)(x_t, abar, cond).eps, eps(3.0))


def test_hybrid_loss_gives_a_learned_variance_output():
    st = stage("base8", "stages.base8.loss=hybrid", "stages.base8.sampler.args.variance=learned")
    assert st.learned_variance and st.backbone.out[-1].out_channels == 6


@pytest.mark.parametrize("overrides, path, message", [
    (["stages.base8.loss=hybrid"], "stages.base8.sampler",
     "learns its variance .* set the sampler's variance: learned"),
    (["stages.base8.sampler.args.variance=learned"], "stages.base8.sampler",
     "needs a model that learns its variance"),
    (["stages.base8.sampler.args.steps=51"], "stages.base8.sampler",
     r"choose 1..50 \(it was trained on 50 steps\)"),
    (["stages.base8.schedule={name: log-snr}", "stages.base8.loss=hybrid",
      "stages.base8.sampler.args.variance=learned"], "stages.base8.loss", "needs a discrete schedule"),
    (["stages.base8.schedule={name: log-snr}", "stages.base8.sampler.args.steps=null"],
     "stages.base8.sampler", "continuous process needs a step count"),
    (["stages.base8.guidance.scale=2.0"], "stages.base8.guidance.scale",
     "needs an unconditional model: set guidance.label_dropout"),
    (["stages.base8.train.val_bpd_images=8"], "stages.base8.train.val_bpd_images",
     "needs the learned variance of loss: hybrid"),
    (["stages.base8.loss=eps"], "stages.base8.loss", "unknown loss 'eps'"),
])
def test_incompatible_combinations_fail_at_validation(overrides, path, message):
    with pytest.raises(RecipeError, match=message) as info:
        recipe, plugins = tiny(*overrides)
        for s in recipe.stages:
            build_stage(plugins, recipe, s, num_classes=10, device="meta")
    assert info.value.path == path


def test_hybrid_guided_and_continuous_stages_train_sample_and_report_bpd(tiny_recipe, tmp_path):
    """base8: hybrid loss, learned-variance ancestral sampling, bits/dim, label dropout with
    guidance; sr16: v-prediction on the continuous log-SNR schedule sampled by DPM-Solver++."""
    out = run(tiny_recipe, out=tmp_path / "r", progress=False, echo=lambda *_: None, overrides=[
        "stages.base8.loss=hybrid", "stages.base8.sampler={name: ddpm, args: {variance: learned, steps: 5}}",
        "stages.base8.train.val_bpd_images=6", "stages.base8.guidance={label_dropout: 0.2, scale: 2.0}",
        "stages.sr16.loss=v", "stages.sr16.schedule={name: log-snr}",
        "stages.sr16.sampler={name: dpm-solver-2m, args: {steps: 4}}"])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    bpd = [r for r in rows if r["metric"] == "val_bpd"]
    assert len(bpd) == 1 and bpd[0]["n"] == 6 and bpd[0]["unit"] == "bits/dim"
    assert 0 < bpd[0]["value"] < float("inf")  # 4 training steps: a loose bound, but a bound
    assert (out / "sr16" / "samples" / "grid.png").exists()


@pytest.mark.parametrize("train, sample, expected", [
    ("bf16", "train", "bf16"), ("fp32", "train", "fp32"), ("bf16", "fp32", "fp32"), ("fp32", "bf16", "bf16")])
def test_the_network_samples_in_the_chosen_precision(train, sample, expected):
    """sample.precision: train (each stage as it trained), fp32 or bf16 (autocast). The sampler
    gets float32 either way; bf16 changes the prediction by about its rounding."""
    st = stage("base8", f"stages.base8.train.precision={train}", f"sample.precision={sample}")
    assert st.sample_precision == expected
    model = st.backbone.eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    g = torch.Generator().manual_seed(0)
    x_t, labels = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([0, 3, 5, 9])
    abar, cond = st.process.abar[[5, 10, 20, 40]], torch.tensor([5.0, 10, 20, 40]) * 1000 / 50
    with torch.no_grad():
        eps = st.denoiser(model, labels, None, None)(x_t, abar, cond).eps
        full = st.denoiser(model, labels, None, None, precision="fp32")(x_t, abar, cond).eps
        exact = model(x_t, cond, labels)
    assert eps.dtype == torch.float32 and torch.equal(full, exact)
    error = (eps - exact).abs().max() / exact.abs().max()
    assert (0 < error < 0.05) if expected == "bf16" else error == 0


def test_an_unknown_sampling_precision_is_refused():
    with pytest.raises(RecipeError, match="expected train .* fp32 or bf16, got 'fp16'") as info:
        tiny("sample.precision=fp16")
    assert info.value.path == "sample.precision"


def test_a_guidance_interval_guides_exactly_the_levels_inside_it():
    """Outside every level the sampler visits: the conditional model's samples, bit for bit;
    around them all: full guidance's; in between, each call guided or not by its sigma."""
    from cdmbench.cascade.stages import sample_stage

    guided = ["stages.base8.guidance.label_dropout=0.1", "stages.base8.guidance.scale=3.0"]

    def samples(*overrides):
        st = stage("base8", *guided, *overrides)
        torch.manual_seed(1)
        for p in st.backbone.parameters():  # the zero-initialised output conv would make every case equal
            torch.nn.init.normal_(p, std=0.05)
        labels = torch.tensor([0, 3, 5, 9])
        with torch.no_grad():
            return st, sample_stage(st, st.backbone.eval(), labels, seed=0, image_ids=[0, 1, 2, 3], low_res=None,
                                    device="cpu", progress=False)

    st, full = samples()
    sigmas = ((1 - st.process.abar) / st.process.abar).sqrt()
    assert float(sigmas.min()) > 1e-3 and float(sigmas.max()) < 1e4
    unguided = samples("stages.base8.guidance.scale=1.0")[1]
    assert not torch.equal(full, unguided)
    assert torch.equal(samples("stages.base8.guidance.interval=[10000, 100000]")[1], unguided)
    assert torch.equal(samples("stages.base8.guidance.interval=[0.001, 10000]")[1], full)
    between = samples("stages.base8.guidance.interval=[0.5, 2.0]")[1]
    assert not torch.equal(between, full) and not torch.equal(between, unguided)

    model, labels = st.backbone, torch.tensor([0, 3, 5, 9])
    x_t = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    abar = st.process.abar[[2, 10, 25, 45]]  # sigma on both sides of (0.5, 2]
    cond = torch.tensor([2.0, 10, 25, 45]) * 1000 / 50
    inside = ((1 - abar) / abar).sqrt().gt(0.5) & ((1 - abar) / abar).sqrt().le(2.0)
    assert 0 < int(inside.sum()) < 4
    limited = stage("base8", *guided, "stages.base8.guidance.interval=[0.5, 2.0]")
    with torch.no_grad():
        got = limited.denoiser(model, labels, None, None)(x_t, abar, cond).eps
        always = st.denoiser(model, labels, None, None)(x_t, abar, cond).eps
        never = st.denoiser(model, labels, None, None, guidance_scale=1.0)(x_t, abar, cond).eps
    assert torch.allclose(got[inside], always[inside], atol=1e-6)
    assert torch.allclose(got[~inside], never[~inside], atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (["stages.base8.guidance.interval=[2.0, 0.5]"], r"must be \[low, high\] with low < high, both in \(0, 10\^6\]"),
    (["stages.base8.guidance.interval=[0, 5.0]"], r"must be \[low, high\] with low < high"),
    (["stages.base8.guidance.scale=1.0", "stages.base8.guidance.interval=[0.3, 5.0]"],
     "guidance.scale is 1 \\(no guidance\\); set a scale, or remove the interval"),
])
def test_a_bad_guidance_interval_fails_at_validation(overrides, message):
    with pytest.raises(RecipeError, match=message) as info:
        tiny("stages.base8.guidance.label_dropout=0.1", "stages.base8.guidance.scale=3.0", *overrides)
    assert info.value.path == "stages.base8.guidance.interval"
