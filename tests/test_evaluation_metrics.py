"""Metrics against closed forms: Frechet distance, Inception Score, KID, streaming statistics."""
import itertools

import numpy as np
import scipy.linalg
import pytest

from sgm_jax.evaluation import metrics


def _random_rotation(rng, d):
  q, r = np.linalg.qr(rng.standard_normal((d, d)))
  return q * np.sign(np.diag(r))


def _trace_sqrt_product(s1, s2):
  """Tr((S1 S2)^{1/2}) = Tr((S1^{1/2} S2 S1^{1/2})^{1/2}), through symmetric eigendecompositions."""
  w, v = np.linalg.eigh(s1)
  root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  inner = np.linalg.eigvalsh(root @ s2 @ root)
  return np.sum(np.sqrt(np.clip(inner, 0, None)))


# ---------------------------------------------------------------------------- Frechet distance


def test_frechet_distance_diagonal_covariances():
  rng = np.random.default_rng(0)
  d = 16
  m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
  a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = metrics.frechet_distance(m1, np.diag(a), m2, np.diag(b))
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_distance_commuting_covariances():
  rng = np.random.default_rng(1)
  d = 12
  q = _random_rotation(rng, d)
  a, b = rng.uniform(0.01, 4.0, d), rng.uniform(0.01, 4.0, d)
  s1, s2 = (q * a) @ q.T, (q * b) @ q.T
  m1, m2 = rng.standard_normal(d), np.zeros(d)
  expected = np.sum(m1 ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  np.testing.assert_allclose(metrics.frechet_distance(m1, s1, m2, s2), expected, rtol=1e-8)


def test_frechet_distance_general_covariances_match_scipy_sqrtm():
  rng = np.random.default_rng(2)
  d = 10
  a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
  s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
  m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
  # Well conditioned and full rank: the non-symmetric sqrtm route is reliable here.
  expected = (np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2)
              - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
  np.testing.assert_allclose(metrics.frechet_distance(m1, s1, m2, s2), expected, rtol=1e-8)
  # Symmetric in its two arguments, and zero against itself.
  np.testing.assert_allclose(metrics.frechet_distance(m2, s2, m1, s1), expected, rtol=1e-8)
  assert abs(metrics.frechet_distance(m1, s1, m1, s1)) < 1e-9 * np.trace(s1)


def test_frechet_distance_of_identical_features_is_zero():
  x = np.random.default_rng(3).standard_normal((500, 32)) * 3 + 1
  fd = metrics.frechet_distance_from_features(x, x)
  assert abs(fd) < 1e-8
  shifted = metrics.frechet_distance_from_features(x, x + 0.5)
  np.testing.assert_allclose(shifted, 32 * 0.25, rtol=1e-8)  # only the means move


def test_frechet_distance_rank_deficient_covariances_stay_finite():
  rng = np.random.default_rng(4)
  x, y = rng.standard_normal((20, 64)), rng.standard_normal((20, 64)) + 0.1  # rank 19 of 64
  (m1, s1), (m2, s2) = metrics.gaussian_statistics(x), metrics.gaussian_statistics(y)
  fd = metrics.frechet_distance(m1, s1, m2, s2)
  expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(s1, s2)
  assert np.isfinite(fd)
  np.testing.assert_allclose(fd, expected, rtol=1e-3)


def test_frechet_distance_with_far_fewer_samples_than_dimensions():
  """64 samples against 128 in 1280 dimensions (an FD-EffNet smoke run): real, finite, and equal
  to the symmetric-route value; sqrtm of sigma1 sigma2 gives large imaginary parts here."""
  rng = np.random.default_rng(5)
  x, y = rng.standard_normal((64, 1280)), rng.standard_normal((128, 1280)) * 1.1 + 0.05
  (m1, s1), (m2, s2) = metrics.gaussian_statistics(x), metrics.gaussian_statistics(y)
  fd = metrics.frechet_distance(m1, s1, m2, s2)
  expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(s1, s2)
  assert np.isfinite(fd) and fd > 0
  np.testing.assert_allclose(fd, expected, rtol=1e-6)


def test_frechet_distance_rejects_non_covariances():
  with pytest.raises(ValueError, match="sigma1 is not a covariance matrix: eigenvalue -1"):
    metrics.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match="sigma2 is not a covariance matrix: it is not symmetric"):
    metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]))
  with pytest.raises(ValueError, match="mismatched"):
    metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ---------------------------------------------------------------------------- Inception Score


def test_inception_score_uniform_predictions_is_one():
  probs = np.full((100, 10), 0.1)
  mean, std = metrics.inception_score(probs, splits=5)
  np.testing.assert_allclose([mean, std], [1.0, 0.0], atol=1e-12)


