"""Model state: BatchNorm's running statistics, in the functional layout (Linen's ``batch_stats``).

The functional model state is ``{'encoder': {'norm_0': {'mean', 'var'}}}``. NNX keeps it as
``nnx.BatchStat`` variables at the same paths, Linen as the dict itself; Equinox keeps it in an
``eqx.nn.State`` indexed by the ``StateIndex`` of each BatchNorm, or (a registered layer) in
fields of the module itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pureflax.compat.convert import layouts, leaves
from pureflax.compat.convert.params import collect, fill
from pureflax.compat.convert.pytorch import StateDict
from pureflax.compat.convert.trees import (
    ConversionError, Path, check_leaf, get, has_leaves, leaf_paths, like_frozen, no_extra, plain, put,
)

# eqx.nn.BatchNorm(mode="batch") divides its running statistics by 1 - momentum**counter. Filled
# from the functional form its counter is set here: momentum**counter is then exactly 0 in float32,
# so it divides by exactly 1, and its training updates the statistics by Flax's rule from then on.
SETTLED_COUNTER = 2**30


class Stats(NamedTuple):
    """One BatchNorm's running statistics in an ``eqx.nn.State`` (its values by StateIndex marker)."""

    path: Path  # functional path of the layer
    where: str  # the module's path, for messages
    markers: tuple  # the StateIndex markers it reads
    get: Callable[[dict], tuple[Any, ...]]  # values -> the statistics, in `names` order, as Flax's rule reads them
    put: Callable[[dict, tuple[Any, ...]], None]  # write the statistics into values
    like: Callable[[dict], tuple[Any, ...]]  # values -> the arrays the statistics are checked against
    names: tuple[str, ...] = ("mean", "var")  # the functional names


def _indexed_stats(m: Any, row: layouts.Layout) -> tuple:
    """A layer whose statistics are the tuple at one StateIndex (pureflax's BatchNorm, a registered layer)."""
    marker = getattr(m, row.state_index).marker
    names = tuple(name for _, name in row.statistics)

    def put_values(values: dict, stats: tuple) -> None:
        values[marker] = tuple(stats)

    return (marker,), lambda values: tuple(values[marker]), put_values, lambda values: tuple(values[marker]), names


def _eqx_ema_stats(m: eqx.nn.BatchNorm, where: str) -> tuple:
    first, ema = m.ema_first_time_index.marker, m.ema_state_index.marker

    def get_values(values: dict) -> tuple[Any, Any]:
        fresh = values[first]
        if not isinstance(fresh, (jax.ShapeDtypeStruct, jax.core.Tracer)) and bool(fresh):  # under jit: not knowable
            # its next training step overwrites the buffers with the batch's statistics: they mean nothing yet
            raise ConversionError(
                f"{where}: this eqx.nn.BatchNorm's state is still marked first-time (never trained), so its running "
                "statistics are undefined: train it a step, or, if you filled its statistics yourself, also set "
                "state = state.set(layer.ema_first_time_index, jnp.array(False))"
            )
        return tuple(values[ema])

    def put_values(values: dict, stats: tuple) -> None:
        values[first], values[ema] = jnp.asarray(False), tuple(stats)

    return (first, ema), get_values, put_values, lambda values: tuple(values[ema]), ("mean", "var")


def _eqx_batch_stats(m: eqx.nn.BatchNorm) -> tuple:
    counter, hidden = m.batch_counter.marker, m.batch_state_index.marker

    def get_values(values: dict) -> tuple[Any, Any]:
        (mean, var), n = values[hidden], values[counter]
        if isinstance(n, jax.ShapeDtypeStruct):
            return mean, var
        scale = jnp.where(n == 0, 1, 1 - m.momentum**n)  # what its inference mode divides by
        return mean / scale, var / scale

    def put_values(values: dict, stats: tuple) -> None:
        values[counter] = jnp.asarray(SETTLED_COUNTER, np.dtype(values[counter].dtype))
        values[hidden] = tuple(stats)

    return (counter, hidden), get_values, put_values, lambda values: tuple(values[hidden]), ("mean", "var")


def _stats_of(m: Any, row: layouts.Layout, where: str) -> tuple | None:
    if isinstance(m, eqx.nn.BatchNorm) and row.cls is eqx.nn.BatchNorm:
        return _eqx_ema_stats(m, where) if m.mode == "ema" else _eqx_batch_stats(m)
    return _indexed_stats(m, row) if row.state_index else None


