"""Orbax checkpoints of training state: save, restore into a target, keep the latest and the best.

A checkpoint is one orbax step folder holding two items: ``state`` (the functional train
state: ``step``, ``params``, ``opt_state``, saved with ``ocp.args.StandardSave``) and
``meta`` (JSON: where in the run it was taken, metrics, the run's settings). A step counts
only once orbax has committed it, so a save cut short is never taken as good. Any
backend's state is saved in the functional form and restores into any other.

Example:
    >>> import tempfile, jax.numpy as jnp, optax
    >>> from pureflax.state import TrainState
    >>> state = TrainState.create({'w': jnp.ones(2)}, optax.adam(1e-3))
    >>> d = tempfile.mkdtemp()
    >>> save(d, state, meta={'epoch': 0})
    0
    >>> restored, meta = restore_with_meta(d, state)
    >>> restored.params['w'].tolist(), meta['epoch']
    ([1.0, 1.0], 0)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from pureflax.optim import path_str


class CheckpointError(Exception):
    """A checkpoint that cannot be used: the message names the step and what is wrong."""


class ShapeMismatch(CheckpointError):
    """The checkpoint's params do not fit the model being restored: path and both shapes named."""


def manager(
    directory: str | Path, *, keep: int | None = None, keep_best: bool = False, async_save: bool = True
) -> ocp.CheckpointManager:
    """An orbax ``CheckpointManager`` on ``directory`` (created) that retains through orbax's own policies.

    Args:
        directory: the checkpoints folder.
        keep: keep the newest ``keep`` steps (``LatestN``); ``None`` keeps every step.
        keep_best: also keep the step with the lowest ``test_loss`` (``BestN`` over the metrics
            passed to :func:`save_with`; orbax writes them beside the step, so they survive a resume).
        async_save: write in orbax's background thread.
    """
    policy = None
    if keep is not None:
        policy = cm.LatestN(n=keep)
        if keep_best:
            policy = cm.AnyPreservationPolicy([policy, cm.BestN(get_metric_fn=_test_loss, reverse=True, n=1)])
    options = ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=async_save, preservation_policy=policy,
        best_fn=_test_loss if keep_best else None, best_mode="min",
    )
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}  # so metadata reads need no args
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_handlers=handlers)


def _test_loss(metrics: dict[str, Any]) -> float:
    return float(metrics["test_loss"])


def _as_tree(state: Any) -> dict[str, Any]:
    """What is saved: step, params, opt_state, and the model state when the model has one.

    A model without state (the MLP VAE: ``model_state == {}``) saves exactly the three items
    checkpoints held before model state existed, so old and new checkpoints restore alike.
    """
    if not hasattr(state, "model_state") and jax.tree_util.tree_leaves(getattr(state, "batch_stats", None)):
        raise ValueError("this state keeps batch_stats, which a checkpoint holds as model_state: "
                         "save pureflax.compat.to_functional(state)")
    tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    if jax.tree_util.tree_leaves(getattr(state, "model_state", {})):
        tree["model_state"] = state.model_state
    return tree


def save_with(mgr: ocp.CheckpointManager, state: Any, meta: dict[str, Any] | None = None, test_loss: float | None = None) -> int:
    """Start saving ``state`` (and ``meta``) at its step with an open manager; orbax may finish in the background.

    ``test_loss`` goes to orbax as the step's metrics, which its ``BestN`` policy ranks.
    """
    step = int(jax.device_get(state.step))
    args = ocp.args.Composite(state=ocp.args.StandardSave(_as_tree(state)), meta=ocp.args.JsonSave(dict(meta or {})))
    mgr.save(step, args=args, force=True, metrics=None if test_loss is None else {"test_loss": test_loss})
    return step


# orbax's metadata files and the OCDBT manifest beside the arrays: well under 1 MB.
METADATA_BYTES = 1 << 20


def bytes_needed(state: Any) -> int:
    """About what a checkpoint of ``state`` takes on disk: its arrays' bytes plus orbax's metadata (an upper bound)."""
    return METADATA_BYTES + sum(np.size(leaf) * np.dtype(getattr(leaf, "dtype", type(leaf))).itemsize
                                for leaf in jax.tree_util.tree_leaves(state))


