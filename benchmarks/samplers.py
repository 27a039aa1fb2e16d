"""Accuracy and speed of every sgm_jax sampler on the exact digits-GMM problem.

    python benchmarks/samplers.py                 # full table (about 10 minutes on 2 idle cores)
    python benchmarks/samplers.py --quick         # smoke run: a few samplers, NFE 10 and 20, B=64
    python benchmarks/samplers.py --out /tmp/samplers     # also write /tmp/samplers.md and .json
    python benchmarks/samplers.py --grids                 # + the main samplers on every time grid
    python benchmarks/samplers.py --tuned --nfe 5 10      # + grids tuned to the score (tuning.py)
    python benchmarks/samplers.py --single-thread         # loaded machine: 1 XLA thread, CPU clock

For every sampler variant and NFE in {5, 10, 20, 50, 100} (num_steps chosen so that the NFE is the
nearest one the sampler can hit) it reports:
  - the RMS per pixel between the sampler's x0 and the exact flow map of the same x_T from T to
    eps (deterministic samplers; stochastic ones only get the distributional column),
  - the mean RMS to the nearest digit (distributional; the exact flow map gives about std),
  - the wall time with a real small network as score (sgm_jax.models.small.Mixer, random
    parameters): median of a few calls after compilation,
  - the overhead ratio wall / (nfe x wall of one jitted network call): 1.00 means the sampler costs
    nothing besides its network evaluations.
Then diffrax Dopri5 vs score_sde's scipy RK45 (host round trip per evaluation) at rtol=atol=1e-5.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback
from typing import Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (also puts the repository root on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sgm_jax import sampling  # noqa: E402
from sgm_jax.sampling import tuning  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Spec:
  """One sampler variant: get_sampler(name, ..., **options); nfe(num_steps) as documented."""

  label: str
  name: str
  options: tuple = ()
  nfe: Optional[Callable[[int], int]] = None  # None: adaptive (NFE set by the tolerance)
  stochastic: bool = False
  quick: bool = False

  @property
  def kwargs(self) -> dict:
    return dict(self.options)

  def options_text(self) -> str:
    return ", ".join(f"{k}={v}" for k, v in self.options) or "defaults"


def _per_step(k: int, offset: int = 0) -> Callable[[int], int]:
  return lambda n: k * n + offset


SPECS = (
    Spec("ddim", "ddim", (), _per_step(1), quick=True),
    Spec("dpm_solver++(2M)", "dpm_solver", (), _per_step(1), quick=True),
    Spec("dpm_solver++(2M)", "dpm_solver", (("time_grid", "quadratic"),), _per_step(1)),
    Spec("dpm_solver++(3M)", "dpm_solver", (("order", 3),), _per_step(1)),
    Spec("dpm_solver++(3M)", "dpm_solver", (("order", 3), ("time_grid", "quadratic")),
         _per_step(1)),
    Spec("unipc", "unipc", (), _per_step(1)),
    Spec("unipc", "unipc", (("time_grid", "quadratic"),), _per_step(1)),
    Spec("unipc", "unipc", (("variant", "bh1"),), _per_step(1)),
    Spec("unipc", "unipc", (("order", 2),), _per_step(1)),
    Spec("unipc", "unipc", (("order", 2), ("time_grid", "quadratic")), _per_step(1)),
    Spec("unipc", "unipc", (("order", 2), ("lower_order_final", False)), _per_step(1)),
    Spec("heun (EDM)", "heun", (), _per_step(2, -1)),
    Spec("deis tAB1", "deis", (("method", "tab"), ("order", 1)), _per_step(1)),
    Spec("deis tAB2", "deis", (("method", "tab"), ("order", 2)), _per_step(1)),
    Spec("deis tAB3", "deis", (("method", "tab"), ("order", 3)), _per_step(1), quick=True),
    Spec("deis rhoAB3", "deis", (("method", "rhoab"), ("order", 3)), _per_step(1)),
    Spec("deis rhoRK heun", "deis", (("method", "rhork"), ("tableau", "heun")), _per_step(2)),
    Spec("deis rhoRK kutta3", "deis", (("method", "rhork"), ("tableau", "kutta3")), _per_step(3)),
    Spec("deis rhoRK rk4", "deis", (("method", "rhork"), ("tableau", "rk4")), _per_step(4)),
    Spec("ipndm", "ipndm", (), _per_step(1), quick=True),
    Spec("ode euler", "ode", (("solver", "euler"),), _per_step(1)),
    Spec("ode heun", "ode", (("solver", "heun"),), _per_step(2)),
    Spec("ode rk4", "ode", (("solver", "rk4"),), _per_step(4)),
    Spec("pc (reverse diffusion + langevin)", "pc", (), _per_step(2), stochastic=True),
    Spec("milstein", "milstein", (), _per_step(1), stochastic=True),
)

# --grids: these samplers again on every time grid of sgm_jax.sampling.schedules
GRID_SWEEP = ("ddim", "dpm_solver++(2M)", "dpm_solver++(3M)", "unipc", "deis tAB3", "deis rhoAB3",
              "ipndm", "heun (EDM)")
GRIDS = ("uniform", "quadratic", "log_rho", "polynomial_rho")

# --tuned: these (label, options) again on grids tuned to the problem's score
# (sgm_jax.sampling.tuning), from warm-up draws of x_T with a seed other than the scored batch's,
# at the NFEs of --tune-nfe
TUNED = (("unipc", ()), ("unipc", (("order", 2), ("lower_order_final", False))))
TUNED_NFES = (5, 10)
TUNE_SEED_OFFSET = 1000

ADAPTIVE_TOLS = (1e-2, 1e-3, 1e-4, 1e-5)
QUICK_ADAPTIVE_TOLS = (1e-3,)


@dataclasses.dataclass(frozen=True)
class TunedGrid:
  """The time_grid option of a --tuned case: tune_time_grid's budget; the grid is made in run_case."""

  num_warmup: int
  max_evals: int

  def __str__(self):
    return f"tuned (warm-up {self.num_warmup}, {self.max_evals} runs)"


