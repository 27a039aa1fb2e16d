"""`main.py --mode inpaint|colorize|interpolate`: controllable generation with a trained model on
images from `--input` (an .npz with 'images', or an image file) or from the test split, written
as PNG grids plus .npz and .json under workdir/controllable/."""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax import controllable, datasets, io_utils, sde_lib
from sgm_jax.cli import outputs, setup
from sgm_jax.errors import InputError, MissingFileError

OUTPUT_DIR = "controllable"
MASKS = ("left", "right", "top", "bottom", "center", "random")


def run_inpaint(config: Any, workdir: str, method: Optional[str] = None,
                num_steps: Optional[int] = None, num_images: Optional[int] = None,
                mask: str = "right", input_path: Optional[str] = None,
                checkpoint_step: Any = None, **options) -> dict:
  """Fill in the `mask` region of input images with `method` (any sampler; ode with a fixed-step
  solver). PNG rows: inputs, masked inputs, inpainted."""
  method = method or "pc"
  trained = setup.restore_trained(config, workdir, checkpoint_step)
  num_steps, options = _method_options(config, trained.sde, method, num_steps, options)
  images = load_input_images(config, trained.dataset, input_path, num_images)
  n = len(images)
  known = make_mask(mask, trained.example_shape, int(config.seed))
  inpainter = controllable.get_inpainter(method, trained.sde, images.shape, num_steps, **options)
  x, nfe = inpainter(jax.random.PRNGKey(int(config.seed) + 3), trained.score_fn, images, known)
  x = np.asarray(x)
  low = -1.0 if bool(config.data.centered) else 0.0
  masked = np.where(known > 0.5, images, low)
  mask_name = os.path.splitext(os.path.basename(mask))[0]
  step = trained.step
  info = dict(mode="inpaint", method=method, num_steps=num_steps, nfe=int(nfe), mask=mask,
              checkpoint_step=step, num_images=n,
              known_pixel_max_abs_change=float(np.max(np.abs(x - images) * known)),
              unknown_fraction=float(1.0 - known.mean()))
  # named by the mask and what changes the result, as --mode sample's files are
  return _write_outputs(workdir, f"inpaint_{mask_name}_" + outputs.sample_file_stem(
                            method, num_steps, options, step),
                        np.concatenate([images, masked, x]), n,
                        dict(inputs=images, mask=known, result=x), config, info)


def run_colorize(config: Any, workdir: str, method: Optional[str] = None,
                 num_steps: Optional[int] = None, num_images: Optional[int] = None,
                 input_path: Optional[str] = None, checkpoint_step: Any = None,
                 **options) -> dict:
  """Colorize the gray version of input images (RGB models only). PNG rows: inputs, gray,
  colorized."""
  if int(config.data.num_channels) != 3:
    raise InputError(f"colorization needs an RGB model (config.data.num_channels = 3); this config "
                     f"has num_channels = {config.data.num_channels}")
  method = method or "pc"
  trained = setup.restore_trained(config, workdir, checkpoint_step)
  num_steps, options = _method_options(config, trained.sde, method, num_steps, options)
  images = load_input_images(config, trained.dataset, input_path, num_images)
  n = len(images)
  colorizer = controllable.get_colorizer(method, trained.sde, images.shape, num_steps, **options)
  gray = np.asarray(controllable.to_gray(jnp.asarray(images)))
  x, nfe = colorizer(jax.random.PRNGKey(int(config.seed) + 4), trained.score_fn, gray)
  x = np.asarray(x)
  gray_error = float(np.max(np.abs(np.asarray(controllable.to_gray(jnp.asarray(x))) - gray)))
  step = trained.step
  info = dict(mode="colorize", method=method, num_steps=num_steps, nfe=int(nfe),
              checkpoint_step=step, num_images=n, gray_max_abs_change=gray_error)
  grid = np.concatenate([images, np.broadcast_to(gray, images.shape), x])
  return _write_outputs(workdir, "colorize_" + outputs.sample_file_stem(
                            method, num_steps, options, step), grid, n,
                        dict(inputs=images, gray=gray, result=x), config, info)


def run_interpolate(config: Any, workdir: str, num_pairs: Optional[int] = None,
                    num_points: int = 8, input_path: Optional[str] = None,
                    checkpoint_step: Any = None) -> dict:
  """Encode pairs of input images (2i, 2i+1) with the probability-flow ODE, slerp their latents,
  decode; one PNG row per pair. Reports the round-trip error."""
  trained = setup.restore_trained(config, workdir, checkpoint_step)
  images = load_input_images(config, trained.dataset, input_path,
                             None if num_pairs is None else 2 * int(num_pairs), default_count=8)
  if len(images) < 2:
    raise InputError(f"interpolation needs pairs of images; {input_path} has {len(images)}")
  pairs = len(images) // 2
  images = images[: 2 * pairs]
  rtol = float(setup.get_field(config.eval, "rtol", 1e-5))
  atol = float(setup.get_field(config.eval, "atol", 1e-5))
  interp = controllable.get_interpolator(trained.sde, int(num_points), rtol, atol)
  rows, nfes = [], []
  for i in range(pairs):
    path, _, nfe = interp(trained.score_fn, images[2 * i], images[2 * i + 1])
    rows.append(np.asarray(path))
    nfes.append(int(nfe))
  strips = np.stack(rows)  # (pairs, points, H, W, C): one PNG row per pair
  # The strip's ends are decode(encode(input)): the round trip through the probability-flow ODE.
  round_trip = np.stack([strips[:, 0], strips[:, -1]], axis=1).reshape(images.shape) - images
  info = dict(mode="interpolate", num_pairs=pairs, num_points=int(num_points),
              checkpoint_step=trained.step, nfe_per_pair=float(np.mean(nfes)),
              ode_rtol=rtol, ode_atol=atol,
              reconstruction_max_abs_error=float(np.max(np.abs(round_trip))),
              reconstruction_rms_error=float(np.sqrt(np.mean(round_trip ** 2))))
  tol = outputs.tolerance_name(rtol, atol)
  return _write_outputs(workdir, f"interpolate_{int(num_points)}points_{tol}_ckpt{trained.step}",
                        strips.reshape((-1,) + strips.shape[2:]), int(num_points),
                        dict(inputs=images, result=strips), config, info)


# --- input images and masks ---------------------------------------------------------------------
def load_input_images(config: Any, dataset: datasets.Dataset, input_path: Optional[str],
                      count: Optional[int], default_count: int = 8) -> np.ndarray:
  """`count` images in model space: from --input (an .npz with 'images' uint8 (N, H, W[, C]), or
  an image file), fitted to the config's size and channels; else the first test images.
  count None: every image of --input (one for an image file), or `default_count` test images."""
  del config  # the dataset's spec says the size, channels and range
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


# --- sampler settings and outputs ---------------------------------------------------------------
def _method_options(config: Any, sde: sde_lib.SDE, method: str, num_steps: Optional[int],
                    options: dict):
  """(num_steps, sampler options) of `method`: PC's steps are sampling.pc_num_steps."""
  s = config.sampling
  if num_steps is None:
    num_steps = int(setup.get_field(s, "pc_num_steps", sde.N) if method == "pc"
                    else setup.get_field(s, "num_steps", 10))
  return int(num_steps), setup.sampler_options_from_config(config, method, options)


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
