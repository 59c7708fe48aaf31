"""The convolutional VAE: the same numbers in every form, its BatchNorm state through the one step.

Small sizes (4 and 8 channels, latent 4) where size adds nothing; the runs are shared by the
tests of this file (one ``fit`` per form).
"""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pureflax.flags import as_flags
from tiny import tiny_mnist

from pureflax import checkpoint, convvae, models, rundir, step as step_lib, train, vae
from pureflax.compat import convert, equinox_models, flax_models, load, nnx_models
from pureflax.compat.backends import BACKENDS, get_backend
from pureflax.state import TrainState

CONFIG = convvae.ConvVAEConfig(features=(4, 8), latent_dim=4)
FORMS = tuple(BACKENDS)


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.fixture(scope="module")
def inputs():
    x = jax.random.uniform(jax.random.key(5), (3, 784))
    c = jax.nn.one_hot(jnp.array([1, 2, 3]), 10)
    return x, c, jax.random.key(2)


@pytest.fixture(scope="module")
def functional():
    return models.of(CONFIG).init(jax.random.key(0)), models.of(CONFIG).init_state()


def test_init_is_linens_bit_for_bit(functional, inputs):
    params, model_state = functional
    x, c, key = inputs
    linen = flax_models.ConvVAE(features=CONFIG.features, latent_dim=CONFIG.latent_dim)
    variables = jax.jit(linen.init)(jax.random.key(0), x, c, key)  # one compiled program, as convvae.init is
    assert jax.tree.structure(variables["params"]) == jax.tree.structure(params)
    assert _max_diff(variables["params"], params) == 0.0
    assert _max_diff(variables["batch_stats"], model_state) == 0.0
    assert float(model_state["encoder"]["norm_0"]["var"].min()) == 1.0


@pytest.mark.parametrize("form", FORMS)
def test_every_form_gives_the_functional_forward_pass_and_running_statistics(form, functional, inputs):
    params, model_state = functional
    x, c, key = inputs
    reference = jax.jit(models.of(CONFIG).apply, static_argnames="train")
    (want, want_state) = reference(params, model_state, x, c, key, train=True)
    backend = get_backend(form, CONFIG)
    form_params, form_state = backend.init_params(jax.random.key(0), False), backend.init_model_state()
    apply = jax.jit(backend.apply, static_argnames="train")
    out, new_state = apply(form_params, form_state, x, c, key, train=True)
    assert _max_diff(out, want) <= 1e-5
    got_state = convert.state_to_functional(new_state, form_params)
    assert _max_diff(got_state, want_state) <= 1e-6
    # inference mode: the running statistics, unchanged
    eval_want, kept = reference(params, want_state, x, c, key, train=False)
    eval_out, eval_state = apply(form_params, new_state, x, c, key, train=False)
    assert _max_diff(eval_out, eval_want) <= 1e-5
    assert _max_diff(convert.state_to_functional(eval_state, form_params), kept) <= 1e-6
    assert _max_diff(eval_want, want) > 1e-3  # the two modes differ: the test can tell them apart


def _functional_grads(backend, batch) -> dict:
    loss_fn = step_lib.make_loss_fn(backend.apply)
    params = backend.init_params(jax.random.key(0), False)
    grads, _ = jax.jit(jax.grad(loss_fn, has_aux=True))(params, batch, jax.random.key(3), backend.init_model_state())
    return convert.to_functional(grads)


@pytest.fixture(scope="module")
def grad_batch():
    return step_lib.Batch(jnp.asarray(tiny_mnist(4, 0).train.images), jnp.arange(4, dtype=jnp.int32))


@pytest.fixture(scope="module")
def functional_grads(grad_batch):
    return _functional_grads(get_backend("functional", CONFIG), grad_batch)


@pytest.mark.parametrize("form", [f for f in FORMS if f != "functional"])
def test_every_form_has_the_functional_gradients(form, functional_grads, grad_batch):
    grads = _functional_grads(get_backend(form, CONFIG), grad_batch)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(functional_grads))
    assert _max_diff(grads, functional_grads) <= 1e-5 * max(1.0, scale)
    assert scale > 0.0


# --------------------------------------------------------------------- runs of every form

