"""evaluation/denoising.py: the per-noise-level denoising error equals a direct computation, the
empirical posterior mean is the exact denoiser of a mixture of near-deltas, and the plot."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax import sde_lib
from sgm_jax.evaluation import denoising
from sgm_jax.toy import GaussianMixture

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-heavy, tiny compute

SDE = sde_lib.VPSDE()
IMAGE = (4, 4, 1)


def _data():
  means = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (6,) + IMAGE, minval=-1, maxval=1))
  gm = GaussianMixture.create(jnp.asarray(means), stds=1e-3)  # near-deltas at the "images"
  test = np.asarray(gm.sample(jax.random.PRNGKey(1), 10))
  return gm, means, test


def test_noise_levels_are_uniform_in_log_snr_from_eps_to_T():
  ts = denoising.noise_levels(SDE, 5)
  lam = np.asarray(SDE.log_snr(jnp.asarray(ts)))
  assert ts[0] == pytest.approx(SDE.default_sampling_eps) and ts[-1] == pytest.approx(1.0)
  np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-4)
  with pytest.raises(ValueError, match="num"):
    denoising.noise_levels(SDE, 1)


def test_errors_equal_a_direct_computation():
  gm, means, test = _data()
  score_fn = gm.score_fn(SDE)
  perturbed = lambda x, t: score_fn(x, t) * 1.1  # not exact, so the errors are not tiny
  ts = denoising.noise_levels(SDE, 4)
  key = jax.random.PRNGKey(3)
  batches = [test[:6], test[6:]]
  result = denoising.denoising_error(key, perturbed, SDE, batches, ts, reference=means)
  eps_sq, x0_sq = np.zeros(len(ts)), np.zeros(len(ts))
  direct_score = jax.jit(perturbed)  # one compilation per batch shape, not one per operation
  for b, x0 in enumerate(batches):
    for j, t in enumerate(ts):
      z = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, b), j),
                                       x0.shape))
      a, s = float(SDE.alpha(t)), float(SDE.sigma(t))
      x_t = a * x0 + s * z
      score = np.asarray(direct_score(jnp.asarray(x_t), jnp.full((len(x0),), t)))
      eps_sq[j] += np.sum(np.mean(((-s * score) - z).reshape(len(x0), -1) ** 2, 1))
      x0_hat = (x_t + s ** 2 * score) / a
      x0_sq[j] += np.sum(np.mean((x0_hat - x0).reshape(len(x0), -1) ** 2, 1))
  np.testing.assert_allclose(result.eps_mse, eps_sq / len(test), rtol=1e-4)
  np.testing.assert_allclose(result.x0_mse, x0_sq / len(test), rtol=1e-4)
  # MSE_x0 = (sigma / alpha)^2 MSE_eps at every level
  rho2 = np.asarray(SDE.rho(jnp.asarray(ts))) ** 2
  np.testing.assert_allclose(result.x0_mse, rho2 * result.eps_mse, rtol=1e-3)
  assert result.num_examples == 10 and result.num_reference == 6


def test_exact_denoiser_of_the_reference_set_matches_the_reference():
  """The exact score of near-deltas at the reference images is the empirical posterior mean."""
  gm, means, test = _data()
  ts = denoising.noise_levels(SDE, 5)[1:]  # sigma(t) >> the components' 1e-3
  result = denoising.denoising_error(jax.random.PRNGKey(4), gm.score_fn(SDE), SDE, [test], ts,
                                     reference=means)
  np.testing.assert_allclose(result.eps_mse, result.eps_mse_reference, rtol=2e-2, atol=1e-6)
  np.testing.assert_allclose(result.x0_mse, result.x0_mse_reference, rtol=2e-2, atol=1e-6)
  # a model that ignores its input is far worse at low noise
  zero = denoising.denoising_error(jax.random.PRNGKey(4), lambda x, t: jnp.zeros_like(x), SDE,
                                   [test], ts, reference=means)
  assert zero.x0_mse[0] > 10 * result.x0_mse[0]


def test_empirical_posterior_mean_is_a_weighted_average():
  ref = np.array([[0.0, 0.0], [1.0, 1.0]], np.float32)
  x_t = jnp.array([[0.5, 0.5], [1.0, 1.0]])
  a, s = jnp.ones(2), jnp.full(2, 0.3)
  mean = np.asarray(denoising.empirical_posterior_mean(jnp.asarray(ref), x_t, a, s))
  np.testing.assert_allclose(mean[0], [0.5, 0.5], atol=1e-6)  # equidistant: the midpoint
  d = np.sum((np.asarray(x_t[1]) - ref) ** 2, 1)
  w = np.exp(-d / (2 * 0.09)); w /= w.sum()
  np.testing.assert_allclose(mean[1], w @ ref, rtol=1e-5)


def test_plot_writes_a_png(tmp_path):
  gm, means, test = _data()
  ts = denoising.noise_levels(SDE, 3)
  result = denoising.denoising_error(jax.random.PRNGKey(0), gm.score_fn(SDE), SDE, [test], ts)
  assert result.eps_mse_reference is None
  path = denoising.plot_denoising_error(result, str(tmp_path / "d.png"))
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert set(result.as_dict()) >= {"t", "log_snr", "eps_mse", "x0_mse", "num_examples"}
  with pytest.raises(ValueError, match="at least one image"):
    denoising.denoising_error(jax.random.PRNGKey(0), gm.score_fn(SDE), SDE, [], ts)
