"""DPM-Solver++(2M) and (3M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): multistep, data
prediction.

In l = lambda / 2 = log(alpha / sigma) (half the log-SNR) with step h_i = l_i - l_{i-1} > 0 and the
data prediction x0_i = D(x_{t_i}) = (x + sigma^2 score) / alpha (Tweedie), one 2M step is
    x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_i,
    D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2},   r_i = h_{i-1} / h_i,
with the first step first order (D_1 = x0_0, i.e. DDIM) and, with lower_order_final (the default
below LOWER_ORDER_FINAL_BELOW steps, as in diffusers), the last one too: its step h_n into the
low-noise end is the largest of a few-step grid, where extrapolating x0 overshoots.

A 3M step (order=3) adds the second difference of x0_{i-1}, x0_{i-2}, x0_{i-3} in l: with
r0 = h_{i-1} / h_i, r1 = h_{i-2} / h_i, D1_0 = (x0_{i-1} - x0_{i-2}) / r0,
D1_1 = (x0_{i-2} - x0_{i-3}) / r1, D2 = (D1_0 - D1_1) / (r0 + r1) ~ h^2 x0'' / 2 and
D1 = D1_0 + r0 D2 ~ h x0',
    x_i = (sigma_i / sigma_{i-1}) x_{i-1} + alpha_i [h phi_1 x0_{i-1} + h phi_2 D1 + 2 h phi_3 D2],
phi_k = phi_k(-h) (phi_1(z) = (e^z - 1) / z, phi_{k+1}(z) = (phi_k(z) - 1/k!) / z): the exact
integral of the quadratic in l through the three predictions, third order (it is UniPC's UniP-3,
sampler 'unipc' with variant='bh2' and corrector=False). The reference codes (dpm-solver,
diffusers, k-diffusion) weight D2 by h phi_3, half of this, which leaves an O(h^3) local error:
their 3M is second order (measured 2.3 on the digits oracle, against 3.0 here). 3M warms up with a
first- and a second-order (2M) step and, with lower_order_final, ends like diffusers: the last
step first order, the one before at most second order. One evaluation per step: nfe = num_steps
(+ 1 with denoise).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sgm_jax.errors import InputError
from sgm_jax.sampling import base
from sgm_jax.sde_lib import SDE

Array = jax.Array

LOWER_ORDER_FINAL_BELOW = 15  # diffusers' DPMSolverMultistepScheduler: lower_order_final below 15
ORDERS = (1, 2, 3)
# Quadratic in t, as DEIS: at 10 NFE it beats the log-SNR grid of the DPM-Solver paper on the
# digits benchmark (benchmarks/samplers.py --grids) and halves the out-of-range pixels of the trained
# Fashion-MNIST model (0.41 % vs 0.64 %, README Results).
DEFAULT_TIME_GRID = "quadratic"


def _third_order_weights(h: np.ndarray, lower_order_final: bool) -> np.ndarray:
  """(n, 3) weights of x0_{i-1}, x0_{i-2}, x0_{i-3} in units of the first-order coefficient
  -alpha_i (e^{-h_i} - 1). Step i has order min(3, i), with lower_order_final at most n + 1 - i."""
  n = h.size
  w = np.zeros((n, 3))
  for i in range(n):  # step i + 1
    order = min(3, i + 1, n - i) if lower_order_final else min(3, i + 1)
    hi = h[i]
    phi1 = -math.expm1(-hi)                    # h phi_1(-h) = 1 - e^{-h}
    w[i, 0] = 1.0
    if order == 2:
      r0 = h[i - 1] / hi
      w[i, :2] += np.array([1.0, -1.0]) / (2.0 * r0)   # the 2M step
    elif order == 3:
      r0, r1 = h[i - 1] / hi, h[i - 2] / hi
      d1_0 = np.array([1.0, -1.0, 0.0]) / r0
      d1_1 = np.array([0.0, 1.0, -1.0]) / r1
      d2 = (d1_0 - d1_1) / (r0 + r1)
      d1 = d1_0 + r0 * d2
      phi2 = (math.expm1(-hi) + hi) / hi         # h phi_2(-h)
      phi3 = 0.5 - phi2 / hi                     # h phi_3(-h)
      w[i] += (phi2 * d1 + 2.0 * phi3 * d2) / phi1
  return w


def build_dpm_solver_sampler(sde: SDE, shape: tuple, num_steps: int, **options) -> base.Sampler:
  """DPM-Solver++(2M), or (3M) with order=3. Options: order (2; 1: DDIM in log-SNR, 3: 3M),
  time_grid ('quadratic' in t, DEFAULT_TIME_GRID; 'log_rho': uniform in log-SNR, any of
  schedules.TIME_GRIDS),
  eps (sde.default_sampling_eps), denoise (False: final Tweedie step), lower_order_final
  (first-order last step, and for order 3 at most second order before it; default: num_steps <
  15). nfe = num_steps + [denoise]."""
  base.check_options("dpm_solver", options,
                     ("order", "time_grid", "eps", "denoise", "lower_order_final"),
                     generic=base.GENERIC_OPTIONS)
  order = options.get("order", 2)
  if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order not in ORDERS:
    raise InputError(f"order of DPM-Solver++ must be one of {list(ORDERS)}, got {order!r}")
  order = int(order)
  denoise = base.bool_option(options, "denoise")
  lower_order_final = base.bool_option(options, "lower_order_final",
                                       num_steps < LOWER_ORDER_FINAL_BELOW)
  ts = base.sampling_grid(sde, options.get("time_grid", DEFAULT_TIME_GRID), num_steps, options.get("eps"))
  alpha, sigma = base.on_host(sde.alpha, ts), base.on_host(sde.sigma, ts)
  half_lam = 0.5 * base.on_host(sde.log_snr, ts)
  h = np.diff(half_lam)                      # h_i, i = 1..n
  info = dict(order=order, denoise=denoise, nfe=num_steps + int(denoise), ts=ts,
              t_end=float(ts[-1]), lower_order_final=lower_order_final)
  if order == 3:
    return base.Sampler("dpm_solver", shape,
                        _third_order_run(sde, shape, num_steps, ts, alpha, sigma, h,
                                         _third_order_weights(h, lower_order_final)), info)
  r = np.concatenate([[np.inf], h[:-1] / h[1:]])
  w_prev2 = -0.5 / r                         # weight of x0_{i-2}; 0 on the first step
  if lower_order_final:
    w_prev2[-1] = 0.0
  if order == 1:
    w_prev2[:] = 0.0
  coeffs = (ts[:-1], alpha[:-1], sigma[:-1],  # where the data prediction is made
            sigma[1:] / sigma[:-1],           # sigma_i / sigma_{i-1}
            -alpha[1:] * np.expm1(-h),        # -alpha_i (e^{-h_i} - 1)
            1.0 - w_prev2, w_prev2, ts[1:])

  def run(key, score_fn, x_T, hook=None):
    x, _ = base.initial_state(sde, key, shape, x_T)

    def step(carry, row):
      x, x0_prev = carry
      i, (t, alpha_t, sigma_t, ratio, phi, w1, w2, s) = row
      x0 = base.tweedie_denoise(score_fn, x, t, alpha_t, sigma_t)
      x = ratio * x + phi * (w1 * x0 + w2 * x0_prev)
      return (base.apply_hook(hook, key, x, s, i), x0), None

    xs = (jnp.arange(num_steps, dtype=jnp.int32), tuple(jnp.asarray(v, x.dtype) for v in coeffs))
    (x, _), _ = lax.scan(step, (x, jnp.zeros_like(x)), xs)
    return x, jnp.asarray(num_steps, jnp.int32)

  return base.Sampler("dpm_solver", shape, run, info)


def _third_order_run(sde: SDE, shape: tuple, num_steps: int, ts, alpha, sigma, h, w):
  """The 3M loop: x_i = ratio x + phi (w . [x0_{i-1}, x0_{i-2}, x0_{i-3}])."""
  coeffs = (ts[:-1], alpha[:-1], sigma[:-1], sigma[1:] / sigma[:-1], -alpha[1:] * np.expm1(-h),
            w, ts[1:])

  def run(key, score_fn, x_T, hook=None):
    x, _ = base.initial_state(sde, key, shape, x_T)

    def step(carry, row):
      x, past = carry
      i, (t, alpha_t, sigma_t, ratio, phi, w_i, s) = row
      x0 = base.tweedie_denoise(score_fn, x, t, alpha_t, sigma_t)
      x0s = jnp.concatenate([x0[None], past], axis=0)
      x = ratio * x + phi * jnp.tensordot(w_i, x0s, axes=1)
      return (base.apply_hook(hook, key, x, s, i), x0s[:-1]), None

    xs = (jnp.arange(num_steps, dtype=jnp.int32), tuple(jnp.asarray(v, x.dtype) for v in coeffs))
    past = jnp.zeros((2,) + x.shape, x.dtype)
    (x, _), _ = lax.scan(step, (x, past), xs)
    return x, jnp.asarray(num_steps, jnp.int32)

  return run
