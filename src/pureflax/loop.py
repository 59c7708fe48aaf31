"""Running train steps fast: data on the device, whole chunks of steps in one program.

Both runners have one signature, ``run(state, data, order, start, key, length) ->
(state, metrics)``: they take steps ``start .. start + length - 1`` of an epoch whose
batch order is ``order`` and return the new state and the per-step metrics on the device,
row i (loss, mse, kl) of step ``start + i``; a fused chunk shorter than its program's
capacity comes back padded with zero rows, which :func:`read_metrics` drops on the host
(slicing on the device would be one more op to compile mid-run). The fused runner does it in one jitted loop with the
state donated, the length an argument of the program (one program serves every chunk up
to its capacity); the per-step runner dispatches one jitted step at a time. Both gather
batches on the device from the resident dataset and call the same train step with the
same keys, so they compute the same losses. Across processes, :func:`fed_from_each_process`
hands either runner each chunk's batches instead, built from every process's own part.

``Placement`` spreads the batch over several devices (data parallel): params and the
dataset are replicated, each batch is sharded along its first axis, and XLA partitions
the same step code.

Where chunks end (log lines, checkpoints, epochs) is the run folder's arithmetic:
:func:`pureflax.rundir.chunks`.

Examples:
    >>> epoch_order(jax.random.PRNGKey(0), 10, 3).shape  # 3 batches of 3; the tenth example waits for the next epoch
    (3, 3)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pureflax.step import Batch

Runner = Callable[..., tuple[Any, jax.Array]]


def _put(tree: Any, sharding: NamedSharding) -> Any:
    """``jax.device_put(tree, sharding)``; onto a mesh spanning several processes, each process supplies its own shards.

    There a process's device arrays cannot move onto other processes' devices (JAX has no transfer
    between hosts on CPU): each leaf is read to the host, the same in every process, and
    ``jax.make_array_from_callback`` builds the global array from this process's part of it.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    from pureflax.distributed import host

    return jax.tree_util.tree_map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda index: x[index]), host(tree))


class Placement(NamedTuple):
    """Where arrays live: one device (``mesh is None``) or a 1-D ``'data'`` mesh."""

    mesh: Mesh | None

    def replicate(self, tree: Any) -> Any:
        """Put ``tree`` on the device(s): one copy per device when data parallel."""
        if self.mesh is None:
            return jax.device_put(tree)
        return _put(tree, NamedSharding(self.mesh, PartitionSpec()))

    def split(self, tree: Any) -> Any:
        """Put ``tree`` on the device(s), each device holding its share of the leading axis (a sweep's members)."""
        if self.mesh is None:
            return jax.device_put(tree)
        return _put(tree, NamedSharding(self.mesh, PartitionSpec("data")))

    def shard_batch(self, batch: Batch) -> Batch:
        """Inside a jitted function: split the batch along its first axis over the devices."""
        if self.mesh is None:
            return batch
        return jax.lax.with_sharding_constraint(batch, NamedSharding(self.mesh, PartitionSpec("data")))


def make_placement(devices: int = 1, batch_size: int | None = None) -> Placement:
    """A placement over the first ``devices`` local devices.

    ``batch_size``: the length of the batch's first axis, which is split over the devices (a
    sweep's batch leads with its members).

    Raises:
        ValueError: more devices asked for than there are, or a batch that does not split evenly.
    """
    available = jax.devices()
    if devices < 1 or devices > len(available):
        raise ValueError(
            f"`devices` {devices}: this machine has {len(available)} {available[0].platform} device(s) "
            "(on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N)"
        )
    if batch_size is not None and batch_size % devices:
        raise ValueError(f"`batch_size` {batch_size} does not split evenly over `devices` {devices}")
    if devices == 1:
        return Placement(None)
    return Placement(Mesh(np.array(available[:devices]), ("data",)))


