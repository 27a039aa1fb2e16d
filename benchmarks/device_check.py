"""Device check: DDPM++ cont. (VP, CIFAR-10) training and sampling speed and memory on the
devices this process finds, in float32 and bfloat16 (`config.model.dtype`).

    python benchmarks/device_check.py                  # a GPU or TPU host: under 8 minutes on one GPU
    python benchmarks/device_check.py --small          # CPU-sized: 8 channels, 16x16, batch 4

Measured, each part compiled once (compile time reported) and then timed:
- training steps/s at batch 128 per device on one device, float32 and bfloat16, with the compiled
  program's memory (XLA's memory analysis: arguments + outputs + temporaries - donated aliases)
  and, where the backend reports it, the device's peak bytes in use so far;
- the same step data-parallel over 2 devices (batch 128 each) where there are 2 or more;
- sampling images/s on one device: DEIS with 10 score evaluations and score_sde's
  predictor-corrector with 1,000 steps, float32 and bfloat16.
The network is freshly initialized (speed does not depend on the weights) and the data are random
images of CIFAR-10's shape. Prints a Markdown table and writes the rows as JSON (--out).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sgm_jax import models, parallel, sampling, train  # noqa: E402
from sgm_jax.cli import setup  # noqa: E402

CONFIG = "configs/vp/cifar10_ddpmpp_continuous.py"
DTYPES = ("float32", "bfloat16")
# --small: DDPM++ with every layer type (residual blocks, attention at 16x16, the time embedding)
# at one resolution of 16x16 images and 8 channels: seconds on a CPU. No residual block of its
# own on the way down (num_res_blocks 0): the bottleneck's two (attention between them) and the
# way up's one (attention after it) remain, and a training step compiles in ~35% less time than
# with one (CPU, XLA's optimizations off: 4.9 -> 3.2 s float32, 8.7 -> 5.3 s bfloat16 on 2 devices)
SMALL_MODEL = {"nf": 8, "ch_mult": (1,), "num_res_blocks": 0}
SMALL_IMAGE_SIZE = 16


def load_config(small: bool, dtype: str):
  import importlib
  config = importlib.import_module(os.path.splitext(CONFIG)[0].replace("/", ".")).get_config()
  with config.unlocked():
    if small:
      for key, value in SMALL_MODEL.items():
        config.model[key] = value
      config.data.image_size = SMALL_IMAGE_SIZE
    config.model.dtype = dtype
  return config


def compiled_bytes(compiled) -> int | None:
  """Arguments + outputs + temporaries - donated aliases of a compiled program (XLA's buffer
  assignment), or None where the backend does not say."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return None


def device_peak_bytes(device) -> int | None:
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return None if not stats else stats.get("peak_bytes_in_use")


def flops_of(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])
  except Exception:  # pylint: disable=broad-except
    return None


def _timed(fn, n: int) -> float:
  """Seconds per call of fn() (which returns arrays) over n calls after one warm-up call."""
  jax.block_until_ready(fn())
  t0 = time.perf_counter()
  out = None
  for _ in range(n):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / n


def training_step(config, abstract: bool = False):
  """(train state, step_fn, one image's shape) of a config's training, as --mode train builds
  them; `abstract`: the state's shapes and dtypes only (nothing allocated)."""
  sde = setup.sde_from_config(config)
  model = models.create_model(config, sde)
  opt = setup.optimizer_from_config(config)
  tx = opt.build()
  shape = (int(config.data.image_size),) * 2 + (int(config.data.num_channels),)
  state = (setup.abstract_initial_state if abstract else setup.initial_state)(
      config, model, shape, tx)
  step_fn = train.make_train_step(setup.loss_fn_from_config(config, sde, model), tx,
                                  float(config.model.ema_rate), 0, opt.schedule())
  return state, step_fn, shape


@functools.lru_cache(maxsize=None)
def initial_state(small: bool):
  """The training state every row starts from: float32 parameters whatever `model.dtype`, so one
  initialization serves both dtypes (op by op it took 3.5 s of the --small run's 60 on a CPU).
  Kept in host memory: the device's peak memory is the rows' own."""
  return jax.device_get(training_step(load_config(small, DTYPES[0]))[0])


def measure_training(small: bool, dtype: str, devices: list, batch: int, steps: int) -> dict:
  abstract_state, step_fn, shape = training_step(load_config(small, dtype), abstract=True)
  state = initial_state(small)
  if jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), state) != jax.tree_util.tree_map(
      lambda a: (a.shape, a.dtype), abstract_state):
    raise AssertionError(f"the {dtype} training state differs from the {DTYPES[0]} one")
  mesh = parallel.mesh(devices)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharding = jax.sharding.NamedSharding(mesh, parallel.batch_spec(1))
  images = np.random.default_rng(0).uniform(-1, 1, (1, batch * len(devices)) + shape)
  x = jax.device_put(images.astype(np.float32), batch_sharding)
  rstate = jax.device_put(state, sharding)
  t0 = time.perf_counter()
  compiled = parallel.fused_steps(step_fn, devices=devices).lower(rstate, x).compile()
  compile_s = time.perf_counter() - t0
  holder = [rstate]

  def one_step():
    holder[0], metrics = compiled(holder[0], x)
    return metrics["loss"]

  seconds = _timed(one_step, steps)
  loss = float(np.asarray(one_step())[0])
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(holder[0].params))
  return dict(part="train", dtype=dtype, devices=len(devices), batch_per_device=batch,
              params=n_params, compile_s=compile_s, seconds=seconds, rate=1.0 / seconds,
              examples_per_s=batch * len(devices) / seconds, flops=flops_of(compiled),
              compiled_bytes=compiled_bytes(compiled), device_peak_bytes=device_peak_bytes(
                  devices[0]), loss=loss, finite=bool(np.isfinite(loss)))


