"""DPM-Solver++(2M) SDE: the SDE variant of DPM-Solver++ (Lu et al. 2022) as k-diffusion's
sample_dpmpp_2m_sde and diffusers' algorithm_type='sde-dpmsolver++' (midpoint solver type).

In l = lambda / 2 = log(alpha / sigma) with step h_i = l_i - l_{i-1} > 0 and the data prediction
x0_i = (x + sigma^2 score) / alpha (Tweedie), one step solves the SDE
    dx = [f - (1 + eta) g^2 score / 2] dt + sqrt(eta) g dw
(eta = 1: the reverse SDE, Song et al. Eq. 6; eta = 0: the probability-flow ODE; every eta keeps the
marginals p_t) exactly in its linear part and noise, with the data prediction held at D_i, its
value half a step on in l extrapolated from the last two (the 'midpoint' solver type):
    x_i = (sigma_i / sigma_{i-1}) e^{-eta h_i} x_{i-1} + alpha_i (1 - e^{-(1 + eta) h_i}) D_i
          + sigma_i sqrt(1 - e^{-2 eta h_i}) z,
    D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2},   r_i = h_{i-1} / h_i.
The first step is first order (D_1 = x0_0: with eta = 1 the ancestral step, DDIM with eta = 1), the
last too with lower_order_final, as in dpm_solver.py; eta = 0 is dpm_solver's 2M exactly.
One evaluation per step: nfe = num_steps (+ 1 with denoise).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sgm_jax.errors import InputError
from sgm_jax.sampling import base, dpm_solver
from sgm_jax.sde_lib import SDE

Array = jax.Array


def build_dpm_solver_sde_sampler(sde: SDE, shape: tuple, num_steps: int,
                                 **options) -> base.Sampler:
  """DPM-Solver++(2M) SDE. Options: eta (1.0: the reverse SDE; 0: DPM-Solver++(2M)), time_grid
  ('quadratic', as dpm_solver), eps (sde.default_sampling_eps), denoise (False: final Tweedie step),
  lower_order_final (first-order last step; default: num_steps < 15). nfe = num_steps +
  [denoise]."""
  base.check_options("dpm_solver_sde", options,
                     ("eta", "time_grid", "eps", "denoise", "lower_order_final"),
                     generic=base.GENERIC_OPTIONS)
  eta = options.get("eta", 1.0)
  if (isinstance(eta, bool) or not isinstance(eta, (int, float, np.integer, np.floating))
      or not math.isfinite(eta) or eta < 0):
    raise InputError(f"eta must be a finite number >= 0 (1: the reverse SDE, 0: the ODE), "
                     f"got {eta!r}")
  eta = float(eta)
  denoise = base.bool_option(options, "denoise")
  lower_order_final = base.bool_option(options, "lower_order_final",
                                       num_steps < dpm_solver.LOWER_ORDER_FINAL_BELOW)
  ts = base.sampling_grid(sde, options.get("time_grid", dpm_solver.DEFAULT_TIME_GRID), num_steps,
                          options.get("eps"))
  alpha, sigma = base.on_host(sde.alpha, ts), base.on_host(sde.sigma, ts)
  h = np.diff(0.5 * base.on_host(sde.log_snr, ts))  # h_i, i = 1..n
  r = np.concatenate([[np.inf], h[:-1] / h[1:]])
  w_prev2 = -0.5 / r                                # weight of x0_{i-2}; 0 on the first step
  if lower_order_final:
    w_prev2[-1] = 0.0
  coeffs = (ts[:-1], alpha[:-1], sigma[:-1],      # where the data prediction is made
            sigma[1:] / sigma[:-1] * np.exp(-eta * h),
            -alpha[1:] * np.expm1(-(1.0 + eta) * h),
            1.0 - w_prev2, w_prev2,
            sigma[1:] * np.sqrt(-np.expm1(-2.0 * eta * h)),  # the std of the added noise
            ts[1:])

  def run(key, score_fn, x_T, hook=None):
    x, key_steps = base.initial_state(sde, key, shape, x_T)

    def step(carry, row):
      x, x0_prev = carry
      i, (t, alpha_t, sigma_t, ratio, phi, w1, w2, noise_std, s) = row
      x0 = base.tweedie_denoise(score_fn, x, t, alpha_t, sigma_t)
      x = ratio * x + phi * (w1 * x0 + w2 * x0_prev)  # x_i of the module docstring, then its noise
      if eta > 0.0:
        x = x + noise_std * base.step_normal(key_steps, i, 0, x)
      return (base.apply_hook(hook, key, x, s, i), x0), None

    xs = (jnp.arange(num_steps, dtype=jnp.int32), tuple(jnp.asarray(v, x.dtype) for v in coeffs))
    (x, _), _ = lax.scan(step, (x, jnp.zeros_like(x)), xs)
    return x, jnp.asarray(num_steps, jnp.int32)

  info = dict(eta=eta, denoise=denoise, nfe=num_steps + int(denoise), ts=ts, t_end=float(ts[-1]),
              lower_order_final=lower_order_final)
  return base.Sampler("dpm_solver_sde", shape, run, info)
