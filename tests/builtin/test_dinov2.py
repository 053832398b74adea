"""Feature network `dinov2`: the preprocessing against hand-computed resizes, DINOv2's
positional-embedding resampling, loading random weights saved in the official layout, the
missing-file error, and FD-DINOv2 through FID's code path."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import cdmbench.builtin.dinov2 as dinov2_module
from cdmbench.builtin.dinov2 import (
    DINOV2_ENV,
    MEAN,
    STD,
    DINOv2Features,
    dinov2,
    dinov2_candidates,
    preprocess,
    resample_pos_embed,
)
from cdmbench.errors import CdmbenchError

SMALL = "vit_small_patch14_dinov2"
TINY = {"depth": 1, "embed_dim": 32, "num_heads": 2}  # a DINOv2-style ViT that runs in milliseconds


def save_official(path: Path, arch: str = SMALL, seed: int = 0, expand: bool = False, **model_args) -> dict:
    """Random weights in the layout of facebookresearch/dinov2's ``*_pretrain.pth``: timm's names
    plus ``mask_token``, positional embeddings for 518 px (37x37 + the class token). With
    ``expand``, each matrix is one random row repeated (stride 0: a small file of ViT-L's shapes)."""
    with torch.device("meta"):  # shapes only
        model = timm.create_model(arch, pretrained=False, num_classes=0, **model_args)  # img_size 518
    torch.manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        shape = value.shape[-1:] if expand and key != "pos_embed" else value.shape
        random = torch.randn(shape) * 0.2 + (1.0 if "norm" in key and key.endswith("weight") else 0.0)
        state[key] = random.expand(value.shape)
    state["mask_token"] = torch.zeros(1, model.embed_dim)
    torch.save(state, path)
    return state


def cubic(t: float, a: float) -> float:
    """Keys' cubic convolution kernel."""
    t = abs(t)
    if t <= 1:
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
    return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a if t < 2 else 0.0


def antialiased_bicubic(profile: np.ndarray, size: int) -> np.ndarray:
    """A 1-D resize as PIL's BICUBIC and torch's bicubic with antialias=True: Keys a = -0.5,
    widened by the downscale factor, weights of the taps inside the image normalised."""
    scale = len(profile) / size
    stretch = max(scale, 1.0)
    weights = np.array([[cubic((j + 0.5 - (i + 0.5) * scale) / stretch, -0.5) for j in range(len(profile))]
                        for i in range(size)])
    return weights @ profile / weights.sum(1)


@pytest.mark.parametrize("side", [448, 64])  # a downscale (the antialias widens the kernel) and an upscale
def test_preprocessing_is_the_bicubic_resize_and_imagenet_normalisation_by_hand(side):
    rng = np.random.default_rng(side)
    profiles = rng.integers(0, 256, size=(3, side))  # each channel varies along the width only
    images = torch.from_numpy(np.broadcast_to(profiles[:, None, :], (3, side, side)).astype(np.uint8))[None]
    mean, std = np.array(MEAN)[:, None], np.array(STD)[:, None]
    resized = np.stack([antialiased_bicubic(p, 224) for p in profiles])
    expected = (resized / 255 - mean) / std
    got = preprocess(images, "torch")
    assert got.shape == (1, 3, 224, 224) and got.dtype == torch.float32
    for row in (0, 111, 223):
        np.testing.assert_allclose(got[0, :, row].numpy(), expected, atol=1e-4)
    pil = preprocess(images, "pil")[0, :, 100].numpy()  # rounded to uint8 by PIL: overshoots clipped
    np.testing.assert_allclose(pil, (resized.clip(0, 255) / 255 - mean) / std, atol=1.01 / 255 / min(STD))
    with pytest.raises(ValueError, match="unknown mode 'clean'; use one of \\('torch', 'pil'\\)"):
        preprocess(images, "clean")


def test_positional_embeddings_are_resampled_as_dinov2_does_at_224_px():
    """Bicubic (Keys a = -0.75, clamped taps) at DINOv2's sampling positions, which its offset of
    0.1 shifts by up to a fifth of a cell from those of a plain resize to 16x16."""
    grid = torch.randn(37, 37, 4, dtype=torch.float64)
    pos = torch.cat([torch.full((1, 1, 4), 3.0, dtype=torch.float64), grid.reshape(1, -1, 4)], dim=1)
    got = resample_pos_embed(pos, 16)
    assert got.shape == (1, 257, 4) and torch.equal(got[:, 0], pos[:, 0])

    def taps(x: int) -> list[tuple[int, float]]:
        s = (x + 0.5) * 37 / 16.1 - 0.5
        f = math.floor(s)
        return [(min(max(f + k, 0), 36), cubic(s - f - k, -0.75)) for k in (-1, 0, 1, 2)]

    expected = torch.stack([sum(wr * wc * grid[i, j] for i, wr in taps(r) for j, wc in taps(c))
                            for r in range(16) for c in range(16)])
    torch.testing.assert_close(got[0, 1:], expected, atol=1e-5, rtol=0)
    assert torch.equal(resample_pos_embed(got, 16), got)


@pytest.fixture
def tiny(tmp_path) -> tuple[DINOv2Features, dict, Path]:
    path = tmp_path / "dinov2_tiny_pretrain.pth"
    state = save_official(path, **TINY)
    return DINOv2Features(path, "cpu", SMALL, **TINY), state, path


def test_official_weights_load_into_timm_and_give_the_normed_class_token(tiny):
    net, state, path = tiny
    assert net.name == f"dinov2-{SMALL}" and net.modes == ("torch", "pil")
    assert net.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = net.model.state_dict()
    assert set(state) - set(loaded) == {"mask_token"} and set(loaded) <= set(state)
    for key in set(loaded) - {"pos_embed"}:
        assert torch.equal(loaded[key], state[key]), key
    assert torch.equal(loaded["pos_embed"], resample_pos_embed(state["pos_embed"], 16))
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    features = net.features(images, mode="torch")
    assert features.dtype == torch.float64 and features.shape == (5, 32)
    tokens = net.model.forward_features(preprocess(images, "torch"))  # after the final norm
    torch.testing.assert_close(features, tokens[:, 0].double())
    assert not torch.allclose(features, tokens[:, 1:].mean(1).double(), atol=1e-3)  # not pooled patches
    assert torch.equal(net.features(images, mode="torch"), features)  # deterministic
    torch.testing.assert_close(net.features(images[3:], mode="torch"), features[3:], atol=1e-5, rtol=1e-5)
    assert features.std(0).min() > 0  # images differ in their features
    pil = net.features(images, mode="pil")
    assert pil.shape == (5, 32) and not torch.equal(pil, features)
    timm_file = path.with_suffix(".safetensors")  # timm's own files: its names, the 518 px grid
    save_file({k: v.contiguous() for k, v in state.items() if k != "mask_token"}, timm_file)
    torch.testing.assert_close(DINOv2Features(timm_file, "cpu", SMALL, **TINY).features(images, mode="torch"), features)


def test_dinov2_has_no_class_probabilities_and_says_what_to_use(tiny):
    with pytest.raises(CdmbenchError, match="no class probabilities: IS needs a classifier; use features: "
                                            "inception-2015-12-05"):
        tiny[0].probabilities(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_a_missing_or_wrong_file_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv(DINOV2_ENV, raising=False)
    with pytest.raises(CdmbenchError) as error:
        dinov2(cache_dir=tmp_path, device="cpu")
    message = str(error.value)
    for needed in ("dinov2_vitl14_pretrain.pth", str(tmp_path / "dinov2_vitl14_pretrain.pth"),
                   "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
                   f"{DINOV2_ENV}=", "{path: ...}", "downloads nothing"):
        assert needed in message
    monkeypatch.setenv(DINOV2_ENV, "~/elsewhere/weights.pth")
    assert dinov2_candidates(None, tmp_path) == [Path.home() / "elsewhere" / "weights.pth",
                                                 tmp_path / "dinov2_vitl14_pretrain.pth"]
    assert dinov2_candidates("given.pth", tmp_path) == [Path("given.pth")]
    wrong = tmp_path / "wrong.pth"
    torch.save({"pos_embed": torch.zeros(1, 5, 3)}, wrong)
    with pytest.raises(CdmbenchError, match="wrong.pth is not the DINOv2 checkpoint dinov2_vits14_pretrain.pth "
                                            f"of {SMALL} .*download it again from https://"):
        DINOv2Features(wrong, "cpu", SMALL, **TINY)
    with pytest.raises(ValueError, match="arch='resnet50': use one of"):
        dinov2(arch="resnet50", cache_dir=tmp_path, device="cpu")


@pytest.mark.slow
def test_fd_dinov2_goes_through_fids_code_path(tiny_recipe, tmp_path, monkeypatch):
    """The `fid` metric with `features: dinov2` (a tiny network of random weights): its value is
    the Frechet distance of the network's features of the samples and of the real split, and the
    split against itself gives 0."""
    from cdmbench.builtin.metrics import fid
    from cdmbench.evaluation.samples import EvalContext
    from cdmbench.recipe.load import load_recipe
    from tests.evaluation.test_evaluation import reference_fid

    path = tmp_path / "dinov2_vitl14_pretrain.pth"
    save_official(path, **TINY)
    monkeypatch.setattr(dinov2_module, "DINOv2Features",
                        lambda file, device, arch: DINOv2Features(file, device, SMALL, **TINY))
    recipe, plugins = load_recipe(tiny_recipe)
    context = EvalContext(samples=None, labels=None, num_classes=4, resolution=16, recipe=recipe, plugins=plugins,
                          device="cpu", cache_dir=tmp_path / "cache", protocol={"n": 0}, progress=False)
    real, labels = context.real("train")
    metric = fid(features="dinov2", features_args={"path": str(path)}, reference=["train"], bootstrap=0)
    context.set_samples(real[:20].flip(-1), labels[:20], {})  # mirrored images: near the split, not in it
    metric.prepare(context)
    [row] = metric.evaluate(context)
    network = context.feature_network(metric.spec)
    direct = [network.features(x, mode="torch").numpy() for x in (real[:20].flip(-1), real)]
    assert row["value"] == pytest.approx(reference_fid(*direct), rel=1e-6) and row["value"] > 0
    assert row["protocol"]["features_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert row["protocol"]["mode"] == "torch" and row["protocol"]["reference_n"] == len(real)
    context.set_samples(real, labels, {})
    assert abs(metric.evaluate(context)[0]["value"]) < 1e-6


@pytest.mark.slow
def test_vit_large_loads_the_official_layout_and_gives_1024_features(tmp_path):
    path = tmp_path / "dinov2_vitl14_pretrain.pth"
    state = save_official(path, "vit_large_patch14_dinov2", expand=True)
    assert state["pos_embed"].shape == (1, 1370, 1024) and path.stat().st_size < 50e6
    net = dinov2(path=str(path), cache_dir=tmp_path, device="cpu")
    assert net.name == "dinov2" and net.model.pos_embed.shape == (1, 257, 1024)
    features = net.features(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), mode="torch")
    assert features.shape == (2, 1024) and features.dtype == torch.float64 and bool(torch.isfinite(features).all())
