"""The backends: one shared step, the same start from the same seed, checkpoints across forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState as FlaxTrainState

from pureflax import TrainState, optim, step as step_lib, train, vae
from pureflax.compat import parity
from pureflax.compat.backends import get_backend
from pureflax.compat.equinox_models import VAE as EquinoxVAE

CONFIG = vae.VAEConfig(encoder_dimensions=(32, 16), decoder_dimensions=(16, 784), latent_dim=4)
TRAIN = train.TrainConfig(model=CONFIG, optim=optim.OptimConfig(lr=1e-3))
NAMES = parity.NAMES


def run(backend, state, train_step, batches):
    losses = []
    for batch in batches:
        state, metrics = train_step(state, batch, jax.random.PRNGKey(5))
        losses.append(float(metrics.loss))
    return state, losses


def batches(n, seed=0):
    return [parity.random_batch(jax.random.PRNGKey(seed + i), 8, CONFIG) for i in range(n)]


def test_every_backend_uses_the_one_train_step_definition():
    codes = set()
    for name in NAMES:
        _, _, _, train_step = train.build(TRAIN, get_backend(name, CONFIG), 10, jax.random.PRNGKey(0))
        codes.add(train_step.__wrapped__.__code__)
    assert codes == {step_lib.make_train_step(lambda *a: None, optax.sgd(0.1)).__wrapped__.__code__}


def test_state_types():
    states = {name: train.build(TRAIN, get_backend(name, CONFIG), 10, jax.random.PRNGKey(0))[0] for name in NAMES}
    assert isinstance(states["functional"], TrainState) and isinstance(states["functional"].params, dict)
    assert isinstance(states["equinox"], TrainState) and isinstance(states["equinox"].params, EquinoxVAE)
    assert isinstance(states["flax"], FlaxTrainState) and set(states["flax"].params) == {"params"}


def test_the_same_seed_gives_the_same_starting_weights_in_every_form():
    key = jax.random.PRNGKey(0xFFFF)
    start = {name: get_backend(name, CONFIG) for name in NAMES}
    reference = start["functional"].init_params(key, False)
    for name, backend in start.items():
        functional = backend.to_functional(backend.init_params(key, False))
        for a, b in zip(jax.tree_util.tree_leaves(functional), jax.tree_util.tree_leaves(reference)):
            np.testing.assert_array_equal(a, b)


def test_native_init_is_each_librarys_own():
    key = jax.random.PRNGKey(3)
    functional = get_backend("functional", CONFIG).init_params(key, False)
    flax_native = get_backend("flax", CONFIG).init_params(key, True)  # the tutorial's model.init
    for a, b in zip(jax.tree_util.tree_leaves(flax_native["params"]), jax.tree_util.tree_leaves(functional)):
        np.testing.assert_array_equal(a, b)
    eqx_native = get_backend("equinox", CONFIG).init_params(key, True)
    bias = np.asarray(eqx_native.encoder.layers[0].bias)
    assert np.any(bias != 0) and np.all(np.abs(bias) <= 1 / np.sqrt(784))  # eqx.nn.Linear: uniform, bias too


@pytest.mark.parametrize("writer", NAMES)
def test_a_checkpoint_from_any_backend_restores_into_every_backend(tmp_path, writer):
    data = batches(12)
    backends = {name: get_backend(name, CONFIG) for name in NAMES}
    state, _, _, train_step = train.build(TRAIN, backends[writer], 12, jax.random.PRNGKey(1))
    state, _ = run(backends[writer], state, train_step, data[:6])
    train.save_state(tmp_path, state, backends[writer])
    reference, expected = run(backends[writer], state, train_step, data[6:])  # the uninterrupted run
    expected_params = backends[writer].to_functional(reference).params
    for reader, backend in backends.items():
        fresh, _, _, reader_step = train.build(TRAIN, backend, 12, jax.random.PRNGKey(99))
        restored = train.restore_state(tmp_path, fresh, backend)
        assert int(restored.step) == 6
        continued, losses = run(backend, restored, reader_step, data[6:])
        np.testing.assert_allclose(losses, expected, rtol=1e-5, err_msg=f"{writer} -> {reader}")
        got = backend.to_functional(continued).params
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected_params)):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"{writer} -> {reader}")


@pytest.mark.parametrize("name", ["equinox", "flax"])
def test_freezing_works_in_every_form(name):
    config = train.TrainConfig(model=CONFIG, optim=optim.OptimConfig(lr=1e-2, freeze=("encoder", "decoder/Dense_1")))
    backend = get_backend(name, CONFIG)
    state, _, _, train_step = train.build(config, backend, 5, jax.random.PRNGKey(0))
    start = jax.tree_util.tree_map(np.array, backend.to_functional(state).params)  # copy: the step donates
    state, _ = run(backend, state, train_step, batches(5))
    end = backend.to_functional(state).params
    for path in (("encoder", "Dense_0", "kernel"), ("encoder", "Dense_1", "bias"), ("decoder", "Dense_1", "kernel")):
        a, b = end, start
        for key in path:
            a, b = a[key], b[key]
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(end["decoder"]["Dense_0"]["kernel"], start["decoder"]["Dense_0"]["kernel"])


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="unknown backend 'torch'.*functional, equinox, flax"):
        get_backend("torch", CONFIG)
