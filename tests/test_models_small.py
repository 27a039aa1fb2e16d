"""Small networks: shapes, hand-computed parameter counts, the tutorial ScoreNet's 1/std scaling,
the Mixer on MNIST- and CIFAR-sized images, and the toy-data MLP."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sgm_jax import models, score, sde_lib
from sgm_jax.models import small

# Tiny programs: XLA's optimizations only cost compile time here.
pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
  """Compile with little optimization (these programs run once), restored afterwards."""
  flag = "jax_disable_most_optimizations"
  previous = jax.config.values.get(flag, False)
  jax.config.update(flag, True)
  yield
  jax.config.update(flag, previous)


def _shapes(model, x, t):
  return jax.eval_shape(model.init, {"params": jax.random.PRNGKey(0)}, x, t)


def _count(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _random_params(model, x, t, scale=0.1):
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32),
                      _shapes(model, x, t))


def _dense(n_in, n_out):
  return n_in * n_out + n_out


def _time_embedding(dim, kind="fourier"):
  """TimeEmbedding: (Fourier W of dim/2) + Dense(dim -> dim) + Dense(dim -> dim)."""
  return (dim // 2 if kind == "fourier" else 0) + 2 * _dense(dim, dim)


def scorenet_count(c, embed, channels_in):
  c1, c2, c3, c4 = c
  n = embed // 2 + _dense(embed, embed)  # Fourier W, embedding Dense
  # (conv in, conv out) of the 7 bias-free convs, each followed by Dense(embed, out) and GroupNorm.
  for k_in, k_out in [(channels_in, c1), (c1, c2), (c2, c3), (c3, c4),
                      (c4, c3), (2 * c3, c2), (2 * c2, c1)]:
    n += 9 * k_in * k_out + _dense(embed, k_out) + 2 * k_out
  return n + 9 * 2 * c1 * channels_in + channels_in  # output conv with bias


def mixer_count(height, width, channels, p=4, hidden=64, mix_p=512, mix_h=512, blocks=4, embed=128):
  patches = (height // p) * (width // p)
  block = (_dense(embed, hidden) + 2 * hidden + _dense(patches, mix_p) + _dense(mix_p, patches)
           + 2 * hidden + _dense(hidden, mix_h) + _dense(mix_h, hidden))
  return (p * p * channels * hidden + hidden + _time_embedding(embed) + blocks * block
          + 2 * hidden + p * p * hidden * channels + channels)


def mlp_count(dim, hidden, embed):
  n, n_in = _time_embedding(embed), dim
  for width in hidden:
    n += _dense(n_in, width) + _dense(embed, width)
    n_in = width
  return n + _dense(n_in, dim)


def test_scorenet_parameter_count_and_shapes():
  model = small.ScoreNet(sde=sde_lib.TutorialSDE())
  t = jnp.full((2,), 0.5)
  params = _shapes(model, jnp.zeros((2, 28, 28, 1)), t)
  assert _count(params) == scorenet_count((32, 64, 128, 256), 256, 1) == 1_115_425
  assert params["params"]["GaussianFourierProjection_0"]["W"].shape == (128,)
  for shape in [(2, 28, 28, 1), (2, 32, 32, 3), (1, 17, 21, 2)]:
    x = jnp.zeros(shape)
    out = jax.eval_shape(model.apply, _shapes(model, x, t[: shape[0]]), x, t[: shape[0]])
    assert out.shape == shape
  assert _count(_shapes(small.ScoreNet(channels=(8, 16, 16, 32), embed_dim=16),
                        jnp.zeros((2, 32, 32, 3)), t)) == scorenet_count((8, 16, 16, 32), 16, 3)


def test_scorenet_output_scales_as_inverse_std():
  sde = sde_lib.TutorialSDE()
  scaled = small.ScoreNet(sde=sde)
  raw = small.ScoreNet(sde=None)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 28, 28, 1))
  t = jnp.array([0.02, 0.3, 1.0])
  params = _random_params(scaled, x, t)
  out = jax.jit(scaled.apply)(params, x, t)
  out_raw = jax.jit(raw.apply)(params, x, t)
  std = sde.sigma(t)
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
  assert float(std[-1] / std[0]) > 10.0
  np.testing.assert_allclose(out, out_raw / std[:, None, None, None], rtol=1e-4, atol=1e-6)
  # The SDE field is hashable and compares by value.
  assert scaled.sde == sde_lib.TutorialSDE() and hash(scaled.sde) == hash(sde_lib.TutorialSDE())


@pytest.mark.parametrize("sde, continuous, parameterization", [
    (sde_lib.VESDE(), True, None),  # labels sigma(t)
    (sde_lib.VESDE(N=100), False, None),  # labels: index of the noise level from sigma_max
    (sde_lib.TutorialSDE(), True, None),  # labels t
    (sde_lib.VPSDE(), True, "score"),  # labels 999 t
    (sde_lib.subVPSDE(), True, "score"),
], ids=["ve", "ve_discrete", "tutorial", "vp_score", "subvp_score"])
def test_scorenet_divides_by_the_std_at_the_time_of_its_label(sde, continuous, parameterization):
  """Through create_model and score.py's time labels, the unet_small score at t is the unscaled
  output over the kernel std sigma(t) computed directly: 0.71 and 50 at t = 0.5, 1 under VE (not
  sigma(sigma(t)): 4.13 and inf)."""
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(dict(
      name="unet_small", channels=(4, 8, 8, 8), embed_dim=8, padding="SAME",
      parameterization=parameterization))
  net = models.create_model(config, sde)
  assert net.sde == sde
  raw = net.clone(sde=None)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
  t = jnp.array([0.5, 1.0])
  labels = sde.time_label(t, continuous)
  params = _random_params(net, x, labels)
  score_fn = score.get_score_fn(sde, net, params, continuous, parameterization=parameterization)
  got = jax.jit(score_fn)(x, t)
  out_raw = jax.jit(raw.apply)(params, x, labels)
  if continuous:
    std = sde.sigma(t)
  else:  # the discrete noise level nearest to sigma(t)
    std = jnp.flip(sde.discrete_sigmas)[labels]
    np.testing.assert_allclose(std, sde.sigma(t), rtol=0.05)
  assert bool(jnp.all(jnp.isfinite(got))) and float(jnp.min(jnp.abs(got))) > 0.0
  # rtol: float32 rounding of sigma(t) labels, amplified by the Fourier features of large labels
  np.testing.assert_allclose(got, out_raw / std[:, None, None, None], rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("shape", [(2, 28, 28, 1), (2, 32, 32, 3)])
def test_mixer_parameter_count(shape):
  _, height, width, channels = shape
  params = _shapes(small.Mixer(), jnp.zeros(shape), jnp.zeros((2,)))
  assert _count(params) == mixer_count(height, width, channels)
  blocks = [k for k in params["params"] if k.startswith("MixerBlock_")]
  assert len(blocks) == 4


def test_mixer_runs_on_mnist_and_cifar_sizes():
  model = small.Mixer()
  t = jnp.array([0.1, 0.9])
  for shape in [(2, 28, 28, 1), (2, 32, 32, 3)]:
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    x = jnp.concatenate([x[:1], x[:1]])  # same image, two times
    out = jax.jit(model.apply)(_random_params(model, x, t), x, t)
    assert out.shape == shape and bool(jnp.all(jnp.isfinite(out)))
    assert not np.allclose(out[0], out[1])  # conditioned on time


def test_mixer_rejects_sizes_not_divisible_by_patch():
  with pytest.raises(ValueError):
    _shapes(small.Mixer(), jnp.zeros((1, 30, 30, 1)), jnp.zeros((1,)))


def test_mlp_count_forward_and_dropout():
  model = small.MLP(hidden=(32, 16), embed_dim=8, dropout=0.5)
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 2))
  t = jnp.linspace(0.0, 1.0, 64)
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x, t)  # real initializers
  assert _count(variables) == mlp_count(2, (32, 16), 8)
  apply = jax.jit(model.apply, static_argnames="train")
  out = apply(variables, x, t)  # eval needs no 'dropout' rng: dropout is off
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
  train1 = apply(variables, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  train2 = apply(variables, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
  assert not np.allclose(train1, out) and not np.allclose(train1, train2)
  with pytest.raises(ValueError):
    _shapes(model, jnp.zeros((2, 4, 4, 1)), jnp.zeros((2,)))


def test_positional_time_embedding_has_no_fourier_weights():
  model = small.MLP(hidden=(16,), embed_dim=8, time_embedding="positional")
  params = _shapes(model, jnp.zeros((2, 3)), jnp.array([0.0, 999.0]))
  assert "GaussianFourierProjection_0" not in params["params"]["TimeEmbedding_0"]
  assert _count(params) == mlp_count(3, (16,), 8) - 8 // 2


def test_from_config_builds_each_model():
  def config(name, **model):
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(name=name, **model))
    return c

  tutorial = sde_lib.TutorialSDE()
  net = small.from_config(config("unet_small"), sde=tutorial)
  assert isinstance(net, small.ScoreNet) and net.sde == tutorial
  assert isinstance(small.from_config(config("scorenet"), sde=tutorial), small.ScoreNet)
  # Without the SDE the score's scaling is unknown: no silent default SDE.
  for name in ("unet_small", "scorenet"):
    with pytest.raises(ValueError, match="pass that SDE"):
      small.from_config(config(name))
    with pytest.raises(ValueError, match="pass that SDE"):
      models.create_model(config(name))
    with pytest.raises(ValueError, match="pass that SDE"):
      small.from_config(config(name, parameterization="score"))
  # An output other than the score is never scaled, so it needs no SDE.
  assert small.from_config(config("unet_small", parameterization="edm")).sde is None
  assert small.from_config(config("unet_small", parameterization="edm")).mid_blocks == 0
  assert small.from_config(config("unet_small", parameterization="edm", mid_blocks=1)).mid_blocks == 1
  # Under VP the network predicts the noise (score.py divides by the std), so no scaling inside;
  # under a score-output SDE it divides by that SDE's std.
  assert small.from_config(config("scorenet"), sde=sde_lib.VPSDE()).sde is None
  ve = sde_lib.VESDE()
  assert small.from_config(config("scorenet"), sde=ve).sde == ve
  mixer = small.from_config(config("mixer", hidden_size=32, num_blocks=2))
  assert isinstance(mixer, small.Mixer) and (mixer.hidden_size, mixer.num_blocks) == (32, 2)
  mlp = small.from_config(config("mlp", hidden=[64, 64]))
  assert isinstance(mlp, small.MLP) and mlp.hidden == (64, 64)
  with pytest.raises(ValueError):
    small.from_config(config("ncsnpp"))


def test_scorenet_same_padding_keeps_parameters_and_sees_the_border():
  """padding='SAME' has the tutorial's parameters and shapes, and the corner output pixels
  depend on the input pixel under them about as much as a central one does."""
  t = jnp.full((2,), 0.5)
  same, valid = small.ScoreNet(padding="SAME"), small.ScoreNet(padding="VALID")
  x = jnp.zeros((2, 28, 28, 1))
  assert _count(_shapes(same, x, t)) == _count(_shapes(valid, x, t))
  for shape in [(2, 28, 28, 1), (2, 32, 32, 3), (1, 17, 21, 2), (2, 8, 8, 1)]:
    xs = jnp.zeros(shape)
    out = jax.eval_shape(same.apply, _shapes(same, xs, t[: shape[0]]), xs, t[: shape[0]])
    assert out.shape == shape
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 28, 28, 1))
  params = _random_params(same, x, t[:1])
  # One compiled gradient for the three pixels (op by op it was ~300 small compilations).
  jac_diag = jax.jit(jax.grad(lambda v, i, j: same.apply(params, v, t[:1])[0, i, j, 0]))
  gains = [abs(float(jac_diag(x, i, j)[0, i, j, 0])) for i, j in ((0, 0), (27, 27), (14, 14))]
  assert min(gains) > 0.1 * gains[2]
  with pytest.raises(ValueError, match="padding"):
    small.ScoreNet(padding="FULL").init(jax.random.PRNGKey(0), x, t[:1])


def test_scorenet_mid_blocks_add_residual_blocks_that_start_as_the_identity():
  """mid_blocks=k adds k residual blocks after each of the two lowest-resolution convolutions,
  under names of their own: the plain network's parameters keep their names and shapes, and at
  initialization (zero last convolution) the deeper network computes exactly the plain one."""
  t = jnp.array([0.3, 0.7])
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 28, 28, 1))
  plain, deep = small.ScoreNet(padding="SAME"), small.ScoreNet(padding="SAME", mid_blocks=2)
  deep_params = jax.jit(deep.init)(jax.random.PRNGKey(0), x, t)["params"]
  plain_shapes = _shapes(plain, x, t)["params"]
  blocks = {k for k in deep_params if k.startswith("ResidualBlock")}
  assert blocks == {f"ResidualBlock_{level}_{i}" for level in (3, 4) for i in range(2)}
  shared = {k: v for k, v in deep_params.items() if k not in blocks}
  assert jax.tree.map(jnp.shape, shared) == jax.tree.map(lambda s: s.shape, plain_shapes)
  assert _count({k: deep_params[k] for k in blocks}) == 2 * sum(
      2 * (9 * ch * ch + ch) + _dense(256, ch) + 4 * ch for ch in (128, 256))
  np.testing.assert_array_equal(jax.jit(deep.apply)({"params": deep_params}, x, t),
                                jax.jit(plain.apply)({"params": shared}, x, t))
  # trained (non-zero) blocks change the output
  moved = jax.tree.map(lambda a: a + 0.05, deep_params)
  assert not np.allclose(jax.jit(deep.apply)({"params": moved}, x, t),
                         jax.jit(plain.apply)({"params": {k: moved[k] for k in shared}}, x, t))


def _dilated_conv_padding(n: int, size: int, same: bool) -> tuple[int, int]:
  lo = (max(2 * (n - 1) + 3 - size, 0) // 2) if same else 0
  return (2 - lo, size + lo - 2 * n + 1)


@pytest.mark.parametrize("sizes,targets,same", [
    ((14, 14), (28, 28), True), ((14, 14), (28, 28), False), ((4, 4), (7, 7), True),
    ((13, 6), (26, 13), False), ((3, 5), (5, 9), True), ((2, 2), (3, 4), True)])
def test_upsampling_conv_equals_the_input_dilated_convolution(sizes, targets, same):
  """The four-parity form of a convolution over a 2x zero-dilated input gives lax's values and
  gradients (float64, both padding rules of ScoreNet, odd, even and non-square sizes)."""
  from jax import lax
  pads = [_dilated_conv_padding(n, size, same) for n, size in zip(sizes, targets)]
  dn = ("NHWC", "HWIO", "NHWC")
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.PRNGKey(0), (2,) + sizes + (3,), jnp.float64)
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4), jnp.float64)
    ref = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), pads, lhs_dilation=(2, 2),
                                                dimension_numbers=dn)
    new = lambda x, w: small.upsampling_conv(x, w, (1, 1), pads, lhs_dilation=(2, 2),
                                             dimension_numbers=dn)
    a, b = jax.jit(ref)(x, w), jax.jit(new)(x, w)
    assert a.shape == b.shape == (2,) + targets + (4,)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-12, atol=1e-12)
    probe = jax.random.normal(jax.random.PRNGKey(2), a.shape, jnp.float64)
    grads = [jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) * probe), argnums=(0, 1)))(x, w)
             for f in (ref, new)]
  for g_ref, g_new in zip(*grads):
    np.testing.assert_allclose(np.asarray(g_new), np.asarray(g_ref), rtol=1e-12, atol=1e-12)


def test_upsampling_conv_leaves_other_convolutions_to_lax():
  """Strided, undilated or grouped convolutions are lax.conv_general_dilated itself."""
  from jax import lax
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 9, 9, 4))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 2, 4))
  dn = ("NHWC", "HWIO", "NHWC")
  for kwargs in (dict(window_strides=(2, 2), padding="SAME"),
                 dict(window_strides=(1, 1), padding=[(1, 1), (1, 1)], feature_group_count=2),
                 dict(window_strides=(1, 1), padding="VALID", rhs_dilation=(2, 2))):
    rhs = w if kwargs.get("feature_group_count") == 2 else jnp.concatenate([w, w], axis=2)
    a = lax.conv_general_dilated(x, rhs, dimension_numbers=dn, **kwargs)
    b = small.upsampling_conv(x, rhs, dimension_numbers=dn, **kwargs)
    assert np.array_equal(np.asarray(a), np.asarray(b))
