"""pureflax.compat.equinox_models: the tutorial's VAE as an Equinox module."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pureflax import vae
from pureflax.compat import convert, equinox_models
from trees import key, max_diff

CFG = vae.VAEConfig(encoder_dimensions=(12, 8), decoder_dimensions=(8, 20), latent_dim=3, num_classes=4, input_dim=20)
EQX_KW = dict(latent_dim=3, encoder_dimensions=(12, 8), decoder_dimensions=(8, 20), num_classes=4, input_dim=20)
BATCH = 5


def inputs(seed=0, n=BATCH):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.uniform(size=(n, CFG.input_dim)), jnp.float32)
    c = jax.nn.one_hot(jnp.asarray(rng.integers(0, CFG.num_classes, n)), CFG.num_classes)
    return x, c


def fast_jit(fn):
    """``jax.jit`` at XLA's lowest optimisation level: compiling costs more than running here."""
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def native(cls, *args, **kwargs):
    """``cls(*args, **kwargs)`` with Equinox's own initialisers, compiled once as a whole."""
    shell = eqx.filter_eval_shape(cls, *args, **kwargs)
    leaves = fast_jit(lambda: jax.tree_util.tree_leaves(cls(*args, **kwargs)))()
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shell), leaves)


def random_model(seed, scale=0.3):
    """A small VAE with numpy values (no initialiser to compile): for tests of the forward pass."""
    rng = np.random.default_rng(seed)
    shell = eqx.filter_eval_shape(equinox_models.VAE, **EQX_KW, key=key(0))
    return jax.tree_util.tree_map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shell)


call = fast_jit(lambda m, x, c, k: m(x, c, k))
vmapped_call = fast_jit(lambda m, x, c, keys: jax.vmap(m)(x, c, keys))
batched_apply = fast_jit(equinox_models.batched_apply)


@pytest.fixture(scope="module")
def model():
    return random_model(0)


def test_call_on_one_example_has_the_tutorials_shapes(model):
    x, c = inputs()
    recon, mean, logvar = call(model, x[0], c[0], key(1))
    assert recon.shape == (CFG.input_dim,) and mean.shape == logvar.shape == (CFG.latent_dim,)
    assert recon.dtype == mean.dtype == logvar.dtype == jnp.float32
    assert bool(np.all(np.asarray(recon) >= 0))  # relu after the decoder's last layer, as in the tutorial
    m, lv = fast_jit(lambda mod, v: mod.encode(v))(model, x[0])
    np.testing.assert_allclose(m, mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(lv, logvar, rtol=0, atol=1e-6)
    assert jax.eval_shape(model.decode, jnp.zeros(CFG.latent_dim), c[0]).shape == (CFG.input_dim,)


def test_vmap_of_call_with_split_keys(model):
    x, c = inputs(1)
    keys = jax.random.split(key(2), BATCH)
    recon, mean, logvar = vmapped_call(model, x, c, keys)
    assert recon.shape == (BATCH, CFG.input_dim)
    assert mean.shape == logvar.shape == (BATCH, CFG.latent_dim)
    for i in (0, BATCH - 1):
        one = call(model, x[i], c[i], keys[i])
        for batched, single in zip((recon, mean, logvar), one, strict=True):
            np.testing.assert_allclose(batched[i], single, rtol=0, atol=1e-6)
    # the keys differ, so do the draws: same input, same class, different recon
    same = vmapped_call(model, jnp.stack([x[0]] * BATCH), jnp.stack([c[0]] * BATCH), keys)[0]
    assert max_diff(same[0], same[1]) > 1e-4


def _linear_by_hand(layer, h):
    return h @ layer.weight.T + layer.bias[None, :]


def test_batched_apply_is_encode_reparam_decode_by_hand(model):
    x, c = inputs(2)
    k = key(3)
    recon, mean, logvar = batched_apply(model, x, c, k)
    mean_hand, logvar_hand, recon_hand = fast_jit(_by_hand)(model, x, c, k)
    np.testing.assert_allclose(mean, mean_hand, rtol=0, atol=1e-5)
    np.testing.assert_allclose(logvar, logvar_hand, rtol=0, atol=1e-5)
    np.testing.assert_allclose(recon, recon_hand, rtol=0, atol=1e-5)
    assert recon.shape == (BATCH, CFG.input_dim)
    assert max_diff(recon, 0) > 1e-3


def _by_hand(model, x, c, k):
    h = x
    for layer in model.encoder.layers:
        h = jax.nn.relu(_linear_by_hand(layer, h))
    stats = _linear_by_hand(model.pre_latent_proj, h)
    mean_hand, logvar_hand = stats[:, : CFG.latent_dim], stats[:, CFG.latent_dim :]
    eps = jax.random.normal(k, (BATCH, CFG.latent_dim))  # one draw for the batch, as Flax does
    z = mean_hand + jnp.exp(0.5 * logvar_hand) * eps
    h = _linear_by_hand(model.post_latent_proj, z) + _linear_by_hand(model.class_proj, c)
    for layer in model.decoder.layers:
        h = jax.nn.relu(_linear_by_hand(layer, h))
    return mean_hand, logvar_hand, h


def test_vae_from_the_functional_init_matches_vae_apply():
    params = fast_jit(lambda k: vae.init(k, CFG))(key(4))
    shell = eqx.filter_eval_shape(equinox_models.VAE, **EQX_KW, key=key(5))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree_util.tree_leaves(shell))
    model = convert.from_functional(params, like=shell)
    assert all(eqx.is_array(leaf) for leaf in jax.tree_util.tree_leaves(model))
    np.testing.assert_array_equal(model.encoder.layers[0].weight, np.asarray(params["encoder"]["Dense_0"]["kernel"]).T)
    np.testing.assert_array_equal(model.decoder.layers[1].bias, params["decoder"]["Dense_1"]["bias"])

    x, c = inputs(3)
    k = key(6)
    outs = batched_apply(model, x, c, k)
    expected = jax.jit(vae.apply)(params, x, c, k)
    for ours, theirs in zip(outs, expected, strict=True):
        assert ours.shape == theirs.shape
        assert max_diff(ours, theirs) <= 1e-5
    assert max_diff(expected[0], 0) > 1e-3  # not trivially zero


