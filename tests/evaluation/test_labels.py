"""Evaluation samples' classes (``evaluate.labels``): random labels are per-image seeded and
multinomial, balanced ones are i mod K."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from cdmbench.errors import CdmbenchError, RecipeError
from cdmbench.evaluation.samples import read_samples, sample_labels, write_shards
from cdmbench.recipe.load import load_recipe

N, K = 1000, 10


def labels(lo: int, hi: int, *, mode: str = "random", seed: int = 0, classes: int = K) -> torch.Tensor:
    return sample_labels(lo, hi, num_classes=classes, seed=seed, mode=mode)


@pytest.mark.parametrize("batch_size", [1, 7, 100])
def test_random_labels_do_not_depend_on_the_batch_size(batch_size):
    whole = labels(0, N)
    batched = torch.cat([labels(lo, min(lo + batch_size, N)) for lo in range(0, N, batch_size)])
    assert torch.equal(batched, whole) and whole.dtype == torch.int64
    assert torch.equal(labels(0, 2 * N)[:N], whole)  # nor on N: a larger N adds rows
    assert torch.equal(labels(5, 6), whole[5:6]) and len(labels(9, 9)) == 0


@pytest.mark.parametrize("world_size", [1, 3])
def test_random_labels_of_shards_written_by_several_processes_are_those_of_one(tmp_path, world_size):
    """Every rank writes its shards (r, r + W, ...) with the labels it computes itself."""
    def make(k, lo, hi):
        return torch.zeros((hi - lo, 3, 2, 2), dtype=torch.uint8)

    for rank in range(world_size):
        write_shards(tmp_path, labels=labels(0, N), shard_size=64, make=make, rank=rank, world_size=world_size,
                     progress=False)
    _, read = read_samples(tmp_path, N)
    assert len(list(tmp_path.glob("shard-*.npz"))) == 16 and torch.equal(read, labels(0, N))


@pytest.mark.parametrize("classes", [10, 1000])
def test_random_labels_are_uniform_and_independent_not_balanced(classes):
    n = 100_000
    drawn = labels(0, n, seed=3, classes=classes)
    counts = torch.bincount(drawn, minlength=classes)
    assert len(counts) == classes and counts.sum() == n
    assert chisquare(counts.numpy()).pvalue > 1e-3  # against uniform: multinomial counts pass
    assert counts.max() - counts.min() > 10  # not exactly balanced: n / K each would be
    # consecutive images' classes are independent: pairs (label i, label i+1) uniform over K^2 cells
    if classes == 10:
        pairs = torch.bincount(drawn[:-1] * classes + drawn[1:], minlength=classes**2)
        assert chisquare(pairs.numpy()).pvalue > 1e-3


def test_random_labels_depend_on_the_sample_seed():
    assert not torch.equal(labels(0, N, seed=0), labels(0, N, seed=1))
    assert torch.equal(labels(0, N, seed=2**63 - 1), labels(0, N, seed=2**63 - 1))  # the largest seed


def test_balanced_labels_are_i_mod_k():
    assert torch.equal(labels(0, N, mode="balanced"), torch.arange(N) % K)
    assert torch.equal(labels(13, 40, mode="balanced", seed=5), torch.arange(13, 40) % K)


def test_an_unknown_mode_is_refused():
    with pytest.raises(CdmbenchError, match="evaluate.labels: expected random or balanced, got 'uniform'"):
        labels(0, 3, mode="uniform")


def test_the_recipe_key_defaults_to_random_and_refuses_other_values(tiny_recipe):
    recipe, _ = load_recipe(tiny_recipe)
    assert recipe.evaluate.labels == "random"
    assert load_recipe(tiny_recipe, overrides=["evaluate.labels=balanced"])[0].evaluate.labels == "balanced"
    with pytest.raises(RecipeError, match=r"evaluate.labels.*expected random .* or balanced .*got 'uniform'"):
        load_recipe(tiny_recipe, overrides=["evaluate.labels=uniform"])
