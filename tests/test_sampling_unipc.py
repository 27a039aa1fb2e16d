"""UniPC and DPM-Solver++(3M): convergence order against the exact flow of the digits oracle,
closed-form identities with DDIM and DPM-Solver++(2M), exact nfe, hooks and option checking."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oracle_flow import CountingScore, digits_oracle, exact_flow_map
from sgm_jax import sampling, toy
from sgm_jax.errors import InputError
from sgm_jax.sampling import unipc
from test_sampler_hooks import Recorder
from test_sampling_deis import measured_order
from test_sampling_exponential import GM, SDES

pytestmark = pytest.mark.usefixtures("fast_compiles")

VP = SDES["vp"]
GM3 = toy.GaussianMixture.create(jnp.array([[-1.0, 0.5, 0.0], [1.0, -0.5, 0.5]]),
                                 jnp.array([0.3, 0.4]), jnp.array([0.5, 0.5]))


@pytest.fixture(scope="module")
def flow_problem():
  """Digits mixture (64 images, std 0.5), VP SDE, B = 8, and the float64 exact flow map from T to
  the samplers' eps (as tests/test_sampling_exponential.py)."""
  with jax.enable_x64(True):
    gm = digits_oracle(std=0.5)
    gm = jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64) if a.dtype.kind == "f" else a, gm)
    x_T = jax.random.normal(jax.random.PRNGKey(1), (8, 8, 8, 1), jnp.float64)
    ref = exact_flow_map(gm, VP, x_T, VP.T, VP.default_sampling_eps, tol=1e-12)
  return gm, x_T, ref


# (sampler, options, step counts, theory order). UniPC-p (UniP-p predictor, UniC-p corrector) has
# order p + 1 (Zhao et al. 2023, Theorem 3.3), UniP-p alone order p. Step counts are where the
# error is asymptotic on this oracle; measured orders in the comments. UniPC-3 approaches 4 from
# above (local slopes 4.8, 4.4, 3.9 from 160 to 1280 steps), hence its finer grids. Without the
# corrector the UniPC cases fail (measured 1.0, 1.9, 3.0); with the reference codes' weight of D2
# (half ours) 3M measures 2.3.
CONVERGENCE = {
    "unipc1": ("unipc", dict(order=1), (80, 160, 320), 2),  # 1.94
    "unipc2": ("unipc", dict(order=2), (80, 160, 320), 3),  # 2.87
    "unipc3": ("unipc", dict(order=3), (320, 640, 1280), 4),  # 4.13
    "unip2": ("unipc", dict(order=2, corrector=False), (80, 160, 320), 2),  # 1.90
    "unipc3-bh1": ("unipc", dict(order=3, variant="bh1"), (320, 640, 1280), 4),  # 4.13
    "dpm3m": ("dpm_solver", dict(order=3), (80, 160, 320), 3),  # 2.96
}


@pytest.mark.parametrize("case_id", sorted(CONVERGENCE))
def test_convergence_order(flow_problem, case_id):
  """Least-squares slope of log RMS error against log num_steps, float64, default log-SNR grid."""
  name, options, steps, theory = CONVERGENCE[case_id]
  gm, x_T, ref = flow_problem
  errors = []
  with jax.enable_x64(True):
    for n in steps:
      sampler = sampling.get_sampler(name, VP, x_T.shape, num_steps=n, **options)
      x, nfe = sampler(jax.random.PRNGKey(0), gm.score_fn(VP), x_T)
      assert x.dtype == jnp.float64 and int(nfe) == n
      errors.append(float(np.sqrt(np.mean((np.asarray(x) - ref) ** 2))))
  order = measured_order(steps, errors)
  print(f"{case_id}: errors {errors}, measured order {order:.2f} (theory {theory})")
  assert np.all(np.diff(errors) < 0), errors
  assert abs(order - theory) < 0.3, (order, errors)


# --- closed-form identities (float64) -------------------------------------------------------------
def _run(name, num_steps, x_T, **options):
  sampler = sampling.get_sampler(name, VP, x_T.shape, num_steps=num_steps, **options)
  return np.asarray(sampler(jax.random.PRNGKey(0), GM.score_fn(VP), x_T)[0])


@pytest.fixture(scope="module")
def x_T64():
  with jax.enable_x64(True):
    return jax.random.normal(jax.random.PRNGKey(3), (5, 2), jnp.float64)


@pytest.mark.parametrize("num_steps", [1, 2, 7])
def test_first_order_without_corrector_is_ddim(x_T64, num_steps):
  """UniP-1 is the first-order exponential integrator in log-SNR: DDIM (eta = 0) on the same
  grid."""
  with jax.enable_x64(True):
    a = _run("unipc", num_steps, x_T64, order=1, corrector=False)
    b = _run("ddim", num_steps, x_T64, time_grid="quadratic")
    c = _run("unipc", num_steps, x_T64, order=1)
  np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
  if num_steps > 1:  # the corrector changes every step but the last
    assert np.abs(c - a).max() > 1e-4
  else:
    np.testing.assert_array_equal(c, a)


