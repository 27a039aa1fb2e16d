"""Sources read with tensorflow-datasets: CIFAR-10, SVHN, CelebA, LSUN, MNIST, any 'tfds:<name>'.

CIFAR-10, SVHN, CelebA and LSUN are cropped and resized as score_sde's datasets.py does
(`image_ops.score_sde_fit`); MNIST and 'tfds:<name>' images as every other source
(`image_ops.fit_image`). Data prepared as ArrayRecord is read with `tfds.data_source` (random
access, no TensorFlow); when that fails, `_tfds_fallback` explains why, or reads TFRecord data
through TensorFlow if installed.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import numpy as np

from sgm_jax.datasets.image_ops import SCORE_SDE_DATASETS, fit_image, score_sde_fit
from sgm_jax.datasets.sources import ArraySource, Source, TfdsSource
from sgm_jax.datasets.spec import DatasetNotFoundError, DataSpec, normalize_name
from sgm_jax.errors import InputError, MissingDependencyError

# tfds: (builder name, eval split); LSUN's builder name takes the category.
TFDS_BUILDERS = {
    "cifar10": ("cifar10", "test"),
    "svhn": ("svhn_cropped", "test"),
    "celeba": ("celeb_a", "validation"),
    "lsun": ("lsun/{category}", "validation"),
    "mnist": ("mnist", "test"),
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


def load_tfds(spec: DataSpec, split: str, builder_name: str, eval_split: str = "test",
              fit: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> Source:
  """Split `split` of tfds builder `builder_name` ('test' / 'eval' read `eval_split`); each image
  is fitted by `fit` (default: image_ops.fit_image to the spec's size and channels)."""
  tfds = _import_tfds()
  tfds_split = eval_split if split in ("test", "eval") else split
  if fit is None:
    fit = functools.partial(fit_image, image_size=spec.image_size,
                            num_channels=spec.num_channels)
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


def load_tfds_named(spec: DataSpec, split: str) -> Source:
  """A dataset of `TFDS_BUILDERS` by its display name (LSUN needs config.data.category)."""
  name = normalize_name(spec.dataset)
  builder, eval_split = TFDS_BUILDERS[name]
  if name == "lsun":
    if not spec.category:
      raise InputError("dataset 'LSUN' needs config.data.category, e.g. 'church_outdoor' or "
                       "'bedroom'")
    builder = builder.format(category=spec.category)
  fit = None
  if name in SCORE_SDE_DATASETS:
    fit = functools.partial(score_sde_fit, dataset=name, image_size=spec.image_size,
                            num_channels=spec.num_channels)
  return load_tfds(spec, split, builder, eval_split, fit)
