"""Samplers: get_sampler(name, sde, shape, num_steps=..., **options) is the only dispatch.

    sampler = get_sampler("deis", sde, (B, H, W, C), num_steps=10)
    x0, nfe = sampler(key, score_fn, x_T=None, hook=None)

hook(x, t, key) -> x runs after every update (sgm_jax/sampling/base.py); every sampler takes one
except 'ode' with an adaptive solver (sampler.accepts_hook says which).
"""
from __future__ import annotations

import importlib

from sgm_jax.errors import InputError
from sgm_jax.sampling import data_prediction
from sgm_jax.sampling.base import GENERIC_OPTIONS, Sampler

# name -> (module in sgm_jax.sampling, builder function). Builders have the signature
# builder(sde, shape, num_steps, **options) -> Sampler of the loop alone, whose info says where a
# final denoising jump goes ('denoise', 't_end'); get_sampler completes it.
SAMPLERS = {
    "pc": ("pc", "build_pc_sampler"),
    "milstein": ("milstein", "build_milstein_sampler"),
    "ode": ("ode", "build_ode_sampler"),
    "ddim": ("ddim", "build_ddim_sampler"),
    "heun": ("heun", "build_heun_sampler"),
    "edm_sde": ("edm_sde", "build_edm_sde_sampler"),
    "restart": ("restart", "build_restart_sampler"),
    "dpm_solver": ("dpm_solver", "build_dpm_solver_sampler"),
    "dpm_solver_sde": ("dpm_solver_sde", "build_dpm_solver_sde_sampler"),
    "deis": ("deis", "build_deis_sampler"),
    "ipndm": ("deis", "build_ipndm_sampler"),
    "unipc": ("unipc", "build_unipc_sampler"),
}
# (name, variant option) -> (module, builder) for variants built by a module of their own; the
# builder gets the options without 'variant'
VARIANT_BUILDERS = {
    ("pc", "score_sde"): ("pc_score_sde", "build_score_sde_pc_sampler"),
}


def get_sampler(name: str, sde, shape, num_steps: int = 1000, **options) -> Sampler:
  """Build the sampler `name` for `sde` producing batches of `shape` in `num_steps` steps.

  Besides its own options, every sampler takes (sgm_jax/sampling/data_prediction.py):
    thresholding: None (default) | 'none' | 'clip' | 'dynamic': threshold the data prediction
      x0 = E[x_0 | x_t] of the score at every evaluation (off: the sampler is unchanged);
    threshold_percentile (0.995): the percentile of 'dynamic' thresholding, in (0, 1];
    data_range ((-1.0, 1.0)): the pair lo < hi that x0 is thresholded to;
    score_scale (None: off): a number c > 0, the loop and the final jump see c * score.
  """
  if name not in SAMPLERS:
    raise InputError(f"unknown sampler {name!r}; valid samplers are {sorted(SAMPLERS)}")
  if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
    raise InputError(f"num_steps must be a positive integer, got {num_steps!r}")
  if len(tuple(shape)) < 2 or any(int(d) < 1 for d in shape):
    raise InputError(f"shape must be a batch shape (B, ...) of positive sizes, got {shape!r}")
  generic = {k: options.pop(k) for k in GENERIC_OPTIONS if k in options}
  score_scale = data_prediction.check_score_scale(generic.pop("score_scale", None))
  thresholding = data_prediction.check_thresholding_options(**generic)
  module_name, builder = SAMPLERS[name]
  variant = options.get("variant")
  if isinstance(variant, str) and (name, variant) in VARIANT_BUILDERS:
    module_name, builder = VARIANT_BUILDERS[name, options.pop("variant")]
  module = importlib.import_module(f"sgm_jax.sampling.{module_name}")
  sampler = getattr(module, builder)(sde, tuple(int(d) for d in shape), num_steps, **options)
  info, denoise = sampler.info, bool(sampler.info.get("denoise", False))
  if thresholding["thresholding"] is None:
    thresholding = dict(thresholding=None)
    if not denoise and score_scale is None:
      info.update(thresholding, score_scale=None)
      return sampler
  run = data_prediction.complete_run(sampler.run, sde, num_steps, denoise, info["t_end"],
                                     score_scale, **thresholding)
  return Sampler(sampler.name, sampler.shape, run,
                 {**info, **thresholding, "score_scale": score_scale}, sampler.hook_error)
