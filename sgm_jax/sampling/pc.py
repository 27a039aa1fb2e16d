"""Predictor-corrector samplers for the reverse SDE (Song et al., ICLR 2021, Sec. 4.2, App. G).

Each of the num_steps steps on a time grid t_0 = T > t_1 > ... > t_n = eps runs the predictor from
t_i to t_{i+1}, then n_steps_each corrector steps at t_{i+1}: the order of the paper's Algorithms 2
and 3 (score_sde's code runs the corrector first, at t_i). Predictors move along the reverse SDE
(Eq. 6) or, with probability_flow, the probability-flow ODE (Eq. 13); correctors are Langevin MCMC
at a fixed time, which leaves p_t invariant. variant='score_sde' is score_sde's own loop instead
(corrector first, its discretizations, its noise removal): sgm_jax/sampling/pc_score_sde.py.

Discretizations between grid points t > s use the SDE's exact Gaussian kernel
x_t = a x_s + G z with a = alpha(t) / alpha(s) and G^2 = sigma(t)^2 - a^2 sigma(s)^2, so on a
uniform grid of N steps `reverse_diffusion` and `ancestral` are SMLD's (VE) and DDPM's (VP) updates.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sgm_jax.errors import InputError, check_positive
from sgm_jax.sampling import base
from sgm_jax.sde_lib import SDE, batch_expand, batch_times

Array = jax.Array

PREDICTORS = ("euler_maruyama", "reverse_diffusion", "ancestral", "none")
CORRECTORS = ("langevin", "ald", "none")
# score_sde's names (its config.sampling.predictor / corrector) that differ from the ones here, for
# the same update; its other names ('euler_maruyama', 'reverse_diffusion', 'none'; 'langevin',
# 'ald', 'none') are the same.
PREDICTOR_ALIASES = {"ancestral_sampling": "ancestral"}
CORRECTOR_ALIASES: dict[str, str] = {}
# 'default': this module's loop; 'score_sde': score_sde's loop as written (pc_score_sde.py).
VARIANTS = ("default", "score_sde")


def predictor_corrector_names(predictor: str, corrector: str) -> tuple[str, str]:
  """The names in PREDICTORS and CORRECTORS of a predictor and corrector named here or by
  score_sde; a ValueError lists the valid names (aliases included) for any other."""
  if isinstance(predictor, str):
    predictor = PREDICTOR_ALIASES.get(predictor, predictor)
  if isinstance(corrector, str):
    corrector = CORRECTOR_ALIASES.get(corrector, corrector)
  base.check_choice("predictor", predictor, PREDICTORS + tuple(PREDICTOR_ALIASES))
  base.check_choice("corrector", corrector, CORRECTORS + tuple(CORRECTOR_ALIASES))
  return predictor, corrector


# --- predictors: one step from t to s = t - h (h > 0) ------------------------------------------
def euler_maruyama_step(sde: SDE, score_fn: Callable, x: Array, t: Array, h: Array, z: Array,
                        probability_flow: bool = False) -> Array:
  """Euler-Maruyama on the reverse SDE (Eq. 6): x - [f - g^2 s] h + g sqrt(h) z.

  With probability_flow, the ODE of Eq. 13: x - [f - g^2 s / 2] h.
  """
  x_mean = x - sde.reverse_drift(score_fn, x, t, probability_flow) * h
  if probability_flow:
    return x_mean
  _, g = sde.sde(x, batch_times(t, x, x.dtype))
  return x_mean + batch_expand(g.astype(x.dtype), x) * jnp.sqrt(h) * z


def reverse_diffusion_step(score_fn: Callable, x: Array, t: Array, a: Array, G2: Array, z: Array,
                           probability_flow: bool = False) -> Array:
  """Reverse diffusion (Song et al. App. E): x - f + G^2 s + G z, with f = (a - 1) x."""
  w = 0.5 if probability_flow else 1.0
  x_mean = (2.0 - a) * x + w * G2 * base.eval_score(score_fn, x, t)
  return x_mean if probability_flow else x_mean + jnp.sqrt(G2) * z


def smld_ancestral_step(score_fn: Callable, x: Array, t: Array, G2: Array, P: Array,
                        z: Array) -> Array:
  """SMLD ancestral step (alpha = 1, Song et al. App. F), sigma = sigma(t), sigma' = sigma(s):
  x + (sigma^2 - sigma'^2) s + sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2) z."""
  return x + G2 * base.eval_score(score_fn, x, t) + jnp.sqrt(P) * z


def ddpm_ancestral_step(score_fn: Callable, x: Array, t: Array, a: Array, beta: Array,
                        z: Array) -> Array:
  """DDPM ancestral step (alpha^2 + sigma^2 = 1, Ho et al. 2020 Alg. 2 in score form):
  (x + beta s) / sqrt(1 - beta) + sqrt(beta) z, with 1 - beta = a^2."""
  return (x + beta * base.eval_score(score_fn, x, t)) / a + jnp.sqrt(beta) * z


# --- correctors: one MCMC step at fixed t -------------------------------------------------------
def _per_sample_norm(v: Array) -> Array:
  return jnp.sqrt(jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=-1))


