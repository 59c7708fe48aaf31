"""pureflax.compat.migrate on models as their authors wrote them: matched by structure, checked, verified.

The models are in ``upstream.py``, each following its upstream source's structure, names and
settings. No test here passes ``names=`` or ``flatten=``: the match comes from the models' layers,
and ``example=`` proves each conversion by both models' outputs.
"""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training.train_state import TrainState as FlaxTrainState

from pureflax.compat import ConversionError, convert, migrate, plan, register_layer
from pureflax.state import TrainState
from trees import assert_trees_equal, max_diff
from upstream import EqxCNN, LinenCNN, NNXCNN, NNXResNet18, ResNet18, ZooBatchNorm, ZooSmall

KEY = jax.random.key(0)
IMAGES = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (2, 28, 28, 1)), jnp.float32)  # NHWC, as Linen takes it


def random_like(tree, seed, scale=0.1):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(scale * rng.standard_normal(np.shape(x)), x.dtype), tree)


def relative(a, b):
    return float(max_diff(a, b) / np.max(np.abs(np.asarray(a))))


@pytest.fixture(scope="module")
def linen_cnn():
    """The Flax examples/mnist CNN, bound to random variables, and its output on IMAGES."""
    variables = random_like(jax.eval_shape(lambda: LinenCNN().init(KEY, IMAGES)), seed=1)
    return LinenCNN().bind(variables), LinenCNN().apply(variables, IMAGES)


def eqx_out(model, x=IMAGES):
    return jax.vmap(model)(jnp.moveaxis(x, -1, 1))


def test_the_mnist_cnns_go_linen_equinox_nnx_and_back_with_no_names(linen_cnn):
    bound, want = linen_cnn
    eqx_like = eqx.filter_eval_shape(EqxCNN, KEY)
    nnx_like = nnx.eval_shape(lambda: NNXCNN(rngs=nnx.Rngs(0)))
    equinox = migrate(bound, eqx_like, example=IMAGES)  # the flatten order settled by the outputs
    assert relative(want, eqx_out(equinox)) < 1e-5
    module = migrate(equinox, nnx_like, example=jnp.moveaxis(IMAGES, -1, 1))  # an Equinox batch, channels first
    assert relative(want, module(IMAGES)) < 1e-5
    back = migrate(module, bound, example=IMAGES)
    assert_trees_equal(back.variables, bound.variables)  # bit for bit, through two flattens
    # and straight back from Equinox
    assert_trees_equal(migrate(equinox, bound, example=jnp.moveaxis(IMAGES, -1, 1)).variables, bound.variables)


def test_the_plan_shows_each_pair_and_the_rows_permuted(linen_cnn):
    bound, _ = linen_cnn
    shown = str(plan(bound, eqx.filter_eval_shape(EqxCNN, KEY), example=IMAGES))
    assert "Conv_0" in shown and "layers/0" in shown and "layers/7" in shown and "padding equal" in shown
    assert "transposed" in shown and "permuted" in shown
    table = plan(bound, nnx.eval_shape(lambda: NNXCNN(rngs=nnx.Rngs(0))), example=IMAGES)
    assert [(p.source.path, p.target.path) for p in table.pairs] == [
        ("Conv_0", "conv1"), ("Conv_1", "conv2"), ("Dense_0", "linear1"), ("Dense_1", "linear2")]


def test_the_flatten_order_is_refused_without_an_example_never_guessed(linen_cnn):
    bound, want = linen_cnn
    with pytest.raises(ConversionError, match=r"Dense_0 -> layers/7: .*example=.*flatten=\{'layers/7': \(H, W, C\)\}"):
        migrate(bound, eqx.filter_eval_shape(EqxCNN, KEY))
    given = migrate(bound, eqx.filter_eval_shape(EqxCNN, KEY), example=IMAGES, flatten={"layers/7": (7, 7, 64)})
    assert relative(want, eqx_out(given)) < 1e-5
    # Linen and NNX flatten alike (H, W, C): nothing to settle
    assert relative(want, migrate(bound, nnx.eval_shape(lambda: NNXCNN(rngs=nnx.Rngs(0))), example=IMAGES)(IMAGES)) < 1e-5


