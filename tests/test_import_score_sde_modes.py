"""Imported score_sde workdirs (`main.py --mode import`) in the modes tests/test_import_score_sde.py
does not run: class-conditional sampling through an imported score_sde classifier, and --mode
eval, inpaint, colorize, interpolate and train (continuing at the original's step and Adam
state).

The score models are the shrunken reference networks of tests/data/forward (original checkpoint
format, step 1234); the classifier is a tiny noise-conditional WRN written in score_sde's layout
(a bare parameter tree, flax 0.3.1 msgpack, GroupNorm scale/bias as (1, 1, 1, C)).
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import sgm_jax  # noqa: E402
from reference_data import FORWARD  # noqa: E402
from sgm_jax import controllable, convert, loading  # noqa: E402
from sgm_jax.checkpoints import CheckpointStore  # noqa: E402
from sgm_jax.cli import classifier, import_checkpoint, setup  # noqa: E402
from sgm_jax.errors import InputError  # noqa: E402
from sgm_jax.models.wideresnet import create_classifier  # noqa: E402
import prewarmed

pytestmark = pytest.mark.usefixtures("fast_compiles")

VE = "ve_cifar10_ncsnpp_continuous"  # VE, data in [0, 1]: what score_sde's classifier needs
SMALL = "vp_ddpm_cifar10"  # the fastest family through every mode (train, eval, ODE) here
STEP = 1234  # the reference checkpoints' training step
TINY_WRN = {"classifier.blocks_per_group": 1, "classifier.channel_multiplier": 1}
# score_sde's get_logit_fn (models/utils.py): CIFAR-10 channel statistics of data in [0, 1]
SCORE_SDE_MEAN = np.array([0.49139968, 0.48215841, 0.44653091], np.float32)
SCORE_SDE_STD = np.array([0.24703223, 0.24348513, 0.26158784], np.float32)
# the subprocesses compile as the in-process tests do (fast_compiles): XLA's optimizations only
# cost compile time at these sizes
ENV = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="true")


def _meta(family: str) -> dict:
  with open(os.path.join(FORWARD, family, "config.json")) as f:
    return json.load(f)


def _checkpoint(family: str) -> str:
  return os.path.join(FORWARD, family, "checkpoint_1")


def _overrides(family: str, extra: dict) -> dict:
  return dict(_meta(family)["overrides"], **extra)


def _config_flags(family: str, **extra) -> list[str]:
  """--config and the recorded overrides (plus `extra` fields), as a user types them."""
  shown = lambda v: f"({','.join(map(str, v))},)" if isinstance(v, list) else str(v)
  return [f"--config={os.path.join(ROOT, _meta(family)['source_config'])}"] + [
      f"--config.{k}={shown(v)}" for k, v in _overrides(family, extra).items()]


def _config(family: str, **extra):
  """The ConfigDict that _config_flags(family, **extra) describes."""
  config = importlib.import_module(os.path.splitext(_meta(family)["source_config"])[0].replace(
      "/", ".")).get_config()
  with config.unlocked():
    for key, value in _overrides(family, extra).items():
      section, field = key.split(".", 1)
      config[section][field] = tuple(value) if isinstance(value, list) else value
  return config


def _main(*args) -> subprocess.CompletedProcess:
  return prewarmed.run([sys.executable, os.path.join(ROOT, "main.py"), "--verbosity=-1", *args],
                       capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)


def _ok(result: subprocess.CompletedProcess) -> str:
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _summary(stdout: str, mode: str) -> dict:
  """The JSON of main.py's '<mode>: {...}' line (inpaint, colorize, interpolate)."""
  line = next(line for line in stdout.splitlines() if line.startswith(f"{mode}: "))
  return json.loads(line[len(mode) + 2:])


# --- class-conditional sampling through an imported score_sde classifier ------------------------


def _write_score_sde_classifier(path, params) -> None:
  """`params` as score_sde stored its classifier: a bare tree, GroupNorm scale/bias (1, 1, 1, C)."""
  legacy = {p: (np.asarray(v).reshape((1, 1, 1, -1)) if p[-2] in ("init_bn", "bn_2", "pre-pool-bn")
                else np.asarray(v)) for p, v in convert.flatten(params).items()}
  assert sum(np.shape(v)[:3] == (1, 1, 1) and np.ndim(v) == 4 for v in legacy.values()) > 3
  with open(path, "wb") as f:
    f.write(serialization.msgpack_serialize(convert.unflatten(legacy)))


