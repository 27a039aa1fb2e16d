"""The stochastic few-step samplers edm_sde (EDM Alg. 2) and dpm_solver_sde (DPM-Solver++(2M) SDE)
on the Gaussian-mixture oracle: distributions, their deterministic limits, nfe, correction of a
perturbed score, option errors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oracle_flow import CountingScore
from sgm_jax import sampling, sde_lib, toy
from sgm_jax.errors import InputError
from sgm_jax.sampling import base

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-heavy, tiny compute

# The mixture of tests/test_sampling_pc.py: unequal weights and stds.
GM = toy.GaussianMixture.create(jnp.array([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]]),
                                jnp.array([0.3, 0.4, 0.35]), jnp.array([0.5, 0.3, 0.2]))
SDES = {"ve": sde_lib.VESDE(sigma_min=0.01, sigma_max=10.0), "vp": sde_lib.VPSDE()}
Z = 5.0  # tolerance in standard errors


def exact_moments(sde, t):
  """Mean (2,) and covariance (2, 2) of p_t in float64."""
  alpha, sigma = float(sde.alpha(jnp.asarray(t))), float(sde.sigma(jnp.asarray(t)))
  w = np.asarray(GM.weights, np.float64)
  mu = alpha * np.asarray(GM.means, np.float64)
  v = (alpha * np.asarray(GM.stds, np.float64)) ** 2 + sigma ** 2
  mean = w @ mu
  return mean, np.einsum("k,ki,kj->ij", w, mu - mean, mu - mean) + (w @ v) * np.eye(2)


def assert_matches_oracle(x, sde, t):
  """Mean, covariance and mixture weights of the samples x against p_t within Z standard errors;
  the standard errors of the covariance entries from 200,000 exact samples of p_t."""
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  mean, cov = exact_moments(sde, t)
  exact = np.asarray(GM.sample(jax.random.PRNGKey(99), 200_000, sde, t), np.float64) - mean
  se_cov = np.std(exact[:, :, None] * exact[:, None, :], axis=0) / np.sqrt(n)
  z_mean = np.abs(x.mean(0) - mean) / np.sqrt(np.diag(cov) / n)
  z_cov = np.abs(np.cov(x.T, bias=True) - cov) / se_cov
  w = np.asarray(GM.weights, np.float64)
  resp = np.asarray(GM.responsibilities(jnp.asarray(x, jnp.float32), sde, jnp.full((n,), t)))
  z_w = np.abs(resp.mean(0) - w) / np.sqrt(w * (1 - w) / n)
  msg = f"z-scores: mean {z_mean}, covariance {z_cov.ravel()}, weights {z_w}"
  assert np.all(z_mean < Z) and np.all(z_cov < Z) and np.all(z_w < Z), msg


# --- (a) the right distribution with the exact score --------------------------------------------
@pytest.mark.parametrize("sde_name", ["vp", "ve"])
@pytest.mark.parametrize("name,num_steps", [("edm_sde", 40), ("dpm_solver_sde", 40)])
def test_samples_match_the_oracle_distribution(name, num_steps, sde_name):
  sde, n = SDES[sde_name], 4000
  sampler = sampling.get_sampler(name, sde, (n, 2), num_steps=num_steps)
  x, _ = sampler(jax.random.PRNGKey(0), GM.score_fn(sde))
  assert_matches_oracle(x, sde, float(sampler.info["ts"][-1]))


# --- (b) the deterministic limits, and what the noise is ------------------------------------------
def _both(name_a, options_a, name_b, options_b, sde, num_steps, key=jax.random.PRNGKey(2)):
  x_T = sde.prior_sampling(jax.random.PRNGKey(1), (6, 2))
  out = []
  for name, options in ((name_a, options_a), (name_b, options_b)):
    sampler = sampling.get_sampler(name, sde, (6, 2), num_steps=num_steps, **options)
    x, nfe = sampler(key, GM.score_fn(sde), x_T)
    out.append((np.asarray(x), int(nfe)))
  return out


def edm_denoiser(sde):
  """EDM's D(y; rho) for y = x / alpha: E[x_0 | x_t = alpha(t) y] at rho(t) = rho, in float64."""
  gm = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), GM)

  def denoise(y, rho):
    with jax.enable_x64(True):
      t = sde.t_from_rho(jnp.float64(rho))
      x = sde.alpha(t) * jnp.asarray(y, jnp.float64)
      return np.asarray(gm.denoise(x, sde, jnp.full((y.shape[0],), t)), np.float64)

  return denoise


def sampler_noise(key, num_steps, like):
  """The N(0, I) draws of the samplers' steps: step_normal on the key that follows x_T's."""
  _, key_steps = jax.random.split(key)
  return [np.asarray(base.step_normal(key_steps, i, 0, like), np.float64)
          for i in range(num_steps)]


