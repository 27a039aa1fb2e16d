"""DDPM, NCSNv2 and the noise-conditional WRN classifier against score_sde's parameter trees.

Every reference tree with model_name 'ddpm' / 'ncsnv2_*' (and the classifier's) is rebuilt from its
model_config through our `from_config` under jax.eval_shape and must have the same parameter paths,
shapes and count, and (where recorded) the same module call order. Tiny real forward passes check
shapes, finiteness, dropout and the division by the noise level.
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from param_trees import assert_matches_reference, module_call_order
from reference_data import PARAM_TREES
from sgm_jax import sde_lib
from sgm_jax.models import ddpm, layers, ncsnv2, wideresnet

# Tiny programs: XLA's optimizations only cost compile time here.
pytestmark = pytest.mark.usefixtures("fast_compiles")

MODERN = pathlib.Path(PARAM_TREES) / "modern_flax"
_JSONS = sorted(MODERN.glob("*.json")) if MODERN.is_dir() else []


def _load(path):
  return json.loads(path.read_text())


def _files_of(prefixes):
  return [p.name for p in _JSONS if str(_load(p).get("model_name")).startswith(prefixes)]


DDPM_FILES = _files_of(("ddpm",))
NCSNV2_FILES = _files_of(("ncsnv2_",))
CLASSIFIER_FILE = "classifier_wideresnet_noise_conditional.json"


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
  """Compile with little optimization (these programs run once), restored afterwards."""
  flag = "jax_disable_most_optimizations"
  previous = jax.config.values.get(flag, False)
  jax.config.update(flag, True)
  yield
  jax.config.update(flag, previous)


def _config(ref):
  """A score_sde-like ConfigDict from a reference file (the real configs/ are built elsewhere)."""
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(ref["model_config"])
  height, _, channels = ref["image_shape"]
  config.data = ml_collections.ConfigDict(
      {"image_size": height, "num_channels": channels, "centered": False})
  return config


def _trace(model, shape, time_cond):
  """Parameter shapes {path: shape} and first-call module order of model.init, without compute."""
  rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
  with module_call_order() as order:
    variables = jax.eval_shape(model.init, rngs, jnp.zeros(shape), time_cond)
  shapes = {"/".join(k): tuple(v.shape) for k, v in flatten_dict(variables).items()}
  return shapes, order


def test_reference_files_are_present():
  assert len(DDPM_FILES) == 8 and len(NCSNV2_FILES) == 3
  assert (MODERN / CLASSIFIER_FILE).is_file()


@pytest.mark.parametrize("name", DDPM_FILES + NCSNV2_FILES)
def test_score_network_matches_reference_tree(name):
  ref = _load(MODERN / name)
  config = _config(ref)
  module = ddpm if ref["model_name"] == "ddpm" else ncsnv2
  model = module.from_config(config)
  shapes, order = _trace(model, (1, *ref["image_shape"]), jnp.zeros((1,), jnp.int32))
  assert_matches_reference(ref, shapes, order)


def test_classifier_matches_reference_tree():
  ref = _load(MODERN / CLASSIFIER_FILE)
  default_config = ml_collections.ConfigDict()
  for model in (wideresnet.create_classifier(), wideresnet.from_config(default_config)):
    shapes, order = _trace(model, (1, *ref["image_shape"]), jnp.ones((1,)))
    assert_matches_reference(ref, shapes, order)


def test_ncsnv2_256_builds_six_stages():
  config = _config(_load(MODERN / NCSNV2_FILES[0]))
  config.model.name = "ncsnv2_256"
  shapes, _ = _trace(ncsnv2.from_config(config), (1, 256, 256, 3), jnp.zeros((1,), jnp.int32))
  top = {p.split("/")[1] for p in shapes}
  assert {f"ResidualBlock_{i}" for i in range(12)} <= top and "ResidualBlock_12" not in top
  assert {f"RefineBlock_{i}" for i in range(6)} <= top and "RefineBlock_6" not in top
  assert shapes["params/RefineBlock_0/CRPBlock_0/Conv_0/kernel"] == (3, 3, 512, 512)


def test_from_config_rejects_unknown_names():
  config = _config(_load(MODERN / NCSNV2_FILES[0]))
  config.model.name = "ncsn"
  with pytest.raises(ValueError):
    ncsnv2.from_config(config)
  config = _config(_load(MODERN / DDPM_FILES[0]))
  config.model.normalization = "InstanceNorm++"
  with pytest.raises(ValueError):
    ddpm.from_config(config)


def test_noise_level_indexes_sigmas_from_sigma_max_down():
  sigmas = sde_lib.smld_sigmas(0.01, 50.0, 232)
  np.testing.assert_allclose([sigmas[0], sigmas[-1]], [50.0, 0.01], rtol=1e-5)
  assert np.all(np.diff(np.asarray(sigmas)) < 0)
  labels = jnp.array([0, 231, 100], jnp.int32)
  np.testing.assert_allclose(layers.noise_level(labels, 0.01, 50.0, 232), sigmas[labels])
  sig = jnp.array([3.0, 0.5])
  np.testing.assert_array_equal(layers.noise_level(sig, 0.01, 50.0, 232), sig)


def _random_params(model, x, time_cond, scale=0.2):
  """Random normal parameters of the right shapes: no initializer compile, every path active."""
  shapes = jax.eval_shape(model.init, {"params": jax.random.PRNGKey(0)}, x, time_cond)
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32),
                      shapes)


def test_ddpm_tiny_forward_and_dropout():
  model = ddpm.DDPM(nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.5)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3))
  t = jnp.array([3.0, 700.0])
  params = _random_params(model, x, t)
  apply = jax.jit(model.apply, static_argnames="train")
  out = apply(params, x, t)  # eval needs no 'dropout' rng: dropout is off
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
  train1 = apply(params, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  train2 = apply(params, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  assert bool(jnp.all(jnp.isfinite(train1)))
  assert not np.allclose(train1, out) and not np.allclose(train1, train2)


def test_ddpm_real_init_zero_output_layer():
  model = ddpm.DDPM(nf=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
  x = jnp.zeros((1, 8, 8, 3))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x, jnp.zeros((1,)))["params"]
  # DDPM zero-initializes (scale 1e-10) the output conv and the last conv of every block.
  assert float(jnp.abs(params["Conv_1"]["kernel"]).max()) < 1e-4
  assert float(jnp.abs(params["ResnetBlockDDPM_0"]["Conv_1"]["kernel"]).max()) < 1e-4
  assert float(jnp.abs(params["ResnetBlockDDPM_0"]["Conv_0"]["kernel"]).max()) > 1e-2


def test_ncsnv2_tiny_forward_divides_by_noise_level():
  model = ncsnv2.NCSNv2(nf=8, sigma_min=0.01, sigma_max=50.0, num_scales=10)
  x = jnp.broadcast_to(jax.random.uniform(jax.random.PRNGKey(0), (1, 16, 16, 3)), (2, 16, 16, 3))
  labels = jnp.array([0, 9], jnp.int32)  # sigma_max, sigma_min
  params = _random_params(model, x, labels)
  out = jax.jit(model.apply)(params, x, labels)
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
  # The RefineNet is unconditional, so the two outputs differ only by the factor 1/sigma: up to
  # float32 rounding, which differs between batch rows (two rows of the same input and label
  # differ by 1.9e-6 here, 1.4e-6 of the largest output, with XLA's CPU YNNPACK fusion off).
  h = np.asarray(out[0]) * 50.0
  np.testing.assert_allclose(h, out[1] * 0.01, rtol=1e-4, atol=1e-5 * np.abs(h).max())
  assert float(jnp.abs(out[1]).mean()) > 1000 * float(jnp.abs(out[0]).mean())


def test_ncsnv2_real_init_instance_norm_plus():
  model = ncsnv2.NCSNv2(nf=8, stage_mult=(1,), stage_dilation=(1,), refine_mult=(1,))
  x = jnp.zeros((1, 8, 8, 3))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.int32))["params"]
  norm = params["InstanceNorm2dPlus_0"]
  assert norm["gamma"].shape == (1, 1, 1, 8)
  np.testing.assert_allclose(norm["gamma"], 1.0, atol=0.1)
  np.testing.assert_array_equal(norm["beta"], 0.0)
  # PyTorch-style conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for kernel and bias.
  conv = params["Conv_0"]
  bound = 1.0 / np.sqrt(3 * 3 * 3)
  assert float(jnp.abs(conv["kernel"]).max()) <= bound
  assert float(jnp.abs(conv["bias"]).max()) <= bound
  assert float(jnp.abs(conv["kernel"]).max()) > 0.5 * bound


def test_classifier_tiny_forward():
  model = wideresnet.create_classifier(num_classes=7, blocks_per_group=1, channel_multiplier=1)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3))
  sigma = jnp.array([0.05, 20.0])
  params = _random_params(model, x, sigma)
  logits = jax.jit(model.apply)(params, x, sigma)
  assert logits.shape == (2, 7) and bool(jnp.all(jnp.isfinite(logits)))
  # Per-image standardization makes the logits invariant to affine intensity changes.
  np.testing.assert_allclose(jax.jit(model.apply)(params, 3.0 * x + 1.0, sigma), logits,
                             rtol=1e-3, atol=1e-3)
