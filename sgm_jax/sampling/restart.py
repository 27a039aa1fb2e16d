"""Restart sampling (Xu et al., "Restart Sampling for Improving Generative Processes", 2023).

In the scaled variable y = x / alpha(t) with noise level rho = sigma / alpha (as in heun.py), the
main backward pass is heun.py's: EDM's Heun steps of the probability-flow ODE
    dy / drho = -sigma(t) score(alpha(t) y, t)
on the main rho grid, Euler on its last step. One restart interval [rho_min, rho_max]: when the
main pass reaches the grid level nearest restart_rho_min (the official code snaps t_min so), it
restarts K = restart_count times (Xu et al. App. B.2, Alg. 2): a jump forward to rho_max with
fresh noise, the forward process in y being y_rho = y_0 + rho z,
    y <- y + sqrt(rho_max^2 - rho_min^2) z,        z ~ N(0, I),
then the ODE back from rho_max to rho_min in restart_steps Heun steps on a Karras grid (Karras et
al. Eq. 5, order 7) between them; then the main pass goes on to eps. The jump takes p_{rho_min} to
p_{rho_max} exactly, so with an exact score every pass keeps the right distribution, while an
error carried down from the earlier steps is contracted by the noise (what Xu et al. bound).
Every restart step ends above rho = 0, so it is a Heun step (2 evaluations):
    nfe = (2 num_steps - 1) + 2 restart_count restart_steps (+ 1 with denoise).
restart_count=0 is the sampler 'heun'.
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

# The official CIFAR-10 VP setting (Newbeeer/diffusion_restart_sampling, benchmarks/
# params_cifar10_vp.txt, first line: 18 main steps and {"0": [3, 2, 0.06, 0.30]}; README: "such
# as {"0": [3, 2, 0.06, 0.30]}"): one interval [0.06, 0.30] in EDM's sigma, which for the VP model
# is sigma / alpha, this project's rho; K = 2; 3 grid points, i.e. 2 Heun steps per backward pass.
# With 18 main steps that is 35 + 8 = 43 nfe, the paper's smallest CIFAR-10 VP budget.
DEFAULT_RHO_MIN = 0.06
DEFAULT_RHO_MAX = 0.30
DEFAULT_COUNT = 2
DEFAULT_STEPS = 2
KARRAS_ORDER = 7.0  # the rho exponent of the restart grid, as the main grid's 'polynomial_rho'


def _count(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def _level(name: str, value, allowed: str, ok) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise InputError(f"{name} must be a number ({allowed}), got {value!r}")
  if not (math.isfinite(float(value)) and ok(float(value))):
    raise InputError(f"{name} must be {allowed}, got {value!r}")
  return float(value)


def restart_options(options, rho_T: float) -> tuple[float, float, int, int]:
  """(rho_min, rho_max, K, restart_steps) from the options, checked; rho in rho = sigma / alpha."""
  rho_min = _level("restart_rho_min", options.get("restart_rho_min", DEFAULT_RHO_MIN),
                   "finite and > 0", lambda v: v > 0)
  rho_max = _level("restart_rho_max", options.get("restart_rho_max", DEFAULT_RHO_MAX),
                   f"finite, > restart_rho_min={rho_min!r} and <= rho(T)={rho_T:.6g}",
                   lambda v: rho_min < v <= rho_T * (1 + 1e-12))
  count = _count("restart_count", options.get("restart_count", DEFAULT_COUNT), 0)
  steps = _count("restart_steps", options.get("restart_steps", DEFAULT_STEPS), 1)
  return rho_min, rho_max, count, steps


def restart_levels(rho_max: float, rho_min: float, steps: int) -> np.ndarray:
  """The restart pass's rho grid from rho_max down to rho_min (Karras et al. Eq. 5)."""
  u = np.linspace(rho_max ** (1 / KARRAS_ORDER), rho_min ** (1 / KARRAS_ORDER), steps + 1)
  levels = u ** KARRAS_ORDER
  levels[0], levels[-1] = rho_max, rho_min
  return levels


def evaluation_table(sde: SDE, ts: np.ndarray, restart_ts: np.ndarray, index: int, count: int,
                     jump_std: float) -> dict[str, np.ndarray]:
  """One row per score evaluation, in order. Main step i: a predictor at ts[i] and, but on the
  last step, a corrector at ts[i + 1]; after main step index - 1, count passes of restart steps,
  each a predictor and a corrector, the first predictor after the jump. A row holds the time
  evaluated and its alpha, sigma; the step's drho; the jump's noise std (0 elsewhere) and number;
  whether it is a corrector; whether it ends the step, which lands on t_next with alpha_next; the
  hook's (step, slot) there and its slot after the jump. Hook keys: main step i (i, 0), as heun;
  the restart's updates (index - 1, 1), (index - 1, 2), ... in order."""
  rows, slots = [], iter(range(1, 10 ** 9))

  def step(t_from, t_to, rho_from, rho_to, heun, hook_step, restart, jump=-1, noise=0.0):
    jump_slot = next(slots) if jump >= 0 else -1
    end_slot = next(slots) if restart else 0
    drho = rho_to - rho_from
    rows.append((t_from, drho, noise, jump, 0, int(not heun), t_to, hook_step, end_slot,
                 jump_slot))
    if heun:
      rows.append((t_to, drho, 0.0, -1, 1, 1, t_to, hook_step, end_slot, -1))

  rho, restart_rho = base.on_host(sde.rho, ts), base.on_host(sde.rho, restart_ts)
  n = len(ts) - 1
  for i in range(n):
    step(ts[i], ts[i + 1], rho[i], rho[i + 1], i < n - 1, i, False)
    if i + 1 == index:
      for k in range(count):
        for j in range(len(restart_ts) - 1):
          step(restart_ts[j], restart_ts[j + 1], restart_rho[j], restart_rho[j + 1], True, i, True,
               jump=k if j == 0 else -1, noise=jump_std if j == 0 else 0.0)
  names = ("t", "drho", "noise", "jump", "corrector", "ends", "t_next", "hook_step", "hook_slot",
           "jump_slot")
  table = dict(zip(names, (np.asarray(column) for column in zip(*rows))))
  table["alpha"] = base.on_host(sde.alpha, table["t"])
  table["sigma"] = base.on_host(sde.sigma, table["t"])
  table["alpha_next"] = base.on_host(sde.alpha, table["t_next"])
  return table


