"""Feature networks `inception-2015-12-05` (the TorchScript Inception-v3 of clean-fid and
StyleGAN2-ADA, from a local file; with ``spatial()``, the spatial features of sFID) and
`classifier` (a small classifier cdmbench trains on the dataset's training split and caches, for
data where Inception is meaningless or unavailable)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from cdmbench import hookimpl
from cdmbench.errors import CdmbenchError
from cdmbench.training.checkpoint import sha256_file

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 + INCEPTION_FILE)
INCEPTION_ENV = "CDMBENCH_INCEPTION"
INCEPTION_DIMS = 2048
SPATIAL_LAYER, SPATIAL_CHANNELS = "mixed_6", 7  # sFID: mixed_6/conv[..., :7], 7 x 17 x 17 = 2023
SPATIAL_DIMS = SPATIAL_CHANNELS * 17 * 17
SPATIAL_FEATURES = "mixed_6/conv of inception-2015-12-05.pt (TorchScript), first 7 channels: 7x17x17 = 2023"


def legacy_resize(x: Tensor) -> Tensor:
    """What the TorchScript network does to float (B, 3, H, W) images in [0, 255] before its
    layers: TensorFlow's legacy bilinear resize to 299 x 299 (align_corners=False, edges clamped) and
    (x - 128) / 128. Scriptable, so test stand-ins call the same code."""
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
    grid = torch.nn.functional.affine_grid(theta.to(x.dtype).unsqueeze(0).repeat(b, 1, 1), [b, c, 299, 299],
                                           align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x - 128) / 128


def inception_candidates(path: str | None, cache_dir: Path) -> list[Path]:
    """Where the weights are looked for: the recipe's path, $CDMBENCH_INCEPTION, clean-fid's
    download location (/tmp), and cdmbench's cache."""
    if path:
        return [Path(path).expanduser()]
    env = os.environ.get(INCEPTION_ENV)
    return ([Path(env).expanduser()] if env else []) + [Path("/tmp") / INCEPTION_FILE,
                                                        cache_dir / INCEPTION_FILE]


class InceptionFeatures:
    """Pool features (2048) and class probabilities (1008, output bias dropped as in the
    original IS) of the TorchScript Inception-v3. Modes: ``legacy_tensorflow`` (the network
    resizes to 299 inside, like TensorFlow: the one comparable with published numbers) and
    ``clean`` (clean-fid's anti-aliased PIL bicubic resize outside the network)."""

    name = "inception-2015-12-05"
    modes = ("legacy_tensorflow", "clean")

    def __init__(self, path: Path, device: torch.device | str):
        self.path, self.device, self._spatial = path, device, None
        self.sha256 = sha256_file(path)
        try:
            self.model = torch.jit.load(str(path), map_location=device).eval()
            features = self.model(torch.zeros(1, 3, 64, 64, device=device), return_features=True)
        except Exception as exc:
            raise CdmbenchError(f"{path} is not the TorchScript Inception network ({exc}); download "
                                f"it again from {INCEPTION_URL}") from None
        if tuple(features.shape) != (1, INCEPTION_DIMS):
            raise CdmbenchError(f"{path} returns features of shape {tuple(features.shape)}, not "
                                f"(1, {INCEPTION_DIMS}); it is not {INCEPTION_FILE}")

    def _layer_input(self, images: Tensor, mode: str) -> Tensor:
        """The input of the network's ``layers``: 299 x 299, in [-1, 1], resized as ``mode`` says."""
        if mode == "legacy_tensorflow":
            return legacy_resize(images.to(self.device).float())
        if mode == "clean":
            from cleanfid.resize import build_resizer

            resize = build_resizer("clean")
            with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:  # PIL resizes without the GIL
                resized = np.stack(list(pool.map(resize, images.permute(0, 2, 3, 1).cpu().numpy())))
            return (torch.from_numpy(resized).permute(0, 3, 1, 2).to(self.device) - 128) / 128
        raise ValueError(f"inception-2015-12-05: unknown mode {mode!r}; use one of {self.modes}")

    @torch.no_grad()
    def features(self, images: Tensor, *, mode: str) -> Tensor:
        if mode == "legacy_tensorflow":  # the network resizes inside
            return self.model(images.to(self.device).float(), return_features=True).double().cpu()
        x = self._layer_input(images, mode)
        return self.model.layers(x).reshape(len(x), -1).double().cpu()

    def _run_layers(self, x: Tensor, *, stop_at_spatial: bool) -> tuple[Tensor | None, Tensor]:
        """The children of ``layers`` one by one: (mixed_6/conv's output, the last output)."""
        tap = None
        for name, layer in self.model.layers.named_children():
            if name == SPATIAL_LAYER:
                tap = layer.conv(x)
                if stop_at_spatial:
                    return tap, tap
            x = layer(x)
        return tap, x

    def spatial(self) -> SpatialInception:
        """sFID's feature network over this one's weights. The TorchScript module runs as a whole,
        so mixed_6/conv is read by running ``layers``' children one by one; checked once against
        the network's own pool features, so a file whose layers do not chain that way fails."""
        if self._spatial is None:
            probe = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32) % 251
            with torch.no_grad():
                tap, pooled = self._run_layers(legacy_resize(probe.to(self.device)), stop_at_spatial=False)
                whole = self.model(probe.to(self.device), return_features=True)
            if tap is None or tap.ndim != 4 or tap.shape[1] < SPATIAL_CHANNELS or not torch.allclose(
                    pooled.reshape(whole.shape), whole, rtol=1e-4, atol=1e-4):
                raise CdmbenchError(f"{self.path}: its layers do not expose {SPATIAL_LAYER}/conv as in "
                                    f"{INCEPTION_FILE} (running them one by one does not give its pool "
                                    f"features), so sFID cannot be computed from it; download it again from "
                                    f"{INCEPTION_URL}")
            self._spatial = SpatialInception(self)
        return self._spatial

    @torch.no_grad()
    def probabilities(self, images: Tensor) -> Tensor:
        return self.model(images.to(self.device).float(), no_output_bias=True).double().cpu()