def run_case(problem: common.Problem, spec: Spec, num_steps: int, options: dict, target,
             net_score, net_call_s: float, repeats: int, with_net: bool) -> common.Row:
  row = common.Row("sgm_jax", spec.label, spec.options_text() if not options.get("rtol") else
                   f"rtol=atol={options['rtol']:g}", str(target))
  key = jax.random.PRNGKey(1)
  x_T = jnp.asarray(problem.x_T)
  if isinstance(options.get("time_grid"), TunedGrid):
    request, start = options["time_grid"], time.perf_counter()
    options = dict(options, time_grid=tuning.tune_time_grid(
        spec.name, problem.sde, problem.score_fn, problem.shape, num_steps,
        key=jax.random.PRNGKey(problem.seed + TUNE_SEED_OFFSET), num_warmup=request.num_warmup,
        max_evals=request.max_evals, verbose=True,
        **{k: v for k, v in options.items() if k != "time_grid"}))
    row.note = f"grid tuned in {time.perf_counter() - start:.0f} s"
  sampler = sampling.get_sampler(spec.name, problem.sde, problem.shape, num_steps=num_steps,
                                 **options)
  x0, nfe = common.block(sampler(key, problem.score_fn, x_T=x_T))
  row.nfe = int(nfe)
  if spec.stochastic:
    row.note = "stochastic"
  common.score_against_reference(row, np.asarray(x0), problem, deterministic=not spec.stochastic)
  if spec.nfe is not None and spec.nfe(num_steps) != row.nfe:
    row.note = (row.note + "; " if row.note else "") + f"nfe formula says {spec.nfe(num_steps)}"
  if with_net:
    common.block(sampler(key, net_score, x_T=x_T))  # compile
    wall, (_, nfe_net) = common.median_wall(lambda: sampler(key, net_score, x_T=x_T), repeats)
    row.wall_ms = wall * 1e3
    row.ratio = wall / (int(nfe_net) * local_call_seconds(net_score, x_T, net_call_s))
    if int(nfe_net) != row.nfe:
      row.note = (row.note + "; " if row.note else "") + f"nfe with net {int(nfe_net)}"
  return row


