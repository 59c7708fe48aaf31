"""pureflax.compat.convert beyond Dense: every layer kind of LAYOUTS, model state, names=, flatten=, settings.

Carried values are checked bit for bit; outputs against ``pureflax.nn``'s layers (which equal
flax.linen's) within 1e-5. Params are NumPy draws filled into shapes-only modules
(``eqx.filter_eval_shape``, ``nnx.eval_shape``): no initialiser is compiled.
"""

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import equinox as eqx
import flax.core
import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training.train_state import TrainState as FlaxTrainState

from pureflax import TrainState, nn
from pureflax.compat import convert, eqx_layers, flax_models, migrate
from pureflax.compat.convert import ConversionError
from trees import assert_trees_equal, max_diff

KEY = jax.random.PRNGKey(0)
ATOL = 1e-5


def random_like(tree, seed, scale=0.5):
    """``tree`` with every float array (or ShapeDtypeStruct) replaced by normal draws of its shape."""
    rng = np.random.default_rng(seed)

    def draw(x):
        if isinstance(x, jax.ShapeDtypeStruct) or eqx.is_array(x):
            return jnp.asarray(scale * rng.standard_normal(np.shape(x)), x.dtype)
        return x

    return jax.tree_util.tree_map(draw, tree)


def uniform(shape, seed, low=-1.0, high=1.0):
    return jnp.asarray(np.random.default_rng(seed).uniform(low, high, shape), jnp.float32)


def eqx_shapes(cls, *args, **kwargs):
    return eqx.filter_eval_shape(cls, *args, **kwargs)


def nnx_shapes(cls, *args, **kwargs):
    return nnx.eval_shape(lambda: cls(*args, **kwargs, rngs=nnx.Rngs(0)))


def linen_shapes(module, x, **kwargs):
    return jax.eval_shape(lambda: module.init(KEY, x, **kwargs))


def channels_first(x):
    return jnp.moveaxis(x, -1, 1)


def channels_last(x):
    return jnp.moveaxis(x, 1, -1)


def assert_close(a, b):
    assert np.shape(a) == np.shape(b)
    assert max_diff(a, b) <= ATOL


# --------------------------------------------------------------- 1. each layer kind


class Case(NamedTuple):
    """One layer kind: the functional layer, an input, and the layer in each form (shapes only)."""

    layer: nn.Layer
    x: jax.Array
    eqx_like: eqx.Module
    nnx_like: nnx.Module
    linen: fnn.Module
    per_example: Callable = lambda m, x: m(x)  # the Equinox layer on one example of x


def conv_eqx(m, x):
    """An Equinox conv layer on a channels-last example: channels first in, channels last out."""
    return jnp.moveaxis(m(jnp.moveaxis(x, -1, 0)), 0, -1)


