"""`main.py --mode import`: a score_sde training checkpoint (or its noise-conditional classifier)
becomes a workdir that every mode accepts as if it had trained there.

    python main.py --mode import --config configs/ve/cifar10_ncsnpp_continuous.py \\
        --workdir runs/ve_cifar10 --checkpoint ckpts/ve/cifar10_ncsnpp_continuous/checkpoint_24

A training checkpoint gives the config (config.json, as --mode train records it), one Orbax
checkpoint at the original's step holding the live parameters, the EMA parameters and the
optimizer state (flax.optim.Adam's moments as optax Adam's, sgm_jax.convert), and a line in the
training log (train_log.csv) naming the source. The tree is checked against the config's network
before anything is written. `--classifier` puts score_sde's classifier into workdir/classifier/,
where `--mode sample --class_label` finds it.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax import convert, datasets, models, train
from sgm_jax.checkpoints import CheckpointStore, has_checkpoints
from sgm_jax.cli import classifier, setup
from sgm_jax.errors import InputError
from sgm_jax.workdir import WorkdirLock, check_or_record_config


def run_import(config: Any, workdir: str, checkpoint: str | None,
               import_classifier: bool = False) -> dict:
  """Import `checkpoint` (a checkpoint_<n> file, score_sde's checkpoints/ folder, its
  checkpoints-meta/checkpoint snapshot, or its workdir) into `workdir`; returns what was written."""
  if not checkpoint:
    raise InputError("--mode import needs --checkpoint: a score_sde checkpoint_<n> file, its "
                     "checkpoints/ folder (the newest) or checkpoints-meta/checkpoint")
  if import_classifier:
    return _import_classifier(config, workdir, checkpoint)
  if has_checkpoints(workdir):
    raise InputError(f"workdir {workdir} already holds checkpoints; import into a new --workdir")
  source = convert.resolve_checkpoint(checkpoint)
  state = _train_state(config, source)
  os.makedirs(workdir, exist_ok=True)
  with WorkdirLock(workdir):
    if has_checkpoints(workdir):  # a job that started meanwhile
      raise InputError(f"workdir {workdir} already holds checkpoints; import into a new --workdir")
    check_or_record_config(workdir, config)
    spec = setup.loop_spec_from_config(config)
    store = CheckpointStore(workdir, keep=spec.keep_checkpoints, writer=True)
    try:
      store.save(int(state.step), state, kind="periodic")
    finally:
      store.close()
    line = (f"imported from {os.path.abspath(source)} (score_sde training checkpoint, step "
            f"{int(state.step)}) by --mode import")
    train.note_in_loss_log(workdir, line)
  logging.info("%s", line)
  return {"workdir": workdir, "source": source, "step": int(state.step),
          "num_params": sum(int(np.size(p)) for p in jax.tree_util.tree_leaves(state.params))}


def _train_state(config: Any, source: str) -> train.TrainState:
  """The train state of this config's run continuing the original at `source` (checked against
  the config's network first: one error line naming the first differing path)."""
  sde = setup.sde_from_config(config)
  model = models.create_model(config, sde)
  example_shape = tuple(datasets.example_shape(datasets.from_config(config)))
  tx = setup.optimizer_from_config(config).build()
  abstract = setup.abstract_initial_state(config, model, example_shape, tx)
  original = convert.to_training_dict(convert.read_training_state(source), source=repr(source))
  difference = convert.first_difference(original["params"], abstract.params)
  if difference is not None:
    raise InputError(f"checkpoint {source} does not fit the network of this config "
                     f"({config.model.name}): {difference}")
  ema_rate = float(config.model.ema_rate)
  if not np.isclose(original["ema_rate"], ema_rate):
    logging.warning("the checkpoint was trained with ema_rate %g, the config has %g; training "
                    "continues with the config's", original["ema_rate"], ema_rate)
  as_leaf = lambda tree, like: jax.tree_util.tree_map(
      lambda v, a: jnp.asarray(v, a.dtype), tree, like)
  params = as_leaf(original["params"], abstract.params)
  state = train.TrainState(
      step=jnp.asarray(original["step"], abstract.step.dtype), params=params,
      params_ema=as_leaf(original["params_ema"], abstract.params_ema),
      opt_state=convert.with_adam_moments(tx.init(params), original["mu"], original["nu"],
                                          original["adam_count"]))
  shapes = lambda tree: jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), tree)
  if shapes(state) != shapes(abstract):  # the restore target of every mode
    raise AssertionError("the imported train state does not have the config's structure")
  return state


def _import_classifier(config: Any, workdir: str, checkpoint: str) -> dict:
  """score_sde's noise-conditional classifier (a bare parameter tree) into workdir/classifier/,
  with the sizes of the network it fits, so that --mode sample --class_label uses it."""
  out_dir = os.path.join(workdir, classifier.CLASSIFIER_DIR)
  if has_checkpoints(out_dir) or os.path.exists(classifier.imported_classifier_file(workdir)):
    raise InputError(f"{out_dir} already holds a classifier; import into a new --workdir")
  source = convert.resolve_checkpoint(checkpoint)
  classifier.check_score_sde_data_range(config)
  architecture = classifier.imported_architecture(config)
  image_shape = tuple(datasets.example_shape(datasets.from_config(config)))
  expected = convert.abstract_variables(classifier.imported_network(architecture),
                                       (1,) + image_shape, jnp.float32)
  variables = convert.load_classifier_variables(source)  # checked here, in one line
  difference = convert.first_difference(variables, expected)
  if difference is not None:
    sizes = ", ".join(f"{k}={v}" for k, v in architecture.items())
    raise InputError(f"classifier {source} does not fit the WRN of config.classifier ({sizes}): "
                     f"{difference}; set --config.classifier.blocks_per_group, channel_multiplier "
                     "and num_classes to the checkpoint's")
  os.makedirs(workdir, exist_ok=True)
  with WorkdirLock(workdir):
    path = classifier.save_imported_classifier(workdir, variables, architecture, source)
  count = sum(int(np.size(v)) for v in convert.flatten(variables).values())
  return {"workdir": workdir, "source": source, "classifier": path, "num_params": count}
