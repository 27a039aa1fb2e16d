"""`sgm_jax.load(workdir)`: a trained (or imported) workdir as one Python object.

    model = sgm_jax.load("runs/cifar10_ve")          # the newest checkpoint, its EMA parameters
    x = model.sample(64, sampler="deis", num_steps=10)  # (64, 32, 32, 3) in the data's range
    s = model.score_fn(x, t)                         # score_sde's time and score conventions

`main.py --mode sample` samples through `Model.sample_with_info`, so the command line and Python
give the same samples for the same settings (one copy of the sampling path). The config is the
one recorded in the workdir (config.json) unless one is passed.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Optional

import jax
import numpy as np

from sgm_jax import parallel, sampling
from sgm_jax.cli import setup, tuned_grid
from sgm_jax.errors import InputError, MissingFileError

# Model.sample's sampler when neither a sampler nor a budget (nfe) is given
DEFAULT_SAMPLER, DEFAULT_NUM_STEPS = "deis", 10
from sgm_jax.workdir import CONFIG_FILE


@dataclasses.dataclass(frozen=True)
class SampleResult:
  """What `Model.sample_with_info` drew."""

  samples: np.ndarray  # (num_samples, ...) in the data's range ([-1, 1] if data.centered, [0, 1])
  nfe: float  # score evaluations per batch (mean over batches)
  labels: Optional[np.ndarray]  # the class of each sample (class-conditional sampling), or None
  sampler: str
  num_steps: int
  options: dict  # the sampler options used: the config's, with the caller's replacing them
  # (time_grid=tuned as the grid it stands for)


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples the config files write (ch_mult, attn_resolutions, ...)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def recorded_config(workdir: str):
  """The full config recorded in workdir/config.json (by --mode train or --mode import)."""
  import ml_collections
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise MissingFileError(f"{path} does not exist: {workdir} is not a workdir of `main.py --mode "
                           "train` or `--mode import` (or pass its config: load(workdir, "
                           "config=...))")
  with open(path) as f:
    recorded = json.load(f).get("config")
  if not recorded:
    raise InputError(f"{path} records no full config (written by an older sgm-jax); pass the "
                     "config: load(workdir, config=...)")
  return ml_collections.ConfigDict(_tuples(recorded))


class Model:
  """A workdir's trained score model at one checkpoint (its EMA parameters)."""

  def __init__(self, config: Any, workdir: str, trained: setup.Trained):
    self.config = config
    self.workdir = workdir
    self._trained = trained
    self._programs = setup.ProgramCache()  # the compiled sampling programs (_sample_program)

  sde = property(lambda self: self._trained.sde)
  network = property(lambda self: self._trained.model)
  params = property(lambda self: self._trained.params, doc="EMA parameters of the checkpoint")
  step = property(lambda self: self._trained.step, doc="the checkpoint's training step")
  example_shape = property(lambda self: self._trained.example_shape)
  dataset = property(lambda self: self._trained.dataset, doc="the config's data (loaded lazily)")

  @property
  def score_fn(self) -> Callable:
    """score_fn(x, t) -> the score at (x, t): what every sampler gets (time in [0, T], the
    network's labels and output scaling as score_sde's get_score_fn)."""
    return self._trained.score_fn

  def sampler_options(self, sampler: str, options: dict) -> dict:
    """The options `sampler` runs with: the config's (pc's score_sde settings, score_scale), with
    `options` replacing single ones."""
    return setup.sampler_options_from_config(self.config, sampler, options)

  def sample(self, num_samples: int = 64, sampler: Optional[str] = None,
             num_steps: Optional[int] = None, seed: int = 0, *, nfe: Optional[int] = None,
             **options) -> np.ndarray:
    """`num_samples` samples in the data's range, e.g. sample(16, "pc", 1000),
    sample(64, "dpm_solver", 10, order=3) or sample(64, nfe=5) (the best sampler for 5 score
    evaluations, sampling/budget.py; with a sampler, its most steps within the budget). Without
    either, DEIS in 10 steps. The config's sampler settings apply (as in --mode sample); `options`
    replace single ones. Sample j depends on seed and j only, not on the batch size or the number
    of devices."""
    return self.sample_with_info(num_samples, sampler, num_steps, seed, nfe=nfe,
                                 **options).samples

  def sample_with_info(self, num_samples: int, sampler: Optional[str] = None,
                       num_steps: Optional[int] = None, seed: int = 0, *,
                       nfe: Optional[int] = None, batch_size: Optional[int] = None,
                       conditional: Any = None, progress: bool = False,
                       **options) -> SampleResult:
    """`sample`, with the NFE, labels and options. Batches of `batch_size` (default
    config.sampling.batch_size, 64) are split over every device of every process (all processes
    call it); `conditional` (cli/sample.py's class-conditional score) gives the score of
    p_t(x | y); `progress` shows a progress bar with rate and ETA."""
    from tqdm import tqdm
    resolved = setup.resolve_sampler(self.config, self.sde, self.example_shape, sampler,
                                     num_steps, nfe, options, DEFAULT_SAMPLER,
                                     lambda _: DEFAULT_NUM_STEPS)
    sampler, num_steps = resolved.sampler, resolved.num_steps
    num_samples = int(num_samples)
    if num_samples < 1:
      raise InputError(f"num_samples must be >= 1, got {num_samples}")
    options = tuned_grid.resolve(self.config, self.workdir,
                                 self.sampler_options(sampler, resolved.options), sampler,
                                 num_steps, self.sde, self.score_fn, self.example_shape,
                                 self.step, self.params)
    batch_size = int(batch_size or setup.get_field(self.config.sampling, "batch_size", 64))
    batch = parallel.padded_size(min(batch_size, num_samples))
    shape = (batch // parallel.device_count(),) + self.example_shape
    sample_batch = self._sample_program(sampler, num_steps, options, shape, conditional)
    shared = parallel.replicate((self.score_fn, None if conditional is None
                                 else conditional.log_prob_fn, setup.sampling_keys(int(seed))))
    outs, nfes, labels = [], [], []
    for i in tqdm(range(-(-num_samples // batch)), desc=f"sample {sampler}", unit="batch",
                  disable=not (progress and parallel.is_first_process())):
      y = (np.zeros(batch, np.int32) if conditional is None
           else conditional.labels(i * batch, batch))
      x, nfe = sample_batch(shared + (parallel.replicate(np.int32(i * batch)),),
                            parallel.from_global_batch(y))
      jax.block_until_ready(nfe)  # an honest progress bar; the samples stay on the devices
      outs.append(x)
      nfes.append(nfe)
      labels.append(y)
    outs, nfes = parallel.gather((outs, nfes))  # once, for all batches
    return SampleResult(
        samples=np.concatenate(outs)[:num_samples], nfe=float(np.mean(nfes)),
        labels=None if conditional is None else np.concatenate(labels)[:num_samples],
        sampler=sampler, num_steps=num_steps, options=options)

  def _sample_program(self, sampler: str, num_steps: int, options: dict, shape: tuple,
                      conditional: Any) -> Callable:
    """The data-parallel program of one sampler and batch shape (setup.sample_shard_fn): built and
    compiled at its first use, then reused by every call with the same settings, whatever the
    seed and number of samples (the seed's keys are its arguments). Class-conditional programs
    are built afresh (their score holds the classifier)."""
    build = lambda: parallel.map_batches(setup.sample_shard_fn(
        sampling.get_sampler(sampler, self.sde, shape, num_steps=num_steps, **options),
        self.sde, self.example_shape, conditional))
    if conditional is not None:
      return build()
    return self._programs.get_or_build((sampler, num_steps, setup.hashable(options), shape), build)

  def __repr__(self):
    return (f"sgm_jax.Model({self.workdir!r}, step {self.step}: {self.config.model.name}, "
            f"{type(self.sde).__name__}, examples {self.example_shape})")


def load(workdir: str, checkpoint_step: Optional[int] = None, config: Any = None) -> Model:
  """The workdir's model at its newest (or the given) checkpoint, with the config recorded there
  (or `config`)."""
  config = recorded_config(workdir) if config is None else config
  return Model(config, workdir, setup.restore_trained(config, workdir, checkpoint_step))
