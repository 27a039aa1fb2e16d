"""`main.py --mode eval`: what config.eval enables of the test loss, test-set bits/dim, the
denoising error per noise level, and FD / IS / KID / out-of-range share of samples, for one
checkpoint or, when config.eval sets begin_ckpt and end_ckpt, for each checkpoint of that range.

Each finished batch is saved under workdir/eval/ckpt_<step>/ (outputs.BatchProgress) with the
settings its numbers depend on (the checkpoint, config.seed, the SDE, network and data, and the
part's own: sampler, options, steps, protocol, sizes, number of devices; `_part_settings`), so an
interrupted evaluation resumes where it stopped, and a batch of other settings is computed again,
never reused. Over a range of checkpoints, one whose summary (eval/ckpt_<step>/result.json) was
written with the same settings is not evaluated again.

`eval.protocol` chooses how samples are scored ('sgm_jax', or 'score_sde': samples quantized to
uint8 before the FID Inception, statistics of the whole training split, one Inception Score split);
a field of config.eval that is set (not None) replaces the protocol's value of it
(PROTOCOL_DEFAULTS).

Several processes (main.py --num_processes): samples and bits/dim are computed data-parallel over
every device of every process (parallel.map_batches) and gathered once per batch; every process
computes the test loss and the denoising error itself (small); the features of the samples and
the reference statistics are computed by process 0 alone, which writes every file. The finished
batches of a resumed evaluation are those every process can read (JobProgress).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Optional

import jax
import numpy as np

from sgm_jax import datasets, io_utils, parallel, sampling
from sgm_jax.checkpoints import CheckpointError, CheckpointStore, has_checkpoints
from sgm_jax.cli import outputs, setup, tuned_grid
from sgm_jax.errors import InputError

# config.eval switches of run_eval's parts, and whether a part needs image data
EVAL_PARTS = {"loss": ("enable_loss", False), "bpd": ("enable_bpd", True),
              "denoising_error": ("enable_denoising_error", True),
              "sampling": ("enable_sampling", True)}


def eval_parts(config: Any, images: bool) -> list[str]:
  """The parts of run_eval that config.eval enables and the data allows; an error if none is."""
  ev = config.eval
  enabled = [p for p, (flag, _) in EVAL_PARTS.items() if bool(setup.get_field(ev, flag, False))]
  parts = [p for p in enabled if images or not EVAL_PARTS[p][1]]
  if not parts:
    flags = ", ".join(f"eval.{flag}" for flag, _ in EVAL_PARTS.values())
    why = (f" ({', '.join(enabled)} need image data; dataset {config.data.dataset!r} has none)"
           if enabled else "")
    raise InputError(f"--mode eval has nothing to compute: config.eval enables none of {flags}"
                     f"{why}. Enable one, e.g. --config.eval.enable_loss=True")
  return parts


# How samples are scored. `None` values are taken from elsewhere in the config: score_sde samples
# with config.sampling.method in config.model.num_scales steps. reference_examples 0: every image
# of the training split.
PROTOCOL_DEFAULTS = {
    "sgm_jax": dict(feature_extractor="effnet", quantize_samples=False, reference_examples=2048,
                    inception_score_splits=10, sampler="deis", num_steps=10),
    "score_sde": dict(feature_extractor="inception", quantize_samples=True, reference_examples=0,
                      inception_score_splits=1, sampler=None, num_steps=None),
}


# The split whose images are the reference of a feature extractor's distances: the domain
# classifier is trained on the training split, so its reference is the test split it never saw.
REFERENCE_SPLITS = {"domain": "test"}


def reference_split(feature_extractor: str) -> str:
  return REFERENCE_SPLITS.get(feature_extractor, "train")


# Improved precision and recall compare at most this many samples with as many reference images
# (the first ones): their k-NN balls need all pairwise distances of each set.
PRECISION_RECALL_MAX = 10_000


@dataclasses.dataclass(frozen=True)
class SampleProtocol:
  """How `run_eval` scores samples, resolved from config.eval before any work."""

  name: str
  feature_extractor: str  # 'inception' (FID), 'effnet' (FD-EffNet) or 'domain' (FD-Domain)
  quantize_samples: bool  # score_sde: np.clip(x * 255, 0, 255).astype(uint8) before features
  reference_examples: Optional[int]  # training images of the reference statistics; None: all
  reference_statistics: str  # a statistics file used instead of the data ('' for none)
  inception_score_splits: int
  sampler: str
  num_steps: int


def sample_protocol(config: Any) -> SampleProtocol:
  """config.eval.protocol's values, each replaced by the config.eval field of its name unless that
  is absent or None (an ml_collections placeholder, which the command line can still set)."""
  ev = config.eval
  name = str(setup.get_field(ev, "protocol", "sgm_jax"))
  if name not in PROTOCOL_DEFAULTS:
    raise InputError(f"unknown eval.protocol {name!r}; valid protocols are "
                     f"{sorted(PROTOCOL_DEFAULTS)}")
  defaults = dict(PROTOCOL_DEFAULTS[name])
  if name == "score_sde":
    defaults["sampler"] = str(setup.get_field(config.sampling, "method", "pc")).lower()
    defaults["num_steps"] = int(config.model.num_scales)
  values = {k: setup.get_field(ev, k, None) for k in defaults}
  values = {k: defaults[k] if v is None else v for k, v in values.items()}
  from sgm_jax.evaluation.features import METRIC_NAMES
  if str(values["feature_extractor"]) not in METRIC_NAMES:
    raise InputError(f"unknown eval.feature_extractor {values['feature_extractor']!r}; choose from "
                     f"{sorted(METRIC_NAMES)}")
  count = int(values["reference_examples"])
  if count < 0:
    raise InputError(f"eval.reference_examples must be >= 0 (0: the whole training split), got "
                     f"{count}")
  splits = int(values["inception_score_splits"])
  if splits < 1:
    raise InputError(f"eval.inception_score_splits must be >= 1, got {splits}")
  return SampleProtocol(
      name=name, feature_extractor=str(values["feature_extractor"]),
      quantize_samples=bool(values["quantize_samples"]), reference_examples=count or None,
      reference_statistics=str(setup.get_field(ev, "reference_statistics", "") or ""),
      inception_score_splits=splits, sampler=str(values["sampler"]),
      num_steps=int(values["num_steps"]))


def check_eval_sizes(config: Any, dataset: datasets.Dataset, parts: list[str]) -> None:
  """Fail before any work when config.eval asks for more images than a split holds, or names a
  feature network's weights or a reference statistics file that do not exist."""
  ev = config.eval
  needs = []
  if "denoising_error" in parts:
    needs += [("denoising_examples", 256, "test"), ("denoising_reference", 2048, "train")]
  for field, default, split in needs:
    wanted, available = int(setup.get_field(ev, field, default)), dataset.num_examples(split)
    if wanted > available:
      raise InputError(f"eval.{field}={wanted} is more than the {available} images of the "
                       f"{split} split of {config.data.dataset!r}; set "
                       f"--config.eval.{field}={available} or less")
  if "sampling" not in parts:
    return
  protocol = sample_protocol(config)
  from sgm_jax.evaluation import features
  if protocol.feature_extractor == "domain":
    if dataset.labels("train") is None:
      raise InputError(f"eval.feature_extractor='domain' trains a classifier on the labels of "
                       f"{config.data.dataset!r}, which has none; eval.feature_extractor="
                       "'effnet' works without labels")
  else:
    features.resolve_weights(protocol.feature_extractor,
                             setup.get_field(ev, "inception_weights", None) or None)
  if protocol.reference_statistics:
    if not os.path.isfile(protocol.reference_statistics):
      raise InputError(f"eval.reference_statistics={protocol.reference_statistics!r} is not a "
                       "file")
    return
  split = reference_split(protocol.feature_extractor)
  wanted, available = protocol.reference_examples, dataset.num_examples(split)
  if wanted is not None and wanted > available:
    raise InputError(f"eval.reference_examples={wanted} is more than the {available} images of "
                     f"the {split} split of {config.data.dataset!r}; set "
                     f"--config.eval.reference_examples={available} or less (0: all of them)")


