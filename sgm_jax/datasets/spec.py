"""What to load and how to process it: `DataSpec`, built from a ConfigDict at the edge.

Also the small conventions every source shares: split names, dataset-name matching and the
[0, 1] <-> model-space scalers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import numpy as np

from sgm_jax.errors import InputError, MissingFileError

Batch = dict[str, np.ndarray]


class DatasetNotFoundError(MissingFileError):
  """The dataset's files are not where we looked; the message says how to get them."""


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What to load and how to process it. `batch_size` / `eval_batch_size` are global (all hosts)."""

  dataset: str
  image_size: int = 32
  num_channels: int = 3
  centered: bool = False
  random_flip: bool = False
  uniform_dequantization: bool = False
  batch_size: int = 128
  eval_batch_size: int = 128
  data_dir: Optional[str] = None  # tfds data_dir, IDX folder, image folder or .npz path
  category: Optional[str] = None  # LSUN category, e.g. 'church_outdoor'
  seed: int = 0  # shuffling, flips and dequantization noise (and toy data)
  shuffle: bool = True
  download: bool = False  # let tfds download and prepare missing data
  toy_num_train: int = 100_000
  toy_num_test: int = 10_000


def from_config(config: Any) -> DataSpec:
  """Build a DataSpec from a score_sde-style ConfigDict (config.data, training, eval, seed)."""
  data = config.data
  get = lambda d, k, default: d.get(k, default) if hasattr(d, "get") else getattr(d, k, default)
  training = get(config, "training", None)
  evaluation = get(config, "eval", None)
  batch_size = int(get(training, "batch_size", 128)) if training is not None else 128
  eval_batch = batch_size if evaluation is None else int(get(evaluation, "batch_size", batch_size))
  return DataSpec(
      dataset=str(data.dataset),
      image_size=int(get(data, "image_size", 32)),
      num_channels=int(get(data, "num_channels", 3)),
      centered=bool(get(data, "centered", False)),
      random_flip=bool(get(data, "random_flip", False)),
      uniform_dequantization=bool(get(data, "uniform_dequantization", False)),
      batch_size=batch_size,
      eval_batch_size=eval_batch,
      data_dir=get(data, "data_dir", None),
      category=get(data, "category", None),
      seed=int(get(data, "seed", get(config, "seed", 0))),
      shuffle=bool(get(data, "shuffle", True)),
      download=bool(get(data, "download", False)),
      toy_num_train=int(get(data, "toy_num_train", 100_000)),
      toy_num_test=int(get(data, "toy_num_test", 10_000)),
  )


def data_scaler(centered: bool) -> Callable:
  """[0, 1] -> model space: [-1, 1] when centered (already applied to every batch here)."""
  return (lambda x: x * 2.0 - 1.0) if centered else (lambda x: x)


def inverse_scaler(centered: bool) -> Callable:
  """Model space -> [0, 1], e.g. for writing samples as images."""
  return (lambda x: (x + 1.0) / 2.0) if centered else (lambda x: x)


def normalize_name(name: str) -> str:
  """Dataset names match ignoring case, '-', '_' and spaces."""
  return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def canonical_split(split: str) -> str:
  """'train' or 'test' ('eval' and 'validation' are the test split) for the local sources."""
  if split in ("train", "test"):
    return split
  if split in ("eval", "validation"):
    return "test"
  raise InputError(f"split must be 'train' or 'test' (alias 'eval') for this dataset, "
                   f"got {split!r}")