def langevin_step(score_fn: Callable, x: Array, t: Array, z: Array, snr: float,
                  alpha: Array = 1.0) -> Array:
  """Langevin corrector (Song et al. Alg. 4-5): x + e s + sqrt(2 e) z, e = 2 alpha (snr |z|/|s|)^2.

  |z| and |s| are batch means of per-sample norms on this device (score_sde pmeaned them).
  score_sde also scales e by alpha = DDPM's 1 - beta_i for VP and sub-VP, a factor of about
  1 - beta(t) / N that depends on the SDE's N rather than on the sampling grid; the default pc
  leaves it out (alpha = 1), variant='score_sde' passes it.
  """
  grad = base.eval_score(score_fn, x, t)
  ratio = jnp.mean(_per_sample_norm(z)) / jnp.mean(_per_sample_norm(grad))
  step = 2.0 * alpha * (snr * ratio) ** 2
  return x + step * grad + jnp.sqrt(2.0 * step) * z


def ald_step(score_fn: Callable, x: Array, t: Array, z: Array, snr: float, sigma: Array,
             alpha: Array = 1.0) -> Array:
  """Annealed Langevin dynamics (Song & Ermon 2019, as score_sde's ALD corrector):
  x + e s + sqrt(2 e) z with e = 2 alpha (snr sigma(t))^2 (alpha as in `langevin_step`)."""
  step = 2.0 * alpha * (snr * sigma) ** 2
  return x + step * base.eval_score(score_fn, x, t) + jnp.sqrt(2.0 * step) * z


def _ancestral_form(sde: SDE, alpha: np.ndarray, sigma: np.ndarray) -> str:
  """'smld' where alpha = 1 (VE, tutorial), 'ddpm' where alpha^2 + sigma^2 = 1 (VP)."""
  if np.allclose(alpha, 1.0, rtol=0.0, atol=1e-12):
    return "smld"
  if np.allclose(alpha ** 2 + sigma ** 2, 1.0, rtol=0.0, atol=1e-9):
    return "ddpm"
  raise InputError(f"predictor 'ancestral' is undefined for {type(sde).__name__}: ancestral "
                   "sampling exists for alpha(t) = 1 (VE/SMLD) or alpha^2 + sigma^2 = 1 (VP/DDPM); "
                   "use 'reverse_diffusion' or 'euler_maruyama'")


def _step_coefficients(alpha: np.ndarray, sigma: np.ndarray, lam: np.ndarray) -> dict:
  """Per-step kernel coefficients between t = t_i and s = t_{i+1}, in float64."""
  one_minus = -np.expm1(lam[:-1] - lam[1:])  # 1 - e^{lambda_t - lambda_s} = 1 - a^2 s_s^2 / s_t^2
  log_a = np.log(alpha[:-1]) - np.log(alpha[1:])
  return dict(
      a=np.exp(log_a),
      G2=sigma[:-1] ** 2 * one_minus,   # forward step variance sigma_t^2 - a^2 sigma_s^2
      P=sigma[1:] ** 2 * one_minus,     # posterior variance of x_s given x_t and x_0
      beta=-np.expm1(2.0 * log_a),      # 1 - a^2, DDPM's beta for the step
  )


def checked_pc_options(options: dict, denoise_default: bool) -> tuple:
  """(predictor, corrector, snr, n_steps_each, probability_flow, denoise) of the options that
  every variant shares, with their defaults; an InputError names any bad value."""
  predictor, corrector = predictor_corrector_names(options.get("predictor", "reverse_diffusion"),
                                                   options.get("corrector", "langevin"))
  n_each = options.get("n_steps_each", 1)
  probability_flow = base.bool_option(options, "probability_flow")
  denoise = base.bool_option(options, "denoise", denoise_default)
  if predictor == "none" and corrector == "none":
    raise InputError("predictor and corrector cannot both be 'none'")
  snr = check_positive("snr", options.get("snr", 0.16))
  if isinstance(n_each, bool) or not isinstance(n_each, (int, np.integer)) or n_each < 1:
    raise InputError(f"n_steps_each must be a positive integer, got {n_each!r}")
  if predictor == "ancestral" and probability_flow:
    raise InputError("probability_flow is not defined for the 'ancestral' predictor; "
                     "use 'euler_maruyama' or 'reverse_diffusion'")
  return predictor, corrector, snr, n_each, probability_flow, denoise