def checkpoint_range(config: Any) -> Optional[tuple[int, int]]:
  """(eval.begin_ckpt, eval.end_ckpt), or None when the config sets neither."""
  ev = config.eval
  begin, end = setup.get_field(ev, "begin_ckpt", None), setup.get_field(ev, "end_ckpt", None)
  if begin is None and end is None:
    return None
  if begin is None or end is None or int(begin) < 0 or int(begin) > int(end):
    raise InputError(f"eval.begin_ckpt and eval.end_ckpt must both be set with "
                     f"0 <= begin_ckpt <= end_ckpt, got {begin} and {end}")
  return int(begin), int(end)


def checkpoint_steps(config: Any, workdir: str) -> list[int]:
  """The training steps of the checkpoints eval.begin_ckpt..end_ckpt that `workdir` holds.

  score_sde numbers its checkpoints step // training.snapshot_freq, so checkpoint k is step
  k * snapshot_freq here. An error naming the steps there are when none of the range exists.
  """
  begin, end = checkpoint_range(config)
  freq = int(config.training.snapshot_freq)
  wanted = [k * freq for k in range(begin, end + 1)]
  stored: set[int] = set()
  if has_checkpoints(workdir):
    store = CheckpointStore(workdir)
    try:
      stored = {step for step, _ in store.all_steps()}
    finally:
      store.close()
  found = [step for step in wanted if step in stored]
  if not found:
    raise CheckpointError(
        f"no checkpoint of eval.begin_ckpt={begin}..eval.end_ckpt={end} (steps {wanted[0]}.."
        f"{wanted[-1]} at training.snapshot_freq={freq}) in {workdir}; it has steps "
        f"{sorted(stored)}. Choose the range with --config.eval.begin_ckpt / end_ckpt, or one "
        "checkpoint with --checkpoint_step")
  missing = sorted(set(wanted) - stored)
  if missing:
    logging.info("evaluating the %d checkpoints of steps %s; not in %s: steps %s", len(found),
                 found, workdir, missing)
  return found


