"""Convolutions, normalisation, embeddings and pooling: Flax's params from the same key, Flax's outputs.

Each functional layer against its flax.linen namesake: ``init`` from one key gives Linen's params
bit for bit (names, shapes, values), and ``apply`` on the same params and inputs gives Linen's
output, bit for bit: the same operations in the same order (the normalisations' E[x²] − E[x]²
included).
"""

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pureflax import nn

KEY = jax.random.PRNGKey(42)


def assert_params_equal(ours, theirs):
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(dict(theirs))
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(dict(theirs)), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype and (np.asarray(a) == np.asarray(b)).all()


def check(layer, module, x, atol=0.0):
    """Same params from KEY, same output from them (bit for bit unless ``atol`` says otherwise)."""
    theirs = module.init(KEY, x)["params"]
    ours = layer.init(KEY, x)
    assert_params_equal(ours, theirs)
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(1), p.shape), ours)  # not the init's ones/zeros
    got = jax.jit(layer.apply)(params, x)
    want = jax.jit(lambda p, x: module.apply({"params": p}, x))(params, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=atol)


X1 = jax.random.normal(jax.random.PRNGKey(0), (2, 11, 3))
X2 = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 8, 4))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(features=5, kernel_size=(3, 3)),
        dict(features=5, kernel_size=(3, 3), strides=(2, 2)),  # 'SAME' with a stride: not symmetric
        dict(features=6, kernel_size=(2, 3), strides=(1, 2), padding="VALID"),
        dict(features=5, kernel_size=(3, 3), padding=((1, 2), (0, 1))),
        dict(features=5, kernel_size=(3, 3), kernel_dilation=(2, 1)),
        dict(features=5, kernel_size=(3, 3), input_dilation=(2, 2), padding=((1, 1), (1, 1))),  # lax takes no string padding here
        dict(features=6, kernel_size=(3, 3), feature_group_count=2),
        dict(features=5, kernel_size=(3, 3), use_bias=False),
    ],
    ids=["same", "same-stride2", "valid", "explicit", "kernel-dilation", "input-dilation", "groups", "no-bias"],
)
def test_conv2d_is_linen_conv(kwargs):
    features, kernel_size = kwargs.pop("features"), kwargs.pop("kernel_size")
    check(nn.conv(features, kernel_size, **kwargs), linen.Conv(features, kernel_size, **kwargs), X2)


def test_conv1d_is_linen_conv():
    check(nn.conv(4, (3,), strides=2), linen.Conv(4, (3,), strides=2), X1)


@pytest.mark.parametrize(
    "kwargs",
    [dict(strides=(2, 2)), dict(strides=(2, 2), padding="VALID"), dict(strides=(1, 2), kernel_dilation=(2, 1)),
     dict(strides=(2, 2), transpose_kernel=True)],
    ids=["same-stride2", "valid", "dilation", "transpose-kernel"],
)
def test_conv_transpose_is_linen_conv_transpose(kwargs):
    check(nn.conv_transpose(3, (3, 3), **kwargs), linen.ConvTranspose(3, (3, 3), **kwargs), X2)


def test_layer_norm_is_linen_layer_norm():
    check(nn.layer_norm(), linen.LayerNorm(), X2, atol=0.0)
    check(nn.layer_norm(epsilon=1e-5, use_bias=False), linen.LayerNorm(epsilon=1e-5, use_bias=False), X1, atol=0.0)


def test_group_norm_is_linen_group_norm():
    check(nn.group_norm(2), linen.GroupNorm(num_groups=2), X2, atol=0.0)