X_SEQ, X_IMG, X_VOL = uniform((2, 9, 3), 1), uniform((2, 8, 8, 2), 2), uniform((2, 4, 4, 4, 1), 3)
CASES = {
    "Dense": lambda: Case(nn.dense(4), uniform((2, 5), 4), eqx_shapes(eqx.nn.Linear, 5, 4, key=KEY),
                          nnx_shapes(nnx.Linear, 5, 4), fnn.Dense(4)),
    "Conv1d": lambda: Case(nn.conv(4, (3,)), X_SEQ, eqx_shapes(eqx.nn.Conv1d, 3, 4, 3, padding="SAME", key=KEY),
                           nnx_shapes(nnx.Conv, 3, 4, (3,)), fnn.Conv(4, (3,)), conv_eqx),
    # 'SAME' with stride 2 on an even size pads (0, 1): Equinox's explicit ((0, 1), (0, 1)) is the same
    "Conv2d-stride2-groups": lambda: Case(
        nn.conv(4, (3, 3), strides=2, feature_group_count=2), X_IMG,
        eqx_shapes(eqx.nn.Conv2d, 2, 4, 3, stride=2, padding=((0, 1), (0, 1)), groups=2, key=KEY),
        nnx_shapes(nnx.Conv, 2, 4, (3, 3), strides=2, feature_group_count=2),
        fnn.Conv(4, (3, 3), strides=2, feature_group_count=2), conv_eqx),
    "Conv3d": lambda: Case(nn.conv(2, (2, 2, 2), padding="VALID"), X_VOL, eqx_shapes(eqx.nn.Conv3d, 1, 2, 2, key=KEY),
                           nnx_shapes(nnx.Conv, 1, 2, (2, 2, 2), padding="VALID"), fnn.Conv(2, (2, 2, 2), padding="VALID"), conv_eqx),
    # Flax's ConvTranspose 'SAME', k=3, s=2: 7 -> 14, lax padding (2, 1); Equinox's padding ((0, 1), (0, 1)) gives it
    "ConvTranspose2d": lambda: Case(
        nn.conv_transpose(5, (3, 3), strides=2), uniform((2, 7, 7, 3), 5),
        eqx_shapes(eqx.nn.ConvTranspose2d, 3, 5, 3, stride=2, padding=((0, 1), (0, 1)), key=KEY),
        nnx_shapes(nnx.ConvTranspose, 3, 5, (3, 3), strides=2), fnn.ConvTranspose(5, (3, 3), strides=(2, 2)), conv_eqx),
    "LayerNorm": lambda: Case(nn.layer_norm(), uniform((2, 6), 6), eqx_shapes(eqx.nn.LayerNorm, 6, eps=1e-6),
                              nnx_shapes(nnx.LayerNorm, 6), fnn.LayerNorm()),
    "GroupNorm": lambda: Case(nn.group_norm(2), uniform((2, 4, 4, 6), 7), eqx_shapes(eqx.nn.GroupNorm, 2, 6, eps=1e-6),
                              nnx_shapes(nnx.GroupNorm, 6, num_groups=2), fnn.GroupNorm(num_groups=2), conv_eqx),
    "Embed": lambda: Case(nn.embed(10, 4), jnp.array([[1, 2, 3], [9, 0, 2]]), eqx_shapes(eqx.nn.Embedding, 10, 4, key=KEY),
                          nnx_shapes(nnx.Embed, 10, 4), fnn.Embed(10, 4), lambda m, x: jax.vmap(m)(x)),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_each_layer_kind_round_trips_bit_for_bit_and_computes_the_functional_output(kind):
    case = CASES[kind]()
    params = random_like(jax.eval_shape(case.layer.init, KEY, case.x), seed=len(kind))
    model = convert.from_functional(params, like=case.eqx_like)
    module = convert.from_functional(params, like=case.nnx_like)
    variables = convert.from_functional(params, like=linen_shapes(case.linen, case.x))
    for converted in (model, module, variables):
        assert_trees_equal(convert.to_functional(converted), params)

    @jax.jit  # one program for the four forms: eager ops would compile one by one
    def outputs(params, model, module, variables, x):
        return (case.layer.apply(params, x), jax.vmap(lambda x: case.per_example(model, x))(x), module(x),
                case.linen.apply(variables, x))

    want, *got = outputs(params, model, module, variables, case.x)
    for out in got:
        assert_close(out, want)
    assert max_diff(want, 0.0) > 1e-3  # not a degenerate output: the comparison has teeth


def test_conv_kernel_is_permuted_and_its_bias_reshaped():
    params = random_like(jax.eval_shape(nn.conv(4, (3, 2)).init, KEY, X_IMG), seed=1)
    model = convert.from_functional(params, like=eqx_shapes(eqx.nn.Conv2d, 2, 4, (3, 2), key=KEY))
    assert model.weight.shape == (4, 2, 3, 2) and model.bias.shape == (4, 1, 1)
    np.testing.assert_array_equal(model.weight, np.transpose(params["kernel"], (3, 2, 0, 1)))
    np.testing.assert_array_equal(model.bias[:, 0, 0], params["bias"])


# ------------------------------------------------------------------ 2. BatchNorm, every form


BN = dict(momentum=0.9, epsilon=1e-5)
X_BN = uniform((4, 3, 3, 2), 8, -2.0, 3.0)


@pytest.fixture(scope="module")
def batch_norm():
    """Functional BatchNorm params and state (not the initial ones), and its train/eval outputs."""
    layer = nn.batch_norm(**BN)
    params = random_like(jax.eval_shape(layer.init, KEY, X_BN), seed=3)
    state = {"mean": uniform((2,), 4), "var": uniform((2,), 5, 0.5, 2.0)}
    train, evaluate = jax.jit(lambda p, s, x: (layer.apply(p, s, x, train=True), layer.apply(p, s, x, train=False)))(params, state, X_BN)
    return params, state, train, evaluate


def test_batch_norm_in_equinox_follows_flax_in_train_and_eval(batch_norm):
    params, state, (y_train, s_train), (y_eval, _) = batch_norm
    like = eqx.nn.make_with_state(eqx_layers.BatchNorm)(2, momentum=BN["momentum"], eps=BN["epsilon"])
    model, eqx_state = convert.variables_from_functional(params, state, like=like)
    assert_trees_equal(convert.variables_to_functional((model, eqx_state)), (params, state))

    @eqx.filter_jit
    def train_and_eval(model, state, x):
        return eqx_layers.vmap_stateful(model)(x, state), eqx_layers.vmap_stateful(lambda x, s: model(x, s, inference=True))(x, state)[0]

    (y, new), y_inference = train_and_eval(model, eqx_state, channels_first(X_BN))
    assert_close(channels_last(y), y_train)
    for a, b in zip(jax.tree_util.tree_leaves(convert.state_to_functional(new, model)), jax.tree_util.tree_leaves(s_train)):
        assert_close(a, b)
    assert_close(channels_last(y_inference), y_eval)


def test_batch_norm_in_nnx_follows_flax_in_train_and_eval(batch_norm):
    params, state, (y_train, s_train), (y_eval, _) = batch_norm
    like = nnx_shapes(nnx.BatchNorm, 2, **BN)
    module = convert.variables_from_functional(params, state, like=like)
    assert_trees_equal(convert.variables_to_functional(module), (params, state))
    assert_close(module(X_BN, use_running_average=True), y_eval)
    assert_close(module(X_BN, use_running_average=False), y_train)
    for a, b in zip(jax.tree_util.tree_leaves(convert.variables_to_functional(module)[1]), jax.tree_util.tree_leaves(s_train)):
        assert_close(a, b)


def test_batch_norm_in_linen_follows_flax_in_train_and_eval(batch_norm):
    params, state, (y_train, s_train), (y_eval, _) = batch_norm
    linen = fnn.BatchNorm(**BN)
    like = linen_shapes(linen, X_BN, use_running_average=True)
    variables = convert.variables_from_functional(params, state, like=like)
    assert set(variables) == {"params", "batch_stats"}
    assert_trees_equal(convert.variables_to_functional(variables), (params, state))
    y, updates = linen.apply(variables, X_BN, use_running_average=False, mutable=["batch_stats"])
    assert_close(y, y_train)
    for a, b in zip(jax.tree_util.tree_leaves(updates["batch_stats"]), jax.tree_util.tree_leaves(s_train)):
        assert_close(a, b)
    assert_close(linen.apply(variables, X_BN, use_running_average=True), y_eval)
    with pytest.raises(ConversionError, match="variables_to_functional"):
        convert.to_functional(variables)  # batch_stats are not dropped silently


@pytest.mark.parametrize("mode", ["ema", "batch"])
def test_equinox_own_batch_norm_carries_params_and_running_stats(batch_norm, mode):
    params, state, _, (y_eval, _) = batch_norm
    like = eqx.nn.make_with_state(eqx.nn.BatchNorm)(2, "batch", momentum=BN["momentum"], eps=BN["epsilon"], mode=mode)
    model, eqx_state = convert.variables_from_functional(params, state, like=like)
    assert_trees_equal(convert.variables_to_functional((model, eqx_state)), (params, state))
    # its inference reads the carried statistics as Flax's does (its training rule differs: measured below)
    y = eqx.filter_jit(lambda m, s, x: eqx_layers.vmap_stateful(lambda x, s: m(x, s, inference=True))(x, s)[0])(
        model, eqx_state, channels_first(X_BN))
    assert_close(channels_last(y), y_eval)
    if mode == "batch":  # never trained: its inference divides the initial (0, 1) by 1, Flax's initial statistics
        fresh = convert.state_to_functional(like[1], like[0])
        np.testing.assert_array_equal(fresh["mean"], np.zeros(2))
        np.testing.assert_array_equal(fresh["var"], np.ones(2))
        return
    # 'ema' mode never trained: its first step overwrites the buffers, so they are no statistics yet
    with pytest.raises(ConversionError, match="first-time"):
        convert.state_to_functional(like[1], like[0])
    # statistics filled by hand but the flag left set: refused too, never exported as (0, 1)
    hand = like[1].set(like[0].ema_state_index, (jnp.full(2, 3.0, jnp.float32), jnp.full(2, 2.0, jnp.float32)))
    with pytest.raises(ConversionError, match="ema_first_time_index"):
        convert.state_to_functional(hand, like[0])
    settled = hand.set(like[0].ema_first_time_index, jnp.array(False))
    np.testing.assert_array_equal(convert.state_to_functional(settled, like[0])["mean"], np.full(2, 3.0))


# ------------------------------------------------- 3. eqx.nn.BatchNorm against Flax's rule


DRIFT_STEPS, MU, SIGMA = 50, np.array([1.0, -2.0, 0.5]), np.array([1.0, 3.0, 0.5])


def drift_data():
    """50 training batches and a test batch, (batch, C, H, W), channel c ~ N(MU[c], SIGMA[c]²)."""
    rng = np.random.default_rng(0)
    draw = lambda *shape: jnp.asarray(MU.reshape(3, 1, 1) + SIGMA.reshape(3, 1, 1) * rng.standard_normal(shape), jnp.float32)  # noqa: E731
    return draw(DRIFT_STEPS, 8, 3, 4, 4), draw(8, 3, 4, 4)


def flax_rule(xs, test):
    layer, params = nn.batch_norm(), {"scale": jnp.ones(3), "bias": jnp.zeros(3)}

    def step(state, x):
        return layer.apply(params, state, channels_last(x), train=True)[1], None

    state = jax.lax.scan(step, layer.init_state(jnp.zeros((1, 3))), xs)[0]
    return state, channels_first(layer.apply(params, state, channels_last(test), train=False)[0])


def eqx_rule(bn, state, xs, test):
    def step(state, x):
        return eqx_layers.vmap_stateful(bn)(x, state)[1], None

    state = jax.lax.scan(step, state, xs)[0]
    return state, eqx_layers.vmap_stateful(lambda x, s: bn(x, s, inference=True))(test, state)[0]


@pytest.mark.parametrize("mode", ["ema", "batch"])
def test_equinox_batch_norm_drifts_from_flax_rule_by_order_one_after_50_steps(mode):
    """The figures of docs/layers.md: max |difference| after 50 steps (momentum 0.99, eps 1e-5)."""
    xs, test = drift_data()
    flax_state, flax_out = jax.jit(flax_rule)(xs, test)
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode=mode)
    state, out = eqx.filter_jit(eqx_rule)(bn, state, xs, test)
    stats = convert.state_to_functional(state, bn)
    mean, var, outputs = (max_diff(stats["mean"], flax_state["mean"]), max_diff(stats["var"], flax_state["var"]),
                          max_diff(out, flax_out))
    measured = {"ema": (0.99, 4.41, 1.42), "batch": (1.21, 6.34, 1.70)}[mode]  # docs/layers.md
    for got, figure in zip((mean, var, outputs), measured):
        assert abs(got - figure) <= 0.01 * figure + 0.01, (mode, mean, var, outputs)
    assert 0.1 < outputs < 10  # order one: not rounding, another rule


