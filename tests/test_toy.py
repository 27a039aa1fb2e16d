import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sgm_jax import sde_lib, toy

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-heavy, tiny compute

SDES = [sde_lib.VESDE(), sde_lib.VPSDE(), sde_lib.subVPSDE(), sde_lib.TutorialSDE()]
IDS = [type(s).__name__ for s in SDES]


@pytest.fixture(scope="module")
def digits():
  return toy.GaussianMixture.from_digits(std=0.05)


def test_digits_mixture_is_the_scaled_dataset(digits):
  assert digits.means.shape == (1797, 8, 8, 1)
  assert digits.event_shape == (8, 8, 1) and digits.dim == 64
  assert float(digits.means.min()) == -1.0 and float(digits.means.max()) == 1.0
  assert sorted(np.unique(np.asarray(digits.labels)).tolist()) == list(range(10))
  np.testing.assert_allclose(digits.weights.sum(), 1.0, rtol=1e-6)


@pytest.mark.parametrize("sde", SDES[:3], ids=IDS[:3])
@pytest.mark.parametrize("t", [1e-5, 1e-3, 0.1, 0.5, 1.0])
def test_exact_score_equals_autodiff_of_log_density(digits, sde, t):
  """The closed-form score matches jax.grad of the closed-form log p_t in float32."""
  x = digits.sample(jax.random.PRNGKey(3), 16, sde, t)
  tb = jnp.full((16,), t)
  score = digits.score(x, sde, tb)
  grad = jax.grad(lambda x: digits.log_prob(x, sde, tb).sum())(x)
  scale = jnp.abs(grad).max()
  np.testing.assert_allclose(score / scale, grad / scale, atol=2e-6)
  assert bool(jnp.all(jnp.isfinite(score)))


