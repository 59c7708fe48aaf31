"""pureflax.nn against flax.linen: same params in, same numbers out; same key, same params."""

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pureflax import nn
from pureflax.compat.flax_models import FeedForward as FlaxFeedForward  # the tutorial's module
from trees import assert_trees_equal


def test_dense_init_is_flax_init_bitwise(getkey):
    key = getkey()
    x = jnp.zeros((1, 8))
    assert_trees_equal(nn.dense(4).init(key, x), fnn.Dense(4).init(key, x)["params"])


def test_dense_apply_matches_flax_with_the_same_params(getkey):
    params = fnn.Dense(5).init(getkey(), jnp.zeros((1, 7)))["params"]
    x = jax.random.normal(getkey(), (3, 7))
    expected = fnn.Dense(5).apply({"params": params}, x)
    np.testing.assert_allclose(nn.dense(5).apply(params, x), expected, atol=1e-6)


def test_dense_without_bias(getkey):
    key = getkey()
    p = nn.dense(3, use_bias=False).init(key, jnp.zeros(4))
    assert_trees_equal(p, fnn.Dense(3, use_bias=False).init(key, jnp.zeros(4))["params"])


@pytest.mark.parametrize("drop_last", [False, True])
def test_feed_forward_matches_the_tutorial_module(getkey, drop_last):
    key = getkey()
    x = jax.random.normal(getkey(), (2, 8))
    flax_model = FlaxFeedForward(dimensions=(4, 2, 1), drop_last_activation=drop_last)
    flax_params = flax_model.init(key, jnp.zeros((1, 8)))["params"]
    layer = nn.feed_forward((4, 2, 1), drop_last_activation=drop_last)
    params = layer.init(key, jnp.zeros((1, 8)))
    assert_trees_equal(params, flax_params)
    np.testing.assert_allclose(layer.apply(params, x), flax_model.apply({"params": flax_params}, x), atol=1e-6)


def test_feed_forward_param_names_and_shapes(getkey):
    params = nn.feed_forward((6, 5, 4)).init(getkey(), jnp.zeros((3, 9)))
    shapes = jax.tree_util.tree_map(jnp.shape, params)
    assert shapes == {
        "Dense_0": {"kernel": (9, 6), "bias": (6,)},
        "Dense_1": {"kernel": (6, 5), "bias": (5,)},
        "Dense_2": {"kernel": (5, 4), "bias": (4,)},
    }


@pytest.mark.parametrize(
    "layer, in_shape, out_shape",
    [
        (nn.dense(3), (2, 5), (2, 3)),
        (nn.dense(3), (5,), (3,)),
        (nn.feed_forward((7, 3)), (4, 6), (4, 3)),
        (nn.dropout(0.5, deterministic=True), (4, 6), (4, 6)),
        (nn.sequential([nn.dense(4), jax.nn.relu, nn.dense(2)]), (3, 8), (3, 2)),
    ],
)
def test_init_and_apply_agree_on_shapes(getkey, layer, in_shape, out_shape):
    params = layer.init(getkey(), jnp.zeros(in_shape))
    assert layer.apply(params, jnp.ones(in_shape)).shape == out_shape
    abstract = layer.init(getkey(), jax.ShapeDtypeStruct(in_shape, jnp.float32))
    assert jax.tree_util.tree_map(jnp.shape, abstract) == jax.tree_util.tree_map(jnp.shape, params)


def test_kernel_init_has_lecun_normal_statistics(getkey):
    """Mean 0 and variance 1/fan_in, within sampling error, as Flax's default."""
    fan_in, fan_out = 256, 512
    kernel = np.asarray(nn.dense(fan_out).init(getkey(), jnp.zeros(fan_in))["kernel"], np.float64)
    flax_kernel = np.asarray(fnn.Dense(fan_out).init(getkey(), jnp.zeros(fan_in))["params"]["kernel"], np.float64)
    n = kernel.size
    target_std = 1 / np.sqrt(fan_in)
    for k in (kernel, flax_kernel):
        assert abs(k.mean()) < 5 * target_std / np.sqrt(n)
        assert abs(k.std() / target_std - 1) < 0.01  # std of the std estimate is ~1/sqrt(2n) = 0.001
        assert np.abs(k).max() <= 2 * target_std / 0.87962566103423978 + 1e-6  # truncated at 2 sigma
    assert abs(kernel.std() - flax_kernel.std()) < 0.01 * target_std


