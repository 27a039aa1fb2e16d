"""What every sampler shares: the calling convention and option checking.

A sampler is built once on the host (time grid and coefficients precomputed) and called as
    x0, nfe = sampler(key, score_fn, x_T=None, hook=None)
where score_fn(x, t) -> score with t a (B,) array. The call runs one jit-compiled program. A plain
Python score_fn is static to that program (one compilation per function object); to reuse the
compiled program with new parameters pass `jax.tree_util.Partial(fn, params)`, whose arguments
are traced.

hook(x, t, key) -> x is a per-step constraint (inpainting's replacement of known pixels, a
projection): each sampler applies it after every update that lands on a time t of its grid (and
after the final denoising step, at t = 0), with a key of its own folded from the call's key, the
step and the update (`apply_hook`). Like score_fn, it is passed as a Partial to reuse the program.
hook=None runs exactly the program without hooks.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax.errors import InputError
from sgm_jax.sde_lib import batch_times

Array = jax.Array


def as_traceable(fn: Callable, call: str = "score_fn(x, t)") -> jax.tree_util.Partial:
  """Wrap fn (a score_fn, or the function `call` names) so it can be an argument of a jitted
  function."""
  if isinstance(fn, jax.tree_util.Partial):
    return fn
  if not callable(fn):
    raise InputError(f"{call.split('(')[0]} must be callable as {call}, got {type(fn).__name__}")
  return jax.tree_util.Partial(fn)


class Sampler:
  """A built sampler: `run(key, score_fn, x_T, hook) -> (x0, nfe)` compiled once with jax.jit.

  `shape` is the batch shape it produces; `x_T` None means: draw x_T from the SDE's prior; `hook`
  None means no per-step hook. `hook_error`, if given, says why this sampler refuses a hook.
  `run` is kept un-jitted, so a wrapper can compose it into one new jitted program (as get_sampler
  does for thresholding, and controllable/ for inpainting).
  """

  def __init__(self, name: str, shape: tuple, run: Callable, info: Optional[Mapping] = None,
               hook_error: Optional[str] = None):
    self.name = name
    self.shape = tuple(shape)
    self.info = dict(info or {})
    self.run = run
    self.hook_error = hook_error
    self._run = jax.jit(run)

  @property
  def accepts_hook(self) -> bool:
    return self.hook_error is None

  def __call__(self, key: Array, score_fn: Callable, x_T: Optional[Array] = None,
               hook: Optional[Callable] = None):
    if x_T is not None and tuple(x_T.shape) != self.shape:
      raise InputError(f"x_T has shape {tuple(x_T.shape)}, but this {self.name} sampler was built "
                       f"for shape {self.shape}")
    if hook is not None:
      self.check_hook()
      hook = as_traceable(hook, "hook(x, t, key)")
    return self._run(key, as_traceable(score_fn), x_T, hook)

  def check_hook(self) -> None:
    """Raise an InputError if this sampler cannot apply a per-step hook."""
    if self.hook_error is not None:
      raise InputError(self.hook_error)

  def __repr__(self):
    return f"Sampler({self.name!r}, shape={self.shape}, {self.info})"


# Options that get_sampler takes for every sampler (sgm_jax/sampling/data_prediction.py).
GENERIC_OPTIONS = ("thresholding", "threshold_percentile", "data_range", "score_scale")


def check_options(sampler_name: str, options: Mapping[str, Any], allowed: Iterable[str],
                  generic: Iterable[str] = ()) -> None:
  """Raise a ValueError naming unknown options and listing the valid ones (`generic`: those that
  get_sampler takes before the builder sees the options, listed separately)."""
  allowed = sorted(allowed)
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    generic = list(generic)
    also = f" (and, for every sampler, {generic})" if generic else ""
    raise InputError(f"unknown option(s) {unknown} for sampler {sampler_name!r}; "
                     f"valid options are {allowed}{also}")


def bool_option(options: Mapping[str, Any], name: str, default: bool = False) -> bool:
  """options[name] (default if absent), which must be a bool: a string such as 'False' is refused
  rather than read as True."""
  value = options.get(name, default)
  if not isinstance(value, (bool, np.bool_)):
    raise InputError(f"{name} must be true or false, got {value!r}")
  return bool(value)


def check_choice(what: str, value: Any, choices: Iterable[str]) -> None:
  choices = sorted(choices)
  if value not in choices:
    raise InputError(f"unknown {what} {value!r}; valid values are {choices}")


# --- helpers shared by the pc, milstein, ode, ddim, heun and dpm_solver samplers ----------------
def on_host(fn: Callable[[Array], Array], t) -> np.ndarray:
  """fn(t) evaluated in float64 on the host, for coefficients precomputed from a time grid; fn
  acts elementwise. A 1-D t is padded (with its last value) to the next power of two, so the
  op-by-op programs JAX compiles for each new length are reused by grids of similar lengths
  (building a sampler of another number of steps compiled them all again: 0.2 s a build)."""
  t = np.asarray(t, dtype=np.float64)
  n = t.shape[0] if t.ndim == 1 else 0
  if n:
    t = np.concatenate([t, np.full(max(8, 1 << (n - 1).bit_length()) - n, t[-1])])
  with jax.enable_x64(True):
    out = np.asarray(fn(jnp.asarray(t, dtype=jnp.float64)), dtype=np.float64)
  return out[:n] if n else out


def initial_state(sde, key: Array, shape: tuple, x_T: Optional[Array]) -> tuple[Array, Array]:
  """(x_T, key for the steps): x_T as given, else drawn from the prior with a key split off."""
  key_prior, key_steps = jax.random.split(key)
  if x_T is None:
    x_T = sde.prior_sampling(key_prior, shape)
  return x_T, key_steps


def eval_score(score_fn: Callable, x: Array, t: Array) -> Array:
  """score_fn at one scalar time t for the whole batch, in x's dtype."""
  return score_fn(x, batch_times(t, x, x.dtype)).astype(x.dtype)


