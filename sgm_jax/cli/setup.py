"""ConfigDict -> typed objects: the SDE, network, dataset, loss, optimizer, loop spec and sampler
options of a config, and the EMA parameters and score_fn of a workdir's checkpoint.

Library modules take explicit arguments; only this layer (and datasets/models' from_config) read
a ConfigDict. Every mode of main.py builds what it needs here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax import datasets, losses, models, parallel, sampling, score, sde_lib, train
from sgm_jax.checkpoints import CheckpointError, CheckpointStore, has_checkpoints
from sgm_jax.errors import InputError
from sgm_jax.sampling import budget, data_prediction


def get_field(section: Any, key: str, default: Any) -> Any:
  """section.key, or `default` when the config (a ConfigDict, dict or object) has no such key."""
  return section.get(key, default) if hasattr(section, "get") else getattr(section, key, default)


def sde_from_config(config: Any) -> sde_lib.SDE:
  """config.training.sde with config.model's constants (sde_lib.from_config)."""
  return sde_lib.from_config(config)


def loss_kind(config: Any, sde: sde_lib.SDE) -> str:
  """config.training.loss if set; else score_sde's choice: DSM in continuous time, the SMLD or
  DDPM loss for discrete VE or VP training."""
  kind = get_field(config.training, "loss", None)
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
  return get_field(m, "parameterization", None) or None, float(get_field(m, "sigma_data", 0.5))


def loss_weighting(config: Any) -> str:
  """config.training.weighting if set; else 'g2' with likelihood_weighting, 'sigma2' without."""
  t = config.training
  weighting = get_field(t, "weighting", None)
  if weighting:
    return str(weighting)
  return "g2" if bool(get_field(t, "likelihood_weighting", False)) else "sigma2"


def loss_fn_from_config(config: Any, sde: sde_lib.SDE, model, train: bool = True) -> Any:
  """The training loss of config.training; train=False: without dropout (evaluation)."""
  t = config.training
  parameterization, sigma_data = parameterization_from_config(config)
  return losses.get_loss_fn(
      sde, model, kind=loss_kind(config, sde), continuous=bool(t.continuous), train=train,
      reduce_mean=bool(get_field(t, "reduce_mean", False)), weighting=loss_weighting(config),
      eps=float(get_field(t, "eps", 1e-5)),
      importance_sampling=bool(get_field(t, "importance_sampling", False)),
      parameterization=parameterization, sigma_data=sigma_data,
      time_sampling=str(get_field(t, "time_sampling", "uniform")))


def optimizer_from_config(config: Any) -> train.OptimizerSpec:
  """config.optim as an OptimizerSpec (Adam is the only optimizer)."""
  o = config.optim
  name = str(get_field(o, "optimizer", "Adam"))
  if name.lower() != "adam":
    raise InputError(f"unknown optimizer {name!r} (config.optim.optimizer); valid values are "
                     "['Adam']")
  return train.OptimizerSpec(lr=float(o.lr), warmup=int(get_field(o, "warmup", 5000)),
                             grad_clip=float(get_field(o, "grad_clip", 1.0)),
                             beta1=float(get_field(o, "beta1", 0.9)),
                             eps=float(get_field(o, "eps", 1e-8)),
                             weight_decay=float(get_field(o, "weight_decay", 0.0)),
                             decay=str(get_field(o, "decay", "none")),
                             decay_steps=int(config.training.n_iters))


