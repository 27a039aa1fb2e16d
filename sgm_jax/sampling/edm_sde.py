"""EDM's stochastic sampler (Karras et al., NeurIPS 2022, Algorithm 2) for any SDE of this project.

In the scaled variable y = x / alpha(t) with noise level rho = sigma / alpha (as in heun.py, Karras
Eq. 4 with s(t) = alpha, sigma_EDM = rho), step i first churns: it raises the noise level and adds
the matching noise (Alg. 2 lines 4-6),
    gamma_i = min(S_churn / n, sqrt(2) - 1) if S_tmin <= rho_i <= S_tmax, else 0,
    rho_hat_i = (1 + gamma_i) rho_i,   y_hat = y_i + sqrt(rho_hat_i^2 - rho_i^2) S_noise z,
then takes heun.py's step of the probability-flow ODE from rho_hat_i to rho_{i+1} (lines 7-10),
Euler on the last step. The fresh noise replaces part of what earlier steps got wrong (the
network's error included) by samples of the right noise level, so the error is not carried to the
end as the ODE carries it. rho_hat is capped at rho(T), since the network has seen no time beyond T
(so the first step, at rho(T), does not churn). With S_churn = 0 this is the sampler 'heun'.
nfe = 2 n - 1 (+ 1 with denoise), as heun.
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

MAX_GAMMA = math.sqrt(2.0) - 1.0  # Alg. 2: at most doubles the noise variance per step
# EDM's value for the VP model (Karras et al. Table 5): gamma = min(S_churn / n, sqrt(2) - 1) is the
# largest churn up to 24 steps, 0.2 at 50. On the mixture oracle at 20 steps (39 nfe), with a score
# off by a constant eps (VP) or by a factor 1.1 (VP, VE), it brings the error of the samples' mean
# or covariance to 0.15-0.55 of heun's (tests/test_sampling_stochastic.py); S_churn 5 and 20 did
# about as well at 20-50 steps. With the exact score churn only adds discretization error (a
# covariance error of 0.18 against heun's 0.07 at 20 steps), and at 10 steps it cost more than it
# corrected for every error tried: there, or for an accurate network, S_churn=0 (heun) is better.
DEFAULT_S_CHURN = 10.0


def _number(name: str, value, allowed: str, ok) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise InputError(f"{name} must be a number ({allowed}), got {value!r}")
  if not ok(float(value)):
    raise InputError(f"{name} must be {allowed}, got {value!r}")
  return float(value)


def churn_options(options) -> tuple[float, float, float, float]:
  """(S_churn, S_tmin, S_tmax, S_noise) from the options, checked; S_tmin, S_tmax in rho units."""
  s_churn = _number("S_churn", options.get("S_churn", DEFAULT_S_CHURN), "finite and >= 0",
                    lambda v: math.isfinite(v) and v >= 0)
  s_tmin = _number("S_tmin", options.get("S_tmin", 0.0), "finite and >= 0",
                   lambda v: math.isfinite(v) and v >= 0)
  s_tmax = _number("S_tmax", options.get("S_tmax", math.inf), f">= S_tmin={s_tmin!r} (inf allowed)",
                   lambda v: v >= s_tmin)
  s_noise = _number("S_noise", options.get("S_noise", 1.0), "finite and > 0",
                    lambda v: math.isfinite(v) and v > 0)
  return s_churn, s_tmin, s_tmax, s_noise


def churned_levels(rho: np.ndarray, s_churn: float, s_tmin: float, s_tmax: float) -> np.ndarray:
  """rho_hat_i = (1 + gamma_i) rho_i of the n steps (Alg. 2 lines 5-6), capped at rho_0 = rho(T)."""
  rho_i = rho[:-1]
  gamma = np.where((rho_i >= s_tmin) & (rho_i <= s_tmax), min(s_churn / rho_i.size, MAX_GAMMA), 0.0)
  return np.minimum((1.0 + gamma) * rho_i, rho[0])


def evaluation_table(sde: SDE, ts: np.ndarray, t_hat: np.ndarray, drho: np.ndarray,
                     noise_std: np.ndarray) -> dict[str, np.ndarray]:
  """One row per score evaluation, in order: the predictor of each step and the corrector of all
  but the last, 2 n - 1 in all. A row holds the time evaluated and its alpha, sigma; the step's
  rho_{i+1} - rho_hat_i; the churn's noise std (0 before a corrector); the step i; whether it is a
  corrector; whether it ends the step, which lands on t_next = t_{i+1} with alpha_next."""
  n = len(ts) - 1
  rows = []
  for i in range(n):
    rows.append((t_hat[i], drho[i], noise_std[i], i, 0, int(i == n - 1)))
    if i < n - 1:
      rows.append((ts[i + 1], drho[i], 0.0, i, 1, 1))
  t, drho, noise, step, corrector, ends = (np.asarray(column) for column in zip(*rows))
  return dict(t=t, alpha=base.on_host(sde.alpha, t), sigma=base.on_host(sde.sigma, t), drho=drho,
              noise=noise, step=step, corrector=corrector, ends=ends, t_next=ts[step + 1],
              alpha_next=base.on_host(sde.alpha, ts[step + 1]))


def build_edm_sde_sampler(sde: SDE, shape: tuple, num_steps: int, **options) -> base.Sampler:
  """EDM stochastic sampler. Options: S_churn (10), S_tmin (0), S_tmax (inf) in rho = sigma/alpha,
  S_noise (1), time_grid ('polynomial_rho'), eps (sde.default_sampling_eps), denoise (False: final
  Tweedie step). nfe = 2 num_steps - 1 + [denoise]."""
  base.check_options("edm_sde", options,
                     ("S_churn", "S_tmin", "S_tmax", "S_noise", "time_grid", "eps", "denoise"),
                     generic=base.GENERIC_OPTIONS)
  s_churn, s_tmin, s_tmax, s_noise = churn_options(options)
  denoise = base.bool_option(options, "denoise")
  ts = base.sampling_grid(sde, options.get("time_grid", "polynomial_rho"), num_steps,
                          options.get("eps"))
  rho = base.on_host(sde.rho, ts)
  rho_hat = churned_levels(rho, s_churn, s_tmin, s_tmax)
  churned = rho_hat > rho[:-1]
  any_churn = bool(churned.any())
  t_hat = np.where(churned, np.minimum(base.on_host(sde.t_from_rho, rho_hat), sde.T), ts[:-1])
  noise_std = s_noise * np.sqrt(rho_hat ** 2 - rho[:-1] ** 2)  # in y; 0 where not churned
  table = evaluation_table(sde, ts, t_hat, rho[1:] - rho_hat, noise_std)
  alpha_start, alpha_end = base.on_host(sde.alpha, ts[[0, -1]])
  nfe = 2 * num_steps - 1 + int(denoise)

  # One scan over the evaluations, so that the score is traced once (as deis.py's Runge-Kutta
  # stages), with y: the point evaluated next; y_hat, d: the current step's start and Euler slope.
  def run(key, score_fn, x_T, hook=None):
    x, key_steps = base.initial_state(sde, key, shape, x_T)
    rows = {k: jnp.asarray(v, jnp.int32 if v.dtype.kind in "iub" else x.dtype)
            for k, v in table.items()}

    def evaluation(carry, row):
      y, y_hat, d = carry
      if any_churn:  # Alg. 2 lines 4-6; no noise before a corrector, none at all without churn
        y = y + row["noise"] * base.step_normal(key_steps, row["step"], 0, y)
      slope = -row["sigma"] * base.eval_score(score_fn, row["alpha"] * y, row["t"])  # dy/drho
      corrector, drho = row["corrector"] == 1, row["drho"]
      y_next = jnp.where(corrector, y_hat + drho * 0.5 * (d + slope), y + drho * slope)
      y_hat, d = jnp.where(corrector, y_hat, y), jnp.where(corrector, d, slope)
      if hook is not None:  # after the step's last evaluation, at t_{i+1}
        at_end = lambda y: base.apply_hook(hook, key, row["alpha_next"] * y, row["t_next"],
                                           row["step"]) / row["alpha_next"]
        y_next = lax.cond(row["ends"] == 1, at_end, lambda y: y, y_next)
      return (y_next, y_hat, d), None

    y = x / jnp.asarray(alpha_start, x.dtype)
    (y, _, _), _ = lax.scan(evaluation, (y, y, jnp.zeros_like(y)), rows)
    return jnp.asarray(alpha_end, x.dtype) * y, jnp.asarray(2 * num_steps - 1, jnp.int32)

  info = dict(S_churn=s_churn, S_tmin=s_tmin, S_tmax=s_tmax, S_noise=s_noise,
              gamma=rho_hat / rho[:-1] - 1.0, denoise=denoise, nfe=nfe, ts=ts, t_end=float(ts[-1]))
  return base.Sampler("edm_sde", shape, run, info)