def test_batch_norm_is_linen_batch_norm_in_training_and_evaluation():
    layer, module = nn.batch_norm(), linen.BatchNorm(use_running_average=False)
    variables = module.init(KEY, X2)
    params, state = layer.init(KEY, X2), layer.init_state(X2)
    assert_params_equal(params, variables["params"])
    assert_params_equal(state, variables["batch_stats"])
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params)
    stats = {"params": params, "batch_stats": variables["batch_stats"]}
    for i in range(3):  # three training steps: outputs and running statistics
        x = X2 * (i + 1) + i
        want, updated = module.apply(stats, x, mutable=["batch_stats"])
        got, state = layer.apply(params, state, x, train=True)
        np.testing.assert_allclose(got, want, rtol=0, atol=0.0)
        stats = {"params": params, "batch_stats": updated["batch_stats"]}
        for name in ("mean", "var"):
            np.testing.assert_allclose(state[name], updated["batch_stats"][name], rtol=0, atol=0.0)
    evaluated = linen.BatchNorm(use_running_average=True).apply(stats, X2)
    got, unchanged = layer.apply(params, state, X2, train=False)
    np.testing.assert_allclose(got, evaluated, rtol=0, atol=0.0)
    assert unchanged is state


def test_embed_is_linen_embed():
    ids = jnp.array([[1, 0, 7], [3, 3, 9]])
    check(nn.embed(10, 4), linen.Embed(10, 4), ids)
    with pytest.raises(ValueError, match="indices must be integers"):
        nn.embed(10, 4).apply({"embedding": jnp.zeros((10, 4))}, jnp.zeros(3))


@pytest.mark.parametrize("pool", ["avg_pool", "max_pool"])
@pytest.mark.parametrize("kwargs", [dict(), dict(strides=(2, 2)), dict(strides=(2, 2), padding="SAME"), dict(padding=((1, 0), (0, 1)))],
                         ids=["valid", "stride2", "same", "explicit"])
def test_pooling_is_linens(pool, kwargs):
    got = getattr(nn, pool)(X2, (2, 2), **kwargs)
    want = getattr(linen, pool)(X2, (2, 2), **kwargs)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "call, named",
    [
        (lambda: nn.conv(4, (3, 3)).apply({"kernel": jnp.zeros((3, 3, 2, 4)), "bias": jnp.zeros(4)}, jnp.zeros((1, 5, 5, 3))),
         "conv2d: input has 3 features but the kernel expects 2"),
        (lambda: nn.conv(4, (3, 3)).apply({"kernel": jnp.zeros((3, 3, 3, 4)), "bias": jnp.zeros(4)}, jnp.zeros((5, 5, 3))),
         r"conv2d: input has shape \(5, 5, 3\); expected \(batch, 2 spatial dims, features\)"),
        (lambda: nn.conv(4, (3, 3), padding="FULL"), "padding must be 'SAME', 'VALID'"),
        (lambda: nn.conv(5, (3, 3), feature_group_count=2), "multiple of feature_group_count"),
        (lambda: nn.group_norm(3).init(KEY, jnp.zeros((1, 4, 4, 8))), "3 groups do not divide 8 features"),
        (lambda: nn.batch_norm(momentum=1.5), r"momentum must be in \[0, 1\]"),
    ],
    ids=["features", "rank", "padding", "groups", "group-norm", "momentum"],
)
def test_bad_input_names_the_culprit(call, named):
    with pytest.raises(ValueError, match=named):
        call()


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.int32, jnp.bfloat16])
def test_convolutions_promote_their_input_as_linen_does(dtype):
    x = (jnp.arange(2 * 6 * 6 * 2).reshape(2, 6, 6, 2) % 7).astype(dtype)  # uint8 pixels, say
    for layer, module in ((nn.conv(3, (3, 3)), linen.Conv(3, (3, 3))), (nn.conv_transpose(3, (3, 3)), linen.ConvTranspose(3, (3, 3)))):
        params = layer.init(KEY, x)
        got, want = layer.apply(params, x), module.apply({"params": params}, x)
        assert got.dtype == want.dtype == jnp.float32
        np.testing.assert_array_equal(got, want)


def test_a_bf16_normalisation_without_params_stays_bf16_as_linens():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8)).astype(jnp.bfloat16)
    layer, module = nn.layer_norm(use_scale=False, use_bias=False), linen.LayerNorm(use_scale=False, use_bias=False)
    got, want = layer.apply({}, x), module.apply({}, x)
    assert got.dtype == want.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
