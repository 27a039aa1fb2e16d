"""score_sde's predictor-corrector sampler as its code runs it: `pc` with variant='score_sde'.

yang-song/score_sde's `sampling.get_pc_sampler` (the sampler of the paper's tables) differs from
this project's default `pc` (sgm_jax/sampling/pc.py) in ways that change the samples of a
converted checkpoint; this variant follows the original:

- the grid is linspace(T, eps, n) (n = num_steps points, not n + 1), and each step runs the
  correctors at t_i first, then the predictor from t_i;
- predictors use score_sde's discretizations on n levels, level k_i = int(t_i (n - 1) / T) of
  grid time t_i (`sde.timestep`): reverse diffusion through `sde.discretize` (SMLD's sigmas for
  VE, DDPM's betas beta_k = beta_min / n + k (beta_max - beta_min) / (n (n - 1)) for VP,
  Euler-Maruyama with dt = T / n for sub-VP), ancestral sampling with the same tables,
  Euler-Maruyama with dt = T / n whatever the grid spacing;
- correctors scale their step by alpha_i = 1 - beta_{k_i} where alpha(t) < 1 (VP, sub-VP), by 1
  for VE;
- noise removal (denoise, on by default as in score_sde) returns the mean x_mean of the last
  predictor step, i.e. that step without its noise, instead of a Tweedie jump (no extra
  evaluation).

The levels are those of n = num_steps (score_sde run with model.num_scales = num_steps), so a
network trained on discrete levels (DDPM, NCSN) needs num_steps = the SDE's N, the command line's
default; then the integer label round((T - t_i)(N - 1)) of a discrete VE network and the level
k_i of the predictor name the same sigma at every step.

Each predictor step is x_mean = A_i x + B_i s(x, t_i), x = x_mean + C_i z, with coefficients
computed on the host in float64; the corrector steps are pc.langevin_step and pc.ald_step with
score_sde's alpha_i. The noise comes from the keys of the default pc (slot 0 for the predictor,
j + 1 for corrector step j); the norms in the Langevin step size are batch means on this device
(score_sde also averaged them over devices with pmean).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sgm_jax.errors import InputError
from sgm_jax.sampling import base, pc
from sgm_jax.sde_lib import SDE

Array = jax.Array


def score_sde_grid(sde: SDE, num_steps: int, eps) -> np.ndarray:
  """score_sde's time grid linspace(T, eps, num_steps), host float64 (eps default: the SDE's)."""
  eps = sde.default_sampling_eps if eps is None else eps
  if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps < sde.T:
    raise InputError(f"eps must be a float in (0, T={sde.T}), got {eps!r}")
  return np.linspace(sde.T, float(eps), num_steps)


def _with_levels(sde: SDE, n: int) -> SDE:
  """The SDE with N = n discrete levels (itself if it has them)."""
  if sde.N == n:
    return sde
  try:
    return dataclasses.replace(sde, N=n)
  except (TypeError, ValueError) as error:
    raise InputError(f"variant 'score_sde' discretizes {type(sde).__name__} on num_steps={n} "
                     f"levels, but its N is fixed at {sde.N}; use num_steps={sde.N}") from error


def _on_host(fn: Callable[[], Array]) -> np.ndarray:
  with jax.enable_x64(True):
    return np.asarray(fn(), dtype=np.float64)


def _linear_in_x(fn: Callable, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(c, g) of fn(x, t) = (c(t) x, g(t)), as the drift and diffusion of every SDE here are."""
  with jax.enable_x64(True):
    f, g = fn(jnp.ones((ts.size, 1), jnp.float64), jnp.asarray(ts, jnp.float64))
    g = np.broadcast_to(np.asarray(g, np.float64), ts.shape).copy()
    return np.array(f, np.float64)[:, 0], g


