"""Helpers the tests share for comparing PyTrees and arrays."""

import jax
import numpy as np


def assert_trees_equal(a, b):
    """Same structure, same shapes and dtypes, bit-for-bit equal leaves."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def max_diff(a, b):
    """The largest absolute difference, in numpy (eager jax ops would compile once per shape)."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def key(seed):
    return jax.random.PRNGKey(seed)
