"""Latent codes through the probability-flow ODE (Song et al., ICLR 2021, Sec. 4.3 and App. D):
encode, decode, spherical interpolation between latents, and PNG strips of the decoded path.

The probability-flow ODE (Eq. 13) is a deterministic, invertible map between data at t = eps and
latents z at t = T, which are approximately N(0, prior_std^2 I). Interpolating two latents along a
great circle (slerp, Shoemake 1985; the usual choice for Gaussian latents, whose norms concentrate)
and decoding gives a path of images between the two inputs.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax import likelihood
from sgm_jax.errors import InputError
from sgm_jax.sampling import base
from sgm_jax.sde_lib import SDE

Array = jax.Array

get_encode_fn = likelihood.get_encode_fn  # encode(score_fn, x) -> (z, nfe)
get_decode_fn = likelihood.get_decode_fn  # decode(score_fn, z) -> (x, nfe)


def slerp(z_a: Array, z_b: Array, lambdas: Array) -> Array:
  """Spherical interpolation (n, *shape) of two arrays of the same shape at weights lambdas (n,):
      z(l) = sin((1 - l) theta) / sin(theta) z_a + sin(l theta) / sin(theta) z_b,
  theta the angle between z_a and z_b; linear where they are (anti)parallel to float precision.
  z(0) = z_a and z(1) = z_b exactly.
  """
  z_a, z_b = jnp.asarray(z_a), jnp.asarray(z_b)
  if z_a.shape != z_b.shape:
    raise InputError(f"latents must have the same shape, got {z_a.shape} and {z_b.shape}")
  lam = jnp.asarray(lambdas, z_a.dtype)
  a, b = z_a.reshape(-1), z_b.reshape(-1)
  cos = jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))
  theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
  sin_theta = jnp.sin(theta)
  spherical = sin_theta > 1e-6
  safe_sin = jnp.where(spherical, sin_theta, 1.0)
  w_a = jnp.where(spherical, jnp.sin((1.0 - lam) * theta) / safe_sin, 1.0 - lam)
  w_b = jnp.where(spherical, jnp.sin(lam * theta) / safe_sin, lam)
  path = w_a[:, None] * a[None, :] + w_b[:, None] * b[None, :]
  path = jnp.where((lam == 0.0)[:, None], a[None, :], path)  # exact ends despite rounding
  path = jnp.where((lam == 1.0)[:, None], b[None, :], path)
  return path.reshape(lam.shape + z_a.shape)


def _interpolation_weights(num_points: int) -> np.ndarray:
  if (isinstance(num_points, bool) or not isinstance(num_points, (int, np.integer))
      or num_points < 2):
    raise InputError(f"num_points must be an integer >= 2, got {num_points!r}")
  return np.linspace(0.0, 1.0, int(num_points))


@functools.lru_cache(maxsize=32)
def get_interpolator(sde: SDE, num_points: int, rtol: float = 1e-5, atol: float = 1e-5,
                     eps: float = 1e-5, solver: str = "dopri5", max_steps: int = 4096) -> Callable:
  """interp(score_fn, x_a, x_b) -> (images (n, *shape), latents (n, *shape), nfe): encode both
  inputs (one ODE solve), slerp the latents, decode the n points (one solve); one jit program."""
  lambdas = _interpolation_weights(num_points)
  encode = likelihood.get_encode_fn(sde, rtol, atol, eps, solver, max_steps)
  decode = likelihood.get_decode_fn(sde, rtol, atol, eps, solver, max_steps)

  @jax.jit
  def run(score_fn, x_a, x_b):
    z, nfe_encode = encode(score_fn, jnp.stack([x_a, x_b]))
    path = slerp(z[0], z[1], lambdas)
    images, nfe_decode = decode(score_fn, path)
    return images, path, nfe_encode + nfe_decode

  def interp(score_fn: Callable, x_a: Array, x_b: Array):
    x_a, x_b = jnp.asarray(x_a), jnp.asarray(x_b)
    if x_a.shape != x_b.shape:
      raise InputError(f"x_a and x_b must have the same (unbatched) shape, got {x_a.shape} and "
                       f"{x_b.shape}")
    return run(base.as_traceable(score_fn), x_a, x_b)

  return interp


def interpolate(score_fn: Callable, sde: SDE, x_a: Array, x_b: Array, num_points: int = 8,
                **options) -> Array:
  """Images (num_points, *shape) decoded along the slerp path between the latents of the single
  examples x_a and x_b (shape without batch axis). Options: rtol, atol, eps, solver, max_steps of
  the probability-flow solves. The first and last images reconstruct x_a and x_b."""
  images, _, _ = get_interpolator(sde, num_points, **options)(score_fn, x_a, x_b)
  return images


def save_interpolation_strip(images: Array, path: str,
                             data_range: tuple[float, float] = (-1.0, 1.0),
                             upscale: int = 1) -> str:
  """Write (n, H, W, C) images as a one-row PNG strip; returns the path."""
  from sgm_jax.io_utils import save_image_grid
  images = np.asarray(images)
  return save_image_grid(images, path, nrow=images.shape[0], data_range=data_range,
                         upscale=upscale)


def interpolation_strip(score_fn: Callable, sde: SDE, x_a: Array, x_b: Array, path: str,
                        num_points: int = 8, data_range: tuple[float, float] = (-1.0, 1.0),
                        upscale: int = 1, **options) -> Array:
  """`interpolate` and write the path as a PNG strip at `path`; returns the images."""
  images = interpolate(score_fn, sde, x_a, x_b, num_points, **options)
  save_interpolation_strip(images, path, data_range, upscale)
  return images
