"""`main.py --mode train_classifier`: the noise-conditional WRN classifier of `config.classifier`,
trained on noisy training images (resumable) in workdir/classifier/, for class-conditional
sampling (`--mode sample --class_label`)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax import controllable, datasets, io_utils, sde_lib
from sgm_jax.checkpoints import CheckpointStore, has_checkpoints
from sgm_jax.cli import classifier, setup
from sgm_jax.errors import InputError, TrainingDiverged
from sgm_jax.workdir import WorkdirLock, check_or_record_config

ACCURACY_TIMES = (1e-3, 0.1, 0.3, 0.5, 0.8)  # the t of the test accuracies in metrics.json


def run_train_classifier(config: Any, workdir: str) -> dict:
  """Train (or resume) the noise-conditional classifier; returns its test accuracies.

  The step-s batch is the dataset's training batch s and its noise key fold_in(seed, s), so a
  resumed run repeats the uninterrupted one. Checkpoints in workdir/classifier/; test accuracies
  at several t in workdir/classifier/metrics.json.
  """
  from tqdm import tqdm
  out_dir = os.path.join(workdir, classifier.CLASSIFIER_DIR)
  os.makedirs(out_dir, exist_ok=True)
  with WorkdirLock(out_dir):
    sde = setup.sde_from_config(config)
    spec = classifier.ClassifierSpec.from_config(config)
    data_spec = dataclasses.replace(datasets.from_config(config), batch_size=spec.batch_size)
    dataset = datasets.get_dataset(data_spec)
    first = _labelled_batch(dataset, 0)
    _, logits_fn, params, optimizer = classifier.classifier_parts(config, sde,
                                                                  first["image"].shape[1:])
    num_classes = int(dataset.labels("train").max()) + 1
    if num_classes > spec.num_classes:
      raise InputError(f"dataset {config.data.dataset!r} has labels up to {num_classes - 1}, but "
                       f"config.classifier.num_classes = {spec.num_classes}")
    check_or_record_config(workdir, config)
    store = CheckpointStore(out_dir, keep=2, writer=True)
    try:
      state = classifier.classifier_state(params, optimizer.init(params), 0)
      if has_checkpoints(out_dir) and store.latest_step() is not None:
        state = store.restore(state)
        logging.info("classifier: resuming from step %d", int(state["step"]))
      state = _train_loop(store, state, dataset, sde, logits_fn, optimizer, spec,
                          int(config.seed), tqdm)
    finally:
      store.close()
    metrics = classifier_accuracy(logits_fn, state["params"], sde, dataset, ACCURACY_TIMES,
                                  spec.eval_examples, int(config.seed))
    metrics["step"] = int(state["step"])
    path = os.path.join(out_dir, "metrics.json")
    with io_utils.atomic_write(path, "w") as f:
      json.dump(metrics, f, indent=1)
    metrics["metrics_file"] = path
    return metrics


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


def _labelled_batch(dataset: datasets.Dataset, step: int, split: str = "train") -> dict:
  batch = dataset.train_batch(step, split=split)
  if "label" not in batch:
    raise InputError(f"dataset {dataset.spec.dataset!r} has no class labels; the classifier needs "
                     "a labelled dataset (FashionMNIST, MNIST5k, digits, CIFAR-10, an .npz with "
                     "'labels', or a folder with class subfolders)")
  return {"image": batch["image"], "label": batch["label"]}


def _train_loop(store, state, dataset, sde, logits_fn, optimizer, spec, seed, tqdm):
  """Steps from state["step"] to spec.n_iters (or spec.max_seconds), saved every snapshot_freq."""
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
      store.save(step, classifier.classifier_state(params, opt_state, step))
    if out_of_time:
      logging.info("classifier: stopping at step %d after max_seconds=%s", step, spec.max_seconds)
      break
  bar.close()
  return classifier.classifier_state(params, opt_state, step)
