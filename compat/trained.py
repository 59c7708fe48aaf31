"""A trained run in any form, in one call, and in each library's own file format.

:func:`load` reads a run's checkpoint (any backend wrote it: checkpoints are functional)
and rebuilds the model from the settings the run recorded, so no sizes are passed:

* ``form="functional"``: the params dict (``{'encoder': {'Dense_0': {'kernel': ...}}, ...}``);
* ``form="equinox"``: an :class:`pureflax.compat.equinox_models.VAE`;
* ``form="flax"``: Flax variables ``{'params': ...}`` for :class:`pureflax.compat.flax_models.VAE`;
* ``form="nnx"``: an :class:`pureflax.compat.nnx_models.VAE` (a Flax NNX module).

With ``state=True`` it returns the train state in that form instead, optimiser state included,
ready to train on: a :class:`pureflax.TrainState` (functional, Equinox), Flax's own
``TrainState`` with ``apply_fn`` and ``tx`` rebuilt from the run's settings, or for NNX the
``(model, nnx.Optimizer)`` pair.

:func:`save_file` writes a model in its library's format (``.eqx`` through
``eqx.tree_serialise_leaves``, ``.msgpack`` through ``flax.serialization.to_bytes``,
``.safetensors``/``.npz`` keyed by functional path, and for NNX an orbax checkpoint folder of
``nnx.state(model)`` as a pure dict, as the NNX checkpointing guide writes one) and :func:`loader_code` gives the lines of
Python that read it back with that library's own loader.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from pureflax import checkpoint, convvae, models, train, vae
from pureflax.compat import convert
from pureflax.compat.backends import BACKENDS, conv_sizes, get_backend

# Each form's file format: the suffixes it writes, first the default.
SUFFIXES = {"functional": checkpoint.PARAM_FILES, "equinox": (".eqx",), "flax": (".msgpack",), "nnx": ("",)}
# A run folder holds the checkpoints here (scripts/train.py --out).
CHECKPOINTS = "checkpoints"
class Checkpoint(NamedTuple):
    """One step of a run, and what the run recorded about itself."""

    directory: Path  # the run's checkpoints/ folder
    step: int
    config: train.TrainConfig  # rebuilt from the recorded settings (defaults where none were recorded)
    total_steps: int  # the run's length, which the optimiser's schedule was built for


def checkpoints_of(path: str | Path) -> Path:
    """The checkpoints folder of a run folder (``--out``), or ``path`` itself when it is one.

    Raises:
        ValueError: ``path`` does not exist or holds no checkpoint.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: no such folder (pass a run folder, train.py's --out, or its checkpoints/ folder)")
    directory = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    if not checkpoint.all_steps(directory):
        raise ValueError(f"{path}: holds no checkpoint (pass a run folder, train.py's --out, or its checkpoints/ folder)")
    return directory


def open_checkpoint(path: str | Path, step: int | None = None) -> Checkpoint:
    """Find ``step`` (default: the latest that verifies) in a run and rebuild the run's config.

    Raises:
        ValueError: no such folder, no checkpoint in it, no such step, or the step is damaged.
    """
    directory = checkpoints_of(path)
    return checkpoint.read_verified(directory, _checkpoint, step)[1]._replace(directory=directory)


def _checkpoint(directory: Path, step: int) -> Checkpoint:
    """Step ``step`` verified (:class:`pureflax.checkpoint.Damaged` if not), with the config its run recorded."""
    meta = checkpoint.verify(directory, step)
    if "settings" in meta:
        config = train.TrainConfig.from_settings(meta["settings"])
    else:  # saved with checkpoint.save, not by a run: the sizes are read from the saved params, the rest is the defaults
        config = train.TrainConfig(model=vae.config_of(_saved_shapes(directory, step)))
    total = meta["plan"]["total"] if "plan" in meta else step  # the defaults' schedule is constant: any length will do
    return Checkpoint(directory, step, config, total)


def _saved_shapes(directory: Path, step: int) -> dict[str, Any]:
    """The saved params as a nested dict of shapes, from orbax's metadata (nothing read but the index)."""
    tree: dict[str, Any] = {}
    for path, (shape, dtype) in checkpoint.saved_leaves(directory, step).items():
        *parents, leaf = path.split("/")
        if parents and parents[0] == "params":
            node = tree
            for part in parents[1:]:
                node = node.setdefault(part, {})
            node[leaf] = jax.ShapeDtypeStruct(shape, dtype)
    return tree


def _form(form: str) -> str:
    if form not in BACKENDS:
        raise ValueError(f"unknown form {form!r}; choose one of {', '.join(BACKENDS)}")
    return form


def load(path: str | Path, form: str = "functional", *, step: int | None = None, state: bool = False) -> Any:
    """A trained run's params (or, with ``state=True``, its train state) in ``form``.

    Args:
        path: a run folder (``scripts/train.py --out``) or its ``checkpoints/`` folder.
        form: ``"functional"``, ``"equinox"``, ``"flax"`` or ``"nnx"``.
        step: which checkpoint; ``None`` is the latest whose files read.
        state: return the train state (step, params, optimiser state) instead of the params.

    Returns:
        ``form``'s params (functional dict, ``equinox_models.VAE``, Flax ``{'params': ...}``, an
        ``nnx_models.VAE``) or its train state (``pureflax.TrainState``, Flax's ``TrainState``
        with ``apply_fn``/``tx``, or an NNX ``(model, nnx.Optimizer)`` pair). A model with
        BatchNorm statistics (``--model conv``) comes with them, as each library keeps them:
        functional ``(params, model_state)``, Equinox ``(model, eqx.nn.State)``, Flax
        ``{'params': ..., 'batch_stats': ...}``, an NNX module holding its ``nnx.BatchStat``; its
        train state is a ``pureflax.TrainState`` with ``model_state``, ``flax_models.TrainState``
        with ``batch_stats``, or the NNX pair.

    Raises:
        ValueError: a missing path, a folder without checkpoints, an unknown form, a step that
            does not exist or is damaged.
        pureflax.compat.ConversionError / pureflax.checkpoint.ShapeMismatch: the saved arrays do
            not fit the recorded model (path, shapes and dtypes named).

    Examples:
        >>> model = load("runs/vae", "equinox")  # doctest: +SKIP
    """
    _form(form)
    directory = checkpoints_of(path)
    return checkpoint.read_verified(directory, lambda folder, at: _load(_checkpoint(folder, at), form, state), step)[1]


def _load(found: Checkpoint, form: str, state: bool) -> Any:
    if not state:  # a train state is restored into its target, which checks every array; params are read raw
        functional = get_backend("functional", found.config.model)
        _check_fits(found, eqx.filter_eval_shape(functional.init_params, jax.random.PRNGKey(0), False), functional.init_model_state())
    if form == "nnx":
        return _load_nnx(found, state)
    backend = get_backend(form, found.config.model)
    if state:
        like, *_ = train.build(found.config, backend, found.total_steps, jax.random.PRNGKey(0))
        return train.restore_state(found.directory, like, backend, found.step)
    params, model_state = _saved_variables(found.directory, found.step)
    skeleton = eqx.filter_eval_shape(backend.init_params, jax.random.PRNGKey(0), False)
    if not jax.tree_util.tree_leaves(model_state):  # a model without state loads alone, as its library builds it
        return convert.from_functional(params, like=skeleton)
    if form == "functional":
        return params, model_state
    like = {**skeleton, "batch_stats": backend.init_model_state()} if form == "flax" else (skeleton, backend.init_model_state())
    return convert.variables_from_functional(params, model_state, like)


def _check_fits(found: Checkpoint, params: Any, model_state: Any) -> None:
    """Raise :class:`pureflax.checkpoint.ShapeMismatch` where the saved arrays do not fit the recorded model."""
    saved = checkpoint.saved_leaves(found.directory, found.step)
    hint = "another model than its recorded settings describe"
    checkpoint.check_part(saved, "params", params, found.step, hint)
    checkpoint.check_part(saved, "model_state", model_state, found.step, hint)


def _saved_variables(directory: Path, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The saved params and model state (``{}`` for a model without), as arrays."""
    saved = jax.tree_util.tree_map(jnp.asarray, checkpoint.restore_raw(directory, step))
    return saved["params"], saved.get("model_state", {})


def _load_nnx(found: Checkpoint, state: bool) -> Any:
    """The NNX module, or the ``(model, nnx.Optimizer)`` pair with the run's optimiser and its state."""
    from flax import nnx

    from pureflax import optim
    from pureflax.compat.backends import nnx_model

    abstract = nnx.eval_shape(lambda: nnx_model(found.config.model, nnx.Rngs(0)))
    if not state:
        return convert.variables_from_functional(*_saved_variables(found.directory, found.step), like=abstract)
    functional = get_backend("functional", found.config.model)
    like, *_ = train.build(found.config, functional, found.total_steps, jax.random.PRNGKey(0))
    restored = train.restore_state(found.directory, like, functional, found.step)
    model = convert.variables_from_functional(restored.params, restored.model_state, like=abstract)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    tx = optim.make_optimizer(found.config.optim, found.total_steps, params, convert.param_names(params))
    return convert.from_functional(restored, like=(model, nnx.Optimizer(model, tx, wrt=nnx.Param)))


def _target(form: str, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix not in SUFFIXES[_form(form)]:
        written = "an orbax checkpoint folder (a path without a suffix)" if form == "nnx" else " or ".join(SUFFIXES[form])
        raise ValueError(f"{path}: the {form} form is written as {written}")
    return path


def save_file(model: Any, form: str, path: str | Path) -> Path:
    """Write ``model`` (params in ``form``, as :func:`load` returns them) in its library's own format.

    ``equinox``: ``eqx.tree_serialise_leaves`` (``.eqx``); ``flax``: ``flax.serialization.to_bytes``
    of the variables (``.msgpack``); ``functional``: ``.safetensors`` or ``.npz`` keyed by path.

    Raises:
        ValueError: a suffix the form does not write.
    """
    path = _target(form, path)
    if form == "nnx":
        import orbax.checkpoint as ocp
        from flax import nnx

        if path.exists():
            raise ValueError(f"{path}: already exists (the nnx form is written as an orbax checkpoint folder)")
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(path.absolute(), nnx.to_pure_dict(nnx.state(model)))
    elif form == "equinox":
        eqx.tree_serialise_leaves(path, model)
    elif form == "flax":
        from flax import serialization

        path.write_bytes(serialization.to_bytes(model))
    else:  # a conv model's (params, model_state) go in one file, under those two names
        checkpoint.write_params(dict(zip(("params", "model_state"), model)) if isinstance(model, tuple) else model, path)
    return path


def _arguments(config: Any, names: tuple[str, ...]) -> str:
    """``latent_dim=32, ...``: the sizes of ``config`` that differ from the defaults, latent_dim always."""
    default = type(config)()
    return ", ".join(
        f"{name}={getattr(config, name)!r}" for name in names
        if name == "latent_dim" or getattr(config, name) != getattr(default, name)
    )


# Each model's module class and the config fields its Equinox/NNX (and Linen) constructors take.
_CONV_SIZES = tuple(name for name in conv_sizes(convvae.ConvVAEConfig()) if name != "activation_fn")
_SIZES = {
    "mlp": ("VAE", ("latent_dim", "encoder_dimensions", "decoder_dimensions", "num_classes", "input_dim"),
            ("latent_dim", "encoder_dimensions", "decoder_dimensions")),
    "conv": ("ConvVAE", _CONV_SIZES, _CONV_SIZES),
}


def loader_code(form: str, config: Any, path: str | Path) -> str:
    """The Python that reads a file written by :func:`save_file` with ``form``'s own loader."""
    path = str(path)
    kind = models.kind_of(config)
    cls, module_sizes, linen_sizes = _SIZES[kind]
    activation = "" if config.activation == "relu" else f", activation_fn=activation({config.activation!r})"
    imports = "" if config.activation == "relu" else "from pureflax.nn import activation\n"
    if _form(form) == "equinox":
        sizes = _arguments(config, module_sizes)
        make = "eqx.nn.make_with_state(ConvVAE)" if kind == "conv" else cls
        what = "model, state" if kind == "conv" else "model"
        return (f"import equinox as eqx, jax\nfrom pureflax.compat.equinox_models import {cls}\n{imports}"
                f"like = eqx.filter_eval_shape({make}, {sizes}{activation}, key=jax.random.PRNGKey(0))  # or {make}(...) itself\n"
                f"{what} = eqx.tree_deserialise_leaves({path!r}, like)\n")
    if form == "flax":
        sizes = _arguments(config, linen_sizes)
        return (f"import pathlib, jax, jax.numpy as jnp\nfrom flax import serialization\nfrom pureflax.compat.flax_models import {cls}\n"
                f"{imports}model = {cls}({sizes}{activation})\n"
                f"like = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, {config.input_dim})), "
                f"jnp.zeros((1, {config.num_classes})), jax.random.PRNGKey(0))\n"
                f"variables = serialization.from_bytes(like, pathlib.Path({path!r}).read_bytes())"
                f"{'  # params and batch_stats' if kind == 'conv' else ''}\n")
    if form == "nnx":
        sizes = _arguments(config, module_sizes)
        return (f"import orbax.checkpoint as ocp, pathlib\nfrom flax import nnx\nfrom pureflax.compat.nnx_models import {cls}\n"
                f"{imports}graphdef, state = nnx.split(nnx.eval_shape(lambda: {cls}({sizes}{activation}, rngs=nnx.Rngs(0))))\n"
                f"nnx.replace_by_pure_dict(state, ocp.StandardCheckpointer().restore(pathlib.Path({path!r}).absolute()))\n"
                "model = nnx.merge(graphdef, state)\n")
    flat = "safetensors.numpy.load_file" if path.endswith(".safetensors") else "numpy.load"
    if kind == "conv":
        return (f"from pureflax.checkpoint import read_params\n"
                f"variables = read_params({path!r})  # {{'params': ..., 'model_state': ...}}; {flat} gives them flat, keyed by path\n"
                "params, model_state = variables['params'], variables['model_state']\n")
    return (f"from pureflax.checkpoint import read_params\n"
            f"params = read_params({path!r})  # nested functional params; {flat} gives them flat, keyed by path\n")


def migrate(source: Any, like: Any, **options: Any) -> Any:
    """``source`` in ``like``'s form, in one call: any model, any two forms (:func:`pureflax.compat.convert.migrate`).

    Args:
        source: a model in any form (Linen variables, a bound Linen module or a Flax ``TrainState``;
            an NNX module or ``(model, nnx.Optimizer)``; an Equinox module, ``(model, eqx.nn.State)``
            or ``(model, opt_state)``; functional params or a ``pureflax.TrainState``; a torch state_dict,
            ``nn.Module`` or ``(state_dict, optimizer.state_dict())``), a ``.safetensors``/``.pt`` file, or the path of
            an orbax checkpoint written the tutorial's way (``ocp.PyTreeCheckpointer().save(path, params)``,
            or of a Flax ``TrainState``: ``step``, ``params``, ``opt_state``).
        like: an instance of the form wanted; for a train state its optimiser gives the optimiser
            state's structure.
        **options: ``example=``, ``call=``, ``names=``, ``flatten=``, ``tolerance=``, as
            :func:`pureflax.compat.convert.migrate` takes them.

    Returns:
        A new object of ``like``'s form holding ``source``'s values (for NNX, new module and
        optimiser; ``like`` is not changed).

    Raises:
        pureflax.compat.ConversionError: layers that cannot be matched, shapes, dtypes or settings
            that differ, or outputs on ``example`` that do.
    """
    if isinstance(source, (str, Path)) and Path(source).suffix in (".safetensors", ".pt", ".pth"):
        from pureflax.compat.convert import pytorch

        source = pytorch.load_file(str(source))  # torch's flat keys; a .pt only through torch.load(weights_only=True)
    elif isinstance(source, (str, Path)):
        source = _read_tutorial_checkpoint(Path(source), like)
    return convert.migrate(source, like, **options)


def _read_tutorial_checkpoint(path: Path, like: Any) -> Any:
    """A checkpoint written by ``ocp.PyTreeCheckpointer().save``: Linen params, or a Flax state's fields."""
    import orbax.checkpoint as ocp

    from pureflax.state import TrainState

    if not path.is_dir():
        raise ValueError(f"{path}: no such checkpoint folder")
    with ocp.PyTreeCheckpointer() as checkpointer, warnings.catch_warnings():
        # Without a target orbax reads each array's sharding from the checkpoint and says so; one host here.
        warnings.filterwarnings("ignore", message="Sharding info not provided when restoring")
        saved = checkpointer.restore(path.absolute())
        if not (isinstance(saved, dict) and {"params", "opt_state"} <= set(saved)):
            return jax.tree_util.tree_map(jnp.asarray, saved)  # params: Linen's names are the functional ones
        target = convert.to_functional(like)
        if not isinstance(target, TrainState):
            raise ValueError(f"{path} holds a train state (params and opt_state): pass a train state as like")
        # Linen's optimiser state has the functional layout: restore into it, structure and all
        item = {"step": target.step, "params": target.params, "opt_state": target.opt_state}
        restored = checkpointer.restore(path.absolute(), args=ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item)))
    return TrainState(step=restored["step"], params=restored["params"], opt_state=restored["opt_state"])


def convert_run(path: str | Path, form: str, target: str | Path, *, step: int | None = None) -> tuple[int, str]:
    """Write a run's params in ``form``'s file format; ``(step, the Python that loads the file)``."""
    _target(form, target)  # before any reading
    directory = checkpoints_of(path)

    def read(folder: Path, at: int) -> tuple[Checkpoint, Any]:
        found = _checkpoint(folder, at)
        return found, _load(found, form, state=False)

    step, (found, model) = checkpoint.read_verified(directory, read, step)
    save_file(model, form, target)
    return step, loader_code(form, found.config.model, target)


__all__ = ["Checkpoint", "SUFFIXES", "checkpoints_of", "convert_run", "load", "loader_code", "migrate", "open_checkpoint", "save_file"]
