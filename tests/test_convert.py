"""pureflax.compat.convert: exact moves of params and optimiser state between the three forms.

Every check of carried values is exact (``assert_array_equal`` and equal dtypes); the only
tolerances are on model outputs and on training continued after a conversion. The
Equinox <-> functional correspondence is written out by hand here (:func:`eqx_vae_as_dict`),
so the tests do not trust the converter to check itself.
"""

import functools
from collections.abc import Mapping

import equinox as eqx
import flax.core
import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state as flax_train_state

from pureflax import nn, vae
from pureflax.compat import convert, equinox_models, flax_models
from pureflax.compat.convert import ConversionError
from pureflax.losses import vae_loss
from pureflax.optim import OptimConfig, make_optimizer
from pureflax.state import TrainState
from trees import assert_trees_equal, key, max_diff

FlaxTrainState = flax_train_state.TrainState

CFG = vae.VAEConfig(encoder_dimensions=(12, 8), decoder_dimensions=(8, 20), latent_dim=3, num_classes=4, input_dim=20)
EQX_KW = dict(latent_dim=3, encoder_dimensions=(12, 8), decoder_dimensions=(8, 20), num_classes=4, input_dim=20)
FLAX_VAE = flax_models.VAE(encoder_dimensions=(12, 8), decoder_dimensions=(8, 20), latent_dim=3)
BATCH = 5
SCALE = 0.3  # of the random params: activations of order one
LINEARS = [
    "encoder/Dense_0",
    "encoder/Dense_1",
    "pre_latent_proj",
    "post_latent_proj",
    "class_proj",
    "decoder/Dense_0",
    "decoder/Dense_1",
]


# ------------------------------------------------------------------------------ helpers


def assert_trees_close(a, b, atol):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


def _t(w):
    return w if isinstance(w, optax.MaskedNode) else np.asarray(w).T


def _linear_as_dict(layer):
    return {"kernel": _t(layer.weight), "bias": layer.bias}


def eqx_vae_as_dict(model):
    """The functional dict of an equinox_models.VAE, written out by hand (kernel = weight.T)."""
    return {
        "encoder": {f"Dense_{i}": _linear_as_dict(lin) for i, lin in enumerate(model.encoder.layers)},
        "pre_latent_proj": _linear_as_dict(model.pre_latent_proj),
        "post_latent_proj": _linear_as_dict(model.post_latent_proj),
        "class_proj": _linear_as_dict(model.class_proj),
        "decoder": {f"Dense_{i}": _linear_as_dict(lin) for i, lin in enumerate(model.decoder.layers)},
    }


def _is_params_node(x):
    return isinstance(x, equinox_models.VAE) or (isinstance(x, Mapping) and set(x.keys()) == {"params"})


def as_dict(tree):
    """Any form's params (or an optimiser state holding them) with every params subtree as a plain dict."""

    def one(x):
        if isinstance(x, equinox_models.VAE):
            return eqx_vae_as_dict(x)
        if isinstance(x, Mapping) and set(x.keys()) == {"params"}:
            return flax.core.unfreeze(x["params"])
        return x

    return jax.tree_util.tree_map(one, tree, is_leaf=_is_params_node)


def _is_masked(x):
    return isinstance(x, optax.MaskedNode)


def max_change(a, b):
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return max(max_diff(x, y) for x, y in pairs)


def any_state(form, p, tx):
    """A train state of ``form`` (Flax's for Flax variables, pureflax's otherwise)."""
    if form == "flax":
        return FlaxTrainState.create(apply_fn=FLAX_VAE.apply, params=p, tx=tx)
    return TrainState.create(p, tx)


def get(tree, path):
    for name in path.split("/"):
        tree = tree[name]
    return tree


def eqx_linear(model, path):
    parts = path.split("/")
    node = getattr(model, parts[0])
    if len(parts) == 2:
        node = node.layers[int(parts[1].split("_")[1])]
    return node


def random_like(tree, seed, scale=1.0):
    """``tree`` with every array (or ShapeDtypeStruct) replaced by float32 normal draws.

    Numpy draws instead of the models' initialisers: the converters do not care about the
    values, and compiling the initialisers eagerly costs seconds on a small CPU.
    """
    rng = np.random.default_rng(seed)

    def draw(x):
        if isinstance(x, jax.ShapeDtypeStruct) or eqx.is_array(x):
            return jnp.asarray(scale * rng.standard_normal(np.shape(x)), jnp.float32)
        return x

    return jax.tree_util.tree_map(draw, tree)