def test_equinox_batch_mode_filled_from_flax_then_follows_flax_rule(batch_norm):
    """Filled by from_functional, eqx.nn.BatchNorm(mode='batch') divides by exactly 1 from then on."""
    params, state, _, _ = batch_norm
    layer = nn.batch_norm(**BN)
    like = eqx.nn.make_with_state(eqx.nn.BatchNorm)(2, "batch", momentum=BN["momentum"], eps=BN["epsilon"], mode="batch")
    model, eqx_state = convert.variables_from_functional(params, state, like=like)
    xs = jnp.stack([uniform((4, 3, 3, 2), 20 + seed, -1.0, 2.0) for seed in range(3)])

    @eqx.filter_jit
    def three_steps(model, eqx_state, state):
        for x in xs:
            _, state = layer.apply(params, state, x, train=True)
            _, eqx_state = eqx_layers.vmap_stateful(model)(channels_first(x), eqx_state)
        return eqx_state, state

    eqx_state, state = three_steps(model, eqx_state, state)
    for a, b in zip(jax.tree_util.tree_leaves(convert.state_to_functional(eqx_state, model)), jax.tree_util.tree_leaves(state)):
        assert_close(a, b)


# ---------------------------------------------------------------- 4. Flax's MNIST CNN


class LinenCNN(fnn.Module):
    """Flax's examples/mnist CNN (compact: Conv_0, Conv_1, Dense_0, Dense_1)."""

    @fnn.compact
    def __call__(self, x):
        x = fnn.avg_pool(fnn.relu(fnn.Conv(32, (3, 3))(x)), (2, 2), strides=(2, 2))
        x = fnn.avg_pool(fnn.relu(fnn.Conv(64, (3, 3))(x)), (2, 2), strides=(2, 2))
        x = fnn.relu(fnn.Dense(256)(x.reshape((x.shape[0], -1))))
        return fnn.Dense(10)(x)


