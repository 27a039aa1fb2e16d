"""Where the tests find data computed by the original score_sde code (test data, not downloaded).

- tests/data/param_trees is a copy of the project's ../shared/reference/param_trees (the original
  networks' parameter trees; see its README.md); SGM_JAX_PARAM_TREES points the tests at another
  copy.
- tests/data/forward is a copy of ../shared/reference/forward (four shrunken original networks:
  a training checkpoint in the original format, and the network output and score that the
  original code computed from it at fixed inputs; see its README.md); SGM_JAX_FORWARD_REFERENCE
  points the tests at another copy.
"""
import os

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

PARAM_TREES = os.environ.get("SGM_JAX_PARAM_TREES", os.path.join(_DATA, "param_trees"))
FORWARD = os.environ.get("SGM_JAX_FORWARD_REFERENCE", os.path.join(_DATA, "forward"))
