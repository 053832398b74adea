"""train.flip: random horizontal flips of the training batch, or none (CDM flips only some stages)."""

import pytest
import torch
import yaml

from cdmbench.cascade.stages import build_stage
from cdmbench.data.images import ImageSet
from cdmbench.recipe.validate import parse_recipe
from cdmbench.training.trainer import make_batch
from tests.conftest import TINY_RECIPE

N = 400


def _batch(flip: bool):
    """A batch of N copies of one left-bright, right-dark image (at 16 px and its 8 px low-res) for
    the SR stage of the tiny recipe, with train.flip set; the global seed fixed."""
    override = f"stages.sr16.train.flip={str(flip).lower()}"
    recipe, plugins = parse_recipe(yaml.safe_load(TINY_RECIPE), overrides=[override])
    stage = build_stage(plugins, recipe, recipe.stage("sr16"), num_classes=10)
    images = {}
    for res in (8, 16):
        x = torch.zeros(1, 3, res, res, dtype=torch.uint8)
        x[..., : res // 2] = 255
        images[res] = x.expand(N, -1, -1, -1)
    torch.manual_seed(0)
    return make_batch(stage, ImageSet(images, torch.arange(N) % 10, 10, list("abcdefghij")), torch.arange(N), "cpu")


def _left_brighter(x: torch.Tensor) -> torch.Tensor:
    """Per example: is the left half brighter than the right (not flipped)?"""
    w = x.shape[-1] // 2
    return x[..., :w].mean((1, 2, 3)) > x[..., w:].mean((1, 2, 3))


def test_flip_false_never_flips():
    b = _batch(False)
    assert _left_brighter(b.x0).all()
    assert _left_brighter(b.low_res).all()  # the noise-augmented low-res input, unflipped too


def test_flip_true_flips_about_half_and_x0_with_its_low_res():
    b = _batch(True)
    kept = _left_brighter(b.x0)
    assert torch.equal(kept, _left_brighter(b.low_res))
    # Binomial(400, 1/2): sd 10, so 200 +- 50 fails with probability < 1e-6 (and the seed is fixed)
    assert 150 < int((~kept).sum()) < 250


@pytest.mark.parametrize("key", ["t", "eps", "aug_cond", "labels"])
def test_flip_false_leaves_the_other_draws_of_the_batch_unchanged(key):
    """The flip draws are made either way, so a recipe that stops flipping trains on the same noise,
    times and augmentation levels."""
    assert torch.equal(getattr(_batch(False), key), getattr(_batch(True), key))
