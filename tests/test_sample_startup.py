"""`--mode sample` starts fast: a checkpoint is restored into an abstract target (shapes only), so
the network is never run or initialized and no data are loaded before sampling."""
import jax
import numpy as np
import pytest
from jax import monitoring

from sgm_jax import datasets, train
from sgm_jax.cli import setup
from sgm_jax.cli.sample import run_sample
from sgm_jax.cli.train import run_train
from sgm_jax.checkpoints import CheckpointStore
from test_run_lib import _available, _config

# a toy MLP: XLA's optimizations only cost compile time here (64 -> 23 s of CPU)
pytestmark = pytest.mark.usefixtures("fast_compiles")

# XLA compilations seen while `_COMPILES` is a list (a listener cannot be unregistered).
_COMPILES = None


def _on_event(event, duration, **kwargs):
  if _COMPILES is not None and "backend_compile" in event:
    _COMPILES.append(event)


monitoring.register_event_duration_secs_listener(_on_event)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A toy_2d workdir trained for 2 steps: (config, workdir, model, example shape)."""
  config = _config("toy_2d")
  workdir = str(tmp_path_factory.mktemp("toy_2d"))
  run_train(config, workdir)
  _, model, dataset = setup.build(config)
  return config, workdir, model, datasets.example_shape(dataset.spec)


def _assert_trees_identical(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert type(x) is type(y) and x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_abstract_target_restores_exactly_what_a_real_target_restores(trained):
  config, workdir, model, shape = trained
  tx = setup.optimizer_from_config(config).build()
  abstract = setup.abstract_initial_state(config, model, shape, tx)
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree_util.tree_leaves(abstract))
  real = setup.initial_state(config, model, shape, tx)
  _assert_trees_identical(jax.eval_shape(lambda: real), abstract)

  store = CheckpointStore(workdir)
  try:
    from_real, from_abstract = store.restore(real), store.restore(abstract)
  finally:
    store.close()
  _assert_trees_identical(from_real, from_abstract)
  assert isinstance(jax.tree_util.tree_leaves(from_abstract.params_ema)[0], jax.Array)

  params, step = setup.restore_ema_params(config, workdir, model, shape)
  assert step == int(from_real.step) == 2
  _assert_trees_identical(params, from_real.params_ema)
  # Restored, not initialized: two training steps moved the EMA away from the initial params.
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(params),
                                                      jax.tree_util.tree_leaves(real.params)))


def test_restore_neither_runs_nor_initializes_the_network(trained, monkeypatch):
  global _COMPILES
  config, workdir, model, shape = trained
  expected, _ = setup.restore_ema_params(config, workdir, model, shape)

  def refuse(*args, **kwargs):
    raise AssertionError("restoring a checkpoint must not initialize a train state")

  monkeypatch.setattr(train, "init_train_state", refuse)
  monkeypatch.setattr(setup, "initial_state", refuse)
  call = type(model).__call__

  def traced_only(self, x, *args, **kwargs):  # eval_shape traces; running eagerly is refused
    if not isinstance(x, jax.core.Tracer):
      raise AssertionError("restoring a checkpoint ran the network")
    return call(self, x, *args, **kwargs)

  monkeypatch.setattr(type(model), "__call__", traced_only)
  _COMPILES = []
  try:
    params, step = setup.restore_ema_params(config, workdir, model, shape)
    compiles = list(_COMPILES)
  finally:
    _COMPILES = None
  assert compiles == [], "restoring a checkpoint compiled (and ran) XLA programs"
  assert step == 2
  _assert_trees_identical(params, expected)


def test_sampling_loads_no_data(trained, monkeypatch):
  config, workdir, _, _ = trained

  def refuse(self, split):
    raise AssertionError(f"--mode sample loaded the {split} split")

  monkeypatch.setattr(datasets.Dataset, "source", refuse)
  result = run_sample(config, workdir, "deis", num_steps=2, num_samples=2)
  with np.load(result["npz"]) as f:
    assert f["samples"].shape == (2, 2) and np.all(np.isfinite(f["samples"]))


@pytest.mark.parametrize("name", ["toy_2d", "digits", "fashion_mnist"])
def test_example_shape_from_the_config_is_the_data_shape(name):
  if not _available(name):
    pytest.skip(f"the local data of configs/{name}.py is not installed (see README)")
  spec = datasets.from_config(_config(name))
  batch = datasets.get_dataset(spec).train_batch(0)
  assert datasets.example_shape(spec) == batch["image"].shape[1:]


def test_example_shape_of_an_unknown_dataset_is_a_clear_error():
  spec = datasets.from_config(_config("toy_2d", **{"data.dataset": "cifar11"}))
  with pytest.raises(ValueError, match="unknown dataset 'cifar11'"):
    datasets.example_shape(spec)
