"""Time grids for samplers, separate from the solvers that consume them.

Every grid is a host float64 numpy array of num_steps + 1 decreasing times from T to eps; a solver
takes num_steps steps between consecutive points. Grids are defined through the SDE's own maps
(log-SNR, rho = sigma / alpha) so one grid name works for VE, VP, sub-VP and the tutorial SDE.
"""
from __future__ import annotations

import numpy as np

from sgm_jax.errors import InputError, check_positive_int
from sgm_jax.sde_lib import SDE


def _check_steps(num_steps) -> int:
  return check_positive_int("num_steps", num_steps)


def _check_eps(sde: SDE, eps: float) -> float:
  if not 0.0 < eps < sde.T:
    raise InputError(f"eps must lie in (0, T={sde.T}), got {eps!r}")
  return float(eps)


def _t_from_rho(sde: SDE, rho: np.ndarray) -> np.ndarray:
  import jax
  with jax.enable_x64(True):
    return np.asarray(sde.t_from_rho(np.asarray(rho, dtype=np.float64)), dtype=np.float64)


def _rho(sde: SDE, t: float) -> float:
  import jax
  with jax.enable_x64(True):
    return float(sde.rho(np.float64(t)))


def uniform_t(sde: SDE, num_steps: int, eps: float) -> np.ndarray:
  """Uniform in t."""
  return polynomial_t(sde, num_steps, eps, order=1)


def polynomial_t(sde: SDE, num_steps: int, eps: float, order: float = 2.0) -> np.ndarray:
  """t_i = (T^{1/p} + i/n (eps^{1/p} - T^{1/p}))^p: uniform (p = 1), quadratic (p = 2, DEIS)."""
  n, eps = _check_steps(num_steps), _check_eps(sde, eps)
  if order <= 0:
    raise InputError(f"order of the polynomial time grid must be > 0, got {order!r}")
  u = np.linspace(sde.T ** (1.0 / order), eps ** (1.0 / order), n + 1)
  return _snap_ends(u ** order, sde.T, eps)  # (eps^{1/p})^p can be eps - 1 ulp


def polynomial_rho(sde: SDE, num_steps: int, eps: float, order: float = 7.0) -> np.ndarray:
  """Polynomial in rho = sigma / alpha (Karras et al. 2022, Eq. 5; their rho exponent = order)."""
  n, eps = _check_steps(num_steps), _check_eps(sde, eps)
  if order <= 0:
    raise InputError(f"order of the polynomial rho grid must be > 0, got {order!r}")
  r_max, r_min = _rho(sde, sde.T), _rho(sde, eps)
  u = np.linspace(r_max ** (1.0 / order), r_min ** (1.0 / order), n + 1)
  return _snap_ends(_t_from_rho(sde, u ** order), sde.T, eps)


def log_rho(sde: SDE, num_steps: int, eps: float) -> np.ndarray:
  """Uniform in log rho, i.e. uniform in log-SNR (DPM-Solver's 'logSNR' grid)."""
  n, eps = _check_steps(num_steps), _check_eps(sde, eps)
  r = np.exp(np.linspace(np.log(_rho(sde, sde.T)), np.log(_rho(sde, eps)), n + 1))
  return _snap_ends(_t_from_rho(sde, r), sde.T, eps)


def _snap_ends(t: np.ndarray, T: float, eps: float) -> np.ndarray:
  t = t.copy()
  t[0], t[-1] = T, eps
  return t


TIME_GRIDS = {
    "uniform": uniform_t,
    "quadratic": lambda sde, n, eps: polynomial_t(sde, n, eps, order=2.0),
    "polynomial_t": polynomial_t,
    "polynomial_rho": polynomial_rho,
    "log_rho": log_rho,
}


def explicit_time_grid(grid, sde: SDE, num_steps: int) -> np.ndarray:
  """A grid given as times (e.g. from sgm_jax.sampling.tuning): float64, num_steps + 1 strictly
  decreasing finite times from T to some eps in (0, T)."""
  ts = np.asarray(grid, dtype=np.float64)
  if ts.shape != (num_steps + 1,):
    raise InputError(f"an explicit time grid for {num_steps} steps must hold {num_steps + 1} "
                     f"times, got shape {ts.shape}")
  if not (np.all(np.isfinite(ts)) and np.all(np.diff(ts) < 0)):
    raise InputError(f"an explicit time grid must be strictly decreasing and finite, got {ts}")
  if not np.isclose(ts[0], sde.T, rtol=0.0, atol=1e-9) or not 0.0 < ts[-1] < sde.T:
    raise InputError(f"an explicit time grid must run from T={sde.T} down to an eps in (0, T), "
                     f"got {ts[0]!r} ... {ts[-1]!r}")
  ts[0] = sde.T
  return ts


def get_time_grid(name, sde: SDE, num_steps: int, eps: float, **options) -> np.ndarray:
  """The time grid `name` (see TIME_GRIDS); options such as `order` go to the grid function.
  `name` may also be the grid itself, an array of times (explicit_time_grid); eps is then its
  last point."""
  if not isinstance(name, str):
    if options:
      raise InputError(f"options {sorted(options)} are for named time grids, not explicit ones")
    return explicit_time_grid(name, sde, num_steps)
  if name not in TIME_GRIDS:
    raise InputError(f"unknown time grid {name!r}; valid grids are {sorted(TIME_GRIDS)}")
  grid = TIME_GRIDS[name](sde, num_steps, eps, **options)
  if not (np.all(np.isfinite(grid)) and np.all(np.diff(grid) < 0)):
    raise InputError(f"time grid {name!r} with {num_steps} steps from T={sde.T} to eps={eps} is "
                     "not strictly decreasing (too many steps for float64, or a degenerate eps)")
  return grid
