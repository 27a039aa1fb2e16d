"""Peer libraries' few-step solvers on the same problem as benchmarks/samplers.py.

    pip install -r requirements-bench.txt        # torch (CPU), diffusers, k-diffusion (+ deps)
    python benchmarks/peers.py                   # NFE 5, 10, 20, 50
    python benchmarks/peers.py --verify          # also each solver at ~500 NFE: error must -> 0
    python benchmarks/peers.py --out /tmp/peers --merge /tmp/samplers.json   # best-per-NFE with ours

The problem (common.py): the VP probability-flow ODE of the digits GMM from t = T = 1 to
t = eps = 1e-3, i.e. over log-SNR [lambda(1), lambda(1e-3)], from the same x_T (B=256, seed 0),
scored against the same exact flow map (float64 Dopri8, tol 1e-9). The peers see the exact
oracle in float64 through numpy (one host round trip per evaluation):

- k-diffusion (VE/EDM form): y = x / alpha(t), sigma_kd = rho(t) = sigma(t) / alpha(t), denoiser
  D(y, rho) = E[x_0 | x_t] at t = sde.t_from_rho(rho) and x_t = alpha(t) y. Sigma grids from
  rho(1) to rho(1e-3) without the trailing 0 (every sampler used here handles a nonzero last
  sigma; with it their last step is no different), so the end point is t = eps exactly; then
  x0 = alpha(eps) y_end. Grid: Karras et al. rho = 7 (k-diffusion's get_sigmas_karras(n + 1)
  without its appended 0); DPM-Solver-fast and -adaptive pick their own log-sigma steps.
- diffusers: trained_betas chosen so that the scheduler's alphas_cumprod at training step
  k = 0..999 is alpha(t_k)^2 with t_k = eps + k / 999 (1 - eps), i.e. beta_k = 1 - ac_k / ac_{k-1}
  (ac_{-1} = 1); timestep_spacing 'linspace' (first model call at k = 999, t = 1),
  final_sigmas_type 'sigma_min' (last point k = 0, t = eps; DEIS always ends there), model =
  oracle eps at t_k, prediction_type 'epsilon'. Everything else is the scheduler's default (so
  lower_order_final is on below 15 steps). diffusers keeps its sigmas in float32 (a ~1e-6 floor).
NFE is counted by wrapping the model.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import time
import traceback
import types
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import numpy as np  # noqa: E402

try:
  import torch
except ImportError:  # the benchmark's optional dependencies are missing
  torch = None

PEER_NFES = (5, 10, 20, 50)
VERIFY_NFE = 500
ADAPTIVE_KD = ((0.05, 0.0078), (1e-3, 1e-4))  # (rtol, atol): k-diffusion's default and a tight one


def import_k_diffusion_sampling():
  """k_diffusion.sampling; when the package's __init__ needs heavy extras (scikit-image,
  torchvision, clip, ...), load sampling.py alone with a stub of the one helper it uses."""
  try:
    return importlib.import_module("k_diffusion.sampling")
  except ImportError:
    pass
  spec = importlib.util.find_spec("k_diffusion")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("k-diffusion is not installed (pip install --no-deps k-diffusion)")
  for name in [m for m in sys.modules if m == "k_diffusion" or m.startswith("k_diffusion.")]:
    del sys.modules[name]
  package = types.ModuleType("k_diffusion")
  package.__path__ = list(spec.submodule_search_locations)
  utils = types.ModuleType("k_diffusion.utils")

  def append_dims(x, target_dims):
    """k_diffusion.utils.append_dims: trailing singleton axes up to target_dims."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
      raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]

  utils.append_dims = append_dims
  package.utils = utils
  sys.modules["k_diffusion"] = package
  sys.modules["k_diffusion.utils"] = utils
  return importlib.import_module("k_diffusion.sampling")


class Counted:
  """A model wrapper that counts its calls (the NFE)."""

  def __init__(self, fn: Callable):
    self.fn, self.calls = fn, 0

  def __call__(self, *args, **kwargs):
    self.calls += 1
    return self.fn(*args, **kwargs)


