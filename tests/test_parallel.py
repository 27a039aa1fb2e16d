"""parallel.py in one process: placement, the per-device map, and the checks of the distributed
flags. Several devices and processes: tests/test_multihost.py and tests/test_train.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgm_jax import parallel
from sgm_jax.errors import InputError


def test_replicate_places_a_new_copy_with_a_replicated_sharding():
  tree = {"w": jnp.arange(6.0).reshape(2, 3), "n": np.int32(3)}
  placed = parallel.replicate(tree)
  for leaf in jax.tree_util.tree_leaves(placed):
    assert leaf.sharding.is_fully_replicated
    assert len(leaf.sharding.device_set) == jax.device_count()
  assert placed["w"].shape == (2, 3)  # no stacked device axis
  # Donating the placed copy (as the train step does) leaves the original intact.
  jax.jit(lambda t: jax.tree_util.tree_map(lambda x: x + 1, t), donate_argnums=0)(placed)
  np.testing.assert_array_equal(tree["w"], np.arange(6.0).reshape(2, 3))
  np.testing.assert_array_equal(parallel.to_host(parallel.replicate(tree))["w"], tree["w"])


def test_map_batches_gives_each_example_its_global_index_and_gathers_in_order():
  n = 3 * parallel.device_count()
  run = parallel.map_batches(
      lambda shared, x: (x * shared + parallel.global_example_index(x.shape[0]),
                         parallel.device_index()[None]))
  out, devices = parallel.gather(run(parallel.replicate(jnp.float32(10.0)),
                                     parallel.from_global_batch(np.ones(n, np.float32))))
  np.testing.assert_array_equal(out, 10.0 + np.arange(n))
  np.testing.assert_array_equal(devices, np.arange(parallel.device_count()))


def test_fused_steps_run_n_steps_and_stack_their_metrics():
  def step(state, batch):
    return state + parallel.pmean(jnp.sum(batch)), {"loss": parallel.pmean(jnp.mean(batch))}
  batches = np.arange(2 * 4 * parallel.device_count(), dtype=np.float32).reshape(2, -1)
  state, metrics = parallel.fused_steps(step)(parallel.replicate(jnp.float32(0.0)),
                                             parallel.from_process_batches(batches, axis=1))
  per_device_sums = batches.reshape(2, parallel.device_count(), -1).sum(-1).mean(-1)
  np.testing.assert_allclose(parallel.to_host(state), per_device_sums.sum())
  np.testing.assert_allclose(parallel.to_host(metrics)["loss"], batches.mean(-1))


def test_sizes_are_checked_against_the_number_of_devices():
  n = parallel.device_count()
  assert parallel.padded_size(1) == n and parallel.padded_size(n) == n
  assert parallel.padded_size(n + 1) == 2 * n
  if n > 1:
    with pytest.raises(InputError, match=f"batch_size=1 must be divisible by the number of "
                                         f"devices \\({n}\\)"):
      parallel.check_divisible(1, "training.batch_size")
  parallel.check_divisible(n, "training.batch_size")


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator_address="localhost", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(coordinator_address="127.0.0.1:1", num_processes=0, process_id=0), "num_processes"),
    (dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2), "process_id"),
])
def test_bad_distributed_flags_are_named(kwargs, message):
  with pytest.raises(InputError, match=message):
    parallel.initialize_distributed(**kwargs)


def test_without_flags_nothing_is_initialized_and_this_process_decides_alone():
  assert parallel.initialize_distributed() is False
  assert parallel.is_first_process()
  assert parallel.any_process(True) and not parallel.any_process(False)
