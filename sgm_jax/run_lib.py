"""The config edge: ConfigDicts become typed objects here, and each main.py mode is one function.

Library modules take explicit arguments; only this module (and datasets/models' from_config) read
a ConfigDict.
"""
from __future__ import annotations

import logging
import os
import zipfile
from typing import Any

import jax
import numpy as np

from sgm_jax import datasets, io_utils, losses, models, parallel, sampling, score, sde_lib, train
from sgm_jax.checkpoints import CheckpointError, CheckpointStore, has_checkpoints
from sgm_jax.errors import InputError
from sgm_jax.workdir import WorkdirLock, check_or_record_config


def _get(section: Any, key: str, default: Any) -> Any:
  return section.get(key, default) if hasattr(section, "get") else getattr(section, key, default)


def sde_from_config(config: Any) -> sde_lib.SDE:
  """config.training.sde ('vesde', 'vpsde', 'subvpsde', 'tutorial') with config.model's constants."""
  name = str(config.training.sde).lower()
  m = config.model
  n = int(_get(m, "num_scales", 1000))
  if name == "vesde":
    return sde_lib.VESDE(sigma_min=float(m.sigma_min), sigma_max=float(m.sigma_max), N=n)
  if name in ("vpsde", "subvpsde"):
    cls = sde_lib.VPSDE if name == "vpsde" else sde_lib.subVPSDE
    return cls(beta_min=float(m.beta_min), beta_max=float(m.beta_max), N=n)
  if name == "tutorial":
    return sde_lib.TutorialSDE(sigma_base=float(_get(m, "sigma_base", 25.0)), N=n)
  raise InputError(f"unknown SDE {config.training.sde!r} (config.training.sde); valid values are "
                   f"{sorted(sde_lib.SDES)}")


def loss_kind(config: Any, sde: sde_lib.SDE) -> str:
  """config.training.loss if set; else score_sde's choice: DSM in continuous time, the SMLD or
  DDPM loss for discrete VE or VP training."""
  kind = _get(config.training, "loss", None)
  if kind:
    return str(kind)
  if bool(config.training.continuous):
    return "dsm"
  if type(sde) is sde_lib.VESDE:
    return "smld"
  if type(sde) is sde_lib.VPSDE:
    return "ddpm"
  raise InputError(f"discrete training (training.continuous=False) is defined for VESDE and VPSDE "
                   f"only, got {type(sde).__name__}")


def parameterization_from_config(config: Any) -> tuple[Any, float]:
  """(config.model.parameterization or None for the SDE's own, config.model.sigma_data)."""
  m = config.model
  return _get(m, "parameterization", None) or None, float(_get(m, "sigma_data", 0.5))


def loss_weighting(config: Any) -> str:
  """config.training.weighting if set; else 'g2' with likelihood_weighting, 'sigma2' without."""
  t = config.training
  weighting = _get(t, "weighting", None)
  if weighting:
    return str(weighting)
  return "g2" if bool(_get(t, "likelihood_weighting", False)) else "sigma2"


def loss_fn_from_config(config: Any, sde: sde_lib.SDE, model, train: bool = True) -> Any:
  """The training loss of config.training; train=False: without dropout (evaluation)."""
  t = config.training
  parameterization, sigma_data = parameterization_from_config(config)
  return losses.get_loss_fn(
      sde, model, kind=loss_kind(config, sde), continuous=bool(t.continuous), train=train,
      reduce_mean=bool(_get(t, "reduce_mean", False)), weighting=loss_weighting(config),
      eps=float(_get(t, "eps", 1e-5)),
      importance_sampling=bool(_get(t, "importance_sampling", False)),
      parameterization=parameterization, sigma_data=sigma_data,
      time_sampling=str(_get(t, "time_sampling", "uniform")))


def optimizer_from_config(config: Any) -> train.OptimizerSpec:
  o = config.optim
  name = str(_get(o, "optimizer", "Adam"))
  if name.lower() != "adam":
    raise InputError(f"unknown optimizer {name!r} (config.optim.optimizer); valid values are "
                     "['Adam']")
  return train.OptimizerSpec(lr=float(o.lr), warmup=int(_get(o, "warmup", 5000)),
                             grad_clip=float(_get(o, "grad_clip", 1.0)),
                             beta1=float(_get(o, "beta1", 0.9)), eps=float(_get(o, "eps", 1e-8)),
                             weight_decay=float(_get(o, "weight_decay", 0.0)))