def run_eval(config: Any, workdir: str, checkpoint_step: Any = None,
             sampler_name: str | None = None, num_steps: int | None = None,
             num_samples: int | None = None, nfe: int | None = None,
             **sampler_options) -> dict:
  """Evaluate the EMA parameters of the given checkpoint; without one, of every checkpoint of
  eval.begin_ckpt..end_ckpt that exists (when the config sets them), else of the latest.

  Over a range, checkpoints already evaluated with the same settings are skipped (their stored
  summary is used), and the last checkpoint's summary is returned with `checkpoints`, the
  summaries of all of them. See `evaluate_checkpoint` for what is computed. With `nfe`, the
  samples' sampler is the best for that budget of score evaluations (sampling/budget.py), or
  `sampler_name` in its most steps that fit.
  """
  if nfe is not None:
    resolved = setup.resolve_sampler(
        config, setup.sde_from_config(config),
        tuple(datasets.example_shape(datasets.from_config(config))), sampler_name, num_steps, nfe,
        sampler_options, "", lambda _: 0)
    sampler_name, num_steps, sampler_options = (resolved.sampler, resolved.num_steps,
                                                resolved.options)
  args = (sampler_name, num_steps, num_samples)
  if checkpoint_step is not None or checkpoint_range(config) is None:
    return evaluate_checkpoint(config, workdir, checkpoint_step, *args, **sampler_options)
  summaries = []
  # what evaluate_checkpoint builds from the config alone (the network, the abstract train state,
  # the loss, bits/dim and sampling programs, which take the parameters as arguments, and the
  # feature network): built for the first checkpoint evaluated, run again for the others
  programs = setup.ProgramCache()
  for step in checkpoint_steps(config, workdir):
    done = _finished_summary(workdir, step, _settings(config, *args, sampler_options))
    if parallel.any_process(done is None):  # one decision for every process
      done = None
    if done is not None:
      logging.info("checkpoint %d was evaluated with these settings already; skipped", step)
      summaries.append(done)
    else:
      summaries.append(evaluate_checkpoint(config, workdir, step, *args, programs=programs,
                                           **sampler_options))
  return dict(summaries[-1], checkpoints=summaries)


# config.training fields of the training loop alone (no effect on the loss or the score)
TRAINING_LOOP_FIELDS = ("n_iters", "batch_size", "n_jitted_steps", "log_freq", "eval_freq",
                        "snapshot_freq", "snapshot_freq_for_preemption", "keep_checkpoints",
                        "max_seconds")


def _section(section: Any, leave_out: tuple = ()) -> dict:
  """A config section as a dict, without the fields `leave_out`."""
  items = section.to_dict() if hasattr(section, "to_dict") else dict(vars(section))
  return {k: v for k, v in items.items() if k not in leave_out}


def _model_settings(config: Any) -> dict:
  """What every part's numbers depend on besides the checkpoint and the part's own settings:
  config.seed, the network and its SDE (config.model, config.training but its loop fields) and
  the data (config.data but its folder)."""
  return dict(seed=int(config.seed), model=_section(config.model),
              training=_section(config.training, TRAINING_LOOP_FIELDS),
              data=_section(config.data, ("data_dir",)))


# What a checkpoint's summary holds; one of an earlier format is made again (from the per-batch
# files its parts left). 2: KID.
SUMMARY_FORMAT = 2


