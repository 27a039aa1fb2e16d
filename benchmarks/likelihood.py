"""Likelihood accuracy and cost on the exact oracle: nfe, seconds per batch, bits/dim error.

    python benchmarks/likelihood.py [--batch 16] [--tols 1e-3 1e-5]

On the 8x8-digits Gaussian mixture (VP SDE) the exact log p_eps(x) is closed form, so the error
of `likelihood.get_likelihood_fn` is measured directly, for the exact divergence and for
Hutchinson's estimator (Rademacher, 1 probe), in float32 with the SDE's own prior.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sgm_jax import likelihood, sde_lib, toy  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--tols", type=float, nargs="+", default=[1e-3, 1e-4, 1e-5])
  args = parser.parse_args(argv)
  gm = toy.GaussianMixture.from_digits(std=0.05)
  sde, eps = sde_lib.VPSDE(), 1e-3
  x = gm.sample(jax.random.PRNGKey(0), args.batch, sde, eps)
  exact = gm.log_prob(x, sde, jnp.full((args.batch,), eps))
  to_bpd = 1.0 / (gm.dim * math.log(2.0))
  print("| divergence | rtol = atol | nfe | s / batch | mean bpd error | max abs bpd error |")
  print("|---|---|---|---|---|---|")
  for divergence in ("exact", "rademacher"):
    for tol in args.tols:
      ll = likelihood.get_likelihood_fn(sde, divergence, rtol=tol, atol=tol, eps=eps)
      key = jax.random.PRNGKey(1)
      jax.block_until_ready(ll(key, gm.score_fn(sde), x))  # compile
      t0 = time.perf_counter()
      logp, _, nfe = jax.block_until_ready(ll(key, gm.score_fn(sde), x))
      seconds = time.perf_counter() - t0
      err = np.asarray(exact - logp) * to_bpd  # bpd error = -(logp - exact) / (D ln 2)
      print(f"| {divergence} | {tol:g} | {int(nfe)} | {seconds:.2f} | {err.mean():+.2e} | "
            f"{np.abs(err).max():.2e} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
