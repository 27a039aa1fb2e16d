"""convert.py: original score_sde checkpoints (flax 0.3.1 msgpack) -> sampling / training trees."""
import json
import os
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

from reference_data import PARAM_TREES
from sgm_jax import convert

REF = PARAM_TREES
LAYOUT = "_checkpoint_layout_flax031_vp_cifar10_ddpmpp_deep_continuous.json"
INPUT_SHAPE = (1, 8, 8, 3)


def _ref(name):
  path = os.path.join(REF, name)
  if not os.path.exists(path):
    pytest.skip(f"reference file {path} not available")
  with open(path) as f:
    return json.load(f)


class Block(nn.Module):
  @nn.compact
  def __call__(self, h, emb):
    y = nn.GroupNorm(num_groups=2)(h)
    y = nn.Conv(h.shape[-1], (3, 3))(nn.swish(y)) + nn.Dense(h.shape[-1])(emb)[:, None, None, :]
    return h + nn.Conv(h.shape[-1], (1, 1), name="NIN_0")(nn.GroupNorm(num_groups=2)(y))


class Tiny(nn.Module):
  """Nested modules and GroupNorms named as in score_sde's networks."""

  @nn.compact
  def __call__(self, x, labels, train: bool = False):
    emb = nn.Dense(8)(labels.astype(jnp.float32)[:, None])
    h = nn.Conv(8, (3, 3))(x)
    h = Block()(h, emb)
    h = nn.GroupNorm(num_groups=4)(h)
    return nn.Conv(x.shape[-1], (3, 3))(h)


def _tiny_params():
  """Tiny's parameters: shapes from its init (nothing compiled), random values."""
  shapes = convert.abstract_variables(Tiny(), INPUT_SHAPE)["params"]
  return _random_like(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), shapes), 99)


def _legacy(params):
  """flax 0.3.1 layout: GroupNorm scale/bias as (1, 1, 1, C)."""
  flat = convert.flatten(params)
  return convert.unflatten({
      p: (v.reshape((1, 1, 1) + v.shape) if any(k.startswith("GroupNorm") for k in p) else v)
      for p, v in flat.items()})


def _random_like(tree, seed, scale=0.1):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda v: (scale * rng.standard_normal(np.shape(v))).astype(np.float32), tree)


def _fake_state(params_legacy, seed=0):
  """A training State dict in the score_sde checkpoint layout, from a (legacy) parameter tree."""
  live = _random_like(params_legacy, seed)
  ema = _random_like(params_legacy, seed + 1)
  grad_ema = _random_like(params_legacy, seed + 2, 1e-3)
  grad_sq_ema = jax.tree_util.tree_map(np.abs, _random_like(params_legacy, seed + 3, 1e-6))
  param_states = convert.unflatten({
      p + (name,): v for name, tree in (("grad_ema", grad_ema), ("grad_sq_ema", grad_sq_ema))
      for p, v in convert.flatten(tree).items()})
  return {
      "step": np.asarray(1234, np.int32),
      "optimizer": {"target": live,
                    "state": {"step": np.asarray(1234, np.int32), "param_states": param_states}},
      "lr": np.asarray(2e-4, np.float32),
      "model_state": {},
      "ema_rate": np.asarray(0.9999, np.float32),
      "params_ema": ema,
      "rng": np.asarray([0, 42], np.uint32),
  }


def _write(path, state):
  with open(path, "wb") as f:
    f.write(serialization.msgpack_serialize(state))
  return str(path)


@pytest.fixture
def ckpt(tmp_path):
  state = _fake_state(_legacy(_tiny_params()))
  return _write(tmp_path / "checkpoint_7", state), state


def _reshaped(tree):
  return {p: (v.reshape(v.shape[3:]) if convert._is_legacy_norm_leaf(p, v.shape) else v)
          for p, v in convert.flatten(tree).items()}


def _assert_tree_equal(got, want_flat):
  got_flat = convert.flatten(got)
  assert got_flat.keys() == want_flat.keys()
  for p in want_flat:
    assert got_flat[p].shape == want_flat[p].shape, p
    np.testing.assert_array_equal(got_flat[p], want_flat[p], err_msg="/".join(p))


