"""Files and numbers that several modes write: sample files, per-batch progress files of a
resumable computation, and how far samples overshoot the data range."""
from __future__ import annotations

import logging
import os
import zipfile
from typing import Any

import numpy as np

from sgm_jax import io_utils

OUT_OF_RANGE = 1.1  # |x| above this in the centered range [-1, 1] counts as out of range


def out_of_range_share(x: np.ndarray, centered: bool) -> float:
  """Share of pixels outside [-1.1, 1.1] (centered data; [-0.05, 1.05] for data in [0, 1]),
  before any clipping: how far a sampler's output overshoots the data range."""
  x = np.asarray(x, np.float64)
  return float(np.mean(np.abs(x if centered else 2.0 * x - 1.0) > OUT_OF_RANGE))


def save_samples(samples: np.ndarray, config: Any, path_stem: str) -> dict:
  """Write samples as a PNG (image grid, or a scatter plot for 2-D points) and an .npz."""
  centered = bool(config.data.centered)
  paths = {}
  with io_utils.atomic_write(path_stem + ".npz") as f:
    np.savez(f, samples=samples)
  paths["npz"] = path_stem + ".npz"
  if samples.ndim == 4:
    upscale = max(1, 128 // samples.shape[1])
    paths["png"] = io_utils.save_image_grid(samples, path_stem + ".png",
                                            data_range=(-1.0, 1.0) if centered else (0.0, 1.0),
                                            upscale=upscale)
  else:
    paths["png"] = io_utils.save_scatter(samples, path_stem + ".png")
  return paths


class BatchProgress:
  """Per-batch results of one computation: one small .npz per finished batch in `directory`
  (written atomically), so an interrupted computation resumes where it stopped and each save costs
  one batch, not everything so far."""

  def __init__(self, directory: str):
    self.directory = directory
    self.done: dict[int, dict[str, np.ndarray]] = {}
    os.makedirs(directory, exist_ok=True)
    for name in sorted(os.listdir(directory)):
      if not (name.startswith("batch_") and name.endswith(".npz")):
        continue
      path = os.path.join(directory, name)
      try:
        with np.load(path) as f:
          self.done[int(name[len("batch_"):-len(".npz")])] = {k: f[k] for k in f.files}
      except (ValueError, OSError, KeyError, zipfile.BadZipFile) as e:  # damaged: recompute it
        logging.warning("evaluation progress file %s is unreadable (%s); recomputing that batch",
                        path, e)

  def add(self, i: int, **arrays) -> None:
    """Record (and write) the results of batch i."""
    self.done[i] = {k: np.atleast_1d(np.asarray(v)) for k, v in arrays.items()}
    with io_utils.atomic_write(os.path.join(self.directory, f"batch_{i:06d}.npz")) as f:
      np.savez(f, **self.done[i])

  def gather(self, key: str) -> np.ndarray:
    """`key` of every finished batch, concatenated in batch order."""
    return np.concatenate([np.atleast_1d(self.done[i][key]) for i in sorted(self.done)])
