"""Read checkpoints of the original score_sde code (yang-song/score_sde, flax 0.3.1) as our trees.

The original code saves its training `State` with `flax.training.checkpoints.save_checkpoint`:
msgpack bytes (flax.serialization) of its state dict, in files `checkpoint_<n>`:

    step                      int, training step
    optimizer/target/<path>   live parameters (flax.optim.Optimizer)
    optimizer/state/step      Adam's step count
    optimizer/state/param_states/<path>/{grad_ema, grad_sq_ema}   Adam moments
    lr, ema_rate              floats
    model_state               other variable collections ({} for every score_sde network)
    params_ema/<path>         EMA parameters, what the paper's samples use
    rng                       (2,) uint32 key

`<path>` is a parameter path without the 'params/' collection prefix. GroupNorm scale and bias are
(1, 1, 1, C) there and (C,) in flax >= 0.3.6 (google/flax#1721); every other leaf has the same
shape. The noise-conditional classifier checkpoint is the bare parameter tree.

flax.optim.Adam and optax.adam keep the same moments: grad_ema = mu (EMA of gradients, beta1) and
grad_sq_ema = nu (EMA of squared gradients, beta2), both without bias correction, and
optimizer/state/step = optax's `count`; both add eps outside the square root. So
`optax.ScaleByAdamState(count=adam_count, mu=mu, nu=nu)` continues the original run.

Reading never executes code: files are decoded as msgpack with numeric-array extension types only.

CLI: python -m sgm_jax.convert --checkpoint PATH --config configs/vp/cifar10_ddpmpp_continuous.py
    --out DIR [--live-params] [--classifier] [--format msgpack|npz] [--overwrite]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from sgm_jax.errors import InputError, MissingFileError
from sgm_jax.io_utils import atomic_write, save_npz_atomic
from sgm_jax.score import train_kwargs

Tree = dict
Path = tuple

TRAINING_STATE_KEYS = ("step", "optimizer", "lr", "model_state", "ema_rate", "params_ema", "rng")
_REQUIRED_PATHS = (("step",), ("ema_rate",), ("params_ema",), ("optimizer", "target"),
                   ("optimizer", "state", "step"), ("optimizer", "state", "param_states"))
_ADAM_MOMENTS = {"grad_ema": "mu", "grad_sq_ema": "nu"}
_MAX_LISTED = 20


# --- reading --------------------------------------------------------------------------------
def _newest_numbered(directory: str, prefix: str = "checkpoint_") -> Optional[str]:
  """The `<prefix><n>` file of `directory` with the largest n (flax's names), or None."""
  steps = [(int(m.group(1)), name) for name in os.listdir(directory)
           if (m := re.fullmatch(re.escape(prefix) + r"(\d+)", name))
           and os.path.isfile(os.path.join(directory, name))]
  return os.path.join(directory, max(steps)[1]) if steps else None


def _recorded_step(path: str) -> int:
  state = read_msgpack(path)
  return int(np.asarray(state.get("step", -1)))


def resolve_checkpoint(path: str) -> str:
  """The checkpoint file that `path` names, in any of score_sde's layouts:

  - a file (`checkpoints/checkpoint_26`, or any name);
  - a folder of `checkpoint_<n>` files (`checkpoints/`, `checkpoints-meta/`): the largest n;
  - flax's prefix of such files, e.g. `checkpoints-meta/checkpoint` (the preemption snapshot,
    saved as checkpoints-meta/checkpoint_<step // snapshot_freq_for_preemption>): the largest n;
  - a score_sde workdir holding `checkpoints/` and `checkpoints-meta/`: of the newest file of
    each, the one with the later recorded training step (the snapshot when they tie, as score_sde
    resumes from it).
  """
  path = os.fspath(path)
  if os.path.isfile(path):
    return path
  if os.path.isdir(path):
    found = _newest_numbered(path)
    if found is not None:
      return found
    subdirs = [os.path.join(path, d) for d in ("checkpoints-meta", "checkpoints")
               if os.path.isdir(os.path.join(path, d))]
    candidates = [f for f in map(_newest_numbered, subdirs) if f is not None]
    if candidates:
      return max(candidates, key=lambda f: (_recorded_step(f), -candidates.index(f)))
    raise MissingFileError(f"no checkpoint_<n> file in directory {path!r} (nor in its "
                           "checkpoints/ or checkpoints-meta/ folders)")
  parent, prefix = os.path.split(path)
  if prefix and os.path.isdir(parent or "."):
    found = _newest_numbered(parent or ".", prefix + "_")
    if found is not None:
      return found
  raise MissingFileError(f"checkpoint {path!r} does not exist (nor any {prefix}_<n> file beside "
                         "it)")


def _check_tree(tree: Any, where: str, source: str) -> None:
  """Nested dicts with string keys and numeric leaves, or a ValueError naming the file."""
  if isinstance(tree, dict):
    for key, value in tree.items():
      if not isinstance(key, str):
        raise InputError(f"{source}: unexpected non-string key {key!r} under {where or '/'}")
      _check_tree(value, f"{where}/{key}" if where else key, source)
    return
  if isinstance(tree, (np.ndarray, np.generic, int, float, bool)):
    if isinstance(tree, (np.ndarray, np.generic)) and not (
        np.issubdtype(tree.dtype, np.number) or tree.dtype == np.bool_):
      raise InputError(f"{source}: leaf {where} has non-numeric dtype {tree.dtype}")
    return
  raise InputError(f"{source}: leaf {where or '/'} is a {type(tree).__name__}, not an array")


def read_msgpack(path: str) -> Tree:
  """Decode a flax msgpack file into nested dicts of numpy arrays (read-only views of the file)."""
  path = os.fspath(path)
  with open(path, "rb") as f:
    data = f.read()
  if not data:
    raise InputError(f"checkpoint {path!r} is empty")
  try:
    tree = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several types for truncated or foreign bytes
    raise InputError(f"checkpoint {path!r} is not a readable flax msgpack file (truncated or "
                     f"corrupt?): {type(e).__name__}: {e}") from e
  if not isinstance(tree, dict):
    raise InputError(f"checkpoint {path!r} does not hold a tree of arrays (decoded a "
                     f"{type(tree).__name__})")
  _check_tree(tree, "", repr(path))
  return tree


def _get(tree: Mapping, path: Path) -> Any:
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      raise KeyError("/".join(path))
    tree = tree[key]
  return tree


def check_training_state(state: Any, source: str = "checkpoint") -> None:
  """Raise a ValueError unless `state` has the score_sde training-state layout."""
  if not isinstance(state, Mapping):
    raise InputError(f"{source} is not a score_sde training state (got {type(state).__name__})")
  missing = []
  for path in _REQUIRED_PATHS:
    try:
      _get(state, path)
    except KeyError:
      missing.append("/".join(path))
  if missing:
    raise InputError(f"{source} is not a score_sde training-state checkpoint: missing "
                     f"{missing}; top-level keys are {sorted(state)} (expected "
                     f"{list(TRAINING_STATE_KEYS)}). A classifier checkpoint is a bare parameter "
                     "tree: use load_classifier_variables / --classifier.")


def read_training_state(path: str) -> Tree:
  """The raw state dict of an original training checkpoint (file or checkpoint directory)."""
  path = resolve_checkpoint(path)
  state = read_msgpack(path)
  check_training_state(state, repr(path))
  return state


# --- trees ----------------------------------------------------------------------------------
def flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
  """{path tuple: leaf} of a nested mapping."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def unflatten(flat: Mapping[Path, Any]) -> Tree:
  tree: Tree = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _is_legacy_norm_leaf(path: Path, shape: tuple) -> bool:
  return path[-1] in ("scale", "bias") and len(shape) == 4 and shape[:3] == (1, 1, 1)


def fix_groupnorm_shapes(params: Mapping, expected: Optional[Mapping] = None) -> Tree:
  """Reshape flax 0.3.1 GroupNorm scale/bias (1, 1, 1, C) to (C,).

  With `expected` (a parameter tree of arrays or ShapeDtypeStructs) only leaves that the model
  wants as (C,) are reshaped; without it, every 'scale'/'bias' leaf of shape (1, 1, 1, C) (in the
  score_sde networks and classifier these are exactly the GroupNorm ones).
  """
  want = None if expected is None else {p: tuple(v.shape) for p, v in flatten(expected).items()}
  out = {}
  for path, value in flatten(params).items():
    shape = tuple(np.shape(value))
    if _is_legacy_norm_leaf(path, shape) and (want is None or want.get(path) == shape[3:]):
      value = np.reshape(value, shape[3:])
    out[path] = value
  return unflatten(out)


def _listing(title: str, items: list[str]) -> list[str]:
  if not items:
    return []
  lines = [f"  {title} ({len(items)}):"] + [f"    {item}" for item in items[:_MAX_LISTED]]
  if len(items) > _MAX_LISTED:
    lines.append(f"    ... and {len(items) - _MAX_LISTED} more")
  return lines


def check_tree_shapes(tree: Mapping, expected: Mapping, what: str = "parameters",
                      source: str = "checkpoint") -> None:
  """Raise a ValueError listing missing, unexpected and mis-shaped paths of `tree`."""
  got = {p: tuple(np.shape(v)) for p, v in flatten(tree).items()}
  want = {p: tuple(v.shape) for p, v in flatten(expected).items()}
  missing = sorted("/".join(p) for p in want.keys() - got.keys())
  unexpected = sorted("/".join(p) for p in got.keys() - want.keys())
  misshaped = sorted(f"{'/'.join(p)}: checkpoint {got[p]}, model {want[p]}"
                     for p in got.keys() & want.keys() if got[p] != want[p])
  if missing or unexpected or misshaped:
    lines = [f"{source}: {what} do not match the model "
             f"({len(got)} leaves in the checkpoint, {len(want)} in the model)"]
    lines += _listing("missing from the checkpoint", missing)
    lines += _listing("unexpected in the checkpoint", unexpected)
    lines += _listing("wrong shape", misshaped)
    raise InputError("\n".join(lines))


def first_difference(tree: Mapping, expected: Mapping) -> Optional[str]:
  """The first path (in sorted order) where `tree`'s leaf shapes differ from `expected`'s, as
  'path: checkpoint <shape>, network <shape>' (a missing leaf shows as 'absent'); None if equal."""
  got = {p: tuple(np.shape(v)) for p, v in flatten(tree).items()}
  want = {p: tuple(v.shape) for p, v in flatten(expected).items()}
  for path in sorted(got.keys() | want.keys()):
    if got.get(path) != want.get(path):
      shown = lambda shape: "absent" if shape is None else str(shape)
      paths = got.keys() | want.keys()
      count = sum(got.get(p) != want.get(p) for p in paths)
      return (f"{'/'.join(path)}: checkpoint {shown(got.get(path))}, network "
              f"{shown(want.get(path))} ({count} of {len(paths)} leaf paths differ)")
  return None


def with_adam_moments(opt_state: Any, mu: Mapping, nu: Mapping, count: int) -> Any:
  """An optax optimizer state (of any chain holding scale_by_adam) with Adam's moments set to
  `mu`, `nu` (trees like the parameters) and every step counter (Adam's bias correction, the
  learning-rate schedule) set to `count`: flax.optim.Adam's state at that step (see above)."""
  import optax

  def fill(state):
    if isinstance(state, optax.ScaleByAdamState):
      cast = lambda new, old: jax.tree_util.tree_map(
          lambda n, o: jnp.asarray(n, o.dtype), new, old)
      return state._replace(count=jnp.asarray(count, state.count.dtype), mu=cast(mu, state.mu),
                            nu=cast(nu, state.nu))
    if is_state(state):
      return state._replace(count=jnp.asarray(count, state.count.dtype))
    return state

  is_state = lambda node: "count" in getattr(node, "_fields", ())  # optax's NamedTuple states
  found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_state)
           if isinstance(s, optax.ScaleByAdamState)]
  if len(found) != 1:
    raise InputError(f"the optimizer state holds {len(found)} Adam states; Adam's moments fit "
                     "exactly one")
  return jax.tree_util.tree_map(fill, opt_state, is_leaf=is_state)


