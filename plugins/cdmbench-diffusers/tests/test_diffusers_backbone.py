"""diffusers-unet2d: adm-unet's arguments on UNet2DModel, conditioning, and its refusals."""

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("cdmbench_diffusers")

from cdmbench.plugins import load_plugins  # noqa: E402
from cdmbench.registry import BuildError  # noqa: E402

PLUGINS = load_plugins()
SMALL = {"channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8],
         "num_head_channels": 32}
SR = dict(resolution=16, in_channels=3, out_channels=3, num_classes=0, low_res_channels=3, aug_dim=1)


def build(args, **host):
    return PLUGINS["backbones"].get("diffusers-unet2d").build(args, **{**SR, **host})


def test_adm_arguments_map_onto_unet2dmodel_blocks():
    model = build({**SMALL, "channel_mult": [1, 2, 2], "attention_resolutions": [8, 4]})
    config = model.unet.config
    assert config.block_out_channels == (32, 64, 64) and config.layers_per_block == 1
    assert config.down_block_types == ("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    assert config.up_block_types == ("AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")
    assert config.in_channels == 6 and config.resnet_time_scale_shift == "scale_shift"
    plain = build({**SMALL, "resblock_updown": False})
    assert plain.unet.config.down_block_types == ("DownBlock2D", "AttnDownBlock2D")
    assert plain.unet.config.downsample_type == "conv"


def test_a_first_level_wider_than_channels_runs_with_class_and_augmentation():
    """The time embedding is 4 * channels, as ADM's and as the class and augmentation embeddings."""
    model = build({**SMALL, "channel_mult": [2, 2]}, num_classes=4)
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([1.0, 500.0]), torch.tensor([0, 1]),
                torch.rand(2, 3, 8, 8), torch.tensor([[0.0], [300.0]]))
    assert out.shape == (2, 3, 16, 16) and model.unet.time_embedding.linear_2.out_features == 128


def test_same_configuration_as_adm_unet_has_a_comparable_size():
    """Same widths, depths and attention: within 10% of adm-unet's parameter count."""
    ours = PLUGINS["backbones"].get("adm-unet").build(SMALL, **SR)
    theirs = build(SMALL)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(n(theirs) / n(ours) - 1) < 0.1, (n(theirs), n(ours))


def test_augmentation_level_and_class_reach_the_output():
    model = build(SMALL, num_classes=5).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10.0, 500.0])
    low, labels = torch.rand(2, 3, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        out = model(x, t, labels, low, torch.tensor([[0.0], [0.0]]))
        assert not torch.allclose(out, model(x, t, labels, low, torch.tensor([[300.0], [300.0]])))
        assert not torch.allclose(out, model(x, t, torch.tensor([3, 4]), low, torch.tensor([[0.0], [0.0]])))


def test_a_head_count_per_level_is_refused_with_the_alternative():
    with pytest.raises(BuildError, match=r"num_heads=4 gives a different head width at each of the "
                                         r"attention widths \[32, 64\].*set num_head_channels \(e.g. 8\)"):
        build({**SMALL, "num_head_channels": -1, "num_heads": 4, "attention_resolutions": [16, 8]})


def test_gradient_checkpointing_keeps_the_gradients():
    torch.manual_seed(0)
    model = build(SMALL, num_classes=5)
    x, t, low = torch.randn(2, 3, 16, 16), torch.tensor([10.0, 500.0]), torch.rand(2, 3, 8, 8)
    args = (x, t, torch.tensor([1, 2]), low, torch.tensor([[5.0], [9.0]]))

    def grads():
        model.zero_grad()
        model(*args).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_gradient_checkpointing(True)
    assert model.unet.is_gradient_checkpointing
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, grads(), strict=True))