def pool(x):
    """2×2 average pooling of one (C, H, W) example."""
    c, h, w = x.shape
    return x.reshape(c, h // 2, 2, w // 2, 2).mean((2, 4))


class EqxCNN(eqx.Module):
    """The same CNN in Equinox, one (1, 28, 28) example, its layers named as Linen's."""

    Conv_0: eqx.nn.Conv2d
    Conv_1: eqx.nn.Conv2d
    Dense_0: eqx.nn.Linear
    Dense_1: eqx.nn.Linear
    chw: bool = eqx.field(static=True)  # flatten (C, H, W) as Equinox code does, else Flax's (H, W, C)

    def __init__(self, chw=False, *, key):
        k = jax.random.split(key, 4)
        self.Conv_0, self.Conv_1 = eqx.nn.Conv2d(1, 32, 3, padding=1, key=k[0]), eqx.nn.Conv2d(32, 64, 3, padding=1, key=k[1])
        self.Dense_0, self.Dense_1 = eqx.nn.Linear(3136, 256, key=k[2]), eqx.nn.Linear(256, 10, key=k[3])
        self.chw = chw

    def __call__(self, x):
        x = pool(jax.nn.relu(self.Conv_1(pool(jax.nn.relu(self.Conv_0(x))))))
        x = x.reshape(-1) if self.chw else jnp.transpose(x, (1, 2, 0)).reshape(-1)
        return self.Dense_1(jax.nn.relu(self.Dense_0(x)))


class EqxNet(eqx.Module):
    """A typical Equinox CNN: its own names, and a (C, H, W) flatten."""

    features: tuple[eqx.nn.Conv2d, eqx.nn.Conv2d]
    classifier: tuple[eqx.nn.Linear, eqx.nn.Linear]

    def __init__(self, *, key):
        k = jax.random.split(key, 4)
        self.features = (eqx.nn.Conv2d(1, 32, 3, padding=1, key=k[0]), eqx.nn.Conv2d(32, 64, 3, padding=1, key=k[1]))
        self.classifier = (eqx.nn.Linear(3136, 256, key=k[2]), eqx.nn.Linear(256, 10, key=k[3]))

    def __call__(self, x):
        for conv in self.features:
            x = pool(jax.nn.relu(conv(x)))
        return self.classifier[1](jax.nn.relu(self.classifier[0](x.reshape(-1))))


EQX_NAMES = {"features/0": "Conv_0", "features/1": "Conv_1", "classifier/0": "Dense_0", "classifier/1": "Dense_1"}
FLATTEN = {"Dense_0": (7, 7, 64)}


class NNXCNN(nnx.Module):
    """The CNN of the Flax NNX MNIST tutorial (conv1, conv2, linear1, linear2)."""

    def __init__(self, *, rngs):
        self.conv1, self.conv2 = nnx.Conv(1, 32, (3, 3), rngs=rngs), nnx.Conv(32, 64, (3, 3), rngs=rngs)
        self.linear1, self.linear2 = nnx.Linear(3136, 256, rngs=rngs), nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
        x = fnn.avg_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))
        x = fnn.avg_pool(nnx.relu(self.conv2(x)), (2, 2), strides=(2, 2))
        return self.linear2(nnx.relu(self.linear1(x.reshape(x.shape[0], -1))))