class SpatialInception:
    """The spatial features of sFID (ADM's evaluator; Nash et al. 2021): the first 7 channels of
    Inception's mixed_6/conv output (17 x 17), flattened to 2023 dimensions in TensorFlow's
    (H, W, C) order (that of ADM's ``mu_s``), at the same resize modes as the pool features. No
    class probabilities."""

    def __init__(self, inception: InceptionFeatures):
        self.inception, self.sha256, self.modes = inception, inception.sha256, inception.modes
        self.name = f"{inception.name}:{SPATIAL_LAYER}/conv[:{SPATIAL_CHANNELS}]"

    @torch.no_grad()
    def features(self, images: Tensor, *, mode: str) -> Tensor:
        x = self.inception._layer_input(images, mode)
        tap, _ = self.inception._run_layers(x, stop_at_spatial=True)
        # flattened (H, W, C) as ADM's evaluator flattens TensorFlow's NHWC tensor: mu_s's order
        return tap[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(x), -1).double().cpu()

    def probabilities(self, images: Tensor) -> Tensor:
        raise ValueError("spatial Inception features have no class probabilities")


def inception(*, path: str | None = None, cache_dir: Path,
              device: torch.device | str) -> InceptionFeatures:
    """Load the weights from ``path``, else $CDMBENCH_INCEPTION, /tmp or the cdmbench cache."""
    candidates = inception_candidates(path, cache_dir)
    for candidate in candidates:
        if candidate.is_file():
            return InceptionFeatures(candidate, device)
    raise CdmbenchError(
        f"the Inception weights {INCEPTION_FILE} are not on this machine (looked in: "
        f"{', '.join(map(str, candidates))}). Download {INCEPTION_URL} and put it at "
        f"{candidates[-1]}, or set {INCEPTION_ENV}=/path/to/{INCEPTION_FILE}, or give "
        "features args {path: ...}. No checksum of the file is published: cdmbench records the "
        "SHA-256 of the file it loads with every number.")


class ClassifierFeatures:
    """Pre-logit features and softmax probabilities of a classifier trained on the dataset's
    training split at the stage's resolution (cached by data, resolution and settings)."""

    modes = ("native",)

    def __init__(self, model: torch.nn.Module, sha256: str, resolution: int, device):
        self.name = "classifier"
        self.model, self.sha256, self.resolution, self.device = model, sha256, resolution, device

    def _check(self, images: Tensor) -> None:
        if images.shape[-1] != self.resolution:
            raise ValueError(f"classifier features were trained at {self.resolution}x"
                             f"{self.resolution}; got images of side {images.shape[-1]}")

    def features(self, images: Tensor, *, mode: str = "native") -> Tensor:
        from cdmbench.evaluation.classifier import extract_features

        self._check(images)
        return extract_features(self.model, images, device=self.device).double().cpu()

    def probabilities(self, images: Tensor) -> Tensor:
        from cdmbench.evaluation.classifier import predict_logits

        self._check(images)
        return predict_logits(self.model, images, device=self.device).double().softmax(-1).cpu()


def classifier(*, arch: str = "resnet10t", epochs: int = 30, seed: int = 0, num_classes: int,
               resolution: int, train_data: Callable[[], tuple[Tensor, Tensor]],
               data_key: dict[str, Any], cache_dir: Path, device: torch.device | str,
               progress: bool = True) -> ClassifierFeatures:
    """Train (once; cached under ``cache_dir/classifiers``) a timm ``arch`` classifier. 30 epochs
    of 5000 images reach ~0.99 test accuracy on shapes at 32x32; 16x16 needs ~60."""
    from cdmbench.evaluation.classifier import cached_classifier

    model, sha256 = cached_classifier(key=data_key, train_images=train_data, num_classes=num_classes,
                                      cache_dir=cache_dir, arch=arch, epochs=epochs, seed=seed,
                                      device=device, progress=progress,
                                      purpose="the feature network of FID and IS with features: classifier "
                                              "(trained on the dataset's training split)")
    return ClassifierFeatures(model, sha256, resolution, device)


@hookimpl
def cdmbench_register_features(register):
    register("inception-2015-12-05", inception,
             summary="TorchScript Inception-v3 of clean-fid / StyleGAN2-ADA, from a local file")
    register("classifier", classifier,
             summary="a timm classifier trained and cached on the dataset's training split")