def _run_against_reference(name, sde, n, **options):
  """The sampler's x0 from a fixed x_T and key, with what a float64 reference loop needs: its
  grid's alpha and rho, x_T, the exact denoiser D(y, rho) and the sampler's own noise draws."""
  sampler = sampling.get_sampler(name, sde, (6, 2), num_steps=n, **options)
  ts = sampler.info["ts"]
  alpha, rho = base.on_host(sde.alpha, ts), base.on_host(sde.rho, ts)
  x_T = sde.prior_sampling(jax.random.PRNGKey(1), (6, 2))
  key = jax.random.PRNGKey(2)
  x, _ = sampler(key, GM.score_fn(sde), x_T)
  return x, alpha, rho, x_T, edm_denoiser(sde), sampler_noise(key, n, x_T)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_edm_sde_is_algorithm_2(sde_name):
  """Against Karras et al.'s Algorithm 2 written out in float64 in y = x / alpha and rho (their x
  and sigma), with the sampler's own noise draws."""
  sde, n = SDES[sde_name], 8
  options = dict(S_churn=2.0, S_tmin=0.05, S_tmax=5.0, S_noise=1.007)
  x, alpha, rho, x_T, D, noise = _run_against_reference("edm_sde", sde, n, **options)
  y = np.asarray(x_T, np.float64) / alpha[0]
  churned = 0
  for i in range(n):
    in_range = options["S_tmin"] <= rho[i] <= options["S_tmax"]
    gamma = min(options["S_churn"] / n, math.sqrt(2.0) - 1.0) if in_range else 0.0
    churned += gamma > 0
    rho_hat = rho[i] * (1.0 + gamma)
    y_hat = y + math.sqrt(rho_hat ** 2 - rho[i] ** 2) * options["S_noise"] * noise[i]
    d = (y_hat - D(y_hat, rho_hat)) / rho_hat
    y = y_hat + (rho[i + 1] - rho_hat) * d
    if i < n - 1:
      d_next = (y - D(y, rho[i + 1])) / rho[i + 1]
      y = y_hat + (rho[i + 1] - rho_hat) * 0.5 * (d + d_next)
  assert 2 <= churned <= n - 2
  np.testing.assert_allclose(np.asarray(x), alpha[-1] * y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sde_name,eta", [("vp", 1.0), ("ve", 0.6)])
def test_dpm_solver_sde_is_k_diffusions_2m_sde(sde_name, eta):
  """Against k-diffusion's sample_dpmpp_2m_sde (midpoint) written out in float64 in y = x / alpha
  and rho (its x and sigma), with the sampler's own noise draws; 16 steps: no lower_order_final,
  which k-diffusion does not have."""
  sde, n = SDES[sde_name], 16
  x, alpha, rho, x_T, D, noise = _run_against_reference("dpm_solver_sde", sde, n, eta=eta)
  y, old_denoised, h_last = np.asarray(x_T, np.float64) / alpha[0], None, None
  for i in range(n):
    denoised = D(y, rho[i])
    h = math.log(rho[i]) - math.log(rho[i + 1])
    eta_h = eta * h
    y = rho[i + 1] / rho[i] * math.exp(-eta_h) * y - math.expm1(-h - eta_h) * denoised
    if old_denoised is not None:
      r = h_last / h
      y = y - 0.5 * math.expm1(-h - eta_h) * (1 / r) * (denoised - old_denoised)
    y = y + noise[i] * rho[i + 1] * math.sqrt(-math.expm1(-2 * eta_h))
    old_denoised, h_last = denoised, h
  np.testing.assert_allclose(np.asarray(x), alpha[-1] * y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sde_name,num_steps,options", [
    ("vp", 7, {}), ("ve", 7, {"denoise": True}), ("vp", 1, {}),
    ("vp", 6, {"S_churn": 5.0, "S_tmin": 1e3}),  # no grid level inside [S_tmin, S_tmax]
])
def test_edm_sde_without_churn_is_heun(sde_name, num_steps, options):
  options = {"S_churn": 0.0, **options}
  heun_options = {k: v for k, v in options.items() if k == "denoise"}
  (x, nfe), (x_heun, nfe_heun) = _both("edm_sde", options, "heun", heun_options,
                                       SDES[sde_name], num_steps)
  # The same arithmetic in another program (one scan over evaluations, heun's over steps): equal
  # up to float32 rounding (1 ulp measured)
  np.testing.assert_allclose(x, x_heun, rtol=1e-6, atol=1e-7)
  assert nfe == nfe_heun


