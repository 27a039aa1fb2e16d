"""UniPC (Zhao et al., NeurIPS 2023): the unified predictor-corrector, multistep, data prediction.

In l = log(alpha / sigma) (half the log-SNR), the probability-flow ODE from t_{i-1} to t_i,
h_i = l_i - l_{i-1} > 0, is exactly (DPM-Solver++'s variation of constants)
    x_i = (sigma_i / sigma_{i-1}) x_{i-1} + alpha_i int_0^h e^{-(h - u)} x0(l_{i-1} + u) du,
and a Taylor expansion of x0 in l turns the integral into sum_n h^{n+1} phi_{n+1}(-h) x0^(n),
phi_{n+1}(z) = int_0^1 e^{(1 - s) z} s^n / n! ds. With m_j = x0(x_j, t_j) the data predictions
(Tweedie, one evaluation each), nodes r_k = (l_{i-1-k} - l_{i-1}) / h (k = 1..q-1, negative) and
differences D_k = (m_{i-1-k} - m_{i-1}) / r_k, one step is
    x_i = (sigma_i / sigma_{i-1}) x_{i-1} + alpha_i (1 - e^{-h}) m_{i-1}
          + alpha_i B(h) sum_k a_k D_k,      sum_k a_k r_k^{n-1} = n! h phi_{n+1}(-h) / B(h),
with one condition per unknown (n = 1, 2, ...).
  - UniP-q (predictor, order q): the q - 1 past differences.
  - UniC-q (corrector, order q + 1): the same plus the new node r = 1 with D = m_i - m_{i-1},
    m_i the data prediction at the *predicted* x_i, which the next step reuses: the corrector
    costs no evaluation. It is not applied after the last step (no evaluation at t_n).
  - B(h): 'bh1' is h, 'bh2' is 1 - e^{-h} (the paper's B_1, B_2 for data prediction). A square
    system fixes B(h) a_k, so B(h) only matters where a single unknown is set to 1/2, the limit
    h -> 0 of its condition (the paper's and reference's choice for UniP-2 and UniC-1).
    UniP-2 with 'bh2' is DPM-Solver++(2M), UniP-3 with 'bh2' its third-order 3M (dpm_solver.py).
The predictor order is min(order, i) at step i (warm-up with the evaluations there are) and, with
lower_order_final, at most n + 1 - i. Coefficients are computed once in float64 on the host; the
loop is one lax.scan with one evaluation per step: nfe = num_steps (+ 1 with denoise).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sgm_jax.errors import InputError
from sgm_jax.sampling import base
from sgm_jax.sampling.dpm_solver import LOWER_ORDER_FINAL_BELOW
from sgm_jax.sde_lib import SDE

Array = jax.Array

VARIANTS = ("bh1", "bh2")
ORDERS = (1, 2, 3)
DEFAULT_ORDER = 3      # the paper's and diffusers' recommendation for unconditional sampling
DEFAULT_VARIANT = "bh2"  # measured best at 5-20 NFE on the digits benchmark (benchmarks/)
# quadratic in t (DEIS's default): at 10 NFE half the error of the log-SNR grid on the digits
# benchmark, and fewer out-of-range pixels on the trained Fashion-MNIST model (README, Results)
DEFAULT_TIME_GRID = "quadratic"


def phi(k: int, z: np.ndarray) -> np.ndarray:
  """phi_k(z) = sum_{m >= 0} z^m / (m + k)! (phi_0 = exp), in float64: the series for |z| < 1,
  else the recursion phi_{j+1}(z) = (phi_j(z) - 1/j!) / z, which cancels for small z."""
  z = np.asarray(z, np.float64)
  series = sum(z ** m / math.factorial(m + k) for m in range(30))
  value = np.exp(z)
  for j in range(k):
    value = (value - 1.0 / math.factorial(j)) / np.where(z == 0.0, 1.0, z)
  return np.where(np.abs(z) < 1.0, series, value)


def b_of_h(variant: str, h: float) -> float:
  """B(h) of the data-prediction update: h ('bh1') or 1 - e^{-h} ('bh2')."""
  return h if variant == "bh1" else -math.expm1(-h)


def unified_weights(nodes: np.ndarray, h: float, variant: str) -> np.ndarray:
  """B(h) a: the weights of the differences D_k at `nodes` r_k, from
  sum_k a_k r_k^{n-1} = n! h phi_{n+1}(-h) / B(h), n = 1..len(nodes); a single unknown is set to
  1/2, its limit for h -> 0."""
  nodes = np.asarray(nodes, np.float64)
  K, B = nodes.size, b_of_h(variant, h)
  if K == 0:
    return np.zeros(0)
  if K == 1:
    return np.array([0.5 * B])
  g = np.array([math.factorial(n) * h * float(phi(n + 1, -h)) for n in range(1, K + 1)])
  vandermonde = nodes[None, :] ** np.arange(K)[:, None]
  return np.linalg.solve(vandermonde, g)


def step_orders(num_steps: int, order: int, lower_order_final: bool) -> np.ndarray:
  """The predictor order of steps 1..n: warm-up min(order, i); lower_order_final: <= n + 1 - i."""
  i = np.arange(1, num_steps + 1)
  q = np.minimum(order, i)
  return np.minimum(q, num_steps + 1 - i) if lower_order_final else q


def coefficients(half_lam: np.ndarray, alpha: np.ndarray, sigma: np.ndarray, order: int,
                 variant: str, lower_order_final: bool) -> dict:
  """Per scan iteration k = 0..n-1 (evaluation m_k at t_k, buffer [m_k, m_{k-1}, ..., m_{k-order}]):
    corrector of step k (landing on t_k): x_k^c = c_x[k] x_{k-1}^c + c_m[k] . buffer
      (k = 0: c_x = 1, c_m = 0, with x_{-1}^c = x_T);
    predictor of step k + 1: x_{k+1} = p_x[k] x_k^c + p_m[k] . buffer."""
  n = half_lam.size - 1
  h = np.diff(half_lam)
  q = step_orders(n, order, lower_order_final)
  c_x, c_m = np.ones(n), np.zeros((n, order + 1))
  p_x, p_m = sigma[1:] / sigma[:-1], np.zeros((n, order + 1))

  def weights(i: int, extra_node: bool) -> np.ndarray:
    """Step i's (t_{i-1} -> t_i) weights on [m_i, m_{i-1}, ..., m_{i-order}] besides the x term;
    extra_node: the corrector's new point m_i (r = 1)."""
    w = np.zeros(order + 1)
    w[1] = -alpha[i] * math.expm1(-h[i - 1])        # alpha_i (1 - e^{-h}) m_{i-1}
    nodes = [(half_lam[i - 1 - k] - half_lam[i - 1]) / h[i - 1] for k in range(1, q[i - 1])]
    slots = [1 + k for k in range(1, q[i - 1])]       # m_{i-1-k} sits at buffer slot k + 1
    if extra_node:
      nodes, slots = nodes + [1.0], slots + [0]
    for r, slot, a in zip(nodes, slots, unified_weights(np.array(nodes), h[i - 1], variant)):
      w[slot] += alpha[i] * a / r                     # alpha_i B(h) a_k (m_{i-1-k} - m_{i-1}) / r_k
      w[1] -= alpha[i] * a / r
    return w

  for k in range(n):
    p = weights(k + 1, extra_node=False)
    p_m[k, :-1] = p[1:]                               # m_{k-j}: slot j + 1 of step k + 1, j here
    if k >= 1:
      c_x[k] = sigma[k] / sigma[k - 1]
      c_m[k] = weights(k, extra_node=True)
  return dict(c_x=c_x, c_m=c_m, p_x=p_x, p_m=p_m, orders=q)


