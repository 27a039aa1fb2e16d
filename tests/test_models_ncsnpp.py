"""NCSN++ / DDPM++ network: tiny forward passes of its variants, its layers, and FIR
up/down-sampling against its definition. The parameter trees of every original `ncsnpp` config
against score_sde's are in tests/test_configs.py, which traces each config's network once.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from sgm_jax.models import layers, ncsnpp  # noqa: E402
from sgm_jax.models import up_or_down_sampling as uds  # noqa: E402

# Tiny programs: XLA's optimizations only cost compile time here.
pytestmark = pytest.mark.usefixtures("fast_compiles")

@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", False)


def load_config(relpath: str):
  """get_config() of a file under configs/, loaded by path like ml_collections' config_flags."""
  path = os.path.join(ROOT, relpath)
  spec = importlib.util.spec_from_file_location("cfg_" + relpath.replace("/", "_")[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# --- tiny real forward passes ---------------------------------------------------------------------

TINY = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.5,
            init_scale=1.0, sigma_min=0.01, sigma_max=10.0, num_scales=10)
VARIANTS = {
    # NCSN++ on CIFAR-10: FIR, BigGAN blocks, residual input pyramid, Fourier features.
    "ncsnpp_fir_residual_fourier": dict(fir=True, progressive="none", progressive_input="residual",
                                        embedding_type="fourier", scale_by_sigma=True),
    # NCSN++ at high resolution: input_skip / output_skip pyramids combined by sum.
    "ncsnpp_fir_skip_fourier": dict(fir=True, progressive="output_skip",
                                    progressive_input="input_skip", embedding_type="fourier",
                                    scale_by_sigma=False),
    # DDPM++: no FIR, no pyramids, positional embedding, centered data.
    "ddpmpp_positional": dict(fir=False, progressive="none", progressive_input="none",
                              embedding_type="positional", scale_by_sigma=False, centered=True),
    # DDPM blocks with plain resampling layers, residual output pyramid, input_skip with 'cat',
    # SMLD sigma lookup for the positional embedding, on a 16x16 input.
    "ddpm_blocks_nofir_cat_positional": dict(resblock_type="ddpm", fir=False,
                                             progressive="residual", progressive_input="input_skip",
                                             progressive_combine="cat", embedding_type="positional",
                                             scale_by_sigma=True, nonlinearity="lrelu"),
    # DDPM blocks with FIR resampling convolutions, residual pyramids both ways, unconditional.
    "ddpm_blocks_fir_residual_fourier": dict(resblock_type="ddpm", fir=True, progressive="residual",
                                             progressive_input="residual", embedding_type="fourier",
                                             conditional=False, scale_by_sigma=False,
                                             nonlinearity="elu", skip_rescale=False),
}
SIZES = {"ddpm_blocks_nofir_cat_positional": 16}


def random_params(model, x, t, seed=0):
  """Random O(1)-scale parameters of the right tree, without compiling the initializers."""
  shapes = jax.eval_shape(model.init, {"params": jax.random.PRNGKey(0)}, x, t)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    noise = rng.normal(size=leaf.shape).astype(np.float32)
    if name == "scale":  # GroupNorm
      return jnp.asarray(1.0 + 0.1 * noise)
    if len(leaf.shape) >= 2:  # conv / dense / NIN kernels
      return jnp.asarray(noise / np.sqrt(np.prod(leaf.shape[:-1])))
    return jnp.asarray(noise if name == "W" else 0.1 * noise)  # Fourier W, biases

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tiny_forward(variant):
  model = ncsnpp.NCSNpp(**{**TINY, **VARIANTS[variant]})
  size = SIZES.get(variant, 8)
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, size, size, 3))
  if model.embedding_type == "fourier":
    t = jnp.array([0.05, 3.0])
  else:
    t = jnp.array([2.0, 7.0])
  if variant == "ncsnpp_fir_residual_fourier":  # one variant runs the real initializers
    params = jax.jit(model.init)({"params": jax.random.PRNGKey(0)}, x, t)
    assert set(params) == {"params"}, "NCSN++ has no collection other than params"
  else:
    params = random_params(model, x, t)
  unscaled = model.clone(scale_by_sigma=False)
  uncentered = model.clone(centered=False)

  # One compiled program per network call that differs: the two dropout passes are one program
  # run with two keys (a second copy of the train-mode network in one jit doubled its compile).
  y = jax.jit(model.apply)(params, x, t)  # train=False needs no dropout rng
  train = jax.jit(lambda params, x, t, key: model.apply(params, x, t, train=True,
                                                        rngs={"dropout": key}))
  y1 = train(params, x, t, jax.random.PRNGKey(3))
  y2 = train(params, x, t, jax.random.PRNGKey(4))
  y_unscaled = jax.jit(unscaled.apply)(params, x, t) if model.scale_by_sigma else y
  # Data in [0, 1] (centered=False) is mapped to [-1, 1] by the network itself.
  y_uncentered = jax.jit(uncentered.apply)(params, (x + 1) / 2, t) if model.centered else y
  assert y.shape == x.shape
  for out in (y, y1, y2):
    assert bool(jnp.all(jnp.isfinite(out)))
  scale = float(jnp.max(jnp.abs(y)))
  assert float(jnp.max(jnp.abs(y1 - y))) > 1e-2 * scale, "dropout must act with train=True"
  assert float(jnp.max(jnp.abs(y1 - y2))) > 1e-2 * scale, "dropout masks must follow the rng"
  np.testing.assert_allclose(np.asarray(y_uncentered), np.asarray(y), rtol=1e-4, atol=1e-5)
  if model.scale_by_sigma:
    if model.embedding_type == "fourier":
      sigma = np.asarray(t)
    else:  # SMLD noise levels, geometric from sigma_max to sigma_min, indexed by the label
      sigma = np.geomspace(model.sigma_max, model.sigma_min, model.num_scales)[np.asarray(t, int)]
    np.testing.assert_allclose(np.asarray(y) * sigma[:, None, None, None], np.asarray(y_unscaled),
                               rtol=1e-4, atol=1e-5)


