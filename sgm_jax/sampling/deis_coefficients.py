"""Host-side float64 coefficients of DEIS (Zhang & Chen, "Fast Sampling of Diffusion Models with
Exponential Integrator", ICLR 2023).

With eps_theta = -sigma(t) * score the probability-flow ODE (Song et al. 2021, Eq. 13) reads
    dx/dt = f(t) x + g(t)^2 / (2 sigma(t)) eps_theta(x, t),      f = d log alpha / dt,
and in y = x / alpha, rho = sigma / alpha it is dy/drho = eps_theta (DEIS's rho-form). Every
multistep variant here is one update
    x_{k+1} = psi_k x_k + sum_j C_kj eps_{k-j},
on a decreasing grid t_0 = T > ... > t_n = eps; this module computes psi (n,) and C (n, r+1) once,
in float64, and checks them. Nothing here touches x.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax.errors import InputError
from sgm_jax.sde_lib import SDE

Array = jax.Array

# Fourth order Adams-Bashforth coefficients for equal steps, lower orders first (iPNDM warm-up).
ADAMS_BASHFORTH = (
    (1.0,),
    (3.0 / 2.0, -1.0 / 2.0),
    (23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0),
    (55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0),
)

# Butcher tableaus (c, a, b) of the explicit Runge-Kutta methods of rhoRK-DEIS.
RK_TABLEAUS = {
    "heun": ((0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),
    "kutta3": ((0.0, 0.5, 1.0), ((), (0.5,), (-1.0, 2.0)), (1.0 / 6.0, 2.0 / 3.0, 1.0 / 6.0)),
    "rk4": ((0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
            (1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0)),
}

QUADRATURE_NODES = 64


def _bucket(size: int) -> int:
  """Pad host evaluations to a power of two so a few compilations serve every grid size."""
  return max(256, 1 << (max(size, 1) - 1).bit_length())


@functools.partial(jax.jit, static_argnums=0)
def _sde_coefficients(sde: SDE, t: Array) -> tuple[Array, Array, Array]:
  _, g = sde.sde(jnp.ones((t.shape[0], 1), t.dtype), t)
  alpha = jnp.broadcast_to(sde.alpha(t), t.shape)
  return alpha, jnp.broadcast_to(sde.sigma(t), t.shape), jnp.broadcast_to(g, t.shape)


@functools.partial(jax.jit, static_argnums=0)
def _t_from_rho(sde: SDE, rho: Array) -> Array:
  return sde.t_from_rho(rho)


def _padded_call(fn, sde: SDE, x: np.ndarray):
  """fn(sde, x) in float64 on the flattened x padded to a bucket; outputs reshaped like x."""
  x = np.asarray(x, dtype=np.float64)
  flat = x.reshape(-1)
  padded = np.full((_bucket(flat.size),), flat[0] if flat.size else 1.0)
  padded[:flat.size] = flat
  with jax.enable_x64(True):
    out = fn(sde, padded)
  unpad = lambda v: np.asarray(v, np.float64)[:flat.size].reshape(x.shape)
  return jax.tree_util.tree_map(unpad, out)


def sde_coefficients(sde: SDE, t: np.ndarray) -> dict[str, np.ndarray]:
  """alpha, sigma, rho and the diffusion g of `sde` at times t, as float64 numpy arrays."""
  alpha, sigma, g = _padded_call(_sde_coefficients, sde, t)
  return {"alpha": alpha, "sigma": sigma, "g": g, "rho": sigma / alpha}


def t_from_rho(sde: SDE, rho: np.ndarray) -> np.ndarray:
  """sde.t_from_rho in float64."""
  return _padded_call(_t_from_rho, sde, rho)


def check_grid(sde: SDE, ts: np.ndarray) -> dict[str, np.ndarray]:
  """Raise a ValueError unless ts is finite, strictly decreasing in t and in rho, in (0, T]."""
  ts = np.asarray(ts, dtype=np.float64)
  if ts.ndim != 1 or ts.size < 2:
    raise InputError(f"a time grid needs at least 2 points, got shape {ts.shape}")
  if not (np.all(np.isfinite(ts)) and ts[-1] > 0.0 and ts[0] <= sde.T):
    raise InputError(f"time grid must be finite and lie in (0, T={sde.T}], got [{ts[-1]}, {ts[0]}]")
  if not np.all(np.diff(ts) < 0):
    i = int(np.argmax(~(np.diff(ts) < 0)))
    raise InputError(f"time grid must be strictly decreasing; t[{i}]={ts[i]!r} and "
                     f"t[{i + 1}]={ts[i + 1]!r} are duplicate or increasing (too many steps for "
                     "float64, or a degenerate eps)")
  coef = sde_coefficients(sde, ts)
  if not all(np.all(np.isfinite(v)) for v in coef.values()):
    raise InputError("alpha, sigma or g of the SDE is not finite on the time grid")
  if not (np.all(coef["alpha"] > 0) and np.all(coef["sigma"] > 0)):
    raise InputError("alpha and sigma must be > 0 on the time grid (is eps too small?)")
  if not np.all(np.diff(coef["rho"]) < 0):
    raise InputError("rho = sigma / alpha is not strictly decreasing on the time grid: consecutive "
                     "times are too close for float64 (use fewer steps or a larger eps)")
  return coef


def lagrange_basis(nodes: np.ndarray, x: np.ndarray) -> np.ndarray:
  """ell_j(x) = prod_{m != j} (x - nodes_m) / (nodes_j - nodes_m), batched: nodes (..., M) and
  x (..., Q) (broadcasting over the leading axes) give (..., M, Q)."""
  nodes, x = np.asarray(nodes, np.float64), np.asarray(x, np.float64)
  num = nodes.shape[-1]
  out = np.ones(np.broadcast_shapes(nodes.shape[:-1], x.shape[:-1]) + (num, x.shape[-1]))
  for j in range(num):
    for m in range(num):
      if m != j:
        out[..., j, :] *= (x - nodes[..., m, None]) / (nodes[..., j, None] - nodes[..., m, None])
  return out


def _history(n: int, order: int):
  """Steps grouped by their interpolation nodes: (rows, idx) with idx[r] = k, k-1, ..., k-r' for
  step k = rows[r] and r' = min(order, k), so the first `order` steps warm up with fewer nodes."""
  for m in range(min(order, n - 1) + 1):
    rows = np.arange(m, m + 1) if m < order else np.arange(order, n)
    yield rows, rows[:, None] - np.arange(m + 1)[None, :]


