"""The small U-Net's transposed convolutions: lax's input-dilated form vs `upsampling_conv`.

    python benchmarks/upsampling_conv.py [--batch 64] [--repeats 5]

For the three up-path layers of `configs/fashion_mnist.py`'s ScoreNet (SAME padding, batch 64),
the compiled time of the forward pass and of the gradient (input and kernel) of each form, and
their largest relative difference. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sgm_jax.models.small import upsampling_conv  # noqa: E402

# (input size, output size, input channels, output channels) of ScoreNet's up path at 28x28
LAYERS = ((4, 7, 256, 128), (7, 14, 256, 64), (14, 28, 128, 32))
DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def seconds(fn, *args, repeats: int) -> float:
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print("| layer | forward: lax / upsampling_conv (ms) | gradient: lax / upsampling_conv (ms) "
        "| gradient speed-up | max relative difference |")
  print("|---|---|---|---|---|")
  total = [0.0, 0.0]
  for n, size, c_in, c_out in LAYERS:
    lo = max(2 * (n - 1) + 3 - size, 0) // 2  # ScoreNet's SAME rule (models/small.py, _up_conv)
    pads = [(2 - lo, size + lo - 2 * n + 1)] * 2
    x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, n, n, c_in))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, c_in, c_out)) / (3 * c_in ** 0.5)
    forms = [lambda x, w, f=f: f(x, w, (1, 1), pads, lhs_dilation=(2, 2),
                                 dimension_numbers=DIMENSIONS)
             for f in (lax.conv_general_dilated, upsampling_conv)]
    grads = [jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) ** 2), argnums=(0, 1)) for f in forms]
    fwd = [seconds(f, x, w, repeats=args.repeats) for f in forms]
    bwd = [seconds(g, x, w, repeats=args.repeats) for g in grads]
    ref, new = forms[0](x, w), forms[1](x, w)
    diff = float(jnp.abs(ref - new).max() / jnp.abs(ref).max())
    total = [total[0] + bwd[0], total[1] + bwd[1]]
    print(f"| {n}x{n}x{c_in} -> {size}x{size}x{c_out} | {1e3 * fwd[0]:.1f} / {1e3 * fwd[1]:.1f} | "
          f"{1e3 * bwd[0]:.1f} / {1e3 * bwd[1]:.1f} | {bwd[0] / bwd[1]:.1f}x | {diff:.1e} |")
  print(f"| all three | | {1e3 * total[0]:.0f} / {1e3 * total[1]:.0f} | "
        f"{total[0] / total[1]:.1f}x | |")


if __name__ == "__main__":
  main()
