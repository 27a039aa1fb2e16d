"""Probability-flow ODE sampler: convergence order against the exact flow of the digits oracle,
exact nfe (counted at run time), determinism and option checking."""
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
        "subvp": sde_lib.subVPSDE()}


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


def measured_order(flow_problem, name, steps, **options):
  """Least-squares slope of -log(RMS error) against log(num_steps), in float64."""
  gm, sde, x_T, ref = flow_problem
  errors = []
  with jax.enable_x64(True):
    for n in steps:
      sampler = sampling.get_sampler(name, sde, x_T.shape, num_steps=n, **options)
      assert sampler.info["ts"][0] == sde.T and sampler.info["ts"][-1] == sde.default_sampling_eps
      x, _ = sampler(jax.random.PRNGKey(0), gm.score_fn(sde), x_T)
      assert x.dtype == jnp.float64
      errors.append(float(jnp.sqrt(jnp.mean((x - ref) ** 2))))
  return -np.polyfit(np.log(steps), np.log(errors), 1)[0], errors


@pytest.mark.parametrize("solver,steps,order", [
    ("euler", [40, 80, 160], 1.0),
    ("rk4", [48, 96, 192], 4.0),
])
def test_fixed_step_convergence_order(flow_problem, solver, steps, order):
  slope, errors = measured_order(flow_problem, "ode", steps, solver=solver)
  assert abs(slope - order) < 0.3, f"{solver}: errors {errors}, order {slope:.2f}"


def test_adaptive_dopri5_meets_its_tolerance_and_is_a_pure_function_of_x_T(flow_problem):
  gm, sde, x_T, ref = flow_problem
  with jax.enable_x64(True):
    sampler = sampling.get_sampler("ode", sde, x_T.shape, num_steps=1, rtol=1e-7, atol=1e-7)
    a, nfe = sampler(jax.random.PRNGKey(0), gm.score_fn(sde), x_T)
    b, _ = sampler(jax.random.PRNGKey(1), gm.score_fn(sde), x_T)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  err = float(np.max(np.abs(np.asarray(a) - ref)))
  assert 0 < err < 1e-4, err
  assert int(nfe) > 6 * 10  # really adaptive: far more than one step


@pytest.mark.parametrize("sde_name", ["ve", "vp", "subvp"])
@pytest.mark.parametrize("solver,num_steps,per_step", [("euler", 1, 1), ("rk4", 2, 4)])
def test_fixed_step_finite_and_nfe_exact_in_float32(sde_name, solver, num_steps, per_step):
  sde = SDES[sde_name]
  sampler = sampling.get_sampler("ode", sde, (3, 2), num_steps=num_steps, solver=solver)
  score = CountingScore(GM.score_fn(sde))
  x, nfe = score.run(sampler, jax.random.PRNGKey(0))
  assert x.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(x)))
  assert nfe.dtype == jnp.int32 and int(nfe) == score.count == num_steps * per_step


@pytest.mark.parametrize("sde_name,solver,options", [
    ("ve", "dopri5", {}),
    ("subvp", "tsit5", dict(rtol=1e-3, atol=1e-3, denoise=True)),
    ("vp", "heun", dict(num_steps=2, time_grid="quadratic")),
])
def test_finite_nfe_exact_and_deterministic(sde_name, solver, options):
  """Adaptive FSAL solvers: 6 evaluations per attempted step (rejections included) + 1, checked
  against the run-time count; two keys give the same samples from the same x_T."""
  sde = SDES[sde_name]
  options = dict(options)
  num_steps = options.pop("num_steps", 1)
  sampler = sampling.get_sampler("ode", sde, (3, 2), num_steps=num_steps, solver=solver, **options)
  score = CountingScore(GM.score_fn(sde))
  x_T = sde.prior_sampling(jax.random.PRNGKey(3), (3, 2))
  x, nfe = score.run(sampler, jax.random.PRNGKey(0), x_T)
  assert bool(jnp.all(jnp.isfinite(x)))
  assert int(nfe) == score.count
  if solver == "heun":
    assert int(nfe) == 2 * num_steps
  else:
    assert (int(nfe) - 1 - options.get("denoise", 0)) % 6 == 0 and int(nfe) > 7
  y, _ = sampler(jax.random.PRNGKey(1), score, x_T)
  np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("options,match", [
    (dict(solver="rk45"), "valid values are .*'dopri5'.*'euler'.*'heun'.*'rk4'.*'tsit5'"),
    (dict(method="rk4"), "valid options are .*'atol'.*'rtol'.*'solver'"),
    (dict(rtol=0.0), "rtol"),
    (dict(max_steps=0), "max_steps"),
    (dict(solver="euler", time_grid="cosine"), "valid values are .*'uniform'"),
])
def test_bad_options_raise_listing_valid_ones(options, match):
  with pytest.raises(ValueError, match=match):
    sampling.get_sampler("ode", SDES["vp"], (3, 2), num_steps=4, **options)