def _settings(config: Any, sampler_name, num_steps, num_samples, sampler_options) -> dict:
  """What a checkpoint's evaluation depends on besides the checkpoint (JSON-normalized)."""
  ev = _section(config.eval, ("begin_ckpt", "end_ckpt"))
  settings = dict(_model_settings(config), summary_format=SUMMARY_FORMAT, eval=ev,
                  sampling=_section(config.sampling),
                  sampler=sampler_name, num_steps=num_steps, num_samples=num_samples,
                  sampler_options=sampler_options)
  return json.loads(outputs.settings_json(settings))


def _part_settings(config: Any, out_dir: str, **part) -> dict:
  """The settings of one part's per-batch progress files: `_model_settings`, the checkpoint (the
  directory out_dir names) and `part`."""
  return dict(_model_settings(config), checkpoint=os.path.basename(out_dir), **part)


def _summary_path(workdir: str, step: int) -> str:
  return os.path.join(workdir, "eval", f"ckpt_{step}", "result.json")


def _finished_summary(workdir: str, step: int, settings: dict) -> Optional[dict]:
  """The stored summary of checkpoint `step` if it was made with `settings`, else None."""
  try:
    with open(_summary_path(workdir, step)) as f:
      stored = json.load(f)
  except (OSError, ValueError):
    return None
  return stored.get("result") if stored.get("settings") == settings else None


def evaluate_checkpoint(config: Any, workdir: str, checkpoint_step: Any = None,
                        sampler_name: str | None = None, num_steps: int | None = None,
                        num_samples: int | None = None, *,
                        programs: setup.ProgramCache | None = None,
                        **sampler_options) -> dict:
  """Evaluate the EMA parameters of the latest (or the given) checkpoint.

  Computes what config.eval enables of the test loss, test-set bits/dim, the denoising error per
  noise level and FD (FD-EffNet offline, or FID with Inception weights), IS, KID and the
  out-of-range share of samples, scored as eval.protocol says (`sample_protocol`). The sampler is
  the protocol's (eval.sampler) with the config's options (as --mode sample); `sampler_options`
  replace single ones. The summary is appended to workdir/eval/results.jsonl and written, with
  the settings, to workdir/eval/ckpt_<step>/result.json. `programs`: those of an earlier
  checkpoint of the same config (run_eval's range), reused.
  """
  settings = _settings(config, sampler_name, num_steps, num_samples, sampler_options)
  programs = setup.ProgramCache() if programs is None else programs
  sde, model, dataset = programs.get_or_build("build", lambda: setup.build(config))
  example_shape = datasets.example_shape(dataset.spec)
  parts = eval_parts(config, images=len(example_shape) == 3)
  check_eval_sizes(config, dataset, parts)
  target = programs.get_or_build("target", lambda: setup.abstract_initial_state(
      config, model, example_shape, setup.optimizer_from_config(config).build()))
  params, step = setup.restore_ema_params(config, workdir, model, example_shape, checkpoint_step,
                                          target)
  score_fn = setup.score_fn_for(config, sde, model, params)
  out_dir = os.path.join(workdir, "eval", f"ckpt_{step}")
  if parallel.is_first_process():
    os.makedirs(out_dir, exist_ok=True)
  result: dict[str, Any] = dict(checkpoint_step=step, seed=int(config.seed),
                                time=time.strftime("%Y-%m-%d %H:%M:%S"))
  key = jax.random.PRNGKey(int(config.seed) + 2)
  if "loss" in parts:
    result.update(_eval_loss(config, dataset, sde, model, params, out_dir, key, programs))
  if "bpd" in parts:
    result.update(_eval_bpd(config, dataset, sde, score_fn, out_dir, key, programs))
  if "denoising_error" in parts:
    result["denoising_error"] = _denoising_error(config, dataset, sde, score_fn, out_dir, key)
  if "sampling" in parts:
    result.update(_eval_samples(config, workdir, dataset, sde, score_fn, out_dir, key,
                                sampler_name, num_steps, num_samples, sampler_options,
                                (step, params), programs))
  path = os.path.join(workdir, "eval", "results.jsonl")
  if parallel.is_first_process():
    io_utils.append_line(path, json.dumps(result))
  result["results_file"] = path
  if parallel.is_first_process():
    with io_utils.atomic_write(_summary_path(workdir, step), "w") as f:
      json.dump(dict(result=result, settings=settings), f)
  parallel.sync_processes(f"eval of checkpoint {step}")  # the summary is there for every process
  return result


