"""Sample quality against score evaluations on trained workdirs, in the data's own features.

    python benchmarks/nfe_frontier.py run --out runs/frontier.jsonl --num-samples 1024 \\
        --workdirs runs/seed1 runs/seed2 runs/seed3 --specs deis:10 unipc:5 edm_sde:15:S_churn=5
    python benchmarks/nfe_frontier.py table runs/frontier.jsonl      # mean and spread per spec

A spec is SAMPLER:STEPS[:OPTION=VALUE...] (values as JSON, else strings). Each (workdir, spec)
draws --num-samples samples with seed 0 through `sgm_jax.load(workdir).sample_with_info` (the
workdir's config, its score scale included, with the spec's options over it) and scores them with
the dataset's domain classifier (sgm_jax/evaluation/domain.py) against the whole test split:
FD-Domain, precision and recall (k = 3, as many test images as samples), the share of pixels
outside [-1.1, 1.1] and the NFE. One JSON line per run is appended to --out, so an interrupted
run keeps what it finished; `table` prints one markdown row per spec: the mean over workdirs and
the min-max of FD-Domain. FD depends on the number of samples: compare rows of one --num-samples.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time

import numpy as np


def parse_spec(spec: str) -> tuple[str, int, dict]:
  parts = spec.split(":")
  if len(parts) < 2 or not parts[1].isdigit():
    raise SystemExit(f"error: a spec is SAMPLER:STEPS[:OPTION=VALUE...], got {spec!r}")
  options = {}
  for item in parts[2:]:
    if "=" not in item:
      raise SystemExit(f"error: option {item!r} of spec {spec!r} is not OPTION=VALUE")
    key, value = item.split("=", 1)
    try:
      options[key] = json.loads(value)
    except json.JSONDecodeError:
      options[key] = value
  return parts[0], int(parts[1]), options


def run(workdirs: list[str], specs: list[str], num_samples: int, out: str) -> None:
  import sgm_jax
  from sgm_jax import datasets
  from sgm_jax.cli import outputs
  from sgm_jax.evaluation import domain, metrics
  parsed = [parse_spec(s) for s in specs]  # every spec checked before any work
  for workdir in workdirs:
    model = sgm_jax.load(workdir)
    dataset = datasets.get_dataset(datasets.from_config(model.config))
    extractor = domain.get_domain_extractor(str(model.config.data.dataset), dataset)
    test_images, _ = dataset.source("test").fetch(np.arange(dataset.num_examples("test")))
    reference = extractor(np.asarray(test_images))["features"]
    mu_ref, cov_ref = metrics.gaussian_statistics(reference)
    centered = bool(model.config.data.centered)
    for spec, (name, steps, options) in zip(specs, parsed):
      start = time.time()
      drawn = model.sample_with_info(num_samples, name, steps, 0, progress=True, **options)
      seconds = time.time() - start
      x = np.asarray(drawn.samples)
      x01 = np.clip((x + 1) / 2 if centered else x, 0, 1)
      feats = extractor(x01)["features"]
      mu, cov = metrics.gaussian_statistics(feats)
      precision, recall = metrics.precision_recall(reference[:num_samples], feats)
      row = dict(workdir=workdir, step=model.step, spec=spec, n=num_samples,
                 nfe=float(drawn.nfe), fd=float(metrics.frechet_distance(mu, cov, mu_ref, cov_ref)),
                 precision=precision, recall=recall,
                 out_of_range=outputs.out_of_range_share(x, centered),
                 max_abs=float(np.abs(x).max()), seconds=seconds, options=drawn.options)
      print(json.dumps(row), flush=True)
      with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


def table(path: str) -> str:
  rows = collections.defaultdict(list)
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      rows[(row["spec"], row["n"])].append(row)
  lines = ["| spec | samples | checkpoints | NFE | FD-Domain mean (min-max) | precision | recall | "
           "pixels out of range |", "|---|---|---|---|---|---|---|---|"]
  for (spec, n), rs in rows.items():
    fd = [r["fd"] for r in rs]
    mean = lambda k: float(np.mean([r[k] for r in rs]))
    lines.append(f"| {spec} | {n} | {len(rs)} | {mean('nfe'):.0f} | {np.mean(fd):.1f} "
                 f"({min(fd):.1f}-{max(fd):.1f}) | {mean('precision'):.3f} | {mean('recall'):.3f} "
                 f"| {100 * mean('out_of_range'):.2f} % |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  r = sub.add_parser("run", help="sample and score; appends JSON lines to --out")
  r.add_argument("--workdirs", nargs="+", required=True)
  r.add_argument("--specs", nargs="+", required=True)
  r.add_argument("--num-samples", type=int, default=1024)
  r.add_argument("--out", required=True)
  t = sub.add_parser("table", help="markdown table of a --out file")
  t.add_argument("path")
  args = p.parse_args(argv)
  if args.command == "run":
    run(args.workdirs, args.specs, args.num_samples, args.out)
  else:
    print(table(args.path))
  return 0


if __name__ == "__main__":
  sys.exit(main())