# --- k-diffusion -----------------------------------------------------------------------------------
def k_diffusion_solvers(kd):
  """label -> (nfe_of(n), run(model, y_T, n, rho_min, rho_max) -> y_end), deterministic only."""

  def karras(n, rmin, rmax):
    sigmas = kd.get_sigmas_karras(n + 1, rmin, rmax, rho=7.0)[:-1].to(torch.float64)
    sigmas[0], sigmas[-1] = rmax, rmin  # exact float64 end points (the grid is float32)
    return sigmas

  def on_grid(sampler, **kw):
    return lambda model, y, n, rmin, rmax: sampler(model, y, karras(n, rmin, rmax), disable=True, **kw)

  no_noise = lambda sigma, sigma_next: 0.0
  return {
      "sample_euler": (lambda n: n, on_grid(kd.sample_euler)),
      "sample_heun": (lambda n: 2 * n, on_grid(kd.sample_heun)),
      "sample_dpm_2": (lambda n: 2 * n, on_grid(kd.sample_dpm_2)),
      "sample_lms (order 4)": (lambda n: n, on_grid(kd.sample_lms)),
      "sample_dpmpp_2m": (lambda n: n, on_grid(kd.sample_dpmpp_2m)),
      "sample_dpmpp_2s_ancestral eta=0": (
          lambda n: 2 * n, on_grid(kd.sample_dpmpp_2s_ancestral, eta=0.0, noise_sampler=no_noise)),
      "sample_dpmpp_3m_sde eta=0": (
          lambda n: n, on_grid(kd.sample_dpmpp_3m_sde, eta=0.0, noise_sampler=no_noise)),
      "sample_dpm_fast": (lambda n: n, lambda model, y, n, rmin, rmax: kd.sample_dpm_fast(
          model, y, rmin, rmax, n, disable=True)),
  }


def run_k_diffusion(problem, oracle, targets, verify: bool) -> list[common.Row]:
  kd = import_k_diffusion_sampling()
  sde, eps = problem.sde, problem.eps
  rho_max, rho_min = float(oracle.rho(problem.t_start)), float(oracle.rho(eps))
  alpha_T, alpha_eps = float(oracle.alpha(problem.t_start)), float(oracle.alpha(eps))
  y_T = torch.from_numpy(problem.x_T.astype(np.float64) / alpha_T)

  def denoiser(y, sigma):
    rho = sigma.detach().cpu().numpy().astype(np.float64)
    t = oracle.t_from_rho(rho)
    a = oracle.alpha(t).reshape((-1,) + (1,) * (y.ndim - 1))
    return torch.from_numpy(oracle.denoise(a * y.detach().cpu().numpy(), t))

  rows = []
  common.log(f"k-diffusion: sigmas rho(1) = {rho_max:.4f} -> rho(eps) = {rho_min:.6f}")
  for label, (nfe_of, run) in k_diffusion_solvers(kd).items():
    for target in list(targets) + ([VERIFY_NFE] if verify else []):
      n = common.steps_for_nfe(nfe_of, target)
      rows.append(_solve("k-diffusion", label, "karras rho=7" if "fast" not in label else "log-sigma",
                         target, problem, lambda m, n=n: run(m, y_T, n, rho_min, rho_max),
                         denoiser, alpha_eps, verify_row=target == VERIFY_NFE))
  for rtol, atol in ADAPTIVE_KD:
    def run(model, rtol=rtol, atol=atol):
      return kd.sample_dpm_adaptive(model, y_T, rho_min, rho_max, rtol=rtol, atol=atol, disable=True)
    rows.append(_solve("k-diffusion", "sample_dpm_adaptive", f"rtol={rtol:g}, atol={atol:g}",
                       "adaptive", problem, run, denoiser, alpha_eps))
  return rows


def _solve(library, solver, options, target, problem, run, model_fn, scale_out,
           verify_row=False) -> common.Row:
  row = common.Row(library, solver, options, str(target))
  model = Counted(model_fn)
  try:
    start = time.perf_counter()
    out = run(model)
    seconds = time.perf_counter() - start
    x0 = scale_out * out.detach().cpu().numpy().astype(np.float64)
    row.nfe = model.calls
    row.note = f"{seconds:.1f} s (torch loop, f64 oracle via numpy)" + (
        "; convergence check" if verify_row else "")
    common.score_against_reference(row, x0, problem)
  except Exception as e:
    traceback.print_exc(limit=3)
    row.note = f"failed: {type(e).__name__}: {str(e)[:100]}"
  c = common.row_cells(row)
  common.log(f"  {library} {solver} ({options}) target {target}: nfe {c[4]}, error {c[5]} "
             f"(median {c[6]}, other digit {c[7]}), nearest-digit {c[8]}  [{row.note}]")
  return row


# --- diffusers --------------------------------------------------------------------------------------
def diffusers_betas(oracle, eps: float, num_train: int = 1000) -> tuple[np.ndarray, np.ndarray]:
  """trained_betas with alphas_cumprod[k] = alpha(t_k)^2, t_k = eps + k / (N - 1) (1 - eps)."""
  t = eps + np.arange(num_train) / (num_train - 1) * (1.0 - eps)
  ac = oracle.alpha(t) ** 2
  betas = 1.0 - ac / np.concatenate([[1.0], ac[:-1]])
  return betas, t