def test_churn_levels_follow_algorithm_2():
  """gamma_i = min(S_churn / n, sqrt(2) - 1) on levels rho_i in [S_tmin, S_tmax]; none at rho(T),
  where rho_hat would leave the times the network knows."""
  sde, n = SDES["vp"], 12
  rho = base.on_host(sde.rho, sampling.get_sampler("heun", sde, (2, 2), n).info["ts"])
  for s_churn, expected in ((3.0, 3.0 / n), (100.0, math.sqrt(2.0) - 1.0)):
    gamma = sampling.get_sampler("edm_sde", sde, (2, 2), n, S_churn=s_churn, S_tmin=0.1,
                                 S_tmax=20.0).info["gamma"]
    inside = (rho[:-1] >= 0.1) & (rho[:-1] <= 20.0)
    assert 2 < inside.sum() < n - 2
    np.testing.assert_allclose(gamma[inside], expected, rtol=1e-12)
    np.testing.assert_array_equal(gamma[~inside], 0.0)
  gamma = sampling.get_sampler("edm_sde", sde, (2, 2), n).info["gamma"]
  assert gamma[0] == 0.0 and np.all(gamma[1:] > 0.0)


@pytest.mark.parametrize("sde_name,num_steps,time_grid", [
    ("vp", 5, "quadratic"), ("ve", 16, "quadratic"), ("vp", 16, "log_rho")])
def test_dpm_solver_sde_with_eta_0_is_dpm_solver_2m(sde_name, num_steps, time_grid):
  """num_steps 5: first and last step first order (lower_order_final); 16: only the first."""
  (x, nfe), (x_ode, nfe_ode) = _both("dpm_solver_sde", dict(eta=0.0, time_grid=time_grid),
                                     "dpm_solver", dict(time_grid=time_grid), SDES[sde_name],
                                     num_steps)
  np.testing.assert_array_equal(x, x_ode)
  assert nfe == nfe_ode == num_steps


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_dpm_solver_sde_first_order_steps_are_ancestral(sde_name):
  """With 2 steps both are first order (lower_order_final): with eta = 1 each is the exact
  posterior step q(x_s | x_t, x0_hat), which is DDIM's with eta = 1 (the same noise keys)."""
  (x, _), (x_ddim, _) = _both("dpm_solver_sde", {}, "ddim", dict(eta=1.0, time_grid="quadratic"),
                              SDES[sde_name], 2)
  np.testing.assert_allclose(x, x_ddim, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["edm_sde", "dpm_solver_sde"])
def test_noise_comes_from_the_key(name):
  sde = SDES["vp"]
  (a, _), (b, _) = _both(name, {}, name, {}, sde, 4)
  np.testing.assert_array_equal(a, b)
  (c, _), _ = _both(name, {}, name, {}, sde, 4, key=jax.random.PRNGKey(3))
  assert not np.allclose(a, c, atol=1e-3)


# --- (c) nfe counted at run time -------------------------------------------------------------
@pytest.mark.parametrize("name,per_step,less", [("edm_sde", 2, 1), ("dpm_solver_sde", 1, 0)])
@pytest.mark.parametrize("num_steps,denoise", [(1, False), (2, True), (5, False)])
def test_nfe_is_exact(name, per_step, less, num_steps, denoise):
  sde = SDES["ve"]
  sampler = sampling.get_sampler(name, sde, (3, 2), num_steps=num_steps, denoise=denoise)
  score = CountingScore(GM.score_fn(sde))
  x, nfe = score.run(sampler, jax.random.PRNGKey(0))
  expected = per_step * num_steps - less + int(denoise)
  assert int(nfe) == score.count == sampler.info["nfe"] == expected
  assert x.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(x)))


@pytest.mark.parametrize("name", ["edm_sde", "dpm_solver_sde"])
@pytest.mark.parametrize("with_hook", [False, True])
def test_the_score_is_traced_once(name, with_hook):
  """One network in the compiled program, however many evaluations a step makes."""
  sde, traces = SDES["vp"], []

  def score_fn(x, t):
    traces.append(1)  # runs when traced only
    return GM.score_fn(sde)(x, t)

  hook = (lambda x, t, key: x) if with_hook else None
  sampling.get_sampler(name, sde, (3, 2), num_steps=4)(jax.random.PRNGKey(0), score_fn, hook=hook)
  assert len(traces) == 1


# --- (d) a perturbed score: the noise corrects what the ODE carries to the end ------------------
N_PERTURBED = 20_000


def eps_offset(sde, score_fn, c=0.03):
  """A constant error delta = (c, -c) in the noise prediction: score - delta / sigma(t)."""
  delta = jnp.array([[c, -c]])
  return lambda x, t: score_fn(x, t) - delta / sde.sigma(t)[:, None]


def scaled(sde, score_fn, c=1.1):
  """An over-confident score, c times the exact one (under-fitted networks' exposure bias)."""
  return lambda x, t: c * score_fn(x, t)


