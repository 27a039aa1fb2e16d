import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sgm_jax import sde_lib

ALL_SDES = [
    sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=1000),
    sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=1000),
    sde_lib.subVPSDE(beta_min=0.1, beta_max=20.0, N=1000),
    sde_lib.TutorialSDE(sigma_base=25.0),
]
IDS = [type(s).__name__ for s in ALL_SDES]


def _drift_coefficient(sde, t):
  """f(t) for the linear drift f(x, t) = f(t) x."""
  drift, _ = sde.sde(jnp.ones((t.shape[0], 1)), t)
  return drift[:, 0]


@pytest.mark.parametrize("sde", ALL_SDES, ids=IDS)
def test_marginals_match_monte_carlo_simulation_of_forward_sde(sde):
  """Euler-Maruyama with many small steps reproduces marginal_prob's mean and std."""
  n_paths, n_steps, d = 20_000, 2_000, 2
  x0 = jnp.array([[1.5, -0.5]])
  key = jax.random.PRNGKey(0)
  k0, k_path = jax.random.split(key)
  # The VE kernel std is sigma(t), so its SDE starts from the data smoothed by N(0, sigma(0)^2).
  start_std = sde.sigma(jnp.zeros(()))
  x = x0 + start_std * jax.random.normal(k0, (n_paths, d))
  dt = sde.T / n_steps
  checkpoints = {int(0.3 * n_steps): 0.3, n_steps: 1.0}

  def step(x, i):
    t = jnp.full((n_paths,), i * dt)
    drift, diffusion = sde.sde(x, t)
    z = jax.random.normal(jax.random.fold_in(k_path, i), x.shape)
    return x + drift * dt + diffusion[:, None] * math.sqrt(dt) * z, None

  done = 0
  for stop, t in sorted(checkpoints.items()):
    x, _ = jax.lax.scan(step, x, jnp.arange(done, stop))
    done = stop
    mean, std = sde.marginal_prob(x0, jnp.array([t]))
    emp_mean, emp_std = x.mean(0), x.std(0)
    std = float(std[0])
    # 5 standard errors of the mean / of the std, plus the O(dt) bias of Euler-Maruyama.
    np.testing.assert_allclose(emp_mean, mean[0], atol=5 * std / math.sqrt(n_paths) + 2e-3 * abs(x0).max())
    np.testing.assert_allclose(emp_std, std, rtol=5 / math.sqrt(2 * n_paths) + 2e-3)


