"""Training throughput and loop overhead on this machine.

    python benchmarks/train.py                       # Fashion-MNIST U-Net and CIFAR-10 DDPM++
    python benchmarks/train.py --configs configs/fashion_mnist.py --steps 40

For each config: steps/s and examples/s of the real training loop (data pipeline, logging on,
no checkpoint until the end), and the loop overhead = wall time of `train.train_loop` from its
first step's end to its last step's end over the sum of the pure compiled step times on the same
batches (target <= 3 %); the one checkpoint that every run saves at its end is timed apart.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sgm_jax import datasets, parallel, train  # noqa: E402
from sgm_jax.cli import setup  # noqa: E402


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def measure(config_path: str, steps: int, batch_size: int, data_dir: str) -> dict:
  config = load_config(config_path)
  config.training.batch_size = batch_size
  config.training.n_jitted_steps = 1
  config.training.n_iters = steps + 1
  config.training.log_freq = 10
  config.training.snapshot_freq = 10 ** 9
  config.training.snapshot_freq_for_preemption = 10 ** 9
  config.training.max_seconds = None
  sde, model, dataset = setup.build(config)
  try:
    dataset.train_batch(0)
    data = str(config.data.dataset)
  except (datasets.MissingDependencyError, datasets.DatasetNotFoundError) as e:
    # Throughput does not depend on pixel values: stand in random images of the same shape.
    print(f"  {config.data.dataset} not available here ({type(e).__name__}); timing on random "
          "uint8 images of its shape", flush=True)
    size, channels = int(config.data.image_size), int(config.data.num_channels)
    images = np.random.default_rng(0).integers(0, 256, (1024, size, size, channels), np.uint8)
    np.savez(os.path.join(data_dir, "random.npz"), images=images)
    config.data.dataset, config.data.data_dir = "npz", os.path.join(data_dir, "random.npz")
    sde, model, dataset = setup.build(config)
    data = "random images"
  opt = setup.optimizer_from_config(config)
  tx = opt.build()
  example_shape = dataset.train_batch(0)["image"].shape[1:]
  state = setup.initial_state(config, model, example_shape, tx)
  step_fn = train.make_train_step(setup.loss_fn_from_config(config, sde, model), tx,
                                  float(config.model.ema_rate), 0, opt.schedule())
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))

  # Pure compute: the compiled step on a fixed device-resident batch, timed one call at a time.
  p_step = parallel.fused_steps(step_fn)
  batches = dataset.batches_fn()(0)
  host = np.asarray(next(batches))
  device_batch = jax.device_put(host.reshape((1,) + host.shape))  # (n_steps, batch, ...)
  rstate = parallel.replicate(state)
  rstate, m = p_step(rstate, device_batch)  # compile
  jax.block_until_ready(m)
  pure = []
  for _ in range(steps):
    t0 = time.perf_counter()
    rstate, m = p_step(rstate, device_batch)
    jax.block_until_ready(m)
    pure.append(time.perf_counter() - t0)

  # The real loop (data pipeline, logging, NaN checks); its first, compiling call is excluded.
  stats = {}
  with tempfile.TemporaryDirectory() as workdir:
    spec = setup.loop_spec_from_config(config)
    train.train_loop(workdir, state, step_fn, dataset.batches_fn(), spec, stats=stats)
  loop_wall, loop_steps = stats["steady_seconds"], stats["steady_steps"]
  pure_per_step = float(np.mean(pure))
  return dict(config=config_path, data=data, params=n_params, batch=batch_size, steps=loop_steps,
              step_s=float(np.median(pure)), steps_per_s=loop_steps / loop_wall,
              examples_per_s=loop_steps * batch_size / loop_wall,
              overhead=loop_wall / (loop_steps * pure_per_step) - 1.0,
              final_checkpoint_s=stats.get("final_checkpoint_seconds", float("nan")))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", nargs="+", default=[
      "configs/fashion_mnist.py:64", "configs/vp/cifar10_ddpmpp_continuous.py:4"],
      help="config files, each optionally with :BATCH_SIZE")
  parser.add_argument("--steps", type=int, default=60)
  args = parser.parse_args(argv)
  rows = []
  for item in args.configs:
    path, _, batch = item.partition(":")
    print(f"measuring {path} ...", flush=True)
    with tempfile.TemporaryDirectory() as data_dir:
      rows.append(measure(path, args.steps, int(batch or 64), data_dir))
    r = rows[-1]
    print(f"  {r['params']:,} params, batch {r['batch']}: {r['steps_per_s']:.2f} steps/s, "
          f"{r['examples_per_s']:.1f} examples/s, overhead {100 * r['overhead']:+.1f} %, final "
          f"checkpoint {r['final_checkpoint_s']:.1f} s", flush=True)
  print("\n| config | data | params | batch | step (median) | steps/s | examples/s | loop overhead "
        "| final checkpoint |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['config']} | {r['data']} | {r['params']:,} | {r['batch']} | {1000 * r['step_s']:.0f} ms | "
          f"{r['steps_per_s']:.2f} | {r['examples_per_s']:.1f} | {100 * r['overhead']:+.1f} % | "
          f"{r['final_checkpoint_s']:.1f} s |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
