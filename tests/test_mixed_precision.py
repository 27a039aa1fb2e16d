"""Mixed precision: config.model.dtype 'bfloat16' runs every network in bfloat16 with float32
parameters; the score, loss, optimizer, EMA, samplers and likelihood stay float32.

What is checked, and why these tests would see a real bug:
- the four reference families of tests/data/forward (shrunken original networks) in bfloat16 are
  within a measured tolerance of the float32 reference; the embedding computed in bfloat16 (sine
  arguments of ~1000 rad) fails it;
- the traced program of every network in bfloat16: every convolution and matmul has bfloat16
  operands (a layer left in float32 shows up), sines, reductions (normalization statistics,
  softmax) and the division by sigma are float32, and the parameter tree is the float32 one;
- normalization layers on bfloat16 input with a large mean are as exact as their float32 selves
  (statistics computed in bfloat16 are off by a few percent);
- a short Fashion-MNIST training in bfloat16 follows float32's loss within a band, with float32
  parameters, optimizer state, EMA and loss;
- samplers return float32 samples; the likelihood runs the network in float32 (bit-identical
  bits/dim); dtype and remat are not part of a workdir's identity (a run resumes and samples with
  them changed).
"""
from __future__ import annotations

import functools
import importlib
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
for path in (ROOT, TESTS):
  if path not in sys.path:
    sys.path.insert(0, path)

import test_forward_parity as parity  # noqa: E402
from sgm_jax import (datasets, likelihood, models, parallel, score, sde_lib,  # noqa: E402
                     train, workdir)
from sgm_jax.cli import setup  # noqa: E402
from sgm_jax.errors import InputError  # noqa: E402
from sgm_jax.models import layerspp, normalization  # noqa: E402
from sgm_jax.sampling import get_sampler  # noqa: E402

pytestmark = pytest.mark.usefixtures("fast_compiles")
BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)

# Relative error per example (parity.relative_errors: max of the l2 and the peak error) of the
# bfloat16 score against the float32 reference. Measured on this CPU (jitted, with and without
# XLA's optimizations): NCSN++ 0.031-0.069, DDPM++ 0.046-0.154, DDPM 0.020-0.034, NCSNv2
# 0.059-0.155. bfloat16 keeps 8 significant bits (rounding 2^-9 relative per operation); these
# randomly initialized networks amplify it: the float32 network with only its kernels perturbed
# by 2^-9 N(0, 1) relative already differs by 0.012-0.068. Tolerance: twice the largest
# measured error. The embedding computed in bfloat16 gives NCSN++ 0.32 and DDPM 0.13, and fails.
TOLERANCE = {"ve_cifar10_ncsnpp_continuous": 0.15, "vp_cifar10_ddpmpp_continuous": 0.3,
             "vp_ddpm_cifar10": 0.08, "ve_ncsnv2_cifar10": 0.3}
SCALES_BY_SIGMA = {"ve_cifar10_ncsnpp_continuous", "ve_ncsnv2_cifar10"}  # output / sigma: float32