def local_call_seconds(net_score, x_T, first_estimate: float) -> float:
  """One network call's time measured right now, next to the sampler's timing (the load of a
  shared machine drifts): the median of about 0.2 s worth of calls (5 to 30)."""
  calls = max(5, min(30, int(0.2 / max(first_estimate, 1e-4))))
  return common.score_call_seconds(net_score, x_T, repeats=calls)


def scan_floor(problem: common.Problem, net_score, nfe: int, net_call_s: float,
               repeats: int) -> common.Row:
  """The floor of any scan-based sampler: one jitted lax.scan of nfe network calls and an axpy."""
  B = problem.shape[0]

  @jax.jit
  def run(score_fn, x):
    def body(x, t):
      return x - 1e-3 * score_fn(x, jnp.full((B,), t, x.dtype)), None
    return jax.lax.scan(body, x, jnp.linspace(1.0, problem.eps, nfe, dtype=x.dtype))[0]

  x_T = jnp.asarray(problem.x_T)
  common.block(run(net_score, x_T))
  wall, _ = common.median_wall(lambda: run(net_score, x_T), repeats)
  return common.Row("baseline", "lax.scan of NFE network calls", "-", str(nfe), nfe,
                    wall_ms=wall * 1e3,
                    ratio=wall / (nfe * local_call_seconds(net_score, x_T, net_call_s)),
                    note="floor for scan-based samplers")