class JobProgress(outputs.BatchProgress):
  """outputs.BatchProgress of a job of one or several processes: every process reads the
  finished batches of `directory` (of `settings`), those that every process could read count as
  done (one decision for all, so all of them compute the same batches together), and only process
  0 writes (every process keeps the results it adds)."""

  def __init__(self, directory: str, num_batches: int, settings: dict):
    super().__init__(directory, settings)
    read = [i in self.done for i in range(num_batches)]
    agreed = parallel.every_process(read)  # after every process has read: no write before
    self.done = {i: v for i, v in self.done.items() if i < num_batches and agreed[i]}

  def add(self, i: int, **arrays) -> None:
    if parallel.is_first_process():
      super().add(i, **arrays)
    else:
      self.done[i] = {k: np.atleast_1d(np.asarray(v)) for k, v in arrays.items()}


def _to_unit(x: np.ndarray, centered: bool) -> np.ndarray:
  return np.clip((x + 1.0) / 2.0 if centered else x, 0.0, 1.0)


def _whole_batches(dataset, split: str, **kwargs):
  """The eval batches of `split`, whole in every process (not the process's slice the data
  pipeline gives by default): every process computes the same numbers, or splits a batch over
  all devices itself (parallel.from_global_batch)."""
  return dataset.eval_iterator(split, process_index=0, process_count=1, **kwargs)


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


def _eval_loss(config: Any, dataset, sde, model, params, out_dir: str, key,
               programs: setup.ProgramCache) -> dict:
  """The training loss (without dropout) on the test split, as score_sde's evaluation reports:
  the mean over every test example, padding excluded."""
  from tqdm import tqdm
  ev = config.eval
  loss_fn = programs.get_or_build(
      "loss", lambda: jax.jit(setup.loss_fn_from_config(config, sde, model, train=False)))
  limit = int(setup.get_field(ev, "loss_num_examples", 10 ** 9))
  total = min(limit, dataset.num_examples("test"))
  # Every process computes the loss itself (on one device): small next to sampling.
  settings = _part_settings(config, out_dir, part="loss", examples=total,
                            batch_size=dataset.spec.eval_batch_size)
  progress = JobProgress(os.path.join(out_dir, "loss_test"), total, settings)
  bar = tqdm(total=total, desc="eval loss (test)", unit="img", dynamic_ncols=True,
             disable=not parallel.is_first_process())
  seen = 0
  for i, batch in enumerate(_whole_batches(dataset, "test")):
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


def bpd_batch_fn(config: Any, sde) -> Any:
  """--mode eval's bits/dim program over every device: f((score_fn, batch_key), x01) -> (bits/dim
  per image, NFE per device), both replicated inputs, x01 a global batch in [0, 1] split over the
  devices; each device solves its block's probability-flow ODE (config.eval's divergence, probes,
  tolerances) with its own adaptive steps and the batch key folded with its index."""
  from sgm_jax import likelihood
  ev = config.eval
  centered = bool(config.data.centered)
  ll_fn = likelihood.get_likelihood_fn(
      sde, divergence=str(setup.get_field(ev, "divergence", "rademacher")),
      num_probes=int(setup.get_field(ev, "num_probes", 1)),
      rtol=float(setup.get_field(ev, "rtol", 1e-5)), atol=float(setup.get_field(ev, "atol", 1e-5)),
      eps=float(setup.get_field(ev, "likelihood_eps", 1e-5)))

  def shard_bpd(shared, x01):
    score_fn, batch_key = shared
    bpd, nfe = likelihood.bits_per_dim(jax.random.fold_in(batch_key, parallel.device_index()),
                                       ll_fn, score_fn, x01, centered, uniform_dequantization=True)
    return bpd, jax.numpy.reshape(nfe, (1,))
  return parallel.map_batches(shard_bpd)


