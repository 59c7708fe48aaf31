"""Many processes, one run: JAX's own multi-controller runtime (``jax.distributed``).

Every process runs the same program on its own devices; ``jax.devices()`` then lists every
process's devices and one ``Mesh`` spans them. Process 0 is the primary: it alone writes the run
folder's log, pictures and lock; every process takes part in each orbax save.

Examples:
    >>> primary(), process_count()  # a single process is its own primary
    (True, 1)
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def process_count() -> int:
    """How many processes the run spans (1 unless ``jax.distributed`` joined several)."""
    return jax.process_count()


def primary() -> bool:
    """Whether this process writes the run folder (process 0; a single process always)."""
    return jax.process_index() == 0


def host(tree: Any) -> Any:
    """``jax.device_get`` that also takes arrays spanning other processes' devices: their local copy.

    An array replicated over every process (params, metrics, test means) is read from this process's
    first shard; an array already on this process's devices (a single process) is read as it is.
    """

    def local(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ValueError(f"an array of shape {x.shape} is sharded over processes; only replicated ones can be read here")
            return np.asarray(x.addressable_data(0))
        return x

    return jax.device_get(jax.tree_util.tree_map(local, tree))


def barrier(name: str, timeout: float | int = 300.0) -> None:
    """Wait until every process gets here: a barrier of JAX's coordination service (a no-op in a single process)."""
    if jax.process_count() > 1:
        from jax._src import distributed as jax_distributed

        jax_distributed.global_state.client.wait_at_barrier(name, int(timeout * 1000))


class JoinError(RuntimeError):
    """The processes could not form one run (a coordinator that does not answer): exit status 2."""


def _answers(host: str, port: int, seconds: float | int) -> bool:
    import socket
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.2)
    return False


# The clusters whose jobs join without flags, through JAX's own detection: those it recognises from the
# environment alone (its Cloud TPU detection asks the VM's metadata server: a wait on every other machine).
AUTO_CLUSTERS = ("SlurmCluster", "OmpiCluster", "GkeTpuCluster")


def detected_cluster() -> tuple[str, int] | None:
    """``(name, processes)`` of the cluster job this process belongs to, when JAX detects one of several processes.

    Examples:
        >>> detected_cluster() is None  # not inside a SLURM, Open MPI or GKE TPU job of several processes
        True
    """
    from jax._src.clusters import ClusterEnv

    for env in ClusterEnv._cluster_types:
        if env.__name__ not in AUTO_CLUSTERS:
            continue
        try:
            if env.is_env_present() and env.get_process_count() > 1:
                return env.__name__.removesuffix("Cluster"), env.get_process_count()
        except (KeyError, ValueError):  # a variable set but not a count
            continue
    return None


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None, *, wait: float | int = 30.0, silence: float | int = 10.0,
               on_loss: Callable[[str], None] | None = None) -> None:
    """Join the run: ``jax.distributed.initialize``, with every process's devices in one ``jax.devices()``.

    All three ``None``: JAX takes them from the cluster job's environment (:func:`detected_cluster`).
    A process other than 0 first checks that the coordinator answers (within ``wait`` seconds),
    so a wrong address is one line rather than JAX's abort after its own timeout. Then a watch
    (:func:`watch`) stops this process, calling ``on_loss(message)``, once another process has
    been silent for ``silence`` seconds; JAX's own heartbeat (3x longer) stays the last resort.

    Raises:
        JoinError: the coordinator does not answer.
    """
    if coordinator is not None:  # None: JAX reads all three from the cluster's environment (detected_cluster)
        host, _, port = coordinator.rpartition(":")
        if process_id != 0 and not _answers(host, int(port), wait):
            raise JoinError(f"`coordinator` {coordinator} does not answer after {wait:.0f} s: start process 0 there first, "
                            "or check the address and port")
    jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=int(wait) + 30,
                               heartbeat_timeout_seconds=int(3 * silence))
    watch(silence, on_loss or stop_lost)


def stop_lost(message: str) -> None:
    """Print ``message`` on stderr and end this process at once, status 1 (another process is gone)."""
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()
    os._exit(1)  # the run's collectives would wait for the lost process forever; nothing here can be saved


def watch(silence: float, on_loss: Callable[[str], None], beat: float = 1.0) -> threading.Thread:
    """A thread that keeps this process's count in JAX's key-value store rising and watches every other's.

    A process whose count has not moved for ``silence`` seconds (killed, hung, its host gone) is
    reported through ``on_loss`` with one line naming it; a store that no longer answers means
    process 0, which holds it, is gone.
    """
    from jax._src import distributed as jax_distributed

    client, me, count = jax_distributed.global_state.client, jax.process_index(), jax.process_count()

    def run() -> None:
        seen: dict[int, tuple[str, float]] = {}
        beats = 0
        while True:
            beats += 1
            try:
                client.key_value_set(f"pureflax/alive/{me}", str(beats), allow_overwrite=True)
                for other in range(count):
                    if other == me:
                        continue
                    value, now = client.key_value_try_get(f"pureflax/alive/{other}") if _has(client, other) else "", time.monotonic()
                    if other not in seen or seen[other][0] != value:
                        seen[other] = (value, now)
                    elif now - seen[other][1] > silence:
                        on_loss(f"process {other} of {count} stopped answering {silence:.0f} s ago (killed, or its host is "
                                f"gone); process {me} stops too: start every process again with `resume`")
                        return
            except Exception:  # the store itself is gone: process 0 holds it
                if me != 0:
                    on_loss(f"process 0 of {count}, the coordinator, stopped answering (killed, or its host is gone); "
                            f"process {me} stops too: start every process again with `resume`")
                    return
            time.sleep(beat)

    thread = threading.Thread(target=run, name="pureflax-watch", daemon=True)
    thread.start()
    return thread


def _has(client: Any, other: int) -> bool:
    try:
        client.key_value_try_get(f"pureflax/alive/{other}")
        return True
    except Exception as err:  # not written yet: NOT_FOUND
        if "NOT_FOUND" in str(err) or "not found" in str(err).lower():
            return False
        raise


class Disagreement(ValueError):
    """The processes were started with different settings (exit status 2): names the first that differs."""


def agree(settings: dict[str, Any], timeout: float | int = 60.0) -> None:
    """Check that every process runs with the same ``settings`` (compared by a hash, through JAX's key-value store).

    Raises:
        Disagreement: in every process, naming the first process whose settings differ from process 0's.
    """
    if jax.process_count() == 1:
        return
    import hashlib
    import json

    from jax._src import distributed as jax_distributed

    client, me, ms = jax_distributed.global_state.client, jax.process_index(), int(timeout * 1000)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    client.key_value_set(f"pureflax/settings/{me}", json.dumps({"digest": digest, "settings": settings}, default=str))
    if me == 0:
        verdict = ""
        for other in range(1, jax.process_count()):
            theirs = json.loads(client.blocking_key_value_get(f"pureflax/settings/{other}", ms))
            if theirs["digest"] != digest and not verdict:
                names = sorted(k for k in set(settings) | set(theirs["settings"]) if str(settings.get(k)) != str(theirs["settings"].get(k)))
                shown = ", ".join(f"{k} {theirs['settings'].get(k)} (process 0: {settings.get(k)})" for k in names[:3])
                verdict = f"process {other} was started with other settings than process 0: {shown}; start every process with the same flags"
        verdict = verdict or "same"
        client.key_value_set("pureflax/settings/verdict", verdict)
    else:
        verdict = client.blocking_key_value_get("pureflax/settings/verdict", ms)
    if verdict != "same":
        raise Disagreement(verdict)
