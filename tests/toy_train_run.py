"""A tiny training run used by the kill-and-resume and multi-device tests (run as a script).

    python tests/toy_train_run.py WORKDIR N_ITERS [--nan_at STEP] [--out FILE.npz]
"""
import argparse
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax import losses, sde_lib, train


class TinyScoreNet(nn.Module):
  @nn.compact
  def __call__(self, x, t, train=False):
    h = jnp.concatenate([x, t[:, None] / 1000.0], -1)
    h = nn.swish(nn.Dense(32)(h))
    h = nn.Dropout(0.1, deterministic=not train)(h)
    return nn.Dense(x.shape[-1])(h)


def batches(start, nan_at=None, batch_size=8):
  step = start
  while True:
    x = np.random.default_rng(step).normal(size=(batch_size, 2)).astype(np.float32)
    if nan_at is not None and step == nan_at:
      x[0, 0] = np.nan
    yield x
    step += 1


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("workdir")
  p.add_argument("n_iters", type=int)
  p.add_argument("--nan_at", type=int, default=None)
  p.add_argument("--out", default=None)
  p.add_argument("--n_jitted_steps", type=int, default=2)
  args = p.parse_args(argv)
  print(f"devices: {jax.local_device_count()}", flush=True)
  sde = sde_lib.VPSDE()
  model = TinyScoreNet()
  opt = train.OptimizerSpec(warmup=5)
  tx = opt.build()
  # One compiled program: op by op, the initializers and the optimizer's state compiled some thirty
  # tiny programs in every run.
  state = jax.jit(lambda key: train.create_train_state(train.init_params(model, key, (8, 2)), tx))(
      jax.random.PRNGKey(0))
  step = train.make_train_step(losses.get_loss_fn(sde, model), tx, 0.99, seed=1,
                               schedule=opt.schedule())
  spec = train.LoopSpec(n_iters=args.n_iters, batch_size=8, n_jitted_steps=args.n_jitted_steps,
                        log_freq=1, snapshot_freq=8, snapshot_freq_for_preemption=2)
  final = train.train_loop(args.workdir, state, step, lambda s: batches(s, args.nan_at), spec)
  if args.out:
    leaves = jax.tree_util.tree_leaves((final.params, final.params_ema, final.opt_state))
    np.savez(args.out, *[np.asarray(l) for l in leaves])
  return 0


if __name__ == "__main__":
  sys.exit(main())