def _tiny_wrn(channel_multiplier: int = 1):
  return create_classifier(num_classes=10, blocks_per_group=1,
                           channel_multiplier=channel_multiplier)


def _drawn_params(network, seed: int) -> dict:
  """Parameters for `network`, drawn on the host (its initializers' compile was 3 s of CPU):
  kernels as the WRN initializes them (convolutions N(0, 2 / fan_out), dense layers
  N(0, 1 / fan_in)), GroupNorm scales 1 + N(0, 0.1^2) and biases N(0, 0.1^2) (not flax's ones and
  zeros: a mixed-up scale, bias or GroupNorm layout changes the outputs)."""
  shapes = jax.eval_shape(network.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                          jnp.ones((1,)))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":
      var = 2 / np.prod(shape[:-2] + shape[-1:]) if len(shape) == 4 else 1 / shape[0]
      return (np.sqrt(var) * rng.standard_normal(shape)).astype(np.float32)
    return ((name == "scale") + 0.1 * rng.standard_normal(shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def guided(tmp_path_factory):
  """The VE reference model imported into a workdir, a tiny score_sde classifier imported there
  through main.py, and main.py's class-3 samples of it."""
  root = tmp_path_factory.mktemp("guided")
  workdir = str(root / "ve")
  import_checkpoint.run_import(_config(VE, **TINY_WRN), workdir, _checkpoint(VE))
  network = _tiny_wrn()
  params = _drawn_params(network, 6)
  # ten times the drawn output layer: log-probabilities far from uniform, a clear guidance term
  params = dict(params, Dense_2=jax.tree_util.tree_map(lambda v: 10.0 * v, params["Dense_2"]))
  source = str(root / "classifier_checkpoint")
  _write_score_sde_classifier(source, params)
  flags = _config_flags(VE, **TINY_WRN) + [f"--workdir={workdir}"]
  imported = _ok(_main("--mode=import", "--classifier", *flags, f"--checkpoint={source}"))
  sampled = _ok(_main("--mode=sample", *flags, "--class_label=3", "--classifier_scale=5",
                      "--sampler=deis", "--num_steps=4", "--num_samples=2"))
  return dict(workdir=workdir, flags=flags, network=network, params=params, source=source,
              imported=imported, sampled=sampled)


def test_the_imported_classifier_is_score_sde_s_with_its_input_normalization(guided):
  workdir = guided["workdir"]
  assert f"from {guided['source']}: classifier in " in guided["imported"], guided["imported"]
  with open(classifier.imported_classifier_file(workdir, ".json")) as f:
    record = json.load(f)
  assert (record["blocks_per_group"], record["channel_multiplier"], record["num_classes"]) == (
      1, 1, 10)
  config = loading.recorded_config(workdir)
  sde = setup.sde_from_config(config)
  log_prob_fn, step = classifier.load_classifier_log_prob(config, workdir, sde, (32, 32, 3))
  assert step is None
  network, params = guided["network"], guided["params"]
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x = 0.5 + 0.3 * jax.random.normal(keys[0], (3, 32, 32, 3))  # data-like, about [0, 1]
  t = jax.random.uniform(keys[1], (3,), minval=0.02, maxval=0.6)
  y = jax.random.randint(keys[2], (3,), 0, 10)

  def score_sde_log_prob(x, t, y):
    """score_sde's get_logit_fn and conditional PC sampler, written out: the WRN sees
    (x - mean) / std and the VE noise scale marginal_prob(0, t)[1]."""
    noise_scale = sde.marginal_prob(jnp.zeros_like(x), t)[1]
    mean, std = SCORE_SDE_MEAN[None, None, None, :], SCORE_SDE_STD[None, None, None, :]
    logits = network.apply({"params": params}, (x - mean) / std, noise_scale)
    return jax.nn.log_softmax(logits, axis=-1)[jnp.arange(x.shape[0]), y]

  unnormalized = controllable.wrn_log_prob_fn(network, params, sde, input_normalization=None)
  # one program for the three (compiled one by one: 1.8 times the CPU)
  got, want, plain = (np.asarray(v) for v in jax.jit(lambda x, t, y: [
      f(x, t, y) for f in (log_prob_fn, score_sde_log_prob, unnormalized)])(x, t, y))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.all(got < 0) and np.all(np.isfinite(got))
  assert np.abs(got - plain).min() > 1e-2  # the normalization matters for this classifier


def test_class_conditional_sampling_uses_the_imported_classifier(guided):
  out = guided["sampled"]
  assert f"2 samples of class 3 (classifier scale 5) by deis in 4 steps (4 score evaluations " \
         f"per batch) from " \
         f"checkpoint {STEP}" in out, out
  path = out.split(" and ")[-1].split(";")[0].strip()
  assert path.endswith(".npz") and "class3" in os.path.basename(path) and os.path.exists(path)
  with np.load(path) as f:
    guided_samples = f["samples"]
  assert guided_samples.shape == (2, 32, 32, 3) and np.isfinite(guided_samples).all()
  # --mode sample without --class_label draws through the same path (test_import_score_sde.py
  # checks that main.py and sgm_jax.load(...).sample agree to 1e-5): the same starting points,
  # so the classifier's gradient is the only difference.
  model = sgm_jax.load(guided["workdir"])
  plain = model.sample(2, sampler="deis", num_steps=4, seed=int(model.config.seed))
  assert np.isfinite(plain).all()
  change = np.abs(guided_samples - plain).max(axis=(1, 2, 3)) / np.abs(plain).max(axis=(1, 2, 3))
  assert change.min() > 1e-2, change


def test_a_classifier_of_other_sizes_is_an_error_and_writes_nothing(guided, tmp_path):
  workdir = str(tmp_path / "ve")
  shutil.copytree(guided["workdir"], workdir,
                  ignore=shutil.ignore_patterns(classifier.CLASSIFIER_DIR, "samples"))
  wider = _tiny_wrn(channel_multiplier=2)
  shapes = jax.eval_shape(wider.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                          jnp.ones((1,)))["params"]
  source = str(tmp_path / "wider_classifier")
  _write_score_sde_classifier(source, jax.tree_util.tree_map(
      lambda s: np.full(s.shape, 0.01, np.float32), shapes))
  result = _main("--mode=import", "--classifier", *_config_flags(VE, **TINY_WRN),
                 f"--workdir={workdir}", f"--checkpoint={source}")
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  assert "does not fit the WRN of config.classifier" in lines[0] and "network (" in lines[0]
  assert "--config.classifier.blocks_per_group" in lines[0]
  assert not os.path.exists(os.path.join(workdir, classifier.CLASSIFIER_DIR))


def test_a_second_classifier_import_is_refused_and_keeps_the_first(guided, tmp_path):
  workdir = guided["workdir"]
  files = {ext: classifier.imported_classifier_file(workdir, ext) for ext in (".msgpack", ".json")}
  before = {ext: open(path, "rb").read() for ext, path in files.items()}
  other = str(tmp_path / "other_classifier")  # one that would fit, with other parameters
  _write_score_sde_classifier(other, jax.tree_util.tree_map(lambda v: 2.0 * v, guided["params"]))
  with pytest.raises(InputError, match="already holds a classifier"):
    import_checkpoint.run_import(_config(VE, **TINY_WRN), workdir, other, import_classifier=True)
  assert {ext: open(path, "rb").read() for ext, path in files.items()} == before


# --- eval, inpaint, colorize, interpolate and train on an imported workdir ----------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """The DDPM reference model imported with local data (dataset 'npz': 8 training and 2 test
  images): (workdir, the flags every later mode repeats, their data fields)."""
  root = tmp_path_factory.mktemp("small")
  rng = np.random.default_rng(0)
  data_dir = root / "data"
  data_dir.mkdir()
  for split, count in (("train", 8), ("test", 2)):
    np.savez(data_dir / f"{split}.npz",
             images=rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
             labels=np.arange(count) % 10)
  data = {"data.dataset": "npz", "data.data_dir": str(data_dir)}
  workdir = str(root / "workdir")
  import_checkpoint.run_import(_config(SMALL, **data), workdir, _checkpoint(SMALL))
  return workdir, _config_flags(SMALL, **data) + [f"--workdir={workdir}"], data


# about 70 NFE per solve (1e-2: 130, 20 % more CPU for eval and interpolate); what these tests
# check (finite, positive bits/dim, a finite round trip) holds at any tolerance
ODE_TOL = 1e-1
ODE_TOLERANCES = [f"--config.eval.rtol={ODE_TOL}", f"--config.eval.atol={ODE_TOL}"]


def test_eval_of_an_imported_workdir(small):
  """The test loss and bits/dim through main.py (the sample part: the next test)."""
  workdir, flags, _ = small
  # the config's eval.begin_ckpt..end_ckpt (9..26 x snapshot_freq) is not step 1234
  out = _ok(_main("--mode=eval", *flags, f"--checkpoint_step={STEP}", "--config.eval.batch_size=2",
                  "--config.eval.enable_bpd=True", *ODE_TOLERANCES))
  assert out.startswith(f"evaluation of checkpoint {STEP}: "), out
  result = json.loads(out.splitlines()[0].split(": ", 1)[1])
  assert result["loss_examples"] == 2 and result["bpd_examples"] == 2
  assert np.isfinite(result["loss"]) and result["loss"] > 0
  assert np.isfinite(result["bpd"]) and result["bpd"] > 0
  with open(os.path.join(workdir, "eval", f"ckpt_{STEP}", "result.json")) as f:
    assert json.load(f)["result"]["bpd"] == result["bpd"]


def test_eval_samples_of_an_imported_workdir_under_score_sde_s_protocol(small, monkeypatch):
  """--mode eval's sample part (evaluate.run_eval, what main.py runs) with the config's protocol,
  score_sde's: uint8 samples, statistics of the whole training split, FID. A stand-in replaces
  the Inception network (compiling it takes half a minute here; test_evaluation_networks.py
  tests it): features are the channel means, logits three image statistics."""
  from sgm_jax.cli import evaluate
  from sgm_jax.evaluation import features
  seen = []

  def extractor(name, weights_path=None, *args, **kwargs):
    def network(variables, x):
      m, s = x.mean(axis=(1, 2, 3)), x.std(axis=(1, 2, 3))
      return x.mean(axis=(1, 2)), jnp.stack([m, m * m, s], axis=-1)

    def preprocess(images):
      seen.append(np.asarray(images))
      return (np.asarray(images, np.float32) / (255.0 if images.dtype == np.uint8 else 1.0))
    return features.FeatureExtractor(name, features.METRIC_NAMES[name], 3, 3, 32, 64,
                                     f"stand-in-{name}", preprocess, jax.jit(network), None)
  monkeypatch.setattr(features, "get_feature_extractor", extractor)
  monkeypatch.setattr(features, "resolve_weights", lambda name, path=None: "stand-in")
  workdir, _, data = small
  config = _config(SMALL, **data)
  config.eval.update(enable_loss=False, enable_sampling=True, batch_size=2)
  result = evaluate.run_eval(config, workdir, STEP, "deis", 2, 2)
  assert result["checkpoint_step"] == STEP and result["protocol"] == "score_sde"
  assert result["quantized_samples"] and result["reference_examples"] == 8  # the whole split
  assert np.isfinite(result["FID"]) and result["FID"] > 0 and result["num_samples"] == 2
  assert seen[-1].dtype == np.uint8 and sum(len(batch) for batch in seen) == 8 + 2


def _arrays(summary_path: str) -> dict:
  with np.load(summary_path[:-len(".json")] + ".npz") as f:
    return {k: f[k] for k in f.files}


def test_inpaint_of_an_imported_workdir(small):
  _, flags, _ = small
  out = _ok(_main("--mode=inpaint", *flags, "--sampler=deis", "--num_steps=2", "--num_samples=2"))
  summary = _summary(out, "inpaint")
  assert summary["checkpoint_step"] == STEP and summary["num_images"] == 2
  assert summary["known_pixel_max_abs_change"] == 0.0 and summary["unknown_fraction"] == 0.5
  arrays = _arrays(out.split("summary ")[-1].strip())
  assert arrays["result"].shape == (2, 32, 32, 3) and np.isfinite(arrays["result"]).all()
  assert not np.allclose(arrays["result"], arrays["inputs"])  # the right half is new


def test_colorize_of_an_imported_workdir(small):
  _, flags, _ = small
  out = _ok(_main("--mode=colorize", *flags, "--sampler=deis", "--num_steps=2", "--num_samples=2"))
  summary = _summary(out, "colorize")
  assert summary["checkpoint_step"] == STEP and summary["num_images"] == 2
  arrays = _arrays(out.split("summary ")[-1].strip())
  x = arrays["result"]
  assert x.shape == (2, 32, 32, 3) and np.isfinite(x).all()
  tolerance = 1e-5 * max(1.0, float(np.abs(x).max()))  # float32 rounding of the 3x3 transform
  assert summary["gray_max_abs_change"] < tolerance
  np.testing.assert_allclose(x.mean(axis=-1, keepdims=True), arrays["gray"], atol=tolerance)


def test_interpolate_of_an_imported_workdir(small):
  _, flags, _ = small
  out = _ok(_main("--mode=interpolate", *flags, "--num_samples=1", "--num_points=3",
                  *ODE_TOLERANCES))
  summary = _summary(out, "interpolate")
  assert summary["checkpoint_step"] == STEP and summary["num_pairs"] == 1
  assert summary["ode_rtol"] == summary["ode_atol"] == ODE_TOL and summary["nfe_per_pair"] > 0
  assert np.isfinite(summary["reconstruction_max_abs_error"])
  arrays = _arrays(out.split("summary ")[-1].strip())
  assert arrays["result"].shape == (1, 3, 32, 32, 3) and np.isfinite(arrays["result"]).all()


# main.py --mode train's run: two steps, one per call, from the imported step, both kept
TRAIN = {"training.n_iters": STEP + 2, "training.batch_size": 2, "training.snapshot_freq": 2,
         "training.n_jitted_steps": 1, "training.snapshot_sampling": False}


@pytest.fixture(scope="module")
def trained(small, tmp_path_factory):
  """main.py --mode train (TRAIN) on a copy of the imported workdir: (the copy, the run's
  result); checked by the next two tests."""
  workdir, flags, _ = small
  copy = str(tmp_path_factory.mktemp("trained") / "workdir")
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("eval", "controllable"))
  flags = [f for f in flags if not f.startswith("--workdir=")] + [f"--workdir={copy}"]
  result = _main("--mode=train", *flags, "--verbosity=0",
                 *(f"--config.{k}={v}" for k, v in TRAIN.items()))
  return copy, result


def test_train_continues_an_imported_workdir_at_its_step(trained):
  copy, result = trained
  out = _ok(result)
  assert f"resumed from step {STEP}" in result.stderr, result.stderr[-3000:]
  assert "trained to step 1236" in out, out
  assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == [str(STEP), "1236"]
  with open(os.path.join(copy, "train_log.csv")) as f:
    log = f.read().splitlines()
  assert any(line.startswith(f"# imported from {os.path.abspath(_checkpoint(SMALL))}")
             for line in log), log
  rows = [line.split(",") for line in log if line[:1].isdigit()]
  assert rows and min(int(r[0]) for r in rows) > STEP and int(rows[-1][0]) == 1236, log
  optim = _config(SMALL).optim  # the logged rate of step 1236: the warm-up's at 1235
  assert float(rows[-1][2]) == pytest.approx(optim.lr * 1235 / optim.warmup, rel=1e-6), log
  assert sgm_jax.load(copy).step == 1236
  store = CheckpointStore(copy)
  try:
    before, after = [store.periodic.restore(step)["params"] for step in (STEP, 1236)]
  finally:
    store.close()
  deltas = [float(np.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(after),
                                                       jax.tree_util.tree_leaves(before))]
  # Adam continues from the original's moments and step count (its bias correction and the
  # warm-up of the learning rate): most leaves move by 1e-3 or more in two steps. Counts restarted
  # at 0 would make the two rates 0 and 4e-8 (a median change of about 1e-6).
  assert np.median(deltas) > 1e-4, sorted(deltas)


def _adam_steps(params, mu, nu, count, step, grads_at, lr, warmup, clip, ema, ema_rate,
                b1=0.9, b2=0.999, eps=1e-8, n=2):
  """n training steps written out in float64: gradients clipped to global norm `clip`,
  flax.optim.Adam / optax.adam with moments mu, nu at `count`, learning rate
  lr * min(step / warmup, 1) (score_sde's optimize_fn), then the EMA."""
  f64 = lambda tree: {k: np.asarray(v, np.float64) for k, v in tree.items()}
  params, mu, nu, ema = f64(params), f64(mu), f64(nu), f64(ema)
  for _ in range(n):
    grads = f64(grads_at(params, step))
    norm = np.sqrt(sum(np.sum(g ** 2) for g in grads.values()))
    scale = min(1.0, clip / norm)
    count += 1
    rate = lr * min(step / warmup, 1.0)
    for k, g in grads.items():
      g = g * scale
      mu[k] = b1 * mu[k] + (1 - b1) * g
      nu[k] = b2 * nu[k] + (1 - b2) * g ** 2
      params[k] = params[k] - rate * (mu[k] / (1 - b1 ** count)) / (
          np.sqrt(nu[k] / (1 - b2 ** count)) + eps)
      ema[k] = ema_rate * ema[k] + (1 - ema_rate) * params[k]
    step += 1
  return params, ema


def test_training_continues_the_original_adam_state(small, trained):
  """The two steps of --mode train after the import (the `trained` run) equal Adam written out
  from the checkpoint's own moments and step count (warm-up and clipping as the config sets them:
  DDPM VP warms up over 5000 steps and clips gradients at 1)."""
  copy, result = trained
  _ok(result)
  with open(os.path.join(copy, "train_log.csv")) as f:
    assert f.readline() == "step,loss,lr\n" and f.readline().startswith("# imported from ")
  store = CheckpointStore(copy)
  try:
    state = store.periodic.restore(STEP + 2)
  finally:
    store.close()
  assert int(state["step"]) == STEP + 2
  config = _config(SMALL, **small[2], **TRAIN)  # what main.py trained with

  sde, model, dataset = setup.build(config)
  loss_fn = setup.loss_fn_from_config(config, sde, model)
  batches = dataset.batches_fn()(STEP)
  batch = {STEP: next(batches), STEP + 1: next(batches)}
  paths = sorted(convert.flatten(state["params"]))
  tree = lambda flat: convert.unflatten({p: jnp.asarray(flat["/".join(p)], jnp.float32)
                                         for p in paths})

  @jax.jit
  def grads(params, x, step):
    keys = jax.vmap(jax.random.fold_in, (None, 0))(
        jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), step), jnp.arange(x.shape[0]))
    mean = lambda p: jnp.mean(jax.vmap(lambda xi, k: loss_fn(p, xi[None], k))(x, keys))
    return jax.grad(mean)(params)

  def grads_at(flat_params, step):
    g = convert.flatten(grads(tree(flat_params), batch[step], step))
    return {"/".join(p): np.asarray(v) for p, v in g.items()}

  original = convert.load_training_dict(_checkpoint(SMALL))
  shapes = {p: np.shape(v) for p, v in convert.flatten(state["params"]).items()}
  named = lambda t: {"/".join(p): np.reshape(v, shapes[p]) for p, v in convert.flatten(t).items()}
  o = config.optim
  common = dict(mu=named(original["mu"]), nu=named(original["nu"]), step=STEP,
                grads_at=grads_at, lr=o.lr, warmup=o.warmup, clip=o.grad_clip,
                ema=named(original["params_ema"]), ema_rate=config.model.ema_rate)
  want, want_ema = _adam_steps(named(original["params"]), count=original["adam_count"], **common)
  got, got_ema = named(state["params"]), named(state["params_ema"])
  start = named(original["params"])
  moved = lambda a: np.concatenate([np.ravel(a[k] - start[k]) for k in sorted(start)])
  error = np.abs(moved(got) - moved(want)).max() / np.abs(moved(want)).max()
  assert error < 1e-3, error
  ema_start = named(original["params_ema"])
  ema_error = max(np.abs(got_ema[k] - want_ema[k]).max() for k in want_ema)
  ema_size = max(np.abs(want_ema[k]).max() for k in want_ema)
  ema_move = max(np.abs(want_ema[k] - ema_start[k]).max() for k in want_ema)
  assert ema_error < 1e-6 * ema_size and ema_move > 10 * ema_error, (ema_error, ema_move)
  # Discriminating: Adam restarted (count 0: bias correction of a first step) moves elsewhere.
  fresh, _ = _adam_steps(named(original["params"]), count=0, **common)
  assert np.abs(moved(fresh) - moved(want)).max() / np.abs(moved(want)).max() > 10 * error
