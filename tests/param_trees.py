"""What the parameter-tree tests share: the first-call order of a network's modules while it is
traced, and the comparison of a traced tree with a reference file of
../shared/reference/param_trees/ (paths, shapes, count and module order)."""
import contextlib
import math

import flax.linen as nn


@contextlib.contextmanager
def module_call_order():
  """Within it, the path of every Flax module called for the first time ('<root>' for the top) is
  appended to the yielded list: which auto-numbered `Conv_3` is which layer."""
  order = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__":
      path = "/".join(context.module.path) or "<root>"
      if path not in order:
        order.append(path)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    yield order


def assert_matches_reference(ref: dict, shapes: dict, order: list) -> None:
  """`shapes` ({'params/.../kernel': shape}) and `order` are the reference's: the same paths and
  shapes, parameter count and (where the reference records it) module call order."""
  expected = {path: tuple(shape) for path, shape in ref["collections"]["params"]}
  assert sorted(set(expected) - set(shapes)) == [], "paths missing from our tree"
  assert sorted(set(shapes) - set(expected)) == [], "paths not in the reference tree"
  assert {p: (shapes[p], expected[p]) for p in expected if shapes[p] != expected[p]} == {}, (
      "shape mismatches")
  assert sum(math.prod(s) for s in shapes.values()) == ref["num_params"]
  if "module_call_order" in ref:
    assert order == ref["module_call_order"], "modules are created in a different order"
