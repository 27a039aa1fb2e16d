"""Milstein scheme for the reverse-time SDE (Kloeden & Platen 1992, Sec. 10.3).

For dx = b(x, t) dt + g(x, t) dw_bar run backwards with step h > 0 and dW = sqrt(h) z,
    x_{t-h} = x - b h + g dW + 1/2 g (dg/dx) (dW^2 - h),     b = f - g^2 score (Eq. 6),
with the diagonal-noise correction taken componentwise (dg/dx_i for component i; cross terms of a
general g(x) would need Levy areas and are left out). Every SDE in this library has a diffusion g(t)
that does not depend on x (additive noise), so dg/dx = 0 and the scheme *is* Euler-Maruyama, which
already has strong order 1 for additive noise. The derivative is still computed (jax.grad of g,
constant-folded to zero by XLA), so an SDE with a state-dependent g would get the correction.
Noise is drawn exactly as the pc sampler's Euler-Maruyama predictor draws it.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from sgm_jax.sampling import base
from sgm_jax.sde_lib import SDE, batch_expand, batch_times

Array = jax.Array


def milstein_step(sde: SDE, score_fn: Callable, x: Array, t: Array, h: Array, z: Array) -> Array:
  """One Milstein step of the reverse SDE from t to t - h with dW = sqrt(h) z."""
  tb = batch_times(t, x, x.dtype)
  drift = sde.reverse_drift(score_fn, x, tb)
  diffusion = lambda y: sde.sde(y, tb)[1].astype(y.dtype)  # g(x_b, t) per sample, (B,)
  g = batch_expand(diffusion(x), x)
  dg_dx = jax.grad(lambda y: jnp.sum(diffusion(y)))(x)  # d g(x_b) / d x_b,i; zero here
  dW = jnp.sqrt(h) * z
  return x - drift * h + g * dW + 0.5 * g * dg_dx * (dW ** 2 - h)


def build_milstein_sampler(sde: SDE, shape: tuple, num_steps: int, **options) -> base.Sampler:
  """Milstein sampler for the reverse SDE (here equal to Euler-Maruyama, see the module doc).

  Options: eps (sde.default_sampling_eps), time_grid ('uniform'), denoise (False: final Tweedie
  step). nfe = num_steps + [denoise].
  """
  base.check_options("milstein", options, ("eps", "time_grid", "denoise"),
                     generic=base.GENERIC_OPTIONS)
  denoise = base.bool_option(options, "denoise")
  ts = base.sampling_grid(sde, options.get("time_grid", "uniform"), num_steps, options.get("eps"))
  nfe = num_steps + int(denoise)

  def run(key, score_fn, x_T, hook=None):
    x, key_steps = base.initial_state(sde, key, shape, x_T)
    xs = (jnp.arange(num_steps, dtype=jnp.int32), jnp.asarray(ts[:-1], x.dtype),
          jnp.asarray(ts[:-1] - ts[1:], x.dtype), jnp.asarray(ts[1:], x.dtype))

    def step(x, c):
      i, t, h, s = c
      x = milstein_step(sde, score_fn, x, t, h, base.step_normal(key_steps, i, 0, x))
      return base.apply_hook(hook, key, x, s, i), None

    x, _ = lax.scan(step, x, xs)
    return x, jnp.asarray(num_steps, jnp.int32)

  return base.Sampler("milstein", shape, run,
                      dict(denoise=denoise, nfe=nfe, ts=ts, t_end=float(ts[-1])))