@pytest.mark.parametrize("num_steps", [2, 3, 7, 20])
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_predictor_is_dpm_solver_pp(x_T64, num_steps, lower_order_final):
  """UniP-2 with B(h) = 1 - e^{-h} is DPM-Solver++(2M), UniP-3 our DPM-Solver++(3M), warm-up and
  lowered final steps included."""
  with jax.enable_x64(True):
    for order in (2, 3):
      a = _run("unipc", num_steps, x_T64, order=order, variant="bh2", corrector=False,
               lower_order_final=lower_order_final)
      b = _run("dpm_solver", num_steps, x_T64, order=order, lower_order_final=lower_order_final)
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("num_steps", [3, 4])
def test_3m_lowers_its_final_steps_like_diffusers(x_T64, num_steps):
  """With lower_order_final, 3M's last step is first order and the one before at most second
  order: up to 4 steps (orders 1, 2, 1 / 1, 2, 2, 1) it is 2M with lower_order_final."""
  with jax.enable_x64(True):
    a = _run("dpm_solver", num_steps, x_T64, order=3)
    b = _run("dpm_solver", num_steps, x_T64, order=2)
    c = _run("dpm_solver", num_steps, x_T64, order=3, lower_order_final=False)
  np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
  assert np.abs(c - a).max() > 1e-4


def test_dpm_solver_order_two_is_the_default_and_order_one_is_ddim(x_T64):
  with jax.enable_x64(True):
    default, two = _run("dpm_solver", 6, x_T64), _run("dpm_solver", 6, x_T64, order=2)
    one, ddim = _run("dpm_solver", 6, x_T64, order=1), _run("ddim", 6, x_T64, time_grid="quadratic")
  np.testing.assert_array_equal(default, two)
  np.testing.assert_allclose(one, ddim, rtol=1e-10, atol=1e-12)


def test_step_orders_and_defaults():
  assert unipc.step_orders(5, 3, True).tolist() == [1, 2, 3, 2, 1]
  assert unipc.step_orders(5, 3, False).tolist() == [1, 2, 3, 3, 3]
  assert unipc.step_orders(2, 3, True).tolist() == [1, 1]
  info = lambda n, **o: sampling.get_sampler("unipc", VP, (3, 2), num_steps=n, **o).info
  assert info(14)["lower_order_final"] and not info(15)["lower_order_final"]
  d = info(10)
  assert (d["order"], d["variant"], d["corrector"], d["time_grid"]) == (3, "bh2", True, "quadratic")
  assert d["orders"].tolist() == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]


def test_phi_functions_and_weights():
  """phi_k against a quadrature of its integral; UniC/UniP weights integrate polynomials in l
  exactly: B(h) a solves sum_k (B a)_k r_k^{n-1} = n! h phi_{n+1}(-h)."""
  z = np.array([-30.0, -3.0, -1.0 - 1e-12, -0.999, -0.3, -1e-6, 0.0])
  for k in range(1, 5):
    # phi_k(z) = int_0^1 e^{(1 - s) z} s^{k-1} / (k-1)! ds by Gauss-Legendre quadrature
    s, w = np.polynomial.legendre.leggauss(60)
    s, w = 0.5 * (s + 1.0), 0.5 * w
    want = [np.sum(w * np.exp((1 - s) * zi) * s ** (k - 1)) / math.factorial(k - 1) for zi in z]
    np.testing.assert_allclose(unipc.phi(k, z), want, rtol=1e-12)
  h, nodes = 0.7, np.array([-0.8, -1.9, 1.0])
  Ba = unipc.unified_weights(nodes, h, "bh1")
  for n in range(1, 4):
    np.testing.assert_allclose(np.sum(Ba * nodes ** (n - 1)),
                               math.factorial(n) * h * unipc.phi(n + 1, -h), rtol=1e-12)
  np.testing.assert_allclose(Ba, unipc.unified_weights(nodes, h, "bh2"), rtol=1e-12)
  # A single unknown is set to 1/2: B(h) / 2, h (bh1) or 1 - e^{-h} (bh2).
  np.testing.assert_allclose(unipc.unified_weights(np.array([1.0]), h, "bh1"), [h / 2])
  np.testing.assert_allclose(unipc.unified_weights(np.array([1.0]), h, "bh2"),
                             [-np.expm1(-h) / 2])


# --- nfe, float32, determinism --------------------------------------------------------------------
CASES = [  # (sampler, options, nfe for num_steps n, SDEs)
    ("unipc", {}, lambda n: n, ("ve", "vp", "subvp")),
    ("unipc", dict(order=1, corrector=False), lambda n: n, ("vp",)),
    ("unipc", dict(order=2, variant="bh1", denoise=True), lambda n: n + 1, ("ve",)),
    ("unipc", dict(lower_order_final=False, time_grid="quadratic"), lambda n: n, ("subvp",)),
    ("dpm_solver", dict(order=3), lambda n: n, ("ve", "vp", "subvp")),
    ("dpm_solver", dict(order=3, denoise=True, lower_order_final=False), lambda n: n + 1, ("vp",)),
]
NFE_CASES = [(name, options, nfe_of, sde_name, n) for name, options, nfe_of, sdes in CASES
             for sde_name in sdes for n in (1, 2, 5)]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'defaults'}-{sde_name}-{n}"
       for name, o, _, sde_name, n in NFE_CASES]


