"""Offline demo: sample 8x8 digits from the exact score of the smoothed digits dataset.

    python -m sgm_jax.demo --workdir runs/demo

No training and no download: the score is the closed-form score of scikit-learn's digits smoothed
by N(0, 0.05^2) (sgm_jax.toy.GaussianMixture.from_digits), so what the samplers produce shows what
they would do with a perfect network. Writes one PNG grid per sampler and prints the paths.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

from sgm_jax import io_utils, sampling, sde_lib, toy

DEMO_SAMPLERS = (
    ("deis", dict(num_steps=10)),
    ("pc", dict(num_steps=500, predictor="reverse_diffusion", corrector="langevin", snr=0.16)),
)


def _nearest_image_distance(samples: np.ndarray, gm: toy.GaussianMixture) -> float:
  """Mean distance per pixel from each sample to its nearest training digit (in [-1, 1] units)."""
  flat = samples.reshape(samples.shape[0], -1)
  means = np.asarray(gm.means).reshape(gm.num_components, -1)
  d2 = (flat ** 2).sum(1)[:, None] - 2 * flat @ means.T + (means ** 2).sum(1)[None, :]
  return float(np.sqrt(np.maximum(d2.min(1), 0.0) / flat.shape[1]).mean())


def run(workdir: str, num_samples: int = 64, seed: int = 0) -> dict:
  gm = toy.GaussianMixture.from_digits(std=0.05)
  sde = sde_lib.VPSDE()
  shape = (num_samples,) + gm.event_shape
  key = jax.random.PRNGKey(seed)
  results = {}
  for name, options in DEMO_SAMPLERS:
    sampler = sampling.get_sampler(name, sde, shape, **options)
    start = time.perf_counter()
    x0, nfe = sampler(key, gm.score_fn(sde))
    x0 = np.asarray(jax.block_until_ready(x0))
    seconds = time.perf_counter() - start
    path = io_utils.save_image_grid(x0, os.path.join(workdir, f"samples_{name}.png"), upscale=4)
    dist = _nearest_image_distance(x0, gm)
    results[name] = dict(path=path, nfe=int(nfe), seconds=seconds, nearest_digit_rms=dist)
    print(f"{name:>5}: {int(nfe):4d} score evaluations, {seconds:5.1f} s (with compilation), "
          f"rms distance to nearest training digit {dist:.3f} -> {path}")
  return results


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/demo", help="where the PNG grids are written")
  parser.add_argument("--num_samples", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.num_samples < 1:
    parser.error(f"--num_samples must be >= 1, got {args.num_samples}")
  run(args.workdir, args.num_samples, args.seed)
  return 0


if __name__ == "__main__":
  sys.exit(main())
