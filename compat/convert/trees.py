"""The tree helpers every part of the converter shares: the error, paths, checks of one array."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import flax.core
import jax
import numpy as np
import optax

Path = tuple[str, ...]


class ConversionError(ValueError):
    """Two trees that should correspond do not: the message names the path, both shapes and dtypes."""


def is_masked(x: Any) -> bool:
    """optax.multi_transform puts a MaskedNode where a frozen param's state would be."""
    return isinstance(x, optax.MaskedNode)


def is_array(x: Any) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def apply(fn: Callable[[Any], Any], x: Any) -> Any:
    """``fn(x)`` for an array, its shape for a ``ShapeDtypeStruct``; a MaskedNode stays one."""
    if is_masked(x):
        return x
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.eval_shape(fn, x)
    return fn(x)


def flatten(tree: Any):
    """Leaves with paths, a MaskedNode counting as a leaf so masks survive conversion."""
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_masked)


def plain(tree: Any) -> Any:
    """FrozenDicts to dicts, so dict paths compare equal whatever Flax handed us."""
    return flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree


def like_frozen(filled: Any, like: Any) -> Any:
    """``filled`` frozen where ``like`` was a FrozenDict, as it is otherwise."""
    return flax.core.freeze(filled) if isinstance(like, flax.core.FrozenDict) else filled


def has_leaves(tree: Any) -> bool:
    return bool(jax.tree_util.tree_leaves(tree))


def leaf_paths(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(k, simple=True, separator="/") for k, _ in flatten(tree)[0]]


def get(tree: Mapping, path: Path, where: str) -> Any:
    node = tree
    for depth, name in enumerate(path):
        if not isinstance(node, Mapping) or name not in node:
            have = sorted(node) if isinstance(node, Mapping) else type(node).__name__
            raise ConversionError(
                f"{where}: the functional tree has no {'/'.join(path[: depth + 1])} (found {have}); a model whose layers "
                "are named otherwise converts with pureflax.compat.migrate (layers matched by structure) or names="
            )
        node = node[name]
    return node


def put(tree: dict, path: Path, value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def check_shape(where: str, source: Any, target_shape: tuple[int, ...], rule: Any = None, dtypes: str = "") -> None:
    """``source``'s shape is ``target_shape`` through ``rule`` (a :class:`layouts.Rule`; None: as is)."""
    shape = tuple(np.shape(source))
    expected = tuple(rule.functional_shape(target_shape)) if rule is not None else tuple(target_shape)
    if shape != expected:
        detail = "" if rule is None or rule.name == "as is" else f" ({rule.name} from {tuple(target_shape)})"
        raise ConversionError(f"{where}: source shape {shape} does not match target shape {expected}{detail}{dtypes}")


def check_leaf(where: str, source: Any, target: Any, rule: Any = None) -> None:
    """THE check of one array against its target: the shape through ``rule``, then the dtype."""
    if is_masked(source) or is_masked(target):
        if not (is_masked(source) and is_masked(target)):
            raise ConversionError(f"{where}: one tree freezes this param and the other does not")
        return
    have, want = getattr(source, "dtype", None), getattr(target, "dtype", None)
    dtypes = f"; dtypes {np.dtype(have) if have is not None else '?'} and {np.dtype(want) if want is not None else '?'}"
    check_shape(where, source, tuple(np.shape(target)), rule, dtypes)
    if have is not None and want is not None and np.dtype(have) != np.dtype(want):
        raise ConversionError(
            f"{where}: source dtype {np.dtype(have)} does not match target dtype {np.dtype(want)} "
            f"(source shape {tuple(np.shape(source))}, target shape {tuple(np.shape(target))})"
        )


def no_extra(tree: Mapping, used: set[str]) -> None:
    """Refuse a source with arrays the target has no place for (nothing is dropped silently)."""
    theirs = set(leaf_paths(tree))
    if theirs - used:
        raise ConversionError(f"the functional tree has params the target lacks: {sorted(theirs - used)}")
