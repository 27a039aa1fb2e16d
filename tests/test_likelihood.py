import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax import likelihood, sde_lib, toy

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-heavy, tiny compute

SDES = [sde_lib.VPSDE(), sde_lib.subVPSDE(), sde_lib.VESDE(sigma_max=20.0)]
IDS = [type(s).__name__ for s in SDES]


def _oracle(dtype):
  gm = toy.GaussianMixture.from_digits(std=0.1, num_images=32)
  return jax.tree_util.tree_map(lambda a: a.astype(dtype) if a.dtype.kind == "f" else a, gm)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_exact_trace_likelihood_matches_the_oracle_density(sde):
  """With the exact terminal density, the ODE likelihood is log p_eps(x) within 1e-3 nats/dim."""
  with jax.enable_x64(True):
    gm = _oracle(jnp.float64)
    eps = sde.default_sampling_eps
    x = gm.sample(jax.random.PRNGKey(0), 4, sde, eps)
    exact_prior = lambda z: gm.log_prob(z, sde, jnp.full((z.shape[0],), sde.T))
    ll = likelihood.get_likelihood_fn(sde, divergence="exact", eps=eps, prior_logp=exact_prior)
    logp, z, nfe = ll(jax.random.PRNGKey(1), gm.score_fn(sde), x)
    expected = gm.log_prob(x, sde, jnp.full((4,), eps))
    assert float(jnp.abs(logp - expected).max()) / gm.dim < 1e-3
    assert int(nfe) > 6 and z.shape == x.shape
    # With the SDE's own prior, the only extra error is the prior mismatch at T.
    logp_prior, _, _ = likelihood.get_likelihood_fn(sde, divergence="exact", eps=eps)(
        jax.random.PRNGKey(1), gm.score_fn(sde), x)
    gap = exact_prior(z) - sde.prior_logp(z)
    np.testing.assert_allclose(logp_prior + gap, logp, atol=1e-6 * gm.dim)


@pytest.fixture(scope="module")
def hutchinson_problem():
  """(sde, oracle, x, score_fn, exact-trace log-likelihood): the reference both probes share, one
  compiled solve instead of one per probe distribution."""
  sde = sde_lib.VPSDE()
  gm = _oracle(jnp.float32)
  x = gm.sample(jax.random.PRNGKey(0), 4, sde, 1e-3)
  score_fn = gm.score_fn(sde)
  exact, _, _ = likelihood.get_likelihood_fn(sde, "exact", eps=1e-3)(
      jax.random.PRNGKey(0), score_fn, x)
  return sde, gm, x, score_fn, exact


@pytest.mark.parametrize("divergence", ["rademacher", "gaussian"])
def test_hutchinson_estimate_is_unbiased(hutchinson_problem, divergence):
  sde, gm, x, score_fn, exact = hutchinson_problem
  ll = likelihood.get_likelihood_fn(sde, divergence, num_probes=2, eps=1e-3)
  runs = np.stack([np.asarray(ll(jax.random.PRNGKey(k), score_fn, x)[0]) for k in range(12)])
  se = runs.std(0, ddof=1) / math.sqrt(len(runs))
  assert np.all(np.abs(runs.mean(0) - np.asarray(exact)) < 3.5 * se + 1e-3 * gm.dim)
  assert np.all(runs.std(0) > 0)


def test_encode_decode_are_inverse():
  sde = sde_lib.subVPSDE()
  gm = _oracle(jnp.float32)
  x = gm.sample(jax.random.PRNGKey(0), 6, sde, 1e-3)
  score_fn = gm.score_fn(sde)
  z, nfe_e = likelihood.get_encode_fn(sde, eps=1e-3)(score_fn, x)
  x_back, nfe_d = likelihood.get_decode_fn(sde, eps=1e-3)(score_fn, z)
  np.testing.assert_allclose(x_back, x, atol=2e-3)
  # The latent is close to a prior sample: unit scale and far from the data.
  assert 0.7 < float(z.std()) < 1.3
  assert int(nfe_e) > 0 and int(nfe_d) > 0


def test_bits_per_dim_conventions():
  """bpd = -logp / (D ln 2) + offset with offset 8 ([0, 1] models) or 7 ([-1, 1] models):
  checked on a model whose density is exactly uniform-like: a wide Gaussian, closed form."""
  assert likelihood.bpd_offset(False) == 8.0 and likelihood.bpd_offset(True) == 7.0
  x = jnp.full((2, 2, 2, 1), 128 / 255)
  key = jax.random.PRNGKey(0)
  fake_ll = lambda k, s, x: (jnp.full((x.shape[0],), -3.0), x, jnp.asarray(1))
  bpd, _ = likelihood.bits_per_dim(key, fake_ll, None, x, centered=True)
  np.testing.assert_allclose(bpd, 3.0 / (4 * math.log(2)) + 7.0, rtol=1e-6)
  bpd, _ = likelihood.bits_per_dim(key, fake_ll, None, x, centered=False, uniform_dequantization=False)
  np.testing.assert_allclose(bpd, 3.0 / (4 * math.log(2)) + 8.0, rtol=1e-6)
  u = likelihood.dequantize(key, jnp.full((10000,), 128 / 255))
  assert float(u.min()) >= 128 / 256 and float(u.max()) <= 129 / 256


def test_bits_per_dim_of_the_oracle_equals_its_exact_value():
  """A [-1, 1] oracle: ODE bpd of data equals -log2 p_eps / D + 7 computed from the exact density."""
  with jax.enable_x64(True):
    sde = sde_lib.VPSDE()
    gm = _oracle(jnp.float64)
    x01 = jnp.round((gm.sample(jax.random.PRNGKey(0), 3, sde, 1e-3) + 1) / 2 * 255).clip(0, 255) / 255
    exact_prior = lambda z: gm.log_prob(z, sde, jnp.full((z.shape[0],), 1.0))
    ll = likelihood.get_likelihood_fn(sde, "exact", eps=1e-3, prior_logp=exact_prior)
    key = jax.random.PRNGKey(5)
    bpd, _ = likelihood.bits_per_dim(key, ll, gm.score_fn(sde), x01, centered=True)
    u = likelihood.dequantize(jax.random.split(key)[0], x01)
    exact = -gm.log_prob(2 * u - 1, sde, jnp.full((3,), 1e-3)) / (gm.dim * math.log(2)) + 7
    np.testing.assert_allclose(bpd, exact, atol=1e-3 / math.log(2))


def test_bad_options_raise():
  sde = sde_lib.VPSDE()
  with pytest.raises(ValueError, match="unknown divergence 'hutch'"):
    likelihood.get_likelihood_fn(sde, divergence="hutch")
  with pytest.raises(ValueError, match="num_probes must be a positive integer, got 0"):
    likelihood.get_likelihood_fn(sde, num_probes=0)
  with pytest.raises(ValueError, match="rtol must be a positive number"):
    likelihood.get_likelihood_fn(sde, rtol=-1.0)
  with pytest.raises(ValueError, match="fixed-step solver 'euler'.*'dopri5'"):
    likelihood.get_likelihood_fn(sde, solver="euler")
  with pytest.raises(ValueError, match="solver 'rk45'"):
    likelihood.get_encode_fn(sde, solver="rk45")