def abstract_variables(model: nn.Module, input_shape: Sequence[int],
                       label_dtype: Any = jnp.int32) -> Tree:
  """Shapes of the variables `model.init` creates for inputs (B, ...) and (B,) labels.

  Computed with jax.eval_shape: nothing is allocated. score_sde initialized with int32 labels.
  """
  input_shape = tuple(int(d) for d in input_shape)
  x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  labels = jax.ShapeDtypeStruct(input_shape[:1], label_dtype)

  def init(x, labels):
    key = jax.random.PRNGKey(0)
    return model.init({"params": key, "dropout": key}, x, labels, **train_kwargs(model, False))

  return dict(jax.eval_shape(init, x, labels))


def _expected_variables(model, input_shape, label_dtype) -> Optional[Tree]:
  if (model is None) != (input_shape is None):
    raise InputError("pass both model and input_shape to validate against a model, or neither")
  return None if model is None else abstract_variables(model, input_shape, label_dtype)


# --- conversion -----------------------------------------------------------------------------
def to_sampling_variables(state: Mapping, expected: Optional[Mapping] = None, use_ema: bool = True,
                          source: str = "checkpoint") -> Tree:
  """{'params': ...} (plus any model_state collections) from an original training state.

  `use_ema` picks params_ema (what score_sde samples with) or the live optimizer target.
  `expected` is a variables tree from `abstract_variables` to validate against.
  """
  check_training_state(state, source)
  params = state["params_ema"] if use_ema else state["optimizer"]["target"]
  params = fix_groupnorm_shapes(params, None if expected is None else expected.get("params", {}))
  variables = {"params": params, **dict(state.get("model_state") or {})}
  if expected is not None:
    what = "EMA parameters (params_ema)" if use_ema else "parameters (optimizer/target)"
    check_tree_shapes(variables, expected, what, source)
  return variables


