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
