"""Jitted forward-pass time of score networks on this machine.

    python benchmarks/models.py [--batch 8] [--configs configs/vp/cifar10_ddpmpp_continuous.py ...]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sgm_jax import models  # noqa: E402
from sgm_jax.cli import setup  # noqa: E402

DEFAULT = ["configs/vp/cifar10_ddpmpp_continuous.py", "configs/ve/cifar10_ncsnpp_continuous.py",
           "configs/vp/ddpm/cifar10.py", "configs/fashion_mnist.py"]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--configs", nargs="+", default=DEFAULT)
  args = parser.parse_args(argv)
  print(f"| config | params | batch | compile s | forward ms (median of {args.repeats}) |")
  print("|---|---|---|---|---|")
  for path in args.configs:
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    model = models.create_model(config, setup.sde_from_config(config))
    shape = (args.batch, config.data.image_size, config.data.image_size, config.data.num_channels)
    x, t = jnp.zeros(shape), jnp.full((args.batch,), 0.5)
    variables = jax.jit(lambda k: model.init({"params": k, "dropout": k}, x, t))(
        jax.random.PRNGKey(0))
    n = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(variables["params"]))
    forward = jax.jit(lambda v, x, t: model.apply(v, x, t))
    t0 = time.perf_counter()
    jax.block_until_ready(forward(variables, x, t))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(forward(variables, x, t))
      times.append(time.perf_counter() - t0)
    print(f"| {path} | {n:,} | {args.batch} | {compile_s:.1f} | {1000 * np.median(times):.0f} |",
          flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
