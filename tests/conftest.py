import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402

# Catch accidental broadcasting between (B,) time arrays and (B, ...) images.
jax.config.update("jax_numpy_rank_promotion", "raise")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def fast_compiles():
  """For modules of tiny scans (`pytestmark = pytest.mark.usefixtures("fast_compiles")`): XLA's
  optimizations only cost compile time at these sizes."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


# The longest test files (seconds on 2 cores, from --junitxml and --durations runs) are collected
# first: `pytest -n 2 --dist loadfile` hands out whole files in collection order, and a long file
# handed out last keeps one worker busy while the other idles.
LONGEST_FILES_FIRST = ("test_run_lib.py", "test_run_controllable.py", "test_few_step_model.py",
                       "test_multihost.py", "test_reliability.py", "test_multihost_eval.py",
                       "test_controllable.py", "test_train.py", "test_run_eval.py")


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep order