NNX_NAMES = {"conv1": "Conv_0", "conv2": "Conv_1", "linear1": "Dense_0", "linear2": "Dense_1"}
IMAGES = uniform((2, 28, 28, 1), 30, 0.0, 1.0)


@pytest.fixture(scope="module")
def cnn():
    """Linen variables of the CNN (random, not the init's), and their output on IMAGES."""
    variables = random_like(linen_shapes(LinenCNN(), IMAGES), seed=31, scale=0.1)
    return variables, jax.jit(LinenCNN().apply)(variables, IMAGES)


def eqx_outputs(model):
    return eqx.filter_jit(jax.vmap(lambda m, x: m(x), in_axes=(None, 0)))(model, channels_first(IMAGES))


def test_the_mnist_cnn_goes_linen_equinox_nnx_functional_linen(cnn):
    variables, want = cnn
    model = migrate(LinenCNN().bind(variables), eqx_shapes(EqxCNN, key=KEY), example=IMAGES)  # settings and rows proven
    assert_close(eqx_outputs(model), want)
    module = convert.transfer(model, nnx_shapes(NNXCNN), names=NNX_NAMES)  # settings checked: padding 1 is 'SAME' at stride 1
    assert_close(jax.jit(lambda m, x: m(x))(module, IMAGES), want)
    functional = convert.to_functional(module, names=NNX_NAMES)
    back = convert.from_functional(functional, like=linen_shapes(LinenCNN(), IMAGES))
    assert_trees_equal(back, variables)