@pytest.mark.parametrize("sde", ALL_SDES, ids=IDS)
def test_drift_and_diffusion_agree_with_kernel(sde):
  """d alpha/dt = f alpha and d v/dt = 2 f v + g^2 (Fokker-Planck for Gaussian kernels)."""
  t = jnp.linspace(0.02, 1.0, 17)
  s0 = 0.3  # a data std, so v(t) = alpha^2 s0^2 + sigma^2 is the variance of p_t
  variance = lambda t: sde.alpha(t) ** 2 * s0 ** 2 + sde.sigma(t) ** 2
  dalpha = jax.vmap(jax.grad(sde.alpha))(t)
  dvar = jax.vmap(jax.grad(variance))(t)
  f = _drift_coefficient(sde, t)
  _, g = sde.sde(jnp.ones((t.shape[0], 1)), t)
  np.testing.assert_allclose(dalpha, f * sde.alpha(t), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(dvar, 2 * f * variance(t) + g ** 2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sde", ALL_SDES, ids=IDS)
def test_probability_flow_drift_transports_a_gaussian(sde):
  """For p_t = N(0, v(t)) the flow drift is v'/(2v) x and the reverse drift f x + g^2 x / v."""
  t = jnp.linspace(0.05, 1.0, 8)
  x = jnp.linspace(-2.0, 2.0, 8)[:, None] * jnp.ones((8, 3))
  s0 = 0.5
  variance = lambda t: sde.alpha(t) ** 2 * s0 ** 2 + sde.sigma(t) ** 2
  v = variance(t)
  score_fn = lambda x, t: -x / variance(t)[:, None]
  expected = (jax.vmap(jax.grad(variance))(t) / (2 * v))[:, None] * x
  np.testing.assert_allclose(sde.probability_flow_drift(score_fn, x, t), expected, rtol=1e-4,
                             atol=1e-5)
  f = _drift_coefficient(sde, t)
  _, g = sde.sde(x, t)
  rsde = sde.reverse(score_fn)
  drift, diffusion = rsde.sde(x, t)
  np.testing.assert_allclose(drift, (f + g ** 2 / v)[:, None] * x, rtol=1e-5)
  np.testing.assert_allclose(diffusion, g)
  _, ode_diffusion = sde.reverse(score_fn, probability_flow=True).sde(x, t)
  np.testing.assert_array_equal(ode_diffusion, 0.0)


@pytest.mark.parametrize("sde", ALL_SDES, ids=IDS)
def test_prior_logp_matches_scipy(sde):
  z = sde.prior_sampling(jax.random.PRNGKey(1), (5, 4, 4, 3))
  expected = stats.norm.logpdf(np.asarray(z, np.float64), scale=sde.prior_std).reshape(5, -1).sum(1)
  np.testing.assert_allclose(sde.prior_logp(z), expected, rtol=1e-5)
  assert z.shape == (5, 4, 4, 3)
  np.testing.assert_allclose(float(z.std()), sde.prior_std, rtol=0.15)


def test_vp_discretize_is_the_ddpm_recursion():
  sde = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=1000)
  betas = np.linspace(0.1 / 1000, 20.0 / 1000, 1000)
  i = np.array([0, 1, 500, 999])
  t = jnp.asarray(i / 999.0)
  x = jnp.ones((4, 2, 2, 1)) * 2.0
  f, G = sde.discretize(x, t)
  np.testing.assert_allclose(G, np.sqrt(betas[i]), rtol=1e-5)
  np.testing.assert_allclose(f[:, 0, 0, 0], 2.0 * (np.sqrt(1 - betas[i]) - 1), rtol=1e-4, atol=1e-7)
  # Running the steps gives DDPM's alphas_cumprod, which approximates alpha(t)^2 (log within
  # sum(beta_i^2) / 2, the second-order term of log(1 - beta)).
  np.testing.assert_allclose(sde.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5)
  np.testing.assert_allclose(np.log(sde.alphas_cumprod[i]), np.log(sde.alpha(t) ** 2),
                             atol=0.6 * np.sum(betas ** 2))
  rsde = sde.reverse(lambda x, t: -x)
  rev_f, rev_G = rsde.discretize(x, t)
  np.testing.assert_allclose(rev_f, f + (G ** 2)[:, None, None, None] * x, rtol=1e-6)
  np.testing.assert_allclose(rev_G, G)
  ode_f, ode_G = sde.reverse(lambda x, t: -x, probability_flow=True).discretize(x, t)
  np.testing.assert_allclose(ode_f, f + 0.5 * (G ** 2)[:, None, None, None] * x, rtol=1e-6)
  np.testing.assert_array_equal(ode_G, 0.0)


def test_ve_discretize_is_the_smld_recursion():
  """sum of G_i^2 over the first i + 1 steps telescopes to sigma_i^2 (Eq. 45)."""
  sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=100)
  sigmas = np.exp(np.linspace(np.log(0.01), np.log(50.0), 100))
  t = jnp.arange(100) / 99.0
  f, G = sde.discretize(jnp.ones((100, 3)), t)
  np.testing.assert_array_equal(f, 0.0)
  np.testing.assert_allclose(np.cumsum(np.asarray(G, np.float64) ** 2), sigmas ** 2, rtol=1e-4)
  np.testing.assert_allclose(sde.discrete_sigmas, sigmas, rtol=1e-5)


def test_subvp_discretize_is_euler_maruyama():
  sde = sde_lib.subVPSDE(N=50)
  x = jnp.ones((3, 2))
  t = jnp.array([0.1, 0.5, 0.9])
  f, G = sde.discretize(x, t)
  drift, diffusion = sde.sde(x, t)
  np.testing.assert_allclose(f, drift / 50, rtol=1e-6)
  np.testing.assert_allclose(G, diffusion * math.sqrt(1 / 50), rtol=1e-6)


