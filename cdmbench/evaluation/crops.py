"""Batched image crops for CAS's classifiers, computed on the images' device.

``shift_flip``: random horizontal flips and +-PAD px shifts at the images' own resolution (the
scaled-down CAS). ``resized_crop_flip`` and ``centre_crop``: the training and test views of the
TPU ResNet-50 code Ravuri & Vinyals ran (tensorflow/tpu, models/official/resnet/
resnet_preprocessing.py): crops of 8-100 % of the area with aspect ratio 3/4-4/3, resized bicubic
(no antialiasing, as ``tf.image.resize_bicubic``) to 224 px, then flipped half the time; for
testing, the central 224/256 of the shorter side resized bicubic to 224 px (its
``_decode_and_center_crop``, not "resize to 256, crop 224", which differs in interpolation only).

Crop boxes are drawn as torchvision's ``RandomResizedCrop`` draws them (10 tries, log-uniform
aspect ratio, the whole image when no try fits), but one per image from a seeded generator on the
device, and every image is resampled in one ``grid_sample`` call: torchvision's transform draws
one box per call from the global generator. Every draw is made for a whole batch of ``of`` images
of which ``x`` is ``part``, so each process sharing a batch draws alike and applies its part's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2.functional import resized_crop

PAD = 2                  # shift_flip: reflect-pad by PAD, crop back at a random offset
SIZE = 224               # the ResNet-50 input side
CROP_PADDING = 32        # the test view keeps SIZE / (SIZE + CROP_PADDING) of the shorter side
SCALE = (0.08, 1.0)      # random-resized crops: the fraction of the image's area...
RATIO = (3 / 4, 4 / 3)   # ...and the aspect ratio (width / height)
TRIES = 10               # boxes drawn per image before falling back to the whole image


def shift_flip(x: Tensor, generator: torch.Generator, part: slice = slice(None), of: int | None = None) -> Tensor:
    """Random horizontal flip and +-PAD px translation of float images (B, C, H, W)."""
    b, c, h, w = x.shape
    flip = (torch.rand(of or b, generator=generator, device=x.device) < 0.5)[part]
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    offsets = torch.randint(0, 2 * PAD + 1, (2, of or b), generator=generator, device=x.device)[:, part]
    rows = (offsets[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    padded = F.pad(x, (PAD, PAD, PAD, PAD), mode="reflect")
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    return padded[batch, torch.arange(c, device=x.device)[None, :, None, None], rows, cols]


def crop_boxes(n: int, height: int, width: int, generator: torch.Generator, *,
               device: torch.device | str = "cpu") -> Tensor:
    """(n, 4) float boxes (top, left, height, width) in pixels of random-resized crops."""
    area = height * width * torch.empty(n, TRIES, device=device).uniform_(*SCALE, generator=generator)
    aspect = torch.empty(n, TRIES, device=device).uniform_(*map(math.log, RATIO), generator=generator).exp()
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    # no try fits: the whole image, its aspect ratio clamped to RATIO (torchvision's fallback)
    side_w = min(width, round(height * RATIO[1]))
    side_h = min(height, round(width / RATIO[0]))
    fitted = fits.any(1)
    w, h = torch.where(fitted, w, side_w), torch.where(fitted, h, side_h)
    where = torch.rand(2, n, generator=generator, device=device)
    top = torch.where(fitted, (where[0] * (height - h + 1)).floor(), (height - h) // 2)
    left = torch.where(fitted, (where[1] * (width - w + 1)).floor(), (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def resized_crop_flip(x: Tensor, generator: torch.Generator, part: slice = slice(None), of: int | None = None,
                      *, size: int = SIZE) -> Tensor:
    """Random-resized ``size`` px crops (bicubic) of float images (B, C, H, W), each flipped
    horizontally with probability 1/2: (B, C, size, size)."""
    b, _, height, width = x.shape
    top, left, h, w = crop_boxes(of or b, height, width, generator, device=x.device)[part].unbind(1)
    flip = (torch.rand(of or b, generator=generator, device=x.device) < 0.5)[part]
    centres = (torch.arange(size, device=x.device) + 0.5) / size  # output pixel centres, in crop widths
    cols = left[:, None] + centres * w[:, None]  # in pixel edges: pixel k spans [k, k + 1)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    rows = top[:, None] + centres * h[:, None]
    # grid_sample with align_corners=False places pixel edge e of a side of n pixels at 2e/n - 1
    grid = torch.stack(torch.broadcast_tensors((2 * cols / width - 1)[:, None, :],
                                               (2 * rows / height - 1)[:, :, None]), dim=-1)
    return F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)


def centre_crop(images: Tensor, size: int = SIZE) -> Tensor:
    """The test view (N, C, size, size), float: the central size / (size + CROP_PADDING) of the
    shorter side, its offset rounded up as the TPU code rounds it, resized bicubic to ``size``."""
    height, width = images.shape[-2:]
    side = int(size / (size + CROP_PADDING) * min(height, width))
    top, left = (height - side + 1) // 2, (width - side + 1) // 2
    return resized_crop(images.float(), top, left, side, side, [size, size],
                        interpolation=InterpolationMode.BICUBIC, antialias=False)
