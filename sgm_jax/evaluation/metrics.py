"""Sample-quality metrics over any feature extractor (host-side numpy/scipy, float64).

- Frechet distance between Gaussians fitted to two feature sets (FID when the features are the
  FID Inception's pool3; Heusel et al., NeurIPS 2017):
  ||m1 - m2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}).
- Inception Score from class probabilities (Salimans et al., NeurIPS 2016):
  exp(E_x KL(p(y|x) || p(y))), averaged over splits.
- Kernel Inception Distance (Binkowski et al., ICLR 2018): the unbiased MMD^2 estimate with the
  kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets (`kernel_inception_distance`,
  the paper's scheme) or over TF-GAN's deterministic blocks (`kernel_inception_distance_blocks`,
  what score_sde reported and `--mode eval` reports).
- `RunningStatistics`: mean and covariance accumulated batch by batch (Chan et al.'s pairwise
  update), so large sample sets need not be kept.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import scipy.linalg
import scipy.special

from sgm_jax.errors import InputError


@dataclasses.dataclass
class RunningStatistics:
  """Mean and covariance (ddof=1, like np.cov) of feature vectors seen in batches, in float64.

  Batches are merged with the pairwise update of Chan, Golub & LeVeque (1979), which avoids the
  cancellation of accumulating raw second moments.
  """

  dim: int
  count: int = 0
  mean: np.ndarray = dataclasses.field(default=None)  # type: ignore[assignment]
  scatter: np.ndarray = dataclasses.field(default=None)  # sum of (x - mean)(x - mean)^T

  def __post_init__(self):
    if self.mean is None:
      self.mean = np.zeros(self.dim, np.float64)
    if self.scatter is None:
      self.scatter = np.zeros((self.dim, self.dim), np.float64)

  def update(self, features: np.ndarray) -> "RunningStatistics":
    """Add a batch (B, dim) of feature vectors; returns self."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise InputError(f"expected features of shape (B, {self.dim}), got {x.shape}")
    n_b = x.shape[0]
    if n_b == 0:
      return self
    mean_b = x.mean(axis=0)
    centered = x - mean_b
    scatter_b = centered.T @ centered
    n = self.count + n_b
    delta = mean_b - self.mean
    self.mean = self.mean + delta * (n_b / n)
    self.scatter = self.scatter + scatter_b + np.outer(delta, delta) * (self.count * n_b / n)
    self.count = n
    return self

  @property
  def covariance(self) -> np.ndarray:
    if self.count < 2:
      raise InputError(f"a covariance needs at least 2 samples, have {self.count}")
    return self.scatter / (self.count - 1)


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean, covariance) of features (N, d), in float64."""
  stats = RunningStatistics(np.shape(features)[1]).update(features)
  return stats.mean, stats.covariance


def _psd_sqrt(sigma: np.ndarray, name: str, tolerance: float) -> np.ndarray:
  """Symmetric square root of a covariance matrix; ValueError if it is not one."""
  if not np.allclose(sigma, sigma.T, rtol=1e-6, atol=1e-12 * max(np.abs(sigma).max(), 1e-30)):
    raise InputError(f"{name} is not a covariance matrix: it is not symmetric")
  w, v = np.linalg.eigh(sigma)
  if w.min() < -tolerance * max(abs(w.max()), 1e-30):
    raise InputError(f"{name} is not a covariance matrix: eigenvalue {w.min():.3g} < 0")
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     tolerance: float = 1e-6) -> float:
  """Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2):
  ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1^{1/2} sigma2 sigma1^{1/2})^{1/2}).

  The trace term uses symmetric eigendecompositions only, so it stays real and finite for
  rank-deficient covariances (fewer samples than feature dimensions), where sqrtm of the
  non-symmetric product sigma1 sigma2 breaks down. Eigenvalues below -tolerance * the largest
  raise ValueError (not a covariance); smaller negative round-off is clipped to 0.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise InputError(f"mismatched statistics: means {mu1.shape}, {mu2.shape}; "
                     f"covariances {sigma1.shape}, {sigma2.shape}")
  root1 = _psd_sqrt(sigma1, "sigma1", tolerance)
  _psd_sqrt(sigma2, "sigma2", tolerance)
  middle = root1 @ sigma2 @ root1
  eigenvalues = np.linalg.eigvalsh(0.5 * (middle + middle.T))
  trace_sqrt = float(np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None))))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def frechet_distance_from_features(features1: np.ndarray, features2: np.ndarray, **kwargs
                                   ) -> float:
  """Frechet distance between Gaussians fitted to two feature sets (N1, d), (N2, d)."""
  return frechet_distance(*gaussian_statistics(features1), *gaussian_statistics(features2),
                          **kwargs)


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """(mean, std over splits) of exp(E_x KL(p(y|x) || p(y))) from class probabilities (N, C).

  p(y) is the mean of p(y|x) within each split, as in Salimans et al. and TF-GAN.
  """
  p = np.asarray(probs, np.float64)
  if p.ndim != 2 or not 1 <= splits <= p.shape[0]:
    raise InputError(f"need probabilities (N, C) with N >= splits={splits}, got {p.shape}")
  scores = []
  for part in np.array_split(p, splits):
    marginal = part.mean(axis=0, keepdims=True)
    kl = scipy.special.rel_entr(part, np.broadcast_to(marginal, part.shape)).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def softmax(logits: np.ndarray) -> np.ndarray:
  """Class probabilities from logits (N, C), in float64."""
  return scipy.special.softmax(np.asarray(logits, np.float64), axis=-1)


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0
                      ) -> np.ndarray:
  """k(x, y) = (x.y / d + coef0)^degree for all pairs of rows of x (n, d) and y (m, d)."""
  base = x @ y.T / x.shape[1] + coef0
  return base ** degree if degree != 3 else base * base * base


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> float:
  """Unbiased estimate of MMD^2 between the laws of x (n, d) and y (m, d) (Gretton et al., 2012):
  off-diagonal means of k(x, x') and k(y, y') minus twice the mean of k(x, y)."""
  n, m = x.shape[0], y.shape[0]
  k_xx = polynomial_kernel(x, x, degree, coef0)
  k_yy = polynomial_kernel(y, y, degree, coef0)
  k_xy = polynomial_kernel(x, y, degree, coef0)
  xx = (k_xx.sum() - np.trace(k_xx)) / (n * (n - 1))
  yy = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
  return float(xx + yy - 2.0 * k_xy.mean())


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray,
                              subset_size: int = 1000, num_subsets: int = 100,
                              seed: Optional[int] = 0) -> tuple[float, float]:
  """(mean, std) over `num_subsets` random subsets (without replacement within a subset) of the
  unbiased MMD^2 with the cubic polynomial kernel; subsets hold min(subset_size, N1, N2) rows."""
  x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
    raise InputError(f"feature sets must be (N, d) with equal d, got {x.shape} and {y.shape}")
  m = min(subset_size, x.shape[0], y.shape[0])
  if m < 2:
    raise InputError("KID needs at least 2 samples in each set")
  rng = np.random.default_rng(seed)
  values = [mmd2_unbiased(x[rng.choice(x.shape[0], m, replace=False)],
                          y[rng.choice(y.shape[0], m, replace=False)])
            for _ in range(num_subsets)]
  return float(np.mean(values)), float(np.std(values))


