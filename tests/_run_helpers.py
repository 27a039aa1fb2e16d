"""What tests/test_run_*.py share: main.py runs and the small networks of their digits configs."""
import os
import sys

import prewarmed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Compile-heavy, tiny compute: XLA's optimizations off in the main.py runs, as in the tests.
FAST_COMPILES = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "true"}

# The digits Mixer at one narrow block and a WRN of 16 / 32 / 64 channels: these tests check what
# the modes do with a trained network, not what it learns; every program that holds the network
# (train step, samplers, ODE solves) traces and compiles in about half the time of the config's.
SMALL_DIGITS = {"model.num_blocks": 1, "model.hidden_size": 16, "model.mix_patch_size": 16,
                "model.mix_hidden_size": 32, "classifier.channel_multiplier": 1}


def small_digits(config):
  """`config` (configs/digits.py's, or one of its data) with the SMALL_DIGITS networks."""
  for key, value in SMALL_DIGITS.items():
    section, field = key.split(".")
    setattr(getattr(config, section), field, value)
  return config


# The same as main.py flags: its runs restore the checkpoints of the tests' workdirs.
SMALL_DIGITS_FLAGS = [f"--config.{key}={value}" for key, value in SMALL_DIGITS.items()]


def main_py(*args, cwd=ROOT):
  """`python main.py ARGS` (forked from a warm interpreter), its output captured."""
  return prewarmed.run([sys.executable, os.path.join(ROOT, "main.py"), *args],
                       capture_output=True, text=True, cwd=cwd, timeout=600,
                       env=dict(os.environ, **FAST_COMPILES))


def save_untrained_checkpoints(workdir: str, config, steps, ema_scales=None) -> str:
  """The config's initial train state saved in `workdir` as the checkpoint of each of `steps`
  (no training step is traced or compiled: a checkpoint's use does not depend on how its
  parameters came about), its EMA parameters times ema_scales[k] in the k-th if given (so that
  each checkpoint gives other numbers). Returns `workdir`."""
  import jax
  from sgm_jax import datasets
  from sgm_jax.checkpoints import CheckpointStore
  from sgm_jax.cli import setup
  _, model, dataset = setup.build(config)
  state = setup.initial_state(config, model, datasets.example_shape(dataset.spec),
                              setup.optimizer_from_config(config).build())
  store = CheckpointStore(workdir, writer=True)
  try:
    for k, step in enumerate(steps):
      scale = 1.0 if ema_scales is None else ema_scales[k]
      ema = jax.tree_util.tree_map(lambda p: p * scale, state.params_ema)
      store.save(step, state.replace(step=jax.numpy.asarray(step, state.step.dtype),
                                     params_ema=ema))
  finally:
    store.close()
  return workdir


# Every XLA compile of this process since the first compiles_so_far() (jax.monitoring events).
_BACKEND_COMPILES = []
_LISTENING = False


def _record_compile(event, duration, **_):
  if event == "/jax/core/compile/backend_compile_duration":
    _BACKEND_COMPILES.append(duration)


def compiles_so_far() -> int:
  """The number of XLA compiles in this process since the first call: to check that a call
  compiled nothing."""
  global _LISTENING
  if not _LISTENING:
    import jax.monitoring
    jax.monitoring.register_event_duration_secs_listener(_record_compile)
    _LISTENING = True
  return len(_BACKEND_COMPILES)

