"""Time grids tuned to a model: one call that takes the score_fn and returns a grid the samplers
accept (`time_grid=` of every fixed-grid sampler).

    grid = tune_time_grid("unipc", sde, score_fn, (B, H, W, C), num_steps=10, key=key)
    sampler = get_sampler("unipc", sde, shape, 10, time_grid=grid)

At few steps the grid matters as much as the solver: where the flow of the given model bends (for
a mixture, where samples decide on a mode) a step costs more accuracy than elsewhere. Like Align
Your Steps (Sabour et al., 2024) this searches the grid for the model and solver at hand, on a
few warm-up trajectories, but with a plain objective: the RMS error of the sampler's answer
against an accurate solve of the same probability-flow ODE from the same x_T (the "teacher",
the adaptive `ode` sampler at tight tolerances, computed once, with the sampler's own score scale,
thresholding and final denoising jump: `teacher_options`). The grid is parametrized by its
positive increments in sqrt(t) (softmax of free logits, so every candidate is a valid grid from
T to eps), starts from the sampler's default grid and is improved by Nelder-Mead (scipy): every
candidate is one run of the real sampler, so the grid is tuned for exactly the program that will
use it (its order, warm-up and lower-order final steps). Each candidate compiles the sampler
anew (its coefficients are constants of the program), but not the network: the candidates call
the score function through a host callback into one compiled program of it (`compiled_once`).
On the Fashion-MNIST U-Net (5 steps, 128 warm-up draws) that made a candidate ~25 % faster; the
rest is running the network.

The warm-up batch is drawn from the prior with its own key, so a tuned grid is scored fairly on
other draws. Results can be cached in a JSON file (`cache=`), keyed by everything they depend on
except the score function itself, which the caller names (`model_id=`).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax import io_utils
from sgm_jax.errors import InputError, check_positive_int
from sgm_jax.sampling import base
from sgm_jax.sde_lib import SDE

TEACHER_OPTIONS = dict(solver="dopri5", rtol=1e-5, atol=1e-5)
DEFAULT_WARMUP = 256
DEFAULT_MAX_EVALS = 300
INITIAL_SIMPLEX_STEP = 0.5  # logits of the increments: a factor e^0.5 on one step's share


def grid_from_logits(z: np.ndarray, T: float, eps: float) -> np.ndarray:
  """Times from T to eps whose increments in sqrt(t) are the softmax of z (len(z) steps)."""
  w = np.exp(z - np.max(z))
  u = np.concatenate([[0.0], np.cumsum(w / w.sum())])
  ts = (np.sqrt(T) + u * (np.sqrt(eps) - np.sqrt(T))) ** 2
  ts[0], ts[-1] = T, eps
  return ts


def logits_from_grid(ts: np.ndarray) -> np.ndarray:
  """The logits z with grid_from_logits(z, ts[0], ts[-1]) == ts (up to rounding)."""
  return np.log(-np.diff(np.sqrt(np.asarray(ts, np.float64))))


def teacher_options(student_info: dict) -> dict:
  """What the teacher solve shares with the student sampler (from its info): the score scale,
  thresholding and the final denoising jump, so that the grid is tuned for the flow and the end
  point the student really has, not for the plain probability-flow ODE."""
  options = {"denoise": bool(student_info.get("denoise", False))}
  if student_info.get("score_scale") is not None:
    options["score_scale"] = student_info["score_scale"]
  if student_info.get("thresholding") is not None:
    options.update(thresholding=student_info["thresholding"],
                   data_range=tuple(student_info["data_range"]))
    if student_info["thresholding"] == "dynamic":
      options["threshold_percentile"] = student_info["threshold_percentile"]
  return options


def compiled_once(score_fn: Callable) -> Callable:
  """score_fn for programs that are compiled many times around it: each call is a host callback
  into one jitted program of score_fn (compiled once per input shape), so the network is not
  compiled again into every program that calls it. Same values as score_fn; not differentiable."""
  compiled = jax.jit(score_fn)

  def call(x, t):
    return np.asarray(compiled(x, t), dtype=x.dtype)

  def score(x, t):
    return jax.pure_callback(call, jax.ShapeDtypeStruct(x.shape, x.dtype), x, t)

  return score


def rms_error(x: np.ndarray, ref: np.ndarray) -> float:
  d = np.asarray(x, np.float64) - np.asarray(ref, np.float64)
  return float(np.sqrt(np.mean(d * d)))


def _cache_key(sampler_name, sde, shape, num_steps, options, num_warmup, max_evals, model_id,
               seed) -> str:
  def plain(v):
    return np.asarray(v).tolist() if isinstance(v, (np.ndarray, list, tuple)) else v
  return json.dumps(dict(sampler=sampler_name, sde=repr(sde), event_shape=list(shape[1:]),
                         num_steps=num_steps, options={k: plain(v) for k, v in sorted(options.items())},
                         num_warmup=num_warmup, max_evals=max_evals, model_id=model_id, seed=seed),
                    sort_keys=True)


def _read_cache(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def tune_time_grid(sampler_name: str, sde: SDE, score_fn: Callable, shape: tuple, num_steps: int,
                   *, key: jax.Array, num_warmup: int = DEFAULT_WARMUP,
                   max_evals: int = DEFAULT_MAX_EVALS, cache: Optional[str] = None,
                   model_id: Optional[str] = None, write_cache: bool = True,
                   verbose: bool = False, **sampler_options: Any) -> np.ndarray:
  """A time grid for `sampler_name` with `num_steps` steps (and `sampler_options`) tuned to
  score_fn: the float64 array of num_steps + 1 times from T to eps that, among the grids
  Nelder-Mead visits from the sampler's default grid, gives the least RMS error against the
  teacher on a warm-up batch of `num_warmup` draws of x_T (shape[1:] per sample; `key` draws
  them). Pass the result as `time_grid=` to get_sampler with the same sampler and options.

  cache: a JSON file of tuned grids; a grid found there under the same key (sampler, options,
  SDE, shapes, steps, budget, key, model_id) is returned without tuning, a new one is added
  (atomic write; write_cache=False reads only, e.g. in all processes of a job but the first).
  model_id names the score function (e.g. 'workdir/checkpoint_12'), because a function cannot be
  keyed; it is required with `cache`. verbose: progress lines with rate and ETA.
  """
  from sgm_jax.sampling import get_sampler
  import scipy.optimize

  num_steps = check_positive_int("num_steps", num_steps)
  num_warmup = check_positive_int("num_warmup", num_warmup)
  max_evals = check_positive_int("max_evals", max_evals)
  if "time_grid" in sampler_options:
    raise InputError("tune_time_grid chooses the time grid itself; leave time_grid out of the "
                     "sampler options")
  if num_steps < 2:
    raise InputError(f"a grid of {num_steps} step has no free time to tune; use num_steps >= 2")
  if cache is not None and not model_id:
    raise InputError("tune_time_grid with cache= needs model_id= naming the score function "
                     "(e.g. the checkpoint's path), so grids of different models do not mix")
  seed = np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                    else key).tolist()
  entry = _cache_key(sampler_name, sde, shape, num_steps, sampler_options, num_warmup, max_evals,
                     model_id, seed)
  if cache is not None:
    stored = _read_cache(cache).get(entry)
    if stored is not None:
      return base.sampling_grid(sde, np.asarray(stored["time_grid"], np.float64), num_steps, None)

  start = time.perf_counter()
  warmup_shape = (num_warmup,) + tuple(shape[1:])
  default = get_sampler(sampler_name, sde, warmup_shape, num_steps, **sampler_options)
  ts0 = np.asarray(default.info.get("ts"), np.float64) if "ts" in default.info else None
  if ts0 is None or ts0.shape != (num_steps + 1,):
    raise InputError(f"sampler {sampler_name!r} does not run on a time grid of num_steps + 1 "
                     "times; tune_time_grid is for the fixed-grid samplers (deis, ipndm, "
                     "dpm_solver, unipc, ddim, heun, ...)")
  T, eps = float(ts0[0]), float(ts0[-1])
  key_prior, key_run = jax.random.split(key)
  x_T = sde.prior_sampling(key_prior, warmup_shape)
  candidate_score_fn = compiled_once(score_fn)
  if not np.array_equal(*(np.asarray(default(k, candidate_score_fn, x_T=x_T)[0])
                          for k in (key_run, jax.random.fold_in(key_run, 1)))):
    raise InputError(f"sampler {sampler_name!r} with options {sampler_options} draws noise (its "
                     "samples depend on its key); tune_time_grid fits deterministic samplers to "
                     "the probability-flow ODE (deis, unipc, dpm_solver, ipndm, heun, ddim with "
                     "eta=0, ...)")
  teacher = get_sampler("ode", sde, warmup_shape, num_steps, eps=eps,
                        **teacher_options(default.info), **TEACHER_OPTIONS)
  target = np.asarray(teacher(key_run, score_fn, x_T=x_T)[0])
  options = {k: v for k, v in sampler_options.items() if k != "eps"}

  z0 = logits_from_grid(ts0)
  evaluations = [0]
  best = dict(error=np.inf, z=z0)  # the simplex starts at z0: never worse than the default grid

  def objective(z):
    evaluations[0] += 1
    sampler = get_sampler(sampler_name, sde, warmup_shape, num_steps,
                          time_grid=grid_from_logits(z, T, eps), **options)
    error = rms_error(sampler(key_run, candidate_score_fn, x_T=x_T)[0], target)
    if error < best["error"]:
      best.update(error=error, z=np.array(z))
    if verbose and evaluations[0] % 25 == 0:
      rate = evaluations[0] / (time.perf_counter() - start)
      print(f"tune_time_grid {sampler_name}: {evaluations[0]}/{max_evals} runs, "
            f"error {error:.4g}, {rate:.1f} runs/s, ETA {(max_evals - evaluations[0]) / rate:.0f} s",
            flush=True)
    return error if np.isfinite(error) else np.inf

  if verbose:
    print(f"tune_time_grid {sampler_name}, {num_steps} steps: the default grid and the teacher "
          f"ran on {num_warmup} warm-up draws in {time.perf_counter() - start:.0f} s; up to "
          f"{max_evals} candidate grids follow", flush=True)
  start = time.perf_counter()
  simplex = np.vstack([z0, z0 + INITIAL_SIMPLEX_STEP * np.eye(num_steps)])
  scipy.optimize.minimize(objective, z0, method="Nelder-Mead", options=dict(
      initial_simplex=simplex, maxfev=max_evals, xatol=1e-3, fatol=1e-6, adaptive=True))
  ts = base.sampling_grid(sde, grid_from_logits(best["z"], T, eps), num_steps, None)
  if cache is not None and write_cache:
    stored = _read_cache(cache)
    stored[entry] = dict(time_grid=ts.tolist(), warmup_error=float(best["error"]))
    with io_utils.atomic_write(cache, "w") as f:
      json.dump(stored, f, indent=1)
  return ts