def test_large_batch_uses_expanded_distances_and_agrees(digits):
  """Above the direct-distance size the matmul form is used; both forms give the same density."""
  sde = sde_lib.VPSDE()
  x = digits.sample(jax.random.PRNGKey(0), 64, sde, 0.3)
  t = jnp.full((64,), 0.3)
  assert 64 * digits.means.size > toy._DIRECT_DISTANCE_ELEMENTS
  expanded = digits.log_prob(x, sde, t)
  direct = jnp.concatenate([digits.log_prob(x[i:i + 2], sde, t[i:i + 2]) for i in range(0, 64, 2)])
  np.testing.assert_allclose(expanded, direct, rtol=1e-5)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_single_gaussian_matches_scipy_and_tweedie(sde):
  """K = 1: log-density, eps and denoiser against independent closed forms."""
  mu = jnp.array([[0.5, -1.0, 2.0]])
  s = 0.7
  gm = toy.GaussianMixture.create(mu, s)
  t = jnp.array([0.05, 0.4, 0.9])
  x = jnp.array([[0.1, 0.2, 0.3], [-1.0, 0.0, 1.0], [2.0, -2.0, 0.5]])
  a, sig = np.asarray(sde.alpha(t)), np.asarray(sde.sigma(t))
  v = a ** 2 * s ** 2 + sig ** 2
  expected = [stats.multivariate_normal(a[i] * np.asarray(mu[0]), v[i] * np.eye(3)).logpdf(x[i])
              for i in range(3)]
  np.testing.assert_allclose(gm.log_prob(x, sde, t), expected, rtol=1e-5)
  # E[x0 | xt] = mu + a s^2 / v (xt - a mu); eps = -sigma * score.
  x0_hat = mu + (a * s ** 2 / v)[:, None] * (x - a[:, None] * mu)
  np.testing.assert_allclose(gm.denoise(x, sde, t), x0_hat, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gm.eps(x, sde, t), sig[:, None] * (x - a[:, None] * mu) / v[:, None],
                             rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sde", [None] + SDES, ids=["p0"] + IDS)
def test_samples_match_exact_moments_and_weights(sde):
  gm = toy.GaussianMixture.create(jnp.array([[-2.0, 1.0], [1.0, 0.0], [3.0, -3.0]]),
                                  jnp.array([0.3, 0.5, 0.2]), weights=jnp.array([0.5, 0.3, 0.2]))
  n = 40_000
  t = 0.4
  x, comp = gm.sample(jax.random.PRNGKey(7), n, sde, None if sde is None else t,
                      return_components=True)
  mean, var = gm.moments(sde, t)
  mean_error = np.abs(np.asarray(x.mean(0)) - np.asarray(mean))
  assert np.all(mean_error <= 5 * np.sqrt(np.asarray(var) / n)), (x.mean(0), mean)
  # The sample variance has standard error ~ sqrt(m4 - var^2) / sqrt(n); bound m4 generously.
  np.testing.assert_allclose(x.var(0), var, rtol=6 * math.sqrt(3.0 / n) * 3)
  freq = np.bincount(np.asarray(comp), minlength=3) / n
  np.testing.assert_allclose(freq, gm.weights, atol=5 * np.sqrt(0.25 / n))
  # Samples are typical for the density they came from: E[log p(x)] equals the entropy estimate
  # from an independent sample.
  x2 = gm.sample(jax.random.PRNGKey(8), n, sde, None if sde is None else t)
  tb = None if sde is None else jnp.full((n,), t)
  lp1, lp2 = gm.log_prob(x, sde, tb), gm.log_prob(x2, sde, tb)
  np.testing.assert_allclose(lp1.mean(), lp2.mean(), atol=5 * float(lp1.std()) / math.sqrt(n))


def test_log_prob_normalizes_in_one_dimension():
  gm = toy.GaussianMixture.create(jnp.array([[-1.0], [2.0]]), jnp.array([0.2, 0.6]),
                                  weights=jnp.array([0.3, 0.7]))
  grid = jnp.linspace(-6, 8, 20001)[:, None]
  for sde, t in [(None, None), (sde_lib.VPSDE(), 0.3), (sde_lib.VESDE(sigma_max=5.0), 0.2)]:
    tb = None if sde is None else jnp.full((grid.shape[0],), t)
    density = jnp.exp(gm.log_prob(grid, sde, tb))
    np.testing.assert_allclose(jnp.trapezoid(density, grid[:, 0]), 1.0, atol=1e-4)


def test_responsibilities_and_score_fn(digits):
  sde = sde_lib.VPSDE()
  x, comp = digits.sample(jax.random.PRNGKey(0), 8, sde, 1e-3, return_components=True)
  r = digits.responsibilities(x, sde, jnp.full((8,), 1e-3))
  np.testing.assert_allclose(r.sum(-1), 1.0, rtol=1e-5)
  # At small t each sample is almost surely attributed to the digit image it was drawn around.
  np.testing.assert_array_equal(jnp.argmax(r, -1), comp)
  score_fn = digits.score_fn(sde)
  np.testing.assert_array_equal(score_fn(x, jnp.full((8,), 0.5)),
                                digits.score(x, sde, jnp.full((8,), 0.5)))


def test_score_is_jittable_and_vmappable(digits):
  sde = sde_lib.subVPSDE()
  x = digits.sample(jax.random.PRNGKey(0), 4, sde, 0.5)
  t = jnp.full((4,), 0.5)
  jitted = jax.jit(lambda gm, x, t: gm.score(x, sde, t))(digits, x, t)
  per_example = jax.vmap(lambda xi, ti: digits.score(xi[None], sde, ti[None])[0])(x, t)
  np.testing.assert_allclose(jitted, per_example, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(means=jnp.zeros((2, 3)), stds=jnp.array([0.1, 0.0])), "stds must all be > 0"),
    (dict(means=jnp.zeros((2, 3)), stds=0.1, weights=jnp.ones(3)), r"weights must have shape \(2,\)"),
    (dict(means=jnp.zeros((2, 3)), stds=0.1, labels=jnp.zeros(5)), r"labels must have shape \(2,\)"),
])
def test_bad_mixtures_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    toy.GaussianMixture.create(**kwargs)
