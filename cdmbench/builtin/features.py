"""Feature networks `inception-2015-12-05` (the TorchScript Inception-v3 of clean-fid and
StyleGAN2-ADA, from a local file) and `classifier` (a small classifier cdmbench trains on the
dataset's training split and caches, for data where Inception is meaningless or unavailable)."""

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
        self.path, self.device = path, device
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

    @torch.no_grad()
    def features(self, images: Tensor, *, mode: str) -> Tensor:
        x = images.to(self.device).float()
        if mode == "legacy_tensorflow":
            return self.model(x, return_features=True).double().cpu()
        if mode == "clean":
            from cleanfid.resize import build_resizer

            resize = build_resizer("clean")
            with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:  # PIL resizes without the GIL
                resized = np.stack(list(pool.map(resize, images.permute(0, 2, 3, 1).cpu().numpy())))
            x = torch.from_numpy(resized).permute(0, 3, 1, 2).to(self.device)
            return self.model.layers((x - 128) / 128).reshape(len(x), -1).double().cpu()
        raise ValueError(f"inception-2015-12-05: unknown mode {mode!r}; use one of {self.modes}")

    @torch.no_grad()
    def probabilities(self, images: Tensor) -> Tensor:
        return self.model(images.to(self.device).float(), no_output_bias=True).double().cpu()


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
