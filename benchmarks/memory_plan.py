"""Memory plan of the paper networks: parameters, FLOPs per training example and the compiled
training step's memory per device, in float32 and bfloat16, with and without rematerialization.

    python benchmarks/memory_plan.py                                     # every paper config
    python benchmarks/memory_plan.py --configs configs/vp/cifar10_ddpmpp_continuous.py --batches 1 8
    pip install "jax[tpu]"   # libtpu: compile for a TPU without one
    python benchmarks/memory_plan.py --target tpu:v5e --batches 64 --dtypes float32

Nothing runs: each training step (loss, gradients, Adam, EMA, as `main.py --mode train` compiles
it for one device) is compiled and XLA's analyses are read: FLOPs (cost analysis) and memory
(buffer assignment: arguments + outputs + temporaries - donated aliases). `--target` picks the
compiler: this machine's backend (`local`), or a TPU generation's (`tpu:v5e`, `tpu:v4`, ...)
through JAX's deviceless ahead-of-time compilation (libtpu compiles for a TPU topology on a
machine that has none). The CPU backend's buffer assignment is far from an accelerator's: it
drops rematerialization's optimization barriers, so remat saves nothing there, and fuses
differently. The largest batch that fits a memory size is extrapolated from the two largest
batch sizes compiled (memory is nearly affine in the batch): fixed + per_example * batch <= size.
The last column is what score_sde's training budget (1.3M steps at batch 128) would take on one
device at `--utilization` of its peak FLOPs (an H100's by default; `--peak-tflops-bfloat16`,
`--peak-tflops-float32`), with the FLOPs per example of the largest batch compiled. With `--out`,
the rows are written after every compile and a rerun with the same `--out` compiles only the rows
missing from it (a long table survives an interrupted run).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from device_check import compiled_bytes, flops_of, training_step  # noqa: E402  (script's folder)
from sgm_jax import parallel  # noqa: E402

PAPER_CONFIGS = ("configs/vp/cifar10_ddpmpp_continuous.py",
                 "configs/vp/cifar10_ddpmpp_deep_continuous.py",
                 "configs/ve/cifar10_ncsnpp_continuous.py",
                 "configs/ve/cifar10_ncsnpp_deep_continuous.py",
                 "configs/ve/celebahq_256_ncsnpp_continuous.py",
                 "configs/vp/ddpm/cifar10.py")
MEMORY_SIZES_GB = (16, 40, 80)
# score_sde's published training budget for its CIFAR-10 models: 1.3M iterations at batch 128
SCORE_SDE_EXAMPLES = 1_300_000 * 128
# An H100 SXM's dense peak (NVIDIA's data sheet): bfloat16 tensor cores, and TF32, which XLA uses
# for float32 convolutions and matmuls on GPUs by default
H100_PEAK_TFLOPS = {"bfloat16": 989.0, "float32": 495.0}


def load_config(path: str, dtype: str, remat: bool):
  import importlib
  config = importlib.import_module(os.path.splitext(path)[0].replace("/", ".")).get_config()
  with config.unlocked():
    config.model.dtype, config.model.remat = dtype, remat
  return config


def target_device(target: str):
  """One device of the compiler `target` names: 'local' (this machine's first device) or
  'tpu:<generation>' (a device of a deviceless TPU topology, e.g. tpu:v5e, tpu:v4)."""
  if target == "local":
    return jax.devices()[0]
  kind, _, generation = target.partition(":")
  if kind != "tpu" or not generation:
    raise SystemExit(f"--target {target!r}: expected 'local' or 'tpu:<generation>' (tpu:v5e, "
                     "tpu:v4, tpu:v6e, ...)")
  from jax.experimental import topologies
  try:
    topology = topologies.get_topology_desc(platform="tpu", topology_name=f"{generation}:2x2")
  except Exception as e:  # pylint: disable=broad-except  # libtpu missing or unknown generation
    raise SystemExit(f"--target {target!r}: no TPU compiler for it ({type(e).__name__}: "
                     f"{str(e).splitlines()[0]}); install libtpu with `pip install "
                     f"\"jax[tpu]\"`") from None
  return topology.devices[0]


def compile_step(path: str, batch: int, dtype: str, remat: bool, device=None) -> dict:
  state, step_fn, shape = training_step(load_config(path, dtype, remat), abstract=True)
  devices = [device or jax.devices()[0]]
  mesh = parallel.mesh(devices)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), state)
  x = jax.ShapeDtypeStruct((1, batch) + shape, np.float32, sharding=jax.sharding.NamedSharding(
      mesh, parallel.batch_spec(1)))
  t0 = time.perf_counter()
  compiled = parallel.fused_steps(step_fn, devices=devices).lower(state, x).compile()
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
  flops = flops_of(compiled)
  return dict(config=path, batch=batch, dtype=dtype, remat=remat, params=n_params,
              compile_s=time.perf_counter() - t0, bytes=compiled_bytes(compiled),
              flops_per_example=None if flops is None else flops / batch)


def largest_batch(rows: list[dict], size_gb: float) -> int | None:
  """The largest batch with fixed + per_example * batch <= size, from the two largest batches:
  small batches under-predict (DDPM++ cont., float32, CPU: from batches 1 and 8 batch 64 would
  need 8.4 GiB, it compiled to 9.5)."""
  rows = sorted(rows, key=lambda r: r["batch"])
  if len(rows) < 2 or rows[-1]["bytes"] is None:
    return None
  (b0, m0), (b1, m1) = [(r["batch"], r["bytes"]) for r in rows[-2:]]
  per_example = (m1 - m0) / (b1 - b0)
  fixed = m0 - per_example * b0
  return int((size_gb * 1e9 - fixed) // per_example) if per_example > 0 else None


def budget_days(flops_per_example: float, peak_tflops: float, utilization: float) -> float:
  """Days of one device for score_sde's budget at `utilization` of a `peak_tflops` device."""
  return SCORE_SDE_EXAMPLES * flops_per_example / (peak_tflops * 1e12 * utilization) / 86400


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", nargs="+", default=list(PAPER_CONFIGS))
  parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                      choices=["float32", "bfloat16"])
  parser.add_argument("--remat", nargs="+", default=["off", "on"], choices=["off", "on"])
  parser.add_argument("--target", default="local",
                      help="'local' (this machine's backend) or tpu:<generation> (deviceless)")
  parser.add_argument("--utilization", type=float, default=0.3,
                      help="the share of the peak FLOPs assumed for the budget column (0.3)")
  for dtype, tflops in H100_PEAK_TFLOPS.items():
    parser.add_argument(f"--peak-tflops-{dtype}", type=float, default=tflops,
                        help=f"the device's {dtype} peak for the budget column ({tflops:g}: H100)")
  parser.add_argument("--out", default=None,
                      help="JSON file of the rows, written after every compile; rows already in "
                      "it are not compiled again")
  args = parser.parse_args(argv)
  device = target_device(args.target)
  print(f"compiling for {device.platform} ({getattr(device, 'device_kind', '')})", flush=True)
  saved = _read_rows(args.out)
  plan = [(c, d, r, b) for c in args.configs for d in args.dtypes for r in args.remat
          for b in args.batches]
  rows, todo = [], []
  for path, dtype, remat, batch in plan:
    key = (path, dtype, remat == "on", batch, args.target)
    (rows if key in saved else todo).append(saved.get(key, (path, dtype, remat, batch)))
  if rows:
    print(f"{len(rows)} of {len(plan)} rows read from {args.out}", flush=True)
  t0 = time.perf_counter()
  for i, (path, dtype, remat, batch) in enumerate(todo):
    row = compile_step(path, batch, dtype, remat == "on", device)
    row["target"] = args.target
    rows.append(row)
    if args.out:
      _write_rows(args.out, list(saved.values()) + [r for r in rows if _key(r) not in saved])
    elapsed = time.perf_counter() - t0
    eta = elapsed / (i + 1) * (len(todo) - i - 1)
    print(f"[{i + 1}/{len(todo)}, {elapsed:.0f} s, ETA {eta:.0f} s] {path} {dtype} remat {remat} "
          f"batch {batch}: {row['bytes'] / 2 ** 30:.2f} GiB (compiled in {row['compile_s']:.0f} s)",
          flush=True)
  print("\n| config | params | GFLOPs / example | dtype | remat | "
        + " | ".join(f"batch {b}" for b in args.batches) + " | "
        + " | ".join(f"largest batch in {g} GB" for g in MEMORY_SIZES_GB)
        + f" | days for 1.3M steps at batch 128, {args.utilization:.0%} of peak |")
  print("|---" * (6 + len(args.batches) + len(MEMORY_SIZES_GB)) + "|")
  peak = {d: getattr(args, f"peak_tflops_{d}") for d in H100_PEAK_TFLOPS}
  for path in args.configs:
    for dtype in args.dtypes:
      for remat in args.remat:
        group = sorted((r for r in rows if (r["config"], r["dtype"], r["remat"]) == (
            path, dtype, remat == "on")), key=lambda r: r["batch"])
        flops = group[-1]["flops_per_example"]  # the largest batch's: nearest to 128
        print(f"| {path} | {group[0]['params']:,} | "
              f"{'' if flops is None else f'{flops / 1e9:.1f}'} | {dtype} | {remat} | "
              + " | ".join(f"{r['bytes'] / 2 ** 30:.2f} GiB" for r in group) + " | "
              + " | ".join(str(largest_batch(group, g)) for g in MEMORY_SIZES_GB) + " | "
              + ("" if flops is None else
                 f"{budget_days(flops, peak[dtype], args.utilization):.1f}") + " |")
  return rows


def _key(row: dict) -> tuple:
  return row["config"], row["dtype"], row["remat"], row["batch"], row["target"]


def _read_rows(path: str | None) -> dict:
  if not path or not os.path.exists(path):
    return {}
  with open(path) as f:
    return {_key(r): r for r in json.load(f)}


def _write_rows(path: str, rows: list[dict]):
  from sgm_jax.io_utils import atomic_write
  with atomic_write(path, "w") as f:
    json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
