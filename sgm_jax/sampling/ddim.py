"""DDIM (Song, Meng & Ermon, ICLR 2021) for any SDE with kernel x_t = alpha(t) x_0 + sigma(t) z.

With eps_hat = -sigma(t) score(x_t, t) and x0_hat = (x_t - sigma(t) eps_hat) / alpha(t), a step
from t to s < t is (DDIM Eq. 12)
    x_s = alpha(s) x0_hat + sqrt(sigma(s)^2 - c^2) eps_hat + c z,
    c = eta sigma(s) sqrt(1 - e^{lambda(t) - lambda(s)}),   lambda = log-SNR,
where c^2 at eta = 1 is the variance of the forward posterior q(x_s | x_t, x_0) (DDPM's ancestral
step for VP, SMLD's for VE). eta = 0 is deterministic: the first-order exponential integrator of
the probability-flow ODE (DPM-Solver-1).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sgm_jax.errors import InputError
from sgm_jax.sampling import base
from sgm_jax.sde_lib import SDE

Array = jax.Array


def build_ddim_sampler(sde: SDE, shape: tuple, num_steps: int, **options) -> base.Sampler:
  """DDIM sampler.

  Options: eta (0.0: deterministic; 1.0: ancestral), time_grid ('uniform'), eps
  (sde.default_sampling_eps), denoise (False: final Tweedie step). nfe = num_steps + [denoise].
  """
  base.check_options("ddim", options, ("eta", "time_grid", "eps", "denoise"),
                     generic=base.GENERIC_OPTIONS)
  eta = options.get("eta", 0.0)
  if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
    raise InputError(f"eta must be a float in [0, 1], got {eta!r}")
  eta = float(eta)
  denoise = base.bool_option(options, "denoise")
  ts = base.sampling_grid(sde, options.get("time_grid", "uniform"), num_steps, options.get("eps"))
  alpha, sigma = base.on_host(sde.alpha, ts), base.on_host(sde.sigma, ts)
  lam = base.on_host(sde.log_snr, ts)
  c = eta * sigma[1:] * np.sqrt(-np.expm1(lam[:-1] - lam[1:]))
  # sqrt(sigma_s^2 - c^2) = sigma_s sqrt(1 - eta^2 (1 - e^{lambda_t - lambda_s}))
  eps_coef = sigma[1:] * np.sqrt(1.0 - eta ** 2 * -np.expm1(lam[:-1] - lam[1:]))
  nfe = num_steps + int(denoise)

  def run(key, score_fn, x_T, hook=None):
    x, key_steps = base.initial_state(sde, key, shape, x_T)
    coeffs = (ts[:-1], alpha[:-1], sigma[:-1], alpha[1:], eps_coef, c, ts[1:])
    xs = (jnp.arange(num_steps, dtype=jnp.int32),) + tuple(jnp.asarray(v, x.dtype) for v in coeffs)

    def step(x, row):
      i, t, alpha_t, sigma_t, alpha_s, eps_coef_s, c_s, s = row
      eps_hat = -sigma_t * base.eval_score(score_fn, x, t)
      x0_hat = (x - sigma_t * eps_hat) / alpha_t
      x = alpha_s * x0_hat + eps_coef_s * eps_hat
      if eta > 0.0:
        x = x + c_s * base.step_normal(key_steps, i, 0, x)
      return base.apply_hook(hook, key, x, s, i), None

    x, _ = lax.scan(step, x, xs)
    return x, jnp.asarray(num_steps, jnp.int32)

  return base.Sampler("ddim", shape, run,
                      dict(eta=eta, denoise=denoise, nfe=nfe, ts=ts, t_end=float(ts[-1])))
