"""`time_grid=tuned`: a fixed-grid sampler on the time grid fitted to the checkpoint it samples.

The grid is `sampling.tuning.tune_time_grid`'s for the checkpoint's score, the sampler, its steps
and its options (score scale, thresholding, final jump: the teacher sees them too), tuned the
first time it is asked for and kept in the workdir's tuned_grids.json, keyed by all of that and
by the checkpoint (its step and a digest of its parameters), so later runs of any mode read it.
`--nfe N` asks for it where the budget table says it pays (sampling/budget.py).

The recipe is config.sampling.tune_warmup / tune_max_evals / tune_seed (the constants below when
a config has no such field): 100 Nelder-Mead candidates on 128 warm-up draws took 2.5-5 minutes
on 2 cores for the Fashion-MNIST U-Net at 5 steps (README, "A grid learned per checkpoint").
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Callable

import jax
import numpy as np

from sgm_jax import parallel
from sgm_jax.cli import setup
from sgm_jax.sampling import budget

TUNED = budget.TUNED_GRID
CACHE_FILE = "tuned_grids.json"
TUNE_WARMUP, TUNE_MAX_EVALS, TUNE_SEED = 128, 100, 1


def wants_tuned_grid(options: dict) -> bool:
  return "time_grid" in options and "time_grid" not in budget.without_tuned_grid(options)


def params_digest(params: Any) -> str:
  """A short digest of a parameter tree's values: which network a tuned grid belongs to."""
  h = hashlib.sha1()
  for leaf in jax.tree_util.tree_leaves(params):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()[:16]


def resolve(config: Any, workdir: str, options: dict, sampler: str, num_steps: int, sde,
            score_fn: Callable, example_shape: tuple, step: int, params: Any) -> dict:
  """`options` with time_grid=tuned replaced by the checkpoint's tuned grid (a list of
  num_steps + 1 times, as JSON records it), read from workdir/tuned_grids.json or tuned now and
  added there; other options are returned as they are. Every process of a job calls it and gets
  process 0's grid."""
  if not wants_tuned_grid(options):
    return options
  from sgm_jax.sampling import tuning
  s = config.sampling
  num_warmup = int(setup.get_field(s, "tune_warmup", TUNE_WARMUP))
  rest = budget.without_tuned_grid(options)
  grid = tuning.tune_time_grid(
      sampler, sde, score_fn, (num_warmup,) + tuple(example_shape), int(num_steps),
      key=jax.random.PRNGKey(int(setup.get_field(s, "tune_seed", TUNE_SEED))),
      num_warmup=num_warmup, max_evals=int(setup.get_field(s, "tune_max_evals", TUNE_MAX_EVALS)),
      cache=os.path.join(workdir, CACHE_FILE),
      model_id=f"checkpoint {int(step)}, parameters {params_digest(params)}",
      write_cache=parallel.is_first_process(), verbose=parallel.is_first_process(), **rest)
  if jax.process_count() > 1:  # one grid for the job, whatever each host's arithmetic gave
    from jax.experimental import multihost_utils
    bits = np.ascontiguousarray(np.asarray(grid, np.float64)).view(np.int32)  # exact without x64
    grid = np.asarray(multihost_utils.broadcast_one_to_all(bits), np.int32).view(np.float64)
  return dict(rest, time_grid=[float(t) for t in np.asarray(grid, np.float64)])
