"""The maths of FID, IS and precision/recall against closed forms and independent computations."""

import numpy as np
import pytest
import scipy.linalg
import torch

from cdmbench.evaluation.metrics import (
    frechet_distance,
    inception_score,
    knn_radii,
    precision_recall,
    rank_note,
)


def random_psd(rng, d: int, rank: int) -> np.ndarray:
    a = rng.normal(size=(d, rank))
    return a @ a.T / rank


@pytest.mark.parametrize("d, rank", [(6, 20), (40, 100), (40, 25)])  # the last: S rank-deficient, as n < D
def test_frechet_distance_equals_the_sqrtm_formula_it_replaces(d, rank):
    """clean-fid's value: ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 sqrtm(S_1 S_2)), by scipy's general sqrtm."""
    rng = np.random.default_rng(d + rank)
    for _ in range(3):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = random_psd(rng, d, rank), random_psd(rng, d, rank)
        root = scipy.linalg.sqrtm(s1 @ s2).real
        expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-6)


def test_frechet_distance_of_diagonal_covariances_is_the_closed_form():
    """Diagonal S_1, S_2: Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) = sum (sqrt(a_i) - sqrt(b_i))^2."""
    a, b = np.array([1.0, 4.0, 9.0, 0.25]), np.array([4.0, 1.0, 9.0, 0.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # 5 = 1 + 0 + 4 + 0
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-12)
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(mu1, np.diag(a), mu2[:3], np.diag(b[:3]))


def test_fewer_samples_than_dimensions_get_a_note():
    assert rank_note(50000, 2048, 1281167) == {}
    assert rank_note(1000, 2048) == {"note": "n=1000 < 2048 feature dimensions: the covariance is rank-deficient; "
                                             "the Frechet distance is biased upward"}
    assert rank_note(5000, 2048, 1000)["note"].startswith("reference_n=1000 < 2048")


def test_inception_score_splits_at_the_bounds_of_the_original_code():
    """improved-gan's split i is rows [i N // s, (i + 1) N // s): 7 rows in 2 splits are 3 + 4 (numpy's
    array_split would make 4 + 3), no row dropped."""
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.5, 0.5], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4]])

    def score(part):
        marginal = part.mean(0)
        return np.exp((part * np.log(part / marginal)).sum(1).mean())

    first, second = score(p[:3]), score(p[3:])
    mean, std = inception_score(p, splits=2)
    assert mean == pytest.approx((first + second) / 2, rel=1e-12)
    assert std == pytest.approx(abs(first - second) / 2, rel=1e-12)
    assert mean != pytest.approx((score(p[:4]) + score(p[4:])) / 2, rel=1e-6)


def test_knn_radius_is_the_distance_to_the_kth_other_point():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    # squared distances to the others: 0 -> 1, 9, 49; 1 -> 1, 4, 36; 3 -> 4, 9, 16; 7 -> 16, 36, 49
    assert knn_radii(x, 1).tolist() == [1, 1, 4, 16]
    assert knn_radii(x, 2, batch=3).tolist() == [9, 4, 9, 36]
    with pytest.raises(ValueError, match="more than 4"):
        knn_radii(x, 4)


def test_identical_sets_have_precision_and_recall_one():
    x = np.random.default_rng(0).normal(size=(60, 5))
    assert precision_recall(x, x) == (1.0, 1.0)


def test_disjoint_far_apart_sets_have_precision_and_recall_zero():
    rng = np.random.default_rng(1)
    assert precision_recall(rng.normal(size=(40, 3)), rng.normal(size=(50, 3)) + 100) == (0.0, 0.0)


def test_a_subset_of_the_reference_has_precision_one_and_the_recall_of_its_balls():
    """Real 0..9 on a line, samples 0..3. k = 3: sample radii (3rd other neighbour) 0 -> 3, 1 -> 2,
    2 -> 2, 3 -> 3, so the balls cover [-3, 6]: real 0..6, a recall of 7/10. Every sample is a real
    point: precision 1."""
    real = np.arange(10.0)[:, None]
    fake = np.arange(4.0)[:, None]
    assert precision_recall(real, fake, k=3) == (1.0, pytest.approx(0.7))
    assert precision_recall(real, fake, k=1) == (1.0, pytest.approx(0.5))  # radii 1: [-1, 4] holds real 0..4


def brute_force_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """The definition in float64, all distances at once."""
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]
    cross = np.linalg.norm(fake[:, None] - real[None], axis=-1)  # (N fake, M real)
    precision = (cross <= radii(real)[None, :]).any(1).mean()
    recall = (cross.T <= radii(fake)[None, :]).any(1).mean()
    return precision, recall


def test_precision_recall_in_batches_equals_the_definition():
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(70, 4)), rng.normal(size=(90, 4)) * 1.3 + 0.4
    expected = brute_force_precision_recall(real, fake, k=3)
    assert 0.2 < expected[0] < 0.95 and 0.2 < expected[1] < 0.95  # a case where both can be wrong
    assert precision_recall(real, fake, k=3, batch=16) == pytest.approx(expected)
    assert precision_recall(real, fake, k=3) == pytest.approx(expected)
