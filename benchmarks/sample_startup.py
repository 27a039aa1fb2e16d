"""Where the seconds of one `main.py --mode sample` call go, against the target
whole <= 2 x (Python start-up + sampler compilation + the sampling itself).

    python main.py --mode train --config configs/fashion_mnist.py --workdir DIR   # a checkpoint
    python benchmarks/sample_startup.py --workdir DIR [--config configs/fashion_mnist.py]
        [--sampler deis] [--num_steps 10] [--repeats 3] [--single-thread] [--out FILE.md]

Every measurement runs in a fresh process, as a user's call does:
  start-up  `python -c "import sgm_jax.cli.sample, jax"`: the interpreter and the imports;
  whole     `python main.py --mode sample --config C --workdir DIR --sampler S --num_steps N`
            (it writes DIR/samples/<S>_<N>steps_ckpt<step>.{png,npz}, as that command does);
  split     one process doing what cli.sample.run_sample does, each part timed: imports, backend
            start, config + build (SDE, model, data spec), checkpoint restore, sampler build (time
            grid, coefficients, score function), compilation (first call - second call: tracing and
            XLA compilation), sampling (second call, block_until_ready), writing the PNG + .npz
            (to a temporary folder).
Times are medians over --repeats; wall seconds and the process's CPU seconds (user + sys, children
included) are both shown: on a loaded machine the CPU seconds are the steadier of the two.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = 2.0
_MARKER = "SAMPLE_STARTUP_SPLIT "


def _cpu_children() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def _cpu_self() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def run_timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
  """(wall s, CPU s, stdout) of a child process; raises with its stderr when it fails."""
  cpu0, t0 = _cpu_children(), time.perf_counter()
  res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
  wall, cpu = time.perf_counter() - t0, _cpu_children() - cpu0
  if res.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
  return wall, cpu, res.stdout


# --- the split, in its own process -----------------------------------------------------------
def split(config_path: str, workdir: str, sampler_name: str, num_steps: int) -> dict:
  """cli.sample.run_sample's steps one by one, each timed (wall, CPU); run in a fresh process."""
  times: dict[str, tuple[float, float]] = {}
  clock = [time.perf_counter(), _cpu_self()]

  def lap(name: str) -> None:
    now = [time.perf_counter(), _cpu_self()]
    times[name] = (now[0] - clock[0], now[1] - clock[1])
    clock[:] = now

  import importlib.util
  import jax
  import numpy as np
  sys.path.insert(0, ROOT)
  from sgm_jax import datasets, sampling
  from sgm_jax.cli import outputs, setup
  lap("imports")
  jax.devices()
  lap("backend start")
  spec = importlib.util.spec_from_file_location("sample_startup_config", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  sde, model, dataset = setup.build(config)
  if hasattr(datasets, "example_shape"):
    example_shape = datasets.example_shape(dataset.spec)
  else:  # older revisions learnt the shape from a training batch
    example_shape = dataset.train_batch(0)["image"].shape[1:]
  lap("config + build")
  params, step = setup.restore_ema_params(config, workdir, model, example_shape)
  jax.block_until_ready(params)
  lap("checkpoint restore")
  s = config.sampling
  num_samples = int(s.get("num_samples", 64))
  batch = min(int(s.get("batch_size", 64)), num_samples)
  sampler = sampling.get_sampler(sampler_name, sde, (batch,) + tuple(example_shape),
                                 num_steps=num_steps)
  score_fn = setup.score_fn_for(config, sde, model, params)
  lap("sampler build")
  key = jax.random.PRNGKey(int(config.seed) + 1)
  x, nfe = sampler(jax.random.fold_in(key, 0), score_fn)
  jax.block_until_ready(x)
  lap("first call")
  x, nfe = sampler(jax.random.fold_in(key, 0), score_fn)
  jax.block_until_ready(x)
  lap("sampling")
  first, second = times["first call"], times["sampling"]
  times["compilation"] = (max(first[0] - second[0], 0.0), max(first[1] - second[1], 0.0))
  samples = np.asarray(x)[:num_samples]
  with tempfile.TemporaryDirectory() as tmp:
    outputs.save_samples(samples, config, os.path.join(tmp, "samples"))
    lap("write PNG + npz")
  return dict(times=times, checkpoint_step=int(step), nfe=int(nfe), batch=batch,
              example_shape=list(example_shape),
              n_params=int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params))),
              backend=jax.default_backend())