def diffrax_vs_scipy(problem: common.Problem, net_score, with_net: bool, repeats: int) -> tuple[list, str]:
  """Dopri5 in one diffrax solve vs score_sde's scipy RK45 with a host round trip per evaluation,
  both at rtol = atol = 1e-5 with the same jitted score (float32)."""
  from scipy import integrate
  sde, shape, eps = problem.sde, problem.shape, problem.eps
  tol = 1e-5
  results = []
  scores = [("oracle", problem.score_fn)] + ([("network", net_score)] if with_net else [])
  for score_name, score_fn in scores:
    key = jax.random.PRNGKey(1)
    x_T = jnp.asarray(problem.x_T)
    sampler = sampling.get_sampler("ode", sde, shape, num_steps=1, solver="dopri5", rtol=tol,
                                   atol=tol)
    common.block(sampler(key, score_fn, x_T=x_T))
    wall_d, (x_d, nfe_d) = common.median_wall(lambda: sampler(key, score_fn, x_T=x_T), repeats)

    @jax.jit
    def drift(score_fn, x, t):
      return sde.probability_flow_drift(score_fn, x, jnp.full((x.shape[0],), t, x.dtype))

    def ode_func(t, y):  # score_sde's sampling.get_ode_sampler: flatten, host round trip
      x = jnp.asarray(y.reshape(shape), jnp.float32)
      return np.asarray(drift(score_fn, x, jnp.float32(t)), np.float64).reshape(-1)

    common.block(drift(score_fn, x_T, jnp.float32(0.5)))
    scipy_runs = max(1, min(repeats, 2))
    walls = []
    for _ in range(scipy_runs):
      start = common.CLOCK()
      sol = integrate.solve_ivp(ode_func, (sde.T, eps), problem.x_T.reshape(-1).astype(np.float64),
                                rtol=tol, atol=tol, method="RK45")
      walls.append(common.CLOCK() - start)
    wall_s = float(np.median(walls))
    x_s = sol.y[:, -1].reshape(shape)
    res = dict(score=score_name, tol=tol, diffrax_nfe=int(nfe_d), diffrax_ms=wall_d * 1e3,
               scipy_nfe=int(sol.nfev), scipy_ms=wall_s * 1e3, speedup=wall_s / wall_d,
               per_eval_ratio=(wall_s / sol.nfev) / (wall_d / int(nfe_d)))
    if score_name == "oracle":
      res["diffrax_error"] = common.rms_error(np.asarray(x_d), problem.ref)
      res["scipy_error"] = common.rms_error(x_s, problem.ref)
    common.log(f"  diffrax Dopri5 vs scipy RK45 ({score_name}): nfe {res['diffrax_nfe']} vs "
               f"{res['scipy_nfe']}, {res['diffrax_ms']:.0f} ms vs {res['scipy_ms']:.0f} ms "
               f"(scipy / diffrax = {res['speedup']:.2f}x, per evaluation {res['per_eval_ratio']:.2f}x)"
               + (f", error {res['diffrax_error']:.2e} vs {res['scipy_error']:.2e}"
                  if "diffrax_error" in res else ""))
    results.append(res)
  lines = ["| score | solver | NFE | wall ms | RMS error vs exact flow |", "|---|---|---|---|---|"]
  for r in results:
    e_d = f"{r['diffrax_error']:.2e}" if "diffrax_error" in r else "-"
    e_s = f"{r['scipy_error']:.2e}" if "scipy_error" in r else "-"
    lines.append(f"| {r['score']} | diffrax Dopri5 (one jitted solve) | {r['diffrax_nfe']} | "
                 f"{r['diffrax_ms']:.0f} | {e_d} |")
    lines.append(f"| {r['score']} | scipy RK45 (host round trip per eval) | {r['scipy_nfe']} | "
                 f"{r['scipy_ms']:.0f} | {e_s} |")
  lines.append("")
  lines += [f"- {r['score']}: scipy / diffrax wall = {r['speedup']:.2f}x, per evaluation "
            f"{r['per_eval_ratio']:.2f}x" for r in results]
  return results, "\n".join(lines)


