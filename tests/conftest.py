"""Shared test configuration: strict numerics, explicit keys."""

import itertools

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "standard")


@pytest.fixture
def getkey():
    """Return a function that hands out a fresh, distinct key on each call."""
    counter = itertools.count()
    return lambda: jax.random.key(next(counter))