# --- the program a network traces to --------------------------------------------------------------
def _equations(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(sub, jax_core.ClosedJaxpr):
          yield from _equations(sub.jaxpr)
        elif isinstance(sub, jax_core.Jaxpr):
          yield from _equations(sub)


def _operand_dtypes(closed) -> dict[str, set]:
  """primitive name -> the set of floating operand dtypes it is applied to in the ClosedJaxpr."""
  found: dict[str, set] = {}
  for eqn in _equations(closed.jaxpr):
    dtypes = {jnp.dtype(v.aval.dtype) for v in eqn.invars
              if hasattr(v.aval, "dtype") and jnp.issubdtype(v.aval.dtype, jnp.floating)}
    found.setdefault(eqn.primitive.name, set()).update(dtypes)
  return found


def check_computes_in_bfloat16(fn, *args) -> None:
  """Every convolution / matmul of fn(*args) has bfloat16 operands; every sine and cosine (time
  embeddings), sum (normalization statistics, means) and max (softmax) runs on float32."""
  check_jaxpr_computes_in_bfloat16(jax.make_jaxpr(fn)(*args))


def check_jaxpr_computes_in_bfloat16(closed) -> None:
  """check_computes_in_bfloat16 of a traced program (jax.make_jaxpr)."""
  found = _operand_dtypes(closed)
  matmuls = found.get("conv_general_dilated", set()) | found.get("dot_general", set())
  assert matmuls == {BF16}, f"convolutions / matmuls on {matmuls}"
  for name in ("sin", "cos", "reduce_sum", "reduce_max"):
    assert found.get(name, {F32}) == {F32}, f"{name} on {found[name]}"


def _tree_of(variables):
  return jax.tree_util.tree_map(lambda a: (a.shape, jnp.dtype(a.dtype)), variables)


def check_parameters_are_float32(model, *args):
  """model.clone(dtype=bfloat16) initializes the float32 model's tree: same paths, shapes and
  float32 leaves (traced only). Returns that tree (_tree_of)."""
  init = lambda m: jax.eval_shape(
      lambda k: m.init({"params": k, "dropout": k}, *args), jax.random.PRNGKey(0))
  f32 = init(model.clone(dtype=jnp.float32))
  bf16 = init(model.clone(dtype=jnp.bfloat16))
  assert _tree_of(bf16) == _tree_of(f32)
  assert {jnp.dtype(leaf.dtype) for leaf in jax.tree_util.tree_leaves(bf16)} == {F32}
  return _tree_of(bf16)


# --- the four reference families ------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _bf16_score(name: str):
  """Score of the family's bfloat16 network at the recorded (x, t)."""
  family = parity._family(name)
  model = family.model.clone(dtype=jnp.bfloat16)

  @jax.jit
  def forward(variables, x, t):
    return score.get_score_fn(family.sde, model, variables, continuous=family.continuous)(x, t)

  return forward(family.ema, jnp.asarray(family.io["x"]), jnp.asarray(family.io["t"]))


@functools.lru_cache(maxsize=None)
def _bf16_network_jaxpr(name: str):
  """The traced program of the family's bfloat16 network at the recorded (x, labels): its
  equations and output dtype are what the tests below check (a trace, no compilation)."""
  family = parity._family(name)
  model = family.model.clone(dtype=jnp.bfloat16)
  labels = family.sde.time_label(jnp.asarray(family.io["t"]), family.continuous)
  return jax.make_jaxpr(lambda v, x, l: model.apply(v, x, l))(
      family.ema, jnp.asarray(family.io["x"]), labels)


@pytest.fixture(scope="module", params=parity.FAMILIES)
def family(request):
  return parity._family(request.param)


def test_bfloat16_score_is_within_the_measured_tolerance_of_the_reference(family):
  errors = parity.relative_errors(np.asarray(_bf16_score(family.name)), family.io["score"])
  assert errors.max() < TOLERANCE[family.name], f"{family.name}: relative errors {errors}"
  # ... and it is rounding, not a float32 network: bfloat16 changes the output
  assert errors.min() > 1e-3, f"{family.name}: relative errors {errors}"


def test_bfloat16_output_dtype_and_float32_score(family):
  """The network's own output is bfloat16, or float32 where it is divided by sigma (in float32:
  a rounded sigma would scale every pixel of the example alike); the score is float32."""
  output = _bf16_network_jaxpr(family.name).out_avals[0]
  assert output.dtype == (F32 if family.name in SCALES_BY_SIGMA else BF16)
  assert _bf16_score(family.name).dtype == F32


def test_network_output_is_cast_back_to_float32_in_score_py():
  """What the losses and samplers get from a bfloat16 network is float32 also where no float32
  factor would promote it: the raw output of get_model_fn (score_sde's discrete losses) and an
  output that is the score itself."""
  family = parity._family("vp_ddpm_cifar10")
  model = family.model.clone(dtype=jnp.bfloat16)
  x = jnp.asarray(family.io["x"])
  labels = family.sde.time_label(jnp.asarray(family.io["t"]), family.continuous)
  # the dtypes of a trace are those of the computed arrays (run op by op, the calls took 10 s)
  assert jax.eval_shape(score.get_model_fn(model, family.ema), x, labels).dtype == F32
  fns, shape, sde = _digits_score_fns(parameterization="score")
  out = jax.eval_shape(fns["bfloat16"], jnp.zeros(shape), jnp.full((shape[0],), 0.5))
  assert out.dtype == F32


def test_bfloat16_network_computes_in_bfloat16_with_float32_precision_where_needed(family):
  check_jaxpr_computes_in_bfloat16(_bf16_network_jaxpr(family.name))


def test_bfloat16_network_has_the_float32_parameter_tree(family):
  x = jnp.asarray(family.io["x"])
  labels = family.sde.time_label(jnp.asarray(family.io["t"]), family.continuous)
  bf16_tree = check_parameters_are_float32(family.model, x, labels)
  # the converted float32 checkpoint is used as it is
  assert _tree_of(family.ema) == bf16_tree


# --- the small networks and the classifier --------------------------------------------------------
def _config(name: str, **model_fields):
  config = importlib.import_module(f"configs.{name}").get_config()
  for key, value in model_fields.items():
    setattr(config.model, key, value)
  return config


SMALL = {"fashion_mnist": dict(channels=(8, 16, 32, 64), embed_dim=32),  # ScoreNet
         "digits": dict(hidden_size=16, mix_patch_size=32, mix_hidden_size=32, num_blocks=2),
         "toy_2d": {}}  # MLP


def _small_network(name: str, dtype: str):
  config = _config(name, dtype=dtype, **SMALL[name])
  sde = sde_lib.from_config(config)
  shape = (2,) + tuple(datasets.example_shape(datasets.from_config(config)))
  return models.create_model(config, sde), shape, sde


@functools.lru_cache(maxsize=None)
def _small_variables(name: str):
  """Variables of the bfloat16 small network (float32 parameters), initialized once a file."""
  model, shape, _ = _small_network(name, "bfloat16")
  return models.init_model(model, jax.random.PRNGKey(0), shape, jnp.float32)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_networks_in_bfloat16(name):
  model, shape, sde = _small_network(name, "bfloat16")
  assert model.dtype == BF16
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  labels = sde.time_label(jnp.array([0.05, 0.7]), True)
  check_parameters_are_float32(model, x, labels)
  variables = _small_variables(name)
  if len(shape) == 4:  # the MLP has no convolution; its Dense layers are checked by the dtypes
    check_computes_in_bfloat16(lambda v, x, l: model.apply(v, x, l), variables, x, labels)
  f32, bf16 = (jax.jit(m.apply)(variables, x, labels) for m in (model.clone(dtype=jnp.float32),
                                                                 model))
  assert bf16.dtype in (BF16, F32) and f32.dtype == F32
  errors = parity.relative_errors(np.asarray(bf16, np.float32), np.asarray(f32))
  assert 1e-4 < errors.max() < 0.1, errors  # measured: at most 0.02 (random initialization)


def test_classifier_in_bfloat16_gives_float32_logits():
  from sgm_jax import controllable
  config = _config("fashion_mnist", dtype="bfloat16")
  with config.unlocked():  # WRN-10-1 has every layer kind of the default WRN-28-10
    config.classifier = dict(blocks_per_group=1, channel_multiplier=1)
  classifier = models.create_classifier(config)
  assert classifier.dtype == BF16
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 28, 28, 1))
  sigma = jnp.array([0.1, 5.0])
  check_parameters_are_float32(classifier, x, sigma)
  variables = models.init_model(classifier, jax.random.PRNGKey(0), x.shape, jnp.float32)
  check_computes_in_bfloat16(lambda v, x, s: classifier.apply(v, x, s), variables, x, sigma)
  sde = sde_lib.from_config(config)
  t = jnp.array([0.3, 0.8])
  # both in one program (op by op, the two calls took 4 s)
  logits = jax.jit(lambda params, x, t: {
      dt: controllable.NoiseConditionalLogits(classifier.clone(dtype=dt), sde)(params, x, t)
      for dt in ("float32", "bfloat16")})(variables["params"], x, t)
  assert logits["bfloat16"].dtype == F32
  errors = parity.relative_errors(np.asarray(logits["bfloat16"]), np.asarray(logits["float32"]))
  assert errors.max() < 0.1, errors  # measured 0.009 (WRN-10-1)