def ratio_summary(rows) -> str:
  """Per sampler: the overhead ratio at each NFE, and relative to the lax.scan floor (the same
  per-evaluation cost as a bare scan of network calls = 1.00)."""
  floor = {r.target_nfe: r.wall_ms / r.nfe for r in rows if r.library == "baseline" and r.wall_ms}
  lines = ["| sampler | options | overhead ratio by NFE | median | median vs lax.scan floor |",
           "|---|---|---|---|---|"]
  groups = {}
  for r in rows:
    if r.library == "sgm_jax" and r.ratio is not None:
      groups.setdefault((r.solver, r.options if r.target_nfe != "adaptive" else "adaptive"), []).append(r)
  for (solver, options), rs in groups.items():
    by_nfe = ", ".join(f"{r.nfe}: {r.ratio:.3f}" for r in rs)
    vs_floor = [(r.wall_ms / r.nfe) / floor[r.target_nfe] for r in rs if r.target_nfe in floor]
    lines.append(f"| {solver} | {options} | {by_nfe} | {np.median([r.ratio for r in rs]):.3f} | "
                 + (f"{np.median(vs_floor):.3f}" if vs_floor else "-") + " |")
  return "\n".join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="few samplers, NFE 10 and 20, B=64, 1 repeat")
  p.add_argument("--out", default=None, help="write OUT.md and OUT.json")
  p.add_argument("--batch", type=int, default=None, help="batch size (256; --quick: 64)")
  p.add_argument("--nfe", type=int, nargs="+", default=None, help="target NFEs (5 10 20 50 100)")
  p.add_argument("--only", nargs="+", default=None, help="run only samplers whose label contains one of these")
  p.add_argument("--repeats", type=int, default=None, help="timed calls per case (3; --quick: 1)")
  p.add_argument("--grids", action="store_true",
                 help=f"also run {', '.join(GRID_SWEEP)} on every time grid {GRIDS}")
  p.add_argument("--tuned", action="store_true",
                 help="also run unipc (defaults; order 2 without lower_order_final) on grids "
                      "tuned by sgm_jax.sampling.tuning")
  p.add_argument("--tune-nfe", type=int, nargs="+", default=list(TUNED_NFES),
                 help="target NFEs of the --tuned cases")
  p.add_argument("--tune-warmup", type=int, default=tuning.DEFAULT_WARMUP,
                 help="warm-up draws of x_T for --tuned")
  p.add_argument("--tune-evals", type=int, default=tuning.DEFAULT_MAX_EVALS,
                 help="sampler runs per tuned grid for --tuned")
  p.add_argument("--std", type=float, default=0.05, help="std of the mixture components")
  p.add_argument("--seed", type=int, default=0, help="seed of x_T")
  p.add_argument("--single-thread", action="store_true",
                 help="XLA on one thread, times from the process CPU clock (for loaded machines)")
  p.add_argument("--no-net", action="store_true", help="skip the network timings")
  p.add_argument("--no-scipy", action="store_true", help="skip diffrax vs scipy")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  batch = args.batch or (64 if args.quick else 256)
  targets = tuple(args.nfe or (common.QUICK_NFES if args.quick else common.TARGET_NFES))
  repeats = args.repeats or (1 if args.quick else 3)
  specs = [s for s in SPECS if s.quick or not args.quick]
  if args.only:
    specs = [s for s in SPECS if any(o in s.label for o in args.only)]
  if args.grids:
    defaults = [s for s in specs if s.label in GRID_SWEEP and not any(k == "time_grid" for k, _ in s.options)]
    seen = {(s.label, s.options) for s in specs}
    for s in defaults:
      for grid in GRIDS:
        v = dataclasses.replace(s, options=s.options + (("time_grid", grid),))
        if (v.label, v.options) not in seen:
          specs.append(v)
          seen.add((v.label, v.options))
  tuned_specs = []
  if args.tuned:
    request = TunedGrid(args.tune_warmup, args.tune_evals)
    tuned_specs = [dataclasses.replace(s, options=s.options + (("time_grid", request),))
                   for s in SPECS if (s.label, s.options) in TUNED
                   and (not args.only or any(o in s.label for o in args.only))]
  tols = QUICK_ADAPTIVE_TOLS if args.quick else ADAPTIVE_TOLS
  with_dopri = not args.only or any(o in "ode dopri5" for o in args.only)
  wall_start = time.perf_counter()

  common.log(f"# sgm_jax samplers on the digits GMM: {jax.default_backend()}, {os.cpu_count()} CPUs")
  problem = common.make_problem(batch=batch, std=args.std, seed=args.seed)
  common.log(f"problem: {problem.describe()}; exact flow map (float64 Dopri8, tol 1e-9) in "
             f"{problem.ref_seconds:.1f} s, its nearest-digit RMS "
             f"{common.nearest_digit_rms(problem.ref, problem.gm):.4f}, its RMS "
             f"{common.rms_error(problem.ref, 0.0 * problem.ref):.4f} (relative error = RMS "
             "error / this)")

  with_net = not args.no_net
  net_score, net_desc, net_call_s = None, "-", float("nan")
  if with_net:
    net_score, net_desc = common.make_network_score(problem.sde, problem.shape)
    net_call_s = common.score_call_seconds(net_score, problem.x_T)
    common.log(f"network: {net_desc}; one jitted call at B={batch}: {net_call_s * 1e3:.2f} ms")

  cases = [(s, t) for s in specs for t in targets] + [(s, t) for s in tuned_specs
                                                      for t in args.tune_nfe]
  if with_dopri:
    cases += [(Spec("ode dopri5 (adaptive)", "ode", (("solver", "dopri5"),), None), tol)
              for tol in tols]
  rows = []
  for i, (spec, target) in enumerate(cases, 1):
    if spec.nfe is None:
      num_steps, options, target_text = 1, dict(spec.kwargs, rtol=target, atol=target), "adaptive"
    else:
      num_steps, options, target_text = common.steps_for_nfe(spec.nfe, target), spec.kwargs, target
    try:
      row = run_case(problem, spec, num_steps, options, target_text, net_score, net_call_s,
                     repeats, with_net)
    except Exception as e:  # a sampler another worker is still writing: report and go on
      traceback.print_exc(limit=2)
      row = common.Row("sgm_jax", spec.label, spec.options_text(), str(target_text),
                       note=f"failed: {type(e).__name__}: {str(e)[:80]}")
    rows.append(row)
    c = common.row_cells(row)
    common.log(f"[{i}/{len(cases)}] {row.solver} ({row.options}) target {c[3]}: nfe {c[4]}, "
               f"error {c[5]} (median {c[6]}, other digit {c[7]}), nearest-digit {c[8]}, "
               f"wall {c[9]} ms, ratio {c[10]}"
               f"{' ' + row.note if row.note else ''}  [{time.perf_counter() - wall_start:.0f} s]")

  if with_net:
    for target in targets:
      row = scan_floor(problem, net_score, target, net_call_s, repeats)
      rows.append(row)
      common.log(f"baseline: lax.scan of {target} network calls: wall {row.wall_ms:.1f} ms, "
                 f"ratio {row.ratio:.3f}")

  scipy_results, scipy_md = [], ""
  if not args.no_scipy and (not args.only or with_dopri):
    common.log("diffrax vs scipy at rtol = atol = 1e-5:")
    scipy_results, scipy_md = diffrax_vs_scipy(problem, net_score, with_net, repeats)

  ratios = [r.ratio for r in rows if r.ratio is not None and r.library == "sgm_jax"]
  clock = "process CPU time, XLA single-threaded" if common.SINGLE_THREAD else "wall clock"
  summary = [f"problem: {problem.describe()}", f"timings: {clock}, median of {repeats}",
             f"network for wall/ratio: {net_desc}; one call {net_call_s * 1e3:.2f} ms",
             f"environment: {common.environment()}",
             f"total time: {time.perf_counter() - wall_start:.0f} s"]
  common.log("\n" + common.markdown_table(rows))
  common.log("\nbest deterministic sampler per target NFE:\n"
             + common.best_by_nfe(rows, targets))
  ratio_md = ratio_summary(rows)
  if ratios:
    common.log(f"\noverhead ratio: median {np.median(ratios):.3f}, max {max(ratios):.3f} "
               f"({sum(r <= 1.03 for r in ratios)}/{len(ratios)} cases <= 1.03)")
    common.log("\n" + ratio_md)
  if scipy_md:
    common.log("\n" + scipy_md)
  common.log("\n" + "\n".join(summary))
  if args.out:
    extra = ("## Best deterministic sampler per target NFE\n\n" + common.best_by_nfe(rows, targets)
             + ("\n\n## Overhead ratio per sampler\n\n" + ratio_md if ratios else "")
             + ("\n\n## diffrax Dopri5 vs scipy RK45 (rtol = atol = 1e-5)\n\n" + scipy_md if scipy_md else "")
             + "\n\n" + "\n".join(f"- {s}" for s in summary))
    meta = dict(problem=problem.describe(), network=net_desc, net_call_ms=net_call_s * 1e3,
                batch=batch, targets=list(targets), repeats=repeats,
                environment=common.environment(), diffrax_vs_scipy=scipy_results)
    paths = common.write_outputs(args.out, "sgm_jax samplers on the digits GMM", rows, extra, meta)
    common.log(f"wrote {paths[0]} and {paths[1]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