def inputs(seed=0, n=BATCH):
    rng = np.random.default_rng(1000 + seed)
    x = jnp.asarray(rng.uniform(size=(n, CFG.input_dim)), jnp.float32)
    c = jax.nn.one_hot(jnp.asarray(rng.integers(0, CFG.num_classes, n)), CFG.num_classes)
    return x, c


FUNC_SHAPES = jax.eval_shape(lambda k: vae.init(k, CFG), key(0))
EQX_SHAPES = eqx.filter_eval_shape(equinox_models.VAE, **EQX_KW, key=key(0))
FLAX_SHAPES = jax.eval_shape(
    lambda k: FLAX_VAE.init(k, jnp.zeros((1, CFG.input_dim)), jnp.zeros((1, CFG.num_classes)), k), key(0)
)


def functional_params(seed):
    return random_like(FUNC_SHAPES, seed, SCALE)


def eqx_model(seed):
    return random_like(EQX_SHAPES, seed, SCALE)


def flax_variables(seed):
    return random_like(FLAX_SHAPES, seed, SCALE)


def fast_jit(fn):
    """``jax.jit`` compiling at XLA's lowest optimisation level: half the compile time.

    For the optimiser steps, compiled once per optimiser and form; every form being
    compared is compiled the same way, so the comparisons are unaffected.
    """
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


# Jitted once here: on a small CPU an eager forward pass compiles every op separately.
apply_functional = jax.jit(vae.apply)
apply_equinox = jax.jit(equinox_models.batched_apply)
apply_flax = jax.jit(FLAX_VAE.apply)


@pytest.fixture(scope="module")
def params():
    return functional_params(0)


@pytest.fixture(scope="module")
def eqx_like():
    return eqx_model(7)


@pytest.fixture(scope="module")
def flax_like():
    return flax_variables(11)


# ------------------------------------------------------------------------ 1. round trips


def test_functional_to_equinox_to_functional_is_bitwise(params, eqx_like):
    model = convert.from_functional(params, like=eqx_like)
    assert isinstance(model, equinox_models.VAE)
    assert jax.tree_util.tree_structure(model) == jax.tree_util.tree_structure(eqx_like)
    # values come from params, not from like
    assert not np.array_equal(model.encoder.layers[0].weight, eqx_like.encoder.layers[0].weight)
    assert_trees_equal(eqx_vae_as_dict(model), params)
    assert_trees_equal(convert.to_functional(model), params)


def test_functional_to_flax_to_functional_is_bitwise(params, flax_like):
    variables = convert.from_functional(params, like=flax_like)
    assert set(variables) == {"params"}
    assert not np.array_equal(variables["params"]["class_proj"]["kernel"], flax_like["params"]["class_proj"]["kernel"])
    assert_trees_equal(variables["params"], params)
    assert_trees_equal(convert.to_functional(variables), params)


def test_equinox_to_functional_to_flax_to_functional_to_equinox_is_bitwise(flax_like):
    original = eqx_model(21)
    functional = convert.to_functional(original)
    variables = convert.from_functional(functional, like=flax_like)
    again = convert.to_functional(variables)
    final = convert.from_functional(again, like=eqx_model(22))
    assert jax.tree_util.tree_structure(final) == jax.tree_util.tree_structure(original)
    assert final.latent_dim == original.latent_dim
    assert_trees_equal(final, original)
    assert_trees_equal(eqx_vae_as_dict(original), variables["params"])


def test_flax_to_equinox_to_flax_is_bitwise(eqx_like):
    variables = flax_variables(31)
    model = convert.from_functional(convert.to_functional(variables), like=eqx_like)
    assert_trees_equal(eqx_vae_as_dict(model), variables["params"])
    back = convert.from_functional(convert.to_functional(model), like=flax_variables(32))
    assert_trees_equal(back, variables)