def test_adamw_state_travels_with_the_params_and_comes_back_bit_for_bit(linen_cnn):
    bound, _ = linen_cnn
    tx = optax.adamw(1e-3)
    params = bound.variables["params"]
    state = jax.jit(lambda p: TrainState.create(p, tx).apply_gradients(grads=random_like(p, seed=5), tx=tx))(params)
    flax_state = FlaxTrainState(step=state.step, apply_fn=LinenCNN().apply, params=params, tx=tx, opt_state=state.opt_state)
    model = EqxCNN(KEY)
    pair = migrate(flax_state, (model, tx.init(eqx.filter(model, eqx.is_array))), example=IMAGES)  # Equinox's (model, opt_state)
    mu = pair[1][0].mu
    assert isinstance(mu, EqxCNN)
    np.testing.assert_array_equal(mu.layers[9].weight, state.opt_state[0].mu["Dense_1"]["kernel"].T)
    nnx_model = nnx.eval_shape(lambda: NNXCNN(rngs=nnx.Rngs(0)))
    module, optimizer = migrate(pair, (nnx_model, nnx.Optimizer(nnx_model, tx, wrt=nnx.Param)), example=jnp.moveaxis(IMAGES, -1, 1))
    assert int(optimizer.step[...]) == 1
    back = migrate((module, optimizer), flax_state, example=IMAGES)
    assert_trees_equal(convert.to_functional(back), convert.to_functional(flax_state))


def test_construction_order_is_not_call_order_and_the_match_follows_the_calls():
    class Nested(nn.Module):  # Dense_0 is the OUTER layer: Linen names in construction order
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(nn.relu(nn.Dense(32)(x)))

    class Chain(nnx.Module):
        def __init__(self, rngs):
            self.first, self.second = nnx.Linear(32, 32, rngs=rngs), nnx.Linear(32, 10, rngs=rngs)

        def __call__(self, x):
            return self.second(nnx.relu(self.first(x)))

    x = jnp.ones((2, 32))
    variables = random_like(jax.eval_shape(lambda: Nested().init(KEY, x)), seed=2)
    moved = migrate(Nested().bind(variables), Chain(nnx.Rngs(0)), example=x)
    np.testing.assert_array_equal(moved.first.kernel[...], variables["params"]["Dense_1"]["kernel"])
    assert relative(Nested().apply(variables, x), moved(x)) < 1e-6


# --------------------------------------------------------------------------- ResNet-18

RESNET_X = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)


def eval_linen(model, x):
    return model(x, train=False)


def eval_nnx(model, x):
    model.eval()
    return model(x)


@pytest.fixture(scope="module")
def resnet():
    """Flax's examples/imagenet ResNet18 (8 filters), random params and statistics, and its eval output."""
    net = ResNet18(num_classes=10, num_filters=8)
    shapes = jax.eval_shape(lambda: net.init(KEY, RESNET_X, train=False))
    variables = {"params": random_like(shapes["params"], seed=4, scale=0.2),
                 "batch_stats": jax.tree_util.tree_map(lambda s: jnp.asarray(np.random.default_rng(6).uniform(0.5, 1.5, s.shape),
                                                                             s.dtype), shapes["batch_stats"])}
    return net.bind(variables), jax.jit(lambda v: net.apply(v, RESNET_X, train=False))(variables)


def test_linen_resnet18_goes_to_an_nnx_port_with_torchvisions_names_and_back(resnet):
    bound, want = resnet
    like = nnx.eval_shape(lambda: NNXResNet18(10, num_filters=8, padding="flax", rngs=nnx.Rngs(0)))
    module = migrate(bound, like, example=RESNET_X, call=(eval_linen, eval_nnx))
    assert relative(want, eval_nnx(module, RESNET_X)) < 1e-4
    np.testing.assert_array_equal(module.layer2[0].downsample.layers[1].var[...],
                                  bound.variables["batch_stats"]["ResNetBlock_2"]["norm_proj"]["var"])
    back = migrate(module, bound, example=RESNET_X, call=(eval_nnx, eval_linen))
    assert_trees_equal(back.variables, bound.variables)