RUN = train.TrainConfig(epochs=2, batch_size=16, log_every=3, eval_batch_size=30, model=CONFIG, fuse=True)  # per step: below


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every form trained 12 steps (2 epochs of the tiny set) by ``train.fit``."""
    done = {}
    for form in FORMS:
        out = tmp_path_factory.mktemp(f"conv-{form}")
        config = dataclasses.replace(RUN, pictures=form == "functional")  # the pictures go through the functional form
        result = train.fit(config, tiny_mnist(), out, backend=get_backend(form, CONFIG), progress=False, log=lambda _: None)
        done[form] = (out, result)
    return done


def test_a_fit_of_every_form_logs_the_same_losses_and_ends_with_the_same_statistics(runs):
    out, reference = runs["functional"]
    for name in ("samples.png", "reconstructions.png", "loss.png"):  # drawn with BatchNorm's running statistics
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    losses = np.array([[row[k] for k in ("loss", "mse", "kl")] for row in reference.log])
    reference_state = get_backend("functional", CONFIG).to_functional(reference.state)
    for form, (_, result) in runs.items():
        got = np.array([[row[k] for k in ("loss", "mse", "kl")] for row in result.log])
        assert got.shape == losses.shape == (4, 3)
        assert np.max(np.abs(got - losses) / np.abs(losses)) <= 1e-3, form
        functional_state = get_backend(form, CONFIG).to_functional(result.state)
        assert _max_diff(functional_state.model_state, reference_state.model_state) <= 1e-4, form
        assert abs(result.final["test_loss"] - reference.final["test_loss"]) <= 1e-3 * reference.final["test_loss"], form
    # the statistics moved: the step stored what BatchNorm returned
    assert float(jnp.abs(reference_state.model_state["encoder"]["norm_0"]["mean"]).max()) > 0.0


def test_a_resumed_conv_run_restores_its_statistics_and_ends_where_the_straight_run_ends(runs, tmp_path):
    out = tmp_path / "resumed"
    half = dataclasses.replace(RUN, max_steps=6, pictures=False)
    train.fit(half, tiny_mnist(), out, progress=False, log=lambda _: None)
    saved = checkpoint.restore_raw(out / "checkpoints", 6)
    assert set(saved) == {"step", "params", "opt_state", "model_state"}
    # resumed one step per dispatch (--no-fuse): the per-step loop threads the statistics too
    resumed = train.fit(dataclasses.replace(RUN, fuse=False, pictures=False), tiny_mnist(), out, progress=False, resume=True, log=lambda _: None)
    _, straight = runs["functional"]
    assert [row["loss"] for row in resumed.log[:2]] == [row["loss"] for row in straight.log[:2]]  # restored, not re-run
    np.testing.assert_allclose([row["loss"] for row in resumed.log], [row["loss"] for row in straight.log], rtol=1e-6)
    assert _max_diff(resumed.state.model_state, straight.state.model_state) <= 1e-6


@pytest.mark.parametrize("form", FORMS)
def test_load_gives_each_form_with_its_statistics(form, runs, inputs):
    out, result = runs[form]
    x, c, key = inputs
    reference = jax.jit(partial(models.of(CONFIG).apply, train=False))
    saved = get_backend(form, CONFIG).to_functional(result.state)
    want, _ = reference(saved.params, saved.model_state, x, c, key)
    loaded = load(out, form)
    if form == "functional":  # (params, model_state)
        got, _ = reference(*loaded, x, c, key)
    elif form == "equinox":  # (model, eqx.nn.State), as eqx.nn.make_with_state returns them
        got, _ = jax.jit(partial(equinox_models.batched_apply_stateful, train=False))(*loaded, x, c, key)
    elif form == "flax":  # {'params', 'batch_stats'}
        got = flax_models.ConvVAE(features=CONFIG.features, latent_dim=CONFIG.latent_dim).apply(loaded, x, c, key, train=False)
    else:  # an nnx.Module holding its nnx.BatchStat
        got = loaded(x, c, key, train=False)
    assert _max_diff(got, want) <= 1e-5
    # the train state too: optimiser state and statistics, ready to continue
    restored = convert.to_functional(load(out, form, state=True))
    assert _max_diff((restored.params, restored.opt_state, restored.model_state),
                     (saved.params, saved.opt_state, saved.model_state)) == 0.0


# ------------------------------------------------------------------ old checkpoints, settings


def test_an_mlp_checkpoint_holds_exactly_step_params_and_opt_state(tmp_path):
    """A model without state saves no model_state item, and restores into a TrainState whose model_state is {}."""
    config = vae.VAEConfig(latent_dim=2, encoder_dimensions=(8,), decoder_dimensions=(8, 784))
    tx = optax.adam(1e-3)
    state = TrainState.create(vae.init(jax.random.key(0), config), tx)
    checkpoint.save(tmp_path / "now", state)
    assert set(checkpoint.restore_raw(tmp_path / "now")) == {"step", "params", "opt_state"}
    restored = checkpoint.restore(tmp_path / "now", TrainState.create(vae.init(jax.random.key(1), config), tx))
    assert restored.model_state == {}
    assert _max_diff(restored.params, state.params) == 0.0


def test_resuming_with_another_model_is_refused_in_one_line_naming_the_flag():
    mlp = rundir.settings_of(train.TrainConfig(), "functional", "data")
    conv = rundir.settings_of(train.TrainConfig(model=convvae.ConvVAEConfig()), "functional", "data")
    refused, _ = rundir.compare_settings(mlp, conv)
    assert [as_flags(line) for line in refused] == [
        "--resume: --model conv differs from the run's --model mlp (the saved params are that model's); "
        "resume with --model mlp, or start a new run in another --out"
    ]
    assert train.TrainConfig.from_settings(conv).model == convvae.ConvVAEConfig()
    assert train.TrainConfig.from_settings(mlp).model == vae.VAEConfig()


@pytest.mark.parametrize("form,name,result", [("functional", "m.safetensors", "variables"), ("equinox", "m.eqx", ("model", "state")),
                                              ("flax", "m.msgpack", "variables"), ("nnx", "m_nnx", "model")])
def test_each_file_format_of_a_conv_run_reads_back_with_the_printed_code(form, name, result, runs, tmp_path):
    from pureflax.compat import trained

    out, _ = runs["functional"]
    _, code = trained.convert_run(out, form, tmp_path / name)
    namespace: dict = {}
    exec(code, namespace)  # the library's own loader, as printed
    got = tuple(namespace[k] for k in result) if isinstance(result, tuple) else namespace[result]
    want = load(out, form)
    if form == "functional":
        want = {"params": want[0], "model_state": want[1]}
    if form == "nnx":
        from flax import nnx

        got, want = nnx.state(got), nnx.state(want)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert _max_diff(got, want) == 0.0


def test_migrate_moves_the_conv_vae_with_its_statistics_between_equinox_and_nnx(runs, inputs):
    """The layers' settings are checked (padding as lax receives it, eps, momentum) and agree."""
    from flax import nnx

    from pureflax.compat import migrate
    from pureflax.compat.backends import conv_sizes

    out, _ = runs["equinox"]
    source = load(out, "equinox")  # (model, eqx.nn.State)
    like = nnx.eval_shape(lambda: nnx_models.ConvVAE(**conv_sizes(CONFIG), rngs=nnx.Rngs(0)))
    moved = migrate(source, like)
    x, c, key = inputs
    want, _ = equinox_models.batched_apply_stateful(*source, x, c, key, train=False)
    assert _max_diff(moved(x, c, key, train=False), want) <= 1e-5
    back = migrate(moved, source)
    assert _max_diff(back, source) == 0.0


def test_train_py_offers_the_librarys_models_and_backends():
    from tiny import load_script

    parser = load_script("train").build_parser()
    offered = {action.dest: action.choices for action in parser._actions}
    assert tuple(offered["model"]) == tuple(models.KINDS) and tuple(offered["backend"]) == tuple(BACKENDS)


def test_a_flax_state_with_batch_stats_is_not_saved_without_them(runs, tmp_path):
    _, result = runs["flax"]
    with pytest.raises(ValueError, match="batch_stats"):
        checkpoint.save(tmp_path / "c", result.state)
    checkpoint.save(tmp_path / "c", convert.to_functional(result.state))
    assert "model_state" in checkpoint.restore_raw(tmp_path / "c")


def test_checkpoints_show_lists_the_running_statistics(runs, capsys):
    from tiny import load_script

    out, _ = runs["functional"]
    assert load_script("checkpoints").main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "model_state: 4 arrays, 16 values" in shown and "encoder/norm_0/var" in shown