def test_an_equinox_cnn_with_its_own_names_and_a_chw_flatten(cnn):
    variables, want = cnn
    params = variables["params"]
    model = convert.from_functional(params, like=eqx_shapes(EqxNet, key=KEY), names=EQX_NAMES, flatten=FLATTEN)
    assert_close(eqx_outputs(model), want)
    assert_trees_equal(convert.to_functional(model, names=EQX_NAMES, flatten=FLATTEN), params)
    # without flatten= the rows are read in the wrong order: shapes cannot tell, the outputs differ
    wrong = convert.from_functional(params, like=eqx_shapes(EqxNet, key=KEY), names=EQX_NAMES)
    assert max_diff(eqx_outputs(wrong), want) > 1e-3
    chw = convert.from_functional(params, like=eqx_shapes(EqxCNN, chw=True, key=KEY), flatten=FLATTEN)
    assert_close(eqx_outputs(chw), want)


def test_flatten_permutes_the_optimiser_moments_with_the_kernel(cnn):
    params = cnn[0]["params"]
    tx = optax.adam(1e-3)
    state = jax.jit(lambda p: TrainState.create(p, tx).apply_gradients(grads=p, tx=tx))(params)  # mu = 0.1 · params
    model = convert.from_functional(params, like=eqx_shapes(EqxNet, key=KEY), names=EQX_NAMES, flatten=FLATTEN)
    like = TrainState.create(model, tx)
    converted = convert.from_functional(convert.to_functional(state), like=like, names=EQX_NAMES, flatten=FLATTEN)
    mu = converted.opt_state[0].mu.classifier[0].weight
    np.testing.assert_array_equal(mu, (1 - 0.9) * model.classifier[0].weight)  # the gradient was the params before the step
    assert_trees_equal(convert.to_functional(converted, names=EQX_NAMES, flatten=FLATTEN), convert.to_functional(state))


# ------------------------------------------------------- 5. model state in train states


class LinenBNNet(fnn.Module):
    @fnn.compact
    def __call__(self, x, train):
        x = fnn.BatchNorm(use_running_average=not train, momentum=0.9)(fnn.Conv(4, (3, 3))(x))
        return fnn.Dense(3)(jax.nn.relu(x).reshape((x.shape[0], -1)))


class EqxBNNet(eqx.Module):
    Conv_0: eqx.nn.Conv2d
    BatchNorm_0: eqx_layers.BatchNorm
    Dense_0: eqx.nn.Linear

    def __init__(self, *, key):
        k1, k2 = jax.random.split(key)
        self.Conv_0 = eqx.nn.Conv2d(2, 4, 3, padding="SAME", key=k1)
        self.BatchNorm_0 = eqx_layers.BatchNorm(4, momentum=0.9)
        self.Dense_0 = eqx.nn.Linear(100, 3, key=k2)


class NNXBNNet(nnx.Module):
    def __init__(self, *, rngs):
        self.Conv_0 = nnx.Conv(2, 4, (3, 3), rngs=rngs)
        self.BatchNorm_0 = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
        self.Dense_0 = nnx.Linear(100, 3, rngs=rngs)


X_NET = uniform((2, 5, 5, 2), 40)
TX = optax.adam(1e-2)


@pytest.fixture(scope="module")
def bn_state():
    """A functional TrainState of the BN net one Adam step in, its BatchNorm statistics not the initial ones."""
    shapes = linen_shapes(LinenBNNet(), X_NET, train=False)
    params = random_like(shapes["params"], seed=41)
    model_state = random_like(shapes["batch_stats"], seed=42)
    step = jax.jit(lambda p, s, g: TrainState.create(p, TX, s).apply_gradients(grads=g, tx=TX))
    return step(params, model_state, random_like(params, seed=43))


