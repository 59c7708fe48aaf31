"""A trained run in any form in one call (pureflax.compat.load), and in each library's own file format."""

import shutil

import jax
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState as FlaxTrainState

from pureflax import TrainState, checkpoint, optim, step as step_lib, train, vae
from flax import nnx

from pureflax.compat import ConversionError, equinox_models, from_functional, load, nnx_models, parity, to_functional, trained
from pureflax.compat.backends import get_backend
from tiny import load_script, tiny_mnist

# Not the defaults anywhere: load must take every size (and the activation) from the run.
CONFIG = vae.VAEConfig(encoder_dimensions=(24, 12), decoder_dimensions=(12, 784), latent_dim=3, activation="gelu")
FORMS = parity.NAMES
BATCH = parity.random_batch(jax.random.PRNGKey(3), 8, CONFIG)
NOISE = jax.random.PRNGKey(7)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 12-step Flax run with a warmup schedule, checkpointed at steps 6 and 12."""
    out = tmp_path_factory.mktemp("trained") / "run"
    config = train.TrainConfig(epochs=2, batch_size=8, log_every=6, ckpt_every=6, model=CONFIG, pictures=False,
                               optim=optim.OptimConfig(schedule="warmup", warmup_steps=4, lr=1e-3))
    train.fit(config, tiny_mnist(n_train=48, n_test=8), out, backend=get_backend("flax", CONFIG), progress=False)
    assert checkpoint.all_steps(out / "checkpoints") == [6, 12]
    return out


def forward(form, params):
    x, c = step_lib.to_inputs(BATCH, CONFIG.num_classes)
    if form == "nnx":  # the module itself, as NNX users call it
        return params(x, c, NOISE)
    return get_backend(form, CONFIG).apply(params, {}, x, c, NOISE)[0]


def assert_same_forward(form, params, want):
    for a, b in zip(forward(form, params), want, strict=True):
        if form == "equinox":  # eqx.nn.Linear sums in another order: float rounding
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
        else:
            assert (np.asarray(a) == np.asarray(b)).all(), form


def test_load_gives_the_saved_params_in_every_form(run):
    saved = checkpoint.restore_raw(run / "checkpoints", 12)["params"]
    params = load(run)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(saved)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(saved), strict=True):
        assert a.dtype == b.dtype and (np.asarray(a) == np.asarray(b)).all()
    model, variables = load(run, "equinox"), load(run, "flax")
    assert isinstance(model, equinox_models.VAE) and set(variables) == {"params"}
    want = forward("functional", params)
    assert_same_forward("flax", variables, want)
    assert_same_forward("equinox", model, want)
    module = load(run, "nnx")
    assert isinstance(module, nnx_models.VAE)
    assert_same_forward("nnx", module, want)
    # an earlier step, and the checkpoints/ folder itself
    earlier = load(run / "checkpoints", "flax", step=6)
    assert not (np.asarray(earlier["params"]["class_proj"]["kernel"]) == np.asarray(params["class_proj"]["kernel"])).all()


def test_load_state_is_ready_to_train_in_every_form(run):
    functional = load(run, state=True)
    assert isinstance(functional, TrainState) and int(functional.step) == 12
    eqx_state, flax_state = load(run, "equinox", state=True), load(run, "flax", state=True)
    assert isinstance(eqx_state.params, equinox_models.VAE) and isinstance(flax_state, FlaxTrainState)
    for other in (eqx_state, flax_state):  # params and optimiser state are the saved ones
        for a, b in zip(jax.tree_util.tree_leaves(to_functional(other)), jax.tree_util.tree_leaves(functional), strict=True):
            assert (np.asarray(a) == np.asarray(b)).all()
    # Flax's TrainState carries the run's optimiser (warmup over the run's 12 steps): one more
    # step with it is the step the run's own optimiser takes.
    config = trained.open_checkpoint(run).config
    tx = optim.make_optimizer(config.optim, 12, functional.params)
    grads = jax.tree_util.tree_map(lambda p: 0.01 * np.ones(p.shape, p.dtype), functional.params)
    want = functional.apply_gradients(grads=grads, tx=tx)
    got = to_functional(flax_state.apply_gradients(grads={"params": grads}))
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    assert flax_state.apply_fn is not None
    # NNX: the (model, nnx.Optimizer) pair, its optimiser the run's (the same step from the same state)
    model, optimizer = load(run, "nnx", state=True)
    assert isinstance(model, nnx_models.VAE) and isinstance(optimizer, nnx.Optimizer)
    assert int(optimizer.step[...]) == 12
    optimizer.update(model, nnx.state(from_functional(grads, like=model), nnx.Param))
    for a, b in zip(jax.tree_util.tree_leaves(to_functional((model, optimizer))), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_latest_damaged_step_is_skipped_and_never_touched(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "run")
    for path in (copy / "checkpoints" / "12" / "state").rglob("*"):
        if path.is_file():
            path.unlink()
    assert int(load(copy, state=True).step) == 6
    assert (copy / "checkpoints" / "12").is_dir()  # read-only: nothing renamed
    with pytest.raises(ValueError, match="checkpoint step 12"):
        load(copy, step=12)


@pytest.mark.parametrize(
    "call, named",
    [
        (lambda run: load(run.parent / "nowhere"), "nowhere: no such folder"),
        (lambda run: load(run.parent), "holds no checkpoint"),
        (lambda run: load(run, "jax"), "unknown form 'jax'; choose one of functional, equinox, flax, nnx"),
        (lambda run: load(run, step=7), r"step 7: not a checkpoint in .* \(steps: 6, 12\)"),
    ],
    ids=["missing", "no-checkpoints", "form", "step"],
)
def test_bad_arguments_are_value_errors_naming_them(run, call, named):
    with pytest.raises(ValueError, match=named):
        call(run)


def test_a_checkpoint_without_recorded_settings_is_sized_from_its_arrays(tmp_path):
    config = vae.VAEConfig(encoder_dimensions=(10, 6), decoder_dimensions=(6, 784), latent_dim=2)
    params = jax.jit(lambda k: vae.init(k, config))(jax.random.PRNGKey(0))
    checkpoint.save(tmp_path, TrainState.create(params, optax.adamw(1e-4)))  # no settings: saved by the library, not by a run
    model = load(tmp_path, "equinox")
    assert model.latent_dim == 2 and model.encoder.layers[0].weight.shape == (10, 784)
    np.testing.assert_array_equal(model.encoder.layers[0].weight, np.asarray(params["encoder"]["Dense_0"]["kernel"]).T)


@pytest.mark.parametrize("form", ["functional", "equinox", "flax", "nnx"])
def test_a_saved_array_that_does_not_fit_the_recorded_model_names_its_path(run, tmp_path, monkeypatch, form):
    copy = shutil.copytree(run, tmp_path / "run")
    recorded = trained.open_checkpoint(copy)
    wrong = recorded._replace(config=train.TrainConfig(model=vae.VAEConfig(latent_dim=5)))
    monkeypatch.setattr(trained, "_checkpoint", lambda directory, step: wrong)
    # every form, the functional one too, checks the saved arrays against the recorded model first
    with pytest.raises(checkpoint.ShapeMismatch, match=r"checkpoint step 12: params/\S+ was saved with shape \([\d, ]+\) but this model has"):
        load(copy, form)


@pytest.mark.parametrize("form, name", [("equinox", "vae.eqx"), ("flax", "vae.msgpack"), ("nnx", "vae_nnx"),
                                        ("functional", "vae.safetensors"), ("functional", "vae.npz")])
def test_convert_writes_the_librarys_own_format_and_prints_how_to_load_it(run, tmp_path, capsys, form, name):
    target = tmp_path / name
    assert load_script("checkpoints").main(["convert", str(run), "--to", form, str(target), "--step", "6"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote step 6 of {run / 'checkpoints'} as {form} to {target}" in printed
    code = printed.split("load it with:\n\n", 1)[1]
    namespace = {}
    exec(code, namespace)  # the printed lines, with the library's own loader
    loaded = {"equinox": "model", "flax": "variables", "functional": "params", "nnx": "model"}[form]
    if form == "equinox":
        assert "eqx.tree_deserialise_leaves(" in code
    if form == "flax":
        assert "serialization.from_bytes(" in code
    if form == "nnx":  # the NNX checkpointing guide's way: an orbax checkpoint of the pure dict
        assert "nnx.replace_by_pure_dict(" in code and "nnx.merge(" in code
    assert_same_forward(form, namespace[loaded], forward("functional", load(run, step=6)))


@pytest.mark.parametrize(
    "args, named",
    [(["--to", "flax", "x.eqx"], "x.eqx: the flax form is written as .msgpack"),
     (["--to", "jax", "x.eqx"], "unknown form 'jax'"),
     (["--to", "equinox", "missing/x.eqx"], "the folder missing does not exist"),
     (["--to", "equinox", "x.eqx", "--step", "5"], "--step 5: not a checkpoint")],
)
def test_convert_refuses_bad_arguments_in_one_line(run, tmp_path, capsys, monkeypatch, args, named):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        load_script("checkpoints").main(["convert", str(run), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and named in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_exported_params_read_back_nested_and_exact(run, tmp_path):
    for name in ("p.npz", "p.safetensors"):
        assert load_script("checkpoints").main(["export", str(run), str(tmp_path / name)]) == 0
        back = checkpoint.read_params(tmp_path / name)
        want = load(run)
        assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(want)
        for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)