def fuses_well(model: Any, platform: str | None = None) -> bool:
    """Whether the fused loop is the faster way to train ``model`` (a model config) on ``platform``.

    Yes (``True``) everywhere but for convolutions on CPU: there XLA compiles the convolutions
    inside the loop body without the rewrites it gives them in a program of one step (the optimised
    HLO shows the weight gradients' convolutions in other dimension orders and without parallel
    partitions), and the conv VAE's fused chunk runs slower than per-step dispatch (``bench.py``'s
    scaling table; docs/performance.md). ``platform`` defaults to JAX's default backend (``"cpu"``, ``"gpu"``, ``"tpu"``).
    """
    from pureflax import models

    return models.kind_of(model) != "conv" or (platform or jax.default_backend()) != "cpu"


@partial(jax.jit, static_argnums=(1, 2))
def epoch_order(key: jax.Array, num_train: int, batch_size: int) -> jax.Array:
    """The epoch's shuffled example indices as (steps, batch_size); the remainder is dropped."""
    steps = num_train // batch_size
    return jax.random.permutation(key, num_train)[: steps * batch_size].reshape(steps, batch_size)


@partial(jax.jit, static_argnums=(2, 3))
def shuffle(key: jax.Array, epoch: int | jax.Array, num_train: int, batch_size: int) -> jax.Array:
    """Epoch ``epoch``'s batch order, :func:`epoch_order` of ``fold_in(key, epoch)``, as one program."""
    return epoch_order(jax.random.fold_in(key, epoch), num_train, batch_size)


def _gather(data: Batch, order: jax.Array | None, i: jax.Array, placement: Placement) -> Batch:
    """Batch ``i``: its examples gathered from the resident dataset by ``order``, or, with no order, row ``i`` of a chunk's batches."""
    if order is None:
        return placement.shard_batch(jax.tree_util.tree_map(lambda x: x[i], data))
    idx = order[i]
    return placement.shard_batch(Batch(data.images[idx], data.labels[idx]))


def fed_from_each_process(runner: Runner, placement: Placement, capacity: int = 1) -> Runner:
    """``runner`` taking each chunk's batches from every process's own rows, for a mesh over several processes.

    The wrapped runner's ``data`` is the training split on the host (numpy, the same in every
    process). For a chunk, each process gathers only its part of each batch (the columns that its
    devices hold) and ``jax.make_array_from_process_local_data`` joins the parts into the chunk's
    global batches, (length, batch, ...), sharded along the batch; the program takes batch ``i`` as
    row ``i``. The order and the step are those of one process, so are the losses. A chunk is padded
    to ``capacity`` rows, as the fused program's metrics are, so one program serves every chunk.
    """
    sharding = NamedSharding(placement.mesh, PartitionSpec(None, "data"))

    def mine(order: np.ndarray, x: np.ndarray) -> jax.Array:
        shape = (*order.shape, *x.shape[1:])
        columns = sorted({index[1].indices(shape[1])[:2] for index in sharding.addressable_devices_indices_map(shape).values()})
        local = x[order[:, columns[0][0]:columns[-1][1]]]
        return jax.make_array_from_process_local_data(sharding, local, shape)

    def run(state, data: Batch, order, start, key, length: int):
        from pureflax.distributed import host

        rows = np.asarray(host(order))[start:start + length]
        rows = np.concatenate([rows, np.repeat(rows[-1:], max(capacity - length, 0), axis=0)])
        batches = Batch(mine(rows, np.asarray(data.images)), mine(rows, np.asarray(data.labels)))
        return runner(state, batches, None, 0, key, length)

    return run


class FusedRunner(NamedTuple):
    """Chunks of steps as one jitted loop, the state donated, metrics returned per step.

    The chunk's length is an argument of the program, not a constant in it: one program
    runs every chunk of up to ``capacity`` steps (a run whose epochs end mid log window
    compiles, or loads from the cache, once). A longer chunk gets a program of its own length.
    """

    program: Callable  # jitted (state, data, order, start, key, length, capacity) -> (state, metrics (capacity, 3))
    capacity: int

    def __call__(self, state, data: Batch, order, start, key, length: int):
        """Run the chunk; its metrics are ``max(length, capacity)`` rows (:func:`read_metrics` takes ``length``)."""
        return self.program(state, data, order, start, key, length, max(length, self.capacity))

    def lower(self, state, data: Batch, order, start, key, length: int):
        """The program that runs a chunk of ``length`` steps, lowered (``.compile()`` it)."""
        return self.program.lower(state, data, order, start, key, length, max(length, self.capacity))