def build_pc_sampler(sde: SDE, shape: tuple, num_steps: int, **options) -> base.Sampler:
  """Predictor-corrector sampler (Song et al. 2021, Algorithms 2-3).

  Options: predictor in PREDICTORS ('reverse_diffusion'), corrector in CORRECTORS ('langevin'),
  or score_sde's name for either (PREDICTOR_ALIASES: 'ancestral_sampling' is 'ancestral'),
  snr (0.16), n_steps_each (1), probability_flow (False), denoise (False: final Tweedie step),
  eps (sde.default_sampling_eps), time_grid ('uniform'). nfe = n [predictor] +
  n * n_steps_each [corrector] + [denoise].

  variant (in VARIANTS): 'default' (the above) or 'score_sde', score_sde's `get_pc_sampler` as
  written (pc_score_sde.build_score_sde_pc_sampler: the same options but time_grid, and denoise
  True by default).
  """
  variant = options.pop("variant", "default")
  base.check_choice("variant", variant, VARIANTS)
  if variant != "default":  # get_sampler builds the others (VARIANT_BUILDERS in sampling/__init__)
    raise InputError(f"build_pc_sampler builds variant 'default'; get_sampler('pc', ..., "
                     f"variant={variant!r}) builds the others")
  allowed = ("predictor", "corrector", "snr", "n_steps_each", "probability_flow", "denoise", "eps",
             "time_grid", "variant")
  base.check_options("pc", options, allowed, generic=base.GENERIC_OPTIONS)
  predictor, corrector, snr, n_each, probability_flow, denoise = checked_pc_options(
      options, denoise_default=False)
  ts = base.sampling_grid(sde, options.get("time_grid", "uniform"), num_steps, options.get("eps"))
  alpha, sigma = base.on_host(sde.alpha, ts), base.on_host(sde.sigma, ts)
  coeffs = _step_coefficients(alpha, sigma, base.on_host(sde.log_snr, ts))
  form = None
  if predictor == "ancestral":  # decided on the grid plus a dense probe of [eps, T]
    probe = np.union1d(ts, np.linspace(ts[-1], ts[0], 65))
    form = _ancestral_form(sde, base.on_host(sde.alpha, probe), base.on_host(sde.sigma, probe))
  n_corr = int(n_each) if corrector != "none" else 0
  nfe_steps = num_steps * ((predictor != "none") + n_corr)
  nfe = nfe_steps + int(denoise)

  def predict(score_fn, x, c, z):
    if predictor == "euler_maruyama":
      return euler_maruyama_step(sde, score_fn, x, c["t"], c["h"], z, probability_flow)
    if predictor == "reverse_diffusion":
      return reverse_diffusion_step(score_fn, x, c["t"], c["a"], c["G2"], z, probability_flow)
    if form == "smld":
      return smld_ancestral_step(score_fn, x, c["t"], c["G2"], c["P"], z)
    return ddpm_ancestral_step(score_fn, x, c["t"], c["a"], c["beta"], z)

  def correct(score_fn, x, c, z):
    if corrector == "langevin":
      return langevin_step(score_fn, x, c["s"], z, snr)
    return ald_step(score_fn, x, c["s"], z, snr, c["sigma_s"])

  def run(key, score_fn, x_T, hook=None):
    x, key_steps = base.initial_state(sde, key, shape, x_T)
    xs = dict(coeffs, t=ts[:-1], s=ts[1:], h=ts[:-1] - ts[1:], sigma_s=sigma[1:])
    xs = {k: jnp.asarray(v, x.dtype) for k, v in xs.items()}
    xs["i"] = jnp.arange(num_steps, dtype=jnp.int32)

    def step(x, c):  # predictor t_i -> t_{i+1}, correctors at t_{i+1}; the hook after each
      i = c["i"]
      if predictor != "none":
        x = predict(score_fn, x, c, base.step_normal(key_steps, i, 0, x))
        x = base.apply_hook(hook, key, x, c["s"], i, 0)
      if n_corr:
        def corrector_step(x, j):
          x = correct(score_fn, x, c, base.step_normal(key_steps, i, j + 1, x))
          return base.apply_hook(hook, key, x, c["s"], i, j + 1), None
        x, _ = lax.scan(corrector_step, x, jnp.arange(n_corr, dtype=jnp.int32))
      return x, None

    x, _ = lax.scan(step, x, xs)
    return x, jnp.asarray(nfe_steps, jnp.int32)

  info = dict(variant="default", predictor=predictor, corrector=corrector, snr=snr,
              n_steps_each=n_each, probability_flow=probability_flow, denoise=denoise, nfe=nfe,
              ts=ts, t_end=float(ts[-1]))
  return base.Sampler("pc", shape, run, info)