def test_a_port_with_torchs_paddings_is_refused_naming_the_layer_and_the_padding(resnet):
    bound, _ = resnet
    like = nnx.eval_shape(lambda: NNXResNet18(10, num_filters=8, padding="torch", rngs=nnx.Rngs(0)))
    with pytest.raises(ConversionError, match=r"layer2/0/conv1: padding is 'SAME' in the source .* \(\(1, 1\), \(1, 1\)\) in the target"):
        migrate(bound, like, example=RESNET_X, call=(eval_linen, eval_nnx))


def test_plain_variables_without_an_example_cannot_show_their_settings(resnet):
    bound, _ = resnet
    like = nnx.eval_shape(lambda: NNXResNet18(10, num_filters=8, padding="torch", rngs=nnx.Rngs(0)))
    with pytest.raises(ConversionError, match="example="):
        migrate(dict(bound.variables), like)


# ------------------------------------------------------------------- a foreign BatchNorm


class LinenSmall(nn.Module):
    """ZooSmall's function in Linen: conv, BatchNorm (torch's momentum 0.1 is Flax's 0.9), relu, mean, Dense."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), padding=1)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5)(x))
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def zoo_eval(pair, x):
    model, state = pair
    return jax.vmap(eqx.nn.inference_mode(model), in_axes=(0, None), out_axes=(0, None), axis_name="batch")(x, state)[0]


def test_a_model_zoos_batch_norm_converts_after_one_register_layer_line():
    x = IMAGES[:, :8, :8]
    variables = random_like(jax.eval_shape(lambda: LinenSmall().init(KEY, x)), seed=7)
    variables["batch_stats"] = jax.tree_util.tree_map(lambda v: jnp.abs(v) + 0.5, variables["batch_stats"])
    like = eqx.nn.make_with_state(ZooSmall)(key=KEY)
    with pytest.raises(ConversionError, match="register_layer"):
        migrate(LinenSmall().bind(variables), like, example=x, call=(lambda m, x: m(x), zoo_eval))
    row = register_layer(ZooBatchNorm, "BatchNorm", {"gamma": "scale", "beta": "bias"},
                         statistics={"running_mean": "mean", "running_var": "var"}, state_index="state_index",
                         settings=lambda m: {"epsilon": m.eps, "momentum": 1 - m.momentum})
    try:
        model, state = migrate(LinenSmall().bind(variables), like, example=x, call=(lambda m, x: m(x), zoo_eval))
        running = state.get(model.bn.state_index)
        np.testing.assert_array_equal(running[1], variables["batch_stats"]["BatchNorm_0"]["var"])  # statistics, not params
        assert relative(LinenSmall().apply(variables, x), zoo_eval((model, state), jnp.moveaxis(x, -1, 1))) < 1e-5
        assert "ZooBatchNorm" in convert.layouts_table()
    finally:
        convert.LAYOUTS.remove(row)


def test_outputs_that_differ_are_refused_naming_the_first_layer_that_does(linen_cnn):
    class MaxPooled(NNXCNN):  # the tutorial's CNN with max pooling: same layers, same settings, another function
        def __call__(self, x):
            x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))
            x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), strides=(2, 2))
            return self.linear2(nnx.relu(self.linear1(x.reshape(x.shape[0], -1))))

    bound, _ = linen_cnn
    with pytest.raises(ConversionError, match=r"computes another function: .* first layer whose output differs: Conv_1 -> conv2"):
        migrate(bound, MaxPooled(rngs=nnx.Rngs(0)), example=IMAGES)


def test_bad_arguments_are_refused_naming_the_culprit(linen_cnn):
    bound, _ = linen_cnn
    like = nnx.eval_shape(lambda: NNXCNN(rngs=nnx.Rngs(0)))
    with pytest.raises(ConversionError, match=r"names: 'linear9' is not a layer of the target; its layers: \['conv1'"):
        migrate(bound, like, example=IMAGES, names={"linear9": "Dense_0"})
    with pytest.raises(ConversionError, match=r"flatten: \['conv1'\] name no Dense layer"):
        migrate(bound, eqx.filter_eval_shape(EqxCNN, KEY), example=IMAGES, flatten={"conv1": (7, 7, 64)})
    with pytest.raises(ConversionError, match=r"kind 'Norm' is not one of"):
        register_layer(ZooBatchNorm, "Norm", {"gamma": "scale"})
    with pytest.raises(ConversionError, match=r"rule 'flipped' is not one of"):
        register_layer(ZooBatchNorm, "BatchNorm", {"gamma": ("scale", "flipped")})


def test_an_nnx_model_defined_out_of_call_order_is_matched_by_its_calls():
    class Reversed(nnx.Module):  # defines the last layer first
        def __init__(self, rngs):
            self.head = nnx.Linear(16, 16, rngs=rngs)
            self.body = nnx.Linear(16, 16, rngs=rngs)

        def __call__(self, x):
            return self.head(nnx.relu(self.body(x)))

    class Chain(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(16)(x))
            return nn.Dense(16)(x)

    x = jnp.asarray(np.random.default_rng(8).uniform(-1, 1, (3, 16)), jnp.float32)
    variables = random_like(jax.eval_shape(lambda: Chain().init(KEY, x)), seed=9, scale=0.5)
    moved = migrate(Chain().bind(variables), Reversed(nnx.Rngs(0)), example=x)  # shapes alike: only the calls tell
    np.testing.assert_array_equal(moved.body.kernel[...], variables["params"]["Dense_0"]["kernel"])
    assert relative(Chain().apply(variables, x), moved(x)) < 1e-6


def test_an_equinox_model_shows_which_layer_first_differs(linen_cnn):
    class MaxPooled(EqxCNN):  # the Equinox CNN with max pooling
        def __call__(self, x):
            x = eqx.nn.MaxPool2d(2, 2)(jax.nn.relu(self.layers[0](x)))
            x = eqx.nn.MaxPool2d(2, 2)(jax.nn.relu(self.layers[3](x)))
            return self.layers[9](jax.nn.relu(self.layers[7](jnp.ravel(x))))

    bound, _ = linen_cnn
    with pytest.raises(ConversionError, match=r"first layer whose output differs: Conv_1 -> layers/3"):
        migrate(bound, MaxPooled(KEY), example=IMAGES, flatten={"layers/7": (7, 7, 64)})


# ------------------------------------------------- what would have been silently wrong


class AutoEncoder(nn.Module):  # setup-named layers of one shape: a sorted dict puts decode first
    def setup(self):
        self.encode, self.decode = nn.Dense(8), nn.Dense(8)

    def __call__(self, x):
        return self.decode(nn.relu(self.encode(x)))


class EqxAutoEncoder(eqx.Module):
    encoder: eqx.nn.Linear
    decoder: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.encoder, self.decoder = eqx.nn.Linear(8, 8, key=k1), eqx.nn.Linear(8, 8, key=k2)

    def __call__(self, x):
        return self.decoder(jax.nn.relu(self.encoder(x)))


def test_a_dicts_key_order_is_not_trusted_between_layers_of_one_shape():
    x = jnp.ones((2, 8))
    variables = jax.tree_util.tree_map(lambda v: v, AutoEncoder().init(KEY, x))  # tree_map sorts: decode, encode
    assert list(variables["params"]) == ["decode", "encode"]
    like = eqx.filter_eval_shape(EqxAutoEncoder, KEY)
    with pytest.raises(ConversionError, match=r"in the order of a dict's keys .* module.bind\(variables\)"):
        migrate(variables, like)
    moved = migrate(AutoEncoder().bind(variables), like, example=x)  # the bound module's calls settle it
    np.testing.assert_array_equal(moved.encoder.weight, variables["params"]["encode"]["kernel"].T)
    pinned = migrate(variables, like, names={"encoder": "encode", "decoder": "decode"})
    np.testing.assert_array_equal(pinned.decoder.weight, variables["params"]["decode"]["kernel"].T)


class LinenConvFc(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="fc")(nn.Conv(3, (3, 3), strides=2, padding="VALID", name="conv")(x).reshape((x.shape[0], -1)))


class EqxConvFc(eqx.Module):  # the same names, but it flattens (C, H, W)
    conv: eqx.nn.Conv2d
    fc: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv, self.fc = eqx.nn.Conv2d(1, 3, 3, stride=2, key=k1), eqx.nn.Linear(27, 4, key=k2)

    def __call__(self, x):
        return self.fc(jnp.ravel(self.conv(x)))


class NNXConvFc(nnx.Module):  # the same names, 'SAME' where the source is 'VALID'
    def __init__(self, rngs):
        self.conv, self.fc = nnx.Conv(1, 3, (3, 3), strides=2, rngs=rngs), nnx.Linear(27, 4, rngs=rngs)


def test_layers_whose_names_agree_are_still_checked_for_flatten_order_and_settings():
    x = IMAGES[:, :7, :7]
    variables = random_like(jax.eval_shape(lambda: LinenConvFc().init(KEY, x)), seed=10)
    with pytest.raises(ConversionError, match="flatten"):
        migrate(LinenConvFc().bind(variables), eqx.filter_eval_shape(EqxConvFc, KEY))
    moved = migrate(LinenConvFc().bind(variables), eqx.filter_eval_shape(EqxConvFc, KEY), example=x)
    assert relative(LinenConvFc().apply(variables, x), eqx_out(moved, x)) < 1e-5
    with pytest.raises(ConversionError, match="settings .* cannot be seen"):
        migrate(variables, NNXConvFc(nnx.Rngs(0)))  # plain variables: their conv's padding is unknown


def test_running_the_example_changes_neither_model():
    class Norm(nnx.Module):
        def __init__(self, rngs):
            self.norm = nnx.BatchNorm(3, rngs=rngs)

        def __call__(self, x):
            return self.norm(x)

    x = jnp.asarray(np.random.default_rng(11).normal(5.0, 1.0, (4, 3)), jnp.float32)
    source = Norm(nnx.Rngs(0))
    source.norm.mean[...] = jnp.full(3, 5.0)
    target = migrate(source, Norm(nnx.Rngs(1)), example=x)
    np.testing.assert_array_equal(target.norm.mean[...], jnp.full(3, 5.0))  # not one training step on the example
    np.testing.assert_array_equal(source.norm.mean[...], jnp.full(3, 5.0))
    assert not target.norm.use_running_average  # returned as it came, in training mode


def test_containers_without_a_place_for_a_state_refuse_it():
    params, model_state = {"Dense_0": {"kernel": jnp.ones((2, 2))}}, {"BatchNorm_0": {"mean": jnp.zeros(2)}}
    with pytest.raises(ConversionError, match="cannot fill variables of params"):
        convert.variables_from_functional(params, model_state, like={"Dense_0": {"kernel": jnp.zeros((2, 2))}})
    tx = optax.sgd(0.1)  # its state has no arrays: still Equinox's (model, opt_state)
    model = eqx.nn.Linear(2, 2, key=KEY)
    functional = convert.to_functional((model, tx.init(eqx.filter(model, eqx.is_array))))
    assert isinstance(functional, TrainState)
    with pytest.raises(ConversionError, match="cannot fill"):
        convert.transfer(functional, model)  # its optimiser state is not dropped


def test_a_model_that_is_one_layer_takes_a_named_layer():
    variables = {"params": {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}}
    layer = migrate(variables, eqx.nn.Linear(2, 3, key=KEY))
    np.testing.assert_array_equal(layer.weight, jnp.ones((3, 2)))
    assert_trees_equal(migrate(layer, variables), variables)
