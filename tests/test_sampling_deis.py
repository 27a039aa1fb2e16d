"""DEIS (tAB, rhoAB, rhoRK) and iPNDM: coefficients, options, nfe, and convergence order measured
on the digits Gaussian-mixture oracle against the exact probability-flow map (float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate

import oracle_flow
from sgm_jax import sde_lib
from sgm_jax.sampling import deis_coefficients as dc
from sgm_jax.sampling import get_sampler, schedules

B = 8
SHAPE = (B, 8, 8, 1)


pytestmark = pytest.mark.usefixtures("fast_compiles")


def _to_float64(gm):
  return jax.tree_util.tree_map(
      lambda a: jnp.asarray(a, jnp.float64) if a.dtype.kind == "f" else a, gm)


# --- host-side coefficients ----------------------------------------------------------------------

ALL_SDES = [sde_lib.VPSDE(), sde_lib.subVPSDE(), sde_lib.VESDE(), sde_lib.TutorialSDE()]


@pytest.mark.parametrize("sde", ALL_SDES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("num_steps", [1, 7, 200])
def test_tab_coefficients_sum_to_the_exponential_integrator_step(sde, num_steps):
  # Lagrange bases sum to one, so for every order sum_j C_kj is the integral for constant eps,
  # which is exact in y = x / alpha: alpha_{k+1} (rho_{k+1} - rho_k). The coefficients are
  # integrals in rho too, so this checks the quadrature and the bases, not the SDE: its g against
  # alpha and sigma is checked by test_tab_coefficients_equal_the_integral_in_t_with_g.
  ts = schedules.get_time_grid("quadratic", sde, num_steps, sde.default_sampling_eps)
  coef = dc.sde_coefficients(sde, ts)
  ddim = coef["alpha"][1:] * (coef["rho"][1:] - coef["rho"][:-1])
  for order in range(4):
    psi, C = dc.exponential_ab_coefficients(sde, ts, order)
    np.testing.assert_allclose(psi, coef["alpha"][1:] / coef["alpha"][:-1], rtol=1e-14)
    np.testing.assert_allclose(C.sum(axis=1), ddim, rtol=1e-11)
    if order == 0:
      np.testing.assert_allclose(C[:, 0], ddim, rtol=1e-11)
    # Warm-up: step k uses only min(order, k) + 1 evaluations.
    for k in range(min(order, num_steps)):
      assert np.all(C[k, k + 1:] == 0.0)


def _lagrange(tau, nodes, j):
  others = np.delete(nodes, j)
  return np.prod([(tau - m) / (nodes[j] - m) for m in others], axis=0)


def _tab_coefficients_in_t(sde, ts, order, num_nodes=64):
  """The tAB integral in t, with g: C_kj = int_{t_k}^{t_{k+1}} alpha_{k+1} / alpha(tau)
  g(tau)^2 / (2 sigma(tau)) ell_kj(tau) dtau by Gauss-Legendre in u = sqrt(tau) (the integrand is
  analytic in u on the smooth SDEs). What the library computed before it integrated in log rho."""
  coef = dc.sde_coefficients(sde, ts)
  x, w = np.polynomial.legendre.leggauss(num_nodes)
  C = np.zeros((ts.size - 1, order + 1))
  for k in range(ts.size - 1):
    u0, u1 = np.sqrt(ts[k]), np.sqrt(ts[k + 1])
    u = 0.5 * (u0 + u1) + 0.5 * (u1 - u0) * x
    at = dc.sde_coefficients(sde, u ** 2)
    weight = (coef["alpha"][k + 1] / at["alpha"] * at["g"] ** 2 / (2.0 * at["sigma"])
              * 2.0 * u * 0.5 * (u1 - u0) * w)
    nodes = ts[k - np.arange(min(order, k) + 1)]
    for j in range(nodes.size):
      C[k, j] = np.sum(_lagrange(u ** 2, nodes, j) * weight)
  return coef["alpha"][1:] / coef["alpha"][:-1], C


@pytest.mark.parametrize("sde", ALL_SDES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("num_steps", [1, 10, 50])
def test_tab_coefficients_equal_the_integral_in_t_with_g(sde, num_steps):
  # The library integrates alpha_{k+1} ell_kj(t(rho)) drho, which equals the integral in t with
  # g^2 / (2 sigma alpha) dt only if g^2 = d sigma^2 / dt - 2 f sigma^2: a wrong g, alpha, sigma or
  # t_from_rho of the SDE breaks the equality. It holds to round-off, so tAB-DEIS on these SDEs is
  # what it was when it integrated in t.
  ts = schedules.get_time_grid("quadratic", sde, num_steps, sde.default_sampling_eps)
  for order in range(4):
    psi, C = dc.exponential_ab_coefficients(sde, ts, order)
    psi_t, C_t = _tab_coefficients_in_t(sde, ts, order)
    np.testing.assert_array_equal(psi, psi_t)
    scale = np.abs(C_t).max(axis=1, keepdims=True)
    np.testing.assert_array_less(np.abs(C - C_t) / scale, 1e-12)


@pytest.mark.parametrize("sde", ALL_SDES[:3], ids=lambda s: type(s).__name__)
def test_tab_samples_equal_those_of_the_integral_in_t(small_oracle, sde, monkeypatch):
  """DEIS tAB3 (the default) on the oracle in float64, 10 steps: the same samples to 1e-12 with the
  coefficients integrated in t with g (the library's method before)."""
  with jax.enable_x64(True):
    gm = _to_float64(small_oracle)
    x_T = sde.prior_sampling(jax.random.PRNGKey(5), SHAPE).astype(jnp.float64)
    x, _ = get_sampler("deis", sde, SHAPE, num_steps=10)(jax.random.PRNGKey(0), gm.score_fn(sde),
                                                          x_T)
    monkeypatch.setattr(dc, "exponential_ab_coefficients", _tab_coefficients_in_t)
    x_t, _ = get_sampler("deis", sde, SHAPE, num_steps=10)(jax.random.PRNGKey(0),
                                                            gm.score_fn(sde), x_T)
  x, x_t = np.asarray(x), np.asarray(x_t)
  assert x.dtype == np.float64 and np.all(np.isfinite(x))
  assert np.abs(x - x_t).max() <= 1e-12 * np.abs(x_t).max()


@pytest.mark.parametrize("interpolation, tol", [("cubic", 1e-7), ("linear", 3e-5)])
def test_tab_coefficients_on_a_discrete_schedule(interpolation, tol):
  # beta(t) of a DDPM schedule has a kink (cubic) or a jump (linear) at every training step k / N,
  # so t(rho) is only piecewise smooth and Gauss-Legendre in log rho converges algebraically. The
  # reference integrates in t with g, split at every training step (smooth pieces, 8 nodes each).
  from sgm_jax.discrete_schedule import DiscreteVPSchedule
  sde = DiscreteVPSchedule.from_sde(sde_lib.VPSDE(), 1000, interpolation=interpolation)
  ts = schedules.get_time_grid("quadratic", sde, 20, sde.default_sampling_eps)
  _, C = dc.exponential_ab_coefficients(sde, ts, 3)
  coef = dc.sde_coefficients(sde, ts)
  x, w = np.polynomial.legendre.leggauss(8)
  for k in range(ts.size - 1):
    knots = np.arange(np.ceil(ts[k + 1] * sde.N), np.floor(ts[k] * sde.N) + 1) / sde.N
    ends = np.unique(np.concatenate([[ts[k + 1]], knots, [ts[k]]]))
    lo, hi = ends[:-1, None], ends[1:, None]
    tau = (0.5 * (lo + hi) + 0.5 * (hi - lo) * x).ravel()
    at = dc.sde_coefficients(sde, tau)
    weight = (coef["alpha"][k + 1] / at["alpha"] * at["g"] ** 2 / (2.0 * at["sigma"])
              * (0.5 * (hi - lo) * w).ravel())
    nodes = ts[k - np.arange(min(3, k) + 1)]
    want = np.array([-np.sum(_lagrange(tau, nodes, j) * weight) for j in range(nodes.size)])
    np.testing.assert_allclose(C[k, :nodes.size], want, rtol=0, atol=tol * np.abs(want).max())
  ddim = coef["alpha"][1:] * (coef["rho"][1:] - coef["rho"][:-1])
  np.testing.assert_allclose(C.sum(axis=1), ddim, rtol=1e-12)


def test_tab_rejects_a_wrong_t_from_rho():
  class HalfTime(sde_lib.VESDE):
    def t_from_rho(self, rho):
      return 0.5 * super().t_from_rho(rho)
  sde = HalfTime()
  ts = schedules.get_time_grid("uniform", sde, 5, 1e-5)
  with pytest.raises(ValueError, match="t_from_rho"):
    dc.exponential_ab_coefficients(sde, ts, 2)


def test_tab_coefficients_against_scipy_quad_with_closed_form_vp_integrand():
  # Independent of sde_lib and of the Gauss-Legendre rule: VP's beta, B(t), alpha, sigma by hand.
  b0, b1 = 0.1, 20.0
  integrated = lambda t: b0 * t + 0.5 * (b1 - b0) * t ** 2
  sde = sde_lib.VPSDE(beta_min=b0, beta_max=b1)
  ts = schedules.get_time_grid("quadratic", sde, 6, 1e-3)
  _, C = dc.exponential_ab_coefficients(sde, ts, 3)
  for k in range(6):
    nodes = ts[k - np.arange(min(3, k) + 1)]
    for j in range(nodes.size):
      def integrand(tau):
        # psi = alpha(t_{k+1}) / alpha(tau)
        psi = np.exp(-0.5 * (integrated(ts[k + 1]) - integrated(tau)))
        sigma = np.sqrt(-np.expm1(-integrated(tau)))
        return psi * (b0 + tau * (b1 - b0)) / (2.0 * sigma) * _lagrange(tau, nodes, j)
      value, _ = scipy.integrate.quad(integrand, ts[k + 1], ts[k], epsabs=0.0, epsrel=1e-13,
                                      limit=200)
      np.testing.assert_allclose(C[k, j], -value, rtol=1e-9, atol=1e-14)


def test_tab_coefficients_against_scipy_quad_ve():
  smin, smax = 0.01, 50.0
  sde = sde_lib.VESDE(sigma_min=smin, sigma_max=smax)
  ts = schedules.get_time_grid("uniform", sde, 5, 1e-5)
  _, C = dc.exponential_ab_coefficients(sde, ts, 2)
  log_r = np.log(smax / smin)
  for k in range(5):
    nodes = ts[k - np.arange(min(2, k) + 1)]
    for j in range(nodes.size):
      # psi = 1, g^2 / (2 sigma) = sigma(tau) log(smax / smin).
      value, _ = scipy.integrate.quad(
          lambda tau: smin * np.exp(tau * log_r) * log_r * _lagrange(tau, nodes, j),
          ts[k + 1], ts[k], epsabs=0.0, epsrel=1e-13)
      np.testing.assert_allclose(C[k, j], -value, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_rhoab_coefficients_integrate_polynomials_in_rho_exactly(order):
  sde = sde_lib.VPSDE()
  ts = schedules.get_time_grid("quadratic", sde, 9, 1e-3)
  coef = dc.sde_coefficients(sde, ts)
  rho, alpha = coef["rho"], coef["alpha"]
  _, C = dc.rho_ab_coefficients(sde, ts, order)
  for k in range(9):
    history = rho[k - np.arange(min(order, k) + 1)]
    for m in range(history.size):  # rho^m, m <= degree available at step k
      exact = (rho[k + 1] ** (m + 1) - rho[k] ** (m + 1)) / (m + 1)
      approx = C[k, :history.size] @ history ** m / alpha[k + 1]
      np.testing.assert_allclose(approx, exact, rtol=1e-9)


def test_ipndm_equals_rhoab3_on_a_grid_uniform_in_rho():
  # The fixed AB weights are those of equal steps, so with equal steps in rho iPNDM is rhoAB3,
  # warm-up included.
  sde = sde_lib.VESDE(sigma_min=0.2, sigma_max=2.0)
  ts = schedules.get_time_grid("polynomial_rho", sde, 12, 1e-5, order=1.0)
  psi_i, C_i = dc.ipndm_coefficients(sde, ts, 4)
  psi_r, C_r = dc.rho_ab_coefficients(sde, ts, 3)
  np.testing.assert_allclose(psi_i, psi_r, rtol=1e-14)
  np.testing.assert_allclose(C_i, C_r, rtol=1e-8, atol=1e-15)


def test_ipndm_takes_the_actual_steps_weights_only_where_its_steps_are_unequal():
  """max_step_ratio: steps whose window of rho steps differs by more than the ratio get rhoAB's
  weights of the same order, the others keep the fixed ones; inf is the classical iPNDM."""
  sde = sde_lib.VPSDE()
  ts = schedules.get_time_grid("quadratic", sde, 10, 1e-3)
  rho = dc.sde_coefficients(sde, ts)["rho"]
  unequal = dc.unequal_steps(rho, 4, 16.0)
  h = np.abs(np.diff(rho))
  for k in range(h.size):  # the window's ratios, written out
    past = h[max(0, k - 3):k]
    assert unequal[k] == any(max(p / h[k], h[k] / p) > 16.0 for p in past), k
  assert 0 < unequal.sum() < h.size  # this grid has both kinds
  _, C_fixed = dc.ipndm_coefficients(sde, ts, 4)
  _, C_mixed = dc.ipndm_coefficients(sde, ts, 4, 16.0)
  _, C_rhoab = dc.rho_ab_coefficients(sde, ts, 3)
  np.testing.assert_array_equal(C_mixed[~unequal], C_fixed[~unequal])
  np.testing.assert_array_equal(C_mixed[unequal], C_rhoab[unequal])
  with pytest.raises(ValueError, match="max_step_ratio of iPNDM must be a number >= 1"):
    get_sampler("ipndm", sde, SHAPE, num_steps=5, max_step_ratio=0.5)


def test_ipndm_stays_in_the_data_range_with_a_model_like_error():
  """A network's eps error, here 0.1 sin(4 x + 7 t) (smooth in x and t), through iPNDM's fixed
  equal-step weights on 5 and 10 steps of the quadratic grid, whose rho steps shrink 3-300x from
  one step to the next: the weights extrapolate eps differences across noise levels far apart
  and throw samples to |x| ~ 10 (measured: 85 % / 31 % of pixels beyond 1.1, max 10.6 / 2.8).
  The default takes the actual steps' weights there (max_step_ratio 16): max 1.24 / 1.40. The
  mixture (means in [-1, 1], std 0.1) itself has no pixel beyond 1.6."""
  gm = oracle_flow.digits_oracle()
  sde = sde_lib.VPSDE()
  exact = gm.score_fn(sde)

  def model_like(x, t):
    t = t.reshape((-1,) + (1,) * (x.ndim - 1))
    return exact(x, t.reshape(-1)) - 0.1 * jnp.sin(4.0 * x + 7.0 * t) / sde.sigma(t)

  shape = (128,) + gm.means.shape[1:]
  for num_steps in (5, 10):
    beyond = {}
    for ratio in (float("inf"), None):
      options = {} if ratio is None else dict(max_step_ratio=ratio)
      sampler = get_sampler("ipndm", sde, shape, num_steps=num_steps, **options)
      x, _ = jax.jit(lambda k: sampler(k, model_like))(jax.random.PRNGKey(0))
      beyond[ratio] = float(np.mean(np.abs(np.asarray(x)) > 1.6))
    assert beyond[None] < 1e-3 and beyond[float("inf")] > 0.02, (num_steps, beyond)


def test_rk_stage_times_map_back_to_the_stage_rho():
  sde = sde_lib.subVPSDE()
  ts = schedules.get_time_grid("quadratic", sde, 5, 1e-3)
  stages = dc.rk_stages(sde, ts, "rk4")
  rho = dc.sde_coefficients(sde, ts)["rho"]
  c = np.asarray(dc.RK_TABLEAUS["rk4"][0])
  want = rho[:-1, None] + c[None, :] * stages["h"][:, None]
  np.testing.assert_allclose(dc.sde_coefficients(sde, stages["t"])["rho"], want, rtol=1e-10)
  np.testing.assert_array_equal(stages["t"][:, 0], ts[:-1])
  np.testing.assert_array_equal(stages["t"][:, -1], ts[1:])


# --- options and degenerate grids ----------------------------------------------------------------

def test_duplicate_or_degenerate_time_points_raise():
  sde = sde_lib.VPSDE()
  ts = np.array([1.0, 0.5, 0.5, 0.1])
  for fn in (lambda: dc.exponential_ab_coefficients(sde, ts, 2),
             lambda: dc.rho_ab_coefficients(sde, ts, 2),
             lambda: dc.ipndm_coefficients(sde, ts, 4),
             lambda: dc.rk_stages(sde, ts, "heun")):
    with pytest.raises(ValueError, match="strictly decreasing"):
      fn()
  with pytest.raises(ValueError, match="strictly decreasing"):
    dc.check_grid(sde, np.array([1.0, 0.2, 0.5]))
  with pytest.raises(ValueError):
    dc.check_grid(sde, np.array([1.0, np.nan, 0.1]))
  # eps >= T, and a grid too fine for float64 (duplicate points).
  for eps in (1.0, 2.0, 0.0, -1.0, float("nan")):
    with pytest.raises(ValueError, match="eps"):
      get_sampler("deis", sde, SHAPE, num_steps=10, eps=eps)
  with pytest.raises(ValueError, match="strictly decreasing"):
    get_sampler("deis", sde, SHAPE, num_steps=50, eps=1.0 - 1e-15)
  with pytest.raises(ValueError, match="strictly decreasing"):
    get_sampler("ipndm", sde, SHAPE, num_steps=50, eps=1.0 - 1e-15, time_grid="uniform")


@pytest.mark.parametrize("name, options, match", [
    ("deis", dict(solver="tab"), "valid options are"),
    ("deis", dict(method="euler"), "valid values are"),
    ("deis", dict(order=4), r"\[0, 1, 2, 3\]"),
    ("deis", dict(order=-1), r"\[0, 1, 2, 3\]"),
    ("deis", dict(order=2.0), r"\[0, 1, 2, 3\]"),
    ("deis", dict(order=True), r"\[0, 1, 2, 3\]"),
    ("deis", dict(method="rhoab", order=5), r"\[0, 1, 2, 3\]"),
    ("deis", dict(method="rhork", tableau="rk5"), "valid values are"),
    ("deis", dict(method="rhork", order=2), "tableau"),
    ("deis", dict(method="tab", tableau="rk4"), "rhork"),
    ("deis", dict(time_grid="cosine"), "valid values are"),
    ("deis", dict(time_grid="quadratic", grid_order=3), "grid_order"),
    ("deis", dict(time_grid="polynomial_t", grid_order=0), "grid_order"),
    ("ipndm", dict(order=0), r"\[1, 2, 3, 4\]"),
    ("ipndm", dict(order=5), r"\[1, 2, 3, 4\]"),
    ("ipndm", dict(method="tab"), "valid options are"),
])
def test_bad_options_raise_listing_valid_values(name, options, match):
  with pytest.raises(ValueError, match=match):
    get_sampler(name, sde_lib.VPSDE(), SHAPE, num_steps=10, **options)


@pytest.mark.parametrize("grid", sorted(schedules.TIME_GRIDS))
def test_every_time_grid_builds(grid):
  sde = sde_lib.VESDE()
  sampler = get_sampler("deis", sde, SHAPE, num_steps=12, time_grid=grid)
  assert sampler.info["time_grid"] == grid and sampler.info["nfe"] == 12
  options = dict(grid_order=3) if grid in ("polynomial_t", "polynomial_rho") else {}
  get_sampler("deis", sde, SHAPE, num_steps=12, method="rhork", time_grid=grid, **options)


# --- running samplers ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_oracle():
  return oracle_flow.digits_oracle(num_images=16)


def test_nfe_counted_at_run_time(small_oracle):
  sde = sde_lib.VPSDE()
  calls = []

  def score_fn(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return small_oracle.score(x, sde, t)

  x_T = sde.prior_sampling(jax.random.PRNGKey(1), SHAPE)
  for name, options, num_steps, want in [("deis", dict(method="tab"), 5, 5),
                                         ("deis", dict(method="rhork", tableau="rk4"), 3, 12),
                                         ("ipndm", {}, 4, 4)]:
    calls.clear()
    sampler = get_sampler(name, sde, SHAPE, num_steps=num_steps, **options)
    x, nfe = sampler(jax.random.PRNGKey(0), score_fn, x_T)
    jax.block_until_ready(x)
    jax.effects_barrier()
    assert nfe.dtype == jnp.int32 and int(nfe) == want == len(calls) == sampler.info["nfe"]


FLOAT32_CASES = [(sde, "deis", {}, n) for sde in ("vp", "subvp", "ve") for n in (1, 2, 1000)] + [
    ("ve", "deis", dict(method="rhork"), 1), ("ve", "deis", dict(method="rhork"), 1000),
    ("subvp", "deis", dict(method="rhoab"), 1000), ("vp", "ipndm", {}, 1000),
]
FLOAT32_SDES = {"vp": sde_lib.VPSDE(), "subvp": sde_lib.subVPSDE(), "ve": sde_lib.VESDE()}


@pytest.mark.parametrize("case, name, options, num_steps", FLOAT32_CASES)
def test_float32_finite_and_deterministic(small_oracle, case, name, options, num_steps):
  sde = FLOAT32_SDES[case]
  sampler = get_sampler(name, sde, SHAPE, num_steps=num_steps, **options)
  score_fn = small_oracle.score_fn(sde)
  x_T = sde.prior_sampling(jax.random.PRNGKey(3), SHAPE)
  x, nfe = sampler(jax.random.PRNGKey(0), score_fn, x_T)
  assert x.dtype == jnp.float32 and x.shape == SHAPE
  assert np.all(np.isfinite(np.asarray(x)))
  assert int(nfe) == sampler.info["nfe"]
  # A pure function of x_T: the key does not matter, and a second call repeats it bit for bit.
  x_again, _ = sampler(jax.random.PRNGKey(7), score_fn, x_T)
  np.testing.assert_array_equal(np.asarray(x), np.asarray(x_again))
  if num_steps == 2 and case == "vp":
    # x_T = None draws from the prior with the key (another program: equal up to rounding).
    a, _ = sampler(jax.random.PRNGKey(3), score_fn)
    b, _ = sampler(jax.random.PRNGKey(4), score_fn)
    np.testing.assert_allclose(np.asarray(a), np.asarray(x), rtol=1e-3, atol=1e-3)
    assert not np.allclose(np.asarray(a), np.asarray(b))
  if num_steps == 1000:
    # Many steps land close to the exact flow; denoised samples lie near the data range.
    assert float(np.abs(np.asarray(x)).max()) < 3.0


# --- convergence order on the oracle (float64) ---------------------------------------------------

CONVERGENCE_SDES = {  # name -> (SDE, eps)
    "vp": (sde_lib.VPSDE(), 1e-2),
    "subvp": (sde_lib.subVPSDE(), 1e-2),
    "ve": (sde_lib.VESDE(), 1e-5),
}

# (sampler, SDE, options, step counts, theory order, evaluations per step). Step counts are where
# the error is asymptotic on this oracle (measured orders in the comments). Multistep methods warm
# up with lower orders at t = T, where eps is almost constant because alpha(T) or 1 / sigma(T) is
# small. iPNDM's fixed equal-step weights are used on grids that are not uniform in rho: the
# consistency of the 3rd/4th-order terms is lost and its order is 2 (rhoAB3 is what it is on a
# grid uniform in rho, see test_ipndm_equals_rhoab3_on_a_grid_uniform_in_rho).
CONVERGENCE = {
    "tab0-vp": ("deis", "vp", dict(method="tab", order=0), (80, 160, 320), 1, 1),  # 1.00
    "tab1-vp": ("deis", "vp", dict(method="tab", order=1), (80, 160, 320), 2, 1),  # 1.96
    "tab2-vp": ("deis", "vp", dict(method="tab", order=2), (80, 160, 320), 3, 1),  # 2.93
    "tab3-vp": ("deis", "vp", dict(method="tab", order=3), (80, 160, 320), 4, 1),  # 3.85
    "tab2-subvp": ("deis", "subvp", dict(order=2), (40, 80, 160), 3, 1),  # 2.97
    "tab2-ve": ("deis", "ve", dict(order=2, time_grid="uniform"), (80, 160, 320), 3, 1),  # 2.98
    "rhoab1-vp": ("deis", "vp", dict(method="rhoab", order=1), (80, 160, 320), 2, 1),  # 1.95
    "rhoab2-vp": ("deis", "vp", dict(method="rhoab", order=2), (80, 160, 320), 3, 1),  # 2.90
    "heun-vp": ("deis", "vp", dict(method="rhork", tableau="heun"), (10, 20, 40), 2, 2),  # 2.04
    "kutta3-vp": ("deis", "vp", dict(method="rhork", tableau="kutta3"), (20, 40, 80), 3, 3),  # 3.03
    "rk4-vp": ("deis", "vp", dict(method="rhork", tableau="rk4"), (10, 20, 40), 4, 4),  # 4.01
    "ipndm-vp": ("ipndm", "vp", {}, (40, 80, 160), 2, 1),  # 2.10
}


@pytest.fixture(scope="module")
def flow_reference():
  """(oracle, x_T, exact x at eps) per SDE, each computed once."""
  with jax.enable_x64(True):
    gm = _to_float64(oracle_flow.digits_oracle())
  cache = {}

  def get(case):
    if case not in cache:
      sde, eps = CONVERGENCE_SDES[case]
      with jax.enable_x64(True):
        x_T = sde.prior_sampling(jax.random.PRNGKey(0), SHAPE).astype(jnp.float64)
        cache[case] = (x_T, oracle_flow.exact_flow_map(gm, sde, x_T, sde.T, eps, tol=1e-11))
    return gm, cache[case]

  return get


def measured_order(num_steps, errors) -> float:
  """Least-squares slope of -log(error) against log(num_steps)."""
  return -np.polyfit(np.log(num_steps), np.log(errors), 1)[0]


@pytest.mark.parametrize("case_id", sorted(CONVERGENCE))
def test_convergence_order(flow_reference, case_id):
  name, case, options, steps, theory, per_step = CONVERGENCE[case_id]
  sde, eps = CONVERGENCE_SDES[case]
  gm, (x_T, exact) = flow_reference(case)
  errors = []
  with jax.enable_x64(True):
    for n in steps:
      sampler = get_sampler(name, sde, SHAPE, num_steps=n, eps=eps, **options)
      x, nfe = sampler(jax.random.PRNGKey(0), gm.score_fn(sde), x_T)
      assert x.dtype == jnp.float64 and int(nfe) == per_step * n
      errors.append(float(np.sqrt(np.mean((np.asarray(x) - exact) ** 2))))
  order = measured_order(steps, errors)
  print(f"{case_id}: errors {errors}, measured order {order:.2f} (theory {theory})")
  assert np.all(np.diff(errors) < 0), errors
  assert abs(order - theory) < 0.3, (order, errors)