def diffusers_schedulers(num_train: int = 1000):
  """(scheduler, options) -> make(trained_betas): the schedulers as a diffusers user sets them up
  for a VP model, ending at the smallest training noise level."""
  import diffusers
  common_kw = dict(num_train_timesteps=num_train, prediction_type="epsilon",
                   timestep_spacing="linspace")
  dpm = lambda **kw: diffusers.DPMSolverMultistepScheduler(
      algorithm_type="dpmsolver++", final_sigmas_type="sigma_min", **common_kw, **kw)
  unipc = lambda **kw: diffusers.UniPCMultistepScheduler(final_sigmas_type="sigma_min", **common_kw, **kw)
  deis = lambda **kw: diffusers.DEISMultistepScheduler(**common_kw, **kw)
  return {
      ("DPMSolverMultistepScheduler", "dpmsolver++, order 2"): lambda b: dpm(trained_betas=b, solver_order=2),
      ("DPMSolverMultistepScheduler", "dpmsolver++, order 3"): lambda b: dpm(trained_betas=b, solver_order=3),
      ("DPMSolverMultistepScheduler", "dpmsolver++, order 2, karras sigmas"): lambda b: dpm(
          trained_betas=b, solver_order=2, use_karras_sigmas=True),
      ("DEISMultistepScheduler", "order 2 (default)"): lambda b: deis(trained_betas=b, solver_order=2),
      ("DEISMultistepScheduler", "order 3"): lambda b: deis(trained_betas=b, solver_order=3),
      ("UniPCMultistepScheduler", "bh2, order 2 (default)"): lambda b: unipc(trained_betas=b, solver_order=2),
      ("UniPCMultistepScheduler", "bh2, order 3"): lambda b: unipc(trained_betas=b, solver_order=3),
  }


def _diffusers_run(sched, x_T):
  def run(model):
    x = x_T * sched.init_noise_sigma
    for k in sched.timesteps:
      x = sched.step(model(x, k), k, x).prev_sample
    return x
  return run


def _eps_model(oracle, eps: float, num_train: int):
  """The model a diffusers scheduler calls: oracle eps at t_k = eps + k / (N - 1) (1 - eps)."""
  def model(x, k):
    t = np.full((x.shape[0],), eps + float(k) / (num_train - 1) * (1.0 - eps))
    return torch.from_numpy(oracle.eps(x.detach().cpu().numpy().astype(np.float64), t))
  return model


def run_diffusers(problem, oracle, targets, verify: bool) -> list[common.Row]:
  eps = problem.eps
  betas, t_train = diffusers_betas(oracle, eps)
  rho_min = float(oracle.rho(eps))
  x_T = torch.from_numpy(problem.x_T.astype(np.float64))
  model = _eps_model(oracle, eps, len(betas))

  rows = []
  checked = False
  for (name, options), make in diffusers_schedulers().items():
    for target in list(targets) + ([VERIFY_NFE] if verify else []):
      sched = make(betas)
      sched.set_timesteps(target)
      if not checked:  # the mapping: the scheduler's sigma at step k must be rho(t_k)
        ks = sched.timesteps.numpy()
        rho_k = oracle.rho(t_train[ks])
        rel = np.max(np.abs(sched.sigmas[:-1].numpy() / rho_k - 1.0))
        rel_last = abs(float(sched.sigmas[-1]) / rho_min - 1.0)
        common.log(f"diffusers: timesteps {ks[0]}..{ks[-1]} (t = 1 .. {t_train[ks[-1]]:.4f}), "
                   f"max |sigma_k / rho(t_k) - 1| = {rel:.1e}, |last sigma / rho(eps) - 1| = "
                   f"{rel_last:.1e} (diffusers keeps float32 sigmas)")
        checked = True
      rows.append(_solve("diffusers", name, options, target, problem, _diffusers_run(sched, x_T),
                         model, 1.0, verify_row=target == VERIFY_NFE))
  if verify:
    rows += diffusers_fine_grid_check(problem, oracle)
  return rows


