"""Denoising error per noise level: how far a score model's noise and data predictions are from
the truth, next to the best any model could do on the same data.

For test images x_0, noise z and x_t = alpha(t) x_0 + sigma(t) z, a score s(x_t, t) gives
    eps_hat = -sigma s,   x0_hat = (x_t + sigma^2 s) / alpha   (Tweedie),
and the per-pixel mean squared errors MSE_eps = |eps_hat - z|^2, MSE_x0 = |x0_hat - x_0|^2, which
are tied by MSE_x0 = (sigma / alpha)^2 MSE_eps. Few-step ODE samplers commit early to x0_hat at
high noise, where a small eps error becomes a large x0 error (sigma / alpha = 150 at the end of
the VP SDE): that is where this diagnostic looks.

The reference is the posterior mean under the empirical distribution of M reference (training)
images, E[x_0 | x_t] = sum_i w_i r_i with w = softmax(-|x_t - alpha r_i|^2 / (2 sigma^2)): the
exact minimizer of the training loss on that set. Where the noise hides the data's fine structure
(high noise) it is the Bayes-optimal denoiser of the data distribution, so a model's error there
should approach it; at low noise it memorizes the reference set and its error on test images says
little (a model may beat it).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax import score as score_lib
from sgm_jax.errors import InputError
from sgm_jax.sde_lib import SDE, batch_expand

Array = jax.Array


def noise_levels(sde: SDE, num: int = 16, eps: Optional[float] = None) -> np.ndarray:
  """`num` times from eps (default: the SDE's sampling eps) to T, uniform in log-SNR."""
  if not isinstance(num, (int, np.integer)) or num < 2:
    raise InputError(f"num (number of noise levels) must be an integer >= 2, got {num!r}")
  eps = sde.default_sampling_eps if eps is None else float(eps)
  with jax.enable_x64(True):
    lam = np.linspace(float(sde.log_snr(jnp.float64(eps))), float(sde.log_snr(jnp.float64(sde.T))),
                      num)
    return np.asarray(sde.t_from_log_snr(jnp.asarray(lam)), np.float64)


def empirical_posterior_mean(reference: Array, x_t: Array, alpha: Array, sigma: Array) -> Array:
  """E[x_0 | x_t] when x_0 is uniform over the M reference images (B, ...): softmax weights."""
  r = reference.reshape(reference.shape[0], -1)
  x = x_t.reshape(x_t.shape[0], -1)
  a, s = alpha.reshape(-1, 1), sigma.reshape(-1, 1)
  # |x - a r|^2 = |x|^2 - 2 a x.r + a^2 |r|^2; the |x|^2 term is constant per row
  logits = (2.0 * a * (x @ r.T) - a ** 2 * jnp.sum(r ** 2, axis=1)[None, :]) / (2.0 * s ** 2)
  w = jax.nn.softmax(logits, axis=1)
  return (w @ r).reshape(x_t.shape)


@dataclasses.dataclass
class DenoisingError:
  """Per-noise-level mean squared errors (per pixel) of eps and x0 predictions."""

  t: np.ndarray
  log_snr: np.ndarray
  eps_mse: np.ndarray
  x0_mse: np.ndarray
  eps_mse_reference: Optional[np.ndarray] = None
  x0_mse_reference: Optional[np.ndarray] = None
  num_examples: int = 0
  num_reference: int = 0

  def as_dict(self) -> dict:
    out = {k: (v.tolist() if isinstance(v, np.ndarray) else v)
           for k, v in dataclasses.asdict(self).items() if v is not None}
    return out


def _errors_at(score_fn: Callable, sde: SDE, x0: Array, z: Array, t: Array,
               reference: Optional[Array]) -> tuple[Array, ...]:
  """(eps MSE, x0 MSE[, reference eps MSE, reference x0 MSE]) per example at one time t (B,)."""
  alpha, sigma = batch_expand(sde.alpha(t), x0), batch_expand(sde.sigma(t), x0)
  x_t = alpha * x0 + sigma * z
  score = score_fn(x_t, t)
  per_example = lambda v: jnp.mean(v.reshape(v.shape[0], -1) ** 2, axis=1)
  eps_hat = score_lib.eps_from_score(sde, score, t)
  x0_hat = score_lib.denoised_from_score(sde, x_t, score, t)  # Tweedie
  out = (per_example(eps_hat - z), per_example(x0_hat - x0))
  if reference is not None:
    x0_ref = empirical_posterior_mean(reference, x_t, alpha, sigma)
    eps_ref = (x_t - alpha * x0_ref) / sigma
    out += (per_example(eps_ref - z), per_example(x0_ref - x0))
  return out


_errors_at_jit = jax.jit(_errors_at, static_argnums=(1,))


def denoising_error(key: Array, score_fn: Callable, sde: SDE, batches: Sequence[Array],
                    ts: np.ndarray, reference: Optional[np.ndarray] = None) -> DenoisingError:
  """Mean squared errors of `score_fn`'s eps and x0 predictions on `batches` of clean images (in
  the model's data range) at each time of `ts`, and those of the empirical posterior mean of
  `reference` images if given. Noise is drawn by folding (batch, level) into `key`.

  `score_fn` should be a jax.tree_util.Partial (sgm_jax.score.get_score_fn) so that one compiled
  program serves every level and batch.
  """
  from sgm_jax.sampling.base import as_traceable
  score_fn = as_traceable(score_fn)
  ts = np.asarray(ts, np.float64)
  ref = None if reference is None else jnp.asarray(reference, jnp.float32)
  sums = np.zeros((4 if ref is not None else 2, len(ts)))
  count = 0
  for b, x0 in enumerate(batches):
    x0 = jnp.asarray(x0, jnp.float32)
    for j, t in enumerate(ts):
      k = jax.random.fold_in(jax.random.fold_in(key, b), j)
      z = jax.random.normal(k, x0.shape, x0.dtype)
      tb = jnp.full((x0.shape[0],), t, jnp.float32)
      errs = _errors_at_jit(score_fn, sde, x0, z, tb, ref)
      sums[:, j] += [float(jnp.sum(e)) for e in errs]
    count += int(x0.shape[0])
  if count == 0:
    raise InputError("denoising_error needs at least one image, got no batches")
  mse = sums / count
  with jax.enable_x64(True):
    lam = np.asarray(sde.log_snr(jnp.asarray(ts)), np.float64)
  return DenoisingError(
      t=ts, log_snr=lam, eps_mse=mse[0], x0_mse=mse[1],
      eps_mse_reference=mse[2] if ref is not None else None,
      x0_mse_reference=mse[3] if ref is not None else None, num_examples=count,
      num_reference=0 if ref is None else int(ref.shape[0]))


def plot_denoising_error(result: DenoisingError, path: str, title: str = "") -> str:
  """Two panels (noise and data prediction MSE against log-SNR), model and reference; PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from sgm_jax.io_utils import atomic_write
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
  panels = (("eps_mse", "noise prediction  |eps_hat - z|^2"),
            ("x0_mse", "data prediction  |x0_hat - x0|^2"))
  for ax, (name, label) in zip(axes, panels):
    ax.semilogy(result.log_snr, getattr(result, name), "o-", label="model")
    ref = getattr(result, name + "_reference")
    if ref is not None:
      ax.semilogy(result.log_snr, ref, "s--", label=f"posterior mean of {result.num_reference} "
                  "train images")
    ax.set_xlabel("log-SNR  log(alpha^2 / sigma^2)   (high noise on the left)")
    ax.set_title(label, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(title or f"denoising error on {result.num_examples} test images, per pixel",
               fontsize=10)
  fig.tight_layout()
  with atomic_write(path) as f:
    fig.savefig(f, format="png")
  plt.close(fig)
  return path
