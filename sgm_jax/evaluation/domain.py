"""A small CNN classifier trained on a dataset's own training split, whose penultimate features
score samples in the data's own terms ('FD-Domain', precision/recall).

An ImageNet network on upsampled 28-px grayscale images (FD-EffNet) sees Fashion-MNIST through
features made for other pictures; this network is trained by the project on the dataset itself
(`RECIPE`: Fashion-MNIST's 60,000 training images in about a minute of CPU, ~91 % test
accuracy), once, and cached:

  <cache_dir()>/domain_classifier/<dataset>_<key>.npz

where the key is a SHA-256 of the training images, labels, number of classes and recipe, so a
change to any of them trains a new network. `get_domain_extractor` wraps it as a
`features.FeatureExtractor` (name 'domain', metric 'FD-Domain', weights id 'domain:<key>').
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from sgm_jax.errors import InputError, check_positive, check_positive_int
from sgm_jax.evaluation.features import FeatureExtractor
from sgm_jax.io_utils import save_npz_atomic

CACHE_ENV = "SGM_JAX_CACHE_DIR"
CACHE_SUBDIR = "domain_classifier"
NAME, METRIC_NAME = "domain", "FD-Domain"
_PARAM_PREFIX = "params/"  # npz entries of the network's parameters, '/'-joined tree paths


@dataclasses.dataclass(frozen=True)
class DomainRecipe:
  """Every choice that changes the trained network; all of it goes into the cache key."""

  format: int = 1  # of the cache file and of this recipe; raise it when the training code changes
  widths: tuple[int, ...] = (16, 32, 64)  # 3x3 convolutions, stride 1 then 2 for each next width
  feature_dim: int = 128
  epochs: int = 3
  batch_size: int = 64
  learning_rate: float = 2e-3
  schedule: str = "cosine"  # Adam's step size decays from learning_rate to 0 over all steps
  seed: int = 0  # parameter initialization and the per-epoch shuffles

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)


# Measured on Fashion-MNIST (2 CPU cores shared with other jobs): 3 epochs at batch 64 reach
# 91.5 % test accuracy in 69 s of CPU time (2 epochs: 90.7 %; batch 128, 3 epochs: 91.1 % in
# 81 s; widths 32, 32, 64 at batch 128, 2 epochs: twice the time for +0.4 %).
RECIPE = DomainRecipe()
SCHEDULES = ("cosine",)


class DomainCNN(nn.Module):
  """images (B, H, W, C) in [0, 1] -> (features (B, feature_dim), logits (B, num_classes)).

  3x3 convolutions with ReLU, the first at stride 1 and each next one at stride 2 (28 -> 14 -> 7
  for the default three widths), no normalization (stateless), the last map flattened into
  Dense(feature_dim) + ReLU: the features. Flattened rather than averaged over positions: with a
  global average pool instead, Fashion-MNIST's test accuracy after 2 epochs (batch 128) was 78 %
  instead of 90 %, at the same cost. So the parameters fit one image size, the training images'.
  """

  widths: tuple[int, ...] = RECIPE.widths
  feature_dim: int = RECIPE.feature_dim
  num_classes: int = 10

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = (images.astype(jnp.float32) - 0.5) / 0.5
    for i, width in enumerate(self.widths):
      x = nn.relu(nn.Conv(width, (3, 3), strides=1 if i == 0 else 2, padding="SAME")(x))
    x = x.reshape(x.shape[0], -1)
    features = nn.relu(nn.Dense(self.feature_dim)(x))
    return features, nn.Dense(self.num_classes)(features)


def _model(recipe: DomainRecipe, num_classes: int) -> DomainCNN:
  return DomainCNN(tuple(recipe.widths), recipe.feature_dim, num_classes)


def _initial_variables(model: DomainCNN, seed: int, example: np.ndarray):
  """model.init as one program compiled without XLA's optimizations, which only cost time for
  a program run once: 0.6 s instead of 5 s on 2 CPU cores (eagerly, every initializer compiles
  on its own: 10 s)."""
  args = (jax.random.PRNGKey(seed), jnp.asarray(example))
  compiled = jax.jit(model.init).lower(*args).compile(compiler_options={
      "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})
  return compiled(*args)


def check_recipe(recipe: DomainRecipe) -> DomainRecipe:
  """`recipe` if every field is usable; else an InputError naming the field."""
  if not recipe.widths:
    raise InputError(f"recipe.widths must name at least one convolution width, got "
                     f"{recipe.widths!r}")
  for i, width in enumerate(recipe.widths):
    check_positive_int(f"recipe.widths[{i}]", width)
  for name in ("feature_dim", "epochs", "batch_size"):
    check_positive_int(f"recipe.{name}", getattr(recipe, name))
  check_positive("recipe.learning_rate", recipe.learning_rate)
  if recipe.schedule not in SCHEDULES:
    raise InputError(f"recipe.schedule must be one of {SCHEDULES}, got {recipe.schedule!r}")
  return recipe


def _check_training_data(images: np.ndarray, labels: np.ndarray, num_classes: int,
                         recipe: DomainRecipe) -> None:
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise InputError(f"training images must be (N, H, W, 1 or 3), got shape {images.shape}")
  if labels.shape != images.shape[:1]:
    raise InputError(f"need one label per image: labels {labels.shape}, images {images.shape}")
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or \
      num_classes < 2:
    raise InputError(f"num_classes must be an integer >= 2, got {num_classes!r}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise InputError(f"labels must be in [0, {num_classes}), got [{labels.min()}, "
                     f"{labels.max()}]")
  check_recipe(recipe)
  if images.shape[0] < recipe.batch_size:
    raise InputError(f"{images.shape[0]} training images are fewer than one batch of the "
                     f"recipe's batch_size={recipe.batch_size}")


def train_domain_classifier(images, labels, num_classes: int,
                            recipe: DomainRecipe = RECIPE) -> dict[str, Any]:
  """Train `DomainCNN` on images (N, H, W, C) float in [0, 1] and int labels (N,); returns its
  variables ({'params': ...}).

  Deterministic: the initialization comes from `recipe.seed`, epoch e's order from
  numpy's Generator((seed, e)); each epoch takes N // batch_size full batches (one compiled
  step). Adam with a cosine-decayed step size, float32 throughout.
  """
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels).astype(np.int32)
  _check_training_data(images, labels, num_classes, recipe)
  model = _model(recipe, int(num_classes))
  variables = _initial_variables(model, recipe.seed, images[:1])
  steps_per_epoch = images.shape[0] // recipe.batch_size
  total_steps = steps_per_epoch * recipe.epochs
  optimizer = optax.adam(optax.cosine_decay_schedule(recipe.learning_rate, total_steps))
  opt_state = jax.jit(optimizer.init)(variables)

  def loss_fn(variables, x, y):
    _, logits = model.apply(variables, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(variables, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(variables, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss

  from tqdm import tqdm
  bar = tqdm(total=total_steps, desc="domain classifier", unit="step", dynamic_ncols=True,
             mininterval=1.0)
  try:
    for epoch in range(recipe.epochs):
      order = np.random.default_rng([recipe.seed, epoch]).permutation(images.shape[0])
      for b in range(steps_per_epoch):
        batch = order[b * recipe.batch_size:(b + 1) * recipe.batch_size]
        variables, opt_state, loss = train_step(variables, opt_state, images[batch],
                                                labels[batch])
        bar.update(1)
        if (b + 1) % 200 == 0 or b + 1 == steps_per_epoch:
          bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss):.4f}")
  finally:
    bar.close()
  return jax.device_get(variables)


def accuracy(model: DomainCNN, variables, images, labels, batch_size: int = 500) -> float:
  """Share of `images` ((N, H, W, C) in [0, 1]) that `model` assigns to their label."""
  images, labels = np.asarray(images, np.float32), np.asarray(labels)
  apply = jax.jit(model.apply)
  correct = 0
  for start in range(0, images.shape[0], batch_size):
    _, logits = apply(variables, images[start:start + batch_size])
    correct += int((np.argmax(np.asarray(logits), -1) == labels[start:start + batch_size]).sum())
  return correct / max(images.shape[0], 1)


# --- the cache ---------------------------------------------------------------------------------


def cache_dir() -> str:
  """$SGM_JAX_CACHE_DIR, else $XDG_CACHE_HOME/sgm_jax, else ~/.cache/sgm_jax."""
  if os.environ.get(CACHE_ENV):
    return os.environ[CACHE_ENV]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "sgm_jax")


def training_key(images: np.ndarray, labels: np.ndarray, num_classes: int,
                 recipe: DomainRecipe = RECIPE) -> str:
  """16 hex digits of the SHA-256 of the training images' and labels' bytes, shapes and dtypes,
  the number of classes and the recipe (JSON, sorted keys)."""
  images, labels = np.ascontiguousarray(images), np.ascontiguousarray(labels)
  header = {"images": [list(images.shape), images.dtype.str],
            "labels": [list(labels.shape), labels.dtype.str],
            "num_classes": int(num_classes), "recipe": json.loads(recipe.to_json())}
  digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
  digest.update(images.reshape(-1).view(np.uint8))
  digest.update(labels.reshape(-1).view(np.uint8))
  return digest.hexdigest()[:16]


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(text)).strip("-") or "dataset"


def cache_path(dataset_name: str, key: str, cache_root: Optional[str] = None) -> str:
  """<cache_root or cache_dir()>/domain_classifier/<dataset-slug>_<key>.npz"""
  return os.path.join(cache_root or cache_dir(), CACHE_SUBDIR, f"{_slug(dataset_name)}_{key}.npz")


def _save(path: str, variables, key: str, recipe: DomainRecipe, info: dict) -> None:
  flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
  arrays = {_PARAM_PREFIX + name: np.asarray(value) for name, value in flat.items()}
  save_npz_atomic(path, {**arrays, "key": np.asarray(key), "recipe": np.asarray(recipe.to_json()),
                         "info": np.asarray(json.dumps(info, sort_keys=True))})


def _load(path: str, key: str, recipe: DomainRecipe, template) -> Optional[tuple[Any, dict]]:
  """(variables, stored info) if `path` holds a network for exactly `key` and `recipe` with the
  parameter tree of `template` (shapes and dtypes) and finite values; else None, with a warning
  when a file was there."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as data:
      stored_key, stored_recipe = str(data["key"]), str(data["recipe"])
      info = json.loads(str(data["info"]))
      flat = {name[len(_PARAM_PREFIX):]: data[name] for name in data.files
              if name.startswith(_PARAM_PREFIX)}
  except Exception as e:  # truncated, not a zip, missing entries: retrained, never trusted
    logging.warning("domain classifier cache %s is unreadable (%s: %s); retraining and "
                    "replacing it", path, type(e).__name__, e)
    return None
  expected = traverse_util.flatten_dict(template, sep="/")
  problem = None
  if stored_key != key or stored_recipe != recipe.to_json():
    problem = f"was made for key {stored_key} and recipe {stored_recipe}"
  elif set(flat) != set(expected) or any(
      flat[n].shape != expected[n].shape or flat[n].dtype != expected[n].dtype for n in flat):
    problem = "holds another parameter tree than the recipe's network"
  elif not all(np.isfinite(v).all() for v in flat.values()):
    problem = "holds non-finite parameters"
  if problem:
    logging.warning("domain classifier cache %s %s; retraining and replacing it", path, problem)
    return None
  return traverse_util.unflatten_dict(flat, sep="/"), info