class _GroupNorm(nn.Module):
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    return layerspp.group_norm(x, self.dtype)


@pytest.mark.parametrize("layer", [_GroupNorm, normalization.InstanceNorm2dPlus,
                                   normalization.VarianceNorm2d])
def test_normalization_statistics_are_float32(layer):
  """bfloat16 input of mean ~10 and std ~1.1, every value exact in bfloat16 (8 + k / 16): with
  float32 statistics the bfloat16 layer is its float32 self up to rounding its output (measured
  2^-9 relative); a mean rounded to bfloat16 (ulp 1/16 at 10) is off by up to 3 %."""
  k = jax.random.randint(jax.random.PRNGKey(0), (2, 8, 8, 16), 0, 64)
  x = (8.0 + k / 16.0).astype(jnp.bfloat16)
  variables = layer().init(jax.random.PRNGKey(1), x.astype(jnp.float32))
  variables = jax.tree_util.tree_map(  # scales near 1, biases near 0, as trained ones
      lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(2), p.shape), variables)
  want = layer(dtype=jnp.float32).apply(variables, x.astype(jnp.float32))
  got = layer(dtype=jnp.bfloat16).apply(variables, x)
  assert got.dtype == BF16
  error = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))
  assert error < 2.0 ** -7, error


def test_model_dtype_is_validated():
  with pytest.raises(InputError, match=r"'float16'.*config.model.dtype.*\['bfloat16', 'float32'\]"):
    models.create_model(_config("digits", dtype="float16"), None)
  assert models.model_dtype(_config("digits")) == F32
  config = _config("digits")
  del config.model["dtype"]  # a config recorded before the field existed
  assert models.model_dtype(config) == F32