def read_metrics(metrics: jax.Array, length: int) -> np.ndarray:
    """A chunk's metrics on the host, (length, 3) float64 ((length, 3, members) for a sweep): waits for the chunk, drops its padding."""
    from pureflax.distributed import host

    return np.asarray(host(metrics), np.float64)[:length]


def make_fused_runner(train_step: Callable, placement: Placement = Placement(None), capacity: int = 1,
                      members: int | None = None) -> FusedRunner:
    """A chunk of steps as one jitted loop (a ``lax.fori_loop`` over the steps), state donated.

    Args:
        capacity: the longest chunk one program runs (``TrainConfig.log_every`` in a run).
        members: for a sweep's step (its metrics one per member): how many; each step's metrics are then (3, members).
    """
    shape = (3,) if members is None else (3, members)

    @partial(jax.jit, static_argnums=(6,), donate_argnums=(0,))
    def program(state, data: Batch, order, start, key, length, capacity: int):
        def body(i, carry):
            state, metrics = carry
            state, step_metrics = train_step(state, _gather(data, order, start + i, placement), key)
            return state, metrics.at[i].set(jnp.stack(step_metrics).astype(metrics.dtype))

        return jax.lax.fori_loop(0, length, body, (state, jnp.zeros((capacity, *shape), jnp.float32)))

    return FusedRunner(program, capacity)


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


class Dispatched(NamedTuple):
    """A chunk handed out by :func:`dispatched`: its metrics still on the device (:func:`read_metrics`)."""

    chunk: Any  # the chunk (a pureflax.rundir.Chunk: epoch, start, length)
    metrics: jax.Array
    state: Any  # the state after this chunk, when it was asked for (``sync``) or the chunk is the last; else None
    seconds: float  # how long its dispatch took (the first one's: compiling, or loading, the program)


class Clock:
    """Times the chunks of one or more :func:`dispatched` loops as they are handed out.

    ``compile`` is the first dispatch's seconds: compiling (or loading) the program that runs
    every chunk, 0 until that chunk has been handled; ``compiled`` says whether it has;
    ``steps()`` is the seconds from the clock's start to now, less ``compile``.
    """

    def __init__(self) -> None:
        self.began, self.first = time.perf_counter(), None

    def timed(self, chunks: Iterator[Dispatched]) -> Iterator[Dispatched]:
        """``chunks`` as they come; the first one's dispatch time becomes ``compile`` once it has been handled."""
        for done in chunks:
            yield done
            if self.first is None:
                self.first = done.seconds

    @property
    def compiled(self) -> bool:
        """Whether the first chunk has been handed out and handled."""
        return self.first is not None

    @property
    def compile(self) -> float:
        """The first dispatch's seconds (0 before it)."""
        return self.first or 0.0

    def steps(self) -> float:
        """Seconds from the clock's start to now, less :attr:`compile`."""
        return time.perf_counter() - self.began - self.compile


def dispatched(runner: Runner, state: Any, data: Batch, order: Callable[[int], jax.Array], key: jax.Array,
               chunks: Iterator[Any], sync: Callable[[Any], bool]) -> Iterator[Dispatched]:
    """Run ``chunks`` one after another, each dispatched before the one before it is handed out.

    So the host reads and logs a chunk while the next one computes. A chunk for which ``sync(chunk)``
    is true (asked right after its dispatch: a checkpoint is due, a signal came) is handed out at once,
    with the state after it, before anything else is dispatched: a save reads that state before the
    next chunk donates it. The last chunk comes with the state too. ``order(epoch)``: the epoch's batch order.
    """
    before = None
    for chunk in chunks:
        start = time.perf_counter()
        state, metrics = runner(state, data, order(chunk.epoch), chunk.start, key, chunk.length)
        done = Dispatched(chunk, metrics, None, time.perf_counter() - start)
        if before is not None:
            yield before
        before = done
        if sync(chunk):
            yield done._replace(state=state)
            before = None
    if before is not None:
        yield before._replace(state=state)