def diffusers_fine_grid_check(problem, oracle, num_steps: int = 200,
                              num_train: int = 100_000) -> list[common.Row]:
  """The mapping check for diffusers. Its default grid is uniform in the integer training step,
  i.e. uniform in t, whose last step (t_k -> eps) stays large in log-SNR even at 500 steps (and
  with 1000 training steps the finest possible last step, k = 1 -> 0, is ~0.8 in log-SNR), so
  errors there shrink slowly. Here: 1e5 training steps and `num_steps` integer timesteps closest
  to a uniform log-SNR grid (scheduler timesteps and sigmas replaced after set_timesteps); the
  error must go to ~0 for every scheduler."""
  import jax
  eps, sde = problem.eps, problem.sde
  betas, t_train = diffusers_betas(oracle, eps, num_train)
  with jax.enable_x64(True):
    lam = np.linspace(float(sde.log_snr(problem.t_start)), float(sde.log_snr(eps)), num_steps + 1)
    t = np.asarray(sde.t_from_log_snr(lam))
  ks = np.unique(np.round((t - eps) / (1.0 - eps) * (num_train - 1)).astype(np.int64))[::-1].copy()
  sigmas = torch.from_numpy(oracle.rho(t_train[ks])).to(torch.float32)
  x_T = torch.from_numpy(problem.x_T.astype(np.float64))
  model = _eps_model(oracle, eps, num_train)
  rows = []
  common.log(f"diffusers fine-grid check: {num_train} training steps, {len(ks) - 1} log-SNR-uniform "
             "integer timesteps")
  for (name, options), make in diffusers_schedulers(num_train).items():
    if "karras" in options:
      continue
    sched = make(betas)
    sched.set_timesteps(len(ks) - 1)
    sched.timesteps, sched.sigmas = torch.from_numpy(ks[:-1].copy()), sigmas.clone()
    rows.append(_solve("diffusers", name, options + "; 1e5 train steps, log-SNR grid",
                       "check", problem, _diffusers_run(sched, x_T), model, 1.0, verify_row=True))
  return rows


# --- main ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--nfe", type=int, nargs="+", default=None, help=f"target NFEs {PEER_NFES}")
  p.add_argument("--quick", action="store_true", help="NFE 10 and 20, B=64")
  p.add_argument("--batch", type=int, default=None, help="batch size (256; --quick: 64)")
  p.add_argument("--verify", action="store_true", help=f"also run every solver at ~{VERIFY_NFE} NFE")
  p.add_argument("--only", choices=("k-diffusion", "diffusers"), default=None)
  p.add_argument("--std", type=float, default=0.05)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="write OUT.md and OUT.json")
  p.add_argument("--merge", default=None, help="samplers.py JSON to merge into the best-per-NFE table")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if torch is None:
    common.log("torch is not installed: pip install -r requirements-bench.txt")
    return 1
  batch = args.batch or (64 if args.quick else 256)
  targets = tuple(args.nfe or (common.QUICK_NFES if args.quick else PEER_NFES))
  start = time.perf_counter()
  problem = common.make_problem(batch=batch, std=args.std, seed=args.seed)
  common.log(f"problem: {problem.describe()}; exact flow map in {problem.ref_seconds:.1f} s")
  oracle = common.Oracle64(problem)
  rows = []
  versions = {"torch": torch.__version__}
  if args.only in (None, "k-diffusion"):
    try:
      rows += run_k_diffusion(problem, oracle, targets, args.verify)
      versions["k-diffusion"] = importlib.metadata.version("k-diffusion")
    except ImportError as e:
      common.log(f"k-diffusion unavailable: {e}")
  if args.only in (None, "diffusers"):
    try:
      rows += run_diffusers(problem, oracle, targets, args.verify)
      versions["diffusers"] = importlib.metadata.version("diffusers")
    except ImportError as e:
      common.log(f"diffusers unavailable: {e}")

  all_rows = list(rows)
  if args.merge:
    all_rows = common.read_rows(args.merge) + rows
  best = common.best_by_nfe(all_rows, targets)
  common.log("\n" + common.markdown_table(rows))
  common.log("\nbest deterministic solver per target NFE:\n" + best)
  summary = [f"problem: {problem.describe()}", f"versions: {versions}",
             f"environment: {common.environment()}",
             f"total time: {time.perf_counter() - start:.0f} s"]
  common.log("\n" + "\n".join(summary))
  if args.out:
    extra = ("## Best deterministic solver per target NFE"
             + (f" (with {os.path.basename(args.merge)})" if args.merge else "") + "\n\n" + best
             + "\n\n" + "\n".join(f"- {s}" for s in summary))
    meta = dict(problem=problem.describe(), versions=versions, targets=list(targets),
                environment=common.environment())
    paths = common.write_outputs(args.out, "Peer solvers on the digits GMM", rows, extra, meta)
    common.log(f"wrote {paths[0]} and {paths[1]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
