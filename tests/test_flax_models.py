"""pureflax.compat.flax_models: the tutorial's Flax linen modules, and pureflax's exactness against them."""

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np

from pureflax import nn, vae
from pureflax.compat import flax_models
from trees import assert_trees_equal, key, max_diff

BATCH = 5
SMALL = flax_models.VAE(encoder_dimensions=(12, 8), decoder_dimensions=(8, 20), latent_dim=3)
CFG = vae.VAEConfig(encoder_dimensions=(12, 8), decoder_dimensions=(8, 20), latent_dim=3, num_classes=4, input_dim=20)


def random_like(tree, seed, scale=0.3):
    """Numpy values in the shape of ``tree``: no initialiser to compile."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), tree)


def inputs(seed=0, n=BATCH):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.uniform(size=(n, CFG.input_dim)), jnp.float32)
    c = jax.nn.one_hot(jnp.asarray(rng.integers(0, CFG.num_classes, n)), CFG.num_classes)
    return x, c


def test_model_and_model_compact_have_the_same_params_up_to_the_name():
    x0 = jnp.zeros((1, 5))
    setup = flax_models.Model(dim=3)
    compact = flax_models.ModelCompact(dim=3)
    p_setup = jax.eval_shape(setup.init, key(0), x0)["params"]
    p_compact = jax.eval_shape(compact.init, key(0), x0)["params"]
    assert list(p_setup) == ["layer"]  # the name given in setup
    assert list(p_compact) == ["Dense_0"]  # the name nn.compact makes
    assert jax.tree_util.tree_map(np.shape, p_setup["layer"]) == {"kernel": (5, 3), "bias": (3,)}
    assert jax.tree_util.tree_map(np.shape, p_compact["Dense_0"]) == jax.tree_util.tree_map(np.shape, p_setup["layer"])

    values = random_like(p_setup["layer"], 1)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 5)), jnp.float32)
    y_setup = jax.jit(setup.apply)({"params": {"layer": values}}, x)
    y_compact = jax.jit(compact.apply)({"params": {"Dense_0": values}}, x)
    np.testing.assert_array_equal(y_setup, y_compact)
    expected = np.maximum(np.asarray(x) @ np.asarray(values["kernel"]) + np.asarray(values["bias"])[None, :], 0)
    np.testing.assert_allclose(y_setup, expected, rtol=0, atol=1e-6)
    assert (expected == 0).any() and (expected > 0).any()  # the relu is doing something


def test_feed_forward_on_the_tutorials_key_example():
    key_ = jax.random.PRNGKey(0xFFFF)
    key_, model_key = jax.random.split(key_)
    model = flax_models.FeedForward(dimensions=(4, 2, 1), drop_last_activation=True)
    x = jax.random.normal(key_, (1, 8))
    params = model.init(model_key, jnp.zeros((1, 8)))
    y = model.apply(params, x)
    assert y.shape == (1, 1)
    assert jax.tree_util.tree_map(np.shape, params["params"]) == {
        "Dense_0": {"kernel": (8, 4), "bias": (4,)},
        "Dense_1": {"kernel": (4, 2), "bias": (2,)},
        "Dense_2": {"kernel": (2, 1), "bias": (1,)},
    }
    # by hand: relu after every layer but the last
    p = jax.tree_util.tree_map(np.asarray, params["params"])
    h = np.asarray(x)
    for i in range(3):
        h = h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"][None, :]
        if i < 2:
            h = np.maximum(h, 0)
    np.testing.assert_allclose(y, h, rtol=0, atol=1e-6)
    # with the last activation kept, the output is the relu of it
    relu_last = flax_models.FeedForward(dimensions=(4, 2, 1)).apply(params, x)
    np.testing.assert_allclose(relu_last, np.maximum(h, 0), rtol=0, atol=1e-6)
    # and pureflax's feed_forward is the same layer: same key, same params, same output
    layer = nn.feed_forward((4, 2, 1), drop_last_activation=True)
    assert_trees_equal(layer.init(model_key, jnp.zeros((1, 8))), params["params"])
    np.testing.assert_allclose(layer.apply(params["params"], x), y, rtol=0, atol=1e-6)


def test_vae_methods_through_apply_with_method():
    x, c = inputs(3)
    variables = random_like(jax.eval_shape(SMALL.init, key(0), x, c, key(1)), 4)
    k = key(5)
    mean, logvar = SMALL.apply(variables, x, method=SMALL.encode)
    assert mean.shape == logvar.shape == (BATCH, CFG.latent_dim)
    z = SMALL.apply(variables, mean, logvar, k, method=SMALL.reparam)
    assert z.shape == (BATCH, CFG.latent_dim)
    recon = SMALL.apply(variables, z, c, method=SMALL.decode)
    assert recon.shape == (BATCH, CFG.input_dim)

    # the methods compose to __call__
    full = SMALL.apply(variables, x, c, k)
    for a, b in zip(full, (recon, mean, logvar), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # reparam is mean + exp(logvar / 2) * eps with eps drawn from the key for the whole batch
    eps = jax.random.normal(k, mean.shape)
    np.testing.assert_allclose(z, mean + jnp.exp(0.5 * logvar) * eps, rtol=0, atol=1e-6)
    # and each method is pureflax's function of the same params
    params = variables["params"]
    m2, lv2 = vae.encode(params, x)
    np.testing.assert_allclose(m2, mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(lv2, logvar, rtol=0, atol=1e-6)
    np.testing.assert_allclose(vae.reparam(mean, logvar, k), z, rtol=0, atol=1e-6)
    np.testing.assert_allclose(vae.decode(params, z, c), recon, rtol=0, atol=1e-6)
    assert max_diff(recon, 0) > 1e-3


def test_flax_vae_init_equals_pureflax_vae_init_bitwise():
    """The tutorial's full size (latent 32): same key, same params, bit for bit.

    Both compiled with ``jax.jit`` at XLA's lowest optimisation level, as two separate
    programs (so XLA cannot share work between them): eagerly every initialiser shape
    compiles on its own, seconds on a small CPU. The eager comparison is tests/test_vae.py's.
    """
    key_ = jax.random.PRNGKey(0xFFFF)
    key_, model_key = jax.random.split(key_)
    model = flax_models.VAE(latent_dim=32)
    fast = {"xla_backend_optimization_level": 0}
    x, c = jnp.zeros((16, 784)), jnp.zeros((16, 10))
    flax_init = jax.jit(lambda k: model.init(k, x, c, jax.random.PRNGKey(0)), compiler_options=fast)
    pure_init = jax.jit(lambda k: vae.init(k, vae.VAEConfig(latent_dim=32)), compiler_options=fast)
    flax_params = flax_init(model_key)["params"]
    params = pure_init(model_key)
    assert flax_params["pre_latent_proj"]["kernel"].shape == (64, 64)
    assert flax_params["decoder"]["Dense_2"]["kernel"].shape == (256, 784)
    assert_trees_equal(params, flax_params)
    # a different key gives different params: the equality is not vacuous
    other = pure_init(key_)
    assert not np.array_equal(other["encoder"]["Dense_0"]["kernel"], params["encoder"]["Dense_0"]["kernel"])


def test_flax_sequential_names_children_layers_i():
    """The naming rule the converters follow for list fields: flax.linen.Sequential's ``layers_{i}``."""
    seq = fnn.Sequential([fnn.Dense(4), fnn.relu, fnn.Dense(2)])
    params = jax.eval_shape(seq.init, key(0), jnp.zeros((1, 3)))["params"]
    assert sorted(params) == ["layers_0", "layers_2"]
    assert params["layers_2"]["kernel"].shape == (4, 2)