def build_restart_sampler(sde: SDE, shape: tuple, num_steps: int, **options) -> base.Sampler:
  """Restart sampler. Options: restart_rho_min (0.06; snapped to the nearest main grid level),
  restart_rho_max (0.30) in rho = sigma/alpha, restart_count K (2), restart_steps (2 Heun steps
  per backward pass), time_grid ('polynomial_rho'), eps (sde.default_sampling_eps), denoise
  (False: final Tweedie step). nfe = 2 num_steps - 1 + 2 K restart_steps + [denoise]."""
  base.check_options("restart", options,
                     ("restart_rho_min", "restart_rho_max", "restart_count", "restart_steps",
                      "time_grid", "eps", "denoise"), generic=base.GENERIC_OPTIONS)
  denoise = base.bool_option(options, "denoise")
  ts = base.sampling_grid(sde, options.get("time_grid", "polynomial_rho"), num_steps,
                          options.get("eps"))
  rho = base.on_host(sde.rho, ts)
  rho_min, rho_max, count, steps = restart_options(options, float(rho[0]))
  # The official code's snap: the main grid level nearest rho_min (not rho(T), which nothing
  # precedes); the restart passes come after the main step that lands there.
  index = 1 + int(np.argmin(np.abs(rho[1:] - rho_min)))
  if count > 0 and not rho[index] < rho_max:
    raise InputError(f"restart_rho_min={rho_min!r} snaps to the main grid level "
                     f"rho={rho[index]:.6g}, which is not below restart_rho_max={rho_max!r}; "
                     "choose restart_rho_max above it, or more steps")
  restart_rho = restart_levels(rho_max, float(rho[index]), steps)
  restart_ts = np.array(base.on_host(sde.t_from_rho, restart_rho))
  restart_ts[0], restart_ts[-1] = min(restart_ts[0], sde.T), ts[index]
  jump_std = math.sqrt(rho_max ** 2 - rho[index] ** 2)  # y_{rho_max} = y_{rho_min} + this z
  table = evaluation_table(sde, ts, restart_ts, index, count, jump_std)
  alpha_start, alpha_end = base.on_host(sde.alpha, ts[[0, -1]])
  evaluations = 2 * num_steps - 1 + 2 * count * steps
  assert len(table["t"]) == evaluations

  # One scan over the evaluations, so that the score is traced once (as edm_sde.py), with y: the
  # point evaluated next; y_hat, d: the current step's start and Euler slope.
  def run(key, score_fn, x_T, hook=None):
    x, key_steps = base.initial_state(sde, key, shape, x_T)
    rows = {k: jnp.asarray(v, jnp.int32 if v.dtype.kind in "iub" else x.dtype)
            for k, v in table.items()}

    def hooked(y, t, alpha, step, slot):  # hook(x, t, key) on x = alpha y, back to y
      return base.apply_hook(hook, key, alpha * y, t, step, slot) / alpha

    def evaluation(carry, row):
      y, y_hat, d = carry
      if count > 0:  # the restart's forward jump (Alg. 2), none elsewhere
        jump = row["jump"] >= 0
        y = y + row["noise"] * base.step_normal(key_steps, jnp.maximum(row["jump"], 0), 0, y)
        if hook is not None:  # after the jump, at t(rho_max)
          at_jump = lambda y: hooked(y, row["t"], row["alpha"], row["hook_step"], row["jump_slot"])
          y = lax.cond(jump, at_jump, lambda y: y, y)
      slope = -row["sigma"] * base.eval_score(score_fn, row["alpha"] * y, row["t"])  # dy/drho
      corrector, drho = row["corrector"] == 1, row["drho"]
      y_next = jnp.where(corrector, y_hat + drho * 0.5 * (d + slope), y + drho * slope)
      y_hat, d = jnp.where(corrector, y_hat, y), jnp.where(corrector, d, slope)
      if hook is not None:  # after the step's last evaluation, at t_next
        at_end = lambda y: hooked(y, row["t_next"], row["alpha_next"], row["hook_step"],
                                  row["hook_slot"])
        y_next = lax.cond(row["ends"] == 1, at_end, lambda y: y, y_next)
      return (y_next, y_hat, d), None

    y = x / jnp.asarray(alpha_start, x.dtype)
    (y, _, _), _ = lax.scan(evaluation, (y, y, jnp.zeros_like(y)), rows)
    return jnp.asarray(alpha_end, x.dtype) * y, jnp.asarray(evaluations, jnp.int32)

  info = dict(restart_rho_min=rho_min, restart_rho_max=rho_max, restart_count=count,
              restart_steps=steps, restart_interval=(float(rho[index]), rho_max),
              restart_index=index, restart_ts=restart_ts, denoise=denoise,
              nfe=evaluations + int(denoise), ts=ts, t_end=float(ts[-1]))
  return base.Sampler("restart", shape, run, info)
