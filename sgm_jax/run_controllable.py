"""The config edge of controllable generation: one function per main.py mode.

- `run_train_classifier` (`--mode train_classifier`): the noise-conditional WRN classifier of
  `config.classifier` on noisy training images, resumable, in workdir/classifier/;
- `load_classifier_log_prob`: its log p_t(y | x) for class-conditional sampling (`--class_label`);
- `run_inpaint`, `run_colorize`, `run_interpolate` (`--mode inpaint|colorize|interpolate`): on
  images from `--input` (an .npz with 'images', or an image file) or from the test split, written
  as PNG grids plus .npz and .json under workdir/controllable/.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax import controllable, datasets, io_utils, sde_lib
from sgm_jax.checkpoints import CheckpointError, CheckpointStore, has_checkpoints
from sgm_jax.errors import InputError, MissingFileError, TrainingDiverged
from sgm_jax.run_lib import (_get, build, restore_ema_params, sampler_options_from_config,
                             score_fn_for, sde_from_config)
from sgm_jax.workdir import WorkdirLock, check_or_record_config

CLASSIFIER_DIR = "classifier"
OUTPUT_DIR = "controllable"
MASKS = ("left", "right", "top", "bottom", "center", "random")


# --- the noise-conditional classifier ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
  """config.classifier: the WRN size and how to train it (missing keys take these defaults)."""

  num_classes: int = 10
  blocks_per_group: int = 1
  channel_multiplier: int = 2
  n_iters: int = 2000
  batch_size: int = 64
  lr: float = 1e-3
  max_seconds: Optional[float] = None
  log_freq: int = 100
  snapshot_freq: int = 200
  eval_examples: int = 1000
  scale: float = 1.0  # default classifier weight of --class_label sampling

  @classmethod
  def from_config(cls, config: Any) -> "ClassifierSpec":
    section = _get(config, "classifier", None) or {}
    values = {f.name: _get(section, f.name, f.default) for f in dataclasses.fields(cls)}
    spec = cls(**values)
    for name in ("num_classes", "blocks_per_group", "channel_multiplier", "n_iters", "batch_size",
                 "log_freq", "snapshot_freq", "eval_examples"):
      value = getattr(spec, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "num_classes"
                                                                         else 1):
        raise InputError(f"config.classifier.{name} must be a positive integer"
                         f"{' >= 2' if name == 'num_classes' else ''}, got {value!r}")
    if not spec.lr > 0:
      raise InputError(f"config.classifier.lr must be > 0, got {spec.lr!r}")
    return spec


def _classifier_parts(config: Any, sde: sde_lib.SDE, image_shape: tuple):
  """(spec, logits_fn, initial params, optimizer) of config.classifier."""
  import optax
  from sgm_jax.models.wideresnet import create_classifier
  if len(image_shape) != 3:
    raise InputError(f"the noise-conditional classifier needs image data (H, W, C); dataset "
                     f"{config.data.dataset!r} gives examples of shape {tuple(image_shape)}")
  spec = ClassifierSpec.from_config(config)
  model = create_classifier(spec.num_classes, spec.blocks_per_group, spec.channel_multiplier)
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  params = model.init(jax.random.PRNGKey(int(config.seed) + 7), x, jnp.ones((1,)))["params"]
  return spec, controllable.NoiseConditionalLogits(model, sde), params, optax.adam(spec.lr)


def _classifier_state(params, opt_state, step: int) -> dict:
  return {"params": params, "opt_state": opt_state, "step": np.asarray(step, np.int64)}


def _labelled_batch(dataset: datasets.Dataset, step: int, split: str = "train") -> dict:
  batch = dataset.train_batch(step, split=split)
  if "label" not in batch:
    raise InputError(f"dataset {dataset.spec.dataset!r} has no class labels; the classifier needs "
                     "a labelled dataset (FashionMNIST, MNIST5k, digits, CIFAR-10, an .npz with "
                     "'labels', or a folder with class subfolders)")
  return {"image": batch["image"], "label": batch["label"]}


def classifier_accuracy(logits_fn, params, sde: sde_lib.SDE, dataset: datasets.Dataset,
                        times: tuple, num_examples: int, seed: int = 0) -> dict:
  """Test accuracy of the classifier on x_t = alpha(t) x_0 + sigma(t) z at each t in `times`."""
  correct = {t: 0 for t in times}
  seen = 0
  logits_jit = jax.jit(logits_fn)
  key = jax.random.PRNGKey(seed)
  for i, batch in enumerate(dataset.eval_iterator("test", uniform_dequantization=False,
                                                  prefetch=0)):
    if seen >= num_examples:
      break
    keep = batch["mask"][: num_examples - seen]
    x0 = jnp.asarray(batch["image"][: len(keep)])
    y = np.asarray(batch["label"][: len(keep)])
    for j, t in enumerate(times):
      tt = jnp.full((x0.shape[0],), t, x0.dtype)
      mean, std = sde.marginal_prob(x0, tt)
      z = jax.random.normal(jax.random.fold_in(key, i * len(times) + j), x0.shape, x0.dtype)
      pred = np.asarray(jnp.argmax(logits_jit(params, mean + sde_lib.batch_expand(std, x0) * z,
                                              tt), -1))
      correct[t] += int(np.sum((pred == y) & keep))
    seen += int(keep.sum())
  return {f"accuracy_t={t:g}": correct[t] / max(seen, 1) for t in times} | {"examples": seen}


def run_train_classifier(config: Any, workdir: str) -> dict:
  """`main.py --mode train_classifier`: train (or resume) the noise-conditional classifier.

  The step-s batch is the dataset's training batch s and its noise key fold_in(seed, s), so a
  resumed run repeats the uninterrupted one. Checkpoints in workdir/classifier/; test accuracies
  at several t in workdir/classifier/metrics.json.
  """
  from tqdm import tqdm
  out_dir = os.path.join(workdir, CLASSIFIER_DIR)
  os.makedirs(out_dir, exist_ok=True)
  with WorkdirLock(out_dir):
    sde = sde_from_config(config)
    spec = ClassifierSpec.from_config(config)
    data_spec = dataclasses.replace(datasets.from_config(config), batch_size=spec.batch_size)
    dataset = datasets.get_dataset(data_spec)
    first = _labelled_batch(dataset, 0)
    _, logits_fn, params, optimizer = _classifier_parts(config, sde, first["image"].shape[1:])
    num_classes = int(dataset.labels("train").max()) + 1
    if num_classes > spec.num_classes:
      raise InputError(f"dataset {config.data.dataset!r} has labels up to {num_classes - 1}, but "
                       f"config.classifier.num_classes = {spec.num_classes}")
    check_or_record_config(workdir, config)
    store = CheckpointStore(out_dir, keep=2, writer=True)
    try:
      state = _classifier_state(params, optimizer.init(params), 0)
      if has_checkpoints(out_dir) and store.latest_step() is not None:
        state = store.restore(state)
        logging.info("classifier: resuming from step %d", int(state["step"]))
      state = _train_classifier_loop(store, state, dataset, sde, logits_fn, optimizer, spec,
                                     int(config.seed), tqdm)
    finally:
      store.close()
    metrics = classifier_accuracy(logits_fn, state["params"], sde, dataset,
                                  (1e-3, 0.1, 0.3, 0.5, 0.8), spec.eval_examples, int(config.seed))
    metrics["step"] = int(state["step"])
    path = os.path.join(out_dir, "metrics.json")
    with io_utils.atomic_write(path, "w") as f:
      json.dump(metrics, f, indent=1)
    metrics["metrics_file"] = path
    return metrics


def _train_classifier_loop(store, state, dataset, sde, logits_fn, optimizer, spec, seed, tqdm):
  step_fn = controllable.get_classifier_train_step(sde, logits_fn, optimizer)
  key = jax.random.PRNGKey(seed + 11)
  params, opt_state, start = state["params"], state["opt_state"], int(state["step"])
  begin = time.time()
  step = start
  bar = tqdm(total=spec.n_iters, initial=start, desc="classifier", unit="step")
  while step < spec.n_iters:
    batch = _labelled_batch(dataset, step)
    params, opt_state, loss = step_fn(params, opt_state, batch, jax.random.fold_in(key, step))
    step += 1
    bar.update(1)
    out_of_time = spec.max_seconds is not None and time.time() - begin > spec.max_seconds
    save = step % spec.snapshot_freq == 0 or step == spec.n_iters or out_of_time
    if save or step % spec.log_freq == 0:
      # Checked before every save too, so a NaN state never replaces the last good checkpoint.
      loss = float(loss)
      if not np.isfinite(loss):
        raise TrainingDiverged(f"classifier loss became {loss} at step {step}; the last good "
                           f"checkpoint is kept in {store.workdir}")
      bar.set_postfix(loss=f"{loss:.4f}")
      logging.info("classifier step %d: loss %.5f", step, loss)
    if save:
      store.save(step, _classifier_state(params, opt_state, step))
    if out_of_time:
      logging.info("classifier: stopping at step %d after max_seconds=%s", step, spec.max_seconds)
      break
  bar.close()
  return _classifier_state(params, opt_state, step)


def load_classifier_log_prob(config: Any, workdir: str, sde: sde_lib.SDE, image_shape: tuple):
  """log_prob_fn(x, t, y) of the classifier trained in workdir/classifier (newest checkpoint)."""
  out_dir = os.path.join(workdir, CLASSIFIER_DIR)
  if not has_checkpoints(out_dir):
    raise CheckpointError(f"no classifier in {out_dir}; train it first with "
                          "--mode train_classifier")
  _, logits_fn, params, optimizer = _classifier_parts(config, sde, image_shape)
  store = CheckpointStore(out_dir, keep=2)
  try:
    state = store.restore(_classifier_state(params, optimizer.init(params), 0))
  finally:
    store.close()
  return controllable.classifier_log_prob_fn(logits_fn, state["params"]), int(state["step"])


def parse_class_label(value: Any, num_classes: int) -> Optional[str | int]:
  """--class_label: an integer class in [0, num_classes) or 'all' (classes cycled over samples)."""
  if value is None:
    return None
  if str(value).strip().lower() == "all":
    return "all"
  try:
    label = int(str(value))
  except ValueError:
    label = -1
  if not 0 <= label < num_classes:
    raise InputError(f"--class_label must be an integer in [0, {num_classes}) or 'all', got "
                     f"{value!r}")
  return label


def class_labels_for(label: str | int, start: int, batch: int, num_classes: int) -> np.ndarray:
  """The (batch,) labels of samples start..start+batch-1 ('all' cycles through the classes)."""
  if label == "all":
    return (start + np.arange(batch)) % num_classes
  return np.full((batch,), int(label))


# --- input images -------------------------------------------------------------------------------
def load_input_images(config: Any, dataset: datasets.Dataset, input_path: Optional[str],
                      count: Optional[int], default_count: int = 8) -> np.ndarray:
  """`count` images in model space: from --input (an .npz with 'images' uint8 (N, H, W[, C]), or
  an image file), fitted to the config's size and channels; else the first test images.
  count None: every image of --input (one for an image file), or `default_count` test images."""
  if count is not None and count < 1:
    raise InputError(f"the number of images must be >= 1, got {count}")
  spec = dataset.spec
  if input_path is None:
    count = default_count if count is None else count
    out, i = [], 0
    while sum(len(b) for b in out) < count and i < dataset.num_eval_batches("test"):
      batch = dataset.eval_batch(i, split="test", uniform_dequantization=False)
      out.append(batch["image"][batch["mask"]])
      i += 1
    images = np.concatenate(out)[:count]
  else:
    images = _read_image_file(input_path)
    images = datasets.fit_images(images, spec.image_size, spec.num_channels).astype(np.float32)
    images = datasets.data_scaler(spec.centered)(images / np.float32(255.0))
    count = len(images) if count is None else count
  if images.ndim != 4:
    raise InputError(f"this mode needs image data; dataset {spec.dataset!r} has examples of shape "
                     f"{images.shape[1:]}")
  if len(images) < count:
    raise InputError(f"needed {count} input images, found {len(images)} in "
                     f"{input_path or 'the test split'}")
  return np.asarray(images[:count], np.float32)


def _read_image_file(path: str) -> np.ndarray:
  if not os.path.isfile(path):
    raise MissingFileError(f"--input file {path!r} not found")
  if path.lower().endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      if "images" not in f:
        raise InputError(f"{path} has arrays {sorted(f.files)}; --input needs 'images' "
                         "(N, H, W[, C]) uint8")
      images = f["images"]
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
      raise InputError(f"{path}: 'images' must be uint8 of shape (N, H, W[, C]), got "
                       f"{images.dtype} {images.shape}")
    return images
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path) as image:
      pixels = np.asarray(image.convert(image.mode if image.mode in ("L", "RGB") else "RGB"))
  except UnidentifiedImageError as e:
    raise InputError(f"--input {path!r} is neither an .npz nor an image file Pillow can read") from e
  return (pixels[..., None] if pixels.ndim == 2 else pixels)[None]  # (1, H, W, C)


def make_mask(name: str, image_shape: tuple, seed: int = 0) -> np.ndarray:
  """(H, W, 1) float mask, 1 where pixels are known. `name` is the region to fill in (one of MASKS)
  or the path of an image file whose bright pixels (> 0.5) are known."""
  h, w = int(image_shape[0]), int(image_shape[1])
  known = np.ones((h, w), bool)
  if name == "left":
    known[:, : w // 2] = False
  elif name == "right":
    known[:, w // 2:] = False
  elif name == "top":
    known[: h // 2] = False
  elif name == "bottom":
    known[h // 2:] = False
  elif name == "center":
    known[h // 4: h - h // 4, w // 4: w - w // 4] = False
  elif name == "random":
    known = np.random.default_rng(seed).random((h, w)) < 0.5
  elif os.path.isfile(name):
    image = _read_image_file(name)[0].astype(np.float32)
    if image.shape[:2] != (h, w):
      raise InputError(f"mask file {name!r} is {image.shape[1]}x{image.shape[0]}; the model's "
                       f"images are {w}x{h}")
    known = image.mean(axis=-1) / 255.0 > 0.5
  else:
    raise InputError(f"unknown --mask {name!r}: use one of {list(MASKS)} (the region to fill in) "
                     "or the path of a mask image (white = known)")
  return known[..., None].astype(np.float32)


# --- the modes ----------------------------------------------------------------------------------
def _setup(config: Any, workdir: str, checkpoint_step: Any):
  sde, model, dataset = build(config)
  image_shape = datasets.example_shape(dataset.spec)  # from the config: no data is loaded
  params, step = restore_ema_params(config, workdir, model, image_shape, checkpoint_step)
  return sde, dataset, image_shape, score_fn_for(config, sde, model, params), step


def _method_options(config: Any, sde: sde_lib.SDE, method: str, num_steps: Optional[int],
                    options: dict):
  s = config.sampling
  if num_steps is None:
    num_steps = int(_get(s, "pc_num_steps", sde.N) if method == "pc" else _get(s, "num_steps", 10))
  return int(num_steps), sampler_options_from_config(config, method, options)


def _write_outputs(workdir: str, stem: str, grid: np.ndarray, nrow: int, arrays: dict,
                   config: Any, info: dict) -> dict:
  """workdir/controllable/<stem>.png (the grid of (N, H, W, C) images, nrow per row), .npz of
  `arrays` and .json of `info`; returns info with the three paths."""
  out_dir = os.path.join(workdir, OUTPUT_DIR)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, stem)
  data_range = (-1.0, 1.0) if bool(config.data.centered) else (0.0, 1.0)
  io_utils.save_image_grid(grid, path + ".png", nrow=nrow, data_range=data_range,
                           upscale=max(1, 64 // grid.shape[1]))
  with io_utils.atomic_write(path + ".npz") as f:
    np.savez(f, **arrays)
  with io_utils.atomic_write(path + ".json", "w") as f:
    json.dump(info, f, indent=1)
  return dict(info, png=path + ".png", npz=path + ".npz", json=path + ".json")


def run_inpaint(config: Any, workdir: str, method: Optional[str] = None,
                num_steps: Optional[int] = None, num_images: Optional[int] = None,
                mask: str = "right", input_path: Optional[str] = None,
                checkpoint_step: Any = None, **options) -> dict:
  """`main.py --mode inpaint`: fill in the `mask` region of input images with `method` (pc, deis,
  ddim, ode). PNG rows: inputs, masked inputs, inpainted."""
  method = method or "pc"
  sde, dataset, image_shape, score_fn, step = _setup(config, workdir, checkpoint_step)
  num_steps, options = _method_options(config, sde, method, num_steps, options)
  images = load_input_images(config, dataset, input_path, num_images)
  n = len(images)
  known = make_mask(mask, image_shape, int(config.seed))
  inpainter = controllable.get_inpainter(method, sde, images.shape, num_steps, **options)
  x, nfe = inpainter(jax.random.PRNGKey(int(config.seed) + 3), score_fn, images, known)
  x = np.asarray(x)
  low = -1.0 if bool(config.data.centered) else 0.0
  masked = np.where(known > 0.5, images, low)
  mask_name = os.path.splitext(os.path.basename(mask))[0]
  info = dict(mode="inpaint", method=method, num_steps=num_steps, nfe=int(nfe), mask=mask,
              checkpoint_step=step, num_images=n,
              known_pixel_max_abs_change=float(np.max(np.abs(x - images) * known)),
              unknown_fraction=float(1.0 - known.mean()))
  return _write_outputs(workdir, f"inpaint_{mask_name}_{method}_{num_steps}steps_ckpt{step}",
                        np.concatenate([images, masked, x]), n,
                        dict(inputs=images, mask=known, result=x), config, info)


def run_colorize(config: Any, workdir: str, method: Optional[str] = None,
                 num_steps: Optional[int] = None, num_images: Optional[int] = None,
                 input_path: Optional[str] = None, checkpoint_step: Any = None,
                 **options) -> dict:
  """`main.py --mode colorize`: colorize the gray version of input images (RGB models only).
  PNG rows: inputs, gray, colorized."""
  if int(config.data.num_channels) != 3:
    raise InputError(f"colorization needs an RGB model (config.data.num_channels = 3); this config "
                     f"has num_channels = {config.data.num_channels}")
  method = method or "pc"
  sde, dataset, _, score_fn, step = _setup(config, workdir, checkpoint_step)
  num_steps, options = _method_options(config, sde, method, num_steps, options)
  images = load_input_images(config, dataset, input_path, num_images)
  n = len(images)
  colorizer = controllable.get_colorizer(method, sde, images.shape, num_steps, **options)
  gray = np.asarray(controllable.to_gray(jnp.asarray(images)))
  x, nfe = colorizer(jax.random.PRNGKey(int(config.seed) + 4), score_fn, gray)
  x = np.asarray(x)
  gray_error = float(np.max(np.abs(np.asarray(controllable.to_gray(jnp.asarray(x))) - gray)))
  info = dict(mode="colorize", method=method, num_steps=num_steps, nfe=int(nfe),
              checkpoint_step=step, num_images=n, gray_max_abs_change=gray_error)
  grid = np.concatenate([images, np.broadcast_to(gray, images.shape), x])
  return _write_outputs(workdir, f"colorize_{method}_{num_steps}steps_ckpt{step}", grid, n,
                        dict(inputs=images, gray=gray, result=x), config, info)


def run_interpolate(config: Any, workdir: str, num_pairs: Optional[int] = None,
                    num_points: int = 8, input_path: Optional[str] = None,
                    checkpoint_step: Any = None) -> dict:
  """`main.py --mode interpolate`: encode pairs of input images (2i, 2i+1) with the probability-
  flow ODE, slerp their latents, decode; one PNG row per pair. Reports the round-trip error."""
  sde, dataset, _, score_fn, step = _setup(config, workdir, checkpoint_step)
  images = load_input_images(config, dataset, input_path,
                             None if num_pairs is None else 2 * int(num_pairs), default_count=8)
  if len(images) < 2:
    raise InputError(f"interpolation needs pairs of images; {input_path} has {len(images)}")
  pairs = len(images) // 2
  images = images[: 2 * pairs]
  ev = config.eval
  interp = controllable.get_interpolator(sde, int(num_points), float(_get(ev, "rtol", 1e-5)),
                                         float(_get(ev, "atol", 1e-5)))
  rows, nfes = [], []
  for i in range(pairs):
    path, _, nfe = interp(score_fn, images[2 * i], images[2 * i + 1])
    rows.append(np.asarray(path))
    nfes.append(int(nfe))
  strips = np.stack(rows)  # (pairs, points, H, W, C): one PNG row per pair
  # The strip's ends are decode(encode(input)): the round trip through the probability-flow ODE.
  round_trip = np.stack([strips[:, 0], strips[:, -1]], axis=1).reshape(images.shape) - images
  info = dict(mode="interpolate", num_pairs=pairs, num_points=int(num_points),
              checkpoint_step=step, nfe_per_pair=float(np.mean(nfes)),
              ode_rtol=float(_get(ev, "rtol", 1e-5)), ode_atol=float(_get(ev, "atol", 1e-5)),
              reconstruction_max_abs_error=float(np.max(np.abs(round_trip))),
              reconstruction_rms_error=float(np.sqrt(np.mean(round_trip ** 2))))
  return _write_outputs(workdir, f"interpolate_ckpt{step}",
                        strips.reshape((-1,) + strips.shape[2:]), int(num_points),
                        dict(inputs=images, result=strips), config, info)
