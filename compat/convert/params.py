"""Params and optimiser state: each array carried to its functional place by its layout's rule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import numpy as np
from flax import nnx

from pureflax.compat.convert import leaves
from pureflax.compat.convert.pytorch import StateDict
from pureflax.compat.convert.leaves import Leaf
from pureflax.compat.convert.trees import (
    ConversionError, apply, check_leaf, check_shape, flatten, get, like_frozen, no_extra, plain, put,
)


def is_flax_variables(x: Any) -> bool:
    return isinstance(x, Mapping) and not isinstance(x, nnx.State) and set(x.keys()) == {"params"}


def is_linen_variables_with_state(x: Any) -> bool:
    return isinstance(x, Mapping) and not isinstance(x, nnx.State) and "params" in x and len(x) > 1


def unboxed(params: Any) -> Any:
    """An NNX module or a ``State`` of ``nnx.Variable`` boxes as a pure params ``State``; anything else as it is."""
    if isinstance(params, nnx.Module):
        return nnx.as_pure(nnx.state(params, nnx.Param))
    return nnx.as_pure(params) if isinstance(params, nnx.State) else params


def refuse_linen_state(obj: Any) -> None:
    if is_linen_variables_with_state(plain(obj)):
        raise ConversionError(
            f"Linen variables with {sorted(set(obj) - {'params'})} besides params: use "
            "convert.variables_to_functional(variables) -> (params, model_state), or pass variables['params']"
        )


def param_names(params: Any, *, names: Mapping[str, str] | None = None) -> Any:
    """A tree shaped like ``params`` (any form) whose leaves are functional paths.

    Example: the leaf for ``model.encoder.layers[0].weight`` is ``'encoder/Dense_0/kernel'``;
    for Flax variables, ``variables['params']['encoder']['Dense_0']['kernel']`` gives the same.
    """
    params = unboxed(params)
    if not isinstance(params, (eqx.Module, nnx.State, StateDict)):
        params = plain(params)
        if is_flax_variables(params):
            return {"params": param_names(params["params"], names=names)}
    found = leaves.table(params, names)

    def name(path, leaf):
        entry = found.get(jax.tree_util.keystr(path))
        return leaf if entry is None else "/".join(entry.path)

    return jax.tree_util.tree_map_with_path(name, params)


def params_to_functional(params: Any, *, names: Mapping[str, str] | None = None, flatten: Mapping[str, Any] | None = None) -> dict:
    """The functional params dict of an Equinox module, an NNX module or ``State``, Flax variables or a dict."""
    params = unboxed(params)
    if not isinstance(params, (eqx.Module, nnx.State, StateDict)):
        refuse_linen_state(params)
        params = plain(params)
        if is_flax_variables(params):
            return params_to_functional(params["params"], names=names, flatten=flatten)
        if not isinstance(params, Mapping):
            raise ConversionError(f"cannot convert a {type(params).__name__}: expected an Equinox or NNX module, Flax variables or a dict")
        if not names and not flatten:
            return params
    return collect(params, leaves.table(params, names, flatten))


def collect(tree: Any, found: Mapping[str, Leaf]) -> dict:
    """The functional dict of the arrays of ``tree`` that ``found`` names (converted by their rules)."""
    out: dict = {}
    for keys, leaf in flatten(tree)[0]:
        entry = found.get(jax.tree_util.keystr(keys))
        if entry is not None:  # else not a param: a function inside eqx.nn.Lambda, say
            put(out, entry.path, apply(entry.rule.to_functional, leaf))
    return out


def fill(tree: Mapping, like: Any, found: Mapping[str, Leaf]) -> Any:
    """``like`` with each array of ``found`` taken from ``tree`` (checked, converted); the rest kept."""
    leaves_with_path, treedef = flatten(like)
    out, used = [], set()
    for keys, target in leaves_with_path:
        leaf = found.get(jax.tree_util.keystr(keys))
        if leaf is None:
            out.append(target)  # not a param: kept from the target
            continue
        source = get(tree, leaf.path, leaf.where)
        check_leaf(leaf.where, source, target, leaf.rule)
        shape = tuple(np.shape(target))
        out.append(apply(lambda x, rule=leaf.rule, shape=shape: rule.from_functional(x, shape), source))
        used.add("/".join(leaf.path))
    no_extra(tree, used)
    return jax.tree_util.tree_unflatten(treedef, out)


def params_from_functional(tree: Mapping, like: Any, *, names: Mapping[str, str] | None = None,
                           flatten: Mapping[str, Any] | None = None) -> Any:
    """``like`` (Equinox or NNX module, NNX ``State``, Flax variables or functional dict) filled with ``tree``'s values.

    An NNX module comes back as a new module (``nnx.merge`` of ``like``'s graph with the
    filled params, its other variables such as BatchStats kept); ``like`` itself is left as it was.
    """
    tree = plain(tree)
    if isinstance(like, nnx.Module):
        graphdef, params, rest = nnx.split(like, nnx.Param, ...)
        return nnx.merge(graphdef, params_from_functional(tree, nnx.as_pure(params), names=names, flatten=flatten), rest)
    like = nnx.as_pure(like) if isinstance(like, nnx.State) else like  # a State of boxes is filled as a pure one
    refuse_linen_state(like)
    if is_flax_variables(plain(like)):
        return like_frozen({"params": params_from_functional(tree, plain(like)["params"], names=names, flatten=flatten)}, like)
    if isinstance(like, (eqx.Module, nnx.State, StateDict)):
        return fill(tree, like, leaves.table(like, names, flatten))
    if isinstance(like, Mapping):
        return like_frozen(fill(tree, plain(like), leaves.table(plain(like), names, flatten)), like)
    raise ConversionError(f"cannot fill a {type(like).__name__}: expected an Equinox or NNX module, Flax variables or a dict")


def _params_node(like_params: Any):
    """A predicate for subtrees of an optimiser state that are shaped like ``like_params``."""
    if isinstance(like_params, (eqx.Module, nnx.State, StateDict)):
        cls = type(like_params)
        return lambda x: isinstance(x, cls)
    if is_flax_variables(plain(like_params)):
        return is_flax_variables
    # a dict with the params' own top-level names: not optax's other dicts (multi_transform's inner_states)
    top = set(plain(like_params))
    return lambda x: isinstance(x, Mapping) and set(x) == top


def opt_state_to_functional(opt_state: Any, params: Any, *, names: Mapping[str, str] | None = None,
                            flatten: Mapping[str, Any] | None = None) -> Any:
    """Convert every params-shaped subtree of ``opt_state`` (whose params are ``params``)."""
    is_params = _params_node(params)
    return jax.tree_util.tree_map(
        lambda x: params_to_functional(x, names=names, flatten=flatten) if is_params(x) else x, opt_state, is_leaf=is_params
    )


def opt_state_from_functional(opt_state: Any, like_opt_state: Any, like_params: Any, *,
                              names: Mapping[str, str] | None = None, flatten: Mapping[str, Any] | None = None) -> Any:
    """``like_opt_state`` filled from a functional ``opt_state`` of the same optimiser."""
    is_params = _params_node(like_params)
    from pureflax.compat.convert import torch_optim

    if isinstance(opt_state, torch_optim.TorchOptimizer):  # torch's, moments functional: laid out as like's optax state
        opt_state = torch_optim.as_optax(opt_state, like_opt_state, is_params)

    def fill_one(like: Any, source: Any) -> Any:
        if is_params(like):
            return params_from_functional(source, like, names=names, flatten=flatten)
        check_shape("opt_state", source, tuple(np.shape(like)))
        return source

    try:
        return jax.tree_util.tree_map(fill_one, like_opt_state, opt_state, is_leaf=is_params)
    except ValueError as err:
        if isinstance(err, ConversionError):
            raise
        raise ConversionError(
            "the optimiser states do not match: were both made by the same optimiser?\n"
            f"  source: {jax.tree_util.tree_structure(opt_state)}\n"
            f"  target: {jax.tree_util.tree_structure(like_opt_state)}"
        ) from None