def to_training_dict(state: Mapping, expected: Optional[Mapping] = None,
                     source: str = "checkpoint") -> Tree:
  """Everything training needs to resume from an original checkpoint.

  Returns bare parameter trees (no 'params' wrapper) `params`, `params_ema`, Adam moments `mu`,
  `nu` (same tree as params), and `step`, `adam_count`, `ema_rate`, `lr`, `rng`, `model_state`.
  """
  check_training_state(state, source)
  exp_params = None if expected is None else expected.get("params", {})
  moments = {"mu": {}, "nu": {}}
  for path, value in flatten(state["optimizer"]["state"]["param_states"]).items():
    if path[-1] not in _ADAM_MOMENTS:
      raise InputError(f"{source}: optimizer state leaf {'/'.join(path)} is not an Adam moment "
                       f"(expected {sorted(_ADAM_MOMENTS)}); only flax.optim.Adam is supported")
    moments[_ADAM_MOMENTS[path[-1]]][path[:-1]] = value
  out = {
      "params": fix_groupnorm_shapes(state["optimizer"]["target"], exp_params),
      "params_ema": fix_groupnorm_shapes(state["params_ema"], exp_params),
      "mu": fix_groupnorm_shapes(unflatten(moments["mu"]), exp_params),
      "nu": fix_groupnorm_shapes(unflatten(moments["nu"]), exp_params),
      "step": int(np.asarray(state["step"])),
      "adam_count": int(np.asarray(state["optimizer"]["state"]["step"])),
      "ema_rate": float(np.asarray(state["ema_rate"])),
      "lr": float(np.asarray(state["lr"])) if "lr" in state else None,
      "rng": np.asarray(state["rng"]) if "rng" in state else None,
      "model_state": dict(state.get("model_state") or {}),
  }
  reference = exp_params if exp_params is not None else out["params"]
  for name in ("params", "params_ema", "mu", "nu"):
    check_tree_shapes(out[name], reference, f"{name} (optimizer/target)" if name == "params"
                      else name, source)
  return out