def test_model_state_travels_through_every_train_state_form(bn_state):
    params, model_state = bn_state.params, bn_state.model_state
    eqx_like = eqx.filter_eval_shape(eqx.nn.make_with_state(EqxBNNet), key=KEY)
    model, eqx_state = convert.variables_from_functional(params, model_state, like=eqx_like)
    eqx_train_state = TrainState.create(model, TX, eqx_state)
    module = convert.variables_from_functional(params, model_state, like=nnx_shapes(NNXBNNet))
    likes = {
        "equinox": eqx_train_state,
        "nnx pair": (module, nnx.Optimizer(module, TX, wrt=nnx.Param)),
        "nnx states": TrainState.create(nnx.as_pure(nnx.state(module, nnx.Param)), TX, nnx.as_pure(nnx.state(module, nnx.BatchStat))),
        "flax": flax_models.TrainState.create(apply_fn=LinenBNNet().apply, params=flax.core.freeze(params), tx=TX,
                                              batch_stats=model_state),
    }
    for form, like in likes.items():
        converted = convert.from_functional(bn_state, like=like)
        back = convert.to_functional(converted)
        assert int(back.step) == 1, form
        assert_trees_equal(back, bn_state)
    eqx_state = convert.from_functional(bn_state, like=eqx_train_state).model_state
    assert isinstance(eqx_state, eqx.nn.State)
    np.testing.assert_array_equal(eqx_state.get(model.BatchNorm_0.state_index)[1], model_state["BatchNorm_0"]["var"])


def test_a_plain_flax_train_state_has_no_place_for_batch_stats(bn_state):
    like = FlaxTrainState.create(apply_fn=LinenBNNet().apply, params=bn_state.params, tx=TX)
    with pytest.raises(ConversionError, match="flax_models.TrainState"):
        convert.from_functional(bn_state, like=like)


# -------------------------------------------------------------------- 6. failure cases


def test_layer_norm_eps_mismatch_is_refused_naming_the_layer_and_both_values():
    source, target = eqx.nn.LayerNorm(6), nnx.LayerNorm(6, rngs=nnx.Rngs(0))  # each library's default eps
    with pytest.raises(ConversionError, match=r"epsilon is 1e-05 in the source .* and 1e-06 in the target"):
        convert.check_layers(source, target)
    with pytest.raises(ConversionError, match="epsilon"):
        migrate(source, target)
    convert.check_layers(eqx.nn.LayerNorm(6, eps=1e-6), target)  # the same eps: accepted


def test_batch_norm_momentum_mismatch_is_refused():
    source = eqx_shapes(EqxBNNet, key=KEY)
    target = eqx.tree_at(lambda m: m.BatchNorm_0, source, eqx_layers.BatchNorm(4, momentum=0.99))
    with pytest.raises(ConversionError, match=r"BatchNorm_0: momentum is 0.9 in the source .* 0.99 in the target"):
        convert.check_layers(source, target)
    with pytest.raises(ConversionError, match="momentum"):
        convert.check_layers(nnx.BatchNorm(4, rngs=nnx.Rngs(0)), eqx_layers.BatchNorm(4, momentum=0.9))


@pytest.mark.parametrize(
    "eqx_kwargs,nnx_kwargs,refused",
    [
        (dict(stride=2, padding="SAME"), dict(strides=2), None),
        (dict(padding=1), dict(), None),  # 'SAME' at stride 1 is (1, 1)
        (dict(stride=2, padding=((0, 1), (0, 1))), dict(strides=2), "padding"),  # 'SAME' at stride 2 depends on the size
        (dict(stride=1, padding="SAME"), dict(strides=2), "strides"),
        (dict(padding="SAME", dilation=2), dict(), "kernel_dilation"),
        (dict(padding="SAME", groups=2), dict(), "feature_group_count"),
    ],
)
def test_conv_settings_that_compute_something_else_are_refused(eqx_kwargs, nnx_kwargs, refused):
    source = eqx_shapes(eqx.nn.Conv2d, 2, 4, 3, **eqx_kwargs, key=KEY)
    target = nnx_shapes(nnx.Conv, 2, 4, (3, 3), **nnx_kwargs)
    if refused is None:
        convert.check_layers(source, target)
    else:
        with pytest.raises(ConversionError, match=refused):
            convert.check_layers(source, target)


def test_conv_transpose_padding_is_compared_as_lax_receives_it():
    same = nnx_shapes(nnx.ConvTranspose, 3, 5, (3, 3), strides=2)  # 'SAME': (2, 1)
    convert.check_layers(eqx_shapes(eqx.nn.ConvTranspose2d, 3, 5, 3, stride=2, padding=((0, 1), (0, 1)), key=KEY), same)
    with pytest.raises(ConversionError, match=r"padding is \(\(1, 1\), \(1, 1\)\)"):
        convert.check_layers(eqx_shapes(eqx.nn.ConvTranspose2d, 3, 5, 3, stride=2, padding=1, key=KEY), same)


