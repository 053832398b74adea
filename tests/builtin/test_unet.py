"""The built-in ADM U-Net ("adm-unet"): shapes, a hand-computed parameter count, errors,
conditioning paths and gradient flow. Tiny configurations on CPU."""

import pytest
import torch

from cdmbench.builtin.unet import ADMUNet, adm_unet

HOST = dict(in_channels=3, out_channels=3, num_classes=3, low_res_channels=0, aug_dim=0)


def build(**kw) -> ADMUNet:
    args = dict(HOST, resolution=8, channels=32, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(4,))
    args.update(kw)
    return adm_unet(**args)


def inputs(b=2, res=8, low=0, low_res=4, aug=0, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x_t=torch.randn(b, 3, res, res, generator=g),
        noise_cond=torch.rand(b, generator=g) * 1000,
        class_labels=torch.arange(b) % classes if classes else None,
        low_res=torch.randn(b, low, low_res, low_res, generator=g) if low else None,
        aug_cond=torch.rand(b, aug, generator=g) * 1000 if aug else None,
    )


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter so zero-initialised output layers no longer hide paths."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("kw, inp, out", [
    (dict(), dict(), 3),  # base stage
    (dict(low_res_channels=3, aug_dim=1), dict(low=3, low_res=4, aug=1), 3),  # SR from 1/2
    (dict(low_res_channels=3, aug_dim=1, resolution=16, channel_mult=(1, 1, 2)),
     dict(res=16, low=3, low_res=4, aug=1), 3),  # SR from 1/4, three levels
    (dict(num_classes=0), dict(classes=0), 3),  # unconditional
    (dict(out_channels=6), dict(), 6),  # learned variance: eps and v
    (dict(channel_mult=(1,), attention_resolutions=(8,)), dict(), 3),  # one level
    (dict(resolution=16, channel_mult=(1, 2, 2, 2), attention_resolutions=(4, 2),
          num_head_channels=32), dict(res=16), 3),  # four levels
    (dict(resblock_updown=False, dropout=0.1), dict(), 3),  # conv resampling
])
def test_forward_shapes(kw, inp, out):
    model = build(**kw)
    x = inputs(**inp)
    y = model(**x)
    assert y.shape == (x["x_t"].shape[0], out, *x["x_t"].shape[-2:])
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


def conv(k, cin, cout):
    return k * k * cin * cout + cout


def linear(cin, cout):
    return cin * cout + cout


def gn(c):
    return 2 * c


def resblock(cin, cout, emb):
    skip = conv(1, cin, cout) if cin != cout else 0
    return (gn(cin) + conv(3, cin, cout) + linear(emb, 2 * cout) + gn(cout)
            + conv(3, cout, cout) + skip)


def attention(c):
    return gn(c) + linear(c, 3 * c) + linear(c, c)


@pytest.mark.parametrize("updown", [True, False])
def test_parameter_count_by_hand(updown):
    c, E = 32, 128  # channels, embedding width 4c
    n = linear(c, E) + linear(E, E)  # noise-level MLP on the c-dim sinusoidal embedding
    n += 3 * E  # class embedding table, 3 classes
    n += linear(1 * c, E) + linear(E, E)  # augmentation-level MLP, aug_dim 1
    n += conv(3, 3 + 3, c)  # input conv on [x_t, upsampled low_res]
    # encoder; skips: 32 (input conv), 32, 32 (down), 64
    n += resblock(32, 32, E)  # level 0 (8x8)
    n += resblock(32, 32, E) if updown else conv(3, 32, 32)  # downsample 8 -> 4
    n += resblock(32, 64, E) + attention(64)  # level 1 (4x4)
    # middle
    n += resblock(64, 64, E) + attention(64) + resblock(64, 64, E)
    # decoder, level 1 (4x4): consume skips 64, 32, then upsample 4 -> 8
    n += resblock(64 + 64, 64, E) + attention(64)
    n += resblock(64 + 32, 64, E) + attention(64)
    n += resblock(64, 64, E) if updown else conv(3, 64, 64)
    # decoder, level 0 (8x8): consume skips 32, 32
    n += resblock(64 + 32, 32, E) + resblock(32 + 32, 32, E)
    n += gn(32) + conv(3, 32, 3)  # output
    model = build(low_res_channels=3, aug_dim=1, resblock_updown=updown)
    assert sum(p.numel() for p in model.parameters()) == n


def test_missing_class_labels():
    x = inputs()
    x["class_labels"] = None
    with pytest.raises(ValueError, match="class-conditional.*pass class_labels"):
        build()(**x)


def test_missing_low_res():
    with pytest.raises(ValueError, match="super-resolution model; pass low_res"):
        build(low_res_channels=3, aug_dim=1)(**inputs(aug=1))


def test_unexpected_low_res():
    with pytest.raises(ValueError, match="got low_res but .*low_res_channels=0"):
        build()(**inputs(low=3))


