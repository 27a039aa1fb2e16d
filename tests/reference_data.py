"""Where the tests find the original score_sde parameter trees (test data, not downloaded).

tests/data/param_trees is a copy of the project's ../shared/reference/param_trees (see its
README.md); SGM_JAX_PARAM_TREES points the tests at another copy.
"""
import os

PARAM_TREES = os.environ.get(
    "SGM_JAX_PARAM_TREES",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "param_trees"))