def exponential_ab_coefficients(sde: SDE, ts: np.ndarray, order: int,
                                num_nodes: int = QUADRATURE_NODES) -> tuple[np.ndarray, np.ndarray]:
  """tAB-DEIS: psi_k = alpha(t_{k+1}) / alpha(t_k) and
      C_kj = int_{t_k}^{t_{k+1}} Psi(t_{k+1}, tau) g(tau)^2 / (2 sigma(tau)) ell_kj(tau) dtau
           = alpha(t_{k+1}) int_{rho_k}^{rho_{k+1}} ell_kj(t(rho)) drho,
  Psi(t, s) = alpha(t) / alpha(s) the transition of dx/dt = f x, ell_kj the Lagrange basis in t over
  t_k, ..., t_{k-r'}. The two integrals are equal because g^2 = d sigma^2 / dt - 2 f sigma^2 with
  f = d log alpha / dt, so g^2 / (2 sigma alpha) = d rho / dt: the second form needs only alpha,
  sigma and sde.t_from_rho, not g (which is piecewise smooth, with kinks at every training step, on
  a discrete DDPM schedule). Whether g agrees with alpha and sigma is a property of the SDE, checked
  by the tests (against this integral in t with g).

  Gauss-Legendre in l = log rho, drho = rho dl: on every continuous-time SDE here t(rho) is analytic
  in log rho over the whole grid (VE: linear in it; VP, sub-VP and the tutorial SDE: t ~ c rho^2 as
  t -> 0), so the rule is accurate to round-off even on one step across decades of rho. Where t(rho)
  is only piecewise smooth (a discrete schedule, kinks at every training step) it converges
  algebraically: with 64 nodes, C to about 3e-8 of its row's scale on a 'cubic' DDPM schedule and
  1e-5 on a 'linear' one; the rows still sum to the exact DDIM step (ell_kj sum to one).
  """
  coef = check_grid(sde, ts)
  n = ts.size - 1
  gl_x, gl_w = np.polynomial.legendre.leggauss(num_nodes)
  l0, l1 = np.log(coef["rho"][:-1]), np.log(coef["rho"][1:])  # step k runs from l0[k] down to l1[k]
  half = 0.5 * (l1 - l0)
  rho = np.exp(0.5 * (l1 + l0)[:, None] + half[:, None] * gl_x[None, :])  # (n, num_nodes)
  tau = t_from_rho(sde, rho)
  # t(rho) is monotone: the nodes, strictly inside each step in rho, map inside it in t.
  slack = 1e-9 * (ts[:-1] - ts[1:])[:, None]
  if not (np.all(np.isfinite(tau)) and np.all(tau >= ts[1:, None] - slack)
          and np.all(tau <= ts[:-1, None] + slack)):
    raise InputError("tAB quadrature times are not finite or not inside their steps: "
                     "sde.t_from_rho does not invert sde.rho on the time grid")
  # alpha_{k+1}, times drho = rho dl and the Gauss-Legendre weights.
  weight = coef["alpha"][1:, None] * rho * half[:, None] * gl_w[None, :]
  C = np.zeros((n, order + 1))
  for rows, idx in _history(n, order):
    basis = lagrange_basis(ts[idx], tau[rows])  # (rows, nodes, quadrature points)
    C[rows, :idx.shape[1]] = np.einsum("rjq,rq->rj", basis, weight[rows])
  psi = coef["alpha"][1:] / coef["alpha"][:-1]
  _check_coefficients("tab", psi, C, coef)
  return psi, C


