"""Feature network `dinov2`: DINOv2 ViT-L/14 (Oquab et al. 2023) as Stein et al. 2023 (dgm-eval)
and EDM2 (calculate_metrics.py, ``DINOv2Detector``) use it for FD-DINOv2, with timm's
architecture and the official weights from a local file.

What those pipelines do, reproduced here:
- the image, uint8 (B, 3, H, W), is resized to 224x224 with bicubic filtering: EDM2's default
  ``resize_mode='torch'`` interpolates the float image with ``antialias=True`` (mode ``torch``);
  dgm-eval's ``TF.Resize((224, 224), BICUBIC)`` on a PIL image, EDM2's ``resize_mode='pil'``,
  resizes the uint8 image with PIL (mode ``pil``, slower; it rounds to uint8 and clips the
  bicubic overshoot, so the two differ slightly);
- scaled to [0, 1] and normalised with ImageNet's mean and std;
- the feature is the model's output: the class token after the final LayerNorm (1024-d);
- DINOv2's positional embeddings (37x37, for 518 px) are resampled to the 16x16 grid of 224 px
  as its ``interpolate_pos_encoding`` does at every call (bicubic, scale factor (16 + 0.1) / 37,
  no antialiasing): here once, when the weights are loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cdmbench import hookimpl
from cdmbench.errors import CdmbenchError
from cdmbench.training.checkpoint import sha256_file

# timm architecture -> the official checkpoint's folder and file stem at dl.fbaipublicfiles.com
ARCHS = {"vit_small_patch14_dinov2": "dinov2_vits14", "vit_base_patch14_dinov2": "dinov2_vitb14",
         "vit_large_patch14_dinov2": "dinov2_vitl14", "vit_giant_patch14_dinov2": "dinov2_vitg14"}
ARCH = "vit_large_patch14_dinov2"  # FD-DINOv2's network
DINOV2 = "dinov2"  # its name (in rows' protocol ``features``)
DINOV2_ENV = "CDMBENCH_DINOV2"
SIZE = 224  # dgm-eval's and EDM2's input size
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as both use
POS_OFFSET = 0.1  # DINOv2's interpolate_offset


def weights_file(arch: str) -> tuple[str, str]:
    """The official checkpoint's file name and URL for timm architecture ``arch``."""
    stem = ARCHS[arch]
    name = f"{stem}_pretrain.pth"
    return name, f"https://dl.fbaipublicfiles.com/dinov2/{stem}/{name}"


