"""Score networks, one file per family, and the one name -> constructor table used at the edge.

Every network is called as `model.apply(variables, x, labels, train=...)` with x (B, H, W, C) and
(B,) time labels (see sgm_jax.score for what the labels are per SDE). Every network computes in
config.model.dtype ('float32' or 'bfloat16', `model_dtype`) with float32 parameters, so the
parameter tree does not depend on it; sgm_jax.score casts the output back to float32.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sgm_jax import sde_lib
from sgm_jax.errors import InputError
from sgm_jax.models import ddpm, ncsnpp, ncsnv2, small, wideresnet
from sgm_jax.models.layers import compute_dtype
from sgm_jax.score import train_kwargs

Array = jax.Array

# config.model.name -> constructor(config). The small models take the SDE too: ScoreNet divides
# its output by the SDE's std sigma(t), as the score-SDE tutorial's network does.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "ncsnpp": ncsnpp.from_config,
    "ddpm": ddpm.from_config,
    "ncsnv2_64": ncsnv2.from_config,
    "ncsnv2_128": ncsnv2.from_config,
    "ncsnv2_256": ncsnv2.from_config,
    "unet_small": small.from_config,
    "scorenet": small.from_config,
    "mixer": small.from_config,
    "mlp": small.from_config,
}
_TAKES_SDE = frozenset({"unet_small", "scorenet", "mixer", "mlp"})

# The noise-conditional classifier for class-conditional sampling (config.classifier, optional).
CLASSIFIERS: dict[str, Callable[..., nn.Module]] = {"wideresnet": wideresnet.from_config}


def model_dtype(config: Any) -> Any:
  """The dtype config.model.dtype names (float32 where the config has no such field or no model
  section); an InputError names a bad value and the valid ones."""
  return compute_dtype((config.get("model", None) or {}).get("dtype", None))


def create_model(config: Any, sde: Optional[sde_lib.SDE] = None) -> nn.Module:
  """The score network named by config.model.name, built from the config.

  `sde` is the SDE the network is trained with (sde_lib.from_config(config)); the small
  'unet_small' / 'scorenet' needs it (a ValueError says so) unless config.model.parameterization
  names an output other than the score. The other networks read what they need from config.model.
  """
  name = config.model.name
  if name == "ncsn":
    raise InputError("NCSN v1 (config.model.name 'ncsn') is not provided: the original score_sde "
                     "code cannot build it either; use NCSNv2 ('ncsnv2_64', configs/ve/ncsnv2/) "
                     "or NCSN++")
  if name not in MODELS:
    raise InputError(f"unknown model {name!r} (config.model.name); valid names are "
                     f"{sorted(MODELS)}")
  model_dtype(config)  # validated before anything is built
  if name in _TAKES_SDE:
    return MODELS[name](config, sde=sde)
  return MODELS[name](config)


def create_classifier(config: Any) -> nn.Module:
  """The noise-conditional classifier of config.classifier (score_sde's WRN-28-10 by default)."""
  return CLASSIFIERS["wideresnet"](config)


def init_model(model: nn.Module, key: Array, input_shape: Sequence[int],
               label_dtype: Any = jnp.int32) -> dict:
  """Variables of `model` for inputs of `input_shape` (B, ...) and (B,) zero labels.

  score_sde initialized with int32 labels; pass label_dtype=jnp.float32 for networks whose labels
  must be floats (the classifier's noise scales).
  """
  input_shape = tuple(int(d) for d in input_shape)
  params_key, dropout_key = jax.random.split(key)

  @jax.jit
  def init(params_key, dropout_key):
    x = jnp.zeros(input_shape, jnp.float32)
    labels = jnp.zeros(input_shape[:1], label_dtype)
    return model.init({"params": params_key, "dropout": dropout_key}, x, labels,
                      **train_kwargs(model, False))

  return dict(init(params_key, dropout_key))
