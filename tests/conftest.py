import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = """
cdmbench: 1
name: tiny
seed: 0
device: cpu
data: {name: shapes, args: {num_images: 40}}
stages:
  - name: base8
    resolution: 8
    backbone: {name: adm-unet, args: {channels: 32, channel_mult: [1, 2], num_res_blocks: 1,
                                      attention_resolutions: [4]}}
    schedule: {name: cosine, args: {timesteps: 50}}
    loss: simple
    train: {steps: 4, batch_size: 8, lr: 1.0e-3, ema: 0.9, checkpoint_every: 2, log_every: 1}
    sampler: {name: ddpm, args: {steps: 4}}
  - name: sr16
    resolution: 16
    condition_on: base8
    augmentation: {name: gaussian, args: {max_level: 0.3, level: 0.1}}
    backbone: {name: adm-unet, args: {channels: 32, channel_mult: [1, 2], num_res_blocks: 1,
                                      attention_resolutions: [8]}}
    schedule: {name: cosine, args: {timesteps: 50}}
    loss: simple
    train: {steps: 4, batch_size: 8, lr: 1.0e-3, ema: 0.9, checkpoint_every: 2, log_every: 1}
    sampler: {name: ddpm, args: {steps: 4}}
sample: {images_per_class: 1, batch_size: 16}
"""


@pytest.fixture
def tiny_recipe(tmp_path) -> Path:
    """A two-stage 8 -> 16 cascade small enough to train and sample in seconds."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    return path


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A folder on sys.path for plugin modules written by a test."""
    folder = tmp_path / "plugin_src"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    for name in [m for m in sys.modules if m.startswith("testplugin")]:
        del sys.modules[name]