@pytest.mark.parametrize("name,options,nfe_of,sde_name,num_steps", NFE_CASES, ids=IDS)
def test_nfe_exact_finite_and_pure_in_float32(name, options, nfe_of, sde_name, num_steps):
  sde = SDES[sde_name]
  sampler = sampling.get_sampler(name, sde, (3, 2), num_steps=num_steps, **options)
  score = CountingScore(GM.score_fn(sde))
  x_T = sde.prior_sampling(jax.random.PRNGKey(3), (3, 2))
  x, nfe = sampler(jax.random.PRNGKey(0), score, x_T)
  jax.effects_barrier()
  assert x.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(x)))
  assert nfe.dtype == jnp.int32 and int(nfe) == score.count == nfe_of(num_steps)
  assert sampler.info["nfe"] == nfe_of(num_steps)
  y, _ = sampler(jax.random.PRNGKey(1), score, x_T)  # deterministic: the key does not matter
  np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- hooks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,options", [("unipc", {}), ("unipc", dict(corrector=False)),
                                          ("unipc", dict(denoise=True)),
                                          ("dpm_solver", dict(order=3))])
@pytest.mark.parametrize("num_steps", [1, 4])
def test_hook_runs_once_after_every_update(name, options, num_steps):
  """UniPC's updates are the predictor (to t_1, ..., t_n) and the corrector (at t_1 .. t_{n-1}):
  2n - 1 hook calls, n without the corrector; 3M's n steps: n calls; one more at t = 0 after the
  denoising jump. Each call has a key of its own; the projection holds in the output."""
  sampler = sampling.get_sampler(name, VP, (8, 3), num_steps, **options)
  recorder = Recorder()
  x, nfe = sampler(jax.random.PRNGKey(0), GM3.score_fn(VP), hook=recorder)
  jax.effects_barrier()
  x = np.asarray(x)
  assert int(nfe) == sampler.info["nfe"]
  np.testing.assert_array_equal(x[:, 0], 0.0)
  assert np.all(np.isfinite(x)) and np.all(np.abs(x[:, 1:]) > 0)
  ts = np.asarray(sampler.info["ts"][1:], np.float32)
  corrected = name == "unipc" and options.get("corrector", True)
  expected = np.concatenate([np.repeat(ts[:-1], 2 if corrected else 1), ts[-1:]])
  if options.get("denoise"):
    expected = np.append(expected, 0.0)
  np.testing.assert_allclose(sorted(recorder.times, reverse=True), expected, rtol=1e-6)
  assert len(set(recorder.keys)) == len(expected)


@pytest.mark.parametrize("name,options", [("unipc", {}), ("dpm_solver", dict(order=3))])
def test_identity_hook_leaves_the_sampler_unchanged(name, options):
  sampler = sampling.get_sampler(name, VP, (8, 3), 6, **options)
  x_T = VP.prior_sampling(jax.random.PRNGKey(1), (8, 3))
  plain, _ = sampler(jax.random.PRNGKey(2), GM3.score_fn(VP), x_T)
  hooked, _ = sampler(jax.random.PRNGKey(2), GM3.score_fn(VP), x_T, hook=lambda x, t, key: x)
  np.testing.assert_allclose(np.asarray(hooked), np.asarray(plain), rtol=1e-6, atol=1e-6)


# --- options --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,options,match", [
    ("unipc", dict(order=4), r"order of UniPC must be one of \[1, 2, 3\], got 4"),
    ("unipc", dict(order=0), r"got 0"),
    ("unipc", dict(order=2.0), r"got 2\.0"),
    ("unipc", dict(order=True), r"got True"),
    ("unipc", dict(variant="bh3"),
     r"unknown UniPC variant 'bh3'; valid values are \['bh1', 'bh2'\]"),
    ("unipc", dict(corrector="yes"), r"corrector must be true or false, got 'yes'"),
    ("unipc", dict(lower_order_final="False"), r"lower_order_final must be .*got 'False'"),
    ("unipc", dict(time_grid="karras"), r"'karras'.*valid values are .*'log_rho'"),
    ("unipc", dict(eps=0.0), r"eps.*0\.0"),
    ("unipc", dict(solver_type="bh1"), r"\['solver_type'\].*valid options are .*'variant'"),
    ("dpm_solver", dict(order=4), r"order of DPM-Solver\+\+ must be one of \[1, 2, 3\], got 4"),
    ("dpm_solver", dict(order="3"), r"got '3'"),
])
def test_bad_options_raise_naming_the_value(name, options, match):
  with pytest.raises(InputError, match=match):
    sampling.get_sampler(name, VP, (3, 2), num_steps=4, **options)


def test_every_time_grid_builds():
  from sgm_jax.sampling import schedules
  for grid in sorted(schedules.TIME_GRIDS):
    sampler = sampling.get_sampler("unipc", SDES["ve"], (3, 2), num_steps=12, time_grid=grid)
    assert sampler.info["time_grid"] == grid and sampler.info["nfe"] == 12