# --- a dataset's network -----------------------------------------------------------------------


def _split_arrays(dataset, dataset_name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """All raw images of a split scaled to float32 [0, 1] (no flips, no dequantization) and their
  int32 labels; InputError when the dataset is not labelled images."""
  source = dataset.source(split)
  no_labels = "; eval.feature_extractor='effnet' works without labels"
  if not getattr(source, "is_image", True):
    raise InputError(f"dataset {dataset_name!r} is not images: the domain feature network is a "
                     f"classifier of labelled images{no_labels}")
  if len(source) == 0:
    raise InputError(f"dataset {dataset_name!r} has no images in its {split} split")
  images, labels = [], []
  for start in range(0, len(source), 10_000):  # a tfds source reads a chunk in parallel
    x, y = source.fetch(np.arange(start, min(start + 10_000, len(source))))
    if y is None:
      raise InputError(f"dataset {dataset_name!r} has no class labels in its {split} split, "
                       f"which the domain feature network is trained on{no_labels}")
    images.append(np.clip(np.asarray(x, np.float32) / 255.0, 0.0, 1.0))
    labels.append(np.asarray(y, np.int32))
  images, labels = np.concatenate(images), np.concatenate(labels)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise InputError(f"dataset {dataset_name!r} images have shape {images.shape[1:]}, not "
                     f"(H, W, 1 or 3){no_labels}")
  return images, labels


def _num_classes(dataset, train_labels: np.ndarray, test_labels: np.ndarray) -> int:
  names = dataset.class_names("train")
  largest = int(max(train_labels.max(initial=0), test_labels.max(initial=0)))
  return max(len(names) if names else 0, largest + 1)


def load_or_train(dataset_name: str, dataset, recipe: DomainRecipe = RECIPE,
                  cache_root: Optional[str] = None) -> tuple[Any, dict[str, Any]]:
  """The domain classifier of `dataset` (a `sgm_jax.datasets.Dataset`): loaded from the cache
  when it holds one for exactly these training images, labels and recipe, else trained on the
  whole training split and cached (atomically). Returns (variables, info); info holds
  'test_accuracy' (measured now, on the whole test split), 'key', 'path', 'cached', 'recipe',
  'num_classes', 'num_train', 'num_test', 'image_shape' and 'train_seconds' (of the training
  that made the file).
  """
  train_images, train_labels = _split_arrays(dataset, dataset_name, "train")
  test_images, test_labels = _split_arrays(dataset, dataset_name, "test")
  num_classes = _num_classes(dataset, train_labels, test_labels)
  key = training_key(train_images, train_labels, num_classes, recipe)
  path = cache_path(dataset_name, key, cache_root)
  model = _model(recipe, num_classes)
  template = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1,) + train_images.shape[1:], jnp.float32))
  loaded = _load(path, key, recipe, template)
  if loaded is not None:
    variables, stored = loaded
    train_seconds = stored.get("train_seconds")
  else:
    begin = time.time()
    variables = train_domain_classifier(train_images, train_labels, num_classes, recipe)
    train_seconds = time.time() - begin
  info = {"dataset": dataset_name, "key": key, "path": path, "cached": loaded is not None,
          "recipe": dataclasses.asdict(recipe), "num_classes": num_classes,
          "num_train": int(train_images.shape[0]), "num_test": int(test_images.shape[0]),
          "image_shape": list(train_images.shape[1:]), "train_seconds": train_seconds,
          "test_accuracy": accuracy(model, variables, test_images, test_labels)}
  if loaded is None:
    _save(path, variables, key, recipe, {k: v for k, v in info.items() if k != "cached"})
  logging.info("domain classifier for %s: test accuracy %.2f%% on %d images (%s %s)",
               dataset_name, 100 * info["test_accuracy"], info["num_test"],
               "loaded from" if info["cached"] else "trained and saved to", path)
  return variables, info


