"""Orbax checkpoints of training state: save, restore into a target, keep the latest and the best.

A checkpoint is one orbax step folder holding two items: ``state`` (the functional train
state: ``step``, ``params``, ``opt_state``, saved with ``ocp.args.StandardSave``) and
``meta`` (JSON: where in the run it was taken, metrics, the run's settings, and a digest of
every array saved: path, shape, dtype, xxh3 of the bytes). A step counts only once orbax has
committed it, so a save cut short is never taken as good. Once committed, the step is sealed:
``pureflax-digests.json`` records a digest of every file orbax wrote. Every read verifies
both (:func:`verify`): a step whose files or values differ from what was saved raises
:class:`Damaged` naming the file or array, and the readers take the newest step that verifies.
Any backend's state is saved in the functional form and restores into any other.

Examples:
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

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from pureflax.checkpoint_files import (  # noqa: F401 (the step folders, their digests and verified reads, as checkpoint.X)
    CheckpointError, ShapeMismatch, Damaged, ITEMS, SEAL, ARRAYS, TMP, SET_ASIDE, all_steps, stray_steps,
    set_aside_steps, temporary, foreign, pureflax_names, latest_step, read_meta, array_digests, file_digest, seal,
    check_files, check_values, verify, damage, latest_good_step, read_verified, READING, _read_state, set_aside,
)
from pureflax.distributed import host
from pureflax.optim import path_str


def manager(
    directory: str | Path, *, keep: int | None = None, keep_best: bool = False, async_save: bool = True,
    cleanup: bool = False,
) -> ocp.CheckpointManager:
    """An orbax ``CheckpointManager`` on ``directory`` (created) that retains through orbax's own policies.

    Args:
        directory: the checkpoints folder.
        keep: keep the newest ``keep`` steps (``LatestN``); ``None`` keeps every step.
        keep_best: also keep the step with the lowest ``test_loss`` (``BestN`` over the metrics
            passed to :func:`save_with`; orbax writes them beside the step, so they survive a resume).
        async_save: write in orbax's background thread.
        cleanup: remove the temporary folders of saves a killed process left (orbax's
            ``cleanup_tmp_directories``); only for the one process that writes there.
    """
    policy = None
    if keep is not None:
        policy = cm.LatestN(n=keep)
        if keep_best:
            policy = cm.AnyPreservationPolicy([policy, cm.BestN(get_metric_fn=_test_loss, reverse=True, n=1)])
    options = ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=async_save, preservation_policy=policy,
        best_fn=_test_loss if keep_best else None, best_mode="min", cleanup_tmp_directories=cleanup,
    )
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}  # so metadata reads need no args
    mgr = ocp.CheckpointManager(Path(directory).absolute(), options=options, item_handlers=handlers)
    if cleanup:
        # orbax cleans in a background thread that only its next save awaits (close() does not): a
        # run stopped before its first save would leave the thread to die at interpreter shutdown,
        # printing its traceback. Waiting here also means the leftovers are gone once the run starts.
        mgr._maybe_await_cleanup_tmp_directory()
    return mgr


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
    step, tree = int(host(state.step)), _as_tree(state)
    meta = {**(meta or {}), ARRAYS: array_digests(tree)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))
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
    seal(directory, step)
    return step

def saved_leaves(directory: str | Path, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{'params/encoder/Dense_0/kernel': ((784, 256), 'float32'), ...}`` as saved, from orbax's metadata.

    Raises:
        Damaged: the metadata cannot be read (the step's files are damaged).
    """
    handler = ocp.StandardCheckpointHandler()
    try:
        tree = handler.metadata((Path(directory) / str(step) / "state").absolute())
    except Exception as err:  # orbax raises various errors for missing or damaged files
        raise Damaged(step, f"its array index cannot be read ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]})") from None
    finally:
        handler.close()
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {path_str(p): (tuple(leaf.shape), str(np.dtype(leaf.dtype))) for p, leaf in leaves if hasattr(leaf, "shape")}


def _leaves(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    def describe(x: Any) -> tuple[tuple[int, ...], str]:
        shape = x.shape if hasattr(x, "shape") else np.shape(x)  # a ShapeDtypeStruct too
        return tuple(shape), str(np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype))

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
        if hasattr(target, part) or part in ("params", "opt_state", "step"):
            check_part(saved, part, getattr(target, part, {}), step, hint)


def check_part(saved: dict[str, tuple[tuple[int, ...], str]], part: str, tree: Any, step: int, hint: str) -> None:
    """Raise :class:`ShapeMismatch` where ``saved``'s arrays under ``part`` and ``tree`` differ in path, shape or dtype."""
    wanted = _leaves({part: tree})
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
    """Restore into ``target``'s structure (a functional TrainState), verified, and return it with the metadata.

    Raises:
        FileNotFoundError: no committed checkpoint in ``directory``.
        ShapeMismatch: the saved params do not fit ``target``.
        Damaged: the step's files or values are not what was saved (the file or array named).
    """
    step = latest_step(directory) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    meta = verify(directory, step)
    check_compatible(directory, step, target)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _as_tree(target))
    tree = _read_state(directory, step, abstract)
    check_values(step, meta[ARRAYS], tree)
    return target._replace(**tree), {key: value for key, value in meta.items() if key != ARRAYS}


def restore(directory: str | Path, target: Any, step: int | None = None) -> Any:
    """Restore into ``target``'s structure: ``target`` with the saved arrays (the latest step by default)."""
    return restore_with_meta(directory, target, step)[0]

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

    Examples:
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
    """The committed step with the lowest ``test_loss`` in its metadata, or ``None`` (unreadable ones skipped)."""
    scored = []
    for step in all_steps(directory):
        try:
            loss = read_meta(directory, step).get("test_loss")
        except Damaged:
            continue
        if isinstance(loss, (int, float)):
            scored.append((loss, step))
    return min(scored)[1] if scored else None


def restore_raw(directory: str | Path, step: int | None = None) -> dict[str, Any]:
    """The saved state as orbax reads it without a target, verified: ``{'step', 'params', 'opt_state'}`` of arrays.

    For inspecting and exporting; to train on, restore into a target with :func:`restore`.

    Raises:
        Damaged: the step's files or values are not what was saved.
    """
    step = latest_step(directory) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    meta = verify(directory, step)
    tree = _read_state(directory, step)
    check_values(step, meta[ARRAYS], tree)
    return tree