def test_a_conv_kernel_of_the_wrong_shape_names_the_path_and_both_shapes():
    params = {"kernel": jnp.zeros((3, 3, 2, 5)), "bias": jnp.zeros(5)}
    with pytest.raises(ConversionError) as err:
        convert.from_functional(params, like=eqx_shapes(eqx.nn.Conv2d, 2, 4, 3, key=KEY))
    msg = str(err.value)
    assert ".weight" in msg and "(3, 3, 2, 5)" in msg and "(3, 3, 2, 4)" in msg and "(4, 2, 3, 3)" in msg


def test_a_conv_kernel_of_the_wrong_dtype_names_the_path_and_both_dtypes():
    params = {"kernel": jnp.zeros((3, 3, 2, 4), jnp.float16), "bias": jnp.zeros(4)}
    with pytest.raises(ConversionError, match=r"\.weight: source dtype float16 does not match target dtype float32"):
        convert.from_functional(params, like=eqx_shapes(eqx.nn.Conv2d, 2, 4, 3, key=KEY))


def test_an_unknown_name_is_named_with_close_candidates(cnn):
    with pytest.raises(ConversionError, match=r"'featurs/0' is not a layer of this model; close: \['features/0'"):
        convert.from_functional(cnn[0]["params"], like=eqx_shapes(EqxNet, key=KEY), names={"featurs/0": "Conv_0"})
    with pytest.raises(ConversionError, match="flatten: 'Dense_9'"):
        convert.to_functional(eqx_shapes(EqxCNN, key=KEY), flatten={"Dense_9": (7, 7, 64)})


def test_an_old_style_train_state_without_model_state_still_converts(cnn):
    params = cnn[0]["params"]
    tx = optax.sgd(0.1)
    old = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))  # three fields: model_state is {}
    model = convert.from_functional(params, like=eqx_shapes(EqxCNN, key=KEY))
    like = TrainState.create(model, tx, eqx.nn.State(model))
    converted = convert.from_functional(old, like=like)
    assert isinstance(converted.model_state, eqx.nn.State)
    back = convert.to_functional(converted)
    assert back.model_state == {}
    assert_trees_equal(back, old)


def test_docs_layers_page_shows_the_table_the_converters_read():
    page = (Path(__file__).resolve().parents[1] / "docs" / "layers.md").read_text()
    assert convert.layouts_table() in page


def test_pureflax_batch_norm_follows_equinox_inference_mode():
    norm, state = eqx.nn.make_with_state(eqx_layers.BatchNorm)(2)
    state = state.set(norm.state_index, (jnp.array([1.0, -1.0]), jnp.array([4.0, 0.25])))
    x = jnp.stack([jnp.full((2, 1, 1), 3.0), jnp.full((2, 1, 1), 5.0)])  # (batch 2, channels 2, 1 pixel)
    run = lambda m: eqx_layers.vmap_stateful(m)(x, state)[0][:, :, 0, 0]  # noqa: E731
    want = (x[:, :, 0, 0] - jnp.array([[1.0, -1.0]])) / jnp.sqrt(jnp.array([[4.0, 0.25]]) + 1e-5)
    assert_close(run(eqx.nn.inference_mode(norm)), want)  # the running statistics
    assert_close(run(norm), jnp.array([[-1.0, -1.0], [1.0, 1.0]]))  # training: the batch's
    assert_close(run(eqx.nn.inference_mode(norm, False)), run(norm))


def test_check_layers_names_may_rename_a_block_and_everything_in_it():
    class Block(eqx.Module):
        norm: eqx.nn.LayerNorm

    class Outer(eqx.Module):
        body: Block

    class NNXBlock(nnx.Module):
        def __init__(self, rngs):
            self.norm = nnx.LayerNorm(6, rngs=rngs)

    class NNXOuter(nnx.Module):
        def __init__(self, rngs):
            self.enc = NNXBlock(rngs)

    source = Outer(Block(eqx.nn.LayerNorm(6)))  # eps 1e-5
    with pytest.raises(ConversionError, match=r"enc/norm: epsilon is 1e-05"):
        convert.check_layers(source, NNXOuter(nnx.Rngs(0)), source_names={"body": "enc"})