def kernel_inception_distance_blocks(features1: np.ndarray, features2: np.ndarray,
                                     max_block_size: int = 1024) -> tuple[float, float]:
  """TF-GAN's KID (`kernel_classifier_distance_and_std_from_activations`, which score_sde's
  evaluation calls with its default block size): (mean over blocks, standard error of that mean).

  Both sets are split, in their order, into the same number B = ceil(max(N1, N2) /
  max_block_size) of consecutive blocks, each set's blocks of sizes N // B and N // B + 1 (the
  larger ones last); block i's value is the unbiased MMD^2 (`mmd2_unbiased`) between block i of
  each set. The standard error is sqrt(var / B) with the Bessel-corrected variance of the block
  values (NaN for one block). Deterministic: no subsets are drawn. The sets should be in random
  order (TF-GAN's note); samples are, a dataset's training split in its stored order is taken as
  it comes, as score_sde did. ValueError when a block of either set would hold fewer than 2 rows
  (the unbiased estimate needs 2).
  """
  x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
    raise InputError(f"feature sets must be (N, d) with equal d, got {x.shape} and {y.shape}")
  if max_block_size < 2:
    raise InputError(f"max_block_size must be >= 2, got {max_block_size}")
  blocks = -(-max(x.shape[0], y.shape[0]) // max_block_size)
  if min(x.shape[0], y.shape[0]) < 2 * blocks:
    raise InputError(
        f"KID in {blocks} blocks of at most {max_block_size} needs at least {2 * blocks} rows in "
        f"each set, got {x.shape[0]} and {y.shape[0]}")

  def bounds(n):  # B - n % B blocks of n // B rows, then n % B blocks of n // B + 1
    sizes = np.full(blocks, n // blocks)
    sizes[blocks - n % blocks:] += 1
    return np.concatenate([[0], np.cumsum(sizes)])

  bx, by = bounds(x.shape[0]), bounds(y.shape[0])
  values = np.array([mmd2_unbiased(x[bx[i]:bx[i + 1]], y[by[i]:by[i + 1]])
                     for i in range(blocks)])
  mean = float(values.mean())
  if blocks == 1:
    return mean, float("nan")
  return mean, float(np.sqrt(values.var(ddof=1) / blocks))


def _squared_distances(a: np.ndarray, b: np.ndarray, b_squared_norms: np.ndarray) -> np.ndarray:
  """||a_i - b_j||^2 (float64) for rows a (n, d), b (m, d), clipped at 0 against round-off."""
  sq = (a * a).sum(axis=1)[:, None] + b_squared_norms[None, :] - 2.0 * (a @ b.T)
  return np.maximum(sq, 0.0)


def _knn_squared_radii(x: np.ndarray, k: int, block_size: int) -> np.ndarray:
  """Squared distance of each row of x to its k-th nearest other row, in blocks of rows and
  columns: the (k+1)-th smallest including the row itself (distance 0)."""
  norms = (x * x).sum(axis=1)
  radii = np.empty(x.shape[0])
  for start in range(0, x.shape[0], block_size):
    rows = x[start:start + block_size]
    smallest = np.full((rows.shape[0], 0), np.inf)
    for col in range(0, x.shape[0], block_size):
      block = _squared_distances(rows, x[col:col + block_size], norms[col:col + block_size])
      candidates = np.concatenate([smallest, block], axis=1)
      keep = min(k + 1, candidates.shape[1])
      smallest = np.partition(candidates, keep - 1, axis=1)[:, :keep]
    radii[start:start + rows.shape[0]] = smallest.max(axis=1)
  return radii


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3,
                     block_size: int = 1024) -> tuple[float, float]:
  """Improved precision and recall (Kynkaanniemi et al., "Improved Precision and Recall Metric
  for Assessing Generative Models", NeurIPS 2019) of feature sets (N_real, d), (N_fake, d).

  Each real feature's ball reaches its k-th nearest neighbour among the other real features;
  precision is the share of fake features inside at least one real ball. Recall is the same with
  the roles swapped: the share of real features inside at least one fake ball, whose radii come
  from the fakes' own k-NN distances. A ball holds its boundary (distance <= radius).
  Euclidean distances in float64, about the real features' mean, computed in blocks of
  `block_size` x `block_size` pairs (memory is O(block_size^2), whatever the set sizes).
  """
  real = np.asarray(real_features, np.float64)
  fake = np.asarray(fake_features, np.float64)
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise InputError(f"k (the neighbour that sets each ball's radius) must be an integer >= 1, "
                     f"got {k!r}")
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or \
      block_size < 1:
    raise InputError(f"block_size must be an integer >= 1, got {block_size!r}")
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise InputError(f"feature sets must be (N, d) with equal d, got {real.shape} and "
                     f"{fake.shape}")
  if min(real.shape[0], fake.shape[0]) < k + 1:
    raise InputError(f"precision/recall with k={k} needs at least k + 1 = {k + 1} rows in each "
                     f"set, got {real.shape[0]} real and {fake.shape[0]} fake")
  # About the mean, the cancellation in |a|^2 - 2 a.b + |b|^2 is smaller; distances are the same.
  center = real.mean(axis=0)
  real, fake = real - center, fake - center
  real_radii = _knn_squared_radii(real, k, block_size)
  fake_radii = _knn_squared_radii(fake, k, block_size)
  fake_norms = (fake * fake).sum(axis=1)
  fake_covered = np.zeros(fake.shape[0], bool)  # inside some real ball
  real_covered = np.zeros(real.shape[0], bool)  # inside some fake ball
  for start in range(0, real.shape[0], block_size):
    rows = real[start:start + block_size]
    row_radii = real_radii[start:start + block_size]
    for col in range(0, fake.shape[0], block_size):
      block = _squared_distances(rows, fake[col:col + block_size], fake_norms[col:col + block_size])
      fake_covered[col:col + block_size] |= (block <= row_radii[:, None]).any(axis=0)
      real_covered[start:start + block_size] |= (
          block <= fake_radii[None, col:col + block_size]).any(axis=1)
  return float(fake_covered.mean()), float(real_covered.mean())
