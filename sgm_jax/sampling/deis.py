"""DEIS: Diffusion Exponential Integrator Samplers (Zhang & Chen, ICLR 2023), and iPNDM.

All variants integrate the probability-flow ODE written with the noise prediction
eps_theta(x, t) = -sigma(t) score(x, t), from t = T to t = eps:
  - 'tab'   tAB-DEIS: exponential integrator in t, eps extrapolated by a Lagrange polynomial in t
            through the last r + 1 evaluations; order 0 is DDIM.
  - 'rhoab' rhoAB-DEIS: Adams-Bashforth with Lagrange polynomials in rho = sigma / alpha for
            dy/drho = eps_theta, y = x / alpha.
  - 'rhork' rhoRK-DEIS: an explicit Runge-Kutta tableau (heun, kutta3, rk4) for dy/drho = eps_theta.
  - iPNDM (sampler 'ipndm'): like rhoAB, with the fixed equal-step Adams-Bashforth weights.
Multistep variants warm up with lower orders (fewer past evaluations) and use one score evaluation
per step; rhoRK uses one per stage. Coefficients are computed once on the host in float64
(`deis_coefficients`); the device loop is one lax.scan. With the option denoise, a final Tweedie
step at eps follows (one more evaluation).
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax.errors import InputError, check_positive
from sgm_jax.sampling import base, schedules
from sgm_jax.sampling import deis_coefficients as dc
from sgm_jax.sde_lib import SDE, batch_expand, batch_times

Array = jax.Array

DEIS_METHODS = ("tab", "rhoab", "rhork")
DEFAULT_ORDER = 3  # DEIS recommends third-order tAB (tAB3) for few steps
DEFAULT_TABLEAU = "kutta3"  # the DEIS reference code's default rhoRK method
DEFAULT_TIME_GRID = "quadratic"  # DEIS's default: quadratic in t
GRIDS_WITH_ORDER = ("polynomial_t", "polynomial_rho")
# iPNDM's fixed weights where the rho steps they combine are within this factor of each other:
# on the quadratic grid that keeps 20+ steps the classical iPNDM (its windows' ratios stay below
# 15) and gives 5-10 steps the actual steps' weights where the ratios reach 20-300x (README,
# "iPNDM on unequal steps").
DEFAULT_MAX_STEP_RATIO = 16.0


def _time_grid(sde: SDE, num_steps: int, time_grid, grid_order: Optional[float],
               eps: Optional[float]) -> np.ndarray:
  """The named grid (schedules.TIME_GRIDS) to eps (default: the SDE's), or an explicit one."""
  if not isinstance(time_grid, str):
    if grid_order is not None:
      raise InputError("grid_order is an option of named time grids, not of an explicit one")
    ts = base.sampling_grid(sde, time_grid, num_steps, eps)
    dc.check_grid(sde, ts)
    return ts
  eps = sde.default_sampling_eps if eps is None else eps
  base.check_choice("time_grid", time_grid, schedules.TIME_GRIDS)
  grid_options = {}
  if grid_order is not None:
    if time_grid not in GRIDS_WITH_ORDER:
      raise InputError(f"grid_order is an option of the time grids {list(GRIDS_WITH_ORDER)}, "
                       f"not of {time_grid!r}")
    grid_options["order"] = check_positive("grid_order", grid_order)
  if not dc.is_positive_number(eps) or not eps < sde.T:
    raise InputError(f"eps must lie in (0, T={sde.T}), got {eps!r}")
  ts = schedules.get_time_grid(time_grid, sde, num_steps, float(eps), **grid_options)
  dc.check_grid(sde, ts)
  return ts


def _eps_fn(score_fn, sigma: Array, x: Array, t: Array) -> Array:
  """eps_theta(x, t) = -sigma(t) score(x, t)."""
  return -batch_expand(sigma, x) * score_fn(x, t)


def _sampler(name: str, shape: tuple, ts: np.ndarray, run, info: dict,
             denoise: bool) -> base.Sampler:
  """The Sampler of `run`; get_sampler adds the final Tweedie step at eps = ts[-1] with denoise."""
  info.update(denoise=denoise, nfe=info["nfe"] + int(denoise), t_end=float(ts[-1]))
  return base.Sampler(name, shape, run, info)


def _multistep_run(sde: SDE, shape: tuple, ts: np.ndarray, psi: np.ndarray, C: np.ndarray):
  """x_{k+1} = psi_k x_k + sum_j C_kj eps_{k-j}: one scan, one score evaluation per step."""
  sigma = dc.sde_coefficients(sde, ts)["sigma"][:-1]
  history = C.shape[1] - 1  # past evaluations kept besides the current one

  def run(key, score_fn, x_T, hook=None):
    x = sde.prior_sampling(key, shape) if x_T is None else x_T
    dtype = x.dtype
    time = jnp.result_type(float)
    steps = (jnp.asarray(ts[:-1], time), jnp.asarray(sigma, dtype), jnp.asarray(psi, dtype),
             jnp.asarray(C, dtype), jnp.arange(len(ts) - 1), jnp.asarray(ts[1:], time))

    def step(carry, coef):
      x, past, nfe = carry
      t, sigma_t, psi_k, C_k, k, s = coef
      eps = _eps_fn(score_fn, sigma_t, x, batch_times(t, x)).astype(dtype)
      evals = jnp.concatenate([eps[None], past], axis=0)  # eps_k, eps_{k-1}, ..., eps_{k-r}
      x = psi_k * x + jnp.tensordot(C_k, evals, axes=1)  # tAB/rhoAB-DEIS, iPNDM update
      return (base.apply_hook(hook, key, x, s, k), evals[:history], nfe + 1), None

    past = jnp.zeros((history,) + shape, dtype)
    (x, _, nfe), _ = jax.lax.scan(step, (x, past, jnp.zeros((), jnp.int32)), steps)
    return x, nfe

  return run


def _rk_run(sde: SDE, shape: tuple, ts: np.ndarray, tableau: str):
  """rhoRK-DEIS: y = x / alpha, dy/drho = eps_theta(alpha y, t(rho)) by explicit Runge-Kutta.

  The tableau is data: stages run in an inner scan, so the score is traced once.
  """
  _, a, b = dc.RK_TABLEAUS[tableau]
  num_stages = len(b)
  A = np.zeros((num_stages, num_stages))
  for s, row in enumerate(a):
    A[s, :len(row)] = row
  stages = dc.rk_stages(sde, ts, tableau)
  alpha_grid = dc.sde_coefficients(sde, ts)["alpha"]  # alpha(t_k), for a hook on x = alpha y

  def run(key, score_fn, x_T, hook=None):
    x = sde.prior_sampling(key, shape) if x_T is None else x_T
    dtype = x.dtype
    steps = tuple(jnp.asarray(stages[k], jnp.result_type(float) if k == "t" else dtype)
                  for k in ("h", "t", "alpha", "sigma"))
    A_, b_ = jnp.asarray(A, dtype), jnp.asarray(b, dtype)

    def step(carry, coef):
      y, nfe = carry
      h, t, alpha, sigma = coef

      def stage(inner, per_stage):
        K, nfe = inner
        s, a_s, t_s, alpha_s, sigma_s = per_stage
        y_s = y + h * jnp.tensordot(a_s, K, axes=1)  # y_k + h sum_l a_sl K_l
        K_s = _eps_fn(score_fn, sigma_s, alpha_s * y_s, batch_times(t_s, y_s))
        return (K.at[s].set(K_s.astype(dtype)), nfe + 1), None

      K = jnp.zeros((num_stages,) + shape, dtype)
      (K, nfe), _ = jax.lax.scan(stage, (K, nfe),
                                 (jnp.arange(num_stages), A_, t, alpha, sigma))
      return (y + h * jnp.tensordot(b_, K, axes=1), nfe), None

    alpha_ts = jnp.asarray(alpha_grid, dtype)
    time_ts = jnp.asarray(ts, jnp.result_type(float))

    def hooked_step(carry, coef):  # the same step carrying x = alpha y, with the hook at t_{k+1}
      x, nfe, k = carry
      (y, nfe), _ = step((x / alpha_ts[k], nfe), coef)
      x = base.apply_hook(hook, key, alpha_ts[k + 1] * y, time_ts[k + 1], k)
      return (x, nfe, k + 1), None

    if hook is not None:
      zero = jnp.zeros((), jnp.int32)
      (x, nfe, _), _ = jax.lax.scan(hooked_step, (x, zero, zero), steps)
      return x, nfe
    y = x / jnp.asarray(stages["alpha_start"], dtype)
    (y, nfe), _ = jax.lax.scan(step, (y, jnp.zeros((), jnp.int32)), steps)
    return jnp.asarray(stages["alpha_end"], dtype) * y, nfe

  return run


def build_deis_sampler(sde: SDE, shape: tuple, num_steps: int, **options: Any) -> base.Sampler:
  """DEIS (Zhang & Chen, ICLR 2023) for the probability-flow ODE of `sde`.

  Options: method 'tab' (default) | 'rhoab' | 'rhork'; order 0..3 for tab/rhoab (default 3: the
  Lagrange polynomial degree r, global order r + 1); tableau 'heun' | 'kutta3' (default) | 'rk4'
  for rhork; time_grid one of schedules.TIME_GRIDS (default 'quadratic'); grid_order for the
  'polynomial_t' and 'polynomial_rho' grids; eps (default sde.default_sampling_eps); denoise
  (default False: final Tweedie step at eps, one more evaluation).
  """
  base.check_options("deis", options,
                     ("method", "order", "tableau", "time_grid", "grid_order", "eps", "denoise"),
                     generic=base.GENERIC_OPTIONS)
  denoise = base.bool_option(options, "denoise")
  method = options.get("method", "tab")
  base.check_choice("DEIS method", method, DEIS_METHODS)
  if method == "rhork":
    if "order" in options:
      raise InputError("option 'order' is for the DEIS methods 'tab' and 'rhoab'; method 'rhork' "
                       f"takes 'tableau', one of {sorted(dc.RK_TABLEAUS)}")
    tableau = options.get("tableau", DEFAULT_TABLEAU)
    base.check_choice("rhoRK tableau", tableau, dc.RK_TABLEAUS)
  else:
    if "tableau" in options:
      raise InputError(f"option 'tableau' is for the DEIS method 'rhork', not {method!r}; "
                       "'tab' and 'rhoab' take 'order' (0..3)")
    order = options.get("order", DEFAULT_ORDER)
    if not dc.order_is_valid(order, 0, 3):
      raise InputError(f"order of DEIS {method!r} must be one of [0, 1, 2, 3], got {order!r}")
  time_grid = options.get("time_grid", DEFAULT_TIME_GRID)
  ts = _time_grid(sde, num_steps, time_grid, options.get("grid_order"), options.get("eps"))
  info = {"method": method, "time_grid": base.grid_name(time_grid), "eps": float(ts[-1]), "num_steps": num_steps,
          "ts": ts}
  if method == "rhork":
    info.update(tableau=tableau, nfe=num_steps * len(dc.RK_TABLEAUS[tableau][2]))
    return _sampler("deis", shape, ts, _rk_run(sde, shape, ts, tableau), info, denoise)
  coefficients = dc.exponential_ab_coefficients if method == "tab" else dc.rho_ab_coefficients
  psi, C = coefficients(sde, ts, int(order))
  info.update(order=int(order), nfe=num_steps)
  return _sampler("deis", shape, ts, _multistep_run(sde, shape, ts, psi, C), info, denoise)


def build_ipndm_sampler(sde: SDE, shape: tuple, num_steps: int, **options: Any) -> base.Sampler:
  """iPNDM (improved PNDM, Zhang & Chen, ICLR 2023): linear multistep in rho with the fixed
  equal-step Adams-Bashforth weights of order min(k + 1, order) at step k (lower-order warm-up).

  Options: order 1..4 (default 4: the number of evaluations combined, the classical AB order);
  time_grid (default 'quadratic'), grid_order, eps, denoise as for 'deis'; max_step_ratio
  (DEFAULT_MAX_STEP_RATIO, 16): a step whose rho step and those of the evaluations it combines
  differ by more than this factor takes the Adams-Bashforth weights of its actual steps
  (rhoAB-DEIS's) instead of the fixed ones, which extrapolate eps across noise levels far apart
  there (5-10 steps of the quadratic grid: 14-18 % of a trained model's pixels out of range);
  inf gives the classical iPNDM everywhere. The fixed weights are those of equal steps in rho:
  on a grid that is not uniform in rho the asymptotic order is 2 at most.
  """
  base.check_options("ipndm", options, ("order", "time_grid", "grid_order", "eps", "denoise",
                                         "max_step_ratio"),
                     generic=base.GENERIC_OPTIONS)
  denoise = base.bool_option(options, "denoise")
  order = options.get("order", 4)
  if not dc.order_is_valid(order, 1, 4):
    raise InputError(f"order of iPNDM must be one of [1, 2, 3, 4], got {order!r}")
  time_grid = options.get("time_grid", DEFAULT_TIME_GRID)
  ts = _time_grid(sde, num_steps, time_grid, options.get("grid_order"), options.get("eps"))
  ratio = options.get("max_step_ratio", DEFAULT_MAX_STEP_RATIO)
  if not (isinstance(ratio, (int, float, np.integer, np.floating)) and not isinstance(ratio, bool)
          and ratio >= 1):
    raise InputError(f"max_step_ratio of iPNDM must be a number >= 1 (inf: the equal-step weights "
                     f"everywhere), got {ratio!r}")
  psi, C = dc.ipndm_coefficients(sde, ts, int(order), float(ratio))
  info = {"order": int(order), "max_step_ratio": float(ratio), "time_grid": base.grid_name(time_grid), "eps": float(ts[-1]), "num_steps": num_steps,
          "nfe": num_steps, "ts": ts}
  return _sampler("ipndm", shape, ts, _multistep_run(sde, shape, ts, psi, C), info, denoise)
