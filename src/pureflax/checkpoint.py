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
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from pureflax.optim import path_str


class CheckpointError(Exception):
    """A checkpoint that cannot be used: the message names the step and what is wrong."""


class ShapeMismatch(CheckpointError):
    """The checkpoint's params do not fit the model being restored: path and both shapes named."""


def manager(directory: str | Path, *, keep: int | None = None, async_save: bool = True) -> ocp.CheckpointManager:
    """An orbax ``CheckpointManager`` on ``directory`` (created), keeping at most ``keep`` steps."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}  # so metadata reads need no args
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_handlers=handlers)


def _as_tree(state: Any) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def save_with(mgr: ocp.CheckpointManager, state: Any, meta: dict[str, Any] | None = None) -> int:
    """Start saving ``state`` (and ``meta``) at its step with an open manager; orbax may finish in the background."""
    step = int(jax.device_get(state.step))
    args = ocp.args.Composite(state=ocp.args.StandardSave(_as_tree(state)), meta=ocp.args.JsonSave(dict(meta or {})))
    mgr.save(step, args=args, force=True)
    return step


def save(directory: str | Path, state: Any, *, meta: dict[str, Any] | None = None, keep: int | None = None) -> int:
    """Save ``state`` (anything with ``step``, ``params``, ``opt_state``) at its step and wait for it.

    Returns:
        The step it was saved under.
    """
    with manager(directory, keep=keep) as mgr:
        step = save_with(mgr, state, meta)
        mgr.wait_until_finished()
    return step


def all_steps(directory: str | Path) -> list[int]:
    """Every committed step in ``directory``, oldest first (none if it does not exist)."""
    if not Path(directory).is_dir():
        return []
    with manager(directory) as mgr:
        return sorted(mgr.all_steps())


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


def saved_shapes(directory: str | Path, step: int) -> dict[str, tuple[int, ...]]:
    """``{'params/encoder/Dense_0/kernel': (784, 256), ...}`` as saved, read from orbax's metadata."""
    with manager(directory) as mgr:
        try:
            metadata = mgr.item_metadata(step)
        except Exception as err:  # orbax raises various errors for missing or damaged files
            raise CheckpointError(f"checkpoint step {step}: its metadata cannot be read ({type(err).__name__}: {err})") from None
    tree = metadata["state"] if "state" in metadata else metadata
    if tree is None:
        raise CheckpointError(f"checkpoint step {step}: it holds no state")
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {path_str(p): tuple(leaf.shape) for p, leaf in leaves if hasattr(leaf, "shape")}


def check_compatible(directory: str | Path, step: int, target: Any) -> None:
    """Raise :class:`ShapeMismatch` naming the first param path whose saved and target shapes differ."""
    saved = saved_shapes(directory, step)
    wanted = {path_str(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path({"params": target.params})}
    for path, shape in wanted.items():
        if path not in saved:
            raise ShapeMismatch(f"checkpoint step {step} has no {path}: it was written for another model")
        if saved[path] != shape:
            raise ShapeMismatch(
                f"checkpoint step {step}: {path} was saved with shape {saved[path]} but this model has {shape} "
                "(resume with the settings the run was started with)"
            )
    extra = sorted(p for p in saved if p.startswith("params/") and p not in wanted)
    if extra:
        raise ShapeMismatch(f"checkpoint step {step} has params this model lacks: {', '.join(extra[:5])}")


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


def prune(directory: str | Path, keep: int | None, keep_best: bool) -> list[int]:
    """Delete committed steps beyond the newest ``keep``, sparing the best by ``test_loss`` if ``keep_best``.

    Returns:
        The steps deleted.
    """
    steps = all_steps(directory)
    if keep is None or len(steps) <= keep:
        return []
    spare = set(steps[-keep:])
    if keep_best:
        scored = [(read_meta(directory, s).get("test_loss"), s) for s in steps]
        scored = [(loss, s) for loss, s in scored if isinstance(loss, (int, float)) and np.isfinite(loss)]
        if scored:
            spare.add(min(scored)[1])
    doomed = [s for s in steps if s not in spare]
    for step in doomed:
        shutil.rmtree(Path(directory) / str(step))
    return doomed


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
