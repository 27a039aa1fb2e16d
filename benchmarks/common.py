"""What the sampler benchmarks share: the digits-GMM problem, its exact answer, metrics, tables.

The problem: the probability-flow ODE of the VP SDE (beta 0.1 -> 20) whose data distribution is
scikit-learn's 1797 8x8 digits (scaled to [-1, 1]) smoothed by N(0, std^2) -- a Gaussian mixture,
so its score is exact (`sgm_jax.toy.GaussianMixture`). Every solver starts from the same x_T at
t = T = 1 and stops at t = eps = 1e-3; its answer is compared with the exact flow map of x_T,
a float64 diffrax Dopri8 solve at rtol = atol = 1e-9.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

# --single-thread: on a loaded machine, run XLA on one thread and time with the process CPU clock,
# which other processes barely move. XLA reads its flags when the backend starts, so this must
# happen before jax computes anything.
SINGLE_THREAD = "--single-thread" in sys.argv
if SINGLE_THREAD:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                             " intra_op_parallelism_threads=1").strip()

import jax
import jax.numpy as jnp
import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run as `python benchmarks/x.py` from anywhere
  sys.path.insert(0, _ROOT)

from sgm_jax import sde_lib, toy  # noqa: E402

Partial = jax.tree_util.Partial

TARGET_NFES = (5, 10, 20, 50, 100)
QUICK_NFES = (10, 20)


def log(msg: str) -> None:
  print(msg, flush=True)


# --- the problem -------------------------------------------------------------------------------
def _oracle_score(gm: toy.GaussianMixture, x, t, *, sde):
  return gm.score(x, sde, t)


@dataclasses.dataclass
class Problem:
  """The benchmark problem: SDE, oracle mixture, the shared x_T and the exact flow map of x_T."""

  sde: sde_lib.SDE
  gm: toy.GaussianMixture
  x_T: np.ndarray            # float32 (B, 8, 8, 1), drawn from the prior
  t_start: float
  eps: float
  std: float
  seed: int
  ref: Optional[np.ndarray] = None   # float64 exact flow map of x_T from t_start to eps
  ref_seconds: float = 0.0

  @property
  def shape(self) -> tuple:
    return tuple(self.x_T.shape)

  @property
  def score_fn(self) -> Partial:
    """The exact score as a traceable Partial (mixture arrays are arguments, not constants).

    Built once per problem and cached, so every sampler call reuses its compiled program."""
    if not hasattr(self, "_score_fn"):
      import functools
      self._score_fn = Partial(functools.partial(_oracle_score, sde=self.sde), self.gm)
    return self._score_fn

  def describe(self) -> str:
    return (f"VPSDE(beta {self.sde.beta_min}->{self.sde.beta_max}), digits GMM "
            f"(K={self.gm.num_components}, std={self.std}), B={self.shape[0]}, "
            f"t: {self.t_start} -> {self.eps}, x_T seed {self.seed}")


def make_problem(batch: int = 256, std: float = 0.05, num_images: Optional[int] = None,
                 seed: int = 0, with_reference: bool = True) -> Problem:
  sde = sde_lib.VPSDE()
  gm = toy.GaussianMixture.from_digits(std=std, num_images=num_images)
  shape = (batch,) + gm.event_shape
  x_T = np.asarray(sde.prior_sampling(jax.random.PRNGKey(seed), shape), np.float32)
  problem = Problem(sde=sde, gm=gm, x_T=x_T, t_start=float(sde.T),
                    eps=float(sde.default_sampling_eps), std=std, seed=seed)
  if with_reference:
    start = time.perf_counter()
    problem.ref = exact_flow_map(gm, sde, x_T, problem.t_start, problem.eps)
    problem.ref_seconds = time.perf_counter() - start
  return problem


def to_float64(gm: toy.GaussianMixture) -> toy.GaussianMixture:
  """The mixture with float64 arrays; use inside `jax.enable_x64(True)`."""
  return jax.tree_util.tree_map(
      lambda a: jnp.asarray(a, jnp.float64) if a.dtype.kind == "f" else a, gm)


def exact_flow_map(gm: toy.GaussianMixture, sde, x_T, t_start: float, t_end: float,
                   tol: float = 1e-9) -> np.ndarray:
  """The probability-flow ODE of the oracle from t_start to t_end: float64 Dopri8 at rtol=atol=tol
  (the same reference as tests/oracle_flow.py)."""
  import diffrax
  with jax.enable_x64(True):
    gm64 = to_float64(gm)
    x_T = jnp.asarray(x_T, jnp.float64)
    shape = x_T.shape

    def vector_field(t, y, args):
      x = y.reshape(shape)
      tb = jnp.full((shape[0],), t, jnp.float64)
      return sde.probability_flow_drift(gm64.score_fn(sde), x, tb).reshape(-1)

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field), diffrax.Dopri8(), t0=t_start, t1=t_end, dt0=None,
        y0=x_T.reshape(-1), stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
        max_steps=100_000)
    return np.asarray(sol.ys[-1].reshape(shape), np.float64)


class Oracle64:
  """Host-side float64 oracle for the peer libraries: numpy in, numpy out (one jit each)."""

  def __init__(self, problem: Problem):
    self.sde = problem.sde
    with jax.enable_x64(True):
      gm64 = to_float64(problem.gm)
      sde = problem.sde
      self._eps = jax.jit(lambda x, t: gm64.eps(x, sde, t))
      self._denoise = jax.jit(lambda x, t: gm64.denoise(x, sde, t))
      self._t_from_rho = jax.jit(sde.t_from_rho)
      self._alpha = jax.jit(sde.alpha)
      self._rho = jax.jit(sde.rho)

  def _call(self, fn, *args) -> np.ndarray:
    with jax.enable_x64(True):
      return np.asarray(fn(*[np.asarray(a, np.float64) for a in args]), np.float64)

  def eps(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """E[z | x_t] at times t (B,)."""
    return self._call(self._eps, x, t)

  def denoise(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """E[x_0 | x_t] at times t (B,)."""
    return self._call(self._denoise, x, t)

  def t_from_rho(self, rho) -> np.ndarray:
    return self._call(self._t_from_rho, rho)

  def alpha(self, t) -> np.ndarray:
    return self._call(self._alpha, t)

  def rho(self, t) -> np.ndarray:
    return self._call(self._rho, t)


# --- metrics -----------------------------------------------------------------------------------
def rms_error(x: np.ndarray, ref: np.ndarray) -> float:
  """RMS per pixel of x - ref over the whole batch."""
  d = np.asarray(x, np.float64) - np.asarray(ref, np.float64)
  return float(np.sqrt(np.mean(d * d)))


def per_sample_errors(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
  """RMS per pixel of x - ref for each sample, (B,)."""
  d = (np.asarray(x, np.float64) - np.asarray(ref, np.float64)).reshape(x.shape[0], -1)
  return np.sqrt(np.mean(d * d, axis=1))


def nearest_digits(x: np.ndarray, gm: toy.GaussianMixture) -> tuple[np.ndarray, np.ndarray]:
  """For each sample, the index of the nearest digit (mixture mean) and the RMS per pixel to it."""
  xf = np.asarray(x, np.float64).reshape(x.shape[0], -1)
  mu = np.asarray(gm.means, np.float64).reshape(gm.num_components, -1)
  sq = (xf ** 2).sum(1)[:, None] - 2.0 * xf @ mu.T + (mu ** 2).sum(1)[None, :]
  index = np.argmin(sq, axis=1)
  return index, np.sqrt(np.maximum(sq[np.arange(len(index)), index], 0.0) / xf.shape[1])


def nearest_digit_rms(x: np.ndarray, gm: toy.GaussianMixture) -> float:
  """Mean over samples of the RMS per pixel to the nearest digit (mixture mean): a distributional
  check usable for stochastic samplers (the exact flow map gives about `std`)."""
  return float(np.mean(nearest_digits(x, gm)[1]))


def score_against_reference(row: "Row", x0: np.ndarray, problem: Problem,
                            deterministic: bool = True) -> None:
  """Fill the error columns of `row` for the answer x0 (B, ...).

  The flow map of a sharp mixture is nearly discontinuous at the borders between digits' basins:
  a solver that sends a few samples to a different digit than the exact flow map gets a large
  RMS error from those alone (one sample of 256 off by a whole digit: ~0.02). So besides the RMS
  over the batch it reports the median per-sample RMS error and the fraction of samples whose
  nearest digit differs from that of the exact flow map."""
  x0 = np.asarray(x0, np.float64)
  if not np.all(np.isfinite(x0)):
    row.note = (row.note + "; " if row.note else "") + "non-finite output"
    return
  row.nearest_rms = nearest_digit_rms(x0, problem.gm)
  if not deterministic:
    return
  row.error = rms_error(x0, problem.ref)
  row.median_error = float(np.median(per_sample_errors(x0, problem.ref)))
  if not hasattr(problem, "_ref_digits"):
    problem._ref_digits = nearest_digits(problem.ref, problem.gm)[0]
  row.switched = float(np.mean(nearest_digits(x0, problem.gm)[0] != problem._ref_digits))


# --- timing ------------------------------------------------------------------------------------
# Wall clock by default; with --single-thread (set up at import, above) the process CPU clock.
CLOCK = time.process_time if SINGLE_THREAD else time.perf_counter

def block(tree):
  return jax.block_until_ready(tree)


def median_wall(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
  """Median wall seconds of `repeats` calls of fn (already compiled), and the last result."""
  times, out = [], None
  for _ in range(max(1, repeats)):
    start = CLOCK()
    out = block(fn())
    times.append(CLOCK() - start)
  return statistics.median(times), out


def steps_for_nfe(nfe_of: Callable[[int], int], target: int, max_steps: int = 2000) -> int:
  """num_steps whose nfe is nearest to target (ties: fewer evaluations)."""
  best, best_key = 1, None
  for n in range(1, max_steps + 1):
    nfe = nfe_of(n)
    key = (abs(nfe - target), nfe)
    if best_key is None or key < best_key:
      best, best_key = n, key
    if nfe > target + (best_key[0] if best_key else 0) + 8:
      break
  return best


# --- a real small network ----------------------------------------------------------------------
NETWORK = dict(patch_size=2, hidden_size=64, mix_patch_size=64, mix_hidden_size=128, num_blocks=2,
               embed_dim=64)
# The output layer's random parameters are scaled by this: at full scale a random network's eps
# makes the probability-flow ODE very stiff (Dopri5 needs ~3500 evaluations at tol 1e-5 instead of
# ~120), which only slows the adaptive timings down. The cost of a call is unchanged: parameters
# are traced arguments, never constants.
OUTPUT_SCALE = 0.01


def make_network_score(sde, shape: tuple, seed: int = 1) -> tuple[Partial, str]:
  """score_fn of sgm_jax.models.small.Mixer (random parameters) as used for a trained VP model:
  continuous time labels, eps output divided by sigma(t). Returns (score_fn, description)."""
  from sgm_jax import score as score_lib
  from sgm_jax.models import small
  model = small.Mixer(**NETWORK)
  x = jnp.zeros(shape, jnp.float32)
  variables = model.init(jax.random.PRNGKey(seed), x, jnp.full((shape[0],), 0.5))
  params = dict(variables["params"])
  params["ConvTranspose_0"] = jax.tree_util.tree_map(lambda a: a * OUTPUT_SCALE,
                                                     params["ConvTranspose_0"])
  variables = {"params": params}
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(variables))
  fn = score_lib.get_score_fn(sde, model, variables, continuous=True)
  cfg = ", ".join(f"{k}={v}" for k, v in NETWORK.items())
  return fn, (f"sgm_jax.models.small.Mixer({cfg}), {n_params / 1e3:.0f}k params, random init "
              f"(output layer x{OUTPUT_SCALE:g})")


@jax.jit
def _call_score(score_fn, x, t):
  return score_fn(x, t)


def score_call_seconds(score_fn, x: np.ndarray, repeats: int = 30) -> float:
  """Median wall seconds of one jitted score_fn(x, t) call at batch x (after compilation)."""
  x = jnp.asarray(x)
  t = jnp.full((x.shape[0],), 0.5, x.dtype)
  block(_call_score(score_fn, x, t))
  seconds, _ = median_wall(lambda: _call_score(score_fn, x, t), repeats)
  return seconds


# --- tables ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
  library: str
  solver: str
  options: str
  target_nfe: str
  nfe: Optional[int] = None
  error: Optional[float] = None        # RMS vs the exact flow map; None: stochastic / failed
  median_error: Optional[float] = None  # median over samples of the per-sample RMS error
  switched: Optional[float] = None     # fraction of samples ending nearest another digit
  nearest_rms: Optional[float] = None  # mean RMS to the nearest digit
  wall_ms: Optional[float] = None      # with the small network, median
  ratio: Optional[float] = None        # wall / (nfe x one network call)
  note: str = ""


COLUMNS = ("library", "solver", "options", "target NFE", "NFE", "RMS error vs exact flow",
           "median sample error", "other digit", "nearest-digit RMS", "wall ms (net)",
           "overhead ratio", "note")


def _fmt(v, spec: str) -> str:
  if v is None:
    return "-"
  return format(v, spec)


def row_cells(r: Row) -> list[str]:
  error = "stochastic" if (r.error is None and r.note.startswith("stochastic")) else _fmt(r.error, ".2e")
  switched = "-" if r.switched is None else f"{100 * r.switched:.1f}%"
  return [r.library, r.solver, r.options, str(r.target_nfe), _fmt(r.nfe, "d"), error,
          _fmt(r.median_error, ".2e"), switched, _fmt(r.nearest_rms, ".4f"), _fmt(r.wall_ms, ".1f"),
          _fmt(r.ratio, ".3f"), r.note]


def markdown_table(rows: Sequence[Row]) -> str:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
  return "\n".join(lines)


def best_by_nfe(rows: Sequence[Row], targets: Sequence) -> str:
  """For each target NFE and library, the deterministic row with the lowest RMS error and the one
  with the lowest median per-sample error (which basin switches do not dominate)."""
  lines = ["| target NFE | library | criterion | best solver | NFE | RMS error | median sample error "
           "| other digit |", "|---|---|---|---|---|---|---|---|"]
  for target in targets:
    for lib in sorted({r.library for r in rows} - {"baseline"}):
      cands = [r for r in rows if r.library == lib and str(r.target_nfe) == str(target)
               and r.error is not None and np.isfinite(r.error)]
      for criterion, key in (("RMS error", lambda r: r.error),
                             ("median error", lambda r: r.median_error)):
        if cands:
          b = min(cands, key=key)
          c = row_cells(b)
          lines.append(f"| {target} | {lib} | {criterion} | {b.solver} ({b.options}) | {b.nfe} "
                       f"| {c[5]} | {c[6]} | {c[7]} |")
  return "\n".join(lines)


def pivot_table(rows: Sequence[Row], targets: Sequence) -> str:
  """One line per solver variant, one column per target NFE: 'RMS / median (other digit)' for
  deterministic rows, the nearest-digit RMS for stochastic ones; the NFE when it differs."""
  keys, cells = [], {}
  for r in rows:
    if r.library == "baseline" or str(r.target_nfe) not in [str(t) for t in targets]:
      continue
    key = (r.library, r.solver, r.options)
    if key not in cells:
      keys.append(key)
      cells[key] = {}
    if r.error is not None:
      text = f"{r.error:.1e} / {r.median_error:.1e} ({100 * r.switched:.0f}%)"
    elif r.nearest_rms is not None:
      text = f"nearest-digit {r.nearest_rms:.3f}"
    else:
      text = "failed"
    if r.nfe is not None and str(r.nfe) != str(r.target_nfe):
      text += f" [nfe {r.nfe}]"
    cells[key][str(r.target_nfe)] = text
  lines = ["| library | solver | options | " + " | ".join(f"NFE {t}" for t in targets) + " |",
           "|---|---|---|" + "---|" * len(targets)]
  for key in keys:
    lines.append("| " + " | ".join(key) + " | "
                 + " | ".join(cells[key].get(str(t), "-") for t in targets) + " |")
  return "\n".join(lines)


def environment() -> dict:
  env = {"python": platform.python_version(), "jax": jax.__version__,
         "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
         "machine": platform.machine()}
  try:
    env["loadavg"] = os.getloadavg()
  except OSError:
    pass
  return env


def write_outputs(out: str, title: str, rows: Sequence[Row], extra_markdown: str = "",
                  meta: Optional[dict] = None) -> tuple[str, str]:
  """Write OUT.md (markdown tables) and OUT.json (rows and metadata); OUT may end in .md/.json."""
  stem = out[:-3] if out.endswith(".md") else out[:-5] if out.endswith(".json") else out
  directory = os.path.dirname(stem)
  if directory:
    os.makedirs(directory, exist_ok=True)
  md_path, json_path = stem + ".md", stem + ".json"
  with open(md_path, "w") as f:
    f.write(f"# {title}\n\n{markdown_table(rows)}\n")
    if extra_markdown:
      f.write("\n" + extra_markdown.rstrip() + "\n")
  with open(json_path, "w") as f:
    json.dump({"title": title, "meta": meta or {}, "rows": [dataclasses.asdict(r) for r in rows]},
              f, indent=1, default=float)
  return md_path, json_path


def read_rows(json_path: str) -> list[Row]:
  with open(json_path) as f:
    return [Row(**r) for r in json.load(f)["rows"]]


def _render_main(argv: Sequence[str]) -> int:
  """python benchmarks/common.py A.json [B.json ...]: one merged markdown table and the best
  solver per target NFE, from the JSON files that samplers.py and peers.py write with --out."""
  import argparse
  p = argparse.ArgumentParser(description=_render_main.__doc__)
  p.add_argument("json", nargs="+")
  p.add_argument("--nfe", nargs="+", default=["5", "10", "20", "50", "100"])
  p.add_argument("--best-only", action="store_true")
  p.add_argument("--pivot", action="store_true", help="one line per solver, one column per NFE")
  args = p.parse_args(argv)
  rows = [r for path in args.json for r in read_rows(path)]
  if args.pivot:
    print(pivot_table(rows, args.nfe) + "\n")
  elif not args.best_only:
    print(markdown_table(rows) + "\n")
  print(best_by_nfe(rows, args.nfe))
  return 0


if __name__ == "__main__":
  sys.exit(_render_main(sys.argv[1:]))