def build_unipc_sampler(sde: SDE, shape: tuple, num_steps: int, **options) -> base.Sampler:
  """UniPC. Options: order p in 1..3 (3: UniP-p with UniC-p, global order p + 1), variant
  ('bh2' | 'bh1'), corrector (True: UniC after every step but the last; False: UniP-p alone,
  order p), lower_order_final (default: num_steps < 15), time_grid ('quadratic' in t; 'log_rho':
  uniform in log-SNR; any of schedules.TIME_GRIDS), eps (sde.default_sampling_eps), denoise (False: final
  Tweedie step). nfe = num_steps + [denoise]."""
  base.check_options("unipc", options, ("order", "variant", "corrector", "lower_order_final",
                                        "time_grid", "eps", "denoise"),
                     generic=base.GENERIC_OPTIONS)
  order = options.get("order", DEFAULT_ORDER)
  if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order not in ORDERS:
    raise InputError(f"order of UniPC must be one of {list(ORDERS)}, got {order!r}")
  order = int(order)
  variant = options.get("variant", DEFAULT_VARIANT)
  base.check_choice("UniPC variant", variant, VARIANTS)
  use_corrector = base.bool_option(options, "corrector", True)
  lower_order_final = base.bool_option(options, "lower_order_final",
                                       num_steps < LOWER_ORDER_FINAL_BELOW)
  denoise = base.bool_option(options, "denoise")
  time_grid = options.get("time_grid", DEFAULT_TIME_GRID)
  ts = base.sampling_grid(sde, time_grid, num_steps, options.get("eps"))
  alpha, sigma = base.on_host(sde.alpha, ts), base.on_host(sde.sigma, ts)
  half_lam = 0.5 * base.on_host(sde.log_snr, ts)
  if not np.all(np.diff(half_lam) > 0) or not np.all(np.isfinite(half_lam)):
    raise InputError(f"the {base.grid_name(time_grid)!r} grid of {num_steps} steps has repeated or non-finite "
                     "log-SNR points; use fewer steps or a larger eps")
  c = coefficients(half_lam, alpha, sigma, order, variant, lower_order_final)
  rows = (ts[:-1], alpha[:-1], sigma[:-1], c["c_x"], c["c_m"], c["p_x"], c["p_m"], ts[1:])

  def run(key, score_fn, x_T, hook=None):
    x, _ = base.initial_state(sde, key, shape, x_T)

    def corrected(x_c, t, i):
      if hook is None:
        return x_c
      return lax.cond(i > 0, lambda y: base.apply_hook(hook, key, y, t, i - 1, 1),
                      lambda y: y, x_c)

    def step(carry, row):
      x, x_start, past = carry
      i, (t, alpha_t, sigma_t, c_x, c_m, p_x, p_m, s) = row
      m = base.tweedie_denoise(score_fn, x, t, alpha_t, sigma_t)
      buffer = jnp.concatenate([m[None], past], axis=0)   # m_i, m_{i-1}, ..., m_{i-order}
      if use_corrector:                                   # UniC: x_i from x_{i-1} again, with m_i
        x = corrected(c_x * x_start + jnp.tensordot(c_m, buffer, axes=1), t, i)
      x_next = p_x * x + jnp.tensordot(p_m, buffer, axes=1)  # UniP to t_{i+1}
      return (base.apply_hook(hook, key, x_next, s, i), x, buffer[:-1]), None

    xs = (jnp.arange(num_steps, dtype=jnp.int32), tuple(jnp.asarray(v, x.dtype) for v in rows))
    past = jnp.zeros((order,) + x.shape, x.dtype)
    (x, _, _), _ = lax.scan(step, (x, x, past), xs)
    return x, jnp.asarray(num_steps, jnp.int32)

  return base.Sampler("unipc", shape, run, dict(
      order=order, variant=variant, corrector=use_corrector, lower_order_final=lower_order_final,
      time_grid=base.grid_name(time_grid), orders=c["orders"], denoise=denoise, nfe=num_steps + int(denoise),
      ts=ts, t_end=float(ts[-1])))