def _eval_bpd(config: Any, dataset, sde, score_fn, out_dir: str, key,
              programs: setup.ProgramCache) -> dict:
  """Bits/dim of the split eval.bpd_dataset through the probability-flow ODE.

  Each batch (padded to a multiple of the number of devices) is split over every device of every
  process; each device solves its own block's ODE with its own adaptive steps and its own key
  (the batch's key folded with the device index), and the values are gathered once per batch."""
  from tqdm import tqdm
  ev = config.eval
  centered = bool(config.data.centered)
  split = str(setup.get_field(ev, "bpd_dataset", "test"))
  limit = int(setup.get_field(ev, "bpd_num_examples", 10 ** 9))
  total = min(limit, dataset.num_examples(split))
  # each device solves its block's ODE with its own key: the values depend on the device count
  settings = _part_settings(config, out_dir, part="bpd", split=split, examples=total,
                            batch_size=dataset.spec.eval_batch_size,
                            devices=parallel.device_count(),
                            ode={k: setup.get_field(ev, k, None) for k in (
                                "divergence", "num_probes", "rtol", "atol", "likelihood_eps")})
  progress = JobProgress(os.path.join(out_dir, f"bpd_{split}"), total, settings)
  bpd_batch = programs.get_or_build("bpd", lambda: bpd_batch_fn(config, sde))
  shared_score_fn = parallel.replicate(score_fn)
  bar = tqdm(total=total, desc=f"bits/dim ({split})", unit="img", dynamic_ncols=True,
             disable=not parallel.is_first_process())
  seen = 0
  for i, batch in enumerate(_whole_batches(dataset, split, uniform_dequantization=False)):
    if seen >= limit:
      break
    mask = batch["mask"][: limit - seen].astype(bool)
    seen += int(mask.sum())
    if i not in progress.done:
      x01 = _to_unit(batch["image"][: len(mask)], centered)
      padding = parallel.padded_size(len(x01)) - len(x01)
      x01 = np.concatenate([x01, np.zeros((padding,) + x01.shape[1:], x01.dtype)])
      bpd, nfe = parallel.gather(bpd_batch(
          (shared_score_fn, parallel.replicate(jax.random.fold_in(key, i))),
          parallel.from_global_batch(x01)))
      progress.add(i, bpd=np.asarray(bpd)[: len(mask)][mask], nfe=np.asarray(nfe))
    bar.update(int(mask.sum()))
    bar.set_postfix(bpd=f"{float(progress.gather('bpd').mean()):.3f}", refresh=False)
  bar.close()
  values = progress.gather("bpd")
  return dict(bpd=float(values.mean()), bpd_stderr=float(values.std() / np.sqrt(len(values))),
              bpd_examples=int(len(values)), bpd_split=split)


def _denoising_error(config: Any, dataset, sde, score_fn, out_dir: str, key) -> dict:
  """eval/denoising_error.png and its numbers: test-set noise / data prediction error per noise
  level against the posterior mean of training images (evaluation.denoising)."""
  from sgm_jax.evaluation import denoising
  ev = config.eval
  n = int(setup.get_field(ev, "denoising_examples", 256))
  m = int(setup.get_field(ev, "denoising_reference", 2048))
  test = _first_images(_whole_batches(dataset, "test", uniform_dequantization=False), n)
  reference = None
  if m > 0:
    reference = _first_images(_whole_batches(dataset, "train", uniform_dequantization=False), m)
  ts = denoising.noise_levels(sde, int(setup.get_field(ev, "denoising_levels", 16)))
  batch = int(setup.get_field(ev, "batch_size", 128))
  result = denoising.denoising_error(jax.random.fold_in(key, 7), score_fn, sde,
                                     [test[i:i + batch] for i in range(0, len(test), batch)], ts,
                                     reference)
  # Every process computes it itself (on one device); process 0 writes the plot.
  path = os.path.join(os.path.dirname(out_dir), "denoising_error.png")
  if parallel.is_first_process():
    path = denoising.plot_denoising_error(
        result, path,
        title=f"{config.data.dataset} test images ({result.num_examples}), checkpoint "
              f"{os.path.basename(out_dir).replace('ckpt_', '')}: mean squared error per pixel")
    logging.info("denoising error per noise level written to %s", path)
  return dict(result.as_dict(), png=path)


def _reference_statistics(config: Any, workdir: str, dataset, extractor, protocol) -> tuple:
  """(FeatureStatistics, description) of the protocol's reference: a statistics file, or the
  features of eval.reference_examples (or all) images of the extractor's reference split (the
  training split; the test split for 'domain'), computed once and cached."""
  from sgm_jax.evaluation import features, statistics_files
  if protocol.reference_statistics:
    ref = statistics_files.load_reference_statistics(protocol.reference_statistics)
    if ref.mean.shape[0] != extractor.feature_dim:
      raise InputError(
          f"eval.reference_statistics {protocol.reference_statistics} holds {ref.mean.shape[0]}-d "
          f"features, but eval.feature_extractor={extractor.name!r} gives {extractor.feature_dim}"
          "; published FID statistics need eval.feature_extractor='inception'")
    return ref, protocol.reference_statistics
  centered = bool(config.data.centered)
  split = reference_split(extractor.name)
  available = dataset.num_examples(split)
  count = protocol.reference_examples or available
  ref_batches = (dict(image=_to_unit(b["image"], centered), mask=b["mask"])
                 for b in _whole_batches(dataset, split, uniform_dequantization=False))
  cache = features.default_cache_path(os.path.join(workdir, "eval"), extractor.name,
                                      str(config.data.dataset), split,
                                      int(config.data.image_size), count)
  ref = features.dataset_statistics(extractor, ref_batches, cache,
                                    dataset=str(config.data.dataset), split=split,
                                    image_size=int(config.data.image_size), count=count,
                                    available=available,
                                    keep_features=features.REFERENCE_FEATURES)
  return ref, f"{count} {'training' if split == 'train' else split} images"


