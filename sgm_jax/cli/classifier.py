"""The noise-conditional classifier of `config.classifier` at the config edge: its spec, network,
checkpoint layout in workdir/classifier/, and its log p_t(y | x) for class-conditional sampling.

Trained by `--mode train_classifier`, used by `--mode sample --class_label`. With
`config.classifier.checkpoint` set, `--mode sample --class_label` uses score_sde's released
classifier instead (its checkpoint, or the file `python -m sgm_jax.convert --classifier` writes),
with score_sde's CIFAR-10 input normalization, as its `get_logit_fn` applies it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax import controllable, models, sde_lib
from sgm_jax.checkpoints import CheckpointError, CheckpointStore, has_checkpoints
from sgm_jax.cli.setup import get_field
from sgm_jax.errors import InputError

CLASSIFIER_DIR = "classifier"  # its checkpoints and metrics.json, under the workdir


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
  # An original score_sde classifier checkpoint (bare parameter tree) to use instead of the one
  # trained in workdir/classifier; set blocks_per_group and channel_multiplier to its sizes or
  # leave them out (models.create_classifier then builds score_sde's WRN-28-10).
  checkpoint: Optional[str] = None

  @classmethod
  def from_config(cls, config: Any) -> "ClassifierSpec":
    section = get_field(config, "classifier", None) or {}
    values = {f.name: get_field(section, f.name, f.default) for f in dataclasses.fields(cls)}
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
    if spec.checkpoint is not None and not (isinstance(spec.checkpoint, str) and spec.checkpoint):
      raise InputError("config.classifier.checkpoint must be the path of a score_sde classifier "
                       f"checkpoint or None, got {spec.checkpoint!r}")
    return spec


def classifier_parts(config: Any, sde: sde_lib.SDE, image_shape: tuple):
  """(spec, logits_fn, initial params, optimizer) of config.classifier."""
  import optax
  from sgm_jax.models.wideresnet import create_classifier
  if len(image_shape) != 3:
    raise InputError(f"the noise-conditional classifier needs image data (H, W, C); dataset "
                     f"{config.data.dataset!r} gives examples of shape {tuple(image_shape)}")
  spec = ClassifierSpec.from_config(config)
  model = create_classifier(spec.num_classes, spec.blocks_per_group, spec.channel_multiplier,
                            dtype=models.model_dtype(config))
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  key = jax.random.PRNGKey(int(config.seed) + 7)
  params = jax.jit(model.init)(key, x, jnp.ones((1,)))["params"]  # eager init: seconds of dispatch
  logits_fn = controllable.NoiseConditionalLogits(model, sde, input_normalization=None)
  return spec, logits_fn, params, optax.adam(spec.lr)


def classifier_state(params, opt_state, step: int) -> dict:
  """What a classifier checkpoint holds."""
  return {"params": params, "opt_state": opt_state, "step": np.asarray(step, np.int64)}


# score_sde's get_logit_fn normalizes with the CIFAR-10 statistics of data in [0, 1].
CONVERTED_INPUT_NORMALIZATION = "score_sde_cifar10"


def check_score_sde_data_range(config: Any) -> None:
  """score_sde's classifier was trained on data in [0, 1]: refuse a config of centered data."""
  if bool(get_field(config.data, "centered", False)):
    raise InputError("score_sde's classifier was trained on data in [0, 1]; this config has "
                     "data.centered=True (data in [-1, 1])")


def load_converted_classifier_log_prob(config: Any, sde: sde_lib.SDE, image_shape: tuple):
  """(log_prob_fn(x, t, y), None) of score_sde's classifier at config.classifier.checkpoint,
  with score_sde's input normalization; it was trained on data in [0, 1] (data.centered=False)."""
  from sgm_jax import convert, models
  spec = ClassifierSpec.from_config(config)
  check_score_sde_data_range(config)
  model = models.create_classifier(config)  # as the converter builds it (WRN-28-10 by default)
  variables = convert.load_classifier_variables(spec.checkpoint, model,
                                                (1,) + tuple(image_shape))
  log_prob_fn = controllable.wrn_log_prob_fn(model, variables["params"], sde,
                                             input_normalization=CONVERTED_INPUT_NORMALIZATION)
  return log_prob_fn, None


