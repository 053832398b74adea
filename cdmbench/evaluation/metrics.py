"""The math of the sample-quality metrics: Frechet distance, Inception Score, precision and recall.

FID (Heusel et al. 2017) is the Frechet distance between Gaussians fitted to two feature sets,
||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)), the trace of the root taken as
Tr((S_2^(1/2) S_1 S_2^(1/2))^(1/2)) from symmetric eigendecompositions; its standard error is
estimated by bootstrap over the samples. The Inception Score (Salimans et al. 2016) is
exp(E_x KL(p(y | x) || p(y))), averaged over splits. Improved precision and recall (Kynkaanniemi
et al. 2019) are the fractions of samples inside the real images' k-NN balls and of real images
inside the samples', as ADM's evaluator computes them.
"""

from __future__ import annotations

import numpy as np
import torch
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


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """S^(1/2) of a symmetric positive semi-definite matrix (negative rounding noise clipped)."""
    eigenvalues, vectors = np.linalg.eigh(sigma)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ vectors.T


def _frechet(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, root2: np.ndarray) -> float:
    """The Frechet distance given ``root2`` = S_2^(1/2): Tr((S_1 S_2)^(1/2)) is
    Tr((S_2^(1/2) S_1 S_2^(1/2))^(1/2)) (similar matrices: the same eigenvalues), whose argument is
    symmetric PSD, so one ``eigvalsh`` gives it, with no general ``sqrtm`` and no complex parts."""
    middle = root2 @ sigma1 @ root2
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) of two (mean, covariance) pairs."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (*mu1.shape, *mu1.shape):
        raise ValueError(f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    return _frechet(mu1, sigma1, mu2, sigma2, _sqrt_psd(sigma2))


def rank_note(n: int, dims: int, reference_n: int | None = None) -> dict[str, str]:
    """{"note": ...} when the samples (or the reference) are fewer than the feature dimensions:
    their covariance is rank-deficient and the Frechet distance biased upward; else {}."""
    short = [f"{who}={count}" for who, count in (("n", n), ("reference_n", reference_n))
             if count is not None and count < dims]
    if not short:
        return {}
    return {"note": f"{' and '.join(short)} < {dims} feature dimensions: the covariance is rank-deficient; "
                    "the Frechet distance is biased upward"}


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
            values[i, j] = _frechet(mu1, sigma1, mu2, sigma2, root2)
    return values.std(axis=0, ddof=1).tolist()


def inception_score(probabilities: Tensor | np.ndarray, *, splits: int = 10) -> tuple[float, float]:
    """Mean and standard deviation over ``splits`` splits of exp(E KL(p(y|x) || p(y))): split i
    is rows [i N // splits, (i + 1) N // splits), the bounds of the original code (Salimans et
    al.'s improved-gan, kept by StyleGAN2-ADA and torch-fidelity)."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or len(p) < splits:
        raise ValueError(f"need (N >= splits={splits}, K) probabilities, got shape {p.shape}")
    scores = []
    for i in range(splits):
        part = p[i * len(p) // splits:(i + 1) * len(p) // splits]
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(np.clip(part, 1e-12, None)) - np.log(np.clip(marginal, 1e-12, None)))).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """||a_i - b_j||^2 of (n, D) and (m, D) rows: |a|^2 - 2 a.b + |b|^2, clipped at 0 (ADM's form)."""
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]).clamp_min_(0)


def knn_radii(features: Tensor, k: int, *, batch: int = 4096) -> Tensor:
    """Squared distance of each row to its k-th nearest other row (itself, at 0, not counted),
    ``batch`` rows at a time: memory batch x N."""
    if len(features) <= k:
        raise ValueError(f"k={k} nearest neighbours need more than {k} feature vectors, got {len(features)}")
    return torch.cat([torch.topk(_squared_distances(features[i:i + batch], features), k + 1, dim=1,
                                 largest=False).values[:, k] for i in range(0, len(features), batch)])


def inside(query: Tensor, support: Tensor, radii: Tensor, *, batch: int = 4096) -> Tensor:
    """Whether each query row lies in some ball (support_j, radii_j) (squared distance <= radius)."""
    return torch.cat([(_squared_distances(query[i:i + batch], support) <= radii[None, :]).any(1)
                      for i in range(0, len(query), batch)])


def precision_recall(real: Tensor | np.ndarray, fake: Tensor | np.ndarray, *, k: int = 3,
                     device: torch.device | str = "cpu", batch: int = 4096) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of (N, D) ``fake`` features against
    (M, D) ``real`` ones, as ADM's evaluator computes them: each set's manifold is the union of
    balls around its points of radius the distance to the k-th nearest neighbour; precision is
    the fraction of fake points inside the real manifold, recall of real points inside the fake
    one. float32 on ``device``, ``batch`` rows of distances at a time (10k x 50k fits)."""
    real, fake = (torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device) for x in (real, fake))
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need (M, D) real and (N, D) fake features, got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}")
    precision = inside(fake, real, knn_radii(real, k, batch=batch), batch=batch)
    recall = inside(real, fake, knn_radii(fake, k, batch=batch), batch=batch)
    return precision.double().mean().item(), recall.double().mean().item()