def rho_ab_coefficients(sde: SDE, ts: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
  """rhoAB-DEIS: Adams-Bashforth in rho for dy/drho = eps_theta, y = x / alpha.

  D_kj = int_{rho_k}^{rho_{k+1}} ell_kj(rho) drho for the Lagrange basis in rho, in closed form
  (Gauss-Legendre with 4 nodes is exact for these cubic polynomials); in x: psi_k = alpha_{k+1} /
  alpha_k and C_kj = alpha_{k+1} D_kj.
  """
  coef = check_grid(sde, ts)
  rho, alpha, n = coef["rho"], coef["alpha"], ts.size - 1
  gl_x, gl_w = np.polynomial.legendre.leggauss(4)
  s, w = 0.5 * (gl_x + 1.0), 0.5 * gl_w  # Gauss-Legendre on [0, 1]
  h = rho[1:] - rho[:-1]
  C = np.zeros((n, order + 1))
  for rows, idx in _history(n, order):
    nodes = (rho[idx] - rho[rows, None]) / h[rows, None]  # in s = (rho - rho_k) / h_k
    C[rows, :idx.shape[1]] = (alpha[rows + 1] * h[rows])[:, None] * (lagrange_basis(nodes, s) @ w)
  psi = alpha[1:] / alpha[:-1]
  _check_coefficients("rhoab", psi, C, coef)
  return psi, C


def unequal_steps(rho: np.ndarray, order: int, max_step_ratio: float) -> np.ndarray:
  """(n,) bool: step k and the rho-steps of the evaluations it combines (min(k + 1, order) of
  them) differ by more than a factor max_step_ratio, where equal-step weights do not apply."""
  h = np.abs(np.diff(rho))
  unequal = np.zeros(h.size, bool)
  for k in range(h.size):
    past = h[max(0, k - order + 1):k]
    ratio = np.maximum(past / h[k], h[k] / past) if past.size else np.ones(1)
    unequal[k] = bool(np.any(ratio > max_step_ratio))
  return unequal


def ipndm_coefficients(sde: SDE, ts: np.ndarray, order: int,
                       max_step_ratio: float = np.inf) -> tuple[np.ndarray, np.ndarray]:
  """iPNDM (improved PNDM of DEIS): the fixed equal-step Adams-Bashforth weights of order
  min(k + 1, order) times the DDIM step alpha_{k+1} (rho_{k+1} - rho_k), in x. Steps whose rho
  steps differ by more than `max_step_ratio` (`unequal_steps`) take the Adams-Bashforth weights of
  their actual steps instead (rhoAB-DEIS's, of the same order)."""
  coef = check_grid(sde, ts)
  rho, alpha, n = coef["rho"], coef["alpha"], ts.size - 1
  table = np.zeros((order, order))
  for i, ab in enumerate(ADAMS_BASHFORTH[:order]):
    table[i, :len(ab)] = ab
  C = (alpha[1:] * (rho[1:] - rho[:-1]))[:, None] * table[np.minimum(np.arange(n), order - 1)]
  unequal = unequal_steps(rho, order, max_step_ratio)
  if unequal.any():
    C[unequal] = rho_ab_coefficients(sde, ts, order - 1)[1][unequal]
  psi = alpha[1:] / alpha[:-1]
  _check_coefficients("ipndm", psi, C, coef)
  return psi, C


def ddim_coefficients(sde: SDE, ts: np.ndarray) -> np.ndarray:
  """Closed form of the order-0 exponential integrator: alpha_{k+1} (rho_{k+1} - rho_k)."""
  coef = sde_coefficients(sde, ts)
  return coef["alpha"][1:] * (coef["rho"][1:] - coef["rho"][:-1])


def _check_coefficients(name: str, psi: np.ndarray, C: np.ndarray, coef: dict) -> None:
  """Finite, and sum_j C_kj equals the DDIM step alpha_{k+1} (rho_{k+1} - rho_k) (Lagrange bases
  sum to one): a check of the quadrature and of the bases, not of the SDE (no coefficient here uses
  its g)."""
  if not (np.all(np.isfinite(psi)) and np.all(np.isfinite(C))):
    raise InputError(f"{name} coefficients are not finite: the time grid is degenerate")
  alpha, rho = coef["alpha"], coef["rho"]
  ddim = alpha[1:] * (rho[1:] - rho[:-1])
  tol = 1e-7 * np.abs(ddim) + 1e-13 * alpha[1:] * rho[:-1]
  bad = np.abs(C.sum(axis=1) - ddim) > tol
  if np.any(bad):
    k = int(np.argmax(bad))
    raise InputError(f"{name} coefficients of step {k} sum to {C[k].sum()!r}, not to the exact "
                     f"alpha (rho_next - rho) = {ddim[k]!r}: the quadrature or the Lagrange bases "
                     "lost precision (time points too close, or a step too long)")


def rk_stages(sde: SDE, ts: np.ndarray, tableau: str) -> dict[str, np.ndarray]:
  """rhoRK-DEIS stage data per step: h_k = rho_{k+1} - rho_k, and at rho_k + c_s h_k the stage time
  (by sde.t_from_rho; the grid's own t at c = 0 and c = 1), alpha and sigma, each (n, stages)."""
  coef = check_grid(sde, ts)
  c = np.asarray(RK_TABLEAUS[tableau][0])
  rho = coef["rho"]
  h = rho[1:] - rho[:-1]
  stage_rho = rho[:-1, None] + c[None, :] * h[:, None]
  t = t_from_rho(sde, stage_rho)
  t = np.where(c[None, :] == 0.0, ts[:-1, None], np.where(c[None, :] == 1.0, ts[1:, None], t))
  if not (np.all(np.isfinite(t)) and np.all(t > 0) and np.all(t <= sde.T * (1 + 1e-12))):
    raise InputError(f"rhoRK stage times are not finite in (0, T]: sde.t_from_rho failed")
  at = sde_coefficients(sde, t)
  return {"h": h, "t": t, "alpha": at["alpha"], "sigma": at["sigma"],
          "alpha_start": float(coef["alpha"][0]), "alpha_end": float(coef["alpha"][-1])}


def order_is_valid(order, low: int, high: int) -> bool:
  return (isinstance(order, (int, np.integer)) and not isinstance(order, bool)
          and low <= order <= high)


def is_positive_number(value) -> bool:
  return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
          and math.isfinite(value) and value > 0)
