"""The backends: one shared step, the same start from the same seed, checkpoints across forms."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState as FlaxTrainState

from pureflax import TrainState, optim, step as step_lib, train, vae
from pureflax.backend import Backend
from pureflax.compat import parity
from pureflax.compat.backends import get_backend
from pureflax.compat.equinox_models import VAE as EquinoxVAE

CONFIG = vae.VAEConfig(encoder_dimensions=(32, 16), decoder_dimensions=(16, 784), latent_dim=4)
TRAIN = train.TrainConfig(model=CONFIG, optim=optim.OptimConfig(lr=1e-3))
NAMES = parity.NAMES


def run(train_step, state, batches):
    losses = []
    for batch in batches:
        state, metrics = train_step(state, batch, jax.random.PRNGKey(5))
        losses.append(float(metrics.loss))
    return state, losses


def batches(n, seed=0):
    return [parity.random_batch(jax.random.PRNGKey(seed + i), 8, CONFIG) for i in range(n)]


class Built(NamedTuple):
    """What ``train.build`` gave for one backend, and what ``make_train_step`` made meanwhile."""

    backend: Backend
    tx: optax.GradientTransformation
    train_step: Callable
    made: list[Any]  # every step pureflax.step.make_train_step returned during this build

    def fresh(self, key):
        """A fresh state of this backend (``train.build``'s own first lines), for ``train_step``.

        The same ``tx`` object: Flax's TrainState carries it as static data, so a state from
        another build would make the jitted step compile again.
        """
        return self.backend.create_state(self.backend.init_params(key, False), self.tx)


@pytest.fixture(scope="module")
def built():
    """``train.build`` once per backend, with ``pureflax.step.make_train_step`` spied on.

    Compiling a backend's step is most of these tests' time, so the tests share these steps
    (each compiles once per module) and start from fresh states of their own.
    """
    made = []
    real = step_lib.make_train_step

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    out = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step_lib, "make_train_step", spy)
        for name in NAMES:
            backend, start = get_backend(name, CONFIG), len(made)
            _, tx, _, train_step = train.build(TRAIN, backend, 12, jax.random.PRNGKey(1))
            out[name] = Built(backend, tx, train_step, made[start:])
    return out


@pytest.fixture(scope="module")
def data():
    return batches(12)


def test_every_backend_trains_with_the_one_shared_step(built, data):
    # train.build makes each backend's step with pureflax.step.make_train_step, once, and
    # returns exactly the object it made (no wrapper, no step of the backend's own).
    for name, b in built.items():
        assert len(b.made) == 1 and b.train_step is b.made[0], name
    # ... and that step does the functional step's arithmetic in every form: from the same
    # weights, one step gives the same loss, params and optimiser state (after to_functional).
    after, losses = {}, {}
    for name, b in built.items():
        state, metrics = b.train_step(b.fresh(jax.random.PRNGKey(1)), data[0], jax.random.PRNGKey(5))
        after[name], losses[name] = b.backend.to_functional(state), float(metrics.loss)
    start = built["functional"].fresh(jax.random.PRNGKey(1)).params
    want = after["functional"]
    assert int(want.step) == 1
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(jax.tree_util.tree_leaves(want.params), jax.tree_util.tree_leaves(start))]
    assert max(moved) > 1e-4  # the step did update the weights (by ~lr = 1e-3)
    for name in NAMES:
        got = after[name]
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want), name
        np.testing.assert_allclose(losses[name], losses["functional"], rtol=1e-6, err_msg=name)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=name)  # an adamw step moves them ~1e-3


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
def test_a_checkpoint_from_any_backend_restores_into_every_backend(tmp_path, built, data, writer):
    w = built[writer]
    state, _ = run(w.train_step, w.fresh(jax.random.PRNGKey(1)), data[:6])
    train.save_state(tmp_path, state, w.backend)
    reference, expected = run(w.train_step, state, data[6:])  # the uninterrupted run
    expected_params = w.backend.to_functional(reference).params
    for reader, r in built.items():
        restored = train.restore_state(tmp_path, r.fresh(jax.random.PRNGKey(99)), r.backend)
        assert int(restored.step) == 6
        continued, losses = run(r.train_step, restored, data[6:])
        np.testing.assert_allclose(losses, expected, rtol=1e-5, err_msg=f"{writer} -> {reader}")
        got = r.backend.to_functional(continued).params
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected_params)):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"{writer} -> {reader}")


@pytest.mark.parametrize("name", ["equinox", "flax"])
def test_freezing_works_in_every_form(name):
    config = train.TrainConfig(model=CONFIG, optim=optim.OptimConfig(lr=1e-2, freeze=("encoder", "decoder/Dense_1")))
    backend = get_backend(name, CONFIG)
    state, _, _, train_step = train.build(config, backend, 5, jax.random.PRNGKey(0))
    start = jax.tree_util.tree_map(np.array, backend.to_functional(state).params)  # copy: the step donates
    state, _ = run(train_step, state, batches(5))
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
