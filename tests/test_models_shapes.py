"""Every network family maps (B, H, W, C), (B,) -> (B, H, W, C) at 28x28x1, 32x32x3, 64x64x3."""
import importlib
import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sgm_jax import models, sde_lib  # noqa: E402

SHAPES = [(28, 1), (32, 3), (64, 3)]


def _small(config_module, **model):
  config = importlib.import_module(config_module).get_config()
  for k, v in model.items():
    setattr(config.model, k, v)
  return config


FAMILIES = {
    "ncsnpp": lambda: _small("configs.ve.cifar10_ncsnpp_continuous", nf=8, ch_mult=(1, 2),
                             num_res_blocks=1, attn_resolutions=(14, 16, 32)),
    "ddpmpp": lambda: _small("configs.vp.cifar10_ddpmpp_continuous", nf=8, ch_mult=(1, 2),
                             num_res_blocks=1, attn_resolutions=(14, 16, 32)),
    "ddpm": lambda: _small("configs.vp.ddpm.cifar10", nf=32, ch_mult=(1, 2), num_res_blocks=1,
                           attn_resolutions=(14, 16, 32)),
    "ncsnv2": lambda: _small("configs.ve.ncsnv2.cifar10", nf=8),
    "unet_small": lambda: _small("configs.fashion_mnist", channels=(8, 16, 16, 32), embed_dim=32),
    "mixer": lambda: _small("configs.digits", hidden_size=16, mix_patch_size=32,
                            mix_hidden_size=32, num_blocks=1),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("size, channels", SHAPES)
def test_network_output_shape(family, size, channels):
  config = FAMILIES[family]()
  config.data.image_size, config.data.num_channels = size, channels
  model = models.create_model(config, sde_lib.from_config(config))
  x = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  key = jax.random.PRNGKey(0)

  def forward(x, t):
    variables = model.init({"params": key, "dropout": key}, x, t)
    return model.apply(variables, x, t)

  out = jax.eval_shape(forward, x, t)
  assert out.shape == (2, size, size, channels) and out.dtype == jnp.float32