def preprocess(images: Tensor, mode: str) -> Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, 3, 224, 224), resized (``torch``: antialiased bicubic on
    the float image; ``pil``: PIL bicubic on the uint8 image) and normalised."""
    if mode == "torch":
        x = F.interpolate(images.float(), size=(SIZE, SIZE), mode="bicubic", antialias=True)
    elif mode == "pil":
        from PIL import Image

        resized = [np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.Resampling.BICUBIC))
                   for im in images.permute(0, 2, 3, 1).cpu().numpy()]
        x = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).to(images.device).float()
    else:
        raise ValueError(f"dinov2: unknown mode {mode!r}; use one of {DINOv2Features.modes}")
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x / 255 - mean) / std


def resample_pos_embed(pos_embed: Tensor, grid: int) -> Tensor:
    """(1, 1 + M*M, D) positional embeddings (class token first) -> (1, 1 + grid*grid, D), as
    DINOv2's ``interpolate_pos_encoding`` resamples them for a grid x grid input."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:].float()
    m, dim = int(round(patches.shape[1] ** 0.5)), patches.shape[-1]
    if m == grid:
        return pos_embed
    scale = (grid + POS_OFFSET) / m  # the offset shifts the sampling positions: kept for parity
    patches = F.interpolate(patches.reshape(1, m, m, dim).permute(0, 3, 1, 2), scale_factor=(scale, scale),
                            mode="bicubic", antialias=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([cls, patches], dim=1)


def _read(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch's own message advises weights_only=False: not for a file of unknown origin
        raise TypeError("not readable as a file of tensors (torch.save of a state dict)") from None
    if not isinstance(state, dict):
        raise TypeError(f"it holds a {type(state).__name__}, not a state dict")
    return state


class DINOv2Features:
    """The class token of DINOv2 after the final norm, float64 (B, D), for FD-DINOv2. Modes:
    ``torch`` (EDM2's default resize) and ``pil`` (dgm-eval's). DINOv2 has no classifier, so no
    class probabilities: IS needs Inception."""

    modes = ("torch", "pil")

    def __init__(self, path: Path, device: torch.device | str, arch: str = ARCH, **model_args):
        """``model_args``: timm keyword arguments overriding the architecture (tests shrink it)."""
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn

        self.name = DINOV2 if arch == ARCH and not model_args else f"{DINOV2}-{arch}"
        self.path, self.device = path, device
        self.sha256 = sha256_file(path)
        with torch.device("meta"):  # no initialisation: every tensor comes from the file
            model = timm.create_model(arch, pretrained=False, img_size=SIZE, num_classes=0, **model_args)
        try:
            state = {key: value.float() for key, value in _read(path).items()}
            if "pos_embed" in state:
                state["pos_embed"] = resample_pos_embed(state["pos_embed"], model.patch_embed.grid_size[0])
            # the official naming (mask_token, SwiGLU's w12/w3) to timm's
            model.load_state_dict(checkpoint_filter_fn(state, model), assign=True)
        except Exception as exc:
            file, url = weights_file(arch)
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise CdmbenchError(f"{path} is not the DINOv2 checkpoint {file} of {arch} ({reason}); "
                                f"download it again from {url}") from None
        self.model = model.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def features(self, images: Tensor, *, mode: str = "torch") -> Tensor:
        return self.model(preprocess(images.to(self.device), mode)).double().cpu()

    def probabilities(self, images: Tensor) -> Tensor:
        raise CdmbenchError(f"feature network '{self.name}' gives features only, no class probabilities: "
                            "IS needs a classifier; use features: inception-2015-12-05 (or classifier) for is")


def dinov2_candidates(path: str | None, cache_dir: Path, arch: str = ARCH) -> list[Path]:
    """Where the weights are looked for: the recipe's path, $CDMBENCH_DINOV2, cdmbench's cache."""
    if path:
        return [Path(path).expanduser()]
    env = os.environ.get(DINOV2_ENV)
    return ([Path(env).expanduser()] if env else []) + [cache_dir / weights_file(arch)[0]]


def dinov2(*, path: str | None = None, arch: str = ARCH, cache_dir: Path,
           device: torch.device | str) -> DINOv2Features:
    """Load the weights (the official ``.pth`` or timm's ``.safetensors``) from ``path``, else
    $CDMBENCH_DINOV2 or the cdmbench cache. ``arch``: a timm DINOv2 ViT; FD-DINOv2 is ViT-L/14."""
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}: use one of {sorted(ARCHS)} (FD-DINOv2 uses {ARCH})")
    candidates = dinov2_candidates(path, cache_dir, arch)
    for candidate in candidates:
        if candidate.is_file():
            return DINOv2Features(candidate, device, arch)
    file, url = weights_file(arch)
    raise CdmbenchError(
        f"the DINOv2 weights {file} are not on this machine (looked in: {', '.join(map(str, candidates))}). "
        f"Download {url} and put it at {candidates[-1]}, or set {DINOV2_ENV}=/path/to/{file}, or give "
        "features args {path: ...}; cdmbench downloads nothing. No checksum of the file is published: "
        "cdmbench records the SHA-256 of the file it loads with every number.")


@hookimpl
def cdmbench_register_features(register):
    register(DINOV2, dinov2, summary="DINOv2 ViT-L/14 (FD-DINOv2 as EDM2 / dgm-eval), from a local file")
