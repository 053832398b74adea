"""The math of the sample-quality metrics: FID statistics and distance, Inception Score.

FID (Heusel et al. 2017) is the Frechet distance between Gaussians fitted to two feature sets,
||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)), computed by clean-fid; its standard error
is estimated by bootstrap over the samples. The Inception Score (Salimans et al. 2016) is
exp(E_x KL(p(y | x) || p(y))), averaged over splits.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor


def statistics(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of (N, D) features, as clean-fid computes them."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


class RunningStatistics:
    """Mean and covariance of features that arrive in batches, without keeping them: sums of x
    and x x^T in float64, shifted by the first batch's mean against cancellation. Equals
    ``statistics`` of the concatenated features (to float64 rounding)."""

    def __init__(self):
        self.n, self.shift, self.total, self.outer = 0, None, None, None

    def update(self, features: Tensor | np.ndarray) -> None:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2:
            raise ValueError(f"need (B, D) features, got shape {f.shape}")
        if self.shift is None:
            self.shift = f.mean(axis=0)
            self.total = np.zeros_like(self.shift)
            self.outer = np.zeros((len(self.shift), len(self.shift)))
        d = f - self.shift
        self.n += len(f)
        self.total += d.sum(axis=0)
        self.outer += d.T @ d

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors, got {self.n}")
        mean = self.total / self.n
        cov = (self.outer - self.n * np.outer(mean, mean)) / (self.n - 1)
        return self.shift + mean, cov


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FID between two (mean, covariance) pairs, by clean-fid."""
    from cleanfid.fid import frechet_distance as clean_fid_distance

    return float(clean_fid_distance(mu1, sigma1, mu2, sigma2))


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """S^(1/2) of a symmetric positive semi-definite matrix (negative rounding noise clipped)."""
    eigenvalues, vectors = np.linalg.eigh(sigma)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ vectors.T


def bootstrap_fid_stderr(features: Tensor | np.ndarray, references: list[tuple[np.ndarray, np.ndarray]],
                         *, resamples: int, seed: int = 0) -> list[float]:
    """The standard error of FID due to the finite set of samples, against each reference (mu,
    S): the standard deviation of FID over ``resamples`` bootstrap resamples of the (N, D)
    features (N drawn with replacement, as frequency weights; the references fixed). Each
    resample's trace term is Tr((S_2^(1/2) S_1 S_2^(1/2))^(1/2)), which equals Tr((S_1 S_2)^(1/2))
    (the same eigenvalues) at one symmetric eigendecomposition instead of a general sqrtm."""
    f = np.asarray(features, dtype=np.float64)
    if resamples < 2:
        raise ValueError(f"a standard deviation needs at least 2 resamples, got {resamples}")
    rng = np.random.default_rng(seed)
    roots = [(mu, sigma, _sqrt_psd(sigma)) for mu, sigma in references]
    values = np.empty((resamples, len(references)))
    for i in range(resamples):
        counts = rng.multinomial(len(f), np.full(len(f), 1 / len(f)))
        mu1 = counts @ f / len(f)
        sigma1 = np.cov(f, rowvar=False, fweights=counts)
        for j, (mu2, sigma2, root2) in enumerate(roots):
            cross = np.sqrt(np.clip(np.linalg.eigvalsh(root2 @ sigma1 @ root2), 0, None)).sum()
            values[i, j] = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * cross
    return values.std(axis=0, ddof=1).tolist()


def inception_score(probabilities: Tensor | np.ndarray, *, splits: int = 10) -> tuple[float, float]:
    """Mean and standard deviation over ``splits`` equal splits of exp(E KL(p(y|x) || p(y)))."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or len(p) < splits:
        raise ValueError(f"need (N >= splits={splits}, K) probabilities, got shape {p.shape}")
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(np.clip(part, 1e-12, None)) - np.log(np.clip(marginal, 1e-12, None)))).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))
