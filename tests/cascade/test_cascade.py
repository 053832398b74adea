"""Stages built from recipes: guidance, learned variance, compatibility checks, and the
hybrid-loss / v-prediction / continuous-schedule paths end to end."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from cdmbench.cascade.stages import build_stage
from cdmbench.errors import CdmbenchError, RecipeError
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


class ClassGaussian(torch.nn.Module):
    """A backbone that is the exact eps-denoiser, pixel by pixel, of x_0 ~ N(mu_label, std^2 I) in
    the 3 colour channels: the conditional model, or with a larger std a blurred, weaker one."""

    def __init__(self, abar: torch.Tensor, std: float):
        super().__init__()
        self.abar, self.std = abar, std
        self.means = torch.tensor([[-0.5, 0.2, 0.4], [0.3, -0.6, 0.1], [0.0, 0.5, -0.3]], dtype=torch.float64)

    def forward(self, x, noise_cond, labels, low_res=None, aug_cond=None):
        from cdmbench.diffusion.mixture import GaussianMixture

        abar = self.abar[(noise_cond * len(self.abar) / 1000).round().long()]
        out = torch.empty_like(x)
        for i in range(len(x)):  # each image's pixels: points of its class's Gaussian
            gaussian = GaussianMixture(torch.ones(1, dtype=torch.float64), self.means[labels[i] % 3][None],
                                       torch.tensor([self.std], dtype=torch.float64))
            points = x[i].permute(1, 2, 0).reshape(-1, 3, 1, 1)
            eps = gaussian.denoise(points, abar[i].expand(len(points)), noise_cond[i].expand(len(points))).eps
            out[i] = eps.reshape(x.shape[2], x.shape[3], 3).permute(2, 0, 1)
        return out


def test_autoguidance_guides_with_the_weaker_network_by_the_guidance_formula():
    """Exact Gaussian denoisers: the stage's network and a blurred copy as autoguidance's guide.
    At scale 1 the prediction is the conditional network's, in one pass; at scale w it is
    weak + w (cond - weak), both conditional."""
    st = stage("base8", "stages.base8.guidance.guide_step=2", "stages.base8.guidance.scale=2.5")
    assert st.null_label is None  # no null class: the guide replaces the unconditional model
    good, weak = ClassGaussian(st.process.abar, 0.1), ClassGaussian(st.process.abar, 0.4)
    st.guide = weak
    g = torch.Generator().manual_seed(0)
    x_t, labels = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 4])
    steps = torch.tensor([3, 10, 25, 45])
    abar, cond = st.process.abar[steps], steps.float() * 1000 / 50
    calls = []
    weak.register_forward_hook(lambda *_: calls.append("weak"))
    with torch.no_grad():
        conditional, blurred = good(x_t, cond, labels), weak(x_t, cond, labels)
        assert not torch.allclose(conditional, blurred, atol=1e-2)
        calls.clear()
        assert torch.equal(st.denoiser(good, labels, None, None, guidance_scale=1.0)(x_t, abar, cond).eps,
                           conditional) and calls == []
        for w in (0.0, 2.5, 4.0):
            got = st.denoiser(good, labels, None, None, guidance_scale=w)(x_t, abar, cond).eps
            assert torch.allclose(got, blurred + w * (conditional - blurred), atol=1e-5), w
        assert torch.allclose(st.denoiser(good, labels, None, None)(x_t, abar, cond).eps,
                              blurred + 2.5 * (conditional - blurred), atol=1e-5)  # the recipe's scale
    st.guide = None
    with pytest.raises(CdmbenchError, match="autoguidance's guide network \\(base8\\) is not loaded"):
        st.denoiser(good, labels, None, None)(x_t, abar, cond)


@pytest.mark.parametrize("overrides, path, message", [
    (["stages.base8.guidance.guide_step=4", "stages.base8.guidance.scale=2"], "stages.base8.guidance.guide_step",
     r"must be an earlier step than train.steps \(4\)"),
    (["stages.base8.guidance.guide_step=2"], "stages.base8.guidance.scale", "is 1 \\(no guidance\\) but a guide"),
    (["stages.base8.guidance.guide_step=2", "stages.base8.guidance.guide_stage=sr16",
      "stages.base8.guidance.scale=2"], "stages.base8.guidance.guide_stage", "set one guide network"),
    (["stages.sr16.guidance.guide_stage=base8", "stages.sr16.guidance.scale=2"], "stages.sr16.guidance.guide_stage",
     "stage base8 has another resolution"),
    (["stages.sr16.guidance.guide_stage=sr61", "stages.sr16.guidance.scale=2"], "stages.sr16.guidance.guide_stage",
     "'sr61' is not another stage of the recipe; valid: base8"),
    (["stages.base8.guidance.guide_step=2", "stages.base8.guidance.scale=2", "stages.base8.train.eval_every=2",
      "evaluate.metrics=[fid]"], "stages.base8.train.eval_every", "cannot guide with autoguidance's guide network"),
])
def test_bad_autoguidance_settings_fail_at_validation(overrides, path, message):
    with pytest.raises(RecipeError, match=message) as info:
        tiny(*overrides)
    assert info.value.path == path


@pytest.mark.slow
def test_a_run_samples_with_autoguidance_by_a_milestone_and_says_so(tiny_recipe, tmp_path):
    """guide_step 2 (a milestone): the grids' protocol and every later evaluation name it; a step
    not kept is an error naming the kept ones."""
    guided = ["stages.base8.guidance.guide_step=2", "stages.base8.guidance.scale=2",
              "stages.base8.train.milestone_every=2"]
    out = run(tiny_recipe, out=tmp_path / "r", stage="base8", overrides=guided, progress=False, echo=lambda *_: None)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    [timed] = [r for r in rows if r["metric"] == "sample_time"]
    assert timed["protocol"]["checkpoint_steps"] == {"base8": 4}
    from cdmbench.cascade.sample import sample_run

    folder = sample_run(out, stage="base8", per_class=1, overrides=guided, progress=False, echo=lambda *_: None)
    settings = json.loads((folder / "sample.json").read_text())
    assert settings["samplers"]["base8"].endswith(", autoguidance 2 by step 2")
    assert settings["checkpoint_steps"] == {"base8": 4, "base8/guide": 2}
    with pytest.raises(CdmbenchError, match=r"guide_step=3: .* has no checkpoint of that step \(kept: 2, 4\)"):
        sample_run(out, stage="base8", per_class=1, progress=False, echo=lambda *_: None,
                   overrides=["stages.base8.guidance.guide_step=3", "stages.base8.guidance.scale=2"])
