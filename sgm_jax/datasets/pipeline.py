"""`Dataset`: position-addressed, resumable batches of one dataset, and `get_dataset`.

The training stream is the concatenation of one permutation per epoch (numpy Generator seeded by
(seed, split, epoch)); global batch `b` is stream positions [b B, (b + 1) B), and host h of P takes
the h-th slice of it. Each example's flip and dequantization noise come from (seed, split,
position) (`image_ops.process_images`), so a batch is a pure function of its step.
"""
from __future__ import annotations

import threading
import zlib
from typing import Any, Callable, Iterator, Optional

import numpy as np

from sgm_jax.datasets.image_ops import process_images
from sgm_jax.datasets.prefetch import Prefetch
from sgm_jax.datasets.registry import load_source
from sgm_jax.datasets.sources import Source, TfdsSource
from sgm_jax.datasets.spec import Batch, DataSpec, from_config
from sgm_jax.errors import InputError


def _device_layout(batch: Batch, num_devices: int) -> Batch:
  """Leading axis B -> (num_devices, B / num_devices), score_sde's pmap layout."""
  out = {}
  for k, v in batch.items():
    if v.shape[0] % num_devices:
      raise InputError(f"local batch of {v.shape[0]} is not divisible by {num_devices} devices")
    out[k] = v.reshape((num_devices, v.shape[0] // num_devices) + v.shape[1:])
  return out


def _stack(batches: list[Batch], axis: int) -> Batch:
  return {k: np.stack([b[k] for b in batches], axis=axis) for k in batches[0]}


def _host_slice(global_batch: int, process_index: Optional[int],
                process_count: Optional[int]) -> tuple[int, int]:
  """(offset, size) of this host's part of a global batch."""
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise InputError(f"process_index={process_index} out of range for {process_count} processes")
  if global_batch % process_count:
    raise InputError(f"batch size {global_batch} is not divisible by {process_count} processes")
  size = global_batch // process_count
  return process_index * size, size


def _finish(group: list[Batch], steps_per_call: Optional[int], device_layout: bool,
            num_devices: Optional[int], images_only: bool, as_jax: bool):
  """Lay out the batches of one call: device axis, fused steps, image only, on device."""
  if device_layout:
    if num_devices is None:
      import jax
      num_devices = jax.local_device_count()
    group = [_device_layout(b, num_devices) for b in group]
  batch = group[0] if steps_per_call is None else _stack(group, axis=1 if device_layout else 0)
  out = batch["image"] if images_only else batch
  if as_jax:
    import jax
    out = jax.device_put(out)
  return out


def _split_key(split: str) -> str:
  return "test" if split == "eval" else split


class Dataset:
  """Splits of one dataset, loaded lazily, with position-addressed (resumable) batches."""

  def __init__(self, spec: DataSpec):
    self.spec = spec
    self._sources: dict[str, Source] = {}
    self._permutations: dict[tuple, np.ndarray] = {}
    self._lock = threading.Lock()

  def source(self, split: str) -> Source:
    split = _split_key(split)
    with self._lock:
      if split not in self._sources:
        self._sources[split] = load_source(self.spec, split)
      return self._sources[split]

  def num_examples(self, split: str) -> int:
    return len(self.source(split))

  def labels(self, split: str) -> Optional[np.ndarray]:
    """All class labels of a split (int32), or None when the source has none."""
    source = self.source(split)
    if isinstance(source, TfdsSource):
      return source.all_labels()
    return getattr(source, "labels", None)

  def class_names(self, split: str = "train") -> Optional[list[str]]:
    return getattr(self.source(split), "class_names", None)

  def _permutation(self, split: str, epoch: int, n: int) -> np.ndarray:
    """The order of `epoch`: a permutation seeded by (seed, split, epoch); the last few kept."""
    key = (split, epoch, n)
    with self._lock:
      perm = self._permutations.get(key)
    if perm is None:
      rng = np.random.default_rng([self.spec.seed, zlib.crc32(split.encode()), epoch])
      perm = rng.permutation(n)
      with self._lock:
        self._permutations[key] = perm
        while len(self._permutations) > 4:
          self._permutations.pop(next(iter(self._permutations)))
    return perm

  def _make_batch(self, split: str, positions: np.ndarray, indices: np.ndarray, train: bool,
                  dequantize: bool) -> Batch:
    source = self.source(split)
    images, labels = source.fetch(indices)
    if getattr(source, "is_image", True):
      images = process_images(images, positions, seed=self.spec.seed,
                              tag=zlib.crc32(split.encode()), flip=train and self.spec.random_flip,
                              dequantize=dequantize, centered=self.spec.centered)
    batch = {"image": images, "index": indices.astype(np.int64)}
    if labels is not None:
      batch["label"] = np.asarray(labels, np.int32)
    return batch

  def train_batch(self, step: int, *, split: str = "train", process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> Batch:
    """This host's part of global training batch `step` (a pure function of the step)."""
    split = _split_key(split)
    offset, size = _host_slice(self.spec.batch_size, process_index, process_count)
    n = self.num_examples(split)
    positions = step * self.spec.batch_size + offset + np.arange(size, dtype=np.int64)
    epochs, within = np.divmod(positions, n)
    if self.spec.shuffle:
      indices = np.empty_like(positions)
      for e in np.unique(epochs):
        sel = epochs == e
        indices[sel] = self._permutation(split, int(e), n)[within[sel]]
    else:
      indices = within
    return self._make_batch(split, positions, indices, True, self.spec.uniform_dequantization)

  def num_eval_batches(self, split: str = "test", drop_remainder: bool = False) -> int:
    n, b = self.num_examples(split), self.spec.eval_batch_size
    return n // b if drop_remainder else -(-n // b)

  def eval_batch(self, i: int, *, split: str = "test", process_index: Optional[int] = None,
                 process_count: Optional[int] = None,
                 uniform_dequantization: Optional[bool] = None) -> Batch:
    """This host's part of eval batch i, in dataset order; padding past the end has mask False."""
    split = _split_key(split)
    offset, size = _host_slice(self.spec.eval_batch_size, process_index, process_count)
    n = self.num_examples(split)
    positions = i * self.spec.eval_batch_size + offset + np.arange(size, dtype=np.int64)
    mask = positions < n
    dequantize = (self.spec.uniform_dequantization if uniform_dequantization is None
                  else uniform_dequantization)
    valid = positions[mask]
    if valid.size == 0:  # this host's slice is all padding: shapes from example 0
      valid = np.zeros(1, np.int64)
    batch = self._make_batch(split, valid, valid, False, dequantize)
    if not mask.all():
      padded = {}
      for k, v in batch.items():
        full = np.zeros((size,) + v.shape[1:], v.dtype)
        full[mask] = v[:int(mask.sum())]
        padded[k] = full
      batch = padded
    batch["mask"] = mask
    return batch

  def train_iterator(self, start_step: int = 0, *, process_index: Optional[int] = None,
                     process_count: Optional[int] = None, device_layout: bool = False,
                     num_devices: Optional[int] = None, steps_per_call: Optional[int] = None,
                     images_only: bool = False, prefetch: int = 2,
                     as_jax: bool = False) -> Iterator:
    """Infinite training batches from global step `start_step` on.

    device_layout: shape (num_devices, per_device, ...) (default jax.local_device_count());
    steps_per_call k: stack k consecutive steps, (k, B, ...) or (devices, k, per_device, ...) as
    score_sde's additional_dim; images_only: yield the 'image' array alone.
    """
    def batches():
      step = start_step
      while True:
        group = []
        for _ in range(steps_per_call or 1):
          group.append(self.train_batch(step, process_index=process_index,
                                        process_count=process_count))
          step += 1
        yield _finish(group, steps_per_call, device_layout, num_devices, images_only, as_jax)
    return Prefetch(batches(), prefetch) if prefetch else batches()

  def eval_iterator(self, split: str = "test", *, process_index: Optional[int] = None,
                    process_count: Optional[int] = None, drop_remainder: bool = False,
                    uniform_dequantization: Optional[bool] = None, device_layout: bool = False,
                    num_devices: Optional[int] = None, prefetch: int = 2,
                    as_jax: bool = False) -> Iterator[Batch]:
    """One pass over a split in order; the last partial batch is padded (mask) or dropped. Every
    host yields the same number of batches (needed by collective ops)."""
    def batches():
      for i in range(self.num_eval_batches(split, drop_remainder)):
        batch = self.eval_batch(i, split=split, process_index=process_index,
                                process_count=process_count,
                                uniform_dequantization=uniform_dequantization)
        yield _finish([batch], None, device_layout, num_devices, False, as_jax)
    return Prefetch(batches(), prefetch) if prefetch else batches()

  def batches_fn(self, **kwargs) -> Callable[[int], Iterator[np.ndarray]]:
    """start_step -> image batches (local_batch, ...), the form train.train_loop takes."""
    return lambda start_step: self.train_iterator(start_step, images_only=True, **kwargs)


def get_dataset(spec: DataSpec | Any) -> Dataset:
  """A Dataset for a DataSpec (or a ConfigDict, converted with from_config)."""
  return Dataset(spec if isinstance(spec, DataSpec) else from_config(spec))