def test_inception_score_confident_balanced_is_num_classes():
  num_classes = 7
  probs = np.tile(np.eye(num_classes), (6, 1))  # 42 one-hot rows, each class 6 times
  np.testing.assert_allclose(metrics.inception_score(probs, splits=1), [num_classes, 0.0])
  # Each of 6 splits holds every class once: the same score in every split.
  np.testing.assert_allclose(metrics.inception_score(probs, splits=6), [num_classes, 0.0],
                             atol=1e-9)
  # Confident but always the same class: no diversity, score 1.
  same = np.zeros((20, num_classes))
  same[:, 3] = 1
  np.testing.assert_allclose(metrics.inception_score(same, splits=2), [1.0, 0.0], atol=1e-12)


def test_inception_score_matches_definition_on_a_random_table():
  rng = np.random.default_rng(5)
  probs = metrics.softmax(rng.standard_normal((90, 6)) * 2)
  np.testing.assert_allclose(probs.sum(1), 1.0)
  scores = []
  for part in np.array_split(probs, 3):
    marginal = part.mean(0)
    kl = [sum(p[c] * np.log(p[c] / marginal[c]) for c in range(6)) for p in part]
    scores.append(np.exp(np.mean(kl)))
  got = metrics.inception_score(probs, splits=3)
  np.testing.assert_allclose(got, [np.mean(scores), np.std(scores)], rtol=1e-10)
  assert 1.0 < got[0] < 6.0


# ---------------------------------------------------------------------------- KID


def _rademacher(rng, n, d):
  return rng.choice([-1.0, 1.0], size=(n, d))


def _population_mmd2_shifted_rademacher(shift):
  """MMD^2 between uniform {-1, 1}^d and its shift by c, by enumerating all 2^d points."""
  d = shift.shape[0]
  points = np.array(list(itertools.product([-1.0, 1.0], repeat=d)))
  k = lambda a, b: (a @ b.T / d + 1.0) ** 3  # noqa: E731
  return (k(points, points).mean() + k(points + shift, points + shift).mean()
          - 2 * k(points, points + shift).mean())


def _moment_mmd2(shift):
  """The same MMD^2 from moment tensors: sum_j C(3, j) d^-j ||E x^{(x)j} - E y^{(x)j}||^2."""
  d = shift.shape[0]
  eye = np.eye(d)
  third = (np.einsum("i,j,k->ijk", shift, shift, shift) + np.einsum("i,jk->ijk", shift, eye)
           + np.einsum("j,ik->ijk", shift, eye) + np.einsum("k,ij->ijk", shift, eye))
  diffs = [shift, np.outer(shift, shift), third]  # x's moments are 0, I and 0
  return sum(c * np.sum(m ** 2) / d ** j for j, (c, m) in enumerate(zip((3, 3, 1), diffs), 1))


def test_kid_of_point_masses_is_exact():
  a, b = np.array([1.0, 2.0, 0.0]), np.array([0.0, 1.0, -1.0])
  k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
  x, y = np.tile(a, (50, 1)), np.tile(b, (40, 1))
  mean, std = metrics.kernel_inception_distance(x, y, subset_size=30, num_subsets=5)
  np.testing.assert_allclose([mean, std], [k(a, a) + k(b, b) - 2 * k(a, b), 0.0], atol=1e-9)


def test_mmd2_estimate_is_unbiased_for_a_known_shift():
  shift = np.array([0.5, -0.5, 0.0, 0.25])
  truth = _population_mmd2_shifted_rademacher(shift)
  np.testing.assert_allclose(_moment_mmd2(shift), truth, rtol=1e-12)
  rng = np.random.default_rng(6)
  values = [metrics.mmd2_unbiased(_rademacher(rng, 50, 4), _rademacher(rng, 50, 4) + shift)
            for _ in range(1000)]
  # The biased (V-statistic) estimate would sit about 0.28 higher at n = 50.
  assert abs(np.mean(values) - truth) < 4 * np.std(values) / np.sqrt(len(values))


def test_kid_near_zero_for_same_distribution_and_positive_when_shifted():
  rng = np.random.default_rng(7)
  shift = np.array([0.5, -0.5, 0.0, 0.25])
  x, x2 = _rademacher(rng, 1000, 4), _rademacher(rng, 1000, 4)
  same_mean, same_std = metrics.kernel_inception_distance(x, x2, subset_size=200,
                                                          num_subsets=20)
  assert abs(same_mean) < 0.02 and same_std < 0.05
  mean, std = metrics.kernel_inception_distance(x, x2 + shift, subset_size=200, num_subsets=20)
  truth = _population_mmd2_shifted_rademacher(shift)
  assert mean > 10 * abs(same_mean) and std > 0
  np.testing.assert_allclose(mean, truth, rtol=0.15)
  # Same seed, same subsets.
  assert metrics.kernel_inception_distance(x, x2 + shift, subset_size=200,
                                           num_subsets=20) == (mean, std)