def loop_spec_from_config(config: Any) -> train.LoopSpec:
  """config.training's loop settings (steps, batch size, logging, snapshots, time limit)."""
  t = config.training
  max_seconds = get_field(t, "max_seconds", None)
  return train.LoopSpec(
      n_iters=int(t.n_iters), batch_size=int(t.batch_size),
      n_jitted_steps=int(get_field(t, "n_jitted_steps", 1)),
      log_freq=int(get_field(t, "log_freq", 50)),
      snapshot_freq=int(get_field(t, "snapshot_freq", 10000)),
      snapshot_freq_for_preemption=int(get_field(t, "snapshot_freq_for_preemption", 1000)),
      keep_checkpoints=int(get_field(t, "keep_checkpoints", 5)),
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


def restore_ema_params(config: Any, workdir: str, model, example_shape: tuple,
                       step: Any = None, target: Any = None) -> tuple[Any, int]:
  """EMA parameters of the latest (or the given) checkpoint in `workdir`, and its step. `target`:
  the config's abstract train state (`abstract_initial_state`), traced here if not given."""
  if not has_checkpoints(workdir):
    raise CheckpointError(f"no checkpoint in {workdir}; train first with --mode train")
  if target is None:
    target = abstract_initial_state(config, model, example_shape,
                                    optimizer_from_config(config).build())
  store = CheckpointStore(workdir, keep=int(get_field(config.training, "keep_checkpoints", 5)))
  try:
    if store.latest_step() is None:
      raise CheckpointError(f"no checkpoint in {workdir}; train first with --mode train")
    state = store.restore(target, None if step is None else int(step))
  finally:
    store.close()
  return state.params_ema, int(state.step)


def score_fn_for(config: Any, sde: sde_lib.SDE, model, params: Any):
  """The score of a trained network (EMA params), ready for samplers and likelihoods."""
  parameterization, sigma_data = parameterization_from_config(config)
  return score.get_score_fn(sde, model, {"params": params},
                            continuous=bool(config.training.continuous),
                            parameterization=parameterization, sigma_data=sigma_data)


@dataclasses.dataclass(frozen=True)
class Trained:
  """A workdir's trained model: what sampling modes need, built from the config and restored
  from a checkpoint (no data loaded, the network never run)."""

  sde: sde_lib.SDE
  model: Any
  dataset: datasets.Dataset
  example_shape: tuple  # one example's shape, from the config
  params: Any  # EMA parameters of the checkpoint
  step: int  # the checkpoint's step
  score_fn: Callable


def restore_trained(config: Any, workdir: str, checkpoint_step: Any = None) -> Trained:
  """The latest (or the given) checkpoint of `workdir` as a Trained model."""
  sde, model, dataset = build(config)
  example_shape = tuple(datasets.example_shape(dataset.spec))
  params, step = restore_ema_params(config, workdir, model, example_shape, checkpoint_step)
  return Trained(sde, model, dataset, example_shape, params, step,
                 score_fn_for(config, sde, model, params))


# config.sampling fields of score_sde's PC sampler -> the pc sampler's options
PC_CONFIG_OPTIONS = {"predictor": "predictor", "corrector": "corrector", "snr": "snr",
                     "n_steps_each": "n_steps_each", "noise_removal": "denoise",
                     "probability_flow": "probability_flow", "variant": "variant"}


def sampler_options_from_config(config: Any, sampler_name: str, overrides: dict) -> dict:
  """The options of `sampler_name`: for 'pc', the config's predictor-corrector settings
  (config.sampling.predictor, corrector, snr, n_steps_each, noise_removal, probability_flow,
  variant); for every sampler config.sampling.score_scale;
  `overrides` (--sampler_option) replace single entries and keep the rest. A score_scale of 1 (no
  scaling) is left out, so that its runs are named and cached as the unscaled ones."""
  s = config.sampling
  options = {"score_scale": get_field(s, "score_scale", None)}
  if sampler_name == "pc":
    options.update({option: get_field(s, field, None)
                    for field, option in PC_CONFIG_OPTIONS.items()})
  options = dict({k: v for k, v in options.items() if v is not None}, **overrides)
  if "score_scale" in options and data_prediction.check_score_scale(options["score_scale"]) is None:
    del options["score_scale"]  # 1: off
  return options


def resolve_sampler(config: Any, sde: sde_lib.SDE, example_shape: tuple, sampler_name: Any,
                    num_steps: Any, nfe: Any, overrides: dict, default_sampler: str,
                    default_steps: Callable[[str], int]) -> budget.Resolved:
  """The sampler, steps and options (overrides) of a request, with a budget of `nfe` score
  evaluations when given (sampling/budget.py: the best sampler for it, or `sampler_name`'s most
  steps that fit), counted with the options the run will have (the config's, then overrides)."""
  def nfe_of_steps(name: str, steps: int, options: dict) -> Optional[int]:
    options = sampler_options_from_config(config, name, options)
    built = sampling.get_sampler(name, sde, (1,) + tuple(example_shape), num_steps=steps,
                                 **options)
    return built.info.get("nfe")
  return budget.resolve(nfe, sampler_name, num_steps, overrides, nfe_of_steps, default_sampler,
                        default_steps)


def hashable(value: Any) -> Any:
  """Sampler options (numbers, strings, bools, time grids as lists or arrays, dicts of them) as a
  hashable value, equal for equal options (with their types: 2 and 2.0 stay apart): the key of
  compiled sampling programs that are reused (loading.Model, cli.evaluate)."""
  if isinstance(value, dict):
    return tuple(sorted((k, hashable(v)) for k, v in value.items()))
  if isinstance(value, (np.ndarray, jax.Array)):
    value = np.asarray(value).tolist()
  if isinstance(value, (list, tuple)):
    return ("sequence",) + tuple(hashable(v) for v in value)
  if isinstance(value, np.generic):
    value = value.item()
  return (type(value).__name__, value)


class ProgramCache(dict):
  """Compiled programs (and what they need: networks, restore targets, feature networks) kept by
  a key of the settings that change them, to be run again rather than traced and compiled anew:
  loading.Model's sampling programs, cli.evaluate's over a range of checkpoints."""

  def get_or_build(self, key: Any, build: Callable[[], Any]) -> Any:
    if key not in self:
      self[key] = build()
    return self[key]


def sampling_keys(seed: int) -> jax.Array:
  """The (prior key, noise key) pair of `sample_shard_fn` for `seed` (an argument of the program,
  so that one compiled program samples with every seed)."""
  return jax.random.split(jax.random.PRNGKey(seed + 1))


def sample_shard_fn(sampler, sde: sde_lib.SDE, example_shape: tuple, conditional: Any = None):
  """The samples of one device: fn((score_fn, log_prob_fn, keys, start), labels) -> (x, nfe[None])
  for global sample indices start + device_index * per_device + 0 .. per_device - 1, with keys =
  sampling_keys(seed).

  Sample j starts from the prior draw of fold_in(prior key, j), so a deterministic sampler gives
  sample j the same value for every batch size and number of devices or processes; stochastic
  samplers draw their noise from fold_in(noise key, the shard's first index). `conditional`, if
  given, turns the score into that of p_t(x | y): conditional.score_fn(score_fn, log_prob_fn, y)
  (cli/sample.py's class-conditional sampling)."""

  def fn(shared, y):
    score_fn, log_prob_fn, keys, start = shared
    prior_key, noise_key = keys[0], keys[1]
    index = start + parallel.global_example_index(y.shape[0])
    x_T = jax.vmap(lambda j: sde.prior_sampling(jax.random.fold_in(prior_key, j),
                                                example_shape))(index)
    if conditional is not None:
      score_fn = conditional.score_fn(score_fn, log_prob_fn, y)
    x, nfe = sampler(jax.random.fold_in(noise_key, index[0]), score_fn, x_T=x_T)
    return x, jnp.reshape(nfe, (1,)).astype(jnp.float32)
  return fn