_KID_REASONS_LOGGED: set = set()


def _kid(name: str, ref, sample_features: np.ndarray, reference: str) -> dict:
  """'KID (<name>)' of the samples against the reference's features as score_sde reports it
  (TF-GAN's block estimator, metrics.kernel_inception_distance_blocks, reference first) and its
  standard error; None and the reason why (logged once per reason) where the reference has no
  features (a mean/covariance-only statistics file) or too few rows per block."""
  from sgm_jax.evaluation import metrics
  label = f"KID ({name})"
  if ref.features is None:
    why = (f"the reference statistics {reference} hold a mean and covariance only, no features; "
           "KID needs features (score_sde's <dataset>_stats.npz has them as pool_3)")
  else:
    try:
      kid, stderr = metrics.kernel_inception_distance_blocks(ref.features, sample_features)
      return {label: kid, f"{label} stderr": None if np.isnan(stderr) else stderr,
              "kid_reference_examples": int(len(ref.features))}
    except InputError as e:
      why = str(e)
  if why not in _KID_REASONS_LOGGED:
    _KID_REASONS_LOGGED.add(why)
    logging.warning("%s not computed: %s", label, why)
  return {label: None, f"{label} unavailable": why}


def _precision_recall(name: str, ref, sample_features: np.ndarray) -> dict:
  """Improved precision and recall (Kynkaanniemi et al. 2019, k = 3) of the first m samples
  against the first m reference features, m = min(samples, reference features,
  PRECISION_RECALL_MAX); None where the reference has no features."""
  from sgm_jax.evaluation import metrics
  m = min(len(sample_features), PRECISION_RECALL_MAX,
          0 if ref.features is None else len(ref.features))
  if m < 4:
    return {f"precision ({name})": None, f"recall ({name})": None}
  precision, recall = metrics.precision_recall(ref.features[:m], sample_features[:m])
  return {f"precision ({name})": precision, f"recall ({name})": recall,
          "precision_recall_examples": m}