def test_missing_or_misshaped_aug_cond():
    model = build(low_res_channels=3, aug_dim=1)
    with pytest.raises(ValueError, match=r"aug_dim=1; pass aug_cond of shape \(B, 1\)"):
        model(**inputs(low=3))
    x = inputs(low=3, aug=1)
    x["aug_cond"] = x["aug_cond"][:, 0]
    with pytest.raises(ValueError, match="aug_cond of shape"):
        model(**x)


@pytest.mark.parametrize("kw, match", [
    (dict(attention_resolutions=(16,)), r"attention_resolutions contains 16.*sides are \[8, 4\]"),
    (dict(channels=48), r"channels=48; GroupNorm\(32\)"),
    (dict(num_heads=3), "num_heads=3 does not divide the attention width 64"),
    (dict(num_head_channels=24), "num_head_channels=24 does not divide"),
    (dict(resolution=6, channel_mult=(1, 2, 2)), "resolution 6 cannot be halved"),
    (dict(channel_mult=()), "channel_mult"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        build(**kw)


def test_aug_cond_and_class_change_output():
    torch.manual_seed(0)
    model = randomize(build(low_res_channels=3, aug_dim=1)).eval()
    x = inputs(low=3, aug=1)
    with torch.no_grad():
        y = model(**x)
        y_aug = model(**{**x, "aug_cond": x["aug_cond"] + 100.0})
        y_cls = model(**{**x, "class_labels": (x["class_labels"] + 1) % 3})
    assert not torch.allclose(y, y_aug, atol=1e-4)
    assert not torch.allclose(y, y_cls, atol=1e-4)


def test_the_low_res_image_enters_bilinearly_upsampled_beside_x_t():
    """The SR input is [x_t, bilinear(low_res)] (CDM's conditioning: upsample, concatenate)."""
    model = randomize(build(low_res_channels=3)).eval()
    x = inputs(low=3)
    seen = []
    model.input_conv.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        y = model(**x)
        y_other = model(**{**x, "low_res": -x["low_res"]})
    upsampled = torch.nn.functional.interpolate(x["low_res"], size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.equal(seen[0], torch.cat([x["x_t"], upsampled], dim=1))
    assert not torch.allclose(y, y_other, atol=1e-4)


def test_gradients_reach_every_parameter():
    model = randomize(build(low_res_channels=3, aug_dim=1))
    x = inputs(b=3, low=3, aug=1)  # labels 0, 1, 2: every class-embedding row is used
    model(**x).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_recomputes_blocks_with_the_same_gradients():
    model = randomize(build(low_res_channels=3, aug_dim=1, dropout=0.1))  # dropout: RNG replayed
    x = inputs(b=3, low=3, aug=1)
    calls = []
    # a pre-hook: the recomputation stops early, once it has what backward needs
    model.middle.register_forward_pre_hook(lambda *_: calls.append(1))

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.set_gradient_checkpointing(checkpointing)
        model.zero_grad()
        calls.clear()
        torch.manual_seed(0)
        model(**x).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads(False)
    assert len(calls) == 1
    recomputed = grads(True)
    assert len(calls) == 2  # the forward, then again in backward
    for name, g in plain.items():
        torch.testing.assert_close(recomputed[name], g, rtol=0, atol=1e-7, msg=name)
    calls.clear()
    model.eval()(**x).square().mean().backward()  # only in training mode
    assert len(calls) == 1


def test_gradient_checkpointing_is_switched_on_by_the_recipe(tiny_recipe, monkeypatch):
    from cdmbench.cascade.stages import build_stage
    from cdmbench.errors import RecipeError
    from cdmbench.recipe.load import load_recipe

    recipe, plugins = load_recipe(tiny_recipe, overrides=["stages.sr16.train.gradient_checkpointing=true"])
    built = [build_stage(plugins, recipe, s, num_classes=10, device="meta").backbone for s in recipe.stages]
    assert [b.gradient_checkpointing for b in built] == [False, True]
    monkeypatch.delattr(ADMUNet, "set_gradient_checkpointing")  # a backbone without the switch
    with pytest.raises(RecipeError, match=r"stages.sr16.train.gradient_checkpointing: backbone "
                                          r"'adm-unet' has no set_gradient_checkpointing method"):
        build_stage(plugins, recipe, recipe.stages[1], num_classes=10, device="meta")


def test_channels_last_and_bf16_autocast():
    model = randomize(build(low_res_channels=3, aug_dim=1)).eval()
    x = inputs(low=3, aug=1)
    with torch.no_grad():
        ref = model(**x)
        model_cl = model.to(memory_format=torch.channels_last)
        x_cl = {**x, "x_t": x["x_t"].contiguous(memory_format=torch.channels_last)}
        torch.testing.assert_close(model_cl(**x_cl), ref, atol=1e-4, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model_cl(**x_cl)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert (y - ref).abs().mean() < 0.1 * ref.abs().mean()


def test_registered_as_plugin():
    from cdmbench.builtin import unet

    seen = {}
    unet.cdmbench_register_backbones(lambda name, factory, summary="": seen.update({name: factory}))
    assert seen == {"adm-unet": adm_unet}
