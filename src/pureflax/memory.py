"""How much memory a program needs, known before it runs: a bound from tracing, XLA's plan from compiling, and what is free."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def _nbytes(aval: Any) -> int:
    try:
        return int(np.prod(aval.shape)) * np.dtype(aval.dtype).itemsize
    except (AttributeError, TypeError):  # a token, a key's extended dtype
        return 8 * int(np.prod(getattr(aval, "shape", ()) or (1,)))


def _jaxpr_bytes(jaxpr: Any) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += sum(_nbytes(v.aval) for v in eqn.outvars)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                total += _jaxpr_bytes(inner)
    return total


def traced_bytes(fn: Callable, *args: Any) -> int:
    """An upper bound of ``fn(*args)``'s memory: its arguments and every value it computes, all held at once (from tracing alone)."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    return sum(_nbytes(v.aval) for v in jaxpr.jaxpr.invars) + _jaxpr_bytes(jaxpr.jaxpr)


def available_bytes(device: jax.Device) -> int | None:
    """Memory free for arrays on ``device``: an accelerator's own limit less what is in use; on CPU the host's MemAvailable."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def compiled_bytes(fn: Callable, *args: Any) -> int:
    """``fn(*args)``'s memory as XLA plans it, its first argument donated: the arguments, outputs not aliased to them, and scratch."""
    memory = jax.jit(fn, donate_argnums=0).lower(*args).compile().memory_analysis()
    if memory is None:  # a backend that does not report it
        return traced_bytes(fn, *args)
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)
