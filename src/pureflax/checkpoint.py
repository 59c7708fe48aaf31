"""Orbax checkpoints of training state, for any backend's state restored into a target.

The state is saved as a dict of arrays (``step``, ``params``, ``opt_state``) with
``ocp.args.StandardSave`` under a ``CheckpointManager``; a step's folder counts only
once orbax has committed it.

Example:
    >>> import tempfile, jax.numpy as jnp, optax
    >>> from pureflax.state import TrainState
    >>> state = TrainState.create({'w': jnp.ones(2)}, optax.adam(1e-3))
    >>> d = tempfile.mkdtemp()
    >>> _ = save(d, state)
    >>> restored = restore(d, state)
    >>> restored.params['w'].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def _manager(directory: str | Path, max_to_keep: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def _as_tree(state: Any) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def save(directory: str | Path, state: Any, *, max_to_keep: int | None = None) -> int:
    """Save ``state`` (anything with ``step``, ``params``, ``opt_state``) at its step.

    Returns:
        The step it was saved under; the save has finished when this returns.
    """
    step = int(jax.device_get(state.step))
    with _manager(directory, max_to_keep) as manager:
        manager.save(step, args=ocp.args.StandardSave(_as_tree(state)))
        manager.wait_until_finished()
    return step


def latest_step(directory: str | Path) -> int | None:
    """The newest committed step in ``directory``, or ``None``."""
    if not Path(directory).is_dir():
        return None
    with _manager(directory) as manager:
        return manager.latest_step()


def restore(directory: str | Path, target: Any, step: int | None = None) -> Any:
    """Restore into ``target``'s structure: the result is ``target`` with the saved arrays.

    Args:
        directory: the checkpoint directory.
        target: a :class:`pureflax.TrainState` whose arrays give shapes and dtypes.
        step: which step; the latest when omitted.

    Raises:
        FileNotFoundError: no committed checkpoint in ``directory``.
    """
    with _manager(directory) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _as_tree(target))
        tree = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    return target._replace(**tree)
