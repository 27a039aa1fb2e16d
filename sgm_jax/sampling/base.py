"""What every sampler shares: the calling convention and option checking.

A sampler is built once on the host (time grid and coefficients precomputed) and called as
    x0, nfe = sampler(key, score_fn, x_T=None)
where score_fn(x, t) -> score with t a (B,) array. The call runs one jit-compiled program. A plain
Python score_fn is static to that program (one compilation per function object); to reuse the
compiled program with new parameters pass `jax.tree_util.Partial(fn, params)`, whose arguments
are traced.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def as_traceable(score_fn: Callable) -> jax.tree_util.Partial:
  """Wrap score_fn so it can be an argument of a jitted function."""
  if isinstance(score_fn, jax.tree_util.Partial):
    return score_fn
  if not callable(score_fn):
    raise ValueError(f"score_fn must be callable as score_fn(x, t), got {type(score_fn).__name__}")
  return jax.tree_util.Partial(score_fn)


class Sampler:
  """A built sampler: `run(key, score_fn, x_T) -> (x0, nfe)` compiled once with jax.jit.

  `shape` is the batch shape it produces; `x_T` None means: draw x_T from the SDE's prior.
  """

  def __init__(self, name: str, shape: tuple, run: Callable, info: Optional[Mapping] = None):
    self.name = name
    self.shape = tuple(shape)
    self.info = dict(info or {})
    self._run = jax.jit(run)

  def __call__(self, key: Array, score_fn: Callable, x_T: Optional[Array] = None):
    if x_T is not None and tuple(x_T.shape) != self.shape:
      raise ValueError(f"x_T has shape {tuple(x_T.shape)}, but this {self.name} sampler was built "
                       f"for shape {self.shape}")
    return self._run(key, as_traceable(score_fn), x_T)

  def __repr__(self):
    return f"Sampler({self.name!r}, shape={self.shape}, {self.info})"


def check_options(sampler_name: str, options: Mapping[str, Any], allowed: Iterable[str]) -> None:
  """Raise a ValueError naming unknown options and listing the valid ones."""
  allowed = sorted(allowed)
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} for sampler {sampler_name!r}; "
                     f"valid options are {allowed}")


def check_choice(what: str, value: Any, choices: Iterable[str]) -> None:
  choices = sorted(choices)
  if value not in choices:
    raise ValueError(f"unknown {what} {value!r}; valid values are {choices}")


def batch_times(t: Array, shape: tuple) -> Array:
  """A scalar time as the (B,) array that score_fn and the SDE expect."""
  return jnp.full((shape[0],), t, dtype=jnp.result_type(float))
