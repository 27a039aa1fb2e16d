"""Image operations in numpy: fitting images to the spec, then flips and dequantization.

`fit_image(s)` (crop to a square, bicubic resize, channel conversion) keeps uint8 so that uniform
dequantization stays meaningful; it serves every dataset that score_sde does not define. The
datasets it does (CIFAR-10, SVHN, CelebA, LSUN) are fitted as score_sde's `datasets.py` fits them
(`score_sde_fit`): antialiased bilinear resizing of the float image, not rounded back to 8 bits,
and for LSUN at sizes other than 128 a bicubic resize truncated to uint8. `process_images` turns
these raw images (uint8, or float32 on the same 0-255 scale) into the float batches, drawing each
example's flip and dequantization noise from a counter-based generator keyed by its position.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from sgm_jax.errors import InputError

# --- uint8 in, uint8 out ----------------------------------------------------------------------


def center_crop(image: np.ndarray, size: Optional[int] = None) -> np.ndarray:
  """Central size x size crop of (H, W, C); the largest central square when size is None."""
  h, w = image.shape[:2]
  size = min(h, w) if size is None else min(size, h, w)
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


def _cubic(t: np.ndarray, a: float = -0.5) -> np.ndarray:
  """Keys' cubic convolution kernel (a = -0.5), support [-2, 2]."""
  t = np.abs(t)
  return np.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                  np.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, 0.0))


def _triangle(t: np.ndarray) -> np.ndarray:
  """The bilinear (tent) kernel, support [-1, 1]."""
  return np.maximum(0.0, 1.0 - np.abs(t))


RESIZE_KERNELS = {"bicubic": _cubic, "bilinear": _triangle}


@functools.lru_cache(maxsize=32)
def resize_matrix(in_size: int, out_size: int, method: str = "bicubic") -> np.ndarray:
  """(out_size, in_size) interpolation weights of `method` ('bicubic' or 'bilinear') between pixel
  centres, the kernel widened by in_size / out_size when shrinking (antialiasing, as Pillow and
  tf.image.resize(antialias=True) do); taps past the border are dropped and each row renormalized.
  """
  if method not in RESIZE_KERNELS:
    raise InputError(f"unknown resize method {method!r}; valid methods are "
                     f"{sorted(RESIZE_KERNELS)}")
  scale = in_size / out_size
  width = max(scale, 1.0)
  centers = (np.arange(out_size) + 0.5) * scale
  taps = np.arange(in_size) + 0.5
  weights = RESIZE_KERNELS[method]((taps[None, :] - centers[:, None]) / width)
  return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_float(images: np.ndarray, height: int, width: int,
                 method: str = "bicubic") -> np.ndarray:
  """Separable antialiased resize of (..., H, W, C) to (..., height, width, C), float32, values
  neither rounded nor clipped."""
  h, w = images.shape[-3:-1]
  x = np.moveaxis(np.asarray(images, np.float32), -1, -3)  # (..., C, H, W)
  y = resize_matrix(h, height, method) @ x @ resize_matrix(w, width, method).T
  return np.moveaxis(y, -3, -1)


def resize(images: np.ndarray, size: int) -> np.ndarray:
  """Separable bicubic resize of uint8 (..., H, W, C) to (..., size, size, C), rounded to uint8."""
  h, w = images.shape[-3:-1]
  if h == size and w == size:
    return images
  return np.clip(np.rint(resize_float(images, size, size)), 0, 255).astype(np.uint8)


def convert_channels(image: np.ndarray, num_channels: int) -> np.ndarray:
  """Grey -> RGB by repetition, RGB -> grey by ITU-R 601 luma, RGBA -> RGB by dropping alpha."""
  c = image.shape[-1]
  if c == 4:
    image, c = image[..., :3], 3
  if c == num_channels:
    return image
  if c == 1 and num_channels == 3:
    return np.repeat(image, 3, axis=-1)
  if c == 3 and num_channels == 1:
    luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]
  raise InputError(f"cannot convert {c}-channel images to num_channels={num_channels}")


def fit_image(image: np.ndarray, image_size: int, num_channels: int,
              crop: Optional[int] = None) -> np.ndarray:
  """uint8 image of any size -> (image_size, image_size, num_channels) uint8.

  Non-square images are center-cropped to a square first (`crop` fixes the crop size, e.g. 140 for
  CelebA as in score_sde), then resized; resized images are rounded back to uint8 so that uniform
  dequantization stays meaningful.
  """
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.dtype != np.uint8:
    raise InputError(f"expected uint8 images, got {image.dtype}")
  image = convert_channels(image, num_channels)
  if crop is not None or image.shape[0] != image.shape[1]:
    image = center_crop(image, crop)
  return resize(image, image_size)


