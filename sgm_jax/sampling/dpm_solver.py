"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): multistep, data prediction.

In l = lambda / 2 = log(alpha / sigma) (half the log-SNR) with step h_i = l_i - l_{i-1} > 0 and the
data prediction x0_i = D(x_{t_i}) = (x + sigma^2 score) / alpha (Tweedie), one step is
    x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_i,
    D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2},   r_i = h_{i-1} / h_i,
with the first step first order (D_1 = x0_0, i.e. DDIM). One evaluation per step: nfe = num_steps
(+ 1 with denoise).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sgm_jax.sampling import base
from sgm_jax.sde_lib import SDE

Array = jax.Array


def build_dpm_solver_sampler(sde: SDE, shape: tuple, num_steps: int, **options) -> base.Sampler:
  """DPM-Solver++(2M). Options: time_grid ('log_rho': uniform in log-SNR; 'uniform', 'quadratic',
  any of schedules.TIME_GRIDS), eps (sde.default_sampling_eps), denoise (False: final Tweedie
  step). nfe = num_steps + [denoise]."""
  base.check_options("dpm_solver", options, ("time_grid", "eps", "denoise"),
                     generic=base.GENERIC_OPTIONS)
  denoise = base.bool_option(options, "denoise")
  ts = base.sampling_grid(sde, options.get("time_grid", "log_rho"), num_steps, options.get("eps"))
  alpha, sigma = base.on_host(sde.alpha, ts), base.on_host(sde.sigma, ts)
  half_lam = 0.5 * base.on_host(sde.log_snr, ts)
  h = np.diff(half_lam)                      # h_i, i = 1..n
  r = np.concatenate([[np.inf], h[:-1] / h[1:]])
  w_prev2 = -0.5 / r                         # weight of x0_{i-2}; 0 on the first step
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

  return base.Sampler("dpm_solver", shape, run, dict(denoise=denoise, nfe=num_steps + int(denoise),
                                                     ts=ts, t_end=float(ts[-1])))
