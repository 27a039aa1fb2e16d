"""A time grid fitted to one checkpoint (sgm_jax.sampling.tuning.tune_time_grid), printed as the
JSON list that `time_grid=` takes (e.g. in a benchmarks/nfe_frontier.py spec):

    python benchmarks/tune_grid.py --workdir runs/seed1 --sampler unipc --num-steps 5
"""
import argparse
import json
import time


def main(argv=None) -> list:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a workdir of main.py --mode train/import")
  parser.add_argument("--sampler", default="unipc", help="a fixed-grid sampler (default unipc)")
  parser.add_argument("--num-steps", type=int, default=5)
  parser.add_argument("--max-evals", type=int, default=100, help="candidates (default 100)")
  parser.add_argument("--num-warmup", type=int, default=128, help="warm-up draws (default 128)")
  parser.add_argument("--seed", type=int, default=1, help="key of the warm-up draws")
  args = parser.parse_args(argv)
  import jax
  import sgm_jax
  from sgm_jax.sampling import tuning
  model = sgm_jax.load(args.workdir)
  shape = (args.num_warmup,) + model.example_shape
  start = time.time()
  grid = tuning.tune_time_grid(args.sampler, model.sde, model.score_fn, shape, args.num_steps,
                               key=jax.random.PRNGKey(args.seed), num_warmup=args.num_warmup,
                               max_evals=args.max_evals, verbose=True)
  times = [round(float(t), 6) for t in grid]
  print(f"tuned in {time.time() - start:.0f} s; time_grid=" + json.dumps(times).replace(" ", ""))
  return times


if __name__ == "__main__":
  main()