def test_frozen_dict_flax_variables_work(params, eqx_like):
    frozen = flax.core.freeze(flax_variables(41))
    assert isinstance(frozen, flax.core.FrozenDict)
    functional = convert.to_functional(frozen)
    assert_trees_equal(functional, flax.core.unfreeze(frozen["params"]))
    model = convert.from_functional(frozen["params"], like=eqx_like)  # a FrozenDict source
    assert_trees_equal(eqx_vae_as_dict(model), flax.core.unfreeze(frozen["params"]))
    filled = convert.from_functional(params, like=frozen)  # a FrozenDict target stays frozen
    assert isinstance(filled, flax.core.FrozenDict)
    assert_trees_equal(flax.core.unfreeze(filled)["params"], params)
    x, c = inputs()
    recon = apply_flax(flax.core.unfreeze(filled), x, c, key(3))[0]
    np.testing.assert_array_equal(recon, apply_functional(params, x, c, key(3))[0])


# --------------------------------------------------------- 2. the transpose, and outputs


def test_equinox_weight_is_functional_kernel_transposed(params, eqx_like):
    model = convert.from_functional(params, like=eqx_like)
    for path in LINEARS:
        layer = eqx_linear(model, path)
        kernel, bias = get(params, path + "/kernel"), get(params, path + "/bias")
        assert layer.weight.shape == kernel.shape[::-1]
        assert layer.weight.dtype == kernel.dtype
        np.testing.assert_array_equal(layer.weight, np.asarray(kernel).T)
        np.testing.assert_array_equal(layer.bias, bias)


def test_three_forms_compute_the_same_outputs(params, eqx_like, flax_like):
    model = convert.from_functional(params, like=eqx_like)
    variables = convert.from_functional(params, like=flax_like)
    x, c = inputs(3)
    k = key(99)
    outs_f = apply_functional(params, x, c, k)
    outs_e = apply_equinox(model, x, c, k)
    outs_x = apply_flax(variables, x, c, k)
    for a, b, d in zip(outs_f, outs_e, outs_x, strict=True):
        assert a.shape == b.shape == d.shape
        assert max_diff(a, b) <= 1e-5
        assert max_diff(a, d) <= 1e-5
    # a model with other values gives other outputs: the comparison above has teeth
    other = apply_equinox(eqx_like, x, c, k)
    assert max_diff(other[0], outs_f[0]) > 1e-3


# ------------------------------------------------------------------- 3. generic models


@pytest.mark.parametrize("drop_last", [False, True])
def test_equinox_feed_forward_is_flax_and_functional_feed_forward(drop_last):
    dims = (5, 4, 3)

    def make(seed):
        shapes = eqx.filter_eval_shape(equinox_models.FeedForward, 6, dims, drop_last_activation=drop_last, key=key(0))
        return random_like(shapes, seed)

    ff = make(50)
    params = convert.to_functional(ff)
    flax_ff = flax_models.FeedForward(dims, drop_last_activation=drop_last)
    flax_params = jax.eval_shape(flax_ff.init, key(51), jnp.zeros((1, 6)))["params"]
    func_ff = nn.feed_forward(dims, drop_last_activation=drop_last)
    func_params = jax.eval_shape(func_ff.init, key(51), jnp.zeros((1, 6)))
    shapes = jax.tree_util.tree_map(np.shape, params)
    assert sorted(params) == ["Dense_0", "Dense_1", "Dense_2"]
    assert shapes == jax.tree_util.tree_map(np.shape, flax.core.unfreeze(flax_params))
    assert shapes == jax.tree_util.tree_map(np.shape, func_params)
    for i, layer in enumerate(ff.layers):
        np.testing.assert_array_equal(params[f"Dense_{i}"]["kernel"], np.asarray(layer.weight).T)
        np.testing.assert_array_equal(params[f"Dense_{i}"]["bias"], layer.bias)

    x = random_like(jax.ShapeDtypeStruct((7, 6), jnp.float32), 52)
    y_eqx = jax.vmap(ff)(x)
    y_flax = flax_ff.apply({"params": params}, x)
    y_func = func_ff.apply(params, x)
    assert y_eqx.shape == (7, 3)
    np.testing.assert_allclose(y_flax, y_eqx, rtol=0, atol=1e-5)
    np.testing.assert_allclose(y_func, y_eqx, rtol=0, atol=1e-5)
    assert bool(np.any(np.asarray(y_eqx) < 0)) == drop_last  # relu after the last layer or not

    back = convert.from_functional(params, like=make(53))
    assert_trees_equal(back, ff)


