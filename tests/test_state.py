"""pureflax.state.TrainState: create, apply_gradients against raw optax, PyTree behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pureflax import vae
from pureflax.state import TrainState
from trees import assert_trees_equal


def make_params(rng):
    tree = {
        "dense": {"kernel": rng.standard_normal((3, 4)), "bias": rng.standard_normal(4)},
        "scale": rng.standard_normal(()),
    }
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)


def make_grads(rng, params):
    return jax.tree_util.tree_map(lambda p: jnp.asarray(rng.standard_normal(np.shape(p)), jnp.float32), params)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_create_step_zero_int32_and_tx_init(rng):
    params = make_params(rng)
    tx = optax.adamw(1e-3)
    state = TrainState.create(params, tx)
    assert isinstance(state, TrainState)
    assert state.step.shape == () and state.step.dtype == jnp.int32 and int(state.step) == 0
    assert state.params is params
    assert_trees_equal(state.opt_state, tx.init(params))


@pytest.mark.parametrize("tx", [optax.adamw(1e-2), optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.1, 0.9))])
def test_apply_gradients_is_manual_optax_update_bitwise(rng, tx):
    params = make_params(rng)
    state = TrainState.create(params, tx)
    opt_state = tx.init(params)
    for _ in range(4):
        grads = make_grads(rng, params)
        state = state.apply_gradients(grads=grads, tx=tx)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        assert_trees_equal(state.params, params)
        assert_trees_equal(state.opt_state, opt_state)


def test_apply_gradients_moves_params_against_gradient(rng):
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    state = TrainState.create(params, optax.sgd(0.5))
    state = state.apply_gradients(grads={"w": jnp.array([2.0, 2.0, -4.0])}, tx=optax.sgd(0.5))
    np.testing.assert_array_equal(np.asarray(state.params["w"]), [0.0, -3.0, 5.0])


def test_step_increments_and_stays_int32(rng):
    params = make_params(rng)
    tx = optax.adam(1e-3)
    state = TrainState.create(params, tx)
    for i in range(1, 4):
        state = state.apply_gradients(grads=make_grads(rng, params), tx=tx)
        assert int(state.step) == i
        assert state.step.dtype == jnp.int32 and state.step.shape == ()


def test_apply_gradients_does_not_mutate_old_state(rng):
    params = make_params(rng)
    tx = optax.adam(1e-3)
    state0 = TrainState.create(params, tx)
    before = jax.tree_util.tree_map(np.array, state0)
    state1 = state0.apply_gradients(grads=make_grads(rng, params), tx=tx)
    assert_trees_equal(jax.tree_util.tree_map(np.asarray, state0), before)
    assert int(state1.step) == 1 and int(state0.step) == 0


def test_is_a_pytree_jit_takes_and_returns(rng):
    params = make_params(rng)
    tx = optax.adamw(1e-2)
    state = TrainState.create(params, tx)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    assert len(leaves) == 1 + len(jax.tree_util.tree_leaves(params)) + len(jax.tree_util.tree_leaves(state.opt_state))
    assert_trees_equal(jax.tree_util.tree_unflatten(treedef, leaves), state)

    grads = make_grads(rng, params)
    traces = []

    def apply(s, g):
        traces.append(1)
        return s.apply_gradients(grads=g, tx=tx)

    step = jax.jit(apply)
    jitted = step(state, grads)
    eager = state.apply_gradients(grads=grads, tx=tx)
    assert isinstance(jitted, TrainState)
    assert jax.tree_util.tree_structure(jitted) == jax.tree_util.tree_structure(eager)
    assert jitted.step.dtype == jnp.int32 and int(jitted.step) == 1
    for a, b in zip(jax.tree_util.tree_leaves(jitted), jax.tree_util.tree_leaves(eager), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # The jitted state feeds back into the same compiled step.
    again = step(jitted, grads)
    assert int(again.step) == 2
    assert len(traces) == 1  # same structure, shapes and dtypes: no retrace


def test_create_on_vae_params():
    config = vae.VAEConfig(
        encoder_dimensions=(8, 7, 6), decoder_dimensions=(6, 8, 16), latent_dim=2, num_classes=3, input_dim=16
    )
    # vae.init's tree (paths, shapes, dtypes) without compiling its initialisers.
    shapes = jax.eval_shape(lambda key: vae.init(key, config), jax.random.key(0))
    params = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 0.5, s.dtype), shapes)
    tx = optax.adam(1e-3)
    state = TrainState.create(params, tx)
    assert_trees_equal(state.opt_state, tx.init(params))
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    state = jax.jit(lambda s, g: s.apply_gradients(grads=g, tx=tx))(state, grads)
    assert int(state.step) == 1
    # adam's first step with unit gradients is -lr * 1 / (1 + eps) on every entry
    for new, old in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(new) - np.asarray(old), -1e-3, rtol=1e-3)
