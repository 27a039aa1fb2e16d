"""`main.py --mode sample`: samples from the EMA parameters of a checkpoint (optionally of one
class, through the classifier of --mode train_classifier); and the sampler comparison of
`--mode all`."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from sgm_jax import controllable, io_utils, loading, parallel, sde_lib
from sgm_jax.cli import classifier, outputs, setup, tuned_grid


def run_sample(config: Any, workdir: str, sampler_name: str | None = None,
               num_steps: int | None = None, num_samples: int | None = None,
               checkpoint_step: Any = None, class_label: Any = None,
               classifier_scale: float | None = None, nfe: int | None = None,
               **sampler_options) -> dict:
  """Sample from the EMA parameters of a checkpoint.

  Samples through sgm_jax.load(workdir).sample_with_info (the Python API's path) with the seed
  config.seed. Writes workdir/samples/<outputs.sample_file_stem(...)>[_class<y>].{png,npz};
  returns their paths and the mean nfe per batch. With class_label (an integer, or 'all' to cycle
  through the classes) the score is that of p_t(x | y) through the workdir's classifier (of
  --mode train_classifier or --mode import --classifier), weighted by classifier_scale (default
  config.classifier.scale). With `nfe`, a budget of score evaluations per sample: the best
  sampler for it (sampling/budget.py), or `sampler_name`'s most steps that fit.
  """
  model = loading.load(workdir, checkpoint_step, config=config)
  s = config.sampling
  resolved = setup.resolve_sampler(
      config, model.sde, model.example_shape, sampler_name, num_steps, nfe, sampler_options,
      str(setup.get_field(s, "method", "pc")),
      lambda _: int(setup.get_field(s, "num_steps", model.sde.N)))
  sampler_name, num_steps, sampler_options = (resolved.sampler, resolved.num_steps,
                                              resolved.options)
  num_samples = int(num_samples if num_samples is not None
                    else setup.get_field(s, "num_samples", 64))
  conditional, suffix = None, ""
  if class_label is not None:
    conditional = _ClassConditional(config, workdir, model.sde, model.example_shape, class_label,
                                    classifier_scale)
    suffix = f"_class{conditional.label}"
  drawn = model.sample_with_info(num_samples, sampler_name, num_steps, int(config.seed),
                                 conditional=conditional, progress=True, **sampler_options)
  named_options = (dict(drawn.options, time_grid=tuned_grid.TUNED)
                   if tuned_grid.wants_tuned_grid(sampler_options) else drawn.options)
  samples, sampler_options = drawn.samples, drawn.options
  stem = os.path.join(workdir, "samples", outputs.sample_file_stem(
      sampler_name, num_steps, named_options, model.step) + suffix)
  settings = dict(sampler=sampler_name, num_steps=num_steps, options=sampler_options,
                  seed=int(config.seed), num_samples=num_samples,
                  classifier=None if conditional is None else (conditional.scale, conditional.step))
  paths = (outputs.save_samples(samples, config, stem, settings) if parallel.is_first_process()
           else {"npz": stem + ".npz", "png": stem + ".png"})  # process 0 writes
  centered = bool(config.data.centered)
  result = dict(paths, sampler=sampler_name, num_steps=num_steps, nfe=drawn.nfe,
                checkpoint_step=model.step,
                num_samples=num_samples, sampler_options=sampler_options,
                out_of_range=(outputs.out_of_range_share(samples, centered)
                              if samples.ndim == 4 else None))
  if conditional is not None:
    result.update(labels=drawn.labels, class_label=conditional.label,
                  classifier_scale=conditional.scale, classifier_step=conditional.step)
  return result


class _ClassConditional:
  """The classifier of a workdir, turning the score into that of p_t(x | y) (Eq. 14)."""

  def __init__(self, config: Any, workdir: str, sde: sde_lib.SDE, image_shape: tuple,
               class_label: Any, scale: float | None):
    spec = classifier.ClassifierSpec.from_config(config)
    self.num_classes = spec.num_classes
    self.label = classifier.parse_class_label(class_label, spec.num_classes)
    self.scale = float(spec.scale if scale is None else scale)
    self.log_prob_fn, self.step = classifier.load_classifier_log_prob(config, workdir, sde,
                                                                      image_shape)

  def labels(self, start: int, batch: int) -> np.ndarray:
    """The (batch,) classes of samples start..start+batch-1."""
    return classifier.class_labels_for(self.label, start, batch, self.num_classes)

  def score_fn(self, score_fn, log_prob_fn, y):
    """score_fn of p_t(x | y)."""
    return controllable.conditional_score_fn(score_fn, log_prob_fn, y, self.scale)


def comparison_samplers(config: Any) -> list[tuple[str, int]]:
  """(sampler, steps) of the main job's comparison: DEIS-10, DPM-Solver-10, DDIM-50, the adaptive
  ODE (Dopri5) and predictor-corrector with sampling.pc_num_steps (500)."""
  pc_steps = int(setup.get_field(config.sampling, "pc_num_steps", 500))
  return [("deis", 10), ("dpm_solver", 10), ("ddim", 50), ("ode", 1), ("pc", pc_steps)]


def run_sampler_comparison(config: Any, workdir: str) -> tuple[list[dict], str]:
  """Sample with every sampler of `comparison_samplers` (main.py --mode all) and write their
  grids side by side, captioned with NFE and out-of-range share, to
  workdir/samples/samplers_ckpt<step>.png."""
  results = [run_sample(config, workdir, name, steps) for name, steps in comparison_samplers(config)]
  panels = []
  for (name, steps), r in zip(comparison_samplers(config), results):
    label = f"{name} {steps} steps" if name != "ode" else "ode (dopri5)"
    out = "" if r["out_of_range"] is None else f", {100 * r['out_of_range']:.1f} % out"
    panels.append((r["png"], f"{label}: {r['nfe']:.0f} NFE{out}"))
  path = os.path.join(workdir, "samples", f"samplers_ckpt{results[0]['checkpoint_step']}.png")
  return results, io_utils.save_side_by_side(panels, path)
