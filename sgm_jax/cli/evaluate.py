"""`main.py --mode eval`: what config.eval enables of the test loss, test-set bits/dim, the
denoising error per noise level, and FD / IS / out-of-range share of samples, for one checkpoint.

Each finished batch is saved under workdir/eval/ckpt_<step>/ (outputs.BatchProgress), so an
interrupted evaluation resumes where it stopped.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from sgm_jax import datasets, io_utils, sampling
from sgm_jax.cli import outputs, setup
from sgm_jax.errors import InputError

# config.eval switches of run_eval's parts, and whether a part needs image data
EVAL_PARTS = {"loss": ("enable_loss", False), "bpd": ("enable_bpd", True),
              "denoising_error": ("enable_denoising_error", True),
              "sampling": ("enable_sampling", True)}


def eval_parts(config: Any, images: bool) -> list[str]:
  """The parts of run_eval that config.eval enables and the data allows; an error if none is."""
  ev = config.eval
  enabled = [p for p, (flag, _) in EVAL_PARTS.items() if bool(setup.get_field(ev, flag, False))]
  parts = [p for p in enabled if images or not EVAL_PARTS[p][1]]
  if not parts:
    flags = ", ".join(f"eval.{flag}" for flag, _ in EVAL_PARTS.values())
    why = (f" ({', '.join(enabled)} need image data; dataset {config.data.dataset!r} has none)"
           if enabled else "")
    raise InputError(f"--mode eval has nothing to compute: config.eval enables none of {flags}"
                     f"{why}. Enable one, e.g. --config.eval.enable_loss=True")
  return parts


def check_eval_sizes(config: Any, dataset: datasets.Dataset, parts: list[str]) -> None:
  """Fail before any work when config.eval asks for more images than a split holds."""
  ev = config.eval
  needs = []
  if "denoising_error" in parts:
    needs += [("denoising_examples", 256, "test"), ("denoising_reference", 2048, "train")]
  if "sampling" in parts:
    needs += [("reference_examples", 2048, "train")]
  for field, default, split in needs:
    wanted, available = int(setup.get_field(ev, field, default)), dataset.num_examples(split)
    if wanted > available:
      raise InputError(f"eval.{field}={wanted} is more than the {available} images of the "
                       f"{split} split of {config.data.dataset!r}; set "
                       f"--config.eval.{field}={available} or less")


def run_eval(config: Any, workdir: str, checkpoint_step: Any = None,
             sampler_name: str | None = None, num_steps: int | None = None,
             num_samples: int | None = None, **sampler_options) -> dict:
  """Evaluate the EMA parameters of the latest (or the given) checkpoint.

  Computes what config.eval enables of the test loss, test-set bits/dim, the denoising error per
  noise level and FD (FD-EffNet offline, or FID with Inception weights), IS and the out-of-range
  share of samples. The sampler is eval.sampler with the config's options (as --mode sample);
  `sampler_options` replace single ones. The summary is appended to workdir/eval/results.jsonl.
  """
  sde, model, dataset = setup.build(config)
  example_shape = datasets.example_shape(dataset.spec)
  parts = eval_parts(config, images=len(example_shape) == 3)
  check_eval_sizes(config, dataset, parts)
  params, step = setup.restore_ema_params(config, workdir, model, example_shape, checkpoint_step)
  score_fn = setup.score_fn_for(config, sde, model, params)
  out_dir = os.path.join(workdir, "eval", f"ckpt_{step}")
  os.makedirs(out_dir, exist_ok=True)
  result: dict[str, Any] = dict(checkpoint_step=step, time=time.strftime("%Y-%m-%d %H:%M:%S"))
  key = jax.random.PRNGKey(int(config.seed) + 2)
  if "loss" in parts:
    result.update(_eval_loss(config, dataset, sde, model, params, out_dir, key))
  if "bpd" in parts:
    result.update(_eval_bpd(config, dataset, sde, score_fn, out_dir, key))
  if "denoising_error" in parts:
    result["denoising_error"] = _denoising_error(config, dataset, sde, score_fn, out_dir, key)
  if "sampling" in parts:
    result.update(_eval_samples(config, workdir, dataset, sde, score_fn, out_dir, key,
                                sampler_name, num_steps, num_samples, sampler_options))
  path = os.path.join(workdir, "eval", "results.jsonl")
  io_utils.append_line(path, json.dumps(result))
  result["results_file"] = path
  return result


def _to_unit(x: np.ndarray, centered: bool) -> np.ndarray:
  return np.clip((x + 1.0) / 2.0 if centered else x, 0.0, 1.0)


def _first_images(batches, count: int) -> np.ndarray:
  """The first `count` (unpadded) images of an eval iterator."""
  out, seen = [], 0
  for batch in batches:
    images = batch["image"][batch["mask"].astype(bool)] if "mask" in batch else batch["image"]
    out.append(np.asarray(images[: count - seen]))
    seen += len(out[-1])
    if seen >= count:
      break
  return np.concatenate(out)


def _eval_loss(config: Any, dataset, sde, model, params, out_dir: str, key) -> dict:
  """The training loss (without dropout) on the test split, as score_sde's evaluation reports:
  the mean over every test example, padding excluded."""
  from tqdm import tqdm
  ev = config.eval
  loss_fn = jax.jit(setup.loss_fn_from_config(config, sde, model, train=False))
  limit = int(setup.get_field(ev, "loss_num_examples", 10 ** 9))
  progress = outputs.BatchProgress(os.path.join(out_dir, "loss_test"))
  total = min(limit, dataset.num_examples("test"))
  bar = tqdm(total=total, desc="eval loss (test)", unit="img", dynamic_ncols=True)
  seen = 0
  for i, batch in enumerate(dataset.eval_iterator("test")):
    if seen >= limit:
      break
    images = batch["image"][batch["mask"].astype(bool)][: limit - seen]
    seen += len(images)
    if i not in progress.done:
      loss = loss_fn(params, jax.numpy.asarray(images), jax.random.fold_in(key, i))
      progress.add(i, loss=np.float64(loss), count=len(images))
    bar.update(len(images))
  bar.close()
  counts = progress.gather("count")
  return dict(loss=float(np.sum(progress.gather("loss") * counts) / np.sum(counts)),
              loss_examples=int(np.sum(counts)))


def _eval_bpd(config: Any, dataset, sde, score_fn, out_dir: str, key) -> dict:
  """Bits/dim of the split eval.bpd_dataset through the probability-flow ODE."""
  from tqdm import tqdm
  from sgm_jax import likelihood
  ev = config.eval
  centered = bool(config.data.centered)
  split = str(setup.get_field(ev, "bpd_dataset", "test"))
  limit = int(setup.get_field(ev, "bpd_num_examples", 10 ** 9))
  ll_fn = likelihood.get_likelihood_fn(
      sde, divergence=str(setup.get_field(ev, "divergence", "rademacher")),
      num_probes=int(setup.get_field(ev, "num_probes", 1)),
      rtol=float(setup.get_field(ev, "rtol", 1e-5)), atol=float(setup.get_field(ev, "atol", 1e-5)),
      eps=float(setup.get_field(ev, "likelihood_eps", 1e-5)))
  progress = outputs.BatchProgress(os.path.join(out_dir, f"bpd_{split}"))
  total = min(limit, dataset.num_examples(split))
  bar = tqdm(total=total, desc=f"bits/dim ({split})", unit="img", dynamic_ncols=True)
  seen = 0
  for i, batch in enumerate(dataset.eval_iterator(split, uniform_dequantization=False)):
    if seen >= limit:
      break
    mask = batch["mask"][: limit - seen].astype(bool)
    seen += int(mask.sum())
    if i not in progress.done:
      x01 = _to_unit(batch["image"][: len(mask)], centered)
      bpd, nfe = likelihood.bits_per_dim(jax.random.fold_in(key, i), ll_fn, score_fn, x01,
                                         centered, uniform_dequantization=True)
      progress.add(i, bpd=np.asarray(bpd)[mask], nfe=np.asarray(nfe))
    bar.update(int(mask.sum()))
    bar.set_postfix(bpd=f"{float(progress.gather('bpd').mean()):.3f}", refresh=False)
  bar.close()
  values = progress.gather("bpd")
  return dict(bpd=float(values.mean()), bpd_stderr=float(values.std() / np.sqrt(len(values))),
              bpd_examples=int(len(values)), bpd_split=split)


def _denoising_error(config: Any, dataset, sde, score_fn, out_dir: str, key) -> dict:
  """eval/denoising_error.png and its numbers: test-set noise / data prediction error per noise
  level against the posterior mean of training images (evaluation.denoising)."""
  from sgm_jax.evaluation import denoising
  ev = config.eval
  n = int(setup.get_field(ev, "denoising_examples", 256))
  m = int(setup.get_field(ev, "denoising_reference", 2048))
  test = _first_images(dataset.eval_iterator("test", uniform_dequantization=False), n)
  reference = None
  if m > 0:
    reference = _first_images(dataset.eval_iterator("train", uniform_dequantization=False), m)
  ts = denoising.noise_levels(sde, int(setup.get_field(ev, "denoising_levels", 16)))
  batch = int(setup.get_field(ev, "batch_size", 128))
  result = denoising.denoising_error(jax.random.fold_in(key, 7), score_fn, sde,
                                     [test[i:i + batch] for i in range(0, len(test), batch)], ts,
                                     reference)
  path = denoising.plot_denoising_error(
      result, os.path.join(os.path.dirname(out_dir), "denoising_error.png"),
      title=f"{config.data.dataset} test images ({result.num_examples}), checkpoint "
            f"{os.path.basename(out_dir).replace('ckpt_', '')}: mean squared error per pixel")
  logging.info("denoising error per noise level written to %s", path)
  return dict(result.as_dict(), png=path)


def _eval_samples(config: Any, workdir: str, dataset, sde, score_fn, out_dir: str, key,
                  sampler_name: str | None, num_steps: int | None, num_samples: int | None,
                  overrides: dict) -> dict:
  """FD (FD-EffNet, or FID with Inception weights), IS and the out-of-range share of samples."""
  from tqdm import tqdm
  from sgm_jax.evaluation import features, metrics
  ev = config.eval
  centered = bool(config.data.centered)
  example_shape = datasets.example_shape(dataset.spec)
  name = str(setup.get_field(ev, "feature_extractor", "effnet"))
  extractor = features.get_feature_extractor(name,
                                             setup.get_field(ev, "inception_weights", None) or None)
  sampler_name = sampler_name or str(setup.get_field(ev, "sampler", "deis"))
  num_steps = int(num_steps or setup.get_field(ev, "num_steps", 10))
  n = int(num_samples or setup.get_field(ev, "num_samples", 1024))
  if n < 1:
    raise InputError(f"num_samples must be >= 1, got {n}")
  options = setup.sampler_options_from_config(config, sampler_name, overrides)
  batch = min(int(setup.get_field(config.sampling, "batch_size", 64)), n)
  sampler = sampling.get_sampler(sampler_name, sde, (batch,) + tuple(example_shape),
                                 num_steps=num_steps, **options)
  tag = f"{sampler_name}_{num_steps}" + "".join(f"_{k}-{v}" for k, v in sorted(options.items()))
  progress = outputs.BatchProgress(os.path.join(out_dir, f"samples_{tag}"))
  for i in tqdm(range(-(-n // batch)), desc=f"samples ({sampler_name})", unit="batch",
                dynamic_ncols=True):
    if i in progress.done:
      continue
    x, nfe = sampler(jax.random.fold_in(key, 10 ** 6 + i), score_fn)
    x = np.asarray(x)
    x01 = _to_unit(x, centered)
    feats = extractor(x01)
    progress.add(i, features=feats["features"], logits=feats["logits"], nfe=np.asarray(nfe),
                 out_of_range=outputs.out_of_range_share(x, centered), max_abs=np.abs(x).max(),
                 first=x01[:0] if i else x01)
  sample_features = progress.gather("features")[:n]
  png = os.path.join(out_dir, f"samples_{tag}.png")
  io_utils.save_image_grid(progress.done[0]["first"], png, data_range=(0.0, 1.0),
                           upscale=max(1, 128 // example_shape[0]))
  ref_count = int(setup.get_field(ev, "reference_examples", 2048))
  ref_batches = (dict(image=_to_unit(b["image"], centered), mask=b["mask"])
                 for b in dataset.eval_iterator("train", uniform_dequantization=False))
  cache = features.default_cache_path(os.path.join(workdir, "eval"), name,
                                      str(config.data.dataset), "train",
                                      int(config.data.image_size), ref_count)
  ref = features.dataset_statistics(extractor, ref_batches, cache,
                                    dataset=str(config.data.dataset), split="train",
                                    image_size=int(config.data.image_size), count=ref_count,
                                    available=dataset.num_examples("train"))
  mu, cov = metrics.gaussian_statistics(sample_features)
  fd = metrics.frechet_distance(mu, cov, ref.mean, ref.cov)
  probs = metrics.softmax(progress.gather("logits")[:n])
  is_mean, is_std = metrics.inception_score(probs, splits=min(10, n))
  return {features.METRIC_NAMES[name]: fd, f"IS ({name})": is_mean, f"IS ({name}) std": is_std,
          "num_samples": n, "reference_examples": ref_count, "sampler": sampler_name,
          "num_steps": num_steps, "nfe": float(progress.gather("nfe").mean()),
          "sampler_options": options,
          "out_of_range": float(progress.gather("out_of_range").mean()),
          "max_abs": float(progress.gather("max_abs").max()), "samples_png": png}
