"""Flax NNX as the fourth form: the module, exact conversion of params and nnx.Optimizer state, migration."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.training.train_state import TrainState as FlaxTrainState

from pureflax import TrainState, vae
from pureflax.compat import ConversionError, flax_models, from_functional, migrate, nnx_models, to_functional
from pureflax.compat.backends import get_backend
from pureflax.optim import OptimConfig, make_optimizer

CFG = vae.VAEConfig(encoder_dimensions=(12, 8), decoder_dimensions=(8, 20), latent_dim=3, num_classes=4, input_dim=20)
SIZES = dict(latent_dim=3, encoder_dimensions=(12, 8), decoder_dimensions=(8, 20), num_classes=4, input_dim=20)
LINEN = flax_models.VAE(encoder_dimensions=(12, 8), decoder_dimensions=(8, 20), latent_dim=3)
X = jax.random.uniform(jax.random.PRNGKey(1), (5, 20))
C = jax.nn.one_hot(jnp.arange(5) % 4, 4)
NOISE = jax.random.PRNGKey(2)


def leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    return all(x.dtype == y.dtype and (np.asarray(x) == np.asarray(y)).all() for x, y in zip(la, lb, strict=True))


def max_diff(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def nnx_vae(seed=0):
    return nnx_models.VAE(**SIZES, rngs=nnx.Rngs(seed))


def test_the_tutorials_linen_params_go_to_nnx_to_functional_to_linen_bit_for_bit_with_equal_outputs():
    variables = LINEN.init(jax.random.PRNGKey(0), X, C, NOISE)  # the tutorial's own init
    model = migrate(variables, nnx_vae(7))  # Linen -> NNX in one call
    assert isinstance(model, nnx_models.VAE)
    assert (np.asarray(model.encoder.layers[0].kernel[...]) == np.asarray(variables["params"]["encoder"]["Dense_0"]["kernel"])).all()
    functional = to_functional(model)
    assert leaves_equal(functional, variables["params"])
    back = from_functional(functional, like=variables)
    assert leaves_equal(back, variables)
    want = LINEN.apply(variables, X, C, NOISE)
    for got in (model(X, C, NOISE), vae.apply(functional, X, C, NOISE, config=CFG), LINEN.apply(back, X, C, NOISE)):
        for a, b in zip(got, want, strict=True):
            assert (np.asarray(a) == np.asarray(b)).all()  # nnx.Linear computes what linen.Dense does


def test_conversion_leaves_the_like_module_untouched():
    like = nnx_vae(3)
    before = jax.tree_util.tree_map(np.array, to_functional(like))
    from_functional(vae.init(jax.random.PRNGKey(0), CFG), like=like)
    assert leaves_equal(to_functional(like), before)


@nnx.jit
def nnx_update(model, optimizer, grads):
    optimizer.update(model, grads)


def nnx_grads(model, functional_grads):
    """``functional_grads`` as NNX gradients of ``model`` (what ``nnx.grad`` returns: a State of Params)."""
    return nnx.state(from_functional(functional_grads, like=model), nnx.Param)


def grads(seed):
    tree = jax.eval_shape(lambda: vae.init(jax.random.PRNGKey(0), CFG))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), tree)


def test_a_pair_updated_3_times_converts_and_continues_like_6_nnx_updates():
    tx = optax.adamw(1e-2)
    start = vae.init(jax.random.PRNGKey(0), CFG)
    gs = [grads(i) for i in range(6)]

    model = from_functional(start, like=nnx_vae())
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    for g in gs[:3]:
        nnx_update(model, optimizer, nnx_grads(model, g))
    state = to_functional((model, optimizer))
    assert isinstance(state, TrainState) and state.step.dtype == jnp.int32 and int(state.step) == 3
    # the pair back from its functional form continues exactly
    model_b, optimizer_b = from_functional(state, like=(nnx_vae(9), nnx.Optimizer(nnx_vae(9), tx, wrt=nnx.Param)))
    assert optimizer_b.step[...].dtype == jnp.uint32 and int(optimizer_b.step[...]) == 3
    assert leaves_equal(to_functional((model_b, optimizer_b)), state)

    step = jax.jit(lambda s, g: s.apply_gradients(grads=g, tx=tx))
    for g in gs[3:]:
        state = step(state, g)
        nnx_update(model, optimizer, nnx_grads(model, g))
        nnx_update(model_b, optimizer_b, nnx_grads(model_b, g))
    six = to_functional((model, optimizer))
    assert int(six.step) == 6
    assert max_diff(state, six) <= 1e-6
    assert leaves_equal(to_functional((model_b, optimizer_b)), six)
    assert max_diff(six.params, start) > 1e-3  # it trained


OPTIMIZERS = {
    "adamw": OptimConfig(lr=1e-2),
    "warmup_schedule": OptimConfig(schedule="warmup", warmup_steps=2, lr=1e-2),
    "adam_ema": OptimConfig(optimizer="adam", ema=0.9, lr=1e-2),
    "multisteps": OptimConfig(grad_accum=3, lr=1e-2),
    "clip_adamw": OptimConfig(clip_norm=1.0, lr=1e-2),
    "freeze": OptimConfig(freeze=("encoder",), lr=1e-2),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimiser_state_the_project_builds_converts_both_ways_and_trains_on(name):
    config = OPTIMIZERS[name]
    functional_tx = make_optimizer(config, 20, jax.eval_shape(lambda: vae.init(jax.random.PRNGKey(0), CFG)))
    state = TrainState.create(vae.init(jax.random.PRNGKey(0), CFG), functional_tx)
    step = jax.jit(lambda s, g: s.apply_gradients(grads=g, tx=functional_tx))
    for i in range(2):  # MultiSteps mid-accumulation
        state = step(state, grads(i))

    model = nnx_vae(4)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    from pureflax.compat.convert import param_names

    nnx_tx = make_optimizer(config, 20, params, param_names(params))  # built from NNX's own params, as a user would
    model_b, optimizer_b = from_functional(state, like=(model, nnx.Optimizer(model, nnx_tx, wrt=nnx.Param)))
    assert leaves_equal(to_functional((model_b, optimizer_b)), state)
    if name == "freeze":
        masked = jax.tree_util.tree_leaves(nnx.as_pure(optimizer_b.opt_state), is_leaf=lambda x: isinstance(x, optax.MaskedNode))
        assert sum(isinstance(x, optax.MaskedNode) for x in masked) == 2 * 4  # mu, nu of the encoder's 4 arrays
    for i in range(2, 5):
        state = step(state, grads(i))
        nnx_update(model_b, optimizer_b, nnx_grads(model_b, grads(i)))
    assert max_diff(to_functional((model_b, optimizer_b)), state) <= 1e-6


def test_a_model_that_does_not_fit_names_the_path_and_both_shapes():
    other = nnx_models.VAE(**{**SIZES, "latent_dim": 5}, rngs=nnx.Rngs(0))
    with pytest.raises(ConversionError, match=r"\['post_latent_proj'\]\['kernel'\]: source shape \(3, 8\) does not match target shape \(5, 8\)"):
        from_functional(vae.init(jax.random.PRNGKey(0), CFG), like=other)
    wrong_dtype = jax.tree_util.tree_map(lambda a: a.astype(jnp.float16), vae.init(jax.random.PRNGKey(0), CFG))
    with pytest.raises(ConversionError, match="float16"):
        from_functional(wrong_dtype, like=nnx_vae())


def test_migrating_the_tutorials_orbax_checkpoints_to_nnx_and_back(tmp_path):
    variables = LINEN.init(jax.random.PRNGKey(0), X, C, NOISE)
    tx = optax.adam(1e-3)
    state = FlaxTrainState.create(apply_fn=LINEN.apply, params=variables["params"], tx=tx)
    g = jax.grad(lambda p: jnp.sum(LINEN.apply({"params": p}, X, C, NOISE)[0] ** 2))(state.params)
    state = state.apply_gradients(grads=g)
    with ocp.PyTreeCheckpointer() as checkpointer:  # as the tutorial writes them
        checkpointer.save((tmp_path / "params").absolute(), variables["params"])
        checkpointer.save((tmp_path / "state").absolute(), state)

    model = migrate(tmp_path / "params", nnx_vae())
    assert leaves_equal(to_functional(model), variables["params"])
    model, optimizer = migrate(tmp_path / "state", (nnx_vae(), nnx.Optimizer(nnx_vae(), tx, wrt=nnx.Param)))
    assert int(optimizer.step[...]) == 1
    assert leaves_equal(to_functional((model, optimizer)), to_functional(state))
    back = migrate((model, optimizer), state)  # and NNX -> Linen's TrainState, its apply_fn and tx kept
    assert isinstance(back, FlaxTrainState) and back.tx is tx
    assert leaves_equal(to_functional(back), to_functional(state))
    with pytest.raises(ValueError, match="holds a train state"):
        migrate(tmp_path / "state", nnx_vae())


def test_the_nnx_backend_trains_on_the_functional_init_and_its_native_init_is_nnx_linears():
    backend = get_backend("nnx", CFG)
    params = backend.init_params(jax.random.PRNGKey(0), False)
    assert leaves_equal(to_functional(params), vae.init(jax.random.PRNGKey(0), CFG))
    native = backend.init_params(jax.random.PRNGKey(0), True)
    own = nnx_models.VAE(**SIZES, rngs=nnx.Rngs(params=jax.random.PRNGKey(0)))
    assert leaves_equal(to_functional(native), to_functional(own))
    assert not leaves_equal(to_functional(native), to_functional(params))  # another stream: other numbers
    (recon, mean, logvar), _ = jax.jit(backend.apply)(params, {}, X, C, NOISE)
    assert recon.shape == (5, 20) and mean.shape == (5, 3)


def test_functional_nnx_equinox_linen_nnx_functional_is_bit_for_bit():
    from pureflax.compat import equinox_models

    start = vae.init(jax.random.PRNGKey(0), CFG)
    model = from_functional(start, like=nnx_vae(1))
    eqx_model = migrate(model, like=equinox_models.VAE(**SIZES, key=jax.random.PRNGKey(2)))  # weight = kernel.T, exact
    variables = migrate(eqx_model, like=LINEN.init(jax.random.PRNGKey(3), X, C, NOISE))
    again = migrate(variables, like=nnx_vae(4))
    assert leaves_equal(to_functional(again), start)
    assert (np.asarray(eqx_model.encoder.layers[0].weight) == np.asarray(start["encoder"]["Dense_0"]["kernel"]).T).all()


def test_a_state_of_nnx_variables_converts_as_its_pure_arrays():
    model = nnx_vae(2)
    boxed = nnx.state(model, nnx.Param)  # what nnx.state and nnx.split hand out: Param boxes
    assert leaves_equal(to_functional(boxed), to_functional(model))
    filled = from_functional(vae.init(jax.random.PRNGKey(0), CFG), like=boxed)
    assert leaves_equal(to_functional(filled), vae.init(jax.random.PRNGKey(0), CFG))


def test_a_pair_whose_optimiser_trains_part_of_the_model_round_trips():
    wrt = nnx.All(nnx.Param, nnx.PathContains("encoder"))
    model = from_functional(vae.init(jax.random.PRNGKey(0), CFG), like=nnx_vae())
    state = to_functional((model, nnx.Optimizer(model, optax.adam(1e-3), wrt=wrt)))
    assert set(state.params) == set(vae.init(jax.random.PRNGKey(0), CFG))  # every param, not only the trained ones
    other = nnx_vae(5)
    model_b, optimizer_b = from_functional(state, like=(other, nnx.Optimizer(other, optax.adam(1e-3), wrt=wrt)))
    assert leaves_equal(to_functional((model_b, optimizer_b)), state)