def eqx_sequential(seed):
    def build(k):
        k1, k2, k3 = jax.random.split(k, 3)
        return eqx.nn.Sequential(
            [
                eqx.nn.Sequential([eqx.nn.Linear(5, 4, key=k1), eqx.nn.Linear(4, 3, key=k2)]),
                eqx.nn.Lambda(jax.nn.relu),
                eqx.nn.Linear(3, 2, key=k3),
            ]
        )

    return random_like(eqx.filter_eval_shape(build, key(0)), seed)


def nested_sequentials():
    """The same network as an Equinox, a Flax and a functional Sequential."""
    eqx_seq = eqx_sequential(60)
    flax_seq = fnn.Sequential([fnn.Sequential([fnn.Dense(4), fnn.Dense(3)]), fnn.relu, fnn.Dense(2)])
    func_seq = nn.sequential([nn.sequential([nn.dense(4), nn.dense(3)]), jax.nn.relu, nn.dense(2)])
    return eqx_seq, flax_seq, func_seq


def check_nested_sequential(eqx_seq, to_functional, from_functional):
    """Paths, values, outputs and the round trip of the nested Sequential's conversion."""
    _, flax_seq, func_seq = nested_sequentials()
    params = to_functional(eqx_seq)
    flax_params = flax.core.unfreeze(jax.eval_shape(flax_seq.init, key(61), jnp.zeros((1, 5)))["params"])
    func_params = jax.eval_shape(func_seq.init, key(61), jnp.zeros((1, 5)))
    paths = sorted(_paths(params))
    assert paths == [
        "layers_0/layers_0/bias",
        "layers_0/layers_0/kernel",
        "layers_0/layers_1/bias",
        "layers_0/layers_1/kernel",
        "layers_2/bias",
        "layers_2/kernel",
    ]
    assert paths == sorted(_paths(flax_params)) == sorted(_paths(func_params))
    assert jax.tree_util.tree_map(np.shape, params) == jax.tree_util.tree_map(np.shape, flax_params)
    inner = eqx_seq.layers[0].layers
    np.testing.assert_array_equal(params["layers_0"]["layers_1"]["kernel"], np.asarray(inner[1].weight).T)
    np.testing.assert_array_equal(params["layers_2"]["bias"], eqx_seq.layers[2].bias)

    x = random_like(jax.ShapeDtypeStruct((6, 5), jnp.float32), 62)
    y_eqx = jax.vmap(eqx_seq)(x)
    np.testing.assert_allclose(flax_seq.apply({"params": params}, x), y_eqx, rtol=0, atol=1e-5)
    np.testing.assert_allclose(func_seq.apply(params, x), y_eqx, rtol=0, atol=1e-5)

    like = eqx_sequential(63)
    back = from_functional(params, like)
    assert_trees_equal(eqx.filter(back, eqx.is_array), eqx.filter(eqx_seq, eqx.is_array))
    np.testing.assert_array_equal(jax.vmap(back)(x), y_eqx)


