"""`main.py --mode import` and `sgm_jax.load` on the four original-format reference checkpoints
(tests/data/forward: shrunken score_sde networks with the original code's outputs).

An imported workdir must behave as if it had trained there: every mode reads it, its score is
the original code's, and --mode sample samples through the same code as
`sgm_jax.load(workdir).sample`. (That training continues the original's Adam state is
test_import_score_sde_modes.py's, on its --mode train run.)
"""
from __future__ import annotations

import functools
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
from sgm_jax import convert  # noqa: E402
from sgm_jax.cli import import_checkpoint  # noqa: E402
from sgm_jax.errors import InputError  # noqa: E402
import prewarmed
from _run_helpers import compiles_so_far

FAMILIES = ["ve_cifar10_ncsnpp_continuous", "vp_cifar10_ddpmpp_continuous", "vp_ddpm_cifar10",
            "ve_ncsnv2_cifar10"]
TOLERANCE = 1e-4  # relative, per example (the reference README)
pytestmark = pytest.mark.usefixtures("fast_compiles")
# the main.py subprocesses compile as the in-process tests do (fast_compiles): XLA's optimizations
# only cost compile time at these sizes, and main.py's programs that the test process builds too
# (test_main_and_python_sample_the_same_way) then come from the run's compilation cache
ENV = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="true")


def _meta(family: str) -> dict:
  with open(os.path.join(FORWARD, family, "config.json")) as f:
    return json.load(f)


def _checkpoint(family: str) -> str:
  return os.path.join(FORWARD, family, "checkpoint_1")


def _config_flags(family: str, **extra) -> list[str]:
  """--config and the recorded overrides, as a user types them (plus `extra` fields)."""
  meta = _meta(family)
  overrides = dict(meta["overrides"], **extra)
  shown = lambda v: f"({','.join(map(str, v))},)" if isinstance(v, list) else str(v)
  return [f"--config={os.path.join(ROOT, meta['source_config'])}"] + [
      f"--config.{k}={shown(v)}" for k, v in overrides.items()]


def _config(family: str, **extra):
  """The ConfigDict that _config_flags describes."""
  import importlib
  meta = _meta(family)
  config = importlib.import_module(os.path.splitext(meta["source_config"])[0].replace(
      "/", ".")).get_config()
  with config.unlocked():
    for key, value in dict(meta["overrides"], **extra).items():
      section, field = key.split(".", 1)
      config[section][field] = tuple(value) if isinstance(value, list) else value
  return config


def _main(*args) -> subprocess.CompletedProcess:
  return prewarmed.run([sys.executable, os.path.join(ROOT, "main.py"), "--verbosity=-1", *args],
                       capture_output=True, text=True, cwd=ROOT, env=ENV)


def _ok(result: subprocess.CompletedProcess) -> str:
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


# One compile of each network: called eagerly, op by op, the score took 3x the CPU time. The
# score function is an argument, so a second load of a workdir's network (the preemption
# snapshot's) reuses the compiled program.
_score = jax.jit(lambda score_fn, x, t: score_fn(x, t))
# sgm_jax.load of an imported workdir once per file (2-3 s of CPU each): the tests only read it
_load = functools.lru_cache(maxsize=None)(sgm_jax.load)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """{family: workdir} imported from each family's checkpoint_1: the first family through
  main.py, the others by import_checkpoint.run_import, what `main.py --mode import` calls with the
  config of _config_flags(family) (a main.py run each only repeated ~2.3 s of imports; every
  family's flags still go through main.py in
  test_main_samples_an_imported_workdir_with_score_sde_pc)."""
  root = tmp_path_factory.mktemp("imported")
  workdirs = {}
  for family in FAMILIES:
    workdir = str(root / family)
    if family == FAMILIES[0]:
      out = _ok(_main("--mode=import", *_config_flags(family), f"--workdir={workdir}",
                      f"--checkpoint={_checkpoint(family)}"))
      assert "checkpoint at step 1234" in out
    else:
      done = import_checkpoint.run_import(_config(family), workdir, _checkpoint(family))
      assert done["step"] == 1234
    workdirs[family] = workdir
  return workdirs


