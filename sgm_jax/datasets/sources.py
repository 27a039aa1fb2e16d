"""Random access to one split of a dataset: the `Source` protocol and its three kinds.

A source returns raw images already fitted to the spec's size, uint8 (float32 on the 0-255 scale
for the datasets fitted as score_sde fits them, image_ops.score_sde_fit), or float points for the
toy sets, and their labels; scaling, flips and dequantization happen later, in the pipeline.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np


class Source(Protocol):
  """Random access to one split: raw images (already of the spec's size; uint8, or float32 on the
  0-255 scale) or float points."""

  def __len__(self) -> int: ...

  def fetch(self, indices: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]: ...


@dataclasses.dataclass
class ArraySource:
  """An in-memory split: images (N, H, W, C) uint8 (or (N, D) float points) and labels (N,)."""

  images: np.ndarray
  labels: Optional[np.ndarray] = None
  class_names: Optional[list[str]] = None
  is_image: bool = True

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def fetch(self, indices: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
    labels = None if self.labels is None else self.labels[indices]
    return self.images[indices], labels


@dataclasses.dataclass
class TfdsSource:
  """A tfds random-access data source (ArrayRecord, no TensorFlow) fitted per example."""

  records: Sequence[Any]
  fit: Callable[[np.ndarray], np.ndarray]
  label_key: Optional[str] = "label"
  class_names: Optional[list[str]] = None
  is_image: bool = True
  _batched_reads: bool = dataclasses.field(default=True, repr=False)

  def __len__(self) -> int:
    return len(self.records)

  def fetch(self, indices: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
    idx = [int(i) for i in indices]
    records = None
    if self._batched_reads:
      try:  # ArrayRecord reads a batch of records in parallel
        records = self.records.__getitems__(idx)
      except (AttributeError, TypeError):  # absent, or broken as in tfds 4.9's mock_data
        self._batched_reads = False
    if records is None:
      records = [self.records[i] for i in idx]
    images = np.stack([self.fit(np.asarray(r["image"])) for r in records])
    labels = None
    if self.label_key is not None:
      labels = np.array([int(r[self.label_key]) for r in records], np.int32)
    return images, labels

  def all_labels(self) -> Optional[np.ndarray]:
    """Every label of the split (int32), read record by record; None without a label key."""
    if self.label_key is None:
      return None
    return np.array([int(r[self.label_key]) for r in self.records], np.int32)


@dataclasses.dataclass
class FolderSource:
  """Image files read lazily with Pillow; labels from class subfolders when there are any."""

  paths: list[str]
  fit: Callable[[np.ndarray], np.ndarray]
  labels: Optional[np.ndarray] = None
  class_names: Optional[list[str]] = None
  is_image: bool = True

  def __len__(self) -> int:
    return len(self.paths)

  def fetch(self, indices: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
    from PIL import Image
    images = []
    for i in indices:
      with Image.open(self.paths[int(i)]) as im:
        im = im.convert("L" if im.mode in ("L", "I;16", "I", "1") else "RGB")
        images.append(self.fit(np.asarray(im)))
    labels = None if self.labels is None else self.labels[indices]
    return np.stack(images), labels
