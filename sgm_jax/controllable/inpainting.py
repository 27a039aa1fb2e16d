"""Inpainting and colorization by replacing known coordinates (Song et al., ICLR 2021, App. I.2-3).

An inverse problem with known coordinates Omega(x) = y is solved by running any sampler on the
unconditional score with a hook that, after every update landing on time t, overwrites the known
coordinates with a sample of the forward-perturbed data
    y_t = alpha(t) y + sigma(t) z,   z ~ N(0, I)            (the kernel p_{0t}, Eq. 29-33),
so the unknown coordinates follow the reverse dynamics of p_t(x_unknown | y_t). The paper derives
this from the conditional reverse SDE (Eq. 48) with the approximation p_t(x(t) | y) ~ p_t(x(t) |
y_t) for one draw y_t ~ p_{0t}(. | y). It is exact only where y_t carries the evidence of y, i.e.
at noise levels small against the data's own spread. Measured on Gaussian-mixture oracles
(tests/test_controllable.py): PC with a Langevin corrector follows the exact conditional when the
unknown coordinates' modes overlap (separation <~ component std); with well separated unknown
modes the component weights are pulled towards the prior ones (a weight of 0.61 instead of 0.75
for two equal-weight components whose unknown coordinates lie 4 stds apart). Deterministic
samplers have no corrector to re-equilibrate the unknown coordinates and are biased more (0.52
there), even where PC is accurate.

Colorization applies the same replacement in a decoupled colour space: an orthogonal 3x3 matrix M
whose first row is the gray direction (1, 1, 1) / sqrt(3) maps each RGB pixel to (gray, two chroma
channels); the gray channel is known. M is orthogonal, so M z ~ N(0, I) and the forward kernel is
the same in either space.

Every sampler that takes a hook (sampling.get_sampler; 'ode' with a fixed-step solver) inpaints.
The noise z is fresh at each replacement (known_noise='fresh', the default of the SDE samplers 'pc'
and 'milstein') or one z per trajectory (known_noise='fixed', the default of the others), so the
known coordinates of a deterministic sampler follow the straight path alpha(t) y + sigma(t) z, as a
deterministic ODE trajectory through a point mass does. The returned images carry the given known
coordinates exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax.errors import InputError
from sgm_jax.sampling import SAMPLERS, base, get_sampler
from sgm_jax.sde_lib import SDE

Array = jax.Array
Partial = jax.tree_util.Partial

METHODS = tuple(SAMPLERS)  # every sampler takes a hook ('ode' only with a fixed-step solver)
KNOWN_NOISE = ("fresh", "fixed")
_FRESH_BY_DEFAULT = ("pc", "milstein", "edm_sde", "dpm_solver_sde", "restart")  # stochastic
_DEFAULT_OPTIONS = {"ode": {"solver": "euler"}}  # a hook needs fixed steps


# --- the colour basis -------------------------------------------------------------------------
def _color_basis() -> np.ndarray:
  """Rows: gray (1, 1, 1)/sqrt(3), then two orthonormal chroma directions (App. I.3)."""
  return np.array([[1.0, 1.0, 1.0] / np.sqrt(3.0),
                   [-2.0, 1.0, 1.0] / np.sqrt(6.0),
                   [0.0, 1.0, -1.0] / np.sqrt(2.0)])


COLOR_BASIS = _color_basis()  # float64, orthogonal: COLOR_BASIS @ COLOR_BASIS.T = I


def decouple(rgb: Array) -> Array:
  """RGB (..., 3) -> decoupled (gray * sqrt(3), chroma_1, chroma_2): u = M x per pixel."""
  return jnp.einsum("...i,ji->...j", rgb, jnp.asarray(COLOR_BASIS, rgb.dtype))


def couple(u: Array) -> Array:
  """Inverse of `decouple`: x = M^T u (M is orthogonal)."""
  return jnp.einsum("...j,ji->...i", u, jnp.asarray(COLOR_BASIS, u.dtype))


def to_gray(images: Array) -> Array:
  """(..., 1) gray values: (R + G + B) / 3 of (..., 3) images; (..., 1) images as they are."""
  if images.shape[-1] == 1:
    return images
  if images.shape[-1] != 3:
    raise InputError(f"gray images must have 1 or 3 channels, got shape {images.shape}")
  return jnp.mean(images, axis=-1, keepdims=True)


# --- the projection: a sampler hook -------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Replacement:
  """hook(x, t, key): the known coordinates (mask, in u = M x if decoupled, else in x) replaced by
  y_t = alpha(t) y + sigma(t) z, with z drawn from the key (noise None) or the given one."""

  sde: SDE
  decoupled: bool = False

  def project(self, x: Array, known: Array, mask: Array) -> Array:
    if not self.decoupled:
      return jnp.where(mask, known, x)
    return couple(jnp.where(mask, known, decouple(x)))

  def __call__(self, y: Array, mask: Array, noise: Optional[Array], x: Array, t: Array,
               key: Array) -> Array:
    z = jax.random.normal(key, x.shape, x.dtype) if noise is None else noise
    t = jnp.asarray(t, x.dtype)
    y_t = self.sde.alpha(t).astype(x.dtype) * y + self.sde.sigma(t).astype(x.dtype) * z
    return self.project(x, y_t, mask)


def replacement_hook(sde: SDE, known: Array, mask: Array, noise: Optional[Array] = None,
                     decoupled: bool = False) -> Partial:
  """hook(x, t, key) for any sampler: coordinates where `mask` is True set to alpha(t) known +
  sigma(t) z (App. I.2), z fresh from the hook's key or the fixed `noise`. With `decoupled` the
  coordinates are those of the colour space u = M x (`decouple`), as in colorization.
  known, mask and noise are traced: a new image or mask reuses the compiled sampler."""
  return Partial(_Replacement(sde, bool(decoupled)), known, mask, noise)


# --- inpainting and colorization ----------------------------------------------------------------
class _Conditioned:
  """A sampler run with the replacement hook: `run(key, score_fn, known, mask)` in the space of
  the replacement, one jit program."""

  def __init__(self, task: str, method: str, sde: SDE, shape: tuple, num_steps: int,
               decoupled: bool, options: dict):
    base.check_choice(f"{task} method", method, METHODS)
    options = {**_DEFAULT_OPTIONS.get(method, {}), **options}
    known_noise = options.pop("known_noise", "fresh" if method in _FRESH_BY_DEFAULT else "fixed")
    base.check_choice("known_noise", known_noise, KNOWN_NOISE)
    self.sampler = get_sampler(method, sde, shape, num_steps, **options)
    self.sampler.check_hook()
    self.method, self.shape = method, self.sampler.shape
    self.info = {("deis_method" if k == "method" else k): v for k, v in self.sampler.info.items()}
    self.info.update(method=method, known_noise=known_noise)
    replacement = _Replacement(sde, decoupled)
    run_sampler = self.sampler.run

    def run(key, score_fn, known, mask):
      key_prior, key_known, key_sampler = jax.random.split(key, 3)
      noise = None
      if known_noise == "fixed":
        noise = jax.random.normal(key_known, self.shape, known.dtype)
      hook = Partial(replacement, known, mask, noise)
      x_T = sde.prior_sampling(key_prior, self.shape).astype(known.dtype)
      x_T = hook(x_T, jnp.asarray(sde.T, known.dtype), key_known)  # known coordinates at T
      x, nfe = run_sampler(key_sampler, score_fn, x_T, hook)
      return replacement.project(x, known, mask), nfe  # the given known coordinates, exactly

    self.run = jax.jit(run)


class Inpainter(_Conditioned):
  """A built inpainter: `inpaint(key, score_fn, images, mask) -> (x, nfe)`, one jit program.

  mask is 1 (True) where a pixel is known; it broadcasts against `images` (e.g. (H, W, 1)).
  """

  def __init__(self, method: str, sde: SDE, shape: tuple, num_steps: int, /, **options: Any):
    super().__init__("inpainting", method, sde, shape, num_steps, False, options)

  def __call__(self, key: Array, score_fn: Callable, images: Array, mask: Array):
    images = jnp.asarray(images)
    if tuple(images.shape) != self.shape:
      raise InputError(f"images have shape {tuple(images.shape)}, but this inpainter was built "
                       f"for shape {self.shape}")
    mask = jnp.broadcast_to(jnp.asarray(mask) > 0.5, self.shape)
    return self.run(key, base.as_traceable(score_fn), images, mask)

  def __repr__(self):
    return f"Inpainter({self.method!r}, shape={self.shape}, nfe={self.info['nfe']})"


class Colorizer(_Conditioned):
  """A built colorizer: `colorize(key, score_fn, gray_images) -> (rgb, nfe)`, one jit program.

  gray_images are (B, H, W, 1) gray values or (B, H, W, 3) images whose gray value (the channel
  mean) is kept; the result has the same gray value to float precision.
  """

  def __init__(self, method: str, sde: SDE, shape: tuple, num_steps: int, /, **options: Any):
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2 or shape[-1] != 3:
      raise InputError(f"colorization needs RGB batch shape (B, ..., 3), got {shape!r}")
    super().__init__("colorization", method, sde, shape, num_steps, True, options)
    mask = np.zeros(self.shape, bool)
    mask[..., 0] = True  # the gray channel of the decoupled space is known
    self._mask = mask

  def __call__(self, key: Array, score_fn: Callable, gray_images: Array):
    gray_images = jnp.asarray(gray_images)
    if tuple(gray_images.shape[:-1]) != self.shape[:-1] or gray_images.shape[-1] not in (1, 3):
      raise InputError(f"gray_images have shape {tuple(gray_images.shape)}; expected "
                       f"{self.shape[:-1] + (1,)} or {self.shape}")
    known_u = decouple(jnp.broadcast_to(to_gray(gray_images), self.shape))
    return self.run(key, base.as_traceable(score_fn), known_u, jnp.asarray(self._mask))

  def __repr__(self):
    return f"Colorizer({self.method!r}, shape={self.shape}, nfe={self.info['nfe']})"


def get_inpainter(method: str, sde: SDE, shape, num_steps: int = 1000, /,
                  **options) -> Inpainter:
  """Inpainter running the sampler `method` (any of METHODS) for batches of `shape` in
  `num_steps` steps.

  Options: those of the sampler (sampling.get_sampler; 'ode' defaults to solver 'euler', since an
  adaptive solver cannot take the hook), and known_noise ('fresh' for pc and milstein, 'fixed'
  for the others).
  """
  return Inpainter(method, sde, shape, num_steps, **options)


def get_colorizer(method: str, sde: SDE, shape, num_steps: int = 1000, /,
                  **options) -> Colorizer:
  """Colorizer `method` in METHODS for RGB batches of `shape` (B, H, W, 3); options as for
  `get_inpainter`."""
  return Colorizer(method, sde, shape, num_steps, **options)