def load_sampling_variables(path: str, model: Optional[nn.Module] = None,
                            input_shape: Optional[Sequence[int]] = None, use_ema: bool = True,
                            label_dtype: Any = jnp.int32) -> Tree:
  """Sampling variables {'params': ...} of an original checkpoint, validated against `model`."""
  expected = _expected_variables(model, input_shape, label_dtype)
  path = resolve_checkpoint(path)
  return to_sampling_variables(read_training_state(path), expected, use_ema, repr(path))


def load_training_dict(path: str, model: Optional[nn.Module] = None,
                       input_shape: Optional[Sequence[int]] = None,
                       label_dtype: Any = jnp.int32) -> Tree:
  """`to_training_dict` of an original checkpoint file, validated against `model`."""
  expected = _expected_variables(model, input_shape, label_dtype)
  path = resolve_checkpoint(path)
  return to_training_dict(read_training_state(path), expected, repr(path))


def load_classifier_variables(path: str, model: Optional[nn.Module] = None,
                              input_shape: Optional[Sequence[int]] = None,
                              label_dtype: Any = jnp.float32) -> Tree:
  """{'params': ...} of the noise-conditional classifier checkpoint (a bare parameter tree).

  The classifier is conditioned on float noise scales, hence the float label default.
  """
  expected = _expected_variables(model, input_shape, label_dtype)
  path = resolve_checkpoint(path)
  tree = read_msgpack(path)
  if "params_ema" in tree and "optimizer" in tree:
    raise InputError(f"{path!r} is a training-state checkpoint, not a bare classifier parameter "
                     "tree: import it without --classifier (in Python: load_sampling_variables)")
  if set(tree) == {"params"}:
    tree = tree["params"]
  params = fix_groupnorm_shapes(tree, None if expected is None else expected.get("params", {}))
  variables = {"params": params}
  if expected is not None:
    check_tree_shapes(variables, expected, "classifier parameters", repr(path))
  return variables


# --- writing converted variables --------------------------------------------------------------
_FORMATS = (".msgpack", ".npz")


