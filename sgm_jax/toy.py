"""Gaussian mixtures: an exact oracle for scores, densities and samples under every SDE.

p_0 = sum_k w_k N(mu_k, s_k^2 I) in D dimensions (any event shape). Under a forward SDE with kernel
x_t = alpha(t) x_0 + sigma(t) z the perturbed marginal is again a mixture,
    p_t = sum_k w_k N(alpha(t) mu_k, v_k(t) I),   v_k(t) = alpha(t)^2 s_k^2 + sigma(t)^2,
so its log-density, score, noise prediction and denoiser are closed-form. This is what a perfectly
trained score network would output, which makes the mixture both a test fixture and a toy model.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax.errors import InputError
from sgm_jax.sde_lib import SDE, batch_expand

Array = jax.Array

# Above this many (B x K x D) elements, squared distances use the expanded form (a matmul).
_DIRECT_DISTANCE_ELEMENTS = 1 << 22


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GaussianMixture:
  """Isotropic Gaussian mixture with means (K, *event_shape), stds (K,) and weights (K,).

  `labels` (K,) optionally assigns each component a class, for class-conditional experiments.
  """

  means: Array
  stds: Array
  log_weights: Array
  labels: Optional[Array] = None

  @classmethod
  def create(cls, means, stds, weights=None, labels=None) -> "GaussianMixture":
    means = jnp.asarray(means)
    k = means.shape[0]
    stds = jnp.broadcast_to(jnp.asarray(stds, dtype=means.dtype), (k,))
    if weights is None:
      weights = jnp.full((k,), 1.0 / k, dtype=means.dtype)
    weights = jnp.asarray(weights, dtype=means.dtype)
    if weights.shape != (k,):
      raise InputError(f"weights must have shape ({k},) to match means, got {weights.shape}")
    if not np.all(np.asarray(stds) > 0):
      raise InputError(f"component stds must all be > 0, got min {float(jnp.min(stds))}")
    if not np.all(np.asarray(weights) >= 0) or float(weights.sum()) <= 0:
      raise InputError("weights must be non-negative with a positive sum")
    if labels is not None:
      labels = jnp.asarray(labels, dtype=jnp.int32)
      if labels.shape != (k,):
        raise InputError(f"labels must have shape ({k},) to match means, got {labels.shape}")
    log_w = jnp.log(weights) - jnp.log(weights.sum())
    return cls(means=means, stds=stds, log_weights=log_w, labels=labels)

  @classmethod
  def from_images(cls, images, std: float = 0.05, labels=None) -> "GaussianMixture":
    """One equally weighted component of std `std` centred on each image (N, H, W, C)."""
    return cls.create(jnp.asarray(images, dtype=jnp.float32), std, labels=labels)

  @classmethod
  def from_digits(cls, std: float = 0.05, num_images: Optional[int] = None) -> "GaussianMixture":
    """scikit-learn's 1797 8x8 digits scaled to [-1, 1], smoothed by N(0, std^2): a real dataset
    with an exact score. Images have shape (8, 8, 1) and the component labels are the digits."""
    from sklearn.datasets import load_digits  # ships with scikit-learn, no download
    digits = load_digits()
    images = (digits.images / 16.0 * 2.0 - 1.0).astype(np.float32)[..., None]
    labels = digits.target
    if num_images is not None:
      images, labels = images[:num_images], labels[:num_images]
    return cls.from_images(images, std, labels=labels)

  # --- shapes -------------------------------------------------------------------------------
  @property
  def num_components(self) -> int:
    return self.means.shape[0]

  @property
  def event_shape(self) -> tuple:
    return tuple(self.means.shape[1:])

  @property
  def dim(self) -> int:
    return math.prod(self.event_shape)

  @property
  def weights(self) -> Array:
    return jnp.exp(self.log_weights)

  def _flat_means(self) -> Array:
    return self.means.reshape(self.num_components, -1)

  # --- the perturbed mixture p_t ------------------------------------------------------------
  def _alpha_var(self, sde: Optional[SDE], t) -> tuple[Array, Array]:
    """alpha(t) as (B, 1) and component variances v_k(t) as (B, K); B is 1 for p_0 or scalar t."""
    if sde is None:
      return jnp.ones((1, 1), self.means.dtype), (self.stds ** 2)[None, :]
    t = jnp.atleast_1d(jnp.asarray(t, dtype=self.means.dtype))
    alpha, sigma = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    return alpha, (alpha * self.stds[None, :]) ** 2 + sigma ** 2

  def _log_joint(self, x: Array, sde: Optional[SDE], t) -> tuple[Array, Array, Array]:
    """log w_k + log N(x; alpha mu_k, v_k I) as (B, K), with alpha (B|1, 1) and v (B|1, K)."""
    alpha, var = self._alpha_var(sde, t)
    xf = x.reshape(x.shape[0], -1)
    mu = self._flat_means()
    if xf.shape[0] * mu.size <= _DIRECT_DISTANCE_ELEMENTS:
      # Exact squared distances (no cancellation) while the (B, K, D) difference is small.
      sq = ((xf[:, None, :] - alpha[:, :, None] * mu[None]) ** 2).sum(-1)
    else:
      sq = jnp.maximum((xf ** 2).sum(-1, keepdims=True) - 2.0 * alpha * (xf @ mu.T)
                       + alpha ** 2 * (mu ** 2).sum(-1)[None, :], 0.0)
    log_norm = -0.5 * self.dim * jnp.log(2.0 * math.pi * var)
    return self.log_weights[None, :] + log_norm - 0.5 * sq / var, alpha, var

  def log_prob(self, x: Array, sde: Optional[SDE] = None, t=None) -> Array:
    """log p_t(x) as (B,); p_0 itself when sde is None."""
    log_joint, _, _ = self._log_joint(x, sde, t)
    return jax.nn.logsumexp(log_joint, axis=-1)

  def responsibilities(self, x: Array, sde: Optional[SDE] = None, t=None) -> Array:
    """Posterior component probabilities p_t(k | x) as (B, K)."""
    log_joint, _, _ = self._log_joint(x, sde, t)
    return jax.nn.softmax(log_joint, axis=-1)

  def score(self, x: Array, sde: Optional[SDE] = None, t=None) -> Array:
    """grad_x log p_t(x) = sum_k r_k (alpha mu_k - x) / v_k."""
    log_joint, alpha, var = self._log_joint(x, sde, t)
    r_over_v = jax.nn.softmax(log_joint, axis=-1) / var
    xf = x.reshape(x.shape[0], -1)
    s = alpha * (r_over_v @ self._flat_means()) - xf * r_over_v.sum(-1, keepdims=True)
    return s.reshape(x.shape)

  def eps(self, x: Array, sde: SDE, t) -> Array:
    """Optimal noise prediction E[z | x_t] = -sigma(t) score."""
    return -batch_expand(sde.sigma(t), x) * self.score(x, sde, t)

  def denoise(self, x: Array, sde: SDE, t) -> Array:
    """E[x_0 | x_t] by Tweedie's formula: (x + sigma^2 score) / alpha."""
    sigma = batch_expand(sde.sigma(t), x)
    return (x + sigma ** 2 * self.score(x, sde, t)) / batch_expand(sde.alpha(t), x)

  def score_fn(self, sde: SDE):
    """score_fn(x, t) for samplers: the exact score of p_t under `sde`."""
    return lambda x, t: self.score(x, sde, t)

  # --- sampling -------------------------------------------------------------------------------
  def sample(self, key: Array, n: int, sde: Optional[SDE] = None, t=None,
             return_components: bool = False):
    """Exact samples of p_0 (sde None) or p_t; t scalar or (n,). Optionally the component ids."""
    k_comp, k_noise = jax.random.split(key)
    comp = jax.random.categorical(k_comp, self.log_weights, shape=(n,))
    z = jax.random.normal(k_noise, (n,) + self.event_shape, dtype=self.means.dtype)
    if sde is None:
      x = self.means[comp] + batch_expand(self.stds[comp], z) * z
    else:
      t = jnp.broadcast_to(jnp.asarray(t, dtype=self.means.dtype), (n,))
      alpha, var = self._alpha_var(sde, t)
      std = jnp.sqrt(jnp.take_along_axis(var, comp[:, None], axis=1)[:, 0])
      x = batch_expand(alpha[:, 0], z) * self.means[comp] + batch_expand(std, z) * z
    return (x, comp) if return_components else x

  def moments(self, sde: Optional[SDE] = None, t=0.0) -> tuple[Array, Array]:
    """Exact per-dimension mean and variance of p_0 (sde None) or p_t (t scalar), event-shaped."""
    alpha, var = self._alpha_var(sde, None if sde is None else jnp.asarray(t, self.means.dtype))
    w = self.weights
    mu = alpha[0, 0] * self._flat_means()
    mean = w @ mu
    variance = w @ var[0] + w @ (mu ** 2) - mean ** 2
    return mean.reshape(self.event_shape), variance.reshape(self.event_shape)
