"""`diffusers-unet2d`: diffusers' UNet2DModel as a cdmbench backbone, base or super-resolution.

The arguments are adm-unet's, so one recipe can swap the two. They map onto UNet2DModel as:
channel_mult -> block_out_channels (one block per level), num_res_blocks -> layers_per_block,
attention_resolutions -> Attn*Block2D at those feature-map sides (the middle block always has
attention), num_head_channels -> attention_head_dim, resblock_updown -> residual down/upsampling
(ResnetDownsampleBlock2D, downsample_type "resnet"), scale-shift normalisation as in ADM.
Conditioning: the low-res image is upsampled bilinearly and concatenated to x_t; the class label
and the augmentation level s (each entry embedded like a timestep) are summed into one vector
that UNet2DModel adds to its timestep embedding (``class_embed_type="identity"``), which is
4 * channels wide as ADM's, whatever channel_mult[0]. What UNet2DModel cannot express (a head
count per level) is refused with the alternative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdmbench.interfaces import Backbone

GROUPS = 32


def diffusers_unet2d(*, resolution: int, in_channels: int, out_channels: int, num_classes: int,
                     low_res_channels: int, aug_dim: int, channels: int = 64,
                     channel_mult: list[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                     attention_resolutions: list[int] = (16,), num_heads: int = 4,
                     num_head_channels: int = -1, dropout: float = 0.0,
                     resblock_updown: bool = True) -> DiffusersUNet:
    """Build the wrapped UNet2DModel; the first six arguments come from the host."""
    from diffusers import UNet2DModel

    channel_mult = tuple(channel_mult)
    sides = [resolution // 2**level for level in range(len(channel_mult))]
    _check(resolution=resolution, channels=channels, channel_mult=channel_mult, sides=sides,
           attention_resolutions=attention_resolutions, num_res_blocks=num_res_blocks)
    widths = [channels * m for m in channel_mult]
    attends = [side in attention_resolutions for side in sides]
    head_dim = _head_dim(widths, attends, num_heads, num_head_channels)
    plain = "ResnetDownsampleBlock2D" if resblock_updown else "DownBlock2D"
    unet = UNet2DModel(
        sample_size=resolution, in_channels=in_channels + low_res_channels, out_channels=out_channels,
        block_out_channels=tuple(widths), layers_per_block=num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else plain for a in attends),
        up_block_types=tuple("AttnUpBlock2D" if a else plain.replace("Down", "Up")
                             for a in reversed(attends)),
        downsample_type="resnet" if resblock_updown else "conv",
        upsample_type="resnet" if resblock_updown else "conv",
        attention_head_dim=head_dim, norm_num_groups=GROUPS, dropout=dropout,
        resnet_time_scale_shift="scale_shift", flip_sin_to_cos=True, freq_shift=0,
        time_embedding_dim=4 * channels,  # ADM's width (UNet2DModel's default: 4 block_out_channels[0])
        class_embed_type="identity" if num_classes > 0 or aug_dim > 0 else None)
    return DiffusersUNet(unet, num_classes=num_classes, low_res_channels=low_res_channels,
                         aug_dim=aug_dim, channels=channels)


def _check(*, resolution, channels, channel_mult, sides, attention_resolutions, num_res_blocks) -> None:
    if channels <= 0 or channels % GROUPS:
        raise ValueError(f"diffusers-unet2d: channels={channels}; GroupNorm({GROUPS}) needs a "
                         f"positive multiple of {GROUPS}")
    if not channel_mult or any(m < 1 for m in channel_mult):
        raise ValueError(f"diffusers-unet2d: channel_mult={list(channel_mult)}; give one positive "
                         "integer per level, e.g. [1, 2, 2, 2]")
    if num_res_blocks < 1:
        raise ValueError(f"diffusers-unet2d: num_res_blocks={num_res_blocks}; it must be at least 1")
    if resolution % 2 ** (len(channel_mult) - 1):
        raise ValueError(f"diffusers-unet2d: resolution {resolution} cannot be halved "
                         f"{len(channel_mult) - 1} times; use fewer levels in channel_mult")
    for side in attention_resolutions:
        if side not in sides:
            raise ValueError(f"diffusers-unet2d: attention_resolutions contains {side}, a "
                             f"feature-map side that never occurs; the sides are {sides}")


def _head_dim(widths: list[int], attends: list[bool], num_heads: int, num_head_channels: int) -> int:
    """UNet2DModel has one attention head width for every block (and the middle one)."""
    attn_widths = sorted({w for w, a in zip(widths, attends, strict=True) if a} | {widths[-1]})
    if num_head_channels > 0:
        for w in attn_widths:
            if w % num_head_channels:
                raise ValueError(f"diffusers-unet2d: num_head_channels={num_head_channels} does "
                                 f"not divide the attention width {w}")
        return num_head_channels
    if len({w // num_heads for w in attn_widths}) > 1 or any(w % num_heads for w in attn_widths):
        raise ValueError(
            f"diffusers-unet2d: num_heads={num_heads} gives a different head width at each of the "
            f"attention widths {attn_widths}, and UNet2DModel has one head width for all blocks; "
            f"set num_head_channels (e.g. {attn_widths[0] // num_heads}) instead")
    return attn_widths[0] // num_heads


class DiffusersUNet(Backbone):
    """cdmbench's backbone interface around a UNet2DModel (see the module docstring)."""

    def __init__(self, unet: nn.Module, *, num_classes: int, low_res_channels: int, aug_dim: int,
                 channels: int):
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        super().__init__()
        self.unet, self.num_classes = unet, num_classes
        self.low_res_channels, self.aug_dim = low_res_channels, aug_dim
        emb_dim = 4 * channels  # UNet2DModel's time_embedding_dim
        self.class_embed = nn.Embedding(num_classes, emb_dim) if num_classes > 0 else None
        if aug_dim > 0:
            self.aug_proj = Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.aug_embed = TimestepEmbedding(aug_dim * channels, emb_dim)
        else:
            self.aug_embed = None

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute UNet2DModel's blocks in backward (diffusers' own checkpointing)."""
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    def forward(self, x_t: Tensor, noise_cond: Tensor, class_labels: Tensor | None = None,
                low_res: Tensor | None = None, aug_cond: Tensor | None = None) -> Tensor:
        b = x_t.shape[0]
        cond = []
        if self.class_embed is not None:
            if class_labels is None:
                raise ValueError(f"diffusers-unet2d: this model is class-conditional "
                                 f"({self.num_classes} classes); pass class_labels")
            cond.append(self.class_embed(class_labels))
        if self.aug_embed is not None:
            if aug_cond is None or aug_cond.shape != (b, self.aug_dim):
                raise ValueError(f"diffusers-unet2d: aug_dim={self.aug_dim}; pass aug_cond of shape "
                                 f"({b}, {self.aug_dim}), got "
                                 f"{None if aug_cond is None else tuple(aug_cond.shape)}")
            s = self.aug_proj(aug_cond.flatten()).reshape(b, -1)
            cond.append(self.aug_embed(s.to(self.aug_embed.linear_1.weight.dtype)))
        h = x_t
        if self.low_res_channels > 0:
            if low_res is None:
                raise ValueError("diffusers-unet2d: this is a super-resolution model; pass low_res")
            z = F.interpolate(low_res, size=x_t.shape[-2:], mode="bilinear", align_corners=False)
            h = torch.cat([h, z.to(h.dtype)], dim=1)
        out = self.unet(h, noise_cond, class_labels=sum(cond) if cond else None).sample
        return out.to(x_t.dtype)