def _relative_errors(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  axes = tuple(range(1, got.ndim))
  return np.max(np.abs(got - want), axis=axes) / np.max(np.abs(want), axis=axes)


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_workdir_scores_as_the_original_code(imported, family):
  workdir = imported[family]
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1234"]
  with open(os.path.join(workdir, "train_log.csv")) as f:
    log = f.read()
  assert f"# imported from {os.path.abspath(_checkpoint(family))}" in log
  model = _load(workdir)
  assert model.step == 1234 and model.config.model.nf == _meta(family)["overrides"]["model.nf"]
  io = np.load(os.path.join(FORWARD, family, "io.npz"))
  score = _score(model.score_fn, jnp.asarray(io["x"]), jnp.asarray(io["t"]))
  assert _relative_errors(score, io["score"]).max() < TOLERANCE
  # The EMA parameters, not the live ones: these differ from the reference by about 1.
  live = convert.load_sampling_variables(_checkpoint(family), use_ema=False)["params"]
  flat_ema, flat_live = convert.flatten(model.params), convert.flatten(live)
  assert any(not np.allclose(flat_ema[p], np.reshape(flat_live[p], flat_ema[p].shape))
             for p in flat_ema)


def _pc_steps(family: str) -> int:
  """pc's steps in main.py: the loop and its NFE count are those of any number; score_sde's
  discrete VP steps need beta_max / steps < 1."""
  return 3 if family.startswith("ve") else 21


@functools.lru_cache(maxsize=None)
def _main_pc_samples(family: str, workdir: str) -> str:
  """The output of --mode sample with the config's sampler settings (pc with score_sde's own
  loop) on `family`'s imported workdir; run once, checked by two tests."""
  return _ok(_main("--mode=sample", *_config_flags(family), f"--workdir={workdir}",
                   "--sampler=pc", f"--num_steps={_pc_steps(family)}", "--num_samples=2"))


@pytest.mark.parametrize("family", FAMILIES)
def test_main_samples_an_imported_workdir_with_score_sde_pc(imported, family):
  """--mode sample with the config's sampler settings: pc with score_sde's own loop."""
  workdir = imported[family]
  out = _main_pc_samples(family, workdir)
  s = _config(family).sampling
  nfe = _pc_steps(family) * ((s.predictor != "none") + (s.corrector != "none") * s.n_steps_each)
  assert "from checkpoint 1234" in out and f"({nfe} score evaluations" in out, out
  npz = [f for f in os.listdir(os.path.join(workdir, "samples"))
         if f.startswith("pc") and "score_sde" in f and f.endswith(".npz")]
  assert len(npz) == 1, os.listdir(os.path.join(workdir, "samples"))
  samples = np.load(os.path.join(workdir, "samples", npz[0]))["samples"]
  assert samples.shape == (2, 32, 32, 3) and np.isfinite(samples).all()


def test_main_and_python_sample_the_same_way(imported):
  """--mode sample goes through sgm_jax.load(...).sample: the same samples for the same seed.
  main.py's run is the pc one above (its noise as well as its starting points must agree), of
  the smallest network in 3 steps; the test process's first program comes from the run's
  compilation cache."""
  family = FAMILIES[3]
  out = _main_pc_samples(family, imported[family])
  path = out.split(" and ")[-1].split(";")[0].strip()
  assert path.endswith(".npz") and os.path.exists(path), out
  from_main = np.load(path)["samples"]
  model = _load(imported[family])
  steps = _pc_steps(family)
  from_python = model.sample(2, sampler="pc", num_steps=steps, seed=int(model.config.seed))
  # equal up to float32 rounding (the test process compiles without XLA's optimizations)
  assert _relative_errors(from_python, from_main).max() < 1e-5
  # another seed runs the first call's compiled program (the keys are its arguments)
  compiles = compiles_so_far()
  other_seed = model.sample(2, sampler="pc", num_steps=steps, seed=int(model.config.seed) + 1)
  assert compiles_so_far() == compiles
  assert _relative_errors(other_seed, from_main).min() > 1e-2


def test_a_config_of_another_width_is_one_error_line_and_writes_nothing(tmp_path):
  family = FAMILIES[0]
  workdir = tmp_path / "wrong"
  result = _main("--mode=import", *_config_flags(family, **{"model.nf": 32}),
                 f"--workdir={workdir}", f"--checkpoint={_checkpoint(family)}")
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  # the first differing leaf in sorted order, with both shapes (nf 16 in the file, 32 asked)
  assert "AttnBlockpp_0/GroupNorm_0/bias: checkpoint (32,), network (64,)" in lines[0], lines[0]
  assert not workdir.exists()


def test_first_difference_names_the_first_path_and_both_shapes():
  tree = {"a": {"kernel": np.zeros((3, 16))}, "b": {"bias": np.zeros((16,))}}
  expected = {"a": {"kernel": jax.ShapeDtypeStruct((3, 32), jnp.float32)},
              "b": {"bias": jax.ShapeDtypeStruct((32,), jnp.float32)},
              "c": {"bias": jax.ShapeDtypeStruct((4,), jnp.float32)}}
  assert convert.first_difference(tree, expected) == (
      "a/kernel: checkpoint (3, 16), network (3, 32) (3 of 3 leaf paths differ)")
  assert convert.first_difference({"b": tree["b"]}, {"b": expected["b"], "a": expected["a"]}) == (
      "a/kernel: checkpoint absent, network (3, 32) (2 of 2 leaf paths differ)")
  assert convert.first_difference(tree, {"a": {"kernel": jax.ShapeDtypeStruct((3, 16), "f")},
                                         "b": {"bias": jax.ShapeDtypeStruct((16,), "f")}}) is None


def test_a_workdir_with_checkpoints_is_refused_and_kept(imported, tmp_path):
  family = FAMILIES[0]
  workdir = str(tmp_path / "copy")
  shutil.copytree(imported[family], workdir)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(InputError, match="already holds checkpoints"):
    import_checkpoint.run_import(_config(family), workdir, _checkpoint(family))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def _with_step(path: str, step: int) -> bytes:
  """The bytes of the checkpoint at `path` with its recorded training step changed."""
  state = dict(convert.read_msgpack(path))
  state["step"] = np.asarray(step, np.int32)
  return serialization.msgpack_serialize(state)


def test_score_sde_layouts_resolve_as_score_sde_reads_them(tmp_path):
  """checkpoints/ (newest file), checkpoints-meta/checkpoint (the preemption snapshot, saved as
  checkpoint_<step // snapshot_freq_for_preemption>), and the whole score_sde workdir."""
  source = _checkpoint(FAMILIES[0])
  run = tmp_path / "score_sde_run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "checkpoints-meta").mkdir()
  for name, step in (("checkpoint_1", 1234), ("checkpoint_2", 2468)):
    (run / "checkpoints" / name).write_bytes(_with_step(source, step))
  (run / "checkpoints" / "checkpoint_tmp").write_bytes(b"an unfinished save")
  (run / "checkpoints-meta" / "checkpoint_3").write_bytes(_with_step(source, 3000))
  resolve = convert.resolve_checkpoint
  assert resolve(str(run / "checkpoints")) == str(run / "checkpoints" / "checkpoint_2")
  assert resolve(str(run / "checkpoints-meta" / "checkpoint")) == str(
      run / "checkpoints-meta" / "checkpoint_3")
  assert resolve(str(run)) == str(run / "checkpoints-meta" / "checkpoint_3")  # the later step
  (run / "checkpoints" / "checkpoint_4").write_bytes(_with_step(source, 4000))
  assert resolve(str(run)) == str(run / "checkpoints" / "checkpoint_4")
  with pytest.raises(FileNotFoundError, match="checkpoint_<n>"):
    resolve(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    resolve(str(run / "checkpoints" / "nothing"))


def test_the_preemption_snapshot_imports_at_its_step(tmp_path):
  family = FAMILIES[3]
  meta = tmp_path / "run" / "checkpoints-meta"
  meta.mkdir(parents=True)
  (meta / "checkpoint_5").write_bytes(_with_step(_checkpoint(family), 5000))
  workdir = str(tmp_path / "workdir")
  done = import_checkpoint.run_import(_config(family), workdir, str(meta / "checkpoint"))
  assert done["step"] == 5000 and done["source"] == str(meta / "checkpoint_5")
  model = sgm_jax.load(workdir)
  assert model.step == 5000
  io = np.load(os.path.join(FORWARD, family, "io.npz"))
  score = _score(model.score_fn, jnp.asarray(io["x"]), jnp.asarray(io["t"]))
  assert _relative_errors(score, io["score"]).max() < TOLERANCE
