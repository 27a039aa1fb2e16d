"""Samplers on a model this project trained: FD-EffNet, IS, out-of-range share and time per sampler.

    python benchmarks/trained_samplers.py --workdir runs/fashion_mnist [--config configs/fashion_mnist.py]

For each sampler (DEIS-10, DPM-Solver-10, UniPC-10, DDIM-50, the adaptive ODE (Dopri5), PC-500, and DEIS-10
with dynamic thresholding and the final denoising jump), with the config's options (its
sampling.score_scale among them), and for DEIS-10 and PC-500 once more without score scaling, it
runs `main.py --mode eval`'s sampling part (`sgm_jax.cli.evaluate.run_eval` with bits/dim and the denoising diagnostic off): `--num_samples` samples
(default 1,024) against the cached statistics of 2,048 training images. Every batch is saved, so
an interrupted run resumes. Prints a markdown table, writes it with the JSON to --out, and puts the
first 64 samples of each sampler run with the config's options side by side in --out.png.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from sgm_jax import io_utils  # noqa: E402
from sgm_jax.cli.evaluate import run_eval  # noqa: E402

SAMPLERS = (  # (label, sampler, steps, options)
    ("DEIS tAB3, 10 steps", "deis", 10, {}),
    ("DPM-Solver++(2M), 10 steps", "dpm_solver", 10, {}),
    ("UniPC-3 (bh2), 10 steps", "unipc", 10, {}),
    ("DDIM, 50 steps", "ddim", 50, {}),
    ("ODE, Dopri5 (rtol = atol = 1e-5)", "ode", 1, {}),
    ("predictor-corrector, 500 steps", "pc", 500, {}),
    ("DEIS 10 + dynamic thresholding + final denoising", "deis", 10,
     {"thresholding": "dynamic", "denoise": True}),
    ("DEIS tAB3, 10 steps, score_scale 1", "deis", 10, {"score_scale": 1}),
    ("predictor-corrector, 500 steps, score_scale 1", "pc", 500, {"score_scale": 1}),
)


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("benchmark_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a workdir trained by main.py")
  parser.add_argument("--config", default=os.path.join(_ROOT, "configs", "fashion_mnist.py"))
  parser.add_argument("--num_samples", type=int, default=1024)
  parser.add_argument("--only", nargs="*", default=None, help="sampler names to run")
  parser.add_argument("--out", default="/tmp/trained_samplers", help="stem of .md/.json/.png")
  args = parser.parse_args()

  base = load_config(args.config)
  with base.unlocked():
    base.eval.enable_bpd = False
    base.eval.enable_denoising_error = False
  rows, panels = [], []
  for label, name, steps, options in SAMPLERS:
    if args.only and name not in args.only:
      continue
    print(f"== {label}", flush=True)
    start = time.time()
    result = run_eval(copy.deepcopy(base), args.workdir, sampler_name=name,
                      num_steps=steps, num_samples=args.num_samples, **options)
    metric = next(k for k in result if k.startswith("FD"))
    is_key = next(k for k in result if k.startswith("IS (") and not k.endswith("std"))
    rows.append(dict(label=label, sampler=name, steps=steps, options=options,
                     nfe=result["nfe"], fd=result[metric], fd_name=metric, IS=result[is_key],
                     out_of_range=result["out_of_range"], max_abs=result["max_abs"],
                     seconds=time.time() - start, checkpoint_step=result["checkpoint_step"],
                     num_samples=result["num_samples"]))
    nfe = f"{result['nfe']:.0f}"
    if options:  # the figure: the samplers as the config runs them
      continue
    panels.append((result["samples_png"], f"{name} {steps if name != 'ode' else ''} "
                   f"({nfe} NFE): {100 * result['out_of_range']:.2f} % out".replace("  ", " ")))
  if not rows:
    raise SystemExit(f"no sampler matched --only {args.only}")
  lines = [f"checkpoint {rows[0]['checkpoint_step']} of {args.workdir}, {rows[0]['num_samples']} "
           f"samples per sampler vs 2,048 training images", "",
           f"| sampler | NFE | {rows[0]['fd_name']} | IS (EffNet classes) | pixels outside "
           "[-1.1, 1.1] before clipping | max abs value | wall time (s) |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['label']} | {r['nfe']:.0f} | {r['fd']:.1f} | {r['IS']:.2f} | "
                 f"{100 * r['out_of_range']:.2f} % | {r['max_abs']:.2f} | {r['seconds']:.0f} |")
  table = "\n".join(lines)
  print(table)
  with io_utils.atomic_write(args.out + ".md", "w") as f:
    f.write(table + "\n")
  with io_utils.atomic_write(args.out + ".json", "w") as f:
    json.dump(rows, f, indent=1)
  print("side by side:", io_utils.save_side_by_side(panels, args.out + ".png"))


if __name__ == "__main__":
  main()