def loop_spec_from_config(config: Any) -> train.LoopSpec:
  t = config.training
  max_seconds = _get(t, "max_seconds", None)
  return train.LoopSpec(
      n_iters=int(t.n_iters), batch_size=int(t.batch_size),
      n_jitted_steps=int(_get(t, "n_jitted_steps", 1)), log_freq=int(_get(t, "log_freq", 50)),
      snapshot_freq=int(_get(t, "snapshot_freq", 10000)),
      snapshot_freq_for_preemption=int(_get(t, "snapshot_freq_for_preemption", 1000)),
      keep_checkpoints=int(_get(t, "keep_checkpoints", 5)),
      max_seconds=None if max_seconds is None else float(max_seconds), seed=int(config.seed))


def build(config: Any):
  """(sde, model, dataset) of a config, with the config's image shape checked against the data."""
  sde = sde_from_config(config)
  model = models.create_model(config, sde)
  dataset = datasets.get_dataset(datasets.from_config(config))
  return sde, model, dataset


def initial_state(config: Any, model, example_shape: tuple, tx) -> train.TrainState:
  """The train state of a fresh run (parameters initialized from config.seed, jitted)."""
  key = jax.random.PRNGKey(int(config.seed))
  return train.init_train_state(model, key, (1,) + tuple(example_shape), tx)


def abstract_initial_state(config: Any, model, example_shape: tuple, tx) -> train.TrainState:
  """initial_state's structure, shapes and dtypes (jax.ShapeDtypeStruct leaves), the restore
  target of a checkpoint: the network is only traced, nothing is run or allocated."""
  del config  # the values (config.seed) do not change shapes
  return train.abstract_train_state(model, (1,) + tuple(example_shape), tx)


def run_train(config: Any, workdir: str) -> train.TrainState:
  """Train (or resume training) in `workdir`: `main.py --mode train`."""
  os.makedirs(workdir, exist_ok=True)
  dist = _get(config, "distributed", None)
  if dist is not None:  # multi-host: config.distributed.{coordinator_address,num_processes,process_id}
    parallel.maybe_initialize_distributed(_get(dist, "coordinator_address", None),
                                          _get(dist, "num_processes", None),
                                          _get(dist, "process_id", None))
  with WorkdirLock(workdir):
    sde, model, dataset = build(config)
    spec = loop_spec_from_config(config)
    opt = optimizer_from_config(config)
    tx = opt.build()
    example_shape = dataset.train_batch(0)["image"].shape[1:]
    state = initial_state(config, model, example_shape, tx)
    # Recorded only once the config has proven buildable, so a failed first run leaves the
    # workdir free for the corrected config.
    check_or_record_config(workdir, config)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
    logging.info("model %s with %d parameters; %s; data %s %s", config.model.name, n_params,
                 type(sde).__name__, config.data.dataset, example_shape)
    step_fn = train.make_train_step(loss_fn_from_config(config, sde, model), tx,
                                    float(config.model.ema_rate), int(config.seed),
                                    opt.schedule())
    return train.train_loop(workdir, state, step_fn, dataset.batches_fn(), spec, opt.schedule())


def restore_ema_params(config: Any, workdir: str, model, example_shape: tuple,
                       step: Any = None) -> tuple[Any, int]:
  """EMA parameters of the latest (or the given) checkpoint in `workdir`, and its step."""
  if not has_checkpoints(workdir):
    raise CheckpointError(f"no checkpoint in {workdir}; train first with --mode train")
  opt = optimizer_from_config(config)
  target = abstract_initial_state(config, model, example_shape, opt.build())
  store = CheckpointStore(workdir, keep=int(_get(config.training, "keep_checkpoints", 5)))
  try:
    if store.latest_step() is None:
      raise CheckpointError(f"no checkpoint in {workdir}; train first with --mode train")
    state = store.restore(target, None if step is None else int(step))
  finally:
    store.close()
  return state.params_ema, int(state.step)


# config.sampling fields of score_sde's PC sampler -> the pc sampler's options
PC_CONFIG_OPTIONS = {"predictor": "predictor", "corrector": "corrector", "snr": "snr",
                     "n_steps_each": "n_steps_each", "noise_removal": "denoise",
                     "probability_flow": "probability_flow"}


