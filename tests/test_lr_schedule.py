"""optim.decay: the learning rate after the warm-up, written out per step (cosine and linear decay
to 0 at training.n_iters; 'none' keeps score_sde's constant rate), the optimizer state tree the same
for every schedule (a run resumes with the decay changed), and clear errors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax import train
from sgm_jax.cli import setup
from sgm_jax.errors import InputError

LR, WARMUP, STEPS = 2e-3, 10, 50


def _expected(decay: str, step: int) -> float:
  if step < WARMUP:
    return LR * step / WARMUP
  done = (step - WARMUP) / (STEPS - WARMUP)
  if decay == "none":
    return LR
  if decay == "linear":
    return LR * max(1.0 - done, 0.0)
  return LR * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))  # cosine


@pytest.mark.parametrize("decay", ["none", "cosine", "linear"])
def test_the_rate_of_every_step(decay):
  schedule = train.OptimizerSpec(lr=LR, warmup=WARMUP, decay=decay, decay_steps=STEPS).schedule()
  got = np.array([float(schedule(s)) for s in range(STEPS + 5)])
  want = np.array([_expected(decay, s) for s in range(STEPS + 5)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7 * LR)  # float32 rates


def test_without_warmup_the_decay_starts_at_the_peak():
  schedule = train.OptimizerSpec(lr=LR, warmup=0, decay="linear", decay_steps=4).schedule()
  np.testing.assert_allclose([float(schedule(s)) for s in range(6)],
                             [LR, 0.75 * LR, 0.5 * LR, 0.25 * LR, 0.0, 0.0], rtol=1e-6)


def test_the_optimizer_state_has_one_tree_for_every_decay():
  params = {"w": jnp.ones((3,))}
  trees = {d: jax.tree_util.tree_structure(
      train.OptimizerSpec(decay=d, warmup=2, decay_steps=9).build().init(params))
      for d in train.DECAYS}
  assert len(set(trees.values())) == 1, trees


def test_the_config_decays_over_training_n_iters():
  import importlib
  import os
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  config = importlib.import_module("configs.digits").get_config()
  assert config.optim.decay == "none"  # score_sde's constant rate unless a config asks
  config.optim.decay, config.optim.warmup, config.training.n_iters = "cosine", 5, 25
  spec = setup.optimizer_from_config(config)
  assert spec.decay == "cosine" and spec.decay_steps == 25
  assert float(spec.schedule()(25)) == 0.0 and float(spec.schedule()(5)) == pytest.approx(
      config.optim.lr)


@pytest.mark.parametrize("kwargs, message", [
    (dict(decay="exp"), r"optim.decay must be one of \['none', 'cosine', 'linear'\], got 'exp'"),
    (dict(decay="cosine", warmup=100, decay_steps=100), r"more steps \(100, training.n_iters\) "
     r"than the warm-up \(100, optim.warmup\)"),
])
def test_bad_decays_are_refused(kwargs, message):
  with pytest.raises(InputError, match=message):
    train.OptimizerSpec(**kwargs)