def distribution_errors(name, num_steps, sde, score_fn, **options):
  """(nfe, |mean error|, Frobenius norm of the covariance error) of N_PERTURBED samples."""
  shape = (N_PERTURBED, 2)
  sampler = sampling.get_sampler(name, sde, shape, num_steps=num_steps, **options)
  x_T = sde.prior_sampling(jax.random.PRNGKey(1), shape)
  x, nfe = sampler(jax.random.PRNGKey(0), jax.tree_util.Partial(score_fn), x_T)
  x = np.asarray(x, np.float64)
  mean, cov = exact_moments(sde, float(sampler.info["ts"][-1]))
  return int(nfe), np.linalg.norm(x.mean(0) - mean), np.linalg.norm(np.cov(x.T) - cov)


# (stochastic, deterministic, steps of each, sde, perturbation, the error that is compared)
# Measured at 39-40 nfe (mean / covariance errors; Monte-Carlo standard error of the mean error
# ~0.01, of the covariance error ~0.02):
#   eps offset 0.03, VP, mean:  edm_sde 0.11 vs heun 0.21; dpm_solver_sde 0.12 vs dpm_solver 0.22
#   score x 1.1, VP, covariance: edm_sde 0.08 vs heun 0.50; dpm_solver_sde 0.08 vs dpm_solver 0.58
#   score x 1.1, VE, covariance: edm_sde 0.04 vs heun 0.24; dpm_solver_sde 0.07 vs dpm_solver 0.26
# (with the eps offset under VE the stochastic samplers are no better: 0.10 vs 0.09)
CORRECTION_CASES = [
    ("edm_sde", "heun", 20, "vp", eps_offset, 1),
    ("dpm_solver_sde", "dpm_solver", 40, "vp", eps_offset, 1),
    ("edm_sde", "heun", 20, "vp", scaled, 2),
    ("dpm_solver_sde", "dpm_solver", 40, "vp", scaled, 2),
    ("edm_sde", "heun", 20, "ve", scaled, 2),
    ("dpm_solver_sde", "dpm_solver", 40, "ve", scaled, 2),
]


@pytest.mark.parametrize("stochastic,deterministic,num_steps,sde_name,perturb,which",
                         CORRECTION_CASES,
                         ids=[f"{c[0]}-{c[3]}-{c[4].__name__}" for c in CORRECTION_CASES])
def test_stochastic_sampler_corrects_a_perturbed_score(stochastic, deterministic, num_steps,
                                                       sde_name, perturb, which):
  sde = SDES[sde_name]
  score_fn = perturb(sde, GM.score_fn(sde))
  noisy = distribution_errors(stochastic, num_steps, sde, score_fn)
  ode = distribution_errors(deterministic, num_steps, sde, score_fn)
  assert abs(noisy[0] - ode[0]) <= 1 and 39 <= noisy[0] <= 40
  assert noisy[which] < 0.7 * ode[which], (noisy, ode)


# --- (e) option errors -----------------------------------------------------------------------
@pytest.mark.parametrize("name,options,match", [
    ("edm_sde", dict(S_churn=-1.0), r"S_churn must be finite and >= 0, got -1\.0"),
    ("edm_sde", dict(S_churn=float("nan")), "S_churn .* got nan"),
    ("edm_sde", dict(S_churn="10"), "S_churn must be a number .* got '10'"),
    ("edm_sde", dict(S_noise=0.0), r"S_noise must be finite and > 0, got 0\.0"),
    ("edm_sde", dict(S_tmin=-0.5), r"S_tmin .* got -0\.5"),
    ("edm_sde", dict(S_tmin=2.0, S_tmax=1.0), r"S_tmax must be >= S_tmin=2\.0 .* got 1\.0"),
    ("edm_sde", dict(eta=1.0), "unknown option.*'eta'.*valid options are .*'S_churn'"),
    ("edm_sde", dict(time_grid="cosine"), "time_grid 'cosine'.*'polynomial_rho'"),
    ("edm_sde", dict(denoise="yes"), "denoise must be true or false, got 'yes'"),
    ("dpm_solver_sde", dict(eta=-0.5), r"eta must be a finite number >= 0 .* got -0\.5"),
    ("dpm_solver_sde", dict(eta=True), "eta .* got True"),
    ("dpm_solver_sde", dict(eta=float("inf")), "eta .* got inf"),
    ("dpm_solver_sde", dict(order=3), "unknown option.*'order'.*valid options are .*'eta'"),
    ("dpm_solver_sde", dict(lower_order_final="no"), "lower_order_final .* got 'no'"),
])
def test_bad_options_raise_naming_the_value(name, options, match):
  with pytest.raises(InputError, match=match):
    sampling.get_sampler(name, SDES["vp"], (3, 2), num_steps=4, **options)
