"""The noise-conditional classifier's input normalization: score_sde's `get_logit_fn`
(models/utils.py) standardizes each channel with CIFAR-10 statistics before the WRN, so converted
score_sde classifiers must too; classifiers trained here do not.

log p_t(y | x) and its gradient (the guidance term of Eq. 14) are checked against a direct
computation written out here: normalize by hand, apply the WRN at the VE-equivalent noise level.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import serialization

from sgm_jax import controllable as ctl
from sgm_jax import convert, sde_lib
from sgm_jax.cli import classifier as cli_classifier
from sgm_jax.controllable import conditional
from sgm_jax.models.wideresnet import create_classifier

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile-heavy, tiny compute

# The constants of score_sde's get_logit_fn (models/utils.py, commit 0acb9e0): CIFAR-10 channel
# mean and std of data in [0, 1].
SCORE_SDE_MEAN = (0.49139968, 0.48215841, 0.44653091)
SCORE_SDE_STD = (0.24703223, 0.24348513, 0.26158784)

SIZES = dict(num_classes=3, blocks_per_group=1, channel_multiplier=1)
SHAPE = (2, 8, 8, 3)
VE = sde_lib.VESDE()
VP = sde_lib.VPSDE()
NORMALIZATIONS = {"score_sde": "score_sde_cifar10", "none": None}
CASES = [("ve", "score_sde"), ("vp", "score_sde"), ("ve", "none")]


def _direct_log_prob(model, params, sde, x, t, y, mean=None, std=None):
  """log softmax(WRN((x / alpha - mean) / std, rho))[y], written out as score_sde does it."""
  alpha = sde.alpha(t)[:, None, None, None]
  inputs = x / alpha
  if mean is not None:
    inputs = (inputs - jnp.asarray(mean)[None, None, None, :]) / jnp.asarray(std)[None, None,
                                                                                   None, :]
  logits = model.apply({"params": params}, inputs, sde.rho(t))
  return jax.nn.log_softmax(logits, axis=-1)[jnp.arange(x.shape[0]), y]


@pytest.fixture(scope="module")
def computed():
  """Ours and the direct computation, for VE and VP, normalization on and off (one compile)."""
  model = create_classifier(**SIZES)
  x = 0.5 + 0.3 * jax.random.normal(jax.random.PRNGKey(0), SHAPE)  # data-like, in about [0, 1]
  t = jnp.array([0.05, 0.4])
  y = jnp.array([2, 0])
  zero_score = lambda x, t: jnp.zeros_like(x)

  @jax.jit
  def compute(x, t, y):
    params = model.init(jax.random.PRNGKey(1), x, jnp.ones((2,)))["params"]
    out = {}
    for sde_name, norm_name in CASES:
      sde, norm = {"ve": VE, "vp": VP}[sde_name], NORMALIZATIONS[norm_name]
      log_prob_fn = ctl.wrn_log_prob_fn(model, params, sde, input_normalization=norm)
      stats = (SCORE_SDE_MEAN, SCORE_SDE_STD) if norm else (None, None)
      direct = lambda v: _direct_log_prob(model, params, sde, v, t, y, *stats)
      out[sde_name, norm_name] = {
          "log_prob": log_prob_fn(x, t, y),
          "direct_log_prob": direct(x),
          # Eq. 14's guidance term through conditional_score_fn (score 0, scale 1).
          "grad": ctl.conditional_score_fn(zero_score, log_prob_fn, y, 1.0)(x, t),
          "direct_grad": jax.grad(lambda v: jnp.sum(direct(v)))(x),
      }
    return out

  return compute(x, t, y)


def test_the_constants_are_score_sde_s():
  mean, std = conditional.INPUT_NORMALIZATIONS["score_sde_cifar10"]
  assert mean == SCORE_SDE_MEAN and std == SCORE_SDE_STD


@pytest.mark.parametrize("sde_name, norm_name", CASES)
def test_log_prob_and_guidance_gradient_equal_the_direct_computation(computed, sde_name,
                                                                     norm_name):
  out = computed[sde_name, norm_name]
  np.testing.assert_allclose(out["log_prob"], out["direct_log_prob"], rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(out["log_prob"]) < 0)
  np.testing.assert_allclose(out["grad"], out["direct_grad"], rtol=1e-4,
                             atol=1e-6 * float(np.abs(out["direct_grad"]).max()))
  assert float(np.abs(out["grad"]).max()) > 0


def test_normalization_changes_log_prob_and_gradient(computed):
  """On and off differ clearly, so the comparisons above can tell them apart."""
  on, off = computed["ve", "score_sde"], computed["ve", "none"]
  assert np.abs(np.asarray(on["log_prob"]) - np.asarray(off["log_prob"])).max() > 1e-3
  a, b = (np.asarray(g).reshape(SHAPE[0], -1) for g in (on["grad"], off["grad"]))
  cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
  assert cosine.max() < 0.99, cosine


def test_normalization_must_be_stated_and_valid():
  model = create_classifier(**SIZES)
  with pytest.raises(TypeError, match="input_normalization"):
    ctl.wrn_log_prob_fn(model, {}, VE)  # pylint: disable=missing-kwoa
  with pytest.raises(ValueError, match=r"unknown input normalization 'cifar'.*score_sde_cifar10"):
    ctl.NoiseConditionalLogits(model, VE, "cifar")
  with pytest.raises(ValueError, match="every std > 0"):
    ctl.NoiseConditionalLogits(model, VE, ((0.5, 0.5, 0.5), (0.2, 0.0, 0.2)))
  with pytest.raises(ValueError, match="as many means as stds"):
    ctl.NoiseConditionalLogits(model, VE, ((0.5, 0.5), (0.2, 0.2, 0.2)))
  logits = ctl.NoiseConditionalLogits(model, VE, [[0.1, 0.2, 0.3], [1.0, 2.0, 3.0]])
  assert logits.input_normalization == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
  assert hash(logits) == hash(ctl.NoiseConditionalLogits(model, VE, ((0.1, 0.2, 0.3),
                                                                     (1.0, 2.0, 3.0))))
  named = ctl.NoiseConditionalLogits(model, VE, "score_sde_cifar10")
  assert named == ctl.NoiseConditionalLogits(model, VE, (SCORE_SDE_MEAN, SCORE_SDE_STD))
  with pytest.raises(ValueError, match="3 channels, the images 1"):
    named({}, jnp.zeros((1, 8, 8, 1)), jnp.ones((1,)))


# --- the command line's converted-classifier path ---------------------------------------------------
def _config(checkpoint, centered=False):
  config = ml_collections.ConfigDict({"seed": 0})
  config.data = ml_collections.ConfigDict({"centered": centered})
  config.classifier = ml_collections.ConfigDict(dict(SIZES, checkpoint=checkpoint))
  return config


def _write_original_classifier(path, params):
  """A bare parameter tree as score_sde saved it: GroupNorm scale/bias as (1, 1, 1, C)."""
  flat = convert.flatten(params)
  legacy = {p: (np.asarray(v).reshape((1, 1, 1, -1)) if p[-2] in ("init_bn", "bn_2",
                                                                    "pre-pool-bn") else v)
            for p, v in flat.items()}
  assert sum(np.ndim(v) == 4 and np.shape(v)[:3] == (1, 1, 1) for v in legacy.values()) > 3
  with open(path, "wb") as f:
    f.write(serialization.msgpack_serialize(convert.unflatten(legacy)))
  return str(path)


def test_a_converted_classifier_is_loaded_with_score_sde_s_normalization(tmp_path):
  """config.classifier.checkpoint: --class_label sampling uses score_sde's classifier with the
  normalization its get_logit_fn applies; the project's own classifiers stay without."""
  model = create_classifier(**SIZES)
  x = 0.5 + 0.3 * jax.random.normal(jax.random.PRNGKey(2), SHAPE)
  t, y = jnp.array([0.1, 0.6]), jnp.array([1, 2])
  params = jax.jit(model.init)(jax.random.PRNGKey(3), x, jnp.ones((2,)))["params"]
  path = _write_original_classifier(tmp_path / "classifier_checkpoint", params)
  log_prob_fn, step = cli_classifier.load_classifier_log_prob(_config(path), str(tmp_path), VE,
                                                              SHAPE[1:])
  assert step is None
  assert log_prob_fn.func.logits_fn.input_normalization == (SCORE_SDE_MEAN, SCORE_SDE_STD)
  direct = jax.jit(lambda p, x: _direct_log_prob(model, p, VE, x, t, y, SCORE_SDE_MEAN,
                                                  SCORE_SDE_STD))
  np.testing.assert_allclose(jax.jit(log_prob_fn)(x, t, y), direct(params, x), rtol=1e-5,
                             atol=1e-6)
  _, own_logits_fn, _, _ = cli_classifier.classifier_parts(_config(None), VE, SHAPE[1:])
  assert own_logits_fn.input_normalization is None
  with pytest.raises(ValueError, match="config.classifier.checkpoint must be the path"):
    cli_classifier.load_classifier_log_prob(_config(7), str(tmp_path), VE, SHAPE[1:])
  with pytest.raises(ValueError, match="data.centered=True"):
    cli_classifier.load_classifier_log_prob(_config(path, centered=True), str(tmp_path), VE,
                                            SHAPE[1:])