def test_fourier_projection_w_is_a_fixed_parameter():
  proj = layers.GaussianFourierProjection(embedding_size=512, scale=16.0)
  x = jnp.array([0.1, -2.0, 3.0])
  params = proj.init(jax.random.PRNGKey(0), x)
  w = params["params"]["W"]
  assert w.shape == (512,)
  assert 12.0 < float(jnp.std(w)) < 20.0
  emb = proj.apply(params, x)
  assert emb.shape == (3, 1024)
  np.testing.assert_allclose(np.asarray(emb[:, :512] ** 2 + emb[:, 512:] ** 2), 1.0, rtol=1e-5)
  grad = jax.grad(lambda p: jnp.sum(proj.apply(p, x)))(params)
  assert float(jnp.max(jnp.abs(grad["params"]["W"]))) == 0.0


def test_from_config_reads_model_and_data_fields():
  model = ncsnpp.from_config(load_config("configs/vp/cifar10_ddpmpp_continuous.py"))
  assert isinstance(model, ncsnpp.NCSNpp)
  assert (model.fir, model.progressive_input, model.embedding_type) == (False, "none", "positional")
  assert (model.centered, model.scale_by_sigma, model.image_size, model.num_channels) == (
      True, False, 32, 3)
  assert model.ch_mult == (1, 2, 2, 2) and model.fir_kernel == (1, 3, 3, 1)
  model = ncsnpp.from_config(load_config("configs/ve/cifar10_ncsnpp_continuous.py"))
  assert (model.fir, model.embedding_type, model.fourier_scale, model.centered) == (
      True, "fourier", 16.0, False)
  with pytest.raises(ValueError, match="ncsnpp"):
    ncsnpp.from_config(load_config("configs/vp/ddpm/cifar10.py"))


def test_wrong_input_shape_or_option_fails_clearly():
  model = ncsnpp.from_config(load_config("configs/ve/cifar10_ncsnpp_continuous.py"))
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="configured for 32x32"):
    jax.eval_shape(model.init, key, jnp.zeros((1, 16, 16, 3)), jnp.ones((1,)))
  with pytest.raises(ValueError, match="time_cond"):
    jax.eval_shape(model.init, key, jnp.zeros((2, 32, 32, 3)), jnp.ones((1,)))
  bad = model.clone(progressive="skip")
  with pytest.raises(ValueError, match="progressive"):
    jax.eval_shape(bad.init, key, jnp.zeros((1, 32, 32, 3)), jnp.ones((1,)))


# --- FIR up/down-sampling against its definition --------------------------------------------------

def naive_upfirdn2d(x, k, up, down, pad0, pad1):
  """Zero-insertion upsampling, padding (negative crops), true 2-D convolution, decimation."""
  n, h, w, c = x.shape
  u = np.zeros((n, h * up, w * up, c))
  u[:, ::up, ::up] = x
  u = np.pad(u, [(0, 0), (max(pad0, 0), max(pad1, 0)), (max(pad0, 0), max(pad1, 0)), (0, 0)])
  u = u[:, max(-pad0, 0):u.shape[1] - max(-pad1, 0), max(-pad0, 0):u.shape[2] - max(-pad1, 0)]
  kh, kw = k.shape
  out = np.zeros((n, u.shape[1] - kh + 1, u.shape[2] - kw + 1, c))
  for i in range(out.shape[1]):
    for j in range(out.shape[2]):
      for a in range(kh):
        for b in range(kw):
          out[:, i, j] += u[:, i + a, j + b] * k[kh - 1 - a, kw - 1 - b]
  return out[:, ::down, ::down]


