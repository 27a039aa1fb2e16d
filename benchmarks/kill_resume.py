"""kill -9 a training run at random points, resume each time, compare with an uninterrupted run.

    python benchmarks/kill_resume.py --kills 10 --n_iters 400

Uses the tiny run of tests/toy_train_run.py (preemption snapshot every 2 steps). After every kill
each checkpoint in the workdir must still restore; at the end the parameters, EMA and optimizer
state must be bit-identical to the uninterrupted run's, and so must the logged loss curve.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "toy_train_run.py")
sys.path.insert(0, ROOT)


def _load(path):
  with np.load(path) as f:
    return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def _all_checkpoints_readable(workdir: str) -> tuple[int, int]:
  """Restores every checkpoint in `workdir`: (how many, the latest step)."""
  import orbax.checkpoint as ocp
  from sgm_jax.checkpoints import CheckpointStore
  store = CheckpointStore(workdir)
  try:
    steps = store.all_steps()
    for step, _ in steps:
      manager = store.periodic if step in store.periodic.all_steps() else store.snapshot
      restored = manager.restore(step, args=ocp.args.StandardRestore())  # raises if unreadable
      assert int(restored["step"]) == step, (step, restored["step"])
    return len(steps), max((step for step, _ in steps), default=0)
  finally:
    store.close()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kills", type=int, default=10)
  parser.add_argument("--n_iters", type=int, default=400)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  rng = random.Random(args.seed)
  with tempfile.TemporaryDirectory() as tmp:
    ref_out = os.path.join(tmp, "ref.npz")
    t0 = time.time()
    subprocess.run([sys.executable, SCRIPT, os.path.join(tmp, "ref"), str(args.n_iters),
                    "--out", ref_out], check=True, capture_output=True)
    run_seconds = time.time() - t0
    t0 = time.time()
    subprocess.run([sys.executable, SCRIPT, os.path.join(tmp, "startup"), "1"], check=True,
                   capture_output=True)
    startup = time.time() - t0  # imports, compilation, first step
    train_seconds = max(run_seconds - startup, 1.0)
    print(f"uninterrupted run: {run_seconds:.1f} s ({startup:.1f} s of it start-up)", flush=True)
    work = os.path.join(tmp, "killed")
    outcomes = []
    for k in range(args.kills):
      proc = subprocess.Popen([sys.executable, SCRIPT, work, str(args.n_iters)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
      # Each kill lands after start-up, about 1 / (kills + 1) of the training further on.
      delay = startup + rng.uniform(0.5, 1.5) * train_seconds / (args.kills + 1)
      try:
        proc.wait(timeout=delay)
        outcomes.append(f"kill {k + 1}: run finished before the kill at {delay:.1f} s")
        break
      except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
      readable, latest = _all_checkpoints_readable(work)
      outcomes.append(f"kill {k + 1} after {delay:.1f} s: {readable} checkpoints up to step "
                      f"{latest}, all readable")
      print(outcomes[-1], flush=True)
    out = os.path.join(tmp, "resumed.npz")
    subprocess.run([sys.executable, SCRIPT, work, str(args.n_iters), "--out", out], check=True,
                   capture_output=True)
    same = all(np.array_equal(a, b) for a, b in zip(_load(ref_out), _load(out)))
    log = lambda d: np.genfromtxt(os.path.join(d, "train_log.csv"), delimiter=",", names=True)["loss"]
    same_log = np.array_equal(log(os.path.join(tmp, "ref")), log(work))
    kills = sum(o.startswith("kill") and "finished" not in o for o in outcomes)
    print(f"{kills} kills; final state bit-identical to the uninterrupted run: {same}; loss log "
          f"identical: {same_log}")
    return 0 if same and same_log else 1


if __name__ == "__main__":
  sys.exit(main())