def save(directory: str | Path, state: Any, *, meta: dict[str, Any] | None = None, keep: int | None = None) -> int:
    """Save ``state`` (anything with ``step``, ``params``, ``opt_state``) at its step and wait for it.

    Returns:
        The step it was saved under.
    """
    with manager(directory, keep=keep) as mgr:
        step = save_with(mgr, state, meta)
        mgr.wait_until_finished()
    return step


def _numbered(directory: str | Path) -> list[tuple[int, Path]]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((int(p.name), p) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def all_steps(directory: str | Path) -> list[int]:
    """Every committed step in ``directory``, oldest first (none if it does not exist).

    orbax writes a step into a temporary folder and renames it to the step number when it
    commits, with its ``_CHECKPOINT_METADATA``; a numbered folder without one is not a checkpoint
    (see :func:`stray_steps`).
    """
    return [step for step, path in _numbered(directory) if (path / "_CHECKPOINT_METADATA").is_file()]


def stray_steps(directory: str | Path) -> list[int]:
    """Numbered folders in ``directory`` that are not orbax checkpoints (copied in, or emptied)."""
    return [step for step, path in _numbered(directory) if not (path / "_CHECKPOINT_METADATA").is_file()]


def set_aside_steps(directory: str | Path) -> list[str]:
    """The names of steps set aside by :func:`set_aside` (``<step>.damaged[-n]``)."""
    directory = Path(directory)
    return sorted(p.name for p in directory.glob("*.damaged*")) if directory.is_dir() else []


def latest_step(directory: str | Path) -> int | None:
    """The newest committed step in ``directory``, or ``None``."""
    steps = all_steps(directory)
    return steps[-1] if steps else None


def read_meta(directory: str | Path, step: int) -> dict[str, Any]:
    """The JSON metadata saved with ``step`` ({} for a checkpoint saved without any)."""
    path = Path(directory) / str(step) / "meta" / "metadata"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint step {step}: its metadata cannot be read ({err})") from None


def saved_leaves(directory: str | Path, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{'params/encoder/Dense_0/kernel': ((784, 256), 'float32'), ...}`` as saved, from orbax's metadata.

    Raises:
        CheckpointError: the metadata cannot be read (the step's files are damaged).
    """
    with manager(directory) as mgr:
        try:
            metadata = mgr.item_metadata(step)
        except Exception as err:  # orbax raises various errors for missing or damaged files
            raise CheckpointError(f"checkpoint step {step}: its metadata cannot be read ({type(err).__name__}: {err})") from None
    tree = metadata["state"] if "state" in metadata else metadata
    if tree is None:
        raise CheckpointError(f"checkpoint step {step}: it holds no state")
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {path_str(p): (tuple(leaf.shape), str(np.dtype(leaf.dtype))) for p, leaf in leaves if hasattr(leaf, "shape")}


def saved_shapes(directory: str | Path, step: int) -> dict[str, tuple[int, ...]]:
    """``{'params/encoder/Dense_0/kernel': (784, 256), ...}`` as saved, read from orbax's metadata."""
    return {path: shape for path, (shape, _) in saved_leaves(directory, step).items()}


def _leaves(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    def describe(x: Any) -> tuple[tuple[int, ...], str]:
        return tuple(np.shape(x)), str(np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype))

    return {path_str(p): describe(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def check_compatible(directory: str | Path, step: int, target: Any) -> None:
    """Raise :class:`ShapeMismatch` naming the first path whose saved and target shape or dtype differ.

    Params are checked first (another model), then the optimiser state (another optimiser), so
    the message says which of the two the run being restored differs in.
    """
    saved = saved_leaves(directory, step)
    parts = (("params", "another model"), ("opt_state", "another optimiser configuration"), ("step", "another kind of state"),
             ("model_state", "another model (its BatchNorm statistics)"))
    for part, hint in parts:
        wanted = _leaves({part: getattr(target, part, {})})
        have = {p: v for p, v in saved.items() if p == part or p.startswith(part + "/")}
        for path, (shape, dtype) in wanted.items():
            if path not in have:
                raise ShapeMismatch(f"checkpoint step {step} has no {path}: it was written for {hint}")
            if have[path][0] != shape:
                raise ShapeMismatch(
                    f"checkpoint step {step}: {path} was saved with shape {have[path][0]} but this model has {shape} "
                    "(resume with the settings the run was started with)"
                )
            if have[path][1] != dtype:
                raise ShapeMismatch(f"checkpoint step {step}: {path} was saved as {have[path][1]} but this run has {dtype}")
        extra = sorted(p for p in have if p not in wanted)
        if extra:
            raise ShapeMismatch(f"checkpoint step {step} has {part} this run lacks ({', '.join(extra[:3])}): it was written for {hint}")


def restore_with_meta(directory: str | Path, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restore into ``target``'s structure (a functional TrainState) and return it with the metadata.

    Raises:
        FileNotFoundError: no committed checkpoint in ``directory``.
        ShapeMismatch: the saved params do not fit ``target``.
    """
    step = latest_step(directory) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    check_compatible(directory, step, target)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _as_tree(target))
    with manager(directory) as mgr:
        items = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return target._replace(**items["state"]), dict(items["meta"] or {})


def restore(directory: str | Path, target: Any, step: int | None = None) -> Any:
    """Restore into ``target``'s structure: ``target`` with the saved arrays (the latest step by default)."""
    return restore_with_meta(directory, target, step)[0]


def set_aside(directory: str | Path, step: int) -> Path:
    """Rename a damaged step's folder to ``<step>.damaged[-n]`` (kept for inspection, never deleted)."""
    source = Path(directory) / str(step)
    target = source.with_name(f"{step}.damaged")
    n = 1
    while target.exists():
        target, n = source.with_name(f"{step}.damaged-{n}"), n + 1
    source.rename(target)
    return target


def damage(directory: str | Path, step: int) -> str | None:
    """Why ``step`` cannot be used (its metadata or array index unreadable), or ``None`` when it reads."""
    try:
        read_meta(directory, step)
        saved_leaves(directory, step)
    except CheckpointError as err:
        return str(err)
    return None


def latest_good_step(directory: str | Path) -> int | None:
    """The newest committed step whose files read (damaged ones skipped, never touched), or ``None``."""
    return next((step for step in reversed(all_steps(directory)) if damage(directory, step) is None), None)


PARAM_FILES = (".safetensors", ".npz")


def write_params(params: Any, path: str | Path) -> int:
    """Write a params tree to ``.safetensors`` or ``.npz``, flat, keyed by path (``encoder/Dense_0/kernel``).

    Returns the number of arrays written. :func:`read_params` reads it back as the nested tree.
    """
    path = Path(path)
    flat = {path_str(p): np.ascontiguousarray(leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
    if path.suffix == ".npz":
        with path.open("wb") as f:  # np.savez would append .npz to a name without it
            np.savez(f, **flat)
    elif path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(flat, str(path))
    else:
        raise ValueError(f"{path}: params are written as {' or '.join(PARAM_FILES)}")
    return len(flat)


def read_params(path: str | Path) -> dict[str, Any]:
    """The nested params tree of a file written by :func:`write_params` (or any flat file keyed by ``a/b/c``).

    Example:
        >>> import tempfile, numpy as np
        >>> f = tempfile.mkdtemp() + '/p.npz'
        >>> write_params({'dense': {'kernel': np.ones((2, 3), np.float32)}}, f)
        1
        >>> read_params(f)['dense']['kernel'].shape
        (2, 3)
    """
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            flat = {key: f[key] for key in f.files}
    elif path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        flat = load_file(str(path))
    else:
        raise ValueError(f"{path}: params are read from {' or '.join(PARAM_FILES)}")
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def best_step(directory: str | Path) -> int | None:
    """The committed step with the lowest ``test_loss`` in its metadata, or ``None``."""
    scored = [(read_meta(directory, s).get("test_loss"), s) for s in all_steps(directory)]
    scored = [(loss, s) for loss, s in scored if isinstance(loss, (int, float))]
    return min(scored)[1] if scored else None


def restore_raw(directory: str | Path, step: int | None = None) -> dict[str, Any]:
    """The saved state as orbax reads it without a target: ``{'step', 'params', 'opt_state'}`` of arrays.

    For inspecting and exporting; to train on, restore into a target with :func:`restore`.
    """
    step = latest_step(directory) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    with manager(directory) as mgr:
        items = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return items["state"]