def test_dense_rejects_a_wrong_input_size(getkey):
    params = nn.dense(3).init(getkey(), jnp.zeros(4))
    with pytest.raises(ValueError, match=r"input has shape \(2, 5\).*last dimension of 4"):
        nn.dense(3).apply(params, jnp.ones((2, 5)))


def test_dropout_deterministic_is_identity_as_in_flax(getkey):
    x = jax.random.normal(getkey(), (3, 3))
    np.testing.assert_array_equal(nn.dropout(0.5).apply({}, x, deterministic=True), x)
    np.testing.assert_array_equal(fnn.Dropout(0.5, deterministic=True).apply({}, x), x)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_dropout_with_a_key_is_flax_dropout_bitwise(getkey, rate):
    x = jax.random.normal(getkey(), (64, 32))
    key = getkey()
    expected = fnn.Dropout(rate, deterministic=False).apply({}, x, rngs={"dropout": key})
    np.testing.assert_array_equal(nn.dropout(rate).apply({}, x, key=key), expected)


def test_dropout_statistics_and_scaling(getkey):
    rate = 0.3
    x = jnp.ones((200, 200))
    y = np.asarray(nn.dropout(rate).apply({}, x, key=getkey()))
    kept = y != 0
    assert abs(kept.mean() - (1 - rate)) < 0.01
    np.testing.assert_allclose(y[kept], 1 / (1 - rate), rtol=1e-6)


def test_dropout_edges_and_errors(getkey):
    x = jnp.ones((2, 2))
    np.testing.assert_array_equal(nn.dropout(1.0).apply({}, x, key=getkey()), jnp.zeros((2, 2)))
    np.testing.assert_array_equal(nn.dropout(0.0).apply({}, x), x)
    with pytest.raises(ValueError, match="key is needed"):
        nn.dropout(0.5).apply({}, x)
    with pytest.raises(ValueError, match=r"rate is a probability in \[0, 1\]"):
        nn.dropout(1.5)


def test_sequential_matches_flax_sequential(getkey):
    key, drop_key = getkey(), getkey()
    x = jax.random.normal(getkey(), (4, 8))
    flax_model = fnn.Sequential([fnn.Dense(6), fnn.relu, fnn.Dropout(0.5, deterministic=False), fnn.Dense(3)])
    variables = flax_model.init({"params": key, "dropout": drop_key}, x)
    model = nn.sequential([nn.dense(6), jax.nn.relu, nn.dropout(0.5), nn.dense(3)])
    params = model.init(key, x)
    assert_trees_equal(params, variables["params"])
    expected = flax_model.apply(variables, x, rngs={"dropout": drop_key})
    np.testing.assert_allclose(model.apply(params, x, key=drop_key), expected, atol=1e-6)


def test_nested_sequential_uses_flax_paths(getkey):
    key = getkey()
    x = jnp.zeros((1, 5))
    flax_model = fnn.Sequential([fnn.Sequential([fnn.Dense(4), fnn.Dense(3)]), fnn.relu, fnn.Dense(2)])
    model = nn.sequential([nn.sequential([nn.dense(4), nn.dense(3)]), jax.nn.relu, nn.dense(2)])
    assert_trees_equal(model.init(key, x), flax_model.init(key, x)["params"])


def test_sequential_rejects_non_layers():
    # under the test-time typechecker the annotation catches it; without it, sequential's own check
    with pytest.raises(TypeError, match=r"layers"):
        nn.sequential([nn.dense(2), 3])


def test_bind_and_unbind(getkey):
    layer = nn.dense(2)
    params = layer.init(getkey(), jnp.zeros(8))
    bound = nn.bind(layer.apply, params)
    x = jnp.ones(8)
    np.testing.assert_array_equal(bound(x), layer.apply(params, x))
    apply, unbound_params = nn.unbind(bound)
    assert apply is layer.apply and unbound_params is params
    flax_bound = fnn.Dense(2).bind({"params": params})
    np.testing.assert_allclose(bound(x), flax_bound(x), atol=1e-6)


def test_fold_in_path_is_flax_lazy_rng(getkey):
    from flax.core.scope import LazyRng

    key = getkey()
    for path in [(), (1,), ("encoder", "Dense_0", 1), ("layers_3", 2), (300,)]:
        np.testing.assert_array_equal(
            jax.random.key_data(nn.fold_in_path(key, path)),
            jax.random.key_data(LazyRng.create(key, *path).as_jax_rng()),
        )


def test_unknown_activation_names_the_choices():
    with pytest.raises(ValueError, match="unknown activation 'rellu'.*relu"):
        nn.feed_forward((2,), activation_fn="rellu")