def sampler_options_from_config(config: Any, sampler_name: str, overrides: dict) -> dict:
  """The options of `sampler_name`: for 'pc', the config's predictor-corrector settings
  (config.sampling.predictor, corrector, snr, n_steps_each, noise_removal, probability_flow);
  `overrides` (--sampler_option) replace single entries and keep the rest."""
  options = {}
  if sampler_name == "pc":
    s = config.sampling
    options = {option: _get(s, field, None) for field, option in PC_CONFIG_OPTIONS.items()}
    options = {k: v for k, v in options.items() if v is not None}
  return dict(options, **overrides)


def score_fn_for(config: Any, sde: sde_lib.SDE, model, params: Any):
  """The score of a trained network (EMA params), ready for samplers and likelihoods."""
  parameterization, sigma_data = parameterization_from_config(config)
  return score.get_score_fn(sde, model, {"params": params},
                            continuous=bool(config.training.continuous),
                            parameterization=parameterization, sigma_data=sigma_data)


def save_samples(samples: np.ndarray, config: Any, path_stem: str) -> dict:
  """Write samples as a PNG (image grid, or a scatter plot for 2-D points) and an .npz."""
  centered = bool(config.data.centered)
  paths = {}
  with io_utils.atomic_write(path_stem + ".npz") as f:
    np.savez(f, samples=samples)
  paths["npz"] = path_stem + ".npz"
  if samples.ndim == 4:
    upscale = max(1, 128 // samples.shape[1])
    paths["png"] = io_utils.save_image_grid(samples, path_stem + ".png",
                                            data_range=(-1.0, 1.0) if centered else (0.0, 1.0),
                                            upscale=upscale)
  else:
    paths["png"] = io_utils.save_scatter(samples, path_stem + ".png")
  return paths


def run_sample(config: Any, workdir: str, sampler_name: str | None = None,
               num_steps: int | None = None, num_samples: int | None = None,
               checkpoint_step: Any = None, class_label: Any = None,
               classifier_scale: float | None = None, **sampler_options) -> dict:
  """Sample from the EMA parameters of a checkpoint: `main.py --mode sample`.

  Writes workdir/samples/<sampler>_<steps>steps_ckpt<step>[_class<y>].{png,npz}; returns their
  paths and the mean nfe per batch. With class_label (an integer, or 'all' to cycle through the
  classes) the score is that of p_t(x | y) through the classifier of --mode train_classifier,
  weighted by classifier_scale (default config.classifier.scale).
  """
  from tqdm import tqdm
  sde, model, dataset = build(config)
  example_shape = datasets.example_shape(dataset.spec)  # from the config: no data is loaded
  params, ckpt_step = restore_ema_params(config, workdir, model, example_shape, checkpoint_step)
  s = config.sampling
  sampler_name = sampler_name or str(_get(s, "method", "pc"))
  num_steps = int(num_steps if num_steps is not None else _get(s, "num_steps", sde.N))
  num_samples = int(num_samples if num_samples is not None else _get(s, "num_samples", 64))
  if num_samples < 1:
    raise InputError(f"num_samples must be >= 1, got {num_samples}")
  sampler_options = sampler_options_from_config(config, sampler_name, sampler_options)
  batch = min(int(_get(s, "batch_size", 64)), num_samples)
  sampler = sampling.get_sampler(sampler_name, sde, (batch,) + tuple(example_shape),
                                 num_steps=num_steps, **sampler_options)
  score_fn = score_fn_for(config, sde, model, params)
  conditional, suffix = None, ""
  if class_label is not None:
    conditional = _ClassConditional(config, workdir, sde, example_shape, class_label,
                                    classifier_scale)
    suffix = f"_class{conditional.label}"
  key = jax.random.PRNGKey(int(config.seed) + 1)
  outs, nfes, labels = [], [], []
  for i in tqdm(range(-(-num_samples // batch)), desc=f"sample {sampler_name}", unit="batch"):
    fn = score_fn
    if conditional is not None:
      fn, y = conditional.score_fn(score_fn, i * batch, batch)
      labels.append(y)
    x, nfe = sampler(jax.random.fold_in(key, i), fn)
    outs.append(np.asarray(x))
    nfes.append(int(nfe))
  samples = np.concatenate(outs)[:num_samples]
  stem = os.path.join(workdir, "samples", f"{sampler_name}_{num_steps}steps_ckpt{ckpt_step}{suffix}")
  paths = save_samples(samples, config, stem)
  result = dict(paths, nfe=float(np.mean(nfes)), checkpoint_step=ckpt_step,
                num_samples=num_samples, sampler_options=sampler_options,
                out_of_range=(out_of_range_share(samples, bool(config.data.centered))
                              if samples.ndim == 4 else None))
  if conditional is not None:
    result.update(labels=np.concatenate(labels)[:num_samples], class_label=conditional.label,
                  classifier_scale=conditional.scale, classifier_step=conditional.step)
  return result


def comparison_samplers(config: Any) -> list[tuple[str, int]]:
  """(sampler, steps) of the main job's comparison: DEIS-10, DPM-Solver-10, DDIM-50, the adaptive
  ODE (Dopri5) and predictor-corrector with sampling.pc_num_steps (500)."""
  pc_steps = int(_get(config.sampling, "pc_num_steps", 500))
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


class _ClassConditional:
  """The classifier of a workdir, turning the score into that of p_t(x | y) (Eq. 14)."""

  def __init__(self, config: Any, workdir: str, sde: sde_lib.SDE, image_shape: tuple,
               class_label: Any, scale: float | None):
    from sgm_jax import run_controllable as rc
    spec = rc.ClassifierSpec.from_config(config)
    self.num_classes = spec.num_classes
    self.label = rc.parse_class_label(class_label, spec.num_classes)
    self.scale = float(spec.scale if scale is None else scale)
    self.log_prob_fn, self.step = rc.load_classifier_log_prob(config, workdir, sde, image_shape)

  def score_fn(self, score_fn, start: int, batch: int):
    from sgm_jax import controllable
    from sgm_jax.run_controllable import class_labels_for
    y = class_labels_for(self.label, start, batch, self.num_classes)
    return controllable.conditional_score_fn(score_fn, self.log_prob_fn, y, self.scale), y


class _Progress:
  """Per-batch results of one evaluation: one small .npz per finished batch in `directory`
  (written atomically), so an interrupted evaluation resumes where it stopped and each save costs
  one batch, not everything so far."""

  def __init__(self, directory: str):
    self.directory = directory
    self.done: dict[int, dict[str, np.ndarray]] = {}
    os.makedirs(directory, exist_ok=True)
    for name in sorted(os.listdir(directory)):
      if not (name.startswith("batch_") and name.endswith(".npz")):
        continue
      path = os.path.join(directory, name)
      try:
        with np.load(path) as f:
          self.done[int(name[len("batch_"):-len(".npz")])] = {k: f[k] for k in f.files}
      except (ValueError, OSError, KeyError, zipfile.BadZipFile) as e:  # damaged: recompute it
        logging.warning("evaluation progress file %s is unreadable (%s); recomputing that batch",
                        path, e)

  def add(self, i: int, **arrays) -> None:
    self.done[i] = {k: np.atleast_1d(np.asarray(v)) for k, v in arrays.items()}
    with io_utils.atomic_write(os.path.join(self.directory, f"batch_{i:06d}.npz")) as f:
      np.savez(f, **self.done[i])

  def gather(self, key: str) -> np.ndarray:
    return np.concatenate([np.atleast_1d(self.done[i][key]) for i in sorted(self.done)])


OUT_OF_RANGE = 1.1  # |x| above this in the centered range [-1, 1] counts as out of range


def out_of_range_share(x: np.ndarray, centered: bool) -> float:
  """Share of pixels outside [-1.1, 1.1] (centered data; [-0.05, 1.05] for data in [0, 1]),
  before any clipping: how far a sampler's output overshoots the data range."""
  x = np.asarray(x, np.float64)
  return float(np.mean(np.abs(x if centered else 2.0 * x - 1.0) > OUT_OF_RANGE))


def _to_unit(x: np.ndarray, centered: bool) -> np.ndarray:
  return np.clip((x + 1.0) / 2.0 if centered else x, 0.0, 1.0)


def _first_images(batches, count: int) -> np.ndarray:
  """The first `count` (unpadded) images of an eval iterator."""
  out, seen = [], 0
  for batch in batches:
    images = batch["image"][batch["mask"].astype(bool)] if "mask" in batch else batch["image"]
    out.append(np.asarray(images[: count - seen]))
    seen += len(out[-1])
    if seen >= count:
      break
  return np.concatenate(out)


def _denoising_error(config: Any, dataset, sde, score_fn, out_dir: str, key) -> dict:
  """eval/denoising_error.png and its numbers: test-set noise / data prediction error per noise
  level against the posterior mean of training images (evaluation.denoising)."""
  from sgm_jax.evaluation import denoising
  ev = config.eval
  n = int(_get(ev, "denoising_examples", 256))
  m = int(_get(ev, "denoising_reference", 2048))
  test = _first_images(dataset.eval_iterator("test", uniform_dequantization=False), n)
  reference = None
  if m > 0:
    reference = _first_images(dataset.eval_iterator("train", uniform_dequantization=False), m)
  ts = denoising.noise_levels(sde, int(_get(ev, "denoising_levels", 16)))
  batch = int(_get(ev, "batch_size", 128))
  result = denoising.denoising_error(jax.random.fold_in(key, 7), score_fn, sde,
                                     [test[i:i + batch] for i in range(0, len(test), batch)], ts,
                                     reference)
  path = denoising.plot_denoising_error(
      result, os.path.join(os.path.dirname(out_dir), "denoising_error.png"),
      title=f"{config.data.dataset} test images ({result.num_examples}), checkpoint "
            f"{os.path.basename(out_dir).replace('ckpt_', '')}: mean squared error per pixel")
  logging.info("denoising error per noise level written to %s", path)
  return dict(result.as_dict(), png=path)


# config.eval switches of run_eval's parts, and whether a part needs image data
EVAL_PARTS = {"loss": ("enable_loss", False), "bpd": ("enable_bpd", True),
              "denoising_error": ("enable_denoising_error", True),
              "sampling": ("enable_sampling", True)}


def _eval_parts(config: Any, images: bool) -> list[str]:
  """The parts of run_eval that config.eval enables and the data allows; an error if none is."""
  ev = config.eval
  enabled = [p for p, (flag, _) in EVAL_PARTS.items() if bool(_get(ev, flag, False))]
  parts = [p for p in enabled if images or not EVAL_PARTS[p][1]]
  if not parts:
    flags = ", ".join(f"eval.{flag}" for flag, _ in EVAL_PARTS.values())
    why = (f" ({', '.join(enabled)} need image data; dataset {config.data.dataset!r} has none)"
           if enabled else "")
    raise InputError(f"--mode eval has nothing to compute: config.eval enables none of {flags}"
                     f"{why}. Enable one, e.g. --config.eval.enable_loss=True")
  return parts


def _check_eval_sizes(config: Any, dataset, parts: list[str]) -> None:
  """Fail before any work when config.eval asks for more images than a split holds."""
  ev = config.eval
  needs = []
  if "denoising_error" in parts:
    needs += [("denoising_examples", 256, "test"), ("denoising_reference", 2048, "train")]
  if "sampling" in parts:
    needs += [("reference_examples", 2048, "train")]
  for field, default, split in needs:
    wanted, available = int(_get(ev, field, default)), dataset.num_examples(split)
    if wanted > available:
      raise InputError(f"eval.{field}={wanted} is more than the {available} images of the "
                       f"{split} split of {config.data.dataset!r}; set "
                       f"--config.eval.{field}={available} or less")


def _eval_loss(config: Any, dataset, sde, model, params, out_dir: str, key) -> dict:
  """The training loss (without dropout) on the test split, as score_sde's evaluation reports:
  the mean over every test example, padding excluded."""
  from tqdm import tqdm
  ev = config.eval
  loss_fn = jax.jit(loss_fn_from_config(config, sde, model, train=False))
  limit = int(_get(ev, "loss_num_examples", 10 ** 9))
  progress = _Progress(os.path.join(out_dir, "loss_test"))
  total = min(limit, dataset.num_examples("test"))
  bar = tqdm(total=total, desc="eval loss (test)", unit="img", dynamic_ncols=True)
  seen = 0
  for i, batch in enumerate(dataset.eval_iterator("test")):
    if seen >= limit:
      break
    images = batch["image"][batch["mask"].astype(bool)][: limit - seen]
    seen += len(images)
    if i not in progress.done:
      loss = loss_fn(params, jax.numpy.asarray(images), jax.random.fold_in(key, i))
      progress.add(i, loss=np.float64(loss), count=len(images))
    bar.update(len(images))
  bar.close()
  counts = progress.gather("count")
  return dict(loss=float(np.sum(progress.gather("loss") * counts) / np.sum(counts)),
              loss_examples=int(np.sum(counts)))


def _eval_bpd(config: Any, dataset, sde, score_fn, out_dir: str, key) -> dict:
  """Bits/dim of the split eval.bpd_dataset through the probability-flow ODE."""
  from tqdm import tqdm
  from sgm_jax import likelihood
  ev = config.eval
  centered = bool(config.data.centered)
  split = str(_get(ev, "bpd_dataset", "test"))
  limit = int(_get(ev, "bpd_num_examples", 10 ** 9))
  ll_fn = likelihood.get_likelihood_fn(
      sde, divergence=str(_get(ev, "divergence", "rademacher")),
      num_probes=int(_get(ev, "num_probes", 1)), rtol=float(_get(ev, "rtol", 1e-5)),
      atol=float(_get(ev, "atol", 1e-5)), eps=float(_get(ev, "likelihood_eps", 1e-5)))
  progress = _Progress(os.path.join(out_dir, f"bpd_{split}"))
  total = min(limit, dataset.num_examples(split))
  bar = tqdm(total=total, desc=f"bits/dim ({split})", unit="img", dynamic_ncols=True)
  seen = 0
  for i, batch in enumerate(dataset.eval_iterator(split, uniform_dequantization=False)):
    if seen >= limit:
      break
    mask = batch["mask"][: limit - seen].astype(bool)
    seen += int(mask.sum())
    if i not in progress.done:
      x01 = _to_unit(batch["image"][: len(mask)], centered)
      bpd, nfe = likelihood.bits_per_dim(jax.random.fold_in(key, i), ll_fn, score_fn, x01,
                                         centered, uniform_dequantization=True)
      progress.add(i, bpd=np.asarray(bpd)[mask], nfe=np.asarray(nfe))
    bar.update(int(mask.sum()))
    bar.set_postfix(bpd=f"{float(progress.gather('bpd').mean()):.3f}", refresh=False)
  bar.close()
  values = progress.gather("bpd")
  return dict(bpd=float(values.mean()), bpd_stderr=float(values.std() / np.sqrt(len(values))),
              bpd_examples=int(len(values)), bpd_split=split)


def _eval_samples(config: Any, workdir: str, dataset, sde, score_fn, out_dir: str, key,
                  sampler_name: str | None, num_steps: int | None, num_samples: int | None,
                  overrides: dict) -> dict:
  """FD (FD-EffNet, or FID with Inception weights), IS and the out-of-range share of samples."""
  from tqdm import tqdm
  from sgm_jax.evaluation import features, metrics
  ev = config.eval
  centered = bool(config.data.centered)
  example_shape = datasets.example_shape(dataset.spec)
  name = str(_get(ev, "feature_extractor", "effnet"))
  extractor = features.get_feature_extractor(name, _get(ev, "inception_weights", None) or None)
  sampler_name = sampler_name or str(_get(ev, "sampler", "deis"))
  num_steps = int(num_steps or _get(ev, "num_steps", 10))
  n = int(num_samples or _get(ev, "num_samples", 1024))
  if n < 1:
    raise InputError(f"num_samples must be >= 1, got {n}")
  options = sampler_options_from_config(config, sampler_name, overrides)
  batch = min(int(_get(config.sampling, "batch_size", 64)), n)
  sampler = sampling.get_sampler(sampler_name, sde, (batch,) + tuple(example_shape),
                                 num_steps=num_steps, **options)
  tag = f"{sampler_name}_{num_steps}" + "".join(f"_{k}-{v}" for k, v in sorted(options.items()))
  progress = _Progress(os.path.join(out_dir, f"samples_{tag}"))
  for i in tqdm(range(-(-n // batch)), desc=f"samples ({sampler_name})", unit="batch",
                dynamic_ncols=True):
    if i in progress.done:
      continue
    x, nfe = sampler(jax.random.fold_in(key, 10 ** 6 + i), score_fn)
    x = np.asarray(x)
    x01 = _to_unit(x, centered)
    feats = extractor(x01)
    progress.add(i, features=feats["features"], logits=feats["logits"], nfe=np.asarray(nfe),
                 out_of_range=out_of_range_share(x, centered), max_abs=np.abs(x).max(),
                 first=x01[:0] if i else x01)
  sample_features = progress.gather("features")[:n]
  png = os.path.join(out_dir, f"samples_{tag}.png")
  io_utils.save_image_grid(progress.done[0]["first"], png, data_range=(0.0, 1.0),
                           upscale=max(1, 128 // example_shape[0]))
  ref_count = int(_get(ev, "reference_examples", 2048))
  ref_batches = (dict(image=_to_unit(b["image"], centered), mask=b["mask"])
                 for b in dataset.eval_iterator("train", uniform_dequantization=False))
  cache = features.default_cache_path(os.path.join(workdir, "eval"), name,
                                      str(config.data.dataset), "train",
                                      int(config.data.image_size), ref_count)
  ref = features.dataset_statistics(extractor, ref_batches, cache,
                                    dataset=str(config.data.dataset), split="train",
                                    image_size=int(config.data.image_size), count=ref_count,
                                    available=dataset.num_examples("train"))
  mu, cov = metrics.gaussian_statistics(sample_features)
  fd = metrics.frechet_distance(mu, cov, ref.mean, ref.cov)
  probs = metrics.softmax(progress.gather("logits")[:n])
  is_mean, is_std = metrics.inception_score(probs, splits=min(10, n))
  return {features.METRIC_NAMES[name]: fd, f"IS ({name})": is_mean, f"IS ({name}) std": is_std,
          "num_samples": n, "reference_examples": ref_count, "sampler": sampler_name,
          "num_steps": num_steps, "nfe": float(progress.gather("nfe").mean()),
          "sampler_options": options,
          "out_of_range": float(progress.gather("out_of_range").mean()),
          "max_abs": float(progress.gather("max_abs").max()), "samples_png": png}


def run_eval(config: Any, workdir: str, checkpoint_step: Any = None,
             sampler_name: str | None = None, num_steps: int | None = None,
             num_samples: int | None = None, **sampler_options) -> dict:
  """`main.py --mode eval`: what config.eval enables of the test loss, test-set bits/dim, the
  denoising error per noise level and FD (FD-EffNet offline, or FID with Inception weights), IS
  and the out-of-range share of samples from the EMA parameters. The sampler is eval.sampler with
  the config's options (as --mode sample); `sampler_options` replace single ones. Each finished
  batch is saved under workdir/eval/ckpt_<step>/, so an interrupted evaluation resumes where it
  stopped; the summary is appended to workdir/eval/results.jsonl."""
  import json
  import time as time_lib

  sde, model, dataset = build(config)
  example_shape = datasets.example_shape(dataset.spec)
  parts = _eval_parts(config, images=len(example_shape) == 3)
  _check_eval_sizes(config, dataset, parts)
  params, step = restore_ema_params(config, workdir, model, example_shape, checkpoint_step)
  score_fn = score_fn_for(config, sde, model, params)
  out_dir = os.path.join(workdir, "eval", f"ckpt_{step}")
  os.makedirs(out_dir, exist_ok=True)
  result: dict[str, Any] = dict(checkpoint_step=step, time=time_lib.strftime("%Y-%m-%d %H:%M:%S"))
  key = jax.random.PRNGKey(int(config.seed) + 2)
  if "loss" in parts:
    result.update(_eval_loss(config, dataset, sde, model, params, out_dir, key))
  if "bpd" in parts:
    result.update(_eval_bpd(config, dataset, sde, score_fn, out_dir, key))
  if "denoising_error" in parts:
    result["denoising_error"] = _denoising_error(config, dataset, sde, score_fn, out_dir, key)
  if "sampling" in parts:
    result.update(_eval_samples(config, workdir, dataset, sde, score_fn, out_dir, key,
                                sampler_name, num_steps, num_samples, sampler_options))
  path = os.path.join(workdir, "eval", "results.jsonl")
  io_utils.append_line(path, json.dumps(result))
  result["results_file"] = path
  return result