def save_variables(variables: Mapping, path: str, overwrite: bool = False) -> str:
  """Write a variables tree as .msgpack (flax serialization) or .npz ('/'-joined keys)."""
  path = os.fspath(path)
  ext = os.path.splitext(path)[1]
  if ext not in _FORMATS:
    raise InputError(f"unknown output format {ext!r} for {path!r}; valid extensions are "
                     f"{list(_FORMATS)}")
  flat = {p: np.asarray(v) for p, v in flatten(variables).items()}
  try:
    if ext == ".npz":
      save_npz_atomic(path, {"/".join(p): v for p, v in flat.items()}, overwrite=overwrite)
    else:
      data = serialization.msgpack_serialize(unflatten(flat))
      with atomic_write(path, overwrite=overwrite) as f:
        f.write(data)
  except FileExistsError:
    raise FileExistsError(f"{path!r} already exists; pass overwrite=True (--overwrite) to "
                          "replace it") from None
  return path


def load_variables(path: str) -> Tree:
  """Read back a file written by `save_variables` (.npz without pickles, or .msgpack)."""
  path = os.fspath(path)
  if path.endswith(".npz"):
    try:
      with np.load(path, allow_pickle=False) as npz:
        return unflatten({tuple(k.split("/")): npz[k] for k in npz.files})
    except (ValueError, OSError, EOFError) as e:
      if isinstance(e, FileNotFoundError):
        raise
      raise InputError(f"{path!r} is not a readable .npz file: {e}") from e
  return read_msgpack(path)


# --- CLI --------------------------------------------------------------------------------------
def load_config(path: str):
  """Call get_config() of a config file (run from the repository root for `configs.*` imports)."""
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
  spec = importlib.util.spec_from_file_location("_sgm_jax_config", path)
  if spec is None or spec.loader is None:
    raise InputError(f"cannot load config file {path!r}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _input_shape(config) -> tuple:
  size = config.data.image_size
  return (1, size, size, config.data.get("num_channels", 3))


def _model_from_config(config) -> tuple[nn.Module, tuple]:
  from sgm_jax import models, sde_lib  # the networks are only needed here
  return models.create_model(config, sde_lib.from_config(config)), _input_shape(config)


def _classifier_from_config(config) -> tuple[nn.Module, tuple]:
  """The classifier of config.classifier; without a config, score_sde's CIFAR-10 WRN-28-10."""
  import ml_collections
  from sgm_jax import models
  if config is None:
    return models.create_classifier(ml_collections.ConfigDict()), (1, 32, 32, 3)
  return models.create_classifier(config), _input_shape(config)


def main(argv: Optional[Sequence[str]] = None) -> str:
  parser = argparse.ArgumentParser(
      prog="python -m sgm_jax.convert",
      description="Convert an original score_sde checkpoint into sgm-jax sampling variables.")
  parser.add_argument("--checkpoint", required=True,
                      help="checkpoint_<n> file, or a directory (its newest checkpoint_<n>)")
  parser.add_argument("--config", help="config file of the checkpoint's model; validates the "
                      "converted tree against the network (recommended)")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--name", help="output file name without extension "
                      "(default: params_ema, params, or classifier_params)")
  parser.add_argument("--format", choices=["msgpack", "npz"], default="msgpack")
  parser.add_argument("--live-params", action="store_true",
                      help="convert optimizer/target instead of params_ema")
  parser.add_argument("--classifier", action="store_true",
                      help="the checkpoint is the bare parameter tree of the noise-conditional "
                      "classifier (checked against config.classifier, or score_sde's WRN-28-10)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
  args = parser.parse_args(argv)

  config = load_config(args.config) if args.config else None
  if args.classifier:
    model, input_shape = _classifier_from_config(config)
    variables = load_classifier_variables(args.checkpoint, model, input_shape)
    name = args.name or "classifier_params"
  else:
    model = input_shape = None
    if config is not None:
      model, input_shape = _model_from_config(config)
    else:
      print("no --config given: converting without checking against a network", file=sys.stderr)
    variables = load_sampling_variables(args.checkpoint, model, input_shape,
                                        use_ema=not args.live_params)
    name = args.name or ("params" if args.live_params else "params_ema")
  out = save_variables(variables, os.path.join(args.out, f"{name}.{args.format}"),
                       overwrite=args.overwrite)
  count = sum(int(np.size(v)) for v in flatten(variables).values())
  print(f"wrote {count:,} parameters to {out}")
  return out


if __name__ == "__main__":
  try:
    main()
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    sys.exit(f"error: {e}")
