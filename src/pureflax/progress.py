"""Where a run is, as pure values: its :class:`Plan` (epochs, log lines, checkpoints), its
:class:`Position` (what a checkpoint carries to resume exactly), the chunks of steps it runs as
one program each, and the log windows and epoch means those steps make. :mod:`pureflax.rundir`
exports these names.

Examples:
    >>> plan = Plan(steps_per_epoch=5, total=12, log_every=2, ckpt_every=4)
    >>> [(c.epoch, c.start, c.length) for c in chunks(0, plan)][:4]
    [(0, 0, 2), (0, 2, 2), (0, 4, 1), (1, 0, 2)]
    >>> pos, row = advance(Position.start(), np.ones((2, 3)), plan)
    >>> pos.step, row["global_step"], row["loss"]
    (2, 2, 1.0)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np


class Plan(NamedTuple):
    """The fixed shape of a run, from its settings and the data size."""

    steps_per_epoch: int
    total: int  # steps in all
    log_every: int
    ckpt_every: int | None

    def checkpoint_due(self, step: int) -> bool:
        """Whether a periodic checkpoint is due at a step (the final one is saved by the finish).

        Args:
            step: steps taken in all.

        Returns:
            ``True`` at each multiple of ``ckpt_every`` before the run's end.
        """
        return bool(self.ckpt_every) and step % self.ckpt_every == 0 and step < self.total


class Position(NamedTuple):
    """Where a run is, beyond the state: what a checkpoint must carry to resume exactly."""

    step: int  # steps taken in all
    window: list[list[float]]  # per-step (loss, mse, kl) since the last log line of this epoch
    epoch_sums: list[float]  # (loss, mse, kl) summed over this epoch's steps so far
    epoch_count: int  # steps of this epoch so far
    last_epoch: list[float]  # (loss, mse, kl) means of the last finished epoch

    @classmethod
    def start(cls) -> Position:
        """The position of a run that has taken no step."""
        return cls(0, [], [0.0, 0.0, 0.0], 0, [0.0, 0.0, 0.0])


class Chunk(NamedTuple):
    """Steps ``start .. start + length - 1`` of epoch ``epoch``, run as one program."""

    epoch: int
    start: int
    length: int


def end_of(chunk: Chunk, plan: Plan) -> int:
    """The global step a chunk ends at.

    Args:
        chunk: the chunk.
        plan: the run's plan.

    Returns:
        Steps taken in all once the chunk has run.
    """
    return chunk.epoch * plan.steps_per_epoch + chunk.start + chunk.length


def chunks(step: int, plan: Plan) -> Iterator[Chunk]:
    """The chunks from a global step to the run's end.

    Args:
        step: steps taken in all so far.
        plan: the run's plan.

    Returns:
        The chunks in order; each ends at a log line, a checkpoint, an epoch's end or the run's end.
    """
    while step < plan.total:
        epoch, within = divmod(step, plan.steps_per_epoch)
        end = min(plan.steps_per_epoch, plan.total - epoch * plan.steps_per_epoch)
        stop = min(end, (within // plan.log_every + 1) * plan.log_every)
        if plan.ckpt_every:
            stop = min(stop, (step // plan.ckpt_every + 1) * plan.ckpt_every - epoch * plan.steps_per_epoch)
        yield Chunk(epoch, within, stop - within)
        step += stop - within


def epoch_of(step: int, steps_per_epoch: int) -> int:
    """The epoch of the last step taken (the epoch the log lines named).

    Args:
        step: steps taken in all.
        steps_per_epoch: steps in an epoch.

    Returns:
        The epoch, counted from 0 (0 before any step).
    """
    return max(step - 1, 0) // steps_per_epoch


def advance(pos: Position, metrics: np.ndarray, plan: Plan) -> tuple[Position, dict[str, Any] | None]:
    """The position after a chunk's per-step ``metrics`` (length, 3), and its log row if one is due.

    A chunk never crosses a log line or an epoch's end (see :func:`chunks`). As in the
    tutorial, a log window cut short by the end of an epoch is not logged.

    Args:
        pos: the position before the chunk.
        metrics: the chunk's (loss, mse, kl) for each step, shape (length, 3).
        plan: the run's plan.

    Returns:
        The new position, and the log row (``epoch``, ``step``, ``global_step``, ``loss``,
        ``mse``, ``kl``) when the chunk ends at a log line, else ``None``.
    """
    step = pos.step + len(metrics)
    epoch = epoch_of(step, plan.steps_per_epoch)
    here = step - epoch * plan.steps_per_epoch
    window = pos.window + np.asarray(metrics, np.float64).tolist()
    sums = (np.asarray(pos.epoch_sums) + np.sum(metrics, axis=0)).tolist()
    pos = Position(step, window, sums, pos.epoch_count + len(metrics), pos.last_epoch)
    row = None
    if here % plan.log_every == 0:
        loss, mse, kl = np.mean(window, axis=0).tolist()
        row = {"epoch": epoch, "step": here, "global_step": step, "loss": loss, "mse": mse, "kl": kl}
        pos = pos._replace(window=[])
    if here == plan.steps_per_epoch:
        means = (np.asarray(sums) / pos.epoch_count).tolist()
        pos = Position(step, [], [0.0, 0.0, 0.0], 0, means)
    return pos, row


def epoch_means(pos: Position) -> list[float]:
    """The means of the run's final epoch: the one under way, else the last finished.

    Args:
        pos: the run's position.

    Returns:
        The (loss, mse, kl) means.
    """
    return (np.asarray(pos.epoch_sums) / pos.epoch_count).tolist() if pos.epoch_count else list(pos.last_epoch)
