"""The ADM / Improved-DDPM U-Net (Nichol & Dhariwal 2021; Dhariwal & Nichol 2021) as "adm-unet".

Conditioning (all summed into one embedding ``emb`` of width 4c, c = ``channels``):
noise level (sinusoidal -> MLP), class label (embedding table) and, for super-resolution stages,
the augmentation level of the low-res image (sinusoidal per column -> MLP). The low-res image
itself is upsampled bilinearly and concatenated to x_t (Ho et al. 2021, Cascaded Diffusion).
Residual blocks inject ``emb`` by scale-shift GroupNorm; attention uses PyTorch's SDPA.
With gradient checkpointing on, each block (a level's ResBlock with its attention and
resampling) keeps only its input in training and recomputes its activations in backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cdmbench import hookimpl
from cdmbench.interfaces import Backbone

GROUPS = 32  # GroupNorm groups, as in ADM
# Upper bounds of the size arguments, far above any published U-Net (ADM-512: c = 256, 2 blocks,
# 7 levels, x4), so that a typo fails at validation instead of building for hours
MAX_CHANNELS, MAX_RES_BLOCKS, MAX_LEVELS, MAX_MULT = 4096, 64, 12, 64


@hookimpl
def cdmbench_register_backbones(register):
    register("adm-unet", adm_unet,
             summary="ADM / Improved-DDPM U-Net: scale-shift norm, SDPA attention, class and "
                     "augmentation-level embeddings, low-res concatenation")


def adm_unet(*, resolution: int, in_channels: int, out_channels: int, num_classes: int,
             low_res_channels: int, aug_dim: int, channels: int = 64,
             channel_mult: list[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
             attention_resolutions: list[int] = (16,), num_heads: int = 4,
             num_head_channels: int = -1, dropout: float = 0.0,
             resblock_updown: bool = True) -> ADMUNet:
    """Build the U-Net; the first six arguments come from the host, the rest from the recipe.

    channel_mult: width multiplier of c per level (one level per resolution, halving each time).
    attention_resolutions: feature-map sides (e.g. 16 means 16x16) that get self-attention.
    num_head_channels: if > 0, width per head (heads = width // num_head_channels), overriding
    num_heads. resblock_updown: BigGAN-style residual up/downsampling instead of plain resampling.
    """
    return ADMUNet(resolution=resolution, in_channels=in_channels, out_channels=out_channels,
                   num_classes=num_classes, low_res_channels=low_res_channels, aug_dim=aug_dim,
                   channels=channels, channel_mult=tuple(channel_mult),
                   num_res_blocks=num_res_blocks,
                   attention_resolutions=tuple(attention_resolutions),
                   num_heads=num_heads, num_head_channels=num_head_channels, dropout=dropout,
                   resblock_updown=resblock_updown)


def _check_args(*, resolution: int, in_channels: int, out_channels: int, num_classes: int,
                low_res_channels: int, aug_dim: int, channels: int, channel_mult: tuple[int, ...],
                num_res_blocks: int, attention_resolutions: tuple[int, ...], num_heads: int,
                num_head_channels: int, dropout: float) -> None:
    """Raise a ValueError naming the bad argument and the fix."""
    for name, value, least in (("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                               ("num_classes", num_classes, 0),
                               ("low_res_channels", low_res_channels, 0), ("aug_dim", aug_dim, 0),
                               ("num_res_blocks", num_res_blocks, 1)):
        if value < least:
            raise ValueError(f"adm-unet: {name}={value}; it must be at least {least}")
    for name, value, most in (("channels", channels, MAX_CHANNELS), ("num_res_blocks", num_res_blocks, MAX_RES_BLOCKS),
                              ("len(channel_mult)", len(channel_mult), MAX_LEVELS),
                              ("max(channel_mult)", max(channel_mult, default=1), MAX_MULT)):
        if value > most:
            raise ValueError(f"adm-unet: {name}={value}; it must be at most {most}")
    if channels <= 0 or channels % GROUPS:
        raise ValueError(f"adm-unet: channels={channels}; GroupNorm({GROUPS}) needs a positive "
                         f"multiple of {GROUPS}, e.g. {max(GROUPS, channels // GROUPS * GROUPS)}")
    if not channel_mult or any(m < 1 for m in channel_mult):
        raise ValueError(f"adm-unet: channel_mult={list(channel_mult)}; give one positive "
                         "integer per level, e.g. [1, 2, 2, 2]")
    downs = len(channel_mult) - 1
    if resolution < 1 or resolution % 2 ** downs:
        raise ValueError(f"adm-unet: resolution {resolution} cannot be halved {downs} times "
                         f"(channel_mult has {len(channel_mult)} levels); use fewer levels in "
                         "channel_mult")
    sides = [resolution // 2 ** level for level in range(len(channel_mult))]
    for side in attention_resolutions:
        if side not in sides:
            raise ValueError(f"adm-unet: attention_resolutions contains {side}, a feature-map "
                             f"side that never occurs; with resolution {resolution} and "
                             f"channel_mult {list(channel_mult)} the sides are {sides}")
    if num_head_channels <= 0 and num_heads < 1:
        raise ValueError(f"adm-unet: num_heads={num_heads}; it must be at least 1 (or set "
                         "num_head_channels > 0)")
    # Attention runs at the listed levels and always in the middle block (the deepest level).
    attn_widths = {channels * m for m, side in zip(channel_mult, sides, strict=True)
                   if side in attention_resolutions} | {channels * channel_mult[-1]}
    for width in sorted(attn_widths):
        if num_head_channels > 0 and width % num_head_channels:
            raise ValueError(f"adm-unet: num_head_channels={num_head_channels} does not divide "
                             f"the attention width {width}; pick a divisor of {width}")
        if num_head_channels <= 0 and width % num_heads:
            raise ValueError(f"adm-unet: num_heads={num_heads} does not divide the attention "
                             f"width {width}; pick a divisor of {width} or set num_head_channels")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"adm-unet: dropout={dropout}; it must be in [0, 1)")


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(B,) -> (B, dim) float32 [cos(t w_i), sin(t w_i)], w_i = max_period^(-i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def mlp(in_dim: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> [resample] -> conv, then scale-shift norm by emb -> SiLU -> dropout ->
    zero conv, plus the (resampled, 1x1-projected if widths differ) input."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float,
                 resample: str | None = None):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(GROUPS, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)
        self.resample = resample  # None, "up" (nearest x2) or "down" (2x2 average pool)

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(self._resample(F.silu(self.norm1(x))))
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(self._resample(x)) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions: GroupNorm -> qkv -> SDPA -> zero proj."""

    def __init__(self, ch: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(GROUPS, ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = zero_init(nn.Linear(ch, ch))

    def forward(self, x: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        # (B, C, H, W) -> (B, L, C); free for channels_last inputs.
        h = self.norm(x).permute(0, 2, 3, 1).reshape(b, hgt * wid, c)
        qkv = self.qkv(h).view(b, hgt * wid, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, L, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, C/heads)
        h = self.proj(h.transpose(1, 2).reshape(b, hgt * wid, c))
        return x + h.view(b, hgt, wid, c).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.ModuleList):
    """A sequence of ResBlock / Attention / resampling layers; only ResBlocks take emb."""

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h


class ADMUNet(Backbone):
    """eps (and v, when out_channels = 2 * in_channels) = U-Net(x_t, t, y, z, s).

    Encoder: input conv, then per level ``num_res_blocks`` ResBlocks (+ attention), each output
    kept as a skip, and a downsampling step between levels. Middle: ResBlock, attention,
    ResBlock. Decoder: per level ``num_res_blocks + 1`` ResBlocks, each consuming one skip by
    concatenation (+ attention), and an upsampling step between levels. Output: GroupNorm ->
    SiLU -> zero-initialised conv.
    """

    def __init__(self, *, resolution: int, in_channels: int, out_channels: int, num_classes: int,
                 low_res_channels: int, aug_dim: int, channels: int, channel_mult: tuple[int, ...],
                 num_res_blocks: int, attention_resolutions: tuple[int, ...], num_heads: int,
                 num_head_channels: int, dropout: float, resblock_updown: bool):
        super().__init__()
        _check_args(resolution=resolution, in_channels=in_channels, out_channels=out_channels,
                    num_classes=num_classes, low_res_channels=low_res_channels, aug_dim=aug_dim,
                    channels=channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
                    attention_resolutions=attention_resolutions, num_heads=num_heads,
                    num_head_channels=num_head_channels, dropout=dropout)
        self.resolution = resolution
        self.channels = channels
        self.num_classes = num_classes
        self.low_res_channels = low_res_channels
        self.aug_dim = aug_dim
        emb_dim = 4 * channels

        self.noise_embed = mlp(channels, emb_dim)
        self.class_embed = nn.Embedding(num_classes, emb_dim) if num_classes > 0 else None
        self.aug_embed = mlp(aug_dim * channels, emb_dim) if aug_dim > 0 else None

        def res(cin: int, cout: int, resample: str | None = None) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout, resample)

        def attn(ch: int) -> Attention:
            return Attention(ch, ch // num_head_channels if num_head_channels > 0 else num_heads)

        def down(ch: int) -> nn.Module:
            return res(ch, ch, "down") if resblock_updown else Downsample(ch)

        def up(ch: int) -> nn.Module:
            return res(ch, ch, "up") if resblock_updown else Upsample(ch)

        ch = channels * channel_mult[0]
        self.input_conv = nn.Conv2d(in_channels + low_res_channels, ch, 3, padding=1)
        skips = [ch]  # widths of the stored encoder activations
        side = resolution
        self.encoder = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                block = Level([res(ch, channels * mult)])
                ch = channels * mult
                if side in attention_resolutions:
                    block.append(attn(ch))
                self.encoder.append(block)
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.encoder.append(Level([down(ch)]))
                skips.append(ch)
                side //= 2

        self.middle = Level([res(ch, ch), attn(ch), res(ch, ch)])

        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                block = Level([res(ch + skips.pop(), channels * mult)])
                ch = channels * mult
                if side in attention_resolutions:
                    block.append(attn(ch))
                if level > 0 and i == num_res_blocks:
                    block.append(up(ch))
                    side *= 2
                self.decoder.append(block)

        self.out = nn.Sequential(nn.GroupNorm(GROUPS, ch), nn.SiLU(),
                                 zero_init(nn.Conv2d(ch, out_channels, 3, padding=1)))
        self.gradient_checkpointing = False

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute every block's activations in backward (training mode only): less memory,
        about one more forward pass of compute, the same gradients."""
        self.gradient_checkpointing = enabled

    def _block(self, block: Level, h: Tensor, emb: Tensor) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)

    def forward(self, x_t: Tensor, noise_cond: Tensor, class_labels: Tensor | None = None,
                low_res: Tensor | None = None, aug_cond: Tensor | None = None) -> Tensor:
        dtype = self.input_conv.weight.dtype
        emb = self.noise_embed(sinusoidal_embedding(noise_cond, self.channels).to(dtype))
        if self.class_embed is not None:
            if class_labels is None:
                raise ValueError(f"adm-unet: this model is class-conditional ({self.num_classes} "
                                 "classes); pass class_labels, a (B,) long tensor")
            emb = emb + self.class_embed(class_labels)
        if self.aug_embed is not None:
            if aug_cond is None or aug_cond.shape != (x_t.shape[0], self.aug_dim):
                got = None if aug_cond is None else tuple(aug_cond.shape)
                raise ValueError(f"adm-unet: aug_dim={self.aug_dim}; pass aug_cond of shape "
                                 f"(B, {self.aug_dim}) = ({x_t.shape[0]}, {self.aug_dim}), "
                                 f"got {got}")
            s = sinusoidal_embedding(aug_cond.flatten(), self.channels)
            emb = emb + self.aug_embed(s.reshape(x_t.shape[0], -1).to(dtype))
        elif aug_cond is not None and aug_cond.numel() > 0:
            raise ValueError("adm-unet: got aug_cond but the model was built with aug_dim=0")

        h = x_t
        if self.low_res_channels > 0:
            if low_res is None:
                raise ValueError(f"adm-unet: this is a super-resolution model; pass low_res, a "
                                 f"(B, {self.low_res_channels}, h, w) low-resolution image")
            z = F.interpolate(low_res, size=x_t.shape[-2:], mode="bilinear", align_corners=False,
                              antialias=False)
            h = torch.cat([h, z.to(h.dtype)], dim=1)
        elif low_res is not None:
            raise ValueError("adm-unet: got low_res but the model was built with "
                             "low_res_channels=0 (a base stage)")

        h = self.input_conv(h.to(dtype))
        skips = [h]
        for block in self.encoder:
            h = self._block(block, h, emb)
            skips.append(h)
        h = self._block(self.middle, h, emb)
        for block in self.decoder:
            h = self._block(block, torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h).to(x_t.dtype)