def test_every_config_computes_in_float32_by_default():
  names = []
  for folder, _, files in os.walk(os.path.join(ROOT, "configs")):
    for f in files:
      if f.endswith(".py") and f != "__init__.py":
        names.append(os.path.relpath(os.path.join(folder, f[:-3]), ROOT).replace(os.sep, "."))
  for name in sorted(names):
    module = importlib.import_module(name)
    if not hasattr(module, "get_config"):
      continue
    config = module.get_config()
    assert config.model.dtype == "float32" and config.model.remat is False, name
  assert len(names) > 20


# --- what stays float32 around a bfloat16 network -------------------------------------------------
def _digits_score_fns(parameterization=None):
  """Score functions of the (randomly initialized) digits Mixer in float32 and bfloat16, with the
  config's parameterization ('edm') or the given one."""
  model, shape, sde = _small_network("digits", "bfloat16")
  variables = _small_variables("digits")
  config = _config("digits")
  if parameterization is not None:
    config.model.parameterization = parameterization
  parameterization, sigma_data = setup.parameterization_from_config(config)
  fns = {dt: score.get_score_fn(sde, model.clone(dtype=dt), variables, continuous=True,
                                parameterization=parameterization, sigma_data=sigma_data)
         for dt in ("float32", "bfloat16")}
  return fns, shape, sde