def _preprocess(images: jax.Array, size: int, channels: int) -> jax.Array:
  """uint8 [0, 255] or float [0, 1] images (B, H, W, C) -> float32 [0, 1] at size x size."""
  if images.shape[-1] != channels:
    raise InputError(f"the domain classifier was trained on {channels}-channel images; got "
                     f"images of shape {images.shape}")
  x = (images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8
       else jnp.clip(images.astype(jnp.float32), 0.0, 1.0))
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, channels), "linear", antialias=True)
  return x


def get_domain_extractor(dataset_name: str, dataset, batch_size: int = 500,
                         recipe: DomainRecipe = RECIPE,
                         cache_root: Optional[str] = None) -> FeatureExtractor:
  """The `FeatureExtractor` of `dataset`'s domain classifier (`load_or_train`): name 'domain',
  metric 'FD-Domain', `recipe.feature_dim` features, weights id 'domain:<key>'.

  It takes images (B, H, W, C) with the training images' channel count, uint8 or float in [0, 1];
  images of another size are resized (bilinear, antialiased) to the training images' size.
  """
  variables, info = load_or_train(dataset_name, dataset, recipe, cache_root)
  size, channels = info["image_shape"][0], info["image_shape"][2]
  model = _model(recipe, info["num_classes"])
  preprocess = jax.jit(lambda images: _preprocess(images, size, channels))
  return FeatureExtractor(NAME, METRIC_NAME, recipe.feature_dim, info["num_classes"], size,
                          batch_size, f"domain:{info['key']}", preprocess, jax.jit(model.apply),
                          jax.device_put(variables))
