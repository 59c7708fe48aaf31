"""pureflax.losses against the tutorial's ``loss_fn`` written out inline, and numpy."""

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import optax
import pytest

from pureflax import losses

BATCH, FEATURES, LATENT = 5, 16, 3


def tutorial_loss(recon, x, mean, logvar, kl_weight):
    """The body of the tutorial's ``create_train_step.loss_fn``, verbatim after ``model.apply``."""
    reduce_dims = list(range(1, len(x.shape)))
    mse_loss = optax.l2_loss(recon, x).sum(axis=reduce_dims).mean()
    kl_loss = jnp.mean(-0.5 * jnp.sum(1 + logvar - mean**2 - jnp.exp(logvar), axis=reduce_dims))
    loss = mse_loss + kl_weight * kl_loss
    return loss, (mse_loss, kl_loss)


def random_inputs(getkey):
    recon = jax.random.uniform(getkey(), (BATCH, FEATURES))
    x = jax.random.uniform(getkey(), (BATCH, FEATURES))
    mean = jax.random.normal(getkey(), (BATCH, LATENT))
    logvar = 0.5 * jax.random.normal(getkey(), (BATCH, LATENT))
    return recon, x, mean, logvar


@pytest.mark.parametrize("kl_weight", [0.0, 0.5, 1.0, 3.25])
def test_vae_loss_is_tutorial_loss_fn(getkey, kl_weight):
    recon, x, mean, logvar = random_inputs(getkey)
    loss, (mse, kl) = losses.vae_loss(recon, x, mean, logvar, kl_weight)
    want_loss, (want_mse, want_kl) = tutorial_loss(recon, x, mean, logvar, kl_weight)
    for got, want in ((loss, want_loss), (mse, want_mse), (kl, want_kl)):
        assert got.shape == () and got.dtype == jnp.float32
        np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    # The weight really enters: the loss is not just the reconstruction term.
    if kl_weight:
        assert abs(float(loss) - float(mse)) > 1e-3


def test_vae_loss_default_kl_weight_is_tutorials_half(getkey):
    recon, x, mean, logvar = random_inputs(getkey)
    loss, _ = losses.vae_loss(recon, x, mean, logvar)
    want, _ = tutorial_loss(recon, x, mean, logvar, 0.5)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)


def test_vae_loss_docstring_values():
    z = jnp.zeros((2, 3))
    loss, (mse, kl) = losses.vae_loss(jnp.ones((2, 4)), jnp.zeros((2, 4)), z, z)
    assert (float(loss), float(mse), float(kl)) == (2.0, 2.0, 0.0)


def test_vae_loss_under_jit_and_grad(getkey):
    recon, x, mean, logvar = random_inputs(getkey)
    loss, _ = jax.jit(losses.vae_loss)(recon, x, mean, logvar)
    want, _ = tutorial_loss(recon, x, mean, logvar, 0.5)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    # d(mean_b sum_f 0.5 (r - x)^2) / dr = (r - x) / batch
    g = jax.grad(lambda r: losses.vae_loss(r, x, mean, logvar)[0])(recon)
    np.testing.assert_allclose(np.asarray(g), (np.asarray(recon) - np.asarray(x)) / BATCH, rtol=1e-5, atol=1e-7)


def test_kl_zero_at_standard_normal():
    z = jnp.zeros((4, LATENT))
    assert float(losses.kl_divergence(z, z)) == 0.0


def test_kl_positive_away_from_standard_normal(getkey):
    z = jnp.zeros((4, LATENT))
    shift = jax.random.normal(getkey(), (4, LATENT))
    assert float(losses.kl_divergence(shift, z)) > 0.0  # mean moved only
    assert float(losses.kl_divergence(z, shift)) > 0.0  # variance changed only
    assert float(losses.kl_divergence(shift, shift)) > 0.0
    # Tiny departures are still strictly positive.
    assert float(losses.kl_divergence(z.at[0, 0].set(1e-2), z)) > 0.0