def measure_sampling(small: bool, dtype: str, sampler: str, num_steps: int, batch: int) -> dict:
  config = load_config(small, dtype)
  sde = setup.sde_from_config(config)
  model = models.create_model(config, sde)
  shape = (int(config.data.image_size),) * 2 + (int(config.data.num_channels),)
  params = initial_state(small).params
  options = setup.sampler_options_from_config(config, sampler, {})
  sample = sampling.get_sampler(sampler, sde, (batch,) + shape, num_steps=num_steps, **options)

  def run(params, key):
    x, nfe = sample(key, setup.score_fn_for(config, sde, model, params))
    return x, nfe

  key = jax.random.PRNGKey(1)
  t0 = time.perf_counter()
  compiled = jax.jit(run).lower(params, key).compile()
  compile_s = time.perf_counter() - t0
  x, nfe = compiled(params, key)
  seconds = _timed(lambda: compiled(params, key)[0], 1)
  return dict(part=f"sample {sampler}", dtype=dtype, devices=1, batch_per_device=batch,
              num_steps=num_steps, nfe=float(np.asarray(nfe)), compile_s=compile_s,
              seconds=seconds, rate=batch / seconds, examples_per_s=batch / seconds,
              samples_dtype=str(x.dtype), compiled_bytes=compiled_bytes(compiled),
              device_peak_bytes=device_peak_bytes(jax.devices()[0]),
              finite=bool(np.isfinite(np.asarray(x)).all()))


def _size(n: int | None) -> str:
  return "" if n is None else f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 28 else f"{n / 2 ** 20:.1f} MiB"


def table(rows: list[dict]) -> str:
  lines = ["| part | dtype | devices | batch / device | compile | rate | examples/s | "
           "compiled memory | device peak so far |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    unit = "steps/s" if r["part"] == "train" else "batches/s"
    part = r["part"] + (f" ({r['num_steps']} steps, {r['nfe']:.0f} NFE)" if "nfe" in r else "")
    lines.append(f"| {part} | {r['dtype']} | {r['devices']} | {r['batch_per_device']} | "
                 f"{r['compile_s']:.1f} s | {1 / r['seconds']:.3g} {unit} | "
                 f"{r['examples_per_s']:.1f} | {_size(r['compiled_bytes'])} | "
                 f"{_size(r['device_peak_bytes'])} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="CPU-sized network and batches")
  parser.add_argument("--out", default="device_check.json", help="JSON file of the rows")
  parser.add_argument("--steps", type=int, default=None, help="timed training steps "
                      "(default 20; --small 2)")
  parser.add_argument("--pc-steps", type=int, default=None, help="PC steps (default 1000; "
                      "--small 10)")
  args = parser.parse_args(argv)
  small = args.small
  batch, sample_batch = (4, 4) if small else (128, 128)
  steps = args.steps or (2 if small else 20)
  pc_steps = args.pc_steps or (10 if small else 1000)
  devices = jax.devices()
  env = dict(jax=jax.__version__, backend=jax.default_backend(), device_kind=devices[0].device_kind,
             device_count=len(devices), small=small)
  print(f"device check on {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), "
        f"jax {jax.__version__}{', --small' if small else ''}", flush=True)
  plan = [(measure_training, (small, d, devices[:1], batch, steps)) for d in DTYPES]
  if len(devices) >= 2:
    plan += [(measure_training, (small, d, devices[:2], batch, steps)) for d in DTYPES]
  for d in DTYPES:
    plan += [(measure_sampling, (small, d, "deis", 10, sample_batch)),
             (measure_sampling, (small, d, "pc", pc_steps, sample_batch))]
  rows, t_start = [], time.perf_counter()
  for i, (fn, fn_args) in enumerate(plan):
    row = fn(*fn_args)
    rows.append(row)
    elapsed = time.perf_counter() - t_start
    print(f"[{i + 1}/{len(plan)}, {elapsed:.0f} s] {row['part']} {row['dtype']} on "
          f"{row['devices']} device(s): {row['examples_per_s']:.1f} examples/s (compile "
          f"{row['compile_s']:.1f} s); ETA {elapsed / (i + 1) * (len(plan) - i - 1):.0f} s",
          flush=True)
  print("\n" + table(rows))
  result = dict(env=env, rows=rows, seconds=time.perf_counter() - t_start)
  from sgm_jax.io_utils import atomic_write
  with atomic_write(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"\nwritten to {args.out}")
  return result


if __name__ == "__main__":
  main()