@pytest.mark.parametrize("up,down,pad0,pad1", [(1, 1, 0, 0), (2, 1, 2, 1), (1, 2, 1, 1),
                                               (2, 2, -1, 2), (3, 1, 1, -1)])
def test_upfirdn2d_matches_naive_definition(up, down, pad0, pad1):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
  k = rng.normal(size=(4, 4)).astype(np.float32)  # not symmetric: catches a flipped kernel
  ours = uds.upfirdn2d(jnp.asarray(x), k, up=up, down=down, pad=(pad0, pad1))
  np.testing.assert_allclose(np.asarray(ours), naive_upfirdn2d(x, k, up, down, pad0, pad1),
                             rtol=1e-5, atol=1e-5)


def test_fir_resampling_of_a_constant_image_is_constant_inside():
  c = jnp.full((1, 8, 8, 2), 3.0)
  up = np.asarray(uds.upsample_2d(c, (1, 3, 3, 1)))
  down = np.asarray(uds.downsample_2d(c, (1, 3, 3, 1)))
  assert up.shape == (1, 16, 16, 2) and down.shape == (1, 4, 4, 2)
  np.testing.assert_allclose(up[:, 1:-1, 1:-1], 3.0, rtol=1e-6)  # the border sees zero padding
  np.testing.assert_allclose(down[:, 1:-1, 1:-1], 3.0, rtol=1e-6)


def test_box_filter_is_nearest_upsampling_and_average_pooling():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 3))
  up = uds.upsample_2d(x, (1, 1))
  np.testing.assert_allclose(np.asarray(up), np.asarray(uds.naive_upsample_2d(x)), atol=1e-6)
  np.testing.assert_allclose(np.asarray(uds.downsample_2d(x, (1, 1))),
                             np.asarray(uds.naive_downsample_2d(x)), atol=1e-6)
  np.testing.assert_allclose(np.asarray(uds.downsample_2d(up, (1, 1))), np.asarray(x), atol=1e-6)
  np.testing.assert_allclose(np.asarray(uds.naive_upsample_2d(x))[:, ::2, 1::2], np.asarray(x))


def test_fir_downsampling_is_the_adjoint_of_upsampling():
  """<up(x), y> = factor^2 <x, down(y)>: the two filters are the same FIR kernel."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  lhs = float(jnp.vdot(uds.upsample_2d(x, (1, 3, 3, 1)), y))
  rhs = 4 * float(jnp.vdot(x, uds.downsample_2d(y, (1, 3, 3, 1))))
  assert abs(lhs - rhs) < 1e-4 * max(1.0, abs(lhs))


def _conv_same(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_fused_conv_resampling_equals_resample_then_conv_inside():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)
  up = uds.upsample_conv_2d(x, w, (1, 3, 3, 1))
  ref = _conv_same(uds.upsample_2d(x, (1, 3, 3, 1)), w)
  assert up.shape == ref.shape == (2, 16, 16, 5)
  np.testing.assert_allclose(np.asarray(up)[:, 2:-2, 2:-2], np.asarray(ref)[:, 2:-2, 2:-2],
                             rtol=1e-4, atol=1e-4)
  down = uds.conv_downsample_2d(x, w, (1, 3, 3, 1))
  ref = uds.downsample_2d(_conv_same(x, w), (1, 3, 3, 1))
  assert down.shape == ref.shape == (2, 4, 4, 5)
  np.testing.assert_allclose(np.asarray(down)[:, 1:-1, 1:-1], np.asarray(ref)[:, 1:-1, 1:-1],
                             rtol=1e-4, atol=1e-4)


def test_conv2d_module_keeps_stylegan_parameter_names():
  x = jnp.ones((1, 8, 8, 4))
  for kwargs, size in ((dict(up=True), 16), (dict(down=True), 4), ({}, 8)):
    conv = uds.Conv2d(6, kernel=3, **kwargs)
    params = conv.init(jax.random.PRNGKey(0), x)["params"]
    assert {k: v.shape for k, v in params.items()} == {"weight": (3, 3, 4, 6), "bias": (6,)}
    assert conv.apply({"params": params}, x).shape == (1, size, size, 6)