def test_kl_numpy_reference(getkey):
    mean = np.asarray(jax.random.normal(getkey(), (6, LATENT)), np.float64)
    logvar = np.asarray(jax.random.normal(getkey(), (6, LATENT)), np.float64)
    # KL(N(m, s^2) || N(0, 1)) = 0.5 * (s^2 + m^2 - 1 - log s^2), per latent.
    want = (0.5 * (np.exp(logvar) + mean**2 - 1.0 - logvar)).sum(axis=1).mean()
    got = losses.kl_divergence(jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_kl_averages_over_batch_sums_over_latents():
    mean = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # per-row KL: 0.5 * (1 + 1) = 1 and 0; batch mean 0.5
    assert float(losses.kl_divergence(mean, jnp.zeros_like(mean))) == 0.5


def test_reconstruction_numpy_reference(getkey):
    recon = np.asarray(jax.random.normal(getkey(), (7, FEATURES)), np.float64)
    x = np.asarray(jax.random.uniform(getkey(), (7, FEATURES)), np.float64)
    want = (0.5 * (recon - x) ** 2).sum(axis=1).mean()
    got = losses.reconstruction(jnp.asarray(recon, jnp.float32), jnp.asarray(x, jnp.float32))
    assert got.shape == ()
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_reconstruction_zero_when_exact(getkey):
    x = jax.random.uniform(getkey(), (3, FEATURES))
    assert float(losses.reconstruction(x, x)) == 0.0


def test_reconstruction_hand_value():
    recon = jnp.array([[1.0, 2.0], [0.0, 0.0]])
    x = jnp.array([[0.0, 0.0], [0.0, 4.0]])
    # rows: 0.5 * (1 + 4) = 2.5 and 0.5 * 16 = 8; mean 5.25
    assert float(losses.reconstruction(recon, x)) == 5.25


# The shape checks (pureflax.losses' jaxtyping annotations, checked by beartype at call time)
# always run: these tests fail, never skip, if the checks are ever lost. Unchecked, a
# mismatch would surface as jax's own ValueError / TypeError (not jaxtyping.TypeCheckError)
# or not at all (a wrong-rank kl_weight just broadcasts).


def test_vae_loss_rejects_1d_recon():
    z = jnp.zeros((2, 3))
    with pytest.raises(jaxtyping.TypeCheckError, match="recon"):
        losses.vae_loss(jnp.ones(4), jnp.zeros(4), z, z)


def test_vae_loss_rejects_mismatched_features():
    z = jnp.zeros((2, 3))
    with pytest.raises(jaxtyping.TypeCheckError, match="'x'"):
        losses.vae_loss(jnp.ones((2, 4)), jnp.zeros((2, 5)), z, z)


def test_vae_loss_rejects_mismatched_batch():
    z = jnp.zeros((3, 3))
    with pytest.raises(jaxtyping.TypeCheckError, match="mean"):
        losses.vae_loss(jnp.ones((2, 4)), jnp.zeros((2, 4)), z, z)


def test_vae_loss_rejects_image_shaped_input():
    # The tutorial reduces over range(1, ndim); pureflax takes flattened (batch, features) only.
    z = jnp.zeros((2, 3))
    with pytest.raises(jaxtyping.TypeCheckError, match="recon"):
        losses.vae_loss(jnp.ones((2, 4, 4)), jnp.zeros((2, 4, 4)), z, z)


def test_vae_loss_accepts_int_kl_weight(getkey):
    recon, x, mean, logvar = random_inputs(getkey)
    loss, _ = losses.vae_loss(recon, x, mean, logvar, 1)
    want, _ = tutorial_loss(recon, x, mean, logvar, 1.0)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    traced, _ = jax.jit(lambda w: losses.vae_loss(recon, x, mean, logvar, w))(jnp.float32(1.0))  # an annealed weight
    np.testing.assert_allclose(float(traced), float(want), rtol=1e-6)
    # ... but the annotation still checks the weight: a non-scalar one is refused by name
    # (unchecked, it would broadcast the loss to shape (3,) without a word).
    with pytest.raises(jaxtyping.TypeCheckError, match="kl_weight"):
        losses.vae_loss(recon, x, mean, logvar, jnp.ones(3))
