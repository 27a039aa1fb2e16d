"""config.model.remat: each residual and attention block of NCSN++ / DDPM++, DDPM and NCSNv2
rematerialized (recomputed in the backward pass): the same parameter tree, the same outputs and
the same gradients in float32, on the four shrunken score_sde networks of tests/data/forward
(NCSN++ and DDPM++ at two resolutions, 32 and 16, instead of three; these and DDPM with no residual
block of the downsampling path's own)."""
from __future__ import annotations

import importlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from param_trees import module_call_order  # noqa: E402
from reference_data import FORWARD  # noqa: E402
from sgm_jax import models  # noqa: E402
from sgm_jax.cli import setup  # noqa: E402

FAMILIES = ["ve_cifar10_ncsnpp_continuous", "vp_cifar10_ddpmpp_continuous", "vp_ddpm_cifar10",
            "ve_ncsnv2_cifar10"]
pytestmark = pytest.mark.usefixtures("fast_compiles")


def _config(family: str, remat: bool):
  with open(os.path.join(FORWARD, family, "config.json")) as f:
    meta = json.load(f)
  config = importlib.import_module(
      os.path.splitext(meta["source_config"])[0].replace("/", ".")).get_config()
  with config.unlocked():
    for key, value in meta["overrides"].items():
      section, field = key.split(".")
      config[section][field] = tuple(value) if isinstance(value, list) else value
    # Two resolutions and no residual block of the downsampling path's own keep every block kind
    # (plain residual blocks in the bottleneck and the upsampling path, with and without a
    # shortcut convolution, down and up residual blocks, attention at 16, the input pyramid) with
    # 6 residual and 2 attention blocks instead of 10 and 3 (DDPM: 4 and 2 instead of 8 and 3):
    # the gradient programs compile in about half the time (NCSN++ 8.6 -> 4.7 s of CPU, DDPM
    # 6.8 -> 3.5 s).
    if "ch_mult" in config.model:  # NCSNv2's architecture is fixed
      config.model.ch_mult = config.model.ch_mult[:2]
      config.model.num_res_blocks = 0
    config.model.remat = remat
    config.model.dropout = 0.1  # dropout inside rematerialized blocks: the same rng streams
  return config


# The blocks that config.model.remat wraps (top-level modules of these classes)
BLOCK_KINDS = ("ResnetBlock", "AttnBlock", "ResidualBlock", "RefineBlock")

# Multiplicative normalization parameters (GroupNorm's scale, InstanceNorm++'s alpha and gamma):
# near 1, as their initializers set them.
_NEAR_ONE = ("scale", "alpha", "gamma")


def _parameters(shapes):
  """Parameters of the given shapes drawn with numpy (weights fan-in scaled, normalization scales
  near 1, offsets near 0): the comparison holds at any such parameters, and the networks' own
  initializers cost more than all the rest here (NCSN++'s took 15 s op by op, NCSNv2's 14 s as
  one jitted program on a CPU)."""
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = path[-1].key
    if name in _NEAR_ONE:
      value = 1 + rng.normal(0, 0.1, leaf.shape)
    elif name in ("kernel", "W") or len(leaf.shape) >= 2:
      value = rng.normal(0, 1 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)
    else:
      value = rng.normal(0, 0.1, leaf.shape)
    return value.astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _loss_and_grads(family: str, remat: bool):
  """(parameter shapes, output, gradients of mean(output^2), jaxpr of the gradient program, number
  of the network's blocks of BLOCK_KINDS) of the
  family's network at the parameters _parameters draws for its shapes (jax.eval_shape): networks
  of the same shapes get the same parameters. The gradient program is traced once, for its jaxpr
  and its compilation."""
  config = _config(family, remat)
  model = models.create_model(config, setup.sde_from_config(config))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  labels = jnp.array([3, 100]) if family.endswith("ncsnv2_cifar10") or family.endswith(
      "ddpm_cifar10") else jnp.array([0.3, 0.8])
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.PRNGKey(1), "dropout": jax.random.PRNGKey(2)}, x, labels,
      train=False))["params"]
  params = _parameters(shapes)

  def loss(params):
    out = model.apply({"params": params}, x, labels, train=True,
                      rngs={"dropout": jax.random.PRNGKey(3)})
    return jnp.mean(out ** 2), out

  with module_call_order() as order:
    traced = jax.jit(jax.value_and_grad(loss, has_aux=True)).trace(params)
  (_, out), grads = traced.lower().compile()(params)
  blocks = sum(1 for path in order if "/" not in path and path.startswith(BLOCK_KINDS))
  return shapes, out, grads, str(traced.jaxpr), blocks


@pytest.mark.parametrize("family", FAMILIES)
def test_remat_keeps_parameters_values_and_gradients(family):
  shapes, out, grads, jaxpr, blocks = _loss_and_grads(family, remat=False)
  shapes_r, out_r, grads_r, jaxpr_r, blocks_r = _loss_and_grads(family, remat=True)
  # the same names and shapes (checkpoints load either way), so the same parameters
  assert shapes_r == shapes and blocks_r == blocks > 0
  # one rematerialized call per residual, attention and refine block: every block is wrapped
  assert jaxpr_r.count("remat") == blocks, (jaxpr_r.count("remat"), blocks)
  assert "remat" not in jaxpr and "checkpoint" not in jaxpr
  # Outputs and gradients to 1e-5 of the network's largest: the recomputation fuses and orders
  # float32 sums differently, by an amount that depends on the CPU (outputs 4.9e-7 to 1.0e-6 and
  # gradients 1.8e-7 to 8.7e-7 on an AMD EPYC, gradients 4e-8 to 4e-7 on the earlier machines; at
  # 1e-6 NCSNv2's output failed on the AMD one); a block that recomputes with other dropout masks
  # or skips a layer is off by percents. Leaves the architecture ignores, such as the attention
  # key bias, have gradients of rounding size only, so a per-leaf relative measure would compare
  # noise.
  scale = np.abs(np.asarray(out)).max()
  assert np.abs(np.asarray(out_r) - np.asarray(out)).max() <= 1e-5 * scale
  leaves, leaves_r = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_r)
  largest = max(float(np.abs(g).max()) for g in leaves)
  error = max(float(np.abs(np.asarray(g_r) - np.asarray(g)).max()) for g, g_r in zip(leaves,
                                                                                    leaves_r))
  assert error <= 1e-5 * largest, error / largest
