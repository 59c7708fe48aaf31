"""The shared train step against the tutorial's own train_step, step for step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pureflax import TrainState, optim, report, vae
from pureflax.compat import flax_models
from pureflax.step import NO_MODEL_STATE, Batch, make_eval_step, make_loss_fn, make_train_step, stateless, to_inputs

CONFIG = vae.VAEConfig(encoder_dimensions=(32, 16), decoder_dimensions=(16, 49), latent_dim=4, num_classes=10, input_dim=49)
KL_WEIGHT = 0.5


def TutorialVAE():
    """The tutorial's VAE (compat.flax_models) with CONFIG's sizes."""
    return flax_models.VAE(
        encoder_dimensions=CONFIG.encoder_dimensions, decoder_dimensions=CONFIG.decoder_dimensions, latent_dim=CONFIG.latent_dim
    )


def batches(n_steps, batch_size=8, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n_steps):
        yield Batch(
            jnp.asarray(rng.integers(0, 256, (batch_size, 49), dtype=np.uint8)),
            jnp.asarray(rng.integers(0, 10, batch_size, dtype=np.int32)),
        )


def test_shared_step_follows_the_tutorials_train_step():
    key = jax.random.PRNGKey(0)
    params = vae.init(key, CONFIG)
    tx = optax.adamw(1e-3)
    train_key = jax.random.PRNGKey(1)
    step = make_train_step(make_loss_fn(stateless(vae.apply), kl_weight=KL_WEIGHT), tx)
    reference = flax_models.tutorial_train_step(TutorialVAE(), tx, kl_weight=KL_WEIGHT)

    ref_params = {"params": jax.tree_util.tree_map(jnp.copy, params)}  # the step donates its state's buffers
    ref_opt = tx.init(ref_params)
    state = TrainState.create(params, tx)
    for i, batch in enumerate(batches(20)):
        state, metrics = step(state, batch, train_key)
        x = batch.images.astype(jnp.float32) / 255.0  # the tutorial's ToTensor() scaling
        ref_params, ref_opt, loss, mse, kl = reference(ref_params, ref_opt, x, batch.labels, jax.random.fold_in(train_key, i))
        np.testing.assert_allclose([metrics.loss, metrics.mse, metrics.kl], [loss, mse, kl], rtol=1e-5)
    assert int(state.step) == 20
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(ref_params["params"])):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_step_keys_come_from_fold_in_of_the_step_number():
    """A state restored at step k takes the same update as the uninterrupted run."""
    tx = optax.adam(1e-3)
    step = make_train_step(make_loss_fn(stateless(vae.apply)), tx)
    key = jax.random.PRNGKey(3)
    data = list(batches(6, seed=1))
    state = TrainState.create(vae.init(jax.random.PRNGKey(0), CONFIG), tx)
    for batch in data[:3]:
        state, _ = step(state, batch, key)
    resumed = jax.tree_util.tree_map(jnp.copy, state)  # as if restored from a checkpoint
    for batch in data[3:]:
        state, m1 = step(state, batch, key)
        resumed, m2 = step(resumed, batch, key)
        assert float(m1.loss) == float(m2.loss)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(a, b)


def test_eval_step_is_the_loss_without_an_update():
    params = vae.init(jax.random.PRNGKey(0), CONFIG)
    loss_fn = make_loss_fn(stateless(vae.apply))
    batch = next(batches(1))
    key = jax.random.PRNGKey(9)
    metrics = make_eval_step(loss_fn)(params, batch, key)
    loss, ((mse, kl), model_state) = loss_fn(params, batch, key)
    assert model_state == {}
    np.testing.assert_allclose([metrics.loss, metrics.mse, metrics.kl], [loss, mse, kl], rtol=1e-6)


@pytest.mark.parametrize("n", [30, 24, 5])  # full batches and a partial one; full batches only; one partial batch
def test_evaluate_in_one_program_gives_the_batch_by_batch_means(n):
    params = vae.init(jax.random.PRNGKey(0), CONFIG)
    eval_step = make_eval_step(make_loss_fn(stateless(vae.apply)))
    rng = np.random.default_rng(3)
    data = Batch(jnp.asarray(rng.integers(0, 256, (n, 49), dtype=np.uint8)), jnp.asarray(rng.integers(0, 10, n, dtype=np.int32)))
    key, size = jax.random.PRNGKey(4), 8
    expected = np.zeros(3)
    for i, start in enumerate(range(0, n, size)):  # batch i with fold_in(key, i), weighted by its size
        batch = Batch(data.images[start : start + size], data.labels[start : start + size])
        expected += np.asarray(eval_step(params, batch, jax.random.fold_in(key, i))) * batch.labels.shape[0]
    metrics = report.evaluate(eval_step, params, data, key, size)
    np.testing.assert_allclose(list(metrics), expected / n, rtol=1e-6)


def test_to_inputs_scales_pixels_and_one_hots_labels():
    x, c = to_inputs(Batch(jnp.array([[0, 255, 51]], jnp.uint8), jnp.array([2], jnp.int32)), num_classes=3)
    np.testing.assert_allclose(x, [[0.0, 1.0, 0.2]], rtol=1e-6)
    np.testing.assert_array_equal(c, [[0.0, 0.0, 1.0]])


def test_frozen_params_stay_bit_identical_through_the_shared_step():
    params = vae.init(jax.random.PRNGKey(0), CONFIG)
    tx = optim.make_optimizer(optim.OptimConfig(freeze=("encoder", "pre_latent_proj"), lr=1e-2), 10, params)
    step = make_train_step(make_loss_fn(stateless(vae.apply)), tx)
    state = TrainState.create(params, tx)
    start = jax.tree_util.tree_map(np.asarray, params)
    for batch in batches(10):
        state, _ = step(state, batch, jax.random.PRNGKey(1))
    for name in ("encoder", "pre_latent_proj"):
        for a, b in zip(jax.tree_util.tree_leaves(state.params[name]), jax.tree_util.tree_leaves(start[name])):
            np.testing.assert_array_equal(a, b)
    for name in ("post_latent_proj", "class_proj", "decoder"):
        for a, b in zip(jax.tree_util.tree_leaves(state.params[name]), jax.tree_util.tree_leaves(start[name])):
            assert not np.array_equal(a, b), name


def test_batch_of_wrong_width_is_rejected_at_trace_time():
    tx = optax.sgd(0.1)
    step = make_train_step(make_loss_fn(stateless(vae.apply)), tx)
    state = TrainState.create(vae.init(jax.random.PRNGKey(0), CONFIG), tx)
    bad = Batch(jnp.zeros((4, 50), jnp.uint8), jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match=r"\(4, 50\).*49"):
        step(state, bad, jax.random.PRNGKey(0))


def test_a_state_without_a_model_state_field_refuses_a_model_that_returns_one():
    """Flax's own TrainState has no field for a model state: NO_MODEL_STATE reads {} and keeps nothing."""
    from flax.training.train_state import TrainState as FlaxTrainState

    tx = optax.sgd(0.1)
    state = FlaxTrainState.create(apply_fn=None, params=vae.init(jax.random.PRNGKey(0), CONFIG), tx=tx)
    update = lambda s, g: s.apply_gradients(grads=g)  # noqa: E731
    step = make_train_step(make_loss_fn(stateless(vae.apply)), tx, apply_gradients=update, slot=NO_MODEL_STATE)
    state, _ = step(state, next(batches(1)), jax.random.PRNGKey(0))
    assert int(state.step) == 1

    def counting(params, model_state, x, c, key, *, train=True):  # a model that keeps a count
        out, _ = stateless(vae.apply)(params, model_state, x, c, key)
        return out, {"count": jnp.ones(())}

    step = make_train_step(make_loss_fn(counting), tx, apply_gradients=update, slot=NO_MODEL_STATE)
    with pytest.raises(ValueError, match="no place for a model state"):
        step(state, next(batches(1)), jax.random.PRNGKey(0))
