"""pureflax.vae against the tutorial's Flax VAE (pureflax.compat.flax_models, written as the tutorial has it)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pureflax import convvae, vae
from pureflax.compat.flax_models import VAE

batch_size, num_classes = 16, 10


@pytest.fixture(scope="module")
def tutorial():
    """The tutorial's model and params: VAE(latent_dim=32).init(model_key, ...)['params']."""
    key = jax.random.PRNGKey(0xFFFF)
    key, model_key = jax.random.split(key)
    model = VAE(latent_dim=32)
    params = jax.jit(model.init)(  # one compiled program, as vae.init is (on a GPU eager init differs in the last bits)
        model_key, jnp.zeros((batch_size, 784)), jnp.zeros((batch_size, num_classes)), jax.random.PRNGKey(0)
    )["params"]
    return model, params, model_key


def inputs(seed=1, n=batch_size):
    kx, kc = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.uniform(kx, (n, 784))
    c = jax.nn.one_hot(jax.random.randint(kc, (n,), 0, num_classes), num_classes)
    return x, c


def test_params_have_the_tutorial_paths_and_shapes(tutorial):
    _, flax_params, model_key = tutorial
    params = vae.init(model_key, vae.VAEConfig(latent_dim=32))
    shapes = jax.tree_util.tree_map_with_path(lambda p, a: (jax.tree_util.keystr(p), a.shape), params)
    flax_shapes = jax.tree_util.tree_map_with_path(lambda p, a: (jax.tree_util.keystr(p), a.shape), flax_params)
    assert shapes == flax_shapes
    assert params["pre_latent_proj"]["kernel"].shape == (64, 64)
    assert params["decoder"]["Dense_2"]["kernel"].shape == (256, 784)


def test_init_is_the_tutorials_init_bitwise(tutorial):
    _, flax_params, model_key = tutorial
    params = vae.init(model_key, vae.VAEConfig(latent_dim=32))
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(flax_params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("init, config", [(vae.init, vae.VAEConfig(latent_dim=3)), (convvae.init, convvae.ConvVAEConfig(features=(4, 8), latent_dim=3))])
def test_init_is_one_compiled_program_however_it_is_called(init, config):
    """Called eagerly, the init is one jitted call, as it is inside any jit: the same bits either
    way on every platform (on a GPU eager and jitted initialisers differ in the last bits)."""
    eqns = jax.make_jaxpr(lambda key: init(key, config))(jax.random.PRNGKey(0)).eqns
    assert len(eqns) == 1 and eqns[0].primitive.name in ("pjit", "jit"), [e.primitive.name for e in eqns]


def test_apply_matches_the_tutorials_apply(tutorial):
    model, params, _ = tutorial
    x, c = inputs()
    key = jax.random.PRNGKey(7)
    expected = model.apply({"params": params}, x, c, key)
    got = vae.apply(params, x, c, key)
    for name, a, b in zip(("recon", "mean", "logvar"), got, expected):
        assert a.shape == b.shape, name
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5, name


def test_encode_decode_reparam_match_the_tutorial_methods(tutorial):
    model, params, _ = tutorial
    variables = {"params": params}
    x, c = inputs(2)
    mean, logvar = vae.encode(params, x)
    f_mean, f_logvar = model.apply(variables, x, method=model.encode)
    np.testing.assert_allclose(mean, f_mean, atol=1e-5)
    np.testing.assert_allclose(logvar, f_logvar, atol=1e-5)
    key = jax.random.PRNGKey(3)
    z = vae.reparam(mean, logvar, key)
    np.testing.assert_allclose(z, model.apply(variables, f_mean, f_logvar, key, method=model.reparam), atol=1e-5)
    np.testing.assert_allclose(vae.decode(params, z, c), model.apply(variables, z, c, method=model.decode), atol=1e-5)


def test_gradients_match_flax(tutorial):
    model, params, _ = tutorial
    x, c = inputs(4)
    key = jax.random.PRNGKey(5)

    def loss(apply):
        return lambda p: jnp.sum(apply(p)[0] ** 2) + jnp.sum(apply(p)[1])

    g = jax.grad(loss(lambda p: vae.apply(p, x, c, key)))(params)
    fg = jax.grad(loss(lambda p: model.apply({"params": p}, x, c, key)))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(fg)):
        scale = float(jnp.max(jnp.abs(b))) + 1e-12
        assert float(jnp.max(jnp.abs(a - b))) / scale <= 1e-5


def test_small_config_and_config_of(getkey):
    config = vae.VAEConfig(encoder_dimensions=(12, 8), decoder_dimensions=(8, 20), latent_dim=3, num_classes=4, input_dim=20)
    params = vae.init(getkey(), config)
    assert vae.config_of(params) == config
    x = jnp.zeros((5, 20))
    c = jax.nn.one_hot(jnp.arange(5) % 4, 4)
    recon, mean, logvar = vae.apply(params, x, c, getkey())
    assert recon.shape == (5, 20) and mean.shape == logvar.shape == (5, 3)


def test_sample_gives_one_image_per_label(tutorial):
    _, params, _ = tutorial
    images = vae.sample(params, jnp.repeat(jnp.arange(10), 10), jax.random.PRNGKey(0))
    assert images.shape == (100, 784)
    assert bool(jnp.all(images >= 0))  # the decoder ends in relu, as the tutorial's does


def test_wrong_input_width_is_named(tutorial):
    _, params, _ = tutorial
    with pytest.raises(ValueError, match=r"\(16, 700\).*784"):
        vae.encode(params, jnp.zeros((16, 700)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"latent_dim": 0}, "latent_dim"),
        ({"decoder_dimensions": (128, 256, 700)}, "decoder_dimensions must end in input_dim=784"),
        ({"encoder_dimensions": ()}, "encoder_dimensions"),
        ({"activation": "nope"}, "unknown activation"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vae.VAEConfig(**kwargs)