def fit_images(images: np.ndarray, image_size: int, num_channels: int,
               crop: Optional[int] = None) -> np.ndarray:
  """fit_image over a stack (N, H, W[, C]); a no-op copy-free path when nothing changes."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  n, h, w, c = images.shape
  if c == 4:
    images, c = images[..., :3], 3
  if crop is not None or h != w:
    side = min(h, w) if crop is None else min(crop, h, w)
    top, left = (h - side) // 2, (w - side) // 2
    images = images[:, top:top + side, left:left + side]
  out = np.empty((n, image_size, image_size, c), np.uint8)
  for start in range(0, n, 4096):  # bounded float32 temporaries
    out[start:start + 4096] = resize(images[start:start + 4096], image_size)
  return convert_channels(out, num_channels)


# --- score_sde's fitting of the datasets it defines (its datasets.py) -----------------------------

SCORE_SDE_DATASETS = ("cifar10", "svhn", "celeba", "lsun")  # normalized names
CELEBA_CROP = 140  # score_sde's central crop of the 218 x 178 CelebA images


def _resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
  """score_sde's resize_small: the shorter side to `size`, the other rounded half to even (as
  tf.round), antialiased bilinear, float."""
  h, w = image.shape[:2]
  ratio = size / min(h, w)
  return resize_float(image, int(np.round(h * ratio)), int(np.round(w * ratio)), "bilinear")


def score_sde_fit(image: np.ndarray, dataset: str, image_size: int,
                  num_channels: int) -> np.ndarray:
  """One uint8 image of CIFAR-10, SVHN, CelebA or LSUN fitted as score_sde fits it: float32 on the
  0-255 scale, not rounded (uint8 where nothing is resized, or for LSUN at sizes other than 128).

  - CIFAR-10, SVHN: antialiased bilinear resize to image_size x image_size;
  - CelebA: central 140 x 140 crop, then the shorter side to image_size (antialiased bilinear);
  - LSUN at 128: the shorter side to 128 (antialiased bilinear), then the central crop;
  - LSUN otherwise: central square crop, antialiased bicubic resize, truncated to uint8 (score_sde
    casts with tf.cast, which truncates; values past [0, 255] are clipped here).
  `dataset` is a normalized name (spec.normalize_name).
  """
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.dtype != np.uint8:
    raise InputError(f"expected uint8 images, got {image.dtype}")
  if dataset not in SCORE_SDE_DATASETS:
    raise InputError(f"score_sde defines no fitting for dataset {dataset!r}; it defines "
                     f"{list(SCORE_SDE_DATASETS)}")
  image = convert_channels(image, num_channels)
  same_size = image.shape[:2] == (image_size, image_size)
  if dataset in ("cifar10", "svhn"):
    return image if same_size else resize_float(image, image_size, image_size, "bilinear")
  if dataset == "celeba":
    image = center_crop(image, CELEBA_CROP)
    if image.shape[:2] == (image_size, image_size):
      return image
    return _resize_shorter_side(image, image_size)
  if image_size == 128:
    return center_crop(_resize_shorter_side(image, image_size), image_size)
  image = center_crop(image)
  if image.shape[0] == image_size:
    return image
  resized = resize_float(image, image_size, image_size, "bicubic")
  return np.clip(resized, 0, 255).astype(np.uint8)  # truncation toward zero


# --- uint8 in, float out: flips, dequantization, scaling ----------------------------------------


def _example_rng(seed: int, tag: int, position: int) -> np.random.Generator:
  """Counter-based generator for one example: Philox keyed by (seed, split), counter = position."""
  key = np.array([seed % 2**64, tag], dtype=np.uint64)
  return np.random.Generator(np.random.Philox(key=key, counter=int(position) << 192))


def process_images(raw: np.ndarray, positions: np.ndarray, *, seed: int, tag: int, flip: bool,
                   dequantize: bool, centered: bool) -> np.ndarray:
  """uint8 (or float32 on the 0-255 scale) (n, H, W, C) -> float32 in [0, 1] (or [-1, 1]); flips
  and (x 255 + U) / 256 noise are drawn per example from (seed, tag, position)."""
  x = raw.astype(np.float32)
  if flip or dequantize:
    for j, p in enumerate(positions):
      g = _example_rng(seed, tag, int(p))
      flip_j = g.random() < 0.5  # always drawn, so the noise does not depend on `flip`
      if flip and flip_j:
        x[j] = x[j, :, ::-1]
      if dequantize:
        x[j] += g.random(x.shape[1:], dtype=np.float32)
  x /= np.float32(256.0 if dequantize else 255.0)
  if centered:
    x = x * np.float32(2.0) - np.float32(1.0)
  return x
