"""Orbax round trips of a training state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pureflax import TrainState, checkpoint, optim, vae

CONFIG = vae.VAEConfig(encoder_dimensions=(8,), decoder_dimensions=(8, 12), latent_dim=2, num_classes=3, input_dim=12)


# The values do not matter to a round trip, only the tree: vae.init's paths, shapes and
# dtypes (eval_shape: nothing compiled) filled with numpy draws. Eagerly, the init kernels
# and every optimiser op would compile once per leaf shape, ~100 XLA compiles (seconds).
PARAMS = jax.eval_shape(lambda: vae.init(jax.random.PRNGKey(0), CONFIG))


def draw(seed):
    """A tree like the params, numpy draws from ``seed``."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), PARAMS)


def trained_state(tx, steps=3):
    state = jax.jit(lambda params: TrainState.create(params, tx))(draw(0))
    update = jax.jit(lambda state, grads: state.apply_gradients(grads=grads, tx=tx))
    for i in range(steps):
        state = update(state, draw(100 + i))
    return state


@pytest.mark.parametrize(
    "config",
    [optim.OptimConfig(), optim.OptimConfig(optimizer="adam", ema=0.9, clip_norm=1.0, grad_accum=2)],
    ids=["adamw", "adam-ema-clip-multisteps"],
)
def test_save_restore_is_bitwise(tmp_path, config):
    params = draw(0)
    tx = optim.make_optimizer(config, 100, params)
    state = trained_state(tx)
    assert checkpoint.save(tmp_path, state) == 3
    assert (tmp_path / "3" / "commit_success.txt").exists()
    target = jax.jit(lambda params: TrainState.create(params, tx))(draw(1))
    restored = checkpoint.restore(tmp_path, target)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_latest_step_and_restore_by_step(tmp_path):
    tx = optax.sgd(0.1)
    s1 = trained_state(tx, 1)
    s2 = trained_state(tx, 2)
    checkpoint.save(tmp_path, s1)
    checkpoint.save(tmp_path, s2)
    assert checkpoint.latest_step(tmp_path) == 2
    first = checkpoint.restore(tmp_path, s2, step=1)
    np.testing.assert_array_equal(first.params["class_proj"]["kernel"], s1.params["class_proj"]["kernel"])
    assert int(first.step) == 1


def test_restore_from_an_empty_directory_says_so(tmp_path):
    tx = optax.sgd(0.1)
    assert checkpoint.latest_step(tmp_path / "none") is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.restore(tmp_path, TrainState.create({"w": jnp.ones(2)}, tx))