@pytest.mark.parametrize("sampler", ["deis", "pc"])
def test_sampler_with_a_bfloat16_network_returns_float32_samples(sampler):
  fns, shape, sde = _digits_score_fns()
  x_T = sde.prior_sampling(jax.random.PRNGKey(3), shape)
  options = {"pc": dict(corrector="none")}.get(sampler, {})
  run = get_sampler(sampler, sde, shape, num_steps=4, **options)
  samples = {dt: run(jax.random.PRNGKey(4), fn, x_T=x_T)[0] for dt, fn in fns.items()}
  assert samples["bfloat16"].dtype == F32 and bool(jnp.all(jnp.isfinite(samples["bfloat16"])))
  errors = parity.relative_errors(np.asarray(samples["bfloat16"]), np.asarray(samples["float32"]))
  assert errors.max() < 0.05, errors  # measured 0.003-0.005


def test_likelihood_runs_the_network_in_float32():
  """bits/dim through the probability-flow ODE with a bfloat16 network's score function is the
  float32 network's, bit for bit (likelihood rebuilds it with score.with_network_dtype); so are
  the latents of get_encode_fn."""
  fns, shape, sde = _digits_score_fns()
  x01 = jax.random.randint(jax.random.PRNGKey(5), shape, 0, 256) / 255.0
  ll_fn = likelihood.get_likelihood_fn(sde, rtol=1e-3, atol=1e-3)
  bpd = {dt: likelihood.bits_per_dim(jax.random.PRNGKey(6), ll_fn, fn, x01, centered=True)
         for dt, fn in fns.items()}
  np.testing.assert_array_equal(bpd["bfloat16"][0], bpd["float32"][0])
  assert int(bpd["bfloat16"][1]) == int(bpd["float32"][1])
  encode = likelihood.get_encode_fn(sde, rtol=1e-3, atol=1e-3)
  z = {dt: encode(fn, 2 * x01 - 1)[0] for dt, fn in fns.items()}
  np.testing.assert_array_equal(z["bfloat16"], z["float32"])
  # the bfloat16 network itself gives other values (so the equality above is the rebuild's)
  x = 2 * x01 - 1
  t = jnp.full((shape[0],), 0.5)
  out = jax.jit(lambda x, t: {dt: fn(x, t) for dt, fn in fns.items()})(x, t)  # op by op: 3 s
  assert not np.array_equal(out["bfloat16"], out["float32"])


def test_with_network_dtype_rebuilds_network_score_functions_only():
  fns, shape, sde = _digits_score_fns()
  rebuilt = score.with_network_dtype(fns["bfloat16"], jnp.float32)
  assert rebuilt.func.model.dtype == F32 and fns["bfloat16"].func.model.dtype == BF16
  assert rebuilt.args[0] is fns["bfloat16"].args[0]  # the same variables
  eps_fn = score.with_network_dtype(score.get_eps_fn(sde, fns["bfloat16"]), jnp.float32)
  assert eps_fn.args[0].func.model.dtype == F32
  plain = lambda x, t: -x
  assert score.with_network_dtype(plain, jnp.float32) is plain


# --- a short Fashion-MNIST training ---------------------------------------------------------------
TRAIN_STEPS, STEPS_PER_CALL, WINDOW = 50, 1, 25


def _train_losses(dtype: str):
  """Losses of TRAIN_STEPS steps of a narrow Fashion-MNIST U-Net (batch 16), and the end state."""
  config = _config("fashion_mnist", dtype=dtype, **SMALL["fashion_mnist"])
  config.training.batch_size = 16
  config.optim.warmup = 20
  sde, model, dataset = setup.build(config)
  tx = setup.optimizer_from_config(config).build()
  state = parallel.replicate(setup.initial_state(config, model, (28, 28, 1), tx))
  step = parallel.fused_steps(train.make_train_step(
      setup.loss_fn_from_config(config, sde, model), tx, config.model.ema_rate, config.seed))
  losses = []
  for start in range(0, TRAIN_STEPS, STEPS_PER_CALL):
    images = np.stack([dataset.train_batch(i)["image"]
                       for i in range(start, start + STEPS_PER_CALL)])
    state, metrics = step(state, parallel.from_process_batches(images, axis=1))
    assert metrics["loss"].dtype == F32
    losses.append(np.asarray(metrics["loss"]).ravel())
  return np.concatenate(losses), jax.device_get(state)