def eqx_stats(model: eqx.Module, names: Mapping[str, str] | None) -> list[Stats]:
    """The stateful layers of an Equinox model, with their functional paths (after ``names``)."""
    nodes = leaves.eqx_nodes(model)
    layers = {node.form: node.path for node in nodes if node.form}
    leaves.check_names("names", dict(names or {}), layers)
    found = []
    for node in nodes:
        row = layouts.layout_of(node.module)
        where = jax.tree_util.keystr(node.keys) or "the model"
        parts = _stats_of(node.module, row, where) if row is not None else None
        if parts is not None:
            found.append(Stats(leaves.renamed(node.form, node.path, layers, dict(names or {})), where, *parts))
    return found


def eqx_field_stats(model: eqx.Module, names: Mapping[str, str] | None) -> list[tuple[Callable, Path, str]]:
    """Registered layers keeping their statistics in their own fields: (getter, functional path, where)."""
    nodes = leaves.eqx_nodes(model)
    layers = {node.form: node.path for node in nodes if node.form}
    found = []
    for node in nodes:
        row = layouts.layout_of(node.module)
        if row is None or row.state_index or not row.statistics or row.form != "equinox" or row.cls is eqx.nn.BatchNorm:
            continue
        path = leaves.renamed(node.form, node.path, layers, dict(names or {}))
        for attr, name in row.statistics:
            def getter(m, keys=node.keys, attr=attr):
                for key in keys:
                    m = m[key.idx] if isinstance(key, jax.tree_util.SequenceKey) else getattr(m, key.name)
                return getattr(m, attr)
            found.append((getter, path + (name,), f"{jax.tree_util.keystr(node.keys)}.{attr}"))
    return found


def _values(state: eqx.nn.State) -> tuple[tuple, dict]:
    """An ``eqx.nn.State``'s markers and a fresh dict of its values (the State itself is not touched)."""
    values, markers = state.tree_flatten()
    return markers, dict(zip(markers, values))


def _check_markers(stats: Stats, values: dict) -> None:
    if any(marker not in values for marker in stats.markers):
        raise ConversionError(
            f"{stats.where}: the eqx.nn.State does not hold this BatchNorm's statistics: build it from this "
            "model (eqx.nn.make_with_state(Model)(...) or eqx.nn.State(model))"
        )


def eqx_to_functional(state: eqx.nn.State | None, model: eqx.Module, names: Mapping[str, str] | None) -> dict:
    out: dict = {}
    _, values = _values(state) if state is not None else ((), {})
    for stats in eqx_stats(model, names):
        if state is None:
            raise ConversionError(f"{stats.where}: the model keeps BatchNorm statistics: pass (model, its eqx.nn.State)")
        _check_markers(stats, values)
        for name, value in zip(stats.names, stats.get(values)):
            put(out, stats.path + (name,), value)
    for getter, path, _ in eqx_field_stats(model, names):
        put(out, path, getter(model))
    return out


def eqx_module_from_functional(tree: Mapping, model: eqx.Module, names: Mapping[str, str] | None) -> tuple[eqx.Module, set]:
    """``model`` with the statistics its registered layers keep in fields taken from ``tree``; the paths used."""
    found = eqx_field_stats(model, names)
    if not found:
        return model, set()
    sources = []
    for getter, path, where in found:
        source = get(tree, path, where)
        check_leaf(where, source, getter(model))
        sources.append(source)
    getters = [getter for getter, _, _ in found]
    model = eqx.tree_at(lambda m: [g(m) for g in getters], model, sources)
    return model, {"/".join(path) for _, path, _ in found}


def eqx_from_functional(tree: Mapping, like: eqx.nn.State, model: eqx.Module, names: Mapping[str, str] | None,
                        used: set | None = None) -> eqx.nn.State:
    markers, values = _values(like)
    used = set(used or ())
    for stats in eqx_stats(model, names):
        _check_markers(stats, values)
        sources = []
        for name, target in zip(stats.names, stats.like(values)):
            source = get(tree, stats.path + (name,), stats.where)
            check_leaf(f"{stats.where} {name}", source, target)
            sources.append(source)
            used.add("/".join(stats.path + (name,)))
        stats.put(values, tuple(sources))
    no_extra(tree, used)
    return eqx.nn.State.tree_unflatten(markers, tuple(values[marker] for marker in markers))


