import gc
import importlib.metadata
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
# XLA's older CPU code generator for fusions: the test programs compile in about 40% less time
# (tests/test_sampling_unipc.py and test_sampling_ode.py: 53 s -> 34 s of CPU) and run as fast,
# with the same results to the printed digits in tests/test_few_step_model.py. XLA stops at an
# unknown flag, so it is set only for the jaxlib it was measured with (0.10); inherited by the
# xdist workers and subprocesses (tests that set XLA_FLAGS for a subprocess keep the others).
# SGM_JAX_TEST_XLA_DEFAULTS=1 keeps XLA's default code generator.
def _jaxlib_version():
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return ""


if (os.environ.get("SGM_JAX_TEST_XLA_DEFAULTS") != "1" and _jaxlib_version().startswith("0.10.")
    and "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]):
  os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"
# One BLAS thread per process: the suite runs one xdist worker per core, and numpy's OpenBLAS
# threads of two workers (and of the main.py subprocesses) on two cores wait for each other
# (two workers ran tests/test_evaluation_metrics.py in 33 s each instead of 8 s). Inherited by
# the workers and subprocesses, like the cache below.
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_name, "1")

# One XLA compilation cache for the whole test run: the pytest process creates an empty folder,
# and the xdist workers and every main.py subprocess a test starts inherit it through the
# environment, so a program that several tests, files or processes build (the digits train step,
# a sampler's scan, a network's forward pass) compiles once per run. Entries are keyed by the
# program, the devices and the compile options (jax_disable_most_optimizations included), so a
# hit is the executable a fresh compile would give. The folder is empty at the start of every
# run (a clean clone's run is every run) and removed at its end; SGM_JAX_TEST_NO_XLA_CACHE=1
# turns it off. Only programs that took at least CACHE_MIN_COMPILE_SECONDS to compile are written:
# most of the suite's programs are tiny (tens of ms) and writing each cost more than its rare hit
# saved (tests/test_losses.py + test_sampling_deis.py: 83.4 -> 80.4 s of CPU at 0.3 s instead of 0).
CACHE_MIN_COMPILE_SECONDS = 0.3
_CACHE_OWNER = False
if (os.environ.get("SGM_JAX_TEST_NO_XLA_CACHE") != "1"
    and "SGM_JAX_TEST_XLA_CACHE" not in os.environ):
  os.environ["SGM_JAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="sgm-jax-test-xla-cache-")
  _CACHE_OWNER = True
if "SGM_JAX_TEST_XLA_CACHE" in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["SGM_JAX_TEST_XLA_CACHE"]
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(CACHE_MIN_COMPILE_SECONDS)
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# The user's cache (trained domain classifiers, sgm_jax/evaluation/domain.py) is one folder per
# test run, like the XLA cache: tests never read or write ~/.cache, and every run trains afresh.
_USER_CACHE_OWNER = "SGM_JAX_CACHE_DIR" not in os.environ
if _USER_CACHE_OWNER:
  os.environ["SGM_JAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="sgm-jax-test-cache-")

# sgm_jax's XLA workarounds (sgm_jax/xla_workarounds.py: XLA's CPU YNNPACK fusion off) go into
# XLA_FLAGS before anything starts JAX's backend; the workers and subprocesses inherit them.
import sgm_jax  # noqa: E402,F401
import jax  # noqa: E402

if "SGM_JAX_TEST_XLA_CACHE" in os.environ:  # also when a plugin imported jax before this file
  jax.config.update("jax_compilation_cache_dir", os.environ["SGM_JAX_TEST_XLA_CACHE"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECONDS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

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


@pytest.fixture
def optimized_compiles():
  """XLA's optimizations for one test of a `fast_compiles` module whose programs run long enough
  (an adaptive ODE solve, many network calls) to repay them."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


# The 30 longest test files, longest first (summed test seconds of a --junitxml run of the whole
# suite at 553be79, 2 workers), are handed out first (longest processing time first): `pytest -n 2
# --dist loadfile` gives whole files to the workers in queue order, and a long file handed out
# last keeps one worker busy while the other idles. The queue is the collection order:
# pytest_configure turns off xdist's own reordering (by number of tests in a file), which put
# one-test files like test_few_step_model.py last.
LONGEST_FILES_FIRST = (
    "test_import_score_sde_modes.py", "test_run_lib.py", "test_mixed_precision.py",
    "test_import_score_sde.py", "test_run_controllable.py", "test_multihost.py",
    "test_few_step_model.py", "test_controllable.py", "test_reliability.py", "test_remat.py",
    "test_configs.py", "test_discrete_schedule.py", "test_multihost_eval.py", "test_toy.py",
    "test_device_check.py", "test_evaluation_fd.py", "test_models_ncsnpp.py",
    "test_sampler_hooks.py", "test_losses.py", "test_sampling_data_prediction.py",
    "test_run_eval.py", "test_sde_lib.py", "test_sampling_tuning.py",
    "test_sampling_stochastic.py", "test_sampling_ode.py", "test_models_small.py",
    "test_likelihood.py", "test_models_ddpm_ncsnv2.py", "test_sampling_unipc.py",
    "test_score_parameterization.py")


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's --dist loadfile / loadscope
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep order


def pytest_collection_finish(session):
  """Python's cycle collector skips what is alive once the tests are collected (JAX, Flax, the
  test modules: never garbage) and runs a full pass less often: tests make many short-lived
  objects, and each full pass walked every long-lived one (1-3 % of the CPU of
  tests/test_mixed_precision.py, test_sampling_unipc.py, test_losses.py and
  test_sampling_deis.py). Cycles are still collected."""
  gc.collect()
  gc.freeze()
  gc.set_threshold(50_000, 20, 20)


def pytest_unconfigure(config):
  if _CACHE_OWNER:
    shutil.rmtree(os.environ["SGM_JAX_TEST_XLA_CACHE"], ignore_errors=True)
  if _USER_CACHE_OWNER:
    shutil.rmtree(os.environ["SGM_JAX_CACHE_DIR"], ignore_errors=True)