def _tfgan_block_kid(real, fake, block_sizes_real, block_sizes_fake):
  """TF-GAN's kernel_classifier_distance_and_std_from_activations written out with the block
  sizes given: per block (x.y/d + 1)^3 kernels, off-diagonal means of k_rr and k_gg minus twice
  the mean of k_rg; the mean over blocks and sqrt(Bessel variance / blocks)."""
  d = real.shape[1]
  ests, r0, g0 = [], 0, 0
  for m, n in zip(block_sizes_real, block_sizes_fake):
    r, g = real[r0:r0 + m], fake[g0:g0 + n]
    r0, g0 = r0 + m, g0 + n
    k_rr, k_rg, k_gg = [(a @ b.T / d + 1) ** 3 for a, b in ((r, r), (r, g), (g, g))]
    ests.append(-2 * k_rg.mean() + (k_rr.sum() - np.trace(k_rr)) / (m * (m - 1))
                + (k_gg.sum() - np.trace(k_gg)) / (n * (n - 1)))
  assert (r0, g0) == (len(real), len(fake))
  ests = np.array(ests)
  return ests.mean(), np.sqrt(np.sum((ests - ests.mean()) ** 2) / (len(ests) - 1) / len(ests))


def test_block_kid_is_tfgans_estimator_with_its_block_sizes():
  rng = np.random.default_rng(9)
  real, fake = rng.normal(size=(23, 4)), rng.normal(0.3, 1.2, size=(17, 4))
  # ceil(23 / 5) = 5 blocks: 23 = 4 + 4 + 5 + 5 + 5 and 17 = 3 + 3 + 3 + 4 + 4 (larger ones last)
  expected = _tfgan_block_kid(real, fake, [4, 4, 5, 5, 5], [3, 3, 3, 4, 4])
  got = metrics.kernel_inception_distance_blocks(real, fake, max_block_size=5)
  np.testing.assert_allclose(got, expected, rtol=1e-12)
  assert np.isfinite(got[1]) and got[1] > 0
  # Symmetric (score_sde passes the data first), and blocks are taken in order: a permutation of
  # the rows changes the blocks, hence the estimate.
  np.testing.assert_allclose(metrics.kernel_inception_distance_blocks(fake, real, 5), got,
                             rtol=1e-12)
  assert metrics.kernel_inception_distance_blocks(real[::-1], fake, 5)[0] != pytest.approx(got[0])


def test_block_kid_of_one_block_is_the_unbiased_mmd2_of_all_rows():
  rng = np.random.default_rng(10)
  real, fake = rng.normal(size=(30, 3)), rng.normal(size=(20, 3)) + 0.5
  kid, stderr = metrics.kernel_inception_distance_blocks(real, fake)  # 30 <= 1024: one block
  assert kid == pytest.approx(metrics.mmd2_unbiased(real, fake), rel=1e-12) and np.isnan(stderr)
  a, b = np.array([1.0, 2.0, 0.0]), np.array([0.0, 1.0, -1.0])
  k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
  point = metrics.kernel_inception_distance_blocks(np.tile(a, (50, 1)), np.tile(b, (40, 1)), 7)
  np.testing.assert_allclose(point, [k(a, a) + k(b, b) - 2 * k(a, b), 0.0], atol=1e-9)


def test_block_kid_needs_two_rows_per_block():
  rng = np.random.default_rng(11)
  with pytest.raises(ValueError, match=r"3 blocks of at most 4 needs at least 6 rows.*12 and 5"):
    metrics.kernel_inception_distance_blocks(rng.normal(size=(12, 2)), rng.normal(size=(5, 2)),
                                             max_block_size=4)
  with pytest.raises(ValueError, match="equal d"):
    metrics.kernel_inception_distance_blocks(np.zeros((4, 2)), np.zeros((4, 3)))


# ---------------------------------------------------------------------------- streaming statistics


def test_running_statistics_match_numpy_on_all_data():
  rng = np.random.default_rng(8)
  data = rng.standard_normal((1000, 6)) @ rng.standard_normal((6, 6)) + 1e4  # large offset
  stats = metrics.RunningStatistics(6)
  start = 0
  for size in (1, 0, 7, 300, 1, 2, 500, 189):
    stats.update(data[start:start + size])
    start += size
  assert start == stats.count == 1000
  np.testing.assert_allclose(stats.mean, data.mean(0), rtol=1e-14)
  np.testing.assert_allclose(stats.covariance, np.cov(data, rowvar=False), rtol=1e-9)
  mean, cov = metrics.gaussian_statistics(data.astype(np.float32))
  assert mean.dtype == cov.dtype == np.float64
  np.testing.assert_allclose(cov, np.cov(data.astype(np.float32).astype(np.float64),
                                         rowvar=False), rtol=1e-9)


def test_running_statistics_reject_bad_input():
  stats = metrics.RunningStatistics(3)
  with pytest.raises(ValueError):
    stats.update(np.zeros((4, 2)))
  stats.update(np.zeros((1, 3)))
  with pytest.raises(ValueError, match="at least 2"):
    _ = stats.covariance