# --- score_sde's classifier imported into a workdir (main.py --mode import --classifier) -----
IMPORTED_CLASSIFIER = "score_sde_classifier"  # .msgpack (parameters) and .json (its network)


def imported_classifier_file(workdir: str, ext: str = ".msgpack") -> str:
  return os.path.join(workdir, CLASSIFIER_DIR, IMPORTED_CLASSIFIER + ext)


def imported_architecture(config: Any) -> dict:
  """The WRN sizes of config.classifier, score_sde's WRN-28-10 where it sets none."""
  from sgm_jax.models import wideresnet
  network = wideresnet.from_config(config)
  return {"num_classes": int(network.num_outputs),
          "blocks_per_group": int(network.blocks_per_group),
          "channel_multiplier": int(network.channel_multiplier)}


def imported_network(architecture: dict, dtype: Any = None):
  """The classifier of an imported record, computing in `dtype` (None: float32)."""
  from sgm_jax.models import wideresnet
  return wideresnet.create_classifier(**{k: architecture[k] for k in (
      "num_classes", "blocks_per_group", "channel_multiplier")}, dtype=dtype or jnp.float32)


def save_imported_classifier(workdir: str, variables: Any, architecture: dict,
                             source: str) -> str:
  """Write the classifier's parameters and a record of its network and input normalization."""
  import json
  from sgm_jax import convert
  from sgm_jax.io_utils import atomic_write
  path = convert.save_variables(variables, imported_classifier_file(workdir))
  with atomic_write(imported_classifier_file(workdir, ".json"), "w") as f:
    json.dump(dict(architecture, source=os.path.abspath(source),
                   input_normalization=CONVERTED_INPUT_NORMALIZATION), f, indent=1)
  return path


def load_imported_classifier_log_prob(workdir: str, sde: sde_lib.SDE, image_shape: tuple,
                                      dtype: Any = None):
  """(log_prob_fn(x, t, y), None) of the classifier --mode import --classifier wrote, computing
  in `dtype` (None: float32)."""
  import json
  from sgm_jax import convert
  with open(imported_classifier_file(workdir, ".json")) as f:
    record = json.load(f)
  model = imported_network(record, dtype)
  variables = convert.load_classifier_variables(imported_classifier_file(workdir), model,
                                                (1,) + tuple(image_shape))
  log_prob_fn = controllable.wrn_log_prob_fn(model, variables["params"], sde,
                                             input_normalization=record["input_normalization"])
  return log_prob_fn, None


def load_classifier_log_prob(config: Any, workdir: str, sde: sde_lib.SDE, image_shape: tuple):
  """(log_prob_fn(x, t, y), step) of the classifier of config.classifier.checkpoint (score_sde's,
  step None), else of the one imported into workdir/classifier (step None), else of the one
  trained there by --mode train_classifier (its newest checkpoint)."""
  if ClassifierSpec.from_config(config).checkpoint:
    return load_converted_classifier_log_prob(config, sde, image_shape)
  if os.path.exists(imported_classifier_file(workdir, ".json")):
    return load_imported_classifier_log_prob(workdir, sde, image_shape,
                                             models.model_dtype(config))
  out_dir = os.path.join(workdir, CLASSIFIER_DIR)
  if not has_checkpoints(out_dir):
    raise CheckpointError(f"no classifier in {out_dir}; train it first with "
                          "--mode train_classifier, or import score_sde's with --mode import "
                          "--classifier")
  _, logits_fn, params, optimizer = classifier_parts(config, sde, image_shape)
  store = CheckpointStore(out_dir, keep=2)
  try:
    state = store.restore(classifier_state(params, optimizer.init(params), 0))
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
