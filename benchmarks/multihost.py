"""Data parallelism over devices: sampling throughput and scaling, replicate's host memory, and
what fetching the loss after every training step costs.

    python benchmarks/multihost.py [--devices 1 2 4] [--samples 96] [--steps 200]

Each measurement runs in a fresh process whose CPU is split into N devices
(--xla_force_host_platform_device_count=N), so on a CPU these are forced devices sharing the same
cores: scaling there shows the cost of the split itself (per-device programs, gathering), not a
speed-up. Run it on a multi-GPU host for real scaling (`--devices 1 2 4 8`, no forced devices:
then N devices are selected with CUDA_VISIBLE_DEVICES).

1. sampling: `--mode sample`'s data-parallel program (cli/sample.py: one jit of shard_map over
   all devices, DDIM-10 on the digits Mixer at its initial weights), samples/s after compiling,
   and the scaling efficiency throughput(N) / (N x throughput(1));
   eval bits/dim: `--mode eval`'s likelihood program the same way (each device its own ODE);
2. replicate: host memory (tracemalloc peak of numpy allocations, and the process's peak RSS)
   of placing a train state on N devices the old way (np.stack of N host copies, then a device
   copy) and now (jax.device_put to a replicated sharding);
3. train-step overhead: the digits training loop's step time when the loss is fetched after every
   device call (what train_loop did) and when it stays on the device until a log step (log_freq
   50, what it does now), with the real data pipeline on the host.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def _digits_config():
  from configs import digits
  return digits.get_config()


def _time_calls(once, repeats: int):
  """(first call's seconds, best of `repeats` later calls, last result): once(i) runs call i."""
  t0 = time.perf_counter()
  once(0)
  first = time.perf_counter() - t0
  times = []
  for i in range(1, repeats + 1):
    t0 = time.perf_counter()
    result = once(i)
    times.append(time.perf_counter() - t0)
  return first, min(times), result


def measure_sampling(num_samples: int) -> dict:
  import jax
  import numpy as np
  from sgm_jax import parallel, sampling
  from sgm_jax.cli import setup
  config = _digits_config()
  sde, model, dataset = setup.build(config)
  example_shape = (8, 8, 1)
  tx = setup.optimizer_from_config(config).build()
  params = setup.initial_state(config, model, example_shape, tx).params_ema
  score_fn = setup.score_fn_for(config, sde, model, params)
  per_device = num_samples // parallel.device_count()
  sampler = sampling.get_sampler("ddim", sde, (per_device,) + example_shape, num_steps=10)
  run = parallel.map_batches(setup.sample_shard_fn(sampler, sde, example_shape))
  shared = parallel.replicate((score_fn, None, setup.sampling_keys(0)))
  labels = parallel.from_global_batch(np.zeros(num_samples, np.int32))

  def once(i):
    x, nfe = run(shared + (parallel.replicate(np.int32(i * num_samples)),), labels)
    return parallel.gather(x)

  compile_s, best, _ = _time_calls(once, 5)
  return dict(devices=parallel.device_count(), batch=num_samples, per_device=per_device,
              first_call_s=compile_s, batch_s=best, samples_per_s=num_samples / best)


def measure_bpd(num_images: int) -> dict:
  """--mode eval's bits/dim program (cli.evaluate.bpd_batch_fn: each device solves its own
  block's probability-flow ODE with the digits config's eval settings), on digits-like images
  with the Mixer at its initial weights: images/s after compiling."""
  import jax
  import numpy as np
  from sgm_jax import parallel
  from sgm_jax.cli import evaluate, setup
  config = _digits_config()
  sde, model, dataset = setup.build(config)
  tx = setup.optimizer_from_config(config).build()
  params = setup.initial_state(config, model, (8, 8, 1), tx).params_ema
  score_fn = setup.score_fn_for(config, sde, model, params)
  run = evaluate.bpd_batch_fn(config, sde)
  images = np.random.RandomState(0).randint(0, 17, (num_images, 8, 8, 1)) / 16.0
  x01 = parallel.from_global_batch(images.astype(np.float32))

  def once(i):
    return parallel.gather(run((parallel.replicate(score_fn),
                                parallel.replicate(jax.random.PRNGKey(i))), x01))

  compile_s, best, (_, nfe) = _time_calls(once, 3)
  return dict(devices=parallel.device_count(), batch=num_images,
              per_device=num_images // parallel.device_count(), first_call_s=compile_s,
              batch_s=best, images_per_s=num_images / best, max_nfe=float(np.max(nfe)))


def _peak_rss_mb() -> float:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure_replicate(method: str, megabytes: int) -> dict:
  """Peak host memory of placing a ~`megabytes` state on every device, `method` 'stack' (the old
  parallel.replicate: N stacked host copies, placed by pmap) or 'device_put' (now)."""
  import tracemalloc
  import jax
  import numpy as np
  from sgm_jax import parallel
  n = jax.local_device_count()
  leaves = 8
  size = megabytes * 2 ** 20 // 4 // leaves
  state = {f"w{i}": jax.device_put(np.full((size,), i, np.float32)) for i in range(leaves)}
  jax.block_until_ready(state)
  rss_before = _peak_rss_mb()
  tracemalloc.start()
  t0 = time.perf_counter()
  if method == "stack":
    host = jax.tree_util.tree_map(lambda x: np.stack([np.asarray(x)] * n), state)
    placed = jax.pmap(lambda x: x)(host)  # placed as the old loop did: by its first pmap call
  else:
    placed = parallel.replicate(state)
  jax.block_until_ready(placed)
  seconds = time.perf_counter() - t0
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  return dict(method=method, devices=n, state_mb=megabytes, host_numpy_peak_mb=peak / 2 ** 20,
              peak_rss_growth_mb=_peak_rss_mb() - rss_before, seconds=seconds)


def measure_train(steps: int, fetch_every_step: bool) -> dict:
  """Seconds per training step of the digits config (batch 64, 1 device) with its data pipeline,
  fetching the loss after every step or once per 50 steps."""
  import jax
  import numpy as np
  from sgm_jax import parallel, train
  from sgm_jax.cli import setup
  config = _digits_config()
  sde, model, dataset = setup.build(config)
  opt = setup.optimizer_from_config(config)
  tx = opt.build()
  state = setup.initial_state(config, model, (8, 8, 1), tx)
  step_fn = train.make_train_step(setup.loss_fn_from_config(config, sde, model), tx,
                                  float(config.model.ema_rate), 0, opt.schedule())
  p_step = parallel.fused_steps(step_fn)
  rstate = parallel.replicate(state)
  data = dataset.batches_fn()(0)
  batch = lambda: parallel.from_process_batches(np.asarray(next(data))[None], axis=1)
  rstate, m = p_step(rstate, batch())  # compile
  jax.block_until_ready(m)
  pending = []
  t0 = time.perf_counter()
  for i in range(steps):
    rstate, m = p_step(rstate, batch())
    if fetch_every_step:
      float(np.asarray(m["loss"])[0])
    else:
      pending.append(m["loss"])
      if (i + 1) % 50 == 0:
        [np.asarray(x) for x in pending]
        pending.clear()
  jax.block_until_ready((rstate, pending))
  seconds = time.perf_counter() - t0
  return dict(fetch_every_step=fetch_every_step, steps=steps, step_ms=1000 * seconds / steps)


def _worker(args) -> None:
  if args.worker == "sample":
    result = measure_sampling(args.samples)
  elif args.worker == "bpd":
    result = measure_bpd(args.samples)
  elif args.worker == "replicate":
    result = measure_replicate(args.method, args.megabytes)
  else:
    result = measure_train(args.steps, args.method == "fetch")
  print("RESULT " + json.dumps(result), flush=True)


def _spawn(devices: int, *worker_args) -> dict:
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  res = subprocess.run([sys.executable, os.path.abspath(__file__), *map(str, worker_args)],
                       env=env, capture_output=True, text=True, timeout=3600)
  lines = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")]
  if res.returncode or not lines:
    raise RuntimeError(f"worker {worker_args} on {devices} devices failed:\n{res.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


PARTS = ("sample", "bpd", "replicate", "train")


def _scaling_table(rows: list[dict], rate: str, unit: str) -> None:
  base = rows[0][rate] / rows[0]["devices"]
  print(f"| devices | per device | first call (compile) | batch | {unit} | scaling efficiency |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    eff = r[rate] / (r["devices"] * base)
    print(f"| {r['devices']} | {r['per_device']} | {r['first_call_s']:.1f} s | "
          f"{r['batch_s'] * 1000:.0f} ms | {r[rate]:.1f} | {100 * eff:.0f} % |")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
  p.add_argument("--samples", type=int, default=96, help="global sampling batch")
  p.add_argument("--megabytes", type=int, default=200, help="train state size for replicate")
  p.add_argument("--steps", type=int, default=200, help="training steps timed")
  p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                 help="what to measure (default: all)")
  p.add_argument("--worker", choices=["sample", "bpd", "replicate", "train"],
                 help=argparse.SUPPRESS)
  p.add_argument("--method", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    _worker(args)
    return 0

  if "sample" in args.parts:
    rows = [_spawn(n, "--worker", "sample", "--samples", args.samples) for n in args.devices]
    print(f"\nSampling (DDIM-10, digits Mixer, global batch {args.samples}):\n")
    _scaling_table(rows, "samples_per_s", "samples/s")
  if "bpd" in args.parts:
    rows = [_spawn(n, "--worker", "bpd", "--samples", args.samples) for n in args.devices]
    print(f"\nEval bits/dim (--mode eval's program with the digits config's eval settings, "
          f"digits Mixer, global batch {args.samples}; max NFE of a device "
          f"{max(r['max_nfe'] for r in rows):.0f}):\n")
    _scaling_table(rows, "images_per_s", "images/s")
  n = max(args.devices)
  if "replicate" in args.parts:
    rep = [_spawn(n, "--worker", "replicate", "--method", m, "--megabytes", args.megabytes)
           for m in ("stack", "device_put")]
    print(f"\nreplicate of a {args.megabytes} MB state onto {n} devices:\n")
    print("| method | host numpy peak | peak RSS growth | time |")
    print("|---|---|---|---|")
    for r in rep:
      name = ("before: np.stack of N host copies" if r["method"] == "stack"
              else "now: jax.device_put to a replicated sharding")
      print(f"| {name} | {r['host_numpy_peak_mb']:.0f} MB | {r['peak_rss_growth_mb']:.0f} MB | "
            f"{r['seconds']:.2f} s |")
  if "train" in args.parts:
    tr = [_spawn(1, "--worker", "train", "--method", m, "--steps", args.steps)
          for m in ("fetch", "keep")]
    print(f"\nTraining step (digits, batch 64, 1 device, {args.steps} steps, data pipeline on):\n")
    print("| loss | ms / step |")
    print("|---|---|")
    for r in tr:
      how = ("fetched after every step" if r["fetch_every_step"]
             else "kept on the device until the log step (every 50)")
      print(f"| {how} | {r['step_ms']:.2f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