def _eval_samples(config: Any, workdir: str, dataset, sde, score_fn, out_dir: str, key,
                  sampler_name: str | None, num_steps: int | None, num_samples: int | None,
                  overrides: dict, checkpoint: tuple, programs: setup.ProgramCache) -> dict:
  """FD (FD-EffNet, or FID with Inception weights), IS, KID and the out-of-range share of
  samples, scored as eval.protocol says; the reference statistics are ready before any sample is
  drawn. KID is computed from the reference's features (the first features.REFERENCE_FEATURES
  training images, or a statistics file's pool_3); a statistics file of mean and covariance only
  gives none, and the row says why.

  Each batch of samples (padded to a multiple of the number of devices) is drawn by one compiled
  program over every device of every process (cli.setup.sample_shard_fn: sample j starts from
  the j-th prior draw, so a deterministic sampler gives the same samples on any number of devices)
  and gathered once; process 0 extracts their features and records the batch. `key` is unused:
  the samples' randomness comes from config.seed. `checkpoint`: (step, params) of score_fn, whose
  tuned time grid time_grid=tuned stands for (cli/tuned_grid.py)."""
  from tqdm import tqdm
  from sgm_jax.evaluation import features, metrics
  del key
  ev = config.eval
  protocol = sample_protocol(config)
  centered = bool(config.data.centered)
  example_shape = tuple(datasets.example_shape(dataset.spec))
  name = protocol.feature_extractor
  first_process = parallel.is_first_process()
  if first_process:  # features of the samples and the reference: process 0 alone
    if name == "domain":
      from sgm_jax.evaluation import domain
      build = lambda: domain.get_domain_extractor(str(config.data.dataset), dataset)
    else:
      build = lambda: features.get_feature_extractor(
          name, setup.get_field(ev, "inception_weights", None) or None)
    extractor = programs.get_or_build(("features", name), build)
    ref, reference = _reference_statistics(config, workdir, dataset, extractor, protocol)
  sampler_name = sampler_name or protocol.sampler
  num_steps = int(num_steps or protocol.num_steps)
  n = int(num_samples or setup.get_field(ev, "num_samples", 1024))
  if n < 1:
    raise InputError(f"num_samples must be >= 1, got {n}")
  options = setup.sampler_options_from_config(config, sampler_name, overrides)
  tag = f"{sampler_name}_{num_steps}" + "".join(f"_{k}-{v}" for k, v in sorted(options.items()))
  options = tuned_grid.resolve(config, workdir, options, sampler_name, num_steps, sde, score_fn,
                               example_shape, *checkpoint)
  batch = parallel.padded_size(min(int(setup.get_field(config.sampling, "batch_size", 64)), n))
  sample_batch = programs.get_or_build(
      ("samples", sampler_name, num_steps, setup.hashable(options), batch),
      lambda: parallel.map_batches(setup.sample_shard_fn(
          sampling.get_sampler(sampler_name, sde,
                               (batch // parallel.device_count(),) + example_shape,
                               num_steps=num_steps, **options), sde, example_shape)))
  # Eval's samples are not --mode sample's: their seed is another one.
  shared = parallel.replicate((score_fn, None, setup.sampling_keys(int(config.seed) + 10 ** 6)))
  no_labels = parallel.from_global_batch(np.zeros(batch, np.int32))
  scoring = f"{name}_uint8" if protocol.quantize_samples else name
  num_batches = -(-n // batch)
  # A stochastic sampler's noise depends on the batch and the number of devices.
  settings = _part_settings(config, out_dir, part="samples", sampler=sampler_name,
                            num_steps=num_steps, options=options, num_samples=n, batch_size=batch,
                            devices=parallel.device_count(),
                            features=name, quantized=protocol.quantize_samples,
                            weights=setup.get_field(ev, "inception_weights", None) or None)
  progress = JobProgress(os.path.join(out_dir, f"samples_{tag}_{scoring}"), num_batches,
                         settings)
  for i in tqdm(range(num_batches), desc=f"samples ({sampler_name})", unit="batch",
                dynamic_ncols=True, disable=not first_process):
    if i in progress.done:
      continue
    x, nfe = parallel.gather(sample_batch(shared + (parallel.replicate(np.int32(i * batch)),),
                                          no_labels))
    if not first_process:
      continue
    x = np.asarray(x)[: n - i * batch]  # samples i * batch .. n - 1 of the padded batch
    x01 = _to_unit(x, centered)
    feats = extractor(features.quantize_samples(x01) if protocol.quantize_samples else x01)
    progress.add(i, features=feats["features"], logits=feats["logits"], nfe=np.asarray(nfe),
                 out_of_range=outputs.out_of_range_share(x, centered), count=len(x),
                 max_abs=np.abs(x).max(), first=x01[:0] if i else x01)
  if not first_process:
    return {"num_samples": n}
  counts = progress.gather("count")
  sample_features = progress.gather("features")[:n]
  png = os.path.join(out_dir, f"samples_{tag}_seed{int(config.seed)}.png")
  io_utils.save_image_grid(progress.done[0]["first"], png, data_range=(0.0, 1.0),
                           upscale=max(1, 128 // example_shape[0]))
  mu, cov = metrics.gaussian_statistics(sample_features)
  fd = metrics.frechet_distance(mu, cov, ref.mean, ref.cov)
  probs = metrics.softmax(progress.gather("logits")[:n])
  is_mean, is_std = metrics.inception_score(probs,
                                            splits=min(protocol.inception_score_splits, n))
  return {features.METRIC_NAMES[name]: fd, f"IS ({name})": is_mean, f"IS ({name}) std": is_std,
          **_kid(name, ref, sample_features, reference),
          **_precision_recall(name, ref, sample_features),
          "num_samples": n, "reference_examples": ref.count or None, "reference": reference,
          "protocol": protocol.name, "quantized_samples": protocol.quantize_samples,
          "sampler": sampler_name, "num_steps": num_steps,
          "nfe": float(progress.gather("nfe").mean()), "sampler_options": options,
          "out_of_range": float(np.sum(progress.gather("out_of_range") * counts) / np.sum(counts)),
          "max_abs": float(progress.gather("max_abs").max()), "samples_png": png}