def _paths(tree):
    return [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def test_nested_equinox_sequential_converts_to_flax_sequential_paths():
    eqx_seq, _, _ = nested_sequentials()
    check_nested_sequential(eqx_seq, convert.to_functional, lambda p, like: convert.from_functional(p, like=like))


def test_nested_equinox_sequential_arrays_convert_to_flax_sequential_paths():
    """The naming rule on the array part of the module (eqx.filter), the way Equinox code trains."""
    eqx_seq, _, _ = nested_sequentials()

    def to_functional(module):
        return convert.to_functional(eqx.filter(module, eqx.is_array))

    def from_functional(p, like):
        arrays, static = eqx.partition(like, eqx.is_array)
        return eqx.combine(convert.from_functional(p, like=arrays), static)

    check_nested_sequential(eqx_seq, to_functional, from_functional)


# ------------------------------------------------------------- 4. optimiser state


OPTIMIZERS = {
    "adamw": OptimConfig(lr=1e-2),
    "adam_ema": OptimConfig(optimizer="adam", ema=0.9, lr=1e-2),
    "multisteps": OptimConfig(grad_accum=3, lr=1e-2),
    "clip_adamw": OptimConfig(clip_norm=1.0, lr=1e-2),
    "freeze": OptimConfig(freeze=("encoder",), lr=1e-2),
}
FORMS = ("functional", "equinox", "flax")


def _cases():
    for name in OPTIMIZERS:
        for a in FORMS:
            for b in FORMS:
                if a != b:
                    yield pytest.param(name, a, b, id=f"{name}-{a}-to-{b}")


def in_form(form, functional_params):
    if form == "functional":
        return functional_params
    return convert.from_functional(functional_params, like=EQX_SHAPES if form == "equinox" else FLAX_SHAPES)


@functools.cache
def optimizer(name, form):
    """The optimiser of ``form``, built from that form's params (names for freezing)."""
    config = OPTIMIZERS[name]
    if not config.freeze:
        return _optimizer(config)
    shapes = {"functional": FUNC_SHAPES, "equinox": EQX_SHAPES, "flax": FLAX_SHAPES}[form]
    names = None if form == "functional" else convert.param_names(shapes)
    return make_optimizer(config, 100, shapes, names)


@functools.cache
def _optimizer(config):
    return make_optimizer(config, 100)


def new_state(name, form, functional_params):
    """A fresh train state of ``form`` with the optimiser built for that form."""
    p = in_form(form, functional_params)
    tx = optimizer(name, form)
    if form == "flax":
        state = FlaxTrainState.create(apply_fn=FLAX_VAE.apply, params=p, tx=tx)
        return state.replace(step=jnp.zeros((), jnp.int32)), tx
    return TrainState.create(p, tx), tx


@functools.cache
def stepper(name):
    """One optimiser update of a state of each form, jitted together: one compile per optimiser.

    Compiling is what costs here (one program for the three forms compiles in about half
    the time of three); a test steps its own states and idle ones in the other forms.
    """
    txs = {form: optimizer(name, form) for form in FORMS}

    def step(states, grads):
        return {
            form: states[form].apply_gradients(grads=grads[form])
            if form == "flax"
            else states[form].apply_gradients(grads=grads[form], tx=txs[form])
            for form in FORMS
        }

    return fast_jit(step)


@functools.cache
def idle_states(name):
    return {form: new_state(name, form, functional_params(9))[0] for form in FORMS}


def update(name, states, functional_grads):
    """Apply the same gradients (in each state's form) to ``states``, a dict form -> state."""
    grads = {form: in_form(form, functional_grads) for form in FORMS}
    out = stepper(name)({**idle_states(name), **states}, grads)
    return {form: out[form] for form in states}


@pytest.mark.parametrize("name,a,b", list(_cases()))
def test_optimizer_state_converts_and_training_continues(name, a, b, params):
    grads = [random_like(params, seed) for seed in range(7)]
    state_a, _ = new_state(name, a, params)
    for g in grads[:2]:  # 2: MultiSteps (every 3) is mid-accumulation
        state_a = update(name, {a: state_a}, g)[a]

    fresh_b, tx_b = new_state(name, b, functional_params(5))
    state_b = convert.from_functional(convert.to_functional(state_a), like=fresh_b)
    assert type(state_b) is type(fresh_b)
    assert int(state_b.step) == 2
    if b == "flax":
        assert state_b.tx is tx_b and state_b.apply_fn == FLAX_VAE.apply

    # (i) the converted state holds the source's values, leaf for leaf (transposed for Equinox)
    assert jax.tree_util.tree_structure(state_b.opt_state, is_leaf=_is_params_node) == jax.tree_util.tree_structure(
        fresh_b.opt_state, is_leaf=_is_params_node
    )
    assert_trees_equal(as_dict(state_b.params), as_dict(state_a.params))
    assert_trees_equal(as_dict(state_b.opt_state), as_dict(state_a.opt_state))
    assert len(jax.tree_util.tree_leaves(state_a.opt_state)) > 3
    if name == "freeze":
        leaves = jax.tree_util.tree_leaves(as_dict(state_b.opt_state), is_leaf=_is_masked)
        assert sum(map(_is_masked, leaves)) == 2 * 4  # mu and nu of the encoder's 2 kernels and 2 biases

    # (ii) training goes on identically
    before = as_dict(state_a.params)
    for g in grads[2:]:  # 5 more
        states = update(name, {a: state_a, b: state_b}, g)
        state_a, state_b = states[a], states[b]
    after_a, after_b = as_dict(state_a.params), as_dict(state_b.params)
    if {a, b} == {"functional", "flax"}:
        assert_trees_equal(after_b, after_a)
    else:
        assert_trees_close(after_b, after_a, atol=1e-6)
    assert max_change(after_a, before) > 1e-3
    if name == "freeze":
        assert_trees_equal(after_a["encoder"], params["encoder"])
        assert_trees_equal(after_b["encoder"], params["encoder"])


def _loss(apply):
    """The tutorial's loss through ``apply``."""

    def loss(p, x, c, k):
        recon, mean, logvar = apply(p, x, c, k)
        return vae_loss(recon, x, mean, logvar)[0]

    return loss


@functools.cache
def train_steps():
    """One step of a Flax TrainState (through FLAX_VAE.apply) and of a functional one (through
    vae.apply): ``jax.grad`` of the loss, then the optimiser; jitted together, one compile."""
    flax_loss = _loss(FLAX_VAE.apply)
    func_loss = _loss(lambda p, x, c, k: vae.apply(p, x, c, k, CFG))
    tx = optimizer("adamw", "functional")

    def steps(flax_state, state, x, c, k):
        loss_x, grads_x = jax.value_and_grad(flax_loss)(flax_state.params, x, c, k)
        loss_f, grads_f = jax.value_and_grad(func_loss)(state.params, x, c, k)
        return loss_x, flax_state.apply_gradients(grads=grads_x), loss_f, state.apply_gradients(grads=grads_f, tx=tx)

    return fast_jit(steps)


def test_flax_train_state_continues_identically_in_the_functional_form():
    """The key scenario: a Flax TrainState half-way through training, carried on with vae.apply."""
    variables = flax_variables(80)
    tx = optimizer("adamw", "flax")  # OptimConfig(lr=1e-2): adamw
    flax_state = FlaxTrainState.create(apply_fn=FLAX_VAE.apply, params=variables, tx=tx)
    flax_state = flax_state.replace(step=jnp.zeros((), jnp.int32))
    batches = [(*inputs(10 + i), key(200 + i)) for i in range(8)]
    idle = TrainState.create(functional_params(81), tx)  # stepped alongside, unused
    for x, c, k in batches[:3]:
        _, flax_state, _, idle = train_steps()(flax_state, idle, x, c, k)

    state = convert.to_functional(flax_state)
    assert isinstance(state, TrainState)
    assert int(state.step) == 3 and state.step.dtype == jnp.int32
    assert_trees_equal(state.params, flax_state.params["params"])
    assert_trees_equal(as_dict(state.opt_state), as_dict(flax_state.opt_state))
    start = state.params

    for x, c, k in batches[3:]:
        loss_x, flax_state, loss_f, state = train_steps()(flax_state, state, x, c, k)
        assert abs(float(loss_x) - float(loss_f)) <= 1e-5
        assert_trees_close(state.params, flax_state.params["params"], atol=1e-5)
    assert int(state.step) == int(flax_state.step) == 8
    assert max_change(state.params, start) > 1e-3

    # and back into the Flax TrainState, keeping its apply_fn and tx
    back = convert.from_functional(state, like=flax_state)
    assert back.apply_fn is flax_state.apply_fn and back.tx is flax_state.tx
    assert_trees_equal(back.params["params"], state.params)
    assert_trees_equal(as_dict(back.opt_state), as_dict(state.opt_state))


# ------------------------------------------------------------------ 5. loud mismatches


def _resized(params):
    bad = jax.tree_util.tree_map(lambda x: x, params)
    bad["encoder"]["Dense_0"] = {"kernel": jnp.zeros((20, 13)), "bias": jnp.zeros(13)}
    return bad


def test_wrong_shape_into_equinox_names_path_and_both_shapes(params, eqx_like):
    with pytest.raises(ConversionError) as err:
        convert.from_functional(_resized(params), like=eqx_like)
    msg = str(err.value)
    assert ".encoder.layers[0].weight" in msg or ".encoder.layers[0].bias" in msg
    assert "(20, 13)" in msg or "(13,)" in msg
    assert "(20, 12)" in msg or "(12, 20)" in msg or "(12,)" in msg


def test_wrong_shape_into_flax_names_path_and_both_shapes(params, flax_like):
    with pytest.raises(ConversionError) as err:
        convert.from_functional(_resized(params), like=flax_like)
    msg = str(err.value)
    assert "encoder" in msg and "Dense_0" in msg
    assert "(20, 13)" in msg or "(13,)" in msg
    assert "(20, 12)" in msg or "(12,)" in msg


@pytest.mark.parametrize("form", ["equinox", "flax", "functional"])
def test_missing_param_is_named(form, params, eqx_like, flax_like):
    bad = jax.tree_util.tree_map(lambda x: x, params)
    del bad["decoder"]["Dense_1"]["bias"]
    like = {"equinox": eqx_like, "flax": flax_like, "functional": params}[form]
    with pytest.raises(ConversionError, match="decoder/Dense_1/bias"):
        convert.from_functional(bad, like=like)


@pytest.mark.parametrize(
    "form",
    [
        "equinox",
        "flax",
        "functional",
    ],
)
def test_extra_params_in_the_source_are_named(form, params, eqx_like, flax_like):
    bad = dict(params, extra={"w": jnp.zeros(3)})
    like = {"equinox": eqx_like, "flax": flax_like, "functional": params}[form]
    with pytest.raises(ConversionError, match="extra"):
        convert.from_functional(bad, like=like)


@pytest.mark.parametrize("form", FORMS)
def test_different_optimisers_do_not_convert(form, params):
    adam = make_optimizer(OptimConfig(optimizer="adam"), 100)
    sgd = make_optimizer(OptimConfig(optimizer="sgd"), 100)
    source = convert.to_functional(TrainState.create(params, adam))
    p = in_form(form, params)
    with pytest.raises(ConversionError, match="optimiser states"):
        convert.from_functional(source, like=any_state(form, p, sgd))
    with pytest.raises(ConversionError, match="optimiser states"):  # and the other way round
        convert.from_functional(TrainState.create(params, sgd), like=any_state(form, p, adam))


@pytest.mark.parametrize("form", FORMS)
def test_train_state_and_params_are_not_confused(form, params):
    tx = optax.adam(1e-3)
    p = in_form(form, params)
    state = convert.to_functional(TrainState.create(params, tx))
    with pytest.raises(ConversionError, match="train state"):
        convert.from_functional(state, like=p)  # a TrainState where params are expected
    like_state = any_state(form, p, tx)
    with pytest.raises(ConversionError, match="train state"):
        convert.from_functional(params, like=like_state)  # params where a TrainState is expected


def _unsupported_model():
    """An Equinox layer without a Flax counterpart here (RMSNorm) before a Linear."""

    def build(k):
        return eqx.nn.Sequential([eqx.nn.RMSNorm(3), eqx.nn.Linear(3, 2, key=k)])

    return random_like(eqx.filter_eval_shape(build, key(0)), 90)


@pytest.mark.parametrize("call", ["to_functional", "from_functional", "param_names"])
def test_unsupported_equinox_layer_raises_with_its_path(call):
    model = _unsupported_model()
    run = {
        "to_functional": lambda: convert.to_functional(model),
        "from_functional": lambda: convert.from_functional(
            {"layers_1": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}, like=model
        ),
        "param_names": lambda: convert.param_names(model),
    }[call]
    with pytest.raises(ConversionError, match=r"\.layers\[0\]"):
        run()


def test_unsupported_equinox_layer_is_named():
    with pytest.raises(ConversionError, match="RMSNorm"):
        convert.to_functional(_unsupported_model())


# -------------------------------------------------------------------- 6. param_names


def test_param_names_equinox_and_flax(eqx_like, flax_like, params):
    eqx_names = convert.param_names(eqx_like)
    assert isinstance(eqx_names, equinox_models.VAE)
    assert eqx_names.encoder.layers[0].weight == "encoder/Dense_0/kernel"
    assert eqx_names.encoder.layers[0].bias == "encoder/Dense_0/bias"
    assert eqx_names.decoder.layers[1].weight == "decoder/Dense_1/kernel"
    assert eqx_names.class_proj.weight == "class_proj/kernel"

    flax_names = convert.param_names(flax_like)
    assert flax_names["params"]["encoder"]["Dense_0"]["kernel"] == "encoder/Dense_0/kernel"
    assert flax_names["params"]["pre_latent_proj"]["bias"] == "pre_latent_proj/bias"

    func_names = convert.param_names(params)
    assert func_names["decoder"]["Dense_0"]["kernel"] == "decoder/Dense_0/kernel"
    # every form names the same set of params
    expected = sorted(f"{p}/{leaf}" for p in LINEARS for leaf in ("kernel", "bias"))
    for names in (eqx_names, flax_names, func_names, convert.param_names(flax.core.freeze(flax_like))):
        assert sorted(jax.tree_util.tree_leaves(names)) == expected
