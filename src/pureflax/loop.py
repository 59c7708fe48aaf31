"""Running train steps fast: data on the device, whole chunks of steps in one program.

Both runners have one signature, ``run(state, data, order, start, key, length) ->
(state, metrics)``: they take steps ``start .. start + length - 1`` of an epoch whose
batch order is ``order`` and return the new state and the per-step metrics, shape
(length, 3) as (loss, mse, kl). The fused runner does it in one jitted ``lax.scan`` with
the state donated; the per-step runner dispatches one jitted step at a time. Both gather
batches on the device from the resident dataset and call the same train step with the
same keys, so they compute the same losses.

``Placement`` spreads the batch over several devices (data parallel): params and the
dataset are replicated, each batch is sharded along its first axis, and XLA partitions
the same step code.

Where chunks end (log lines, checkpoints, epochs) is the run folder's arithmetic:
:func:`pureflax.rundir.chunks`.

Example:
    >>> epoch_order(jax.random.PRNGKey(0), 10, 3).shape  # 3 batches of 3; the tenth example waits for the next epoch
    (3, 3)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pureflax.step import Batch

Runner = Callable[..., tuple[Any, jax.Array]]


class Placement(NamedTuple):
    """Where arrays live: one device (``mesh is None``) or a 1-D ``'data'`` mesh."""

    mesh: Mesh | None

    def replicate(self, tree: Any) -> Any:
        """Put ``tree`` on the device(s): one copy per device when data parallel."""
        if self.mesh is None:
            return jax.device_put(tree)
        return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec()))

    def shard_batch(self, batch: Batch) -> Batch:
        """Inside a jitted function: split the batch along its first axis over the devices."""
        if self.mesh is None:
            return batch
        return jax.lax.with_sharding_constraint(batch, NamedSharding(self.mesh, PartitionSpec("data")))


def make_placement(devices: int = 1, batch_size: int | None = None) -> Placement:
    """A placement over the first ``devices`` local devices.

    Raises:
        ValueError: more devices asked for than there are, or a batch that does not split evenly.
    """
    available = jax.devices()
    if devices < 1 or devices > len(available):
        raise ValueError(
            f"--devices {devices}: this machine has {len(available)} {available[0].platform} device(s) "
            "(on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N)"
        )
    if batch_size is not None and batch_size % devices:
        raise ValueError(f"--batch-size {batch_size} does not split evenly over --devices {devices}")
    if devices == 1:
        return Placement(None)
    return Placement(Mesh(np.array(available[:devices]), ("data",)))


@partial(jax.jit, static_argnums=(1, 2))
def epoch_order(key: jax.Array, num_train: int, batch_size: int) -> jax.Array:
    """The epoch's shuffled example indices as (steps, batch_size); the remainder is dropped."""
    steps = num_train // batch_size
    return jax.random.permutation(key, num_train)[: steps * batch_size].reshape(steps, batch_size)


def _gather(data: Batch, order: jax.Array, i: jax.Array, placement: Placement) -> Batch:
    idx = order[i]
    return placement.shard_batch(Batch(data.images[idx], data.labels[idx]))


def make_fused_runner(train_step: Callable, placement: Placement = Placement(None)) -> Runner:
    """A chunk of steps as one jitted ``lax.scan``, state donated, metrics returned per step."""

    @partial(jax.jit, static_argnums=(5,), donate_argnums=(0,))
    def run(state, data: Batch, order, start, key, length: int):
        def body(state, i):
            state, metrics = train_step(state, _gather(data, order, i, placement), key)
            return state, jnp.stack(metrics)

        return jax.lax.scan(body, state, start + jnp.arange(length))

    return run


def make_per_step_runner(train_step: Callable, placement: Placement = Placement(None)) -> Runner:
    """One dispatch per step (gather and step in one jitted call); metrics stay on the device."""

    @partial(jax.jit, donate_argnums=(0,))
    def advance(state, data: Batch, order, i, key):
        state, metrics = train_step(state, _gather(data, order, i, placement), key)
        return state, jnp.stack(metrics)

    def run(state, data: Batch, order, start, key, length: int):
        per_step = []
        for i in range(start, start + length):
            state, metrics = advance(state, data, order, i, key)
            per_step.append(metrics)
        return state, jnp.stack(per_step)

    return run