def _keeps_mean(sde: SDE, ts: np.ndarray) -> bool:
  """alpha(t) = 1 on the grid and a dense probe of it (VE, the tutorial SDE)."""
  probe = np.union1d(ts, np.linspace(ts[-1], ts[0], 65))
  return bool(np.allclose(base.on_host(sde.alpha, probe), 1.0, rtol=0.0, atol=1e-12))


def _levels(sde: SDE, table: str, ts: np.ndarray, why: str) -> tuple[np.ndarray, np.ndarray]:
  """(the SDE's discrete table `table`, the level k_i of each grid time)."""
  if not (hasattr(sde, table) and hasattr(sde, "timestep")):
    raise InputError(f"{why} of variant 'score_sde' needs discrete levels ({table}), which "
                     f"{type(sde).__name__} does not have")
  with jax.enable_x64(True):
    k = np.asarray(sde.timestep(jnp.asarray(ts, jnp.float64)), dtype=np.int64)
  return _on_host(lambda: getattr(sde, table)), k


def predictor_coefficients(sde: SDE, predictor: str, ts: np.ndarray, probability_flow: bool
                           ) -> dict:
  """(A, B, C) of each step x_mean = A x + B s(x, t_i), x = x_mean + C z, for `sde` with N levels
  (score_sde's predictors; probability_flow: the ODE's drift weight 1/2 and no noise)."""
  w = 0.5 if probability_flow else 1.0
  if predictor == "none":
    A, B, C = np.ones_like(ts), np.zeros_like(ts), np.zeros_like(ts)
  elif predictor == "euler_maruyama":  # Eq. 6 / 13, dt = T / N: x - [f - w g^2 s] dt + g sqrt(dt) z
    dt = sde.T / sde.N
    c, g = _linear_in_x(sde.sde, ts)
    A, B, C = 1.0 - c * dt, w * g ** 2 * dt, g * np.sqrt(dt)
  elif predictor == "reverse_diffusion":  # App. E: x - f_i + w G_i^2 s + G_i z (discretize)
    c, G = _linear_in_x(sde.discretize, ts)
    A, B, C = 1.0 - c, w * G ** 2, G
  else:  # ancestral sampling, App. F: SMLD for alpha = 1, DDPM for alpha^2 + sigma^2 = 1
    probe = np.union1d(ts, np.linspace(ts[-1], ts[0], 65))
    form = pc._ancestral_form(sde, base.on_host(sde.alpha, probe), base.on_host(sde.sigma, probe))
    if form == "smld":
      sigmas, k = _levels(sde, "discrete_sigmas", ts, "predictor 'ancestral'")
      sigma, below = sigmas[k], np.where(k == 0, 0.0, sigmas[np.maximum(k - 1, 0)])
      B = sigma ** 2 - below ** 2
      A, C = np.ones_like(ts), np.sqrt(below ** 2 * B / sigma ** 2)
    else:
      betas, k = _levels(sde, "discrete_betas", ts, "predictor 'ancestral'")
      beta = betas[k]
      A, B, C = 1.0 / np.sqrt(1.0 - beta), beta / np.sqrt(1.0 - beta), np.sqrt(beta)
  return dict(A=A, B=B, C=np.zeros_like(ts) if probability_flow else C)


def corrector_alpha(sde: SDE, ts: np.ndarray) -> np.ndarray:
  """score_sde's factor of the corrector step size: DDPM's alphas[k_i] = 1 - beta_{k_i} for SDEs
  with alpha(t) < 1 (VP, sub-VP), 1 otherwise (VE)."""
  if _keeps_mean(sde, ts):
    return np.ones_like(ts)
  betas, k = _levels(sde, "discrete_betas", ts, "the corrector")
  return 1.0 - betas[k]


