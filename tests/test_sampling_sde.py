"""The Milstein sampler: equal to Euler-Maruyama here (additive noise), right distribution, nfe."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oracle_flow import CountingScore
from sgm_jax import sampling, sde_lib, toy
from sgm_jax.sampling import milstein

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-heavy, tiny compute

GM = toy.GaussianMixture.create(jnp.array([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]]),
                                jnp.array([0.3, 0.4, 0.35]), jnp.array([0.5, 0.3, 0.2]))
SDES = {"ve": sde_lib.VESDE(sigma_min=0.01, sigma_max=10.0), "vp": sde_lib.VPSDE(),
        "subvp": sde_lib.subVPSDE(), "tutorial": sde_lib.TutorialSDE(sigma_base=10.0)}
N_SAMPLES = 4000


@pytest.mark.parametrize("sde_name", ["ve", "subvp"])
def test_milstein_equals_euler_maruyama_with_the_same_noise(sde_name):
  """g depends on t only, so the Milstein correction vanishes: same key, same x_T, same path."""
  sde = SDES[sde_name]
  shape = (5, 2)
  x_T = sde.prior_sampling(jax.random.PRNGKey(4), shape)
  key = jax.random.PRNGKey(7)
  sampler = sampling.get_sampler("milstein", sde, shape, num_steps=20)
  x_m, nfe_m = sampler(key, GM.score_fn(sde), x_T)
  em = sampling.get_sampler("pc", sde, shape, num_steps=20, predictor="euler_maruyama",
                            corrector="none")
  x_e, nfe_e = em(key, GM.score_fn(sde), x_T)
  np.testing.assert_allclose(np.asarray(x_m), np.asarray(x_e), rtol=1e-5, atol=1e-5)
  assert int(nfe_m) == int(nfe_e) == 20
  x_other, _ = em(jax.random.PRNGKey(8), GM.score_fn(sde), x_T)
  assert not np.allclose(np.asarray(x_m), np.asarray(x_other), atol=1e-3)


def test_milstein_correction_with_state_dependent_diffusion():
  """For dx = f dt + g(x) dw the step adds 1/2 g dg/dx_i (dW_i^2 - h) to component i: checked
  on g(x) = 0.5 x_1 + 2 x_2 per sample."""

  class Multiplicative(sde_lib.VESDE):
    def sde(self, x, t):
      return jnp.zeros_like(x), 0.5 * x[:, 0] + 2.0 * x[:, 1]

  sde = Multiplicative()
  x = jnp.array([[1.0, 0.5], [2.0, -0.3]])
  z = jnp.array([[0.3, 1.1], [-1.2, 0.4]])
  h = 0.01
  zero_score = lambda x, t: jnp.zeros_like(x)
  out = milstein.milstein_step(sde, zero_score, x, jnp.asarray(0.5), jnp.asarray(h), z)
  g = np.asarray(0.5 * x[:, :1] + 2.0 * x[:, 1:])
  dg_dx, dW = np.array([[0.5, 2.0]]), np.sqrt(h) * np.asarray(z)
  expected = np.asarray(x) + g * dW + 0.5 * g * dg_dx * (dW ** 2 - h)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-6)


@pytest.mark.parametrize("sde_name,num_steps", [("vp", 400), ("tutorial", 400)])
def test_samples_match_the_oracle_distribution(sde_name, num_steps):
  sde = SDES[sde_name]
  sampler = sampling.get_sampler("milstein", sde, (N_SAMPLES, 2), num_steps=num_steps)
  x, _ = sampler(jax.random.PRNGKey(0), GM.score_fn(sde))
  t = float(sampler.info["ts"][-1])
  x = np.asarray(x, np.float64)
  mean, var = (np.asarray(m, np.float64) for m in GM.moments(sde, t))
  # Standard errors of 4000 samples, with the exact 4th central moment of the mixture p_t.
  alpha, sigma = float(sde.alpha(jnp.asarray(t))), float(sde.sigma(jnp.asarray(t)))
  d = alpha * np.asarray(GM.means, np.float64) - mean
  v = ((alpha * np.asarray(GM.stds, np.float64)) ** 2 + sigma ** 2)[:, None]
  mu4 = np.asarray(GM.weights, np.float64) @ (d ** 4 + 6 * d ** 2 * v + 3 * v ** 2)
  se_var = np.sqrt((mu4 - var ** 2) / N_SAMPLES)
  np.testing.assert_array_less(np.abs(x.mean(0) - mean), 5 * np.sqrt(var / N_SAMPLES))
  np.testing.assert_array_less(np.abs(x.var(0) - var), 5 * se_var)
  w = np.asarray(GM.weights)
  resp = GM.responsibilities(jnp.asarray(x, jnp.float32), sde, jnp.full((N_SAMPLES,), t))
  resp = np.asarray(resp)
  np.testing.assert_array_less(np.abs(resp.mean(0) - w), 5 * np.sqrt(w * (1 - w) / N_SAMPLES))


@pytest.mark.parametrize("sde_name", ["ve", "vp", "subvp"])
@pytest.mark.parametrize("num_steps", [1, 2])
def test_finite_and_nfe_exact_in_float32(sde_name, num_steps):
  sde = SDES[sde_name]
  sampler = sampling.get_sampler("milstein", sde, (3, 2), num_steps=num_steps, denoise=True)
  score = CountingScore(GM.score_fn(sde))
  x, nfe = sampler(jax.random.PRNGKey(0), score)
  jax.effects_barrier()
  assert x.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(x)))
  assert nfe.dtype == jnp.int32 and int(nfe) == score.count == num_steps + 1


def test_float64_in_float64_out():
  with jax.enable_x64(True):
    sde = SDES["vp"]
    x_T = jax.random.normal(jax.random.PRNGKey(0), (3, 2), jnp.float64)
    x, _ = sampling.get_sampler("milstein", sde, (3, 2), num_steps=3)(
        jax.random.PRNGKey(1), GM.score_fn(sde), x_T)
    assert x.dtype == jnp.float64


@pytest.mark.parametrize("options,match", [
    (dict(predictor="euler_maruyama"), "valid options are .*'denoise'.*'eps'.*'time_grid'"),
    (dict(time_grid="cosine"), "valid values are .*'uniform'"),
    (dict(eps=2.0), "eps"),
])
def test_bad_options_raise_listing_valid_ones(options, match):
  with pytest.raises(ValueError, match=match):
    sampling.get_sampler("milstein", SDES["vp"], (3, 2), num_steps=4, **options)
