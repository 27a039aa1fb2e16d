"""EDM's deterministic 2nd-order Heun sampler (Karras et al., NeurIPS 2022, Algorithm 1).

The probability-flow ODE in the scaled variable y = x / alpha(t) and noise level rho = sigma / alpha
(Karras et al. Eq. 4 with s(t) = alpha, sigma_EDM = rho) is
    dy / drho = (y - D(y; rho)) / rho = -sigma(t) score(x, t),   D = (x + sigma^2 score) / alpha,
integrated with Heun's method on a rho grid (default: polynomial in rho of order 7, Karras Eq. 5).
Karras's grid ends at rho = 0, where the last step falls back to Euler; here the grid ends at
rho(eps) > 0 and the last step is also Euler, so nfe = 2 num_steps - 1 (+ 1 with denoise).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from sgm_jax.sampling import base
from sgm_jax.sde_lib import SDE

Array = jax.Array


def build_heun_sampler(sde: SDE, shape: tuple, num_steps: int, **options) -> base.Sampler:
  """EDM Heun sampler. Options: time_grid ('polynomial_rho'), eps (sde.default_sampling_eps),
  denoise (False: final Tweedie step). nfe = 2 num_steps - 1 + [denoise]."""
  base.check_options("heun", options, ("time_grid", "eps", "denoise"),
                     generic=base.GENERIC_OPTIONS)
  denoise = base.bool_option(options, "denoise")
  ts = base.sampling_grid(sde, options.get("time_grid", "polynomial_rho"), num_steps,
                          options.get("eps"))
  alpha, sigma, rho = (base.on_host(f, ts) for f in (sde.alpha, sde.sigma, sde.rho))
  nfe = 2 * num_steps - 1 + int(denoise)

  def run(key, score_fn, x_T, hook=None):
    x, _ = base.initial_state(sde, key, shape, x_T)
    t_, a_, s_ = (jnp.asarray(v, x.dtype) for v in (ts, alpha, sigma))
    drho = jnp.asarray(rho[1:] - rho[:-1], x.dtype)

    def slope(y, i):  # dy/drho = -sigma(t_i) score(alpha(t_i) y, t_i)
      return -s_[i] * base.eval_score(score_fn, a_[i] * y, t_[i])

    def heun_step(y, i):
      d = slope(y, i)
      y_euler = y + drho[i] * d
      # The last step stays Euler; every network call is inside the one scan (a call outside it
      # would be compiled separately, at a different speed on CPU).
      correct = lambda: y + drho[i] * 0.5 * (d + slope(y_euler, jnp.minimum(i + 1, num_steps)))
      return lax.cond(i < num_steps - 1, correct, lambda: y_euler), None

    def hooked_step(x, i):  # the same step carrying x = alpha y, with the hook at t_{i+1}
      y, _ = heun_step(x / a_[i], i)
      return base.apply_hook(hook, key, a_[i + 1] * y, t_[i + 1], i), None

    evaluations = jnp.asarray(2 * num_steps - 1, jnp.int32)
    if hook is not None:
      x, _ = lax.scan(hooked_step, x, jnp.arange(num_steps))
      return x, evaluations
    y, _ = lax.scan(heun_step, x / a_[0], jnp.arange(num_steps))
    return a_[-1] * y, evaluations

  info = dict(denoise=denoise, nfe=nfe, ts=ts, t_end=float(ts[-1]))
  return base.Sampler("heun", shape, run, info)