# The hook's keys: fold_in(fold_in(fold_in(key, HOOK_STREAM), step), slot), a stream apart from
# the sampler's own noise (step_normal folds the step into the key directly).
HOOK_STREAM = 0x686F6F6B


def apply_hook(hook: Optional[Callable], key: Array, x: Array, t: Array, step, slot: int = 0
               ) -> Array:
  """hook(x, t, key) after update `slot` of step `step` reached time t; x itself for hook None."""
  if hook is None:
    return x
  k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, HOOK_STREAM), step), slot)
  return hook(x, t, k).astype(x.dtype)


def step_normal(key: Array, step: Array, slot: int, like: Array) -> Array:
  """N(0, I) noise shaped like `like` for update `slot` of step `step` (keys by folding)."""
  k = jax.random.fold_in(jax.random.fold_in(key, step), slot)
  return jax.random.normal(k, like.shape, like.dtype)


def tweedie_denoise(score_fn: Callable, x: Array, t: Array, alpha: Array, sigma: Array) -> Array:
  """E[x_0 | x_t] = (x + sigma(t)^2 score(x, t)) / alpha(t) (Tweedie's formula); one evaluation."""
  return (x + sigma ** 2 * eval_score(score_fn, x, t)) / alpha


def check_grid_eps(ts: np.ndarray, eps) -> None:
  """An explicit grid fixes eps: an eps option must be absent or equal its last point."""
  if eps is not None and not np.isclose(float(eps), ts[-1], rtol=1e-12, atol=0.0):
    raise InputError(f"eps={eps!r} contradicts the explicit time grid, which ends at {ts[-1]!r}; "
                     "leave eps out")


def grid_name(time_grid) -> str:
  """What info['time_grid'] records: the grid's name, or 'explicit' for an array of times."""
  return time_grid if isinstance(time_grid, str) else "explicit"


def sampling_grid(sde, name, num_steps: int, eps: Optional[float]) -> np.ndarray:
  """Host float64 time grid `name` (schedules.TIME_GRIDS) from T to eps (default: the SDE's), or
  `name` itself if it is an array of times (then eps must be None or its last point)."""
  from sgm_jax.sampling import schedules
  if not isinstance(name, str):
    ts = schedules.explicit_time_grid(name, sde, num_steps)
    check_grid_eps(ts, eps)
    return ts
  eps = sde.default_sampling_eps if eps is None else eps
  if isinstance(eps, bool) or not isinstance(eps, (int, float)):
    raise InputError(f"eps must be a float in (0, T={sde.T}), got {eps!r}")
  check_choice("time_grid", name, schedules.TIME_GRIDS)
  return schedules.get_time_grid(name, sde, num_steps, float(eps))