def _check_uniform(values, fan_in, *, edge, spread):
    """``values`` look like uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) draws."""
    lim = 1 / math.sqrt(fan_in)
    v = np.asarray(values, np.float64).ravel()
    assert np.all(np.abs(v) <= lim)
    assert v.max() > edge * lim and v.min() < -edge * lim  # fills the range
    assert abs(v.std() - lim / math.sqrt(3)) < spread * lim / math.sqrt(3)  # uniform's spread, not normal's
    assert abs(v.mean()) < 0.05 * lim + 3 * lim / math.sqrt(3 * v.size)


def test_native_init_is_linears_uniform_for_weight_and_bias():
    model = native(equinox_models.VAE, latent_dim=32, key=key(7))  # the tutorial's full size
    first = model.encoder.layers[0]
    assert first.weight.shape == (256, 784) and first.bias.shape == (256,)
    _check_uniform(first.weight, 784, edge=0.999, spread=0.01)
    _check_uniform(first.bias, 784, edge=0.9, spread=0.15)  # Equinox draws the bias too (Flax: zeros)
    assert model.pre_latent_proj.weight.shape == (64, 64)
    _check_uniform(model.encoder.layers[1].weight, 256, edge=0.999, spread=0.02)
    _check_uniform(model.class_proj.weight, 10, edge=0.95, spread=0.1)
    # each layer has its own key
    assert not np.array_equal(np.asarray(model.post_latent_proj.bias)[:32], np.asarray(model.class_proj.bias)[:32])


def test_module_is_a_pytree_that_jit_takes(model):
    leaves = jax.tree_util.tree_leaves(model)
    assert len(leaves) == 2 * 7  # weight and bias of the 7 Linear layers, nothing else
    assert all(eqx.is_array(leaf) for leaf in leaves)
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)
    assert model.latent_dim == CFG.latent_dim and model.encoder.activation_fn is jax.nn.relu  # static fields

    x, c = inputs(4)
    k = key(8)
    through = jax.jit(lambda m: m)(model)  # in and out of jit: the same module
    assert isinstance(through, equinox_models.VAE) and through.latent_dim == model.latent_dim
    for a, b in zip(jax.tree_util.tree_leaves(through), leaves, strict=True):
        np.testing.assert_array_equal(a, b)
    recon, mean, _ = batched_apply(model, x, c, k)  # jax.jit(batched_apply), the module an argument
    assert recon.shape == (BATCH, CFG.input_dim) and mean.shape == (BATCH, CFG.latent_dim)

    # tree_map and grad keep the module: static fields stay in the structure
    zeros = jax.tree_util.tree_map(jnp.zeros_like, model)
    assert isinstance(zeros, equinox_models.VAE) and zeros.latent_dim == model.latent_dim
    assert jax.tree_util.tree_structure(zeros) == jax.tree_util.tree_structure(model)
    grads = fast_jit(jax.grad(lambda m: jnp.sum(equinox_models.batched_apply(m, x, c, k)[0])))(model)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(model)
    assert max_diff(grads.encoder.layers[0].weight, 0) > 0


def test_feed_forward_layers_and_last_activation():
    ff = native(equinox_models.FeedForward, 6, (5, 4), drop_last_activation=True, key=key(9))
    assert [layer.weight.shape for layer in ff.layers] == [(5, 6), (4, 5)]
    x = jnp.asarray(np.random.default_rng(0).standard_normal(6), jnp.float32)
    h = jax.nn.relu(ff.layers[0].weight @ x + ff.layers[0].bias)
    expected = ff.layers[1].weight @ h + ff.layers[1].bias  # no activation after the last layer
    np.testing.assert_allclose(jax.jit(lambda m, v: m(v))(ff, x), expected, rtol=0, atol=1e-6)
    shell = eqx.filter_eval_shape(equinox_models.FeedForward, 6, (5, 4), key=key(9))  # drop_last False
    relu_last = eqx.tree_at(lambda m: m.layers, shell, ff.layers)
    np.testing.assert_allclose(jax.jit(lambda m, v: m(v))(relu_last, x), jax.nn.relu(expected), rtol=0, atol=1e-6)
