"""Restart sampling (Xu et al. 2023, sgm_jax/sampling/restart.py) on the Gaussian-mixture oracle:
distributions, the algorithm written out, its limit heun, nfe, hooks, correction of a perturbed
score, option errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oracle_flow import CountingScore
from test_sampler_hooks import Recorder
from test_sampling_stochastic import (GM, SDES, assert_matches_oracle, distribution_errors,
                                      edm_denoiser, eps_offset, sampler_noise, scaled)
from sgm_jax import sampling
from sgm_jax.errors import InputError
from sgm_jax.sampling import base

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-heavy, tiny compute

# An interval of the mixture's own scale (component stds 0.2-0.5, means 1.5 apart), wide enough
# that a wrong jump or restart pass shows in the samples; 3 Heun steps per pass (2 over [0.3, 2]
# added a covariance error of 0.1-0.2 with 4 restarts).
WIDE = dict(restart_rho_min=0.3, restart_rho_max=2.0, restart_count=2, restart_steps=3)


# --- (a) the right distribution with the exact score --------------------------------------------
@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_samples_match_the_oracle_distribution(sde_name):
  sde, n = SDES[sde_name], 4000
  sampler = sampling.get_sampler("restart", sde, (n, 2), num_steps=24, **WIDE)
  assert sampler.info["nfe"] == 2 * 24 - 1 + 2 * 2 * 3
  x, _ = sampler(jax.random.PRNGKey(0), GM.score_fn(sde))
  assert_matches_oracle(x, sde, float(sampler.info["ts"][-1]))


# --- (b) the algorithm written out, and its limit heun -------------------------------------------
def _run(name, sde, num_steps, key=jax.random.PRNGKey(2), hook=None, **options):
  x_T = sde.prior_sampling(jax.random.PRNGKey(1), (6, 2))
  sampler = sampling.get_sampler(name, sde, (6, 2), num_steps=num_steps, **options)
  x, nfe = sampler(key, GM.score_fn(sde), x_T, hook=hook)
  return np.asarray(x), int(nfe), sampler


@pytest.mark.parametrize("sde_name,num_steps,options", [
    ("vp", 8, dict(restart_rho_min=0.5, restart_rho_max=3.0, restart_count=2, restart_steps=3)),
    ("ve", 9, dict(restart_rho_min=0.2, restart_rho_max=1.5, restart_count=3, restart_steps=2)),
])
def test_restart_is_algorithm_1(sde_name, num_steps, options):
  """Against Xu et al.'s Algorithm 2 with EDM's Heun steps (the official generate_restart.py)
  written out in float64 in y = x / alpha and rho (their x and sigma), with the sampler's own noise
  draws: restart at the main grid level nearest restart_rho_min."""
  sde = SDES[sde_name]
  key = jax.random.PRNGKey(2)
  x, _, sampler = _run("restart", sde, num_steps, key, **options)
  ts = sampler.info["ts"]
  alpha, rho = base.on_host(sde.alpha, ts), base.on_host(sde.rho, ts)
  index = int(np.argmin(np.abs(rho - options["restart_rho_min"])))
  assert 2 <= index <= num_steps - 2
  rho_min, rho_max = rho[index], options["restart_rho_max"]
  assert sampler.info["restart_interval"] == (rho_min, rho_max)
  u = np.linspace(rho_max ** (1 / 7), rho_min ** (1 / 7), options["restart_steps"] + 1)
  restart_rho = u ** 7
  D = edm_denoiser(sde)
  noise = sampler_noise(key, options["restart_count"], x)

  def heun(y, levels, last_euler):
    for i in range(len(levels) - 1):
      d = (y - D(y, levels[i])) / levels[i]
      y_next = y + (levels[i + 1] - levels[i]) * d
      if not (last_euler and i == len(levels) - 2):
        d_next = (y_next - D(y_next, levels[i + 1])) / levels[i + 1]
        y_next = y + (levels[i + 1] - levels[i]) * 0.5 * (d + d_next)
      y = y_next
    return y

  y = heun(np.asarray(sde.prior_sampling(jax.random.PRNGKey(1), (6, 2)), np.float64) / alpha[0],
           rho[:index + 1], last_euler=False)
  for k in range(options["restart_count"]):
    y = y + np.sqrt(rho_max ** 2 - rho_min ** 2) * noise[k]
    y = heun(y, restart_rho, last_euler=False)
  y = heun(y, rho[index:], last_euler=True)
  np.testing.assert_allclose(x, alpha[-1] * y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sde_name,num_steps,options", [
    ("vp", 7, {}), ("ve", 7, {"denoise": True}), ("vp", 1, {"restart_steps": 3})])
def test_without_restarts_is_heun(sde_name, num_steps, options):
  sde = SDES[sde_name]
  x, nfe, _ = _run("restart", sde, num_steps, restart_count=0, **options)
  x_heun, nfe_heun, _ = _run("heun", sde, num_steps,
                             **{k: v for k, v in options.items() if k == "denoise"})
  # The same arithmetic in another program (one scan over evaluations, heun's over steps): equal
  # up to float32 rounding (1 ulp measured)
  np.testing.assert_allclose(x, x_heun, rtol=1e-6, atol=1e-7)
  assert nfe == nfe_heun


def test_noise_comes_from_the_key():
  sde = SDES["vp"]
  a, _, _ = _run("restart", sde, 6, **WIDE)
  b, _, _ = _run("restart", sde, 6, **WIDE)
  c, _, _ = _run("restart", sde, 6, key=jax.random.PRNGKey(3), **WIDE)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c, atol=1e-3)


# --- (c) nfe counted at run time, hooks ------------------------------------------------------
@pytest.mark.parametrize("num_steps,count,steps,denoise", [
    (1, 2, 2, False),  # the restart after the main pass's last (Euler) step
    (5, 3, 1, True), (6, 0, 4, False)])
def test_nfe_is_exact(num_steps, count, steps, denoise):
  sde = SDES["ve"]
  sampler = sampling.get_sampler("restart", sde, (3, 2), num_steps=num_steps, restart_count=count,
                                 restart_steps=steps, denoise=denoise)
  score = CountingScore(GM.score_fn(sde))
  x, nfe = score.run(sampler, jax.random.PRNGKey(0))
  expected = 2 * num_steps - 1 + 2 * count * steps + int(denoise)
  assert int(nfe) == score.count == sampler.info["nfe"] == expected
  assert x.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(x)))


@pytest.mark.parametrize("with_hook", [False, True])
def test_the_score_is_traced_once(with_hook):
  """One network in the compiled program, however many evaluations and restarts."""
  sde, traces = SDES["vp"], []

  def score_fn(x, t):
    traces.append(1)  # runs when traced only
    return GM.score_fn(sde)(x, t)

  hook = (lambda x, t, key: x) if with_hook else None
  sampling.get_sampler("restart", sde, (3, 2), num_steps=4, **WIDE)(jax.random.PRNGKey(0),
                                                                    score_fn, hook=hook)
  assert len(traces) == 1


@pytest.mark.parametrize("denoise", [False, True])
def test_hook_runs_after_every_update(denoise):
  """After each main step, each restart's jump (at t(rho_max)) and each restart step, then after
  the denoising jump; a key of its own for each call."""
  recorder = Recorder()
  x, nfe, sampler = _run("restart", SDES["vp"], 6, hook=recorder, denoise=denoise, **WIDE)
  jax.effects_barrier()
  info = sampler.info
  assert nfe == info["nfe"]
  np.testing.assert_array_equal(x[:, 0], 0.0)  # the hook's projection holds in the output
  assert np.all(np.isfinite(x)) and np.all(np.abs(x[:, 1:]) > 0)
  ts, restart_ts, index = info["ts"], info["restart_ts"], info["restart_index"]
  expected = list(ts[1:]) + info["restart_count"] * list(restart_ts) + [0.0] * denoise
  assert len(recorder.times) == len(expected) == 6 + 2 * (1 + 3) + denoise
  np.testing.assert_allclose(sorted(recorder.times, reverse=True),
                             np.sort(np.asarray(expected, np.float32))[::-1], rtol=1e-6)
  assert restart_ts[-1] == ts[index] and len(set(recorder.keys)) == len(expected)


def test_identity_hook_leaves_the_sampler_unchanged():
  plain, nfe_plain, _ = _run("restart", SDES["ve"], 6, **WIDE)
  hooked, nfe, _ = _run("restart", SDES["ve"], 6, hook=lambda x, t, key: x, **WIDE)
  assert nfe == nfe_plain
  np.testing.assert_allclose(hooked, plain, rtol=1e-5, atol=1e-6)


# --- (d) a perturbed score: the restarts contract what the ODE carries to the end ----------------
# (restart main steps, options, heun steps (the same nfe), sde, perturbation, error compared,
# largest ratio asserted). Measured (mean / covariance errors, keys 0, 10, 20; Monte-Carlo standard
# error of the mean error ~0.01, of the covariance error ~0.02), at 31 nfe with WIDE (10 main
# steps + 2 x 3 restart steps) against heun's 16 steps:
#   eps offset 0.03, VP, mean:   0.107-0.119 vs 0.204-0.207
#   score x 1.1, VP, covariance: 0.047-0.050 vs 0.441-0.447
#   score x 1.1, VE, covariance: 0.042-0.051 vs 0.221-0.226
# at 43 nfe with the defaults (18 main steps + 2 x 2 restart steps in [0.06, 0.30]) against 22:
#   score x 1.1, VP, covariance: 0.335-0.340 vs 0.519-0.524 (VE: 0.138-0.140 vs 0.241-0.245)
#   eps offset, VP, mean: 0.194-0.201 vs 0.210-0.213, not asserted; 4 restarts of 3 steps in
#   [0.3, 2] (10 main steps, 43 nfe): 0.092-0.102. With the eps offset under VE restart is no
#   better (0.086 vs 0.092 at 43 nfe), as edm_sde.
CORRECTION_CASES = [
    (10, WIDE, 16, "vp", eps_offset, 1, 0.7),
    (10, WIDE, 16, "vp", scaled, 2, 0.3),
    (10, WIDE, 16, "ve", scaled, 2, 0.4),
    (18, {}, 22, "vp", scaled, 2, 0.8),
]


@pytest.mark.parametrize("num_steps,options,heun_steps,sde_name,perturb,which,ratio",
                         CORRECTION_CASES,
                         ids=[f"{c[3]}-{c[4].__name__}-{'wide' if c[1] else 'defaults'}"
                              for c in CORRECTION_CASES])
def test_restart_corrects_a_perturbed_score(num_steps, options, heun_steps, sde_name, perturb,
                                            which, ratio):
  sde = SDES[sde_name]
  score_fn = perturb(sde, GM.score_fn(sde))
  restart = distribution_errors("restart", num_steps, sde, score_fn, **options)
  ode = distribution_errors("heun", heun_steps, sde, score_fn)
  assert restart[0] == ode[0] and 30 <= restart[0] <= 60
  assert restart[which] < ratio * ode[which], (restart, ode)


# --- (e) option errors -----------------------------------------------------------------------
@pytest.mark.parametrize("options,match", [
    (dict(restart_rho_min=0.0), r"restart_rho_min must be finite and > 0, got 0\.0"),
    (dict(restart_rho_min=float("nan")), "restart_rho_min .* got nan"),
    (dict(restart_rho_min="0.1"), "restart_rho_min must be a number .* got '0.1'"),
    (dict(restart_rho_max=0.05), r"restart_rho_max must be .*> restart_rho_min=0\.06 .* got 0\.05"),
    (dict(restart_rho_max=1e4), r"restart_rho_max must be .*<= rho\(T\)=.* got 10000\.0"),
    (dict(restart_rho_max=float("inf")), "restart_rho_max .* got inf"),
    (dict(restart_count=-1), "restart_count must be an integer >= 0, got -1"),
    (dict(restart_count=2.0), r"restart_count must be an integer >= 0, got 2\.0"),
    (dict(restart_count=True), "restart_count .* got True"),
    (dict(restart_steps=0), "restart_steps must be an integer >= 1, got 0"),
    # 2 main steps (rho 157, 5.8, 0.01): 4.0 snaps to 5.8
    (dict(restart_rho_min=4.0, restart_rho_max=5.0),
     r"restart_rho_min=4\.0 snaps to the main grid level rho=.*not below restart_rho_max=5\.0"),
    (dict(S_churn=1.0), "unknown option.*'S_churn'.*valid options are .*'restart_count'"),
    (dict(time_grid="cosine"), "time_grid 'cosine'.*'polynomial_rho'"),
    (dict(denoise="yes"), "denoise must be true or false, got 'yes'"),
])
def test_bad_options_raise_naming_the_value(options, match):
  with pytest.raises(InputError, match=match):
    sampling.get_sampler("restart", SDES["vp"], (3, 2), num_steps=2, **options)