# --- layout ---------------------------------------------------------------------------------------
def test_fake_state_follows_the_reference_layout(ckpt):
  layout = _ref(LAYOUT)
  _, state = ckpt
  assert list(state) == layout["top_level_keys"]
  assert list(state["optimizer"]) == layout["optimizer_keys"]
  assert list(state["optimizer"]["state"]) == layout["optimizer_state_keys"]
  example = layout["layout_summary"]["optimizer/state/param_states/<param path>/grad_ema"]
  assert example["examples"][0][0].endswith("GroupNorm_0/bias/grad_ema")


# --- sampling variables ---------------------------------------------------------------------------
def test_ema_params_round_trip_exactly_with_groupnorm_reshaped(ckpt):
  path, state = ckpt
  expected = convert.abstract_variables(Tiny(), INPUT_SHAPE)
  variables = convert.load_sampling_variables(path, Tiny(), INPUT_SHAPE)
  assert set(variables) == {"params"}
  _assert_tree_equal(variables["params"], _reshaped(state["params_ema"]))
  assert variables["params"]["GroupNorm_0"]["scale"].shape == (8,)
  assert variables["params"]["Block_0"]["GroupNorm_1"]["bias"].shape == (8,)
  assert (jax.tree_util.tree_map(np.shape, variables) ==
          jax.tree_util.tree_map(lambda s: s.shape, expected))
  out = Tiny().apply(variables, jnp.ones(INPUT_SHAPE), jnp.ones((1,), jnp.int32))
  assert out.shape == INPUT_SHAPE and bool(jnp.all(jnp.isfinite(out)))


def test_live_params_option(ckpt):
  path, state = ckpt
  variables = convert.load_sampling_variables(path, Tiny(), INPUT_SHAPE, use_ema=False)
  _assert_tree_equal(variables["params"], _reshaped(state["optimizer"]["target"]))


def test_without_a_model_groupnorm_is_reshaped_by_name(ckpt):
  path, state = ckpt
  variables = convert.load_sampling_variables(path)
  _assert_tree_equal(variables["params"], _reshaped(state["params_ema"]))


def test_checkpoint_directory_resolves_to_the_newest_step(tmp_path):
  params = _legacy(_tiny_params())
  _write(tmp_path / "checkpoint_3", _fake_state(params, seed=10))
  newest = _fake_state(params, seed=20)
  _write(tmp_path / "checkpoint_12", newest)
  (tmp_path / "checkpoint_99tmp").write_bytes(b"partial")
  assert convert.resolve_checkpoint(str(tmp_path)).endswith("checkpoint_12")
  variables = convert.load_sampling_variables(str(tmp_path), Tiny(), INPUT_SHAPE)
  _assert_tree_equal(variables["params"], _reshaped(newest["params_ema"]))


# --- training state -------------------------------------------------------------------------------
def test_training_dict_maps_adam_moments_to_mu_nu(ckpt):
  path, state = ckpt
  out = convert.load_training_dict(path, Tiny(), INPUT_SHAPE)
  _assert_tree_equal(out["params"], _reshaped(state["optimizer"]["target"]))
  _assert_tree_equal(out["params_ema"], _reshaped(state["params_ema"]))
  ps = convert.flatten(state["optimizer"]["state"]["param_states"])
  for name, moment in (("mu", "grad_ema"), ("nu", "grad_sq_ema")):
    want = convert.unflatten({p[:-1]: v for p, v in ps.items() if p[-1] == moment})
    _assert_tree_equal(out[name], _reshaped(want))
  assert out["step"] == 1234 and out["adam_count"] == 1234
  assert out["ema_rate"] == pytest.approx(0.9999) and out["lr"] == pytest.approx(2e-4)
  np.testing.assert_array_equal(out["rng"], [0, 42])
  # The moments drop into optax's Adam state for the same parameter tree.
  adam_state = optax.adam(2e-4).init(out["params"])
  assert jax.tree_util.tree_structure(adam_state[0].mu) == jax.tree_util.tree_structure(out["mu"])
  shapes = lambda tree: jax.tree_util.tree_map(np.shape, tree)
  assert shapes(adam_state[0].mu) == shapes(out["mu"]) == shapes(out["nu"])


