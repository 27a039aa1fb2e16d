"""DDIM, EDM Heun and DPM-Solver++(2M): convergence order against the exact flow of the digits
oracle, DDIM's stochastic (eta = 1) distribution, exact nfe, determinism and option checking."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oracle_flow import CountingScore, digits_oracle, exact_flow_map
from sgm_jax import sampling, sde_lib, toy

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-heavy, tiny compute

GM = toy.GaussianMixture.create(jnp.array([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]]),
                                jnp.array([0.3, 0.4, 0.35]), jnp.array([0.5, 0.3, 0.2]))
SDES = {"ve": sde_lib.VESDE(sigma_min=0.01, sigma_max=10.0), "vp": sde_lib.VPSDE(),
        "subvp": sde_lib.subVPSDE(), "tutorial": sde_lib.TutorialSDE(sigma_base=10.0)}


@pytest.fixture(scope="module")
def flow_problem():
  """Digits mixture (64 images, std 0.5), VP SDE, B = 8, and the float64 reference flow map from
  T to the samplers' eps."""
  with jax.enable_x64(True):
    gm = digits_oracle(std=0.5)
    gm = jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64) if a.dtype.kind == "f" else a, gm)
    sde = sde_lib.VPSDE()
    x_T = jax.random.normal(jax.random.PRNGKey(1), (8, 8, 8, 1), jnp.float64)
    ref = exact_flow_map(gm, sde, x_T, sde.T, sde.default_sampling_eps, tol=1e-12)
  return gm, sde, x_T, ref


@pytest.mark.parametrize("name,steps,order", [
    ("ddim", [40, 80, 160], 1.0),
    ("heun", [20, 40, 80], 2.0),
    ("dpm_solver", [80, 160, 320], 2.0),
])
def test_convergence_order(flow_problem, name, steps, order):
  """Least-squares slope of log RMS error against log num_steps, in float64, on each sampler's
  default time grid (uniform, polynomial in rho, quadratic in t)."""
  gm, sde, x_T, ref = flow_problem
  errors = []
  with jax.enable_x64(True):
    for n in steps:
      sampler = sampling.get_sampler(name, sde, x_T.shape, num_steps=n)
      assert sampler.info["ts"][0] == sde.T and sampler.info["ts"][-1] == sde.default_sampling_eps
      x, _ = sampler(jax.random.PRNGKey(0), gm.score_fn(sde), x_T)
      assert x.dtype == jnp.float64
      errors.append(float(jnp.sqrt(jnp.mean((x - ref) ** 2))))
  slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
  assert abs(slope - order) < 0.3, f"{name}: errors {errors}, order {slope:.2f}"


@pytest.mark.parametrize("sde_name", ["vp", "subvp"])
def test_ddim_eta_one_matches_the_oracle_distribution(sde_name):
  """eta = 1 is ancestral sampling through the forward posterior: p_0's moments and weights."""
  sde, n = SDES[sde_name], 4000
  sampler = sampling.get_sampler("ddim", sde, (n, 2), num_steps=200, eta=1.0)
  x, _ = sampler(jax.random.PRNGKey(0), GM.score_fn(sde))
  t = float(sampler.info["ts"][-1])
  x = np.asarray(x, np.float64)
  mean, var = (np.asarray(m, np.float64) for m in GM.moments(sde, t))
  alpha, sigma = float(sde.alpha(jnp.asarray(t))), float(sde.sigma(jnp.asarray(t)))
  d = alpha * np.asarray(GM.means, np.float64) - mean
  v = ((alpha * np.asarray(GM.stds, np.float64)) ** 2 + sigma ** 2)[:, None]
  mu4 = np.asarray(GM.weights, np.float64) @ (d ** 4 + 6 * d ** 2 * v + 3 * v ** 2)
  np.testing.assert_array_less(np.abs(x.mean(0) - mean), 5 * np.sqrt(var / n))
  np.testing.assert_array_less(np.abs(x.var(0) - var), 5 * np.sqrt((mu4 - var ** 2) / n))
  w = np.asarray(GM.weights)
  resp = np.asarray(GM.responsibilities(jnp.asarray(x, jnp.float32), sde, jnp.full((n,), t)))
  np.testing.assert_array_less(np.abs(resp.mean(0) - w), 5 * np.sqrt(w * (1 - w) / n))


CASES = [  # (sampler, options, nfe for num_steps n, deterministic)
    ("ddim", {}, lambda n: n, True),
    ("ddim", dict(eta=1.0, denoise=True), lambda n: n + 1, False),
    ("heun", {}, lambda n: 2 * n - 1, True),
    ("dpm_solver", {}, lambda n: n, True),
]


