"""Class-conditional sampling with a noise-conditional classifier (Song et al., ICLR 2021, Sec. 5,
Eq. 14 and App. I.1), and training of that classifier.

By Bayes' rule the score of p_t(x | y) is
    grad_x log p_t(x | y) = grad_x log p_t(x) + grad_x log p_t(y | x),          (Eq. 14)
so any sampler of get_sampler, run with `conditional_score_fn(score_fn, log_prob_fn, y, scale)`,
samples the class-conditional distribution (scale = 1; scale > 1 is classifier guidance,
Dhariwal & Nichol 2021). log_prob_fn(x, t, y) -> (B,) is log p_t(y | x(t)) per example.

Classifiers here are `logits_fn(params, x, t) -> (B, num_classes)` on noisy x_t. score_sde's
classifier (models/wideresnet.py) is conditioned on the VE noise scale sigma of data perturbed as
x + sigma z. Every SDE here has kernel x_t = alpha(t) x_0 + sigma(t) z, hence
    x_t / alpha(t) = x_0 + rho(t) z,   rho(t) = sigma(t) / alpha(t),
a VE-perturbed sample at noise scale rho(t). `NoiseConditionalLogits` therefore feeds the WRN
x_t / alpha(t) and rho(t): for VE (alpha = 1, rho = sigma) this is exactly score_sde's use; for VP
and sub-VP it is the equivalent VE noise level, and the chain rule through x / alpha gives the
1 / alpha factor of grad_x automatically.

score_sde's `get_logit_fn` (models/utils.py) standardizes each channel with the CIFAR-10 mean and
std of data in [0, 1] before its WRN, so its released classifier only gives the original's
log p_t(y | x) and gradient with that input normalization (`input_normalization=
"score_sde_cifar10"`); classifiers trained here see x_t / alpha(t) as it is (None).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sgm_jax.errors import InputError
from sgm_jax.sampling import base
from sgm_jax.sde_lib import SDE, batch_expand, batch_times

Array = jax.Array
Partial = jax.tree_util.Partial
LogitsFn = Callable[[Any, Array, Array], Array]


def _batch_labels(y: Array, x: Array) -> Array:
  return jnp.broadcast_to(jnp.asarray(y, jnp.int32), (x.shape[0],))


# --- the conditional score ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _ConditionalScore:
  """score(x, t) + scale * grad_x log p_t(y | x), the per-example gradient of a summed log-prob."""

  def __call__(self, score_fn: Callable, log_prob_fn: Callable, y: Array, scale: Array,
               x: Array, t: Array) -> Array:
    y = _batch_labels(y, x)
    grad = jax.grad(lambda v: jnp.sum(log_prob_fn(v, t, y)))(x)
    return score_fn(x, t) + scale.astype(x.dtype) * grad.astype(x.dtype)


def conditional_score_fn(score_fn: Callable, log_prob_fn: Callable, y, scale: float = 1.0
                         ) -> Partial:
  """score_fn of p_t(x | y) (Eq. 14) with classifier weight `scale`, for any sampler.

  y is a scalar class or a (B,) array of classes; y, scale and the arguments of Partial score_fn /
  log_prob_fn are traced, so new labels or parameters reuse a compiled sampler. log_prob_fn must be
  per-example (its gradient is taken through the batch sum).
  """
  if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, jax.Array)):
    raise InputError(f"scale must be a number, got {scale!r}")
  return Partial(_ConditionalScore(), base.as_traceable(score_fn), base.as_traceable(log_prob_fn),
                 jnp.asarray(y, jnp.int32), jnp.asarray(scale, jnp.float32))


def log_prob_from_logits(logits: Array, y: Array) -> Array:
  """log softmax(logits)[y] per example, (B,)."""
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(log_p, y[:, None], axis=-1)[:, 0]


@dataclasses.dataclass(frozen=True)
class _LogitsLogProb:
  logits_fn: LogitsFn

  def __call__(self, params, x: Array, t: Array, y: Array) -> Array:
    logits = self.logits_fn(params, x, batch_times(t, x, x.dtype))
    return log_prob_from_logits(logits, _batch_labels(y, x))


def classifier_log_prob_fn(logits_fn: LogitsFn, params) -> Partial:
  """log_prob_fn(x, t, y) = log p_t(y | x) of a classifier logits_fn(params, x, t); params traced.

  logits_fn must be hashable (a frozen dataclass such as NoiseConditionalLogits, or a module-level
  function) so that the compiled sampler is reused.
  """
  return Partial(_LogitsLogProb(logits_fn), params)


# --- score_sde's noise-conditional WRN -------------------------------------------------------
# name -> (per-channel mean, per-channel std) subtracted from / dividing the classifier's input.
INPUT_NORMALIZATIONS = {
    # score_sde models/utils.py get_logit_fn: CIFAR-10 channel statistics of data in [0, 1].
    "score_sde_cifar10": ((0.49139968, 0.48215841, 0.44653091),
                          (0.24703223, 0.24348513, 0.26158784)),
}
Normalization = Optional[tuple[tuple[float, ...], tuple[float, ...]]]


def input_normalization_values(normalization: Any) -> Normalization:
  """(mean, std) tuples of an input normalization: None (none), a name of INPUT_NORMALIZATIONS,
  or a (mean, std) pair of per-channel sequences (std > 0)."""
  if normalization is None:
    return None
  if isinstance(normalization, str):
    if normalization not in INPUT_NORMALIZATIONS:
      raise InputError(f"unknown input normalization {normalization!r}; valid values are "
                       f"{sorted(INPUT_NORMALIZATIONS)}, a (mean, std) pair, or None")
    return INPUT_NORMALIZATIONS[normalization]
  try:
    mean, std = normalization
    mean = tuple(float(m) for m in np.ravel(mean))
    std = tuple(float(s) for s in np.ravel(std))
  except (TypeError, ValueError):
    raise InputError(f"input normalization must be None, one of {sorted(INPUT_NORMALIZATIONS)} "
                     f"or a (mean, std) pair of per-channel sequences, got {normalization!r}"
                     ) from None
  if not mean or len(mean) != len(std) or not all(s > 0 for s in std):
    raise InputError(f"input normalization needs as many means as stds (one per channel) and "
                     f"every std > 0, got mean {mean} and std {std}")
  return mean, std


@dataclasses.dataclass(frozen=True)
class NoiseConditionalLogits:
  """logits(params, x_t, t) of a classifier conditioned on the VE noise scale (models/wideresnet):
  applied to x_t / alpha(t) at noise scale rho(t) = sigma(t) / alpha(t) (see the module doc),
  after the per-channel `input_normalization` ((x_t / alpha - mean) / std) if one is given.

  params is the bare parameter tree (score_sde's released classifier checkpoint format).
  `input_normalization`: None for classifiers trained here; "score_sde_cifar10" for converted
  score_sde classifiers (what its get_logit_fn does); or a (mean, std) pair.
  """

  model: nn.Module
  sde: SDE
  input_normalization: Any = None

  def __post_init__(self):
    object.__setattr__(self, "input_normalization",
                       input_normalization_values(self.input_normalization))

  def __call__(self, params, x: Array, t: Array) -> Array:
    t = batch_times(t, x, x.dtype)
    scaled = x / batch_expand(self.sde.alpha(t).astype(x.dtype), x)
    if self.input_normalization is not None:
      channels = len(self.input_normalization[0])
      if scaled.shape[-1] != channels:
        raise InputError(f"input normalization has {channels} channels, the images "
                         f"{scaled.shape[-1]} (shape {scaled.shape})")
      per_channel = (1,) * (scaled.ndim - 1) + (channels,)
      mean, std = (jnp.asarray(v, x.dtype).reshape(per_channel) for v in self.input_normalization)
      scaled = (scaled - mean) / std
    logits = self.model.apply({"params": params}, scaled, self.sde.rho(t).astype(x.dtype))
    return logits.astype(x.dtype)  # from the network's dtype (config.model.dtype)


def wrn_log_prob_fn(model: nn.Module, params, sde: SDE, *, input_normalization: Any) -> Partial:
  """log_prob_fn(x, t, y) of a noise-conditional WRN classifier under `sde`.

  `input_normalization` must be stated: "score_sde_cifar10" for score_sde's released classifier
  (converted with `python -m sgm_jax.convert --classifier`), None for one trained here
  (`train_classifier`, `--mode train_classifier`), or a (mean, std) pair.
  """
  return classifier_log_prob_fn(NoiseConditionalLogits(model, sde, input_normalization), params)


# --- the labelled Gaussian-mixture oracle ------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _MixtureClassLogProb:
  """Exact log p_t(y | x) = logsumexp_{k: label_k = y} log p_t(k | x) of a labelled mixture."""

  sde: SDE

  def __call__(self, mixture, x: Array, t: Array, y: Array) -> Array:
    log_joint, _, _ = mixture._log_joint(x, self.sde, batch_times(t, x, x.dtype))  # (B, K)
    log_r = jax.nn.log_softmax(log_joint, axis=-1)
    in_class = mixture.labels[None, :] == _batch_labels(y, x)[:, None]
    return jax.nn.logsumexp(jnp.where(in_class, log_r, -jnp.inf), axis=-1)


def mixture_log_prob_fn(mixture, sde: SDE) -> Partial:
  """log_prob_fn(x, t, y) of a labelled toy.GaussianMixture: the Bayes-optimal classifier of p_t."""
  if mixture.labels is None:
    raise InputError("the mixture has no component labels; build it with labels=... "
                     "(GaussianMixture.create or from_digits)")
  return Partial(_MixtureClassLogProb(sde), mixture)


def mixture_class_probs(mixture, x: Array, sde: Optional[SDE] = None, t=None) -> Array:
  """p_t(y | x) as (B, num_classes) for a labelled mixture (p_0 when sde is None)."""
  r = mixture.responsibilities(x, sde, t)
  num_classes = int(np.max(np.asarray(mixture.labels))) + 1
  return r @ jax.nn.one_hot(mixture.labels, num_classes, dtype=r.dtype)


# --- training the classifier on noisy data -------------------------------------------------------
def _unpack(batch) -> tuple[Array, Array]:
  if isinstance(batch, Mapping):
    return jnp.asarray(batch["image"]), jnp.asarray(batch["label"])
  x, y = batch
  return jnp.asarray(x), jnp.asarray(y)


def classifier_loss(params, batch, key: Array, *, sde: SDE, logits_fn: LogitsFn,
                    eps: float = 1e-5) -> Array:
  """Cross-entropy of logits_fn on x_t = alpha(t) x_0 + sigma(t) z, t ~ U(eps, T) per example."""
  x0, y = _unpack(batch)
  k_t, k_z = jax.random.split(key)
  t = jax.random.uniform(k_t, (x0.shape[0],), x0.dtype, eps, sde.T)
  mean, std = sde.marginal_prob(x0, t)
  x_t = mean + batch_expand(std, x0) * jax.random.normal(k_z, x0.shape, x0.dtype)
  return -jnp.mean(log_prob_from_logits(logits_fn(params, x_t, t), y.astype(jnp.int32)))


def train_classifier_step(params, opt_state, batch, key: Array, *, sde: SDE, logits_fn: LogitsFn,
                          optimizer, eps: float = 1e-5):
  """One optax step on `classifier_loss`: (params, opt_state, loss). Pure; jit it with the keyword
  arguments bound (see `get_classifier_train_step`)."""
  import optax
  loss, grads = jax.value_and_grad(classifier_loss)(params, batch, key, sde=sde,
                                                    logits_fn=logits_fn, eps=eps)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def get_classifier_train_step(sde: SDE, logits_fn: LogitsFn, optimizer, eps: float = 1e-5
                              ) -> Callable:
  """jit-compiled step(params, opt_state, batch, key) -> (params, opt_state, loss)."""
  if not 0 < eps < sde.T:
    raise InputError(f"eps must lie in (0, T={sde.T}), got {eps!r}")

  def step(params, opt_state, batch, key):
    return train_classifier_step(params, opt_state, batch, key, sde=sde, logits_fn=logits_fn,
                                 optimizer=optimizer, eps=eps)

  return jax.jit(step)


def train_classifier(key: Array, params, batches: Iterable, num_steps: int, *, sde: SDE,
                     logits_fn: LogitsFn, optimizer, eps: float = 1e-5, opt_state=None,
                     initial_step: int = 0,
                     log_fn: Optional[Callable[[int, float], None]] = None,
                     log_every: int = 100):
  """Train for num_steps batches from the iterator: (params, opt_state, losses as numpy (n,)).

  The key of step s is fold_in(key, s), so a run resumed at initial_step = s repeats the steps of
  an uninterrupted run. log_fn(step, loss) is called every log_every steps and at the end.
  """
  step_fn = get_classifier_train_step(sde, logits_fn, optimizer, eps)
  opt_state = optimizer.init(params) if opt_state is None else opt_state
  iterator: Iterator = iter(batches)
  losses = []
  for s in range(initial_step, initial_step + num_steps):
    params, opt_state, loss = step_fn(params, opt_state, next(iterator), jax.random.fold_in(key, s))
    losses.append(loss)
    if log_fn is not None and ((s + 1) % log_every == 0 or s + 1 == initial_step + num_steps):
      log_fn(s + 1, float(loss))
  return params, opt_state, np.asarray(jax.device_get(jnp.stack(losses))) if losses else np.zeros(0)
