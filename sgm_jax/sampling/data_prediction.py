"""Options on the score and its data prediction x0 = E[x_0 | x_t] that every sampler shares.

- Score scaling: s' = c s at every evaluation, i.e. eps' = c eps (the epsilon scaling of Ning et
  al. 2024, "Elucidating the exposure bias in diffusion models", with c = 1 / lambda); c > 1
  removes high-frequency residue from the samples of an under-fitted network (README: "Score
  scaling").
- Thresholding: clip x0 to the data range, or Imagen's dynamic thresholding (Saharia et al. 2022,
  Sec. 2.3; DPM-Solver++, Lu et al. 2022, Sec. 5), applied through the score:
      x0 = (x + sigma^2 s) / alpha,   x0' = threshold(x0),   s' = (alpha x0' - x) / sigma^2,
  so a sampler written for score_fn(x, t) runs on the thresholded data prediction unchanged.
- The final denoising jump: x0 = E[x_0 | x_eps] by Tweedie's formula at the grid's last time
  (Song et al. 2021, App. G; Jolicoeur-Martineau et al. 2021), one more evaluation.

`get_sampler` (sgm_jax/sampling/__init__.py) takes these options for every sampler and composes
`complete_run` with the un-jitted loop of the sampler it builds: the loop on the scaled, then
thresholded score, then, for samplers built with the option `denoise`, the final jump.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from sgm_jax.errors import InputError
from sgm_jax.sampling import base
from sgm_jax.sde_lib import SDE, batch_expand

Array = jax.Array

THRESHOLDING = ("none", "clip", "dynamic")
DEFAULT_PERCENTILE = 0.995  # Imagen's and DPM-Solver++'s p
DEFAULT_DATA_RANGE = (-1.0, 1.0)


# --- thresholding of x0 -------------------------------------------------------------------------
def clip(x0: Array, data_range: tuple[float, float] = DEFAULT_DATA_RANGE) -> Array:
  """Static thresholding: x0 clipped to data_range (Ho et al. 2020's clipped x0)."""
  return jnp.clip(x0, data_range[0], data_range[1])


def dynamic_threshold(x0: Array, percentile: float = DEFAULT_PERCENTILE,
                      data_range: tuple[float, float] = DEFAULT_DATA_RANGE) -> Array:
  """Dynamic thresholding (Imagen, Saharia et al. 2022, Sec. 2.3; DPM-Solver++ Sec. 5).

  In the centered range u = (x0 - c) / w (c, w: center and half-width of data_range), s is the
  per-sample `percentile` of |u| over all non-batch axes, at least 1; u is clipped to [-s, s] and
  divided by s, then mapped back. Samples with no more than the (1 - percentile) share of values
  outside data_range are clipped; a sample that overshoots further is also shrunk towards c.
  """
  lo, hi = data_range
  center, half_width = 0.5 * (lo + hi), 0.5 * (hi - lo)
  u = (x0 - center) / half_width
  s = jnp.quantile(jnp.abs(u).reshape(u.shape[0], -1), percentile, axis=1)
  s = batch_expand(jnp.maximum(s, 1.0).astype(u.dtype), u)
  u = jnp.clip(u, -s, s) / s
  return jnp.clip(center + half_width * u, lo, hi)  # the clip only removes rounding


def threshold(x0: Array, method: Optional[str], percentile: float = DEFAULT_PERCENTILE,
              data_range: tuple[float, float] = DEFAULT_DATA_RANGE) -> Array:
  """x0 thresholded by `method`: None or 'none' (identity), 'clip' or 'dynamic'."""
  if method is None or method == "none":
    return x0
  if method == "clip":
    return clip(x0, data_range)
  if method == "dynamic":
    return dynamic_threshold(x0, percentile, data_range)
  raise InputError(f"unknown thresholding {method!r}; valid values are {[None, *THRESHOLDING]}")


# --- thresholding through the score -------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _ThresholdedScore:
  """score_fn with its data prediction thresholded: s' = (alpha x0' - x) / sigma^2.

  Hashable and compared by value (like the wrappers of sgm_jax/score.py), so
  `Partial(_ThresholdedScore(...), score_fn)` is a pytree whose static part is this object.
  """

  sde: SDE
  method: str
  percentile: float = DEFAULT_PERCENTILE
  data_range: tuple[float, float] = DEFAULT_DATA_RANGE

  def __call__(self, score_fn: Callable, x: Array, t: Array, *args) -> Array:
    t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    score = score_fn(x, t, *args)
    alpha, sigma = (batch_expand(f(t), x).astype(score.dtype) for f in (self.sde.alpha,
                                                                          self.sde.sigma))
    x0 = (x + sigma ** 2 * score) / alpha  # Tweedie
    x0_thresholded = threshold(x0, self.method, self.percentile, self.data_range)
    # (alpha x0' - x) / sigma^2 written as a correction of the score, so that where x0' = x0 the
    # score is returned exactly (no round trip through x0, which is 1/alpha ~ 150x at VP's T).
    return score + alpha * (x0_thresholded - x0) / sigma ** 2


def thresholded_score_fn(sde: SDE, score_fn: Callable, method: str,
                         percentile: float = DEFAULT_PERCENTILE,
                         data_range: tuple[float, float] = DEFAULT_DATA_RANGE
                         ) -> jax.tree_util.Partial:
  """score_fn whose data prediction is thresholded, as a Partial (a pytree argument of jit)."""
  wrapper = _ThresholdedScore(sde, method, float(percentile), tuple(map(float, data_range)))
  return jax.tree_util.Partial(wrapper, base.as_traceable(score_fn))


# --- score scaling --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _ScaledScore:
  """score_fn times a constant (hashable, compared by value: the static part of a Partial)."""

  scale: float

  def __call__(self, score_fn: Callable, x: Array, t: Array, *args) -> Array:
    score = score_fn(x, t, *args)
    return score * jnp.asarray(self.scale, score.dtype)


def scaled_score_fn(score_fn: Callable, scale: float) -> jax.tree_util.Partial:
  """score_fn times `scale`, as a Partial (a pytree argument of jit)."""
  return jax.tree_util.Partial(_ScaledScore(float(scale)), base.as_traceable(score_fn))


def check_score_scale(score_scale: Any) -> Optional[float]:
  """The score_scale option as a float, None if off (None or 1); raises an InputError naming a
  value that is not a finite number > 0."""
  if score_scale is None:
    return None
  if (isinstance(score_scale, bool) or not isinstance(score_scale, (int, float))
      or not math.isfinite(score_scale) or not score_scale > 0):
    raise InputError(f"score_scale must be a finite number > 0 (1: the score unchanged), got "
                     f"{score_scale!r}")
  return None if score_scale == 1 else float(score_scale)


def complete_run(run: Callable, sde: SDE, num_steps: int, denoise: bool, t_end: float,
                 score_scale: Optional[float] = None, thresholding: Optional[str] = None,
                 threshold_percentile: float = DEFAULT_PERCENTILE,
                 data_range: tuple[float, float] = DEFAULT_DATA_RANGE) -> Callable:
  """The sampler program around a loop `run(key, score_fn, x_T, hook) -> (x, nfe)` of num_steps.

  With `score_scale` the loop runs on that multiple of the score, with `thresholding` on the
  thresholded (and scaled) score. With `denoise` the jump
  x0 = E[x_0 | x_eps] (Tweedie) at t_end follows, one more evaluation (nfe + 1), with alpha(t_end)
  and sigma(t_end) computed on the host; under thresholding the jump's x0 is threshold(x0) up to
  rounding, and thresholding it once more puts the samples exactly in data_range. The hook then
  runs on the result at t = 0 (step num_steps of its keys).
  """
  t_end = float(t_end)
  alpha_end, sigma_end = (float(base.on_host(f, t_end)) for f in (sde.alpha, sde.sigma))

  def complete(key, score_fn, x_T, hook=None):
    if score_scale is not None:
      score_fn = scaled_score_fn(score_fn, score_scale)
    if thresholding is not None:
      score_fn = thresholded_score_fn(sde, score_fn, thresholding, threshold_percentile,
                                      data_range)
    x, nfe = run(key, score_fn, x_T, hook)
    if not denoise:
      return x, nfe
    x = base.tweedie_denoise(score_fn, x, jnp.asarray(t_end, x.dtype),
                             jnp.asarray(alpha_end, x.dtype), jnp.asarray(sigma_end, x.dtype))
    if thresholding is not None:
      x = threshold(x, thresholding, threshold_percentile, data_range)
    return base.apply_hook(hook, key, x, jnp.zeros((), x.dtype), num_steps), nfe + 1

  return complete


# --- option checking ----------------------------------------------------------------------------
def check_thresholding_options(thresholding: Any = None, threshold_percentile: Any = None,
                               data_range: Any = None) -> dict:
  """Validated {'thresholding', 'threshold_percentile', 'data_range'}; thresholding None if off.

  Raises a ValueError naming the bad value and what is allowed.
  """
  if thresholding is not None and (not isinstance(thresholding, str)
                                   or thresholding not in THRESHOLDING):
    raise InputError(f"unknown thresholding {thresholding!r}; valid values are "
                     f"{[None, *THRESHOLDING]}")
  method = None if thresholding in (None, "none") else thresholding
  if threshold_percentile is not None:
    if method != "dynamic":
      raise InputError(f"threshold_percentile={threshold_percentile!r} is an option of "
                       f"thresholding='dynamic', not of thresholding={thresholding!r}")
    if (isinstance(threshold_percentile, bool) or not isinstance(threshold_percentile, (int, float))
        or not 0.0 < threshold_percentile <= 1.0):
      raise InputError(f"threshold_percentile must be a float in (0, 1], got "
                       f"{threshold_percentile!r}")
  if data_range is not None:
    if method is None:
      raise InputError(f"data_range={data_range!r} is an option of thresholding 'clip' or "
                       f"'dynamic', not of thresholding={thresholding!r}")
    if (not isinstance(data_range, (tuple, list)) or len(data_range) != 2
        or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
               for v in data_range)
        or not data_range[0] < data_range[1]):
      raise InputError(f"data_range must be a pair (lo, hi) of finite numbers with lo < hi, got "
                       f"{data_range!r}")
  return dict(
      thresholding=method,
      threshold_percentile=float(DEFAULT_PERCENTILE if threshold_percentile is None
                                 else threshold_percentile),
      data_range=tuple(float(v) for v in (DEFAULT_DATA_RANGE if data_range is None
                                          else data_range)))