def test_short_fashion_mnist_training_in_bfloat16_follows_float32():
  """Same data, keys and initial parameters: the per-step losses differ by the network's rounding
  (measured at most 4e-4 relative in the first 5 steps, the 25-step mean losses by at most 5e-4
  over 50 steps, 2.4e-3 over 100 and 2e-3 over 400). Band: 1 % per window, 0.5 % on each of the
  first 5 steps (bfloat16 parameters instead start 7-19 % off). Everything the optimizer touches
  is float32. 50 steps: the loss has dropped by a third, and two windows cost half of four."""
  try:
    datasets.get_dataset(datasets.from_config(_config("fashion_mnist"))).train_batch(0)
  except (datasets.DatasetNotFoundError, datasets.MissingDependencyError) as e:
    pytest.skip(f"Fashion-MNIST is not installed: {e}")
  f32, _ = _train_losses("float32")
  bf16, state = _train_losses("bfloat16")
  for name in ("params", "params_ema", "opt_state"):
    dtypes = {jnp.dtype(leaf.dtype) for leaf in jax.tree_util.tree_leaves(getattr(state, name))
              if jnp.issubdtype(leaf.dtype, jnp.floating)}
    assert dtypes == {F32}, (name, dtypes)
  first = np.abs(bf16[:5] - f32[:5]) / f32[:5]
  assert first.max() < 5e-3, first
  means = lambda losses: losses.reshape(-1, WINDOW).mean(1)
  relative = np.abs(means(bf16) - means(f32)) / means(f32)
  assert relative.max() < 1e-2, (means(f32), means(bf16))
  assert means(bf16)[-1] < 0.75 * means(bf16)[0]  # it trains: 1.31 -> 0.81 measured


# --- the workdir: dtype and remat are not its identity --------------------------------------------
def test_dtype_and_remat_are_not_part_of_the_workdir_identity(tmp_path):
  config = _config("toy_2d")
  workdir.check_or_record_config(str(tmp_path), config)
  changed = _config("toy_2d", dtype="bfloat16", remat=True)
  workdir.check_or_record_config(str(tmp_path), changed)  # no error
  other = _config("toy_2d", hidden=(64, 64), dtype="bfloat16")
  with pytest.raises(workdir.WorkdirError, match=r"model.hidden") as info:
    workdir.check_or_record_config(str(tmp_path), other)
  assert "model.dtype" not in str(info.value) and "model.remat" not in str(info.value)


def test_run_resumes_and_samples_with_dtype_and_remat_changed(tmp_path):
  from sgm_jax.cli.sample import run_sample
  from sgm_jax.cli.train import run_train
  config = _config("toy_2d")
  for key, value in dict(n_iters=2, batch_size=4, log_freq=1, snapshot_freq=2,
                         snapshot_freq_for_preemption=1).items():
    setattr(config.training, key, value)
  config.sampling.batch_size = config.sampling.num_samples = 4
  run_train(config, str(tmp_path))
  with config.unlocked():
    config.model.dtype, config.model.remat, config.training.n_iters = "bfloat16", True, 3
  state = run_train(config, str(tmp_path))
  assert int(state.step) == 3
  for leaf in jax.tree_util.tree_leaves(state.params):
    assert leaf.dtype == F32
  result = run_sample(config, str(tmp_path), "deis", num_steps=2, num_samples=3)
  assert result["checkpoint_step"] == 3
  with np.load(result["npz"]) as f:
    samples = f["samples"]
  assert samples.dtype == np.float32 and np.all(np.isfinite(samples))
