"""Toy 2-D distributions: 'toy_gmm2d' (8 Gaussians on a circle), 'moons', 'checkerboard'.

Points are drawn once per split from a generator seeded by (seed, name, split); batches hold
float32 (B, 2) points under 'image' and are not scaled, flipped or dequantized.
"""
from __future__ import annotations

import zlib
from typing import Optional

import numpy as np

from sgm_jax.datasets.sources import ArraySource, Source
from sgm_jax.datasets.spec import DataSpec, canonical_split, normalize_name
from sgm_jax.errors import InputError

TOY_DATASETS = ("toy_gmm2d", "moons", "checkerboard")
TOY_GMM_RADIUS, TOY_GMM_STD, TOY_GMM_COMPONENTS = 2.0, 0.1, 8


def toy_gmm2d_means() -> np.ndarray:
  """The 8 means of 'toy_gmm2d', evenly spaced on a circle of radius 2 (std 0.1 each)."""
  angles = 2 * np.pi * np.arange(TOY_GMM_COMPONENTS) / TOY_GMM_COMPONENTS
  return TOY_GMM_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def toy_gmm2d_mixture():
  """'toy_gmm2d' as a toy.GaussianMixture: its exact score under every SDE."""
  from sgm_jax import toy
  return toy.GaussianMixture.create(toy_gmm2d_means().astype(np.float32), TOY_GMM_STD,
                                    labels=np.arange(TOY_GMM_COMPONENTS))


def sample_toy(name: str, n: int,
               rng: np.random.Generator) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """n points (float32 (n, 2)) and labels of a toy 2-D distribution."""
  if name == "toygmm2d":
    k = rng.integers(TOY_GMM_COMPONENTS, size=n)
    x = toy_gmm2d_means()[k] + TOY_GMM_STD * rng.standard_normal((n, 2))
    return x.astype(np.float32), k.astype(np.int32)
  if name == "moons":  # two interleaved half circles, centred and scaled by 2, noise 0.05 x 2
    k = rng.integers(2, size=n)
    t = rng.uniform(0.0, np.pi, size=n)
    upper = np.stack([np.cos(t), np.sin(t)], 1)
    lower = np.stack([1.0 - np.cos(t), 0.5 - np.sin(t)], 1)
    x = np.where(k[:, None] == 0, upper, lower) + 0.05 * rng.standard_normal((n, 2))
    return (2.0 * (x - np.array([0.5, 0.25]))).astype(np.float32), k.astype(np.int32)
  if name == "checkerboard":  # uniform over the 8 dark cells of a 4x4 board on [-2, 2]^2
    cells = np.array([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0])
    c = cells[rng.integers(len(cells), size=n)]
    x = c - 2.0 + rng.uniform(size=(n, 2))
    return x.astype(np.float32), None
  raise InputError(f"unknown toy dataset {name!r}")


def load_toy(spec: DataSpec, split: str) -> Source:
  """toy_num_train / toy_num_test points of the spec's toy set."""
  split = canonical_split(split)
  name = normalize_name(spec.dataset)
  n = spec.toy_num_train if split == "train" else spec.toy_num_test
  rng = np.random.default_rng([spec.seed, zlib.crc32(name.encode()), zlib.crc32(split.encode())])
  x, labels = sample_toy(name, n, rng)
  return ArraySource(x, labels, is_image=False)