@pytest.mark.parametrize("sde", ALL_SDES, ids=IDS)
def test_log_snr_inverse_and_rho(sde):
  t = jnp.linspace(1e-3, 1.0, 50)
  lam = sde.log_snr(t)
  assert bool(jnp.all(jnp.diff(lam) < 0)), "log-SNR must decrease in t"
  np.testing.assert_allclose(sde.t_from_log_snr(lam), t, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(sde.rho(t), jnp.exp(-lam / 2), rtol=1e-4)
  np.testing.assert_allclose(sde.t_from_rho(sde.rho(t)), t, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(lam, jnp.log(sde.alpha(t) ** 2 / sde.sigma(t) ** 2), rtol=1e-4,
                             atol=1e-4)


def test_log_snr_is_accurate_in_float64_at_extremes():
  with jax.enable_x64(True):
    for sde in ALL_SDES:
      t = jnp.array([1e-5, 1e-3, 0.5, 1.0], dtype=jnp.float64)
      lam = sde.log_snr(t)
      assert bool(jnp.all(jnp.isfinite(lam)))
      np.testing.assert_allclose(sde.t_from_log_snr(lam), t, rtol=1e-9)


def test_time_labels_follow_score_sde_conventions():
  t = jnp.array([0.0, 0.25, 1.0])
  ve, vp, subvp = sde_lib.VESDE(N=1000), sde_lib.VPSDE(N=1000), sde_lib.subVPSDE(N=1000)
  np.testing.assert_allclose(ve.time_label(t, continuous=True), ve.sigma(t))
  np.testing.assert_array_equal(ve.time_label(t, continuous=False), [999, 749, 0])
  np.testing.assert_allclose(vp.time_label(t, continuous=True), 999 * t)
  np.testing.assert_allclose(vp.time_label(t, continuous=False), 999 * t)
  np.testing.assert_allclose(subvp.time_label(t, continuous=False), 999 * t)
  np.testing.assert_allclose(vp.network_std(t[1:], continuous=False),
                             np.sqrt(1 - vp.alphas_cumprod[np.array([249, 999])]), rtol=1e-6)
  assert ve.network_output == "score" and vp.network_output == "eps"
  assert subvp.network_output == "eps"


def test_default_sampling_eps():
  assert sde_lib.VESDE().default_sampling_eps == 1e-5
  assert sde_lib.VPSDE().default_sampling_eps == 1e-3
  assert sde_lib.subVPSDE().default_sampling_eps == 1e-3


def test_tutorial_sde_marginal_std_closed_form():
  sde = sde_lib.TutorialSDE(sigma_base=25.0)
  t = jnp.array([0.1, 0.5, 1.0])
  expected = np.sqrt((25.0 ** (2 * np.asarray(t)) - 1) / (2 * np.log(25.0)))
  np.testing.assert_allclose(sde.marginal_prob(jnp.ones((3, 2)), t)[1], expected, rtol=1e-5)
  np.testing.assert_allclose(sde.sde(jnp.ones((3, 2)), t)[1], 25.0 ** np.asarray(t), rtol=1e-6)


def test_sdes_are_immutable_hashable_and_jit_static():
  sde = sde_lib.VPSDE()
  with pytest.raises(dataclasses.FrozenInstanceError):
    sde.beta_min = 0.2
  assert hash(sde) == hash(sde_lib.VPSDE())

  @jax.jit
  def f(x, t):
    return sde.marginal_prob(x, t)[0]

  g = jax.jit(lambda s, x, t: s.marginal_prob(x, t)[1], static_argnums=0)
  x, t = jnp.ones((4, 8, 8, 3)), jnp.full((4,), 0.5)
  assert f(x, t).shape == (4, 8, 8, 3)
  assert g(sde_lib.subVPSDE(), x, t).shape == (4,)
  batched = jax.vmap(lambda xi, ti: sde.sde(xi[None], ti[None])[0][0])(x, t)
  np.testing.assert_allclose(batched, sde.sde(x, t)[0], rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(cls=sde_lib.VESDE, sigma_min=-1.0), "sigma_min must be > 0, got -1.0"),
    (dict(cls=sde_lib.VESDE, sigma_min=1.0, sigma_max=0.5), "sigma_max must be > sigma_min"),
    (dict(cls=sde_lib.VPSDE, beta_min=-0.1), "beta_min must be >= 0"),
    (dict(cls=sde_lib.VPSDE, beta_max=0.05), "beta_max must be > beta_min"),
    (dict(cls=sde_lib.subVPSDE, N=0), "N .* positive integer, got 0"),
    (dict(cls=sde_lib.TutorialSDE, sigma_base=0.5), "sigma_base must be > 1"),
])
def test_bad_parameters_raise_clear_errors(kwargs, match):
  cls = kwargs.pop("cls")
  with pytest.raises(ValueError, match=match):
    cls(**kwargs)


def test_get_sde_by_name():
  assert sde_lib.get_sde("vpsde", beta_max=10.0) == sde_lib.VPSDE(beta_max=10.0)
  with pytest.raises(ValueError, match="unknown SDE 'vpsd'.*subvpsde"):
    sde_lib.get_sde("vpsd")