def state_to_functional(model_state: Any, model: Any = None, *, names: Mapping[str, str] | None = None) -> dict:
    """A model state in the functional layout (Linen's ``batch_stats``).

    Args:
        model_state: an ``eqx.nn.State``, an NNX ``State`` of ``nnx.BatchStat`` (pure or boxed),
            a Linen ``batch_stats`` dict, or ``None`` (then taken from ``model`` if it is an NNX module).
        model: the Equinox module whose StateIndexes index an ``eqx.nn.State`` (needed for one), or the NNX module.
        names: the form's layer paths -> functional paths, as for the params.

    Returns:
        ``{'encoder': {'norm_0': {'mean': ..., 'var': ...}}}``; ``{}`` for a model without state.
    """
    if isinstance(model_state, eqx.nn.State):
        if not isinstance(model, eqx.Module):
            raise ConversionError("an eqx.nn.State converts with the Equinox module that indexes it: pass model=")
        return eqx_to_functional(model_state, model, names)
    if isinstance(model_state, StateDict):  # its running statistics; num_batches_tracked is not Flax's
        return collect(model_state, leaves.table(model_state, names, strict=False))
    if model_state is None and isinstance(model, eqx.Module):
        return eqx_to_functional(None, model, names)
    if model_state is None and isinstance(model, nnx.Module):
        model_state = nnx.state(model, nnx.BatchStat)
    if isinstance(model_state, nnx.State):
        model_state = nnx.as_pure(model_state)
        return collect(model_state, leaves.table(model_state, names, strict=False))
    if model_state is None:
        return {}
    if isinstance(model_state, Mapping):
        return collect(plain(model_state), leaves.table(plain(model_state), names, strict=False))
    raise ConversionError(f"cannot convert a model state of type {type(model_state).__name__}: expected an "
                          "eqx.nn.State, an nnx.State of BatchStats or a batch_stats dict")


def state_from_functional(tree: Mapping, like_state: Any, model: Any = None, *,
                          names: Mapping[str, str] | None = None) -> Any:
    """``like_state``'s form filled with the functional model state ``tree``.

    Args:
        tree: the functional model state (Linen's ``batch_stats`` layout; ``{}`` for none).
        like_state: an ``eqx.nn.State`` (with ``model``, whose StateIndexes it holds: build it with
            ``eqx.nn.State(model)`` or ``eqx.nn.make_with_state``), an NNX ``State`` of BatchStats,
            a ``batch_stats`` dict, or ``None`` (an NNX ``model``'s BatchStats; else no state at all).
        model: the Equinox module (for an ``eqx.nn.State``) or the NNX module.
        names: the form's layer paths -> functional paths.

    Returns:
        A new ``eqx.nn.State`` (``like_state`` stays usable), a pure NNX ``State``, a dict, or ``None``.

    Raises:
        ConversionError: a missing or extra statistic, a shape or dtype that differs (path, both named).
    """
    tree = plain(tree)
    if isinstance(like_state, eqx.nn.State):
        if not isinstance(model, eqx.Module):
            raise ConversionError("an eqx.nn.State is filled with the Equinox module that indexes it: pass model=")
        used = {"/".join(path) for _, path, _ in eqx_field_stats(model, names)}
        return eqx_from_functional(tree, like_state, model, names, used)
    if isinstance(like_state, StateDict):
        return fill(tree, like_state, leaves.table(like_state, names, strict=False))
    if like_state is None and isinstance(model, nnx.Module):
        like_state = nnx.state(model, nnx.BatchStat)
    if isinstance(like_state, nnx.State):
        like_state = nnx.as_pure(like_state)
        return fill(tree, like_state, leaves.table(like_state, names, strict=False))
    if like_state is None:
        if has_leaves(tree):
            raise ConversionError(f"the target keeps no model state but the functional tree has {sorted(leaf_paths(tree))}")
        return None
    if isinstance(like_state, Mapping):
        return like_frozen(fill(tree, plain(like_state), leaves.table(plain(like_state), names, strict=False)), like_state)
    raise ConversionError(f"cannot fill a model state of type {type(like_state).__name__}")