def build_score_sde_pc_sampler(sde: SDE, shape: tuple, num_steps: int, **options) -> base.Sampler:
  """score_sde's `get_pc_sampler` on num_steps levels (see the module docstring).

  Options as the default pc (predictor, corrector, snr, n_steps_each, probability_flow, eps) with
  denoise True by default (score_sde's noise_removal: the last predictor step without noise);
  no time_grid. nfe = n [predictor] + n * n_steps_each [corrector], counted as run.
  """
  allowed = ("predictor", "corrector", "snr", "n_steps_each", "probability_flow", "denoise", "eps")
  base.check_options("pc (variant='score_sde')", options, allowed, generic=base.GENERIC_OPTIONS)
  predictor, corrector, snr, n_each, probability_flow, denoise = pc.checked_pc_options(
      options, denoise_default=True)
  ts = score_sde_grid(sde, num_steps, options.get("eps"))
  levels = _with_levels(sde, num_steps)
  n_corr = int(n_each) if corrector != "none" else 0
  with np.errstate(invalid="ignore", divide="ignore"):  # checked below
    coeffs = predictor_coefficients(levels, predictor, ts, probability_flow)
    alpha = corrector_alpha(levels, ts) if n_corr else np.ones_like(ts)
  if denoise and predictor != "none":
    coeffs["C"][-1] = 0.0  # x_mean of the last predictor step
  if not all(np.all(np.isfinite(v)) for v in (*coeffs.values(), alpha)):
    raise InputError(f"variant 'score_sde' is undefined on num_steps={num_steps} levels of "
                     f"{sde!r}: a discrete step is not finite (DDPM's betas reach beta_max / "
                     "num_steps, which must stay below 1); use more steps")
  nfe = num_steps * ((predictor != "none") + n_corr)
  # Where each predictor step lands, for the hook: the next grid time, t = 0 after the last.
  t_next = np.append(ts[1:], 0.0)
  table = dict(coeffs, t=ts, t_next=t_next, alpha=alpha, sigma=base.on_host(sde.sigma, ts))

  def run(key, score_fn, x_T, hook=None):
    x, key_steps = base.initial_state(sde, key, shape, x_T)
    xs = {k: jnp.asarray(v, x.dtype) for k, v in table.items()}
    xs["i"] = jnp.arange(num_steps, dtype=jnp.int32)

    def correct(x, c, z):
      if corrector == "langevin":
        return pc.langevin_step(score_fn, x, c["t"], z, snr, c["alpha"])
      return pc.ald_step(score_fn, x, c["t"], z, snr, c["sigma"], c["alpha"])

    def step(x, c):  # correctors at t_i, then the predictor from t_i; the hook after each
      i = c["i"]
      if n_corr:
        def corrector_step(x, j):
          x = correct(x, c, base.step_normal(key_steps, i, j + 1, x))
          return base.apply_hook(hook, key, x, c["t"], i, j + 1), None
        x, _ = lax.scan(corrector_step, x, jnp.arange(n_corr, dtype=jnp.int32))
      if predictor != "none":
        z = base.step_normal(key_steps, i, 0, x)
        x = c["A"] * x + c["B"] * base.eval_score(score_fn, x, c["t"]) + c["C"] * z
        x = base.apply_hook(hook, key, x, c["t_next"], i, 0)
      return x, None

    x, _ = lax.scan(step, x, xs)
    return x, jnp.asarray(nfe, jnp.int32)

  timesteps = None
  if hasattr(levels, "timestep"):
    with jax.enable_x64(True):
      timesteps = np.asarray(levels.timestep(jnp.asarray(ts, jnp.float64)), dtype=np.int64)
  # denoise=False tells get_sampler not to append a Tweedie jump; noise_removal is score_sde's.
  info = dict(variant="score_sde", predictor=predictor, corrector=corrector, snr=snr,
              n_steps_each=n_each, probability_flow=probability_flow, denoise=False,
              noise_removal=denoise and predictor != "none", nfe=nfe, ts=ts,
              t_end=float(ts[-1]), timesteps=timesteps)
  return base.Sampler("pc", shape, run, info)