@pytest.mark.parametrize("sde_name", ["ve", "vp", "subvp"])
@pytest.mark.parametrize("num_steps", [1, 2])
@pytest.mark.parametrize("name,options,nfe_of,deterministic", CASES,
                         ids=["ddim", "ddim-eta1-denoise", "heun", "dpm_solver"])
def test_finite_nfe_exact_and_pure_in_float32(name, options, nfe_of, deterministic, sde_name,
                                              num_steps):
  sde = SDES[sde_name]
  sampler = sampling.get_sampler(name, sde, (3, 2), num_steps=num_steps, **options)
  score = CountingScore(GM.score_fn(sde))
  x_T = sde.prior_sampling(jax.random.PRNGKey(3), (3, 2))
  x, nfe = score.run(sampler, jax.random.PRNGKey(0), x_T)
  assert x.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(x)))
  assert nfe.dtype == jnp.int32 and int(nfe) == score.count == nfe_of(num_steps)
  y, _ = sampler(jax.random.PRNGKey(1), score, x_T)
  assert np.array_equal(np.asarray(x), np.asarray(y)) == deterministic


@pytest.mark.parametrize("name", ["ddim", "heun", "dpm_solver"])
def test_prior_draw_and_tutorial_sde(name):
  sde = SDES["tutorial"]
  x, _ = sampling.get_sampler(name, sde, (3, 2), num_steps=3)(jax.random.PRNGKey(0),
                                                               GM.score_fn(sde))
  assert bool(jnp.all(jnp.isfinite(x)))


def test_dpm_solver_first_step_is_ddim():
  """DPM-Solver++(2M) starts with a first-order step, which is DDIM (eta = 0); with one step both
  go from T to eps in one update."""
  sde = SDES["vp"]
  with jax.enable_x64(True):
    x_T = jax.random.normal(jax.random.PRNGKey(3), (5, 2), jnp.float64)
    a, _ = sampling.get_sampler("dpm_solver", sde, (5, 2), num_steps=1)(
        jax.random.PRNGKey(0), GM.score_fn(sde), x_T)
    b, _ = sampling.get_sampler("ddim", sde, (5, 2), num_steps=1)(
        jax.random.PRNGKey(0), GM.score_fn(sde), x_T)
    assert a.dtype == b.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10)


@pytest.mark.parametrize("num_steps", [2, 3])
def test_dpm_solver_lower_order_final_is_a_ddim_last_step(num_steps):
  """With lower_order_final the last update of DPM-Solver++(2M) is first order: for two steps the
  whole run is DDIM on the same (log-SNR) grid; without it, the second-order last step differs.
  Below 15 steps it is the default, as in diffusers."""
  sde = SDES["vp"]
  with jax.enable_x64(True):
    x_T = jax.random.normal(jax.random.PRNGKey(3), (5, 2), jnp.float64)
    run = lambda name, **o: np.asarray(sampling.get_sampler(name, sde, (5, 2), num_steps=num_steps,
                                                            **o)(jax.random.PRNGKey(0),
                                                                 GM.score_fn(sde), x_T)[0])
    low = run("dpm_solver", time_grid="log_rho")
    high = run("dpm_solver", time_grid="log_rho", lower_order_final=False)
    ddim = run("ddim", time_grid="log_rho")
  if num_steps == 2:
    np.testing.assert_allclose(low, ddim, rtol=1e-10)
  assert np.abs(low - high).max() > 1e-3
  assert not np.allclose(high, ddim, rtol=1e-3)
  info = lambda n: sampling.get_sampler("dpm_solver", sde, (5, 2), num_steps=n).info
  assert info(14)["lower_order_final"] and not info(15)["lower_order_final"]


@pytest.mark.parametrize("name,options,match", [
    ("ddim", dict(eta=1.5), "eta"),
    ("ddim", dict(solver="x"), "valid options are .*'denoise'.*'eps'.*'eta'.*'time_grid'"),
    ("heun", dict(time_grid="karras"), "valid values are .*'polynomial_rho'"),
    ("heun", dict(s_churn=1.0), "valid options are .*'eps'.*'time_grid'"),
    ("dpm_solver", dict(order=4), r"\[1, 2, 3\], got 4"),
    ("dpm_solver", dict(eps=0.0), "eps"),
])
def test_bad_options_raise_listing_valid_ones(name, options, match):
  with pytest.raises(ValueError, match=match):
    sampling.get_sampler(name, SDES["vp"], (3, 2), num_steps=4, **options)