# --- the driver ------------------------------------------------------------------------------
def median_pair(pairs: list[tuple[float, float]]) -> tuple[float, float]:
  return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def measure(args) -> tuple[dict, dict]:
  env = dict(os.environ)
  if args.single_thread:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                        " intra_op_parallelism_threads=1").strip()
  py = sys.executable
  config = os.path.abspath(args.config)
  workdir = os.path.abspath(args.workdir)
  startup, whole, splits = [], [], []
  for r in range(args.repeats):
    wall, cpu, _ = run_timed([py, "-c", "import sgm_jax.cli.sample, jax"], env)
    startup.append((wall, cpu))
    print(f"[{r + 1}/{args.repeats}] start-up {wall:.2f} s", flush=True)
    wall, cpu, out = run_timed(
        [py, os.path.join(ROOT, "main.py"), "--mode", "sample", "--config", config, "--workdir",
         workdir, "--sampler", args.sampler, "--num_steps", str(args.num_steps)], env)
    whole.append((wall, cpu))
    print(f"[{r + 1}/{args.repeats}] main.py --mode sample {wall:.2f} s: {out.strip()[-200:]}",
          flush=True)
    wall, cpu, out = run_timed(
        [py, os.path.abspath(__file__), "--split", "--config", config, "--workdir", workdir,
         "--sampler", args.sampler, "--num_steps", str(args.num_steps)], env)
    line = [l for l in out.splitlines() if l.startswith(_MARKER)][-1]
    result = json.loads(line[len(_MARKER):])
    result["total"] = (wall, cpu)
    splits.append(result)
    print(f"[{r + 1}/{args.repeats}] split {wall:.2f} s", flush=True)
  parts = {"start-up (python + imports)": median_pair(startup),
           "whole `main.py --mode sample`": median_pair(whole)}
  names = list(splits[0]["times"])
  split_parts = {name: median_pair([tuple(s["times"][name]) for s in splits]) for name in names}
  split_parts["split process total"] = median_pair([tuple(s["total"]) for s in splits])
  measured = [n for n in names if n != "compilation"]  # derived: first call - second call
  split_parts["interpreter start + exit"] = median_pair([
      tuple(s["total"][i] - sum(s["times"][n][i] for n in measured) for i in (0, 1))
      for s in splits])
  info = {k: splits[0][k] for k in ("checkpoint_step", "nfe", "batch", "example_shape",
                                    "n_params", "backend")}
  return dict(parts, split=split_parts), info


def report(measured: dict, info: dict, args) -> str:
  startup = measured["start-up (python + imports)"]
  whole = measured["whole `main.py --mode sample`"]
  sp = measured["split"]
  floor = [startup[i] + sp["compilation"][i] + sp["sampling"][i] for i in (0, 1)]
  ratio = [whole[i] / floor[i] if floor[i] > 0 else float("nan") for i in (0, 1)]
  lines = [f"`main.py --mode sample --sampler {args.sampler} --num_steps {args.num_steps}` on "
           f"{args.config} ({info['n_params'] / 1e6:.2f} M parameters, batch {info['batch']} of "
           f"{tuple(info['example_shape'])}, {info['nfe']} NFE, checkpoint step "
           f"{info['checkpoint_step']}, backend {info['backend']}); median of {args.repeats}"
           + (", XLA single-threaded" if args.single_thread else "") + f"; load average "
           f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}.", "",
           "| part | wall s | CPU s | share of whole (wall) |", "|---|---|---|---|"]

  def row(name, v, indent=""):
    lines.append(f"| {indent}{name} | {v[0]:.2f} | {v[1]:.2f} | {100 * v[0] / whole[0]:.0f} % |")

  row("start-up: python + imports (own process)", startup)
  row("**whole `main.py --mode sample`** (own process)", whole)
  lines.append("| split (one process doing what run_sample does): | | | |")
  for name in ("interpreter start + exit", "imports", "backend start", "config + build",
               "checkpoint restore", "sampler build", "compilation", "sampling", "write PNG + npz",
               "split process total"):
    row(name + (" (first call - second call)" if name == "compilation" else
                " (second call)" if name == "sampling" else ""), sp[name], "&nbsp;&nbsp;")
  lines += ["", f"whole / (start-up + compilation + sampling) = {whole[0]:.2f} / {floor[0]:.2f} = "
            f"**{ratio[0]:.2f}** wall (CPU: {whole[1]:.2f} / {floor[1]:.2f} = {ratio[1]:.2f}); "
            f"target <= {TARGET:.1f}: {'met' if ratio[0] <= TARGET else 'NOT met'}."]
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a workdir with a checkpoint")
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "fashion_mnist.py"))
  p.add_argument("--sampler", default="deis")
  p.add_argument("--num_steps", type=int, default=10)
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--single-thread", action="store_true",
                 help="XLA on one thread in every measured process (loaded machine)")
  p.add_argument("--out", help="also write the table to this markdown file")
  p.add_argument("--split", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.split:
    result = split(args.config, args.workdir, args.sampler, args.num_steps)
    print(_MARKER + json.dumps(result), flush=True)
    return 0
  if args.repeats < 1:
    p.error("--repeats must be >= 1")
  measured, info = measure(args)
  text = report(measured, info, args)
  print("\n" + text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