def test_non_adam_optimizer_state_is_rejected(tmp_path):
  state = _fake_state(_legacy(_tiny_params()))
  state["optimizer"]["state"]["param_states"] = {"Conv_0": {"kernel": {"momentum": np.zeros(3)}}}
  path = _write(tmp_path / "checkpoint_1", state)
  with pytest.raises(ValueError, match="Adam"):
    convert.load_training_dict(path)


# --- bad files ------------------------------------------------------------------------------------
def test_truncated_file_gives_one_value_error_naming_it(ckpt, tmp_path):
  path, _ = ckpt
  data = open(path, "rb").read()
  for n in (len(data) // 2, len(data) - 1, 10):
    bad = tmp_path / f"checkpoint_trunc_{n}"
    bad.write_bytes(data[:n])
    with pytest.raises(ValueError, match="checkpoint_trunc"):
      convert.load_sampling_variables(str(bad))


def test_random_bytes_and_empty_file_give_value_errors(tmp_path):
  rng = np.random.default_rng(0)
  for i in range(5):
    bad = tmp_path / f"random_{i}"
    bad.write_bytes(rng.bytes(1000))
    with pytest.raises(ValueError, match=f"random_{i}"):
      convert.load_sampling_variables(str(bad))
  empty = tmp_path / "empty"
  empty.write_bytes(b"")
  with pytest.raises(ValueError, match="empty"):
    convert.load_sampling_variables(str(empty))


class _Marker:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


def test_a_pickle_is_rejected_without_running_it(tmp_path):
  marker = tmp_path / "pwned"
  bad = tmp_path / "checkpoint_5"
  bad.write_bytes(pickle.dumps({"params_ema": _Marker(str(marker))}))
  with pytest.raises(ValueError, match="checkpoint_5"):
    convert.load_sampling_variables(str(bad))
  assert not marker.exists()


def test_msgpack_that_is_not_a_training_state(tmp_path):
  other = _write(tmp_path / "other", {"foo": np.zeros(3)})
  with pytest.raises(ValueError, match=r"other.*not a score_sde training-state.*params_ema"):
    convert.load_sampling_variables(other)
  listing = tmp_path / "listing"
  listing.write_bytes(serialization.msgpack_serialize([np.zeros(2)]))
  with pytest.raises(ValueError, match="listing"):
    convert.load_sampling_variables(str(listing))
  with pytest.raises(FileNotFoundError):
    convert.load_sampling_variables(str(tmp_path / "nope"))


def test_mismatched_trees_list_missing_unexpected_and_misshaped_paths(tmp_path):
  state = _fake_state(_legacy(_tiny_params()))
  del state["params_ema"]["Block_0"]["NIN_0"]["kernel"]
  state["params_ema"]["Extra_0"] = {"w": np.zeros((2,), np.float32)}
  state["params_ema"]["Conv_1"]["bias"] = np.zeros((5,), np.float32)
  path = _write(tmp_path / "checkpoint_2", state)
  with pytest.raises(ValueError) as info:
    convert.load_sampling_variables(path, Tiny(), INPUT_SHAPE)
  message = str(info.value)
  assert "checkpoint_2" in message
  assert "missing from the checkpoint (1)" in message and "params/Block_0/NIN_0/kernel" in message
  assert "unexpected in the checkpoint (1)" in message and "params/Extra_0/w" in message
  assert "wrong shape (1)" in message
  assert "params/Conv_1/bias: checkpoint (5,), model (3,)" in message


def test_model_and_input_shape_go_together(ckpt):
  with pytest.raises(ValueError, match="both"):
    convert.load_sampling_variables(ckpt[0], Tiny())


# --- classifier -----------------------------------------------------------------------------------
def test_classifier_bare_tree(tmp_path, ckpt):
  params = _legacy(_tiny_params())
  path = _write(tmp_path / "classifier_ckpt", params)
  variables = convert.load_classifier_variables(path, Tiny(), INPUT_SHAPE)
  _assert_tree_equal(variables["params"], _reshaped(params))
  with pytest.raises(ValueError, match="training-state"):
    convert.load_classifier_variables(ckpt[0])
  with pytest.raises(ValueError, match="classifier"):
    convert.load_sampling_variables(path)


def test_classifier_reference_paths_map_to_modern_shapes():
  ref = _ref("classifier_wideresnet_noise_conditional.json")
  legacy = convert.unflatten({tuple(p.split("/")[1:]): np.broadcast_to(np.float32(0), s)
                              for p, s in ref["collections"]["params"]})
  fixed = convert.fix_groupnorm_shapes(legacy)  # names like bn_2, init_bn: found by shape
  convert.check_tree_shapes({"params": fixed}, _modern_expected(ref))


# --- the real reference layout, without allocating the parameters ---------------------------------
def _modern_expected(ref):
  """The tree our model's init should create: the reference paths with modern GroupNorm shapes."""
  modern = {p: tuple(new) for p, _, new in ref["modern_flax_comparison"]["shape_differences"]}
  return convert.unflatten({
      tuple(p.split("/")): jax.ShapeDtypeStruct(modern.get(p, tuple(s)), jnp.float32)
      for p, s in ref["collections"]["params"]})


def _zero_cost_state(ref):
  """Reference-layout State whose leaves are zero-stride broadcasts: no parameter memory."""
  params = convert.unflatten({tuple(p.split("/")[1:]): np.broadcast_to(np.float32(0), s)
                              for p, s in ref["collections"]["params"]})
  return _fake_state_from(params)


def _fake_state_from(params):
  param_states = convert.unflatten({p + (m,): v for p, v in convert.flatten(params).items()
                                    for m in ("grad_ema", "grad_sq_ema")})
  return {"step": np.asarray(0, np.int32),
          "optimizer": {"target": params,
                        "state": {"step": np.asarray(0, np.int32), "param_states": param_states}},
          "lr": np.asarray(2e-4, np.float32), "model_state": {},
          "ema_rate": np.asarray(0.9999, np.float32), "params_ema": params,
          "rng": np.zeros((2,), np.uint32)}


@pytest.mark.parametrize("name", ["vp_cifar10_ddpmpp_continuous.json",
                                  "vp_cifar10_ddpmpp_deep_continuous.json"])
def test_reference_checkpoint_paths_map_onto_the_modern_tree(name):
  ref = _ref(name)
  state = _zero_cost_state(ref)
  expected = _modern_expected(ref)  # {'params': ...}
  variables = convert.to_sampling_variables(state, expected)
  flat = convert.flatten(variables["params"])
  assert len(flat) == len(ref["collections"]["params"])
  assert sum(v.size for v in flat.values()) == ref["num_params"]
  norms = [p for p in flat if p[-2].startswith("GroupNorm")]
  assert norms and all(flat[p].ndim == 1 for p in norms)
  out = convert.to_training_dict(state, expected)
  assert convert.flatten(out["nu"]).keys() == flat.keys()
  if "deep" in name:  # the saved layout has exactly these leaves
    layout = _ref(LAYOUT)
    assert len(convert.flatten(state)) == layout["num_leaves_total"]
    assert len(flat) == layout["layout_summary"]["params_ema/<param path>"]["count"]


def test_reference_paths_with_a_module_missing_fail_clearly():
  ref = _ref("vp_cifar10_ddpmpp_continuous.json")
  state = _zero_cost_state(ref)
  state["params_ema"] = dict(state["params_ema"])
  del state["params_ema"]["Dense_1"]
  pattern = r"missing from the checkpoint \(2\)[\s\S]*params/Dense_1/kernel"
  with pytest.raises(ValueError, match=pattern):
    convert.to_sampling_variables(state, _modern_expected(ref))


# --- writing and the CLI --------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".msgpack", ".npz"])
def test_save_and_load_variables_round_trip_atomically(tmp_path, ckpt, ext):
  variables = convert.load_sampling_variables(ckpt[0], Tiny(), INPUT_SHAPE)
  out = str(tmp_path / "out" / f"params_ema{ext}")
  convert.save_variables(variables, out)
  _assert_tree_equal(convert.load_variables(out), convert.flatten(variables))
  with pytest.raises(FileExistsError, match="overwrite"):
    convert.save_variables({"params": {"a": np.zeros(2)}}, out)
  _assert_tree_equal(convert.load_variables(out), convert.flatten(variables))
  convert.save_variables({"params": {"a": np.ones(2)}}, out, overwrite=True)
  np.testing.assert_array_equal(convert.load_variables(out)["params"]["a"], np.ones(2))
  assert os.listdir(tmp_path / "out") == [f"params_ema{ext}"]  # no temporary files left
  with pytest.raises(ValueError, match="extension"):
    convert.save_variables(variables, str(tmp_path / "params.pkl"))


def test_cli_converts_and_refuses_to_overwrite(tmp_path, ckpt, monkeypatch, capsys):
  path, state = ckpt
  config = tmp_path / "tiny_config.py"
  config.write_text("import ml_collections\n\ndef get_config():\n"
                    "  c = ml_collections.ConfigDict()\n  c.data = ml_collections.ConfigDict()\n"
                    "  c.data.image_size = 8\n  return c\n")
  seen = []

  def fake_model_from_config(cfg):  # the model registry is tested elsewhere
    seen.append(cfg.data.image_size)
    return Tiny(), INPUT_SHAPE

  monkeypatch.setattr(convert, "_model_from_config", fake_model_from_config)
  out_dir = tmp_path / "converted"
  args = ["--checkpoint", path, "--config", str(config), "--out", str(out_dir)]
  written = convert.main(args)
  assert seen == [8] and written == str(out_dir / "params_ema.msgpack")
  _assert_tree_equal(convert.load_variables(written)["params"], _reshaped(state["params_ema"]))
  with pytest.raises(FileExistsError):
    convert.main(args)
  convert.main(args + ["--overwrite", "--live-params", "--name", "params_ema"])
  _assert_tree_equal(convert.load_variables(written)["params"],
                     _reshaped(state["optimizer"]["target"]))
  npz = convert.main(["--checkpoint", path, "--out", str(out_dir), "--format", "npz"])
  assert npz.endswith("params_ema.npz")
  _assert_tree_equal(convert.load_variables(npz)["params"], _reshaped(state["params_ema"]))
  assert "wrote" in capsys.readouterr().out


def test_full_size_checkpoint_built_from_the_reference_tree(tmp_path):
  """A real-size original checkpoint (DDPM, 32.3M parameters), random values in the reference
  tree's legacy shapes, serialized like score_sde (flax msgpack of its State), converts into
  variables that fit our network for configs/vp/ddpm/cifar10_unconditional.py exactly."""
  import importlib
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from sgm_jax import models, sde_lib
  ref = os.path.join(REF, "vp_ddpm_cifar10_unconditional.json")
  if not os.path.exists(ref):
    pytest.skip("reference trees not available")
  with open(ref) as f:
    entries = json.load(f)["collections"]["params"]
  rng = np.random.default_rng(0)
  legacy = convert.unflatten({tuple(p.split("/")[1:]): rng.standard_normal(s, dtype=np.float32)
                              for p, s in entries})
  path = _write(tmp_path / "checkpoint_26", _fake_state_from(legacy))
  config = importlib.import_module("configs.vp.ddpm.cifar10_unconditional").get_config()
  model = models.create_model(config, sde_lib.from_config(config))
  variables = convert.load_sampling_variables(path, model, (1, 32, 32, 3))
  got = convert.flatten(variables["params"])
  want = _reshaped(legacy)
  assert got.keys() == want.keys()
  assert sum(v.size for v in got.values()) == 32_329_347
  for p in list(want)[:: max(1, len(want) // 40)]:
    np.testing.assert_array_equal(got[p], want[p])
