"""Move params and optimiser state between the functional, Equinox, Flax linen and NNX forms, exactly.

Two functions do everything:

* :func:`to_functional` takes an Equinox module, Flax variables (``{'params': ...}``), a
  Flax ``TrainState`` or a :class:`pureflax.TrainState` (of any form) and returns the
  functional form: a params dict with Flax's paths, or a functional ``TrainState``.
* :func:`from_functional` fills the structure of ``like`` (an instance of the form you
  want; its arrays may be ``jax.ShapeDtypeStruct``) with the values of a functional tree,
  the way orbax restores into an abstract target.

Values are carried, never re-initialised: round trips are bit for bit. The only
arithmetic is the one transpose between Flax's ``kernel`` (in, out) and Equinox's
``weight`` (out, in), in :func:`_linear_leaf_names`. Optimiser states convert with their
params: every subtree of an optax state shaped like the params (Adam's ``mu``/``nu``,
EMA, MultiSteps accumulators, the masked trees of ``multi_transform``) is converted too.
Any mismatch raises :class:`ConversionError` naming the path and both shapes.

Example:
    >>> import jax
    >>> from pureflax import vae
    >>> from pureflax.compat import equinox_models, convert
    >>> params = vae.init(jax.random.PRNGKey(0), vae.VAEConfig(latent_dim=4))
    >>> like = equinox_models.VAE(latent_dim=4, key=jax.random.PRNGKey(1))
    >>> model = convert.from_functional(params, like=like)
    >>> bool((model.encoder.layers[0].weight == params['encoder']['Dense_0']['kernel'].T).all())
    True
    >>> back = convert.to_functional(model)
    >>> bool((back['encoder']['Dense_0']['kernel'] == params['encoder']['Dense_0']['kernel']).all())
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import flax.core
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state as flax_train_state

from pureflax.state import TrainState

FlaxTrainState = flax_train_state.TrainState


class ConversionError(ValueError):
    """Two trees that should correspond do not: the message names the path and both shapes."""


# ----------------------------------------------------------------------------- forms


def _is_flax_variables(x: Any) -> bool:
    return isinstance(x, Mapping) and set(x.keys()) == {"params"}


def _is_masked(x: Any) -> bool:
    """optax.multi_transform puts a MaskedNode where a frozen param's state would be."""
    return isinstance(x, optax.MaskedNode)


def _flatten(tree: Any):
    """Leaves with paths, a MaskedNode counting as a leaf so masks survive conversion."""
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked)


def _transpose(x: Any) -> Any:
    return x if _is_masked(x) else jnp.transpose(x)


def _plain(tree: Any) -> Any:
    """FrozenDicts to dicts, so dict paths compare equal whatever Flax handed us."""
    return flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree


# --------------------------------------------------------- the Equinox <-> Flax names


def _linear_leaf_names(module: eqx.Module) -> dict[str, tuple[tuple[str, ...], bool]]:
    """Map each array leaf of ``module`` (by ``keystr``) to its Flax path and whether to transpose.

    ``eqx.nn.Linear`` becomes ``{'kernel': weight.T, 'bias': bias}``: THE transpose.
    A module field keeps its name; item ``i`` of a list/tuple field is named by the
    module's ``flax_item_name`` (``'Dense_{i}'`` for a compact stack) or else
    ``'{field}_{i}'`` (``layers_{i}``, which is how ``flax.linen.Sequential`` names them).
    """
    names: dict[str, tuple[tuple[str, ...], bool]] = {}

    def visit(node: Any, keys: tuple, flax_path: tuple[str, ...]) -> None:
        if isinstance(node, eqx.nn.Linear):
            names[jax.tree_util.keystr(keys + (jax.tree_util.GetAttrKey("weight"),))] = (flax_path + ("kernel",), True)
            if node.bias is not None:
                names[jax.tree_util.keystr(keys + (jax.tree_util.GetAttrKey("bias"),))] = (flax_path + ("bias",), False)
            return
        if isinstance(node, eqx.Module):
            for field in dataclasses.fields(node):
                if field.metadata.get("static", False):
                    continue
                value = getattr(node, field.name)
                key = keys + (jax.tree_util.GetAttrKey(field.name),)
                if eqx.is_array(value):
                    raise ConversionError(
                        f"{jax.tree_util.keystr(keys) or 'the model'}: {type(node).__module__}.{type(node).__name__} "
                        f"holds arrays ({field.name}); only eqx.nn.Linear layers have a Flax counterpart here"
                    )
                if isinstance(value, (list, tuple)):
                    template = getattr(type(node), "flax_item_name", field.name + "_{i}")
                    for i, item in enumerate(value):
                        visit(item, key + (jax.tree_util.SequenceKey(i),), flax_path + (template.format(i=i),))
                else:
                    visit(value, key, flax_path + (field.name,))
            return
        if any(eqx.is_array(leaf) for leaf in jax.tree_util.tree_leaves(node)):
            raise ConversionError(
                f"{jax.tree_util.keystr(keys)}: only eqx.nn.Linear layers have a Flax counterpart "
                f"here, found {type(node).__name__}"
            )

    visit(module, (), ())
    return names


# ---------------------------------------------------------------- the NNX <-> Flax names


def _nnx_leaf_names(state: Any) -> dict[str, tuple[tuple[str, ...], bool]]:
    """Map each leaf of an NNX params ``State`` (by ``keystr``) to its Flax path; nothing is transposed.

    ``nnx.Linear`` keeps Linen's ``kernel`` (in, out) and ``bias``; item ``i`` of a ``layers``
    list (``FeedForward.layers``) is Linen's ``Dense_{i}``, the name ``nn.compact`` gives it.
    """
    names: dict[str, tuple[tuple[str, ...], bool]] = {}
    for keys, _ in _flatten(state)[0]:
        parts = [k.key for k in keys]
        path: list[str] = []
        for i, part in enumerate(parts):
            if isinstance(part, int) and i and parts[i - 1] == "layers":
                path[-1] = f"Dense_{part}"
            else:
                path.append(str(part))
        names[jax.tree_util.keystr(keys)] = (tuple(path), False)
    return names


def _nnx_params(model: nnx.Module) -> Any:
    """An NNX module's params as a pure ``State`` (arrays, not ``nnx.Param`` boxes)."""
    return nnx.as_pure(nnx.state(model, nnx.Param))


def _unboxed(params: Any) -> Any:
    """An NNX module or a ``State`` of ``nnx.Variable`` boxes as a pure params ``State``; anything else as it is."""
    if isinstance(params, nnx.Module):
        return _nnx_params(params)
    return nnx.as_pure(params) if isinstance(params, nnx.State) else params


def _leaf_names(params: Any) -> dict[str, tuple[tuple[str, ...], bool]]:
    return _linear_leaf_names(params) if isinstance(params, eqx.Module) else _nnx_leaf_names(params)


def _get(tree: Mapping, path: tuple[str, ...], where: str) -> Any:
    node = tree
    for depth, name in enumerate(path):
        if not isinstance(node, Mapping) or name not in node:
            have = sorted(node) if isinstance(node, Mapping) else type(node).__name__
            raise ConversionError(f"{where}: the functional tree has no {'/'.join(path[: depth + 1])} (found {have})")
        node = node[name]
    return node


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _check_leaf(where: str, source: Any, target: Any, transposed: bool) -> None:
    if _is_masked(source) or _is_masked(target):
        if not (_is_masked(source) and _is_masked(target)):
            raise ConversionError(f"{where}: one tree freezes this param and the other does not")
        return
    _check_shape(where, source, tuple(np.shape(target)), transposed)
    have, want = getattr(source, "dtype", None), getattr(target, "dtype", None)
    if have is not None and want is not None and np.dtype(have) != np.dtype(want):
        raise ConversionError(f"{where}: source dtype {np.dtype(have)} does not match target dtype {np.dtype(want)} (shape {tuple(np.shape(source))})")


def _check_shape(where: str, source: Any, target_shape: tuple[int, ...], transposed: bool) -> None:
    shape = tuple(np.shape(source))
    expected = target_shape[::-1] if transposed else target_shape
    if shape != tuple(expected):
        detail = f" (transposed from {tuple(target_shape)})" if transposed else ""
        raise ConversionError(f"{where}: source shape {shape} does not match target shape {tuple(expected)}{detail}")


# ------------------------------------------------------------------------ params


def param_names(params: Any) -> Any:
    """A tree shaped like ``params`` (any form) whose leaves are functional paths.

    Example: the leaf for ``model.encoder.layers[0].weight`` is ``'encoder/Dense_0/kernel'``;
    for Flax variables, ``variables['params']['encoder']['Dense_0']['kernel']`` gives the same.
    """
    params = _unboxed(params)
    if isinstance(params, (eqx.Module, nnx.State)):
        names = _leaf_names(params)

        def name(path, leaf):
            entry = names.get(jax.tree_util.keystr(path))
            return leaf if entry is None else "/".join(entry[0])

        return jax.tree_util.tree_map_with_path(name, params)
    plain = _plain(params)
    inner = plain["params"] if _is_flax_variables(plain) else plain
    named = jax.tree_util.tree_map_with_path(lambda p, _: jax.tree_util.keystr(p, simple=True, separator="/"), inner)
    return {"params": named} if _is_flax_variables(plain) else named



def params_to_functional(params: Any) -> dict:
    """The functional params dict of an Equinox module, an NNX module or params ``State``, Flax variables or a dict."""
    params = _unboxed(params)
    if isinstance(params, (eqx.Module, nnx.State)):
        out: dict = {}
        names = _leaf_names(params)
        for keys, leaf in _flatten(params)[0]:
            if jax.tree_util.keystr(keys) not in names:
                continue  # not a param: a function inside eqx.nn.Lambda, say
            flax_path, transpose = names[jax.tree_util.keystr(keys)]
            _set(out, flax_path, _transpose(leaf) if transpose else leaf)
        return out
    params = _plain(params)
    if _is_flax_variables(params):
        return _plain(params["params"])
    if isinstance(params, Mapping):
        return params
    raise ConversionError(f"cannot convert a {type(params).__name__}: expected an Equinox or NNX module, Flax variables or a dict")


def params_from_functional(tree: Mapping, like: Any) -> Any:
    """``like`` (Equinox or NNX module, NNX params ``State``, Flax variables or functional dict) filled with ``tree``'s values.

    An NNX module comes back as a new module (``nnx.merge`` of ``like``'s graph with the
    filled params); ``like`` itself is left as it was.
    """
    tree = _plain(tree)
    if isinstance(like, nnx.Module):
        graphdef, params, rest = nnx.split(like, nnx.Param, ...)
        return nnx.merge(graphdef, params_from_functional(tree, nnx.as_pure(params)), rest)
    like = nnx.as_pure(like) if isinstance(like, nnx.State) else like  # a State of boxes is filled as a pure one
    if isinstance(like, (eqx.Module, nnx.State)):
        names = _leaf_names(like)
        leaves_with_path, treedef = _flatten(like)
        leaves, used = [], set()
        for keys, target in leaves_with_path:
            where = jax.tree_util.keystr(keys)
            if where not in names:
                leaves.append(target)  # not a param: kept from the target
                continue
            flax_path, transpose = names[where]
            source = _get(tree, flax_path, where)
            _check_leaf(where, source, target, transpose)
            leaves.append(_transpose(source) if transpose else source)
            used.add("/".join(flax_path))
        _no_extra(tree, used)
        return jax.tree_util.tree_unflatten(treedef, leaves)
    if _is_flax_variables(_plain(like)):
        filled = {"params": params_from_functional(tree, _plain(like)["params"])}
        return flax.core.freeze(filled) if isinstance(like, flax.core.FrozenDict) else filled
    if isinstance(like, Mapping):
        return _fill_dict(tree, _plain(like))
    raise ConversionError(f"cannot fill a {type(like).__name__}: expected an Equinox or NNX module, Flax variables or a dict")


def _fill_dict(tree: Mapping, like: Mapping) -> Any:
    """``tree`` checked against ``like`` leaf by leaf (same paths, same shapes), in ``like``'s structure."""
    leaves_with_path, treedef = _flatten(like)
    leaves = []
    for keys, target in leaves_with_path:
        path = tuple(str(k.key) for k in keys)
        where = "/".join(path)
        source = _get(tree, path, where)
        _check_leaf(where, source, target, False)
        leaves.append(source)
    _no_extra(tree, {"/".join(str(k.key) for k in keys) for keys, _ in leaves_with_path})
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _no_extra(tree: Mapping, used: set[str]) -> None:
    """Refuse a source with params the target has no place for (nothing is dropped silently)."""
    theirs = {jax.tree_util.keystr(k, simple=True, separator="/") for k, _ in _flatten(tree)[0]}
    if theirs - used:
        raise ConversionError(f"the functional tree has params the target lacks: {sorted(theirs - used)}")


# ---------------------------------------------------------------- optimiser state


def _params_node(like_params: Any):
    """A predicate for subtrees of an optimiser state that are shaped like ``like_params``."""
    if isinstance(like_params, (eqx.Module, nnx.State)):
        cls = type(like_params)
        return lambda x: isinstance(x, cls)
    if _is_flax_variables(_plain(like_params)):
        return _is_flax_variables
    # a dict with the params' own top-level names: not optax's other dicts (multi_transform's inner_states)
    top = set(_plain(like_params))
    return lambda x: isinstance(x, Mapping) and set(x) == top


def opt_state_to_functional(opt_state: Any, params: Any) -> Any:
    """Convert every params-shaped subtree of ``opt_state`` (whose params are ``params``)."""
    is_params = _params_node(params)
    return jax.tree_util.tree_map(
        lambda x: params_to_functional(x) if is_params(x) else x, opt_state, is_leaf=is_params
    )


def opt_state_from_functional(opt_state: Any, like_opt_state: Any, like_params: Any) -> Any:
    """``like_opt_state`` filled from a functional ``opt_state`` of the same optimiser."""
    is_params = _params_node(like_params)

    def fill(like: Any, source: Any) -> Any:
        if is_params(like):
            return params_from_functional(source, like)
        _check_shape("opt_state", source, tuple(np.shape(like)), False)
        return source

    try:
        return jax.tree_util.tree_map(fill, like_opt_state, opt_state, is_leaf=is_params)
    except ValueError as err:
        if isinstance(err, ConversionError):
            raise
        raise ConversionError(
            "the optimiser states do not match: were both made by the same optimiser?\n"
            f"  source: {jax.tree_util.tree_structure(opt_state)}\n"
            f"  target: {jax.tree_util.tree_structure(like_opt_state)}"
        ) from None


# ------------------------------------------------------------------ the two calls


def _step(step: Any) -> Any:
    """The step as an int32 array (Flax starts it as a Python int); shapes-only stays shapes-only."""
    return step if isinstance(step, jax.ShapeDtypeStruct) else jnp.asarray(step, jnp.int32)


def _is_nnx_pair(x: Any) -> bool:
    """An NNX module and its ``nnx.Optimizer`` (which, since Flax 0.11, does not hold the model)."""
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], nnx.Module) and isinstance(x[1], nnx.Optimizer)


def _nnx_pair_to_functional(model: nnx.Module, optimizer: nnx.Optimizer) -> TrainState:
    trained = nnx.as_pure(nnx.state(model, optimizer.wrt))  # what the optimiser state is shaped like
    return TrainState(
        step=_step(optimizer.step[...]),  # NNX counts in uint32
        params=params_to_functional(model),  # every param, also those outside wrt
        opt_state=opt_state_to_functional(nnx.as_pure(optimizer.opt_state), trained),
    )


def _nnx_pair_from_functional(tree: TrainState, model: nnx.Module, optimizer: nnx.Optimizer) -> tuple[nnx.Module, nnx.Optimizer]:
    """A new module and a new ``nnx.Optimizer`` (same ``tx`` and ``wrt``) holding ``tree``'s values."""
    new_model = params_from_functional(tree.params, model)
    new_optimizer = nnx.Optimizer(new_model, optimizer.tx, wrt=optimizer.wrt)
    params = nnx.as_pure(nnx.state(new_model, optimizer.wrt))
    opt_state = opt_state_from_functional(tree.opt_state, nnx.as_pure(new_optimizer.opt_state), params)
    nnx.update(new_optimizer.opt_state, nnx.state(opt_state))  # as nnx.Optimizer.update writes its state
    new_optimizer.step[...] = jnp.asarray(tree.step, jnp.uint32)
    return new_model, new_optimizer


def to_functional(obj: Any) -> Any:
    """The functional form of ``obj``.

    Args:
        obj: an Equinox module, an NNX module (or its params ``State``), Flax variables
            ``{'params': ...}``, a Flax ``TrainState``, an NNX ``(model, nnx.Optimizer)`` pair
            or a :class:`pureflax.TrainState` (its params in any form).

    Returns:
        A params dict with Flax's paths, or a :class:`pureflax.TrainState` whose params
        and optimiser state are functional.
    """
    if _is_nnx_pair(obj):
        return _nnx_pair_to_functional(*obj)
    if isinstance(obj, (FlaxTrainState, TrainState)):
        return TrainState(
            step=_step(obj.step),
            params=params_to_functional(obj.params),
            opt_state=opt_state_to_functional(obj.opt_state, obj.params),
        )
    return params_to_functional(obj)


def from_functional(tree: Any, like: Any) -> Any:
    """Fill ``like``'s structure with the values of the functional ``tree``.

    Args:
        tree: functional params (a dict) or a functional :class:`pureflax.TrainState`.
        like: an instance of the wanted form: Equinox module, NNX module or params
            ``State``, Flax variables, functional dict, Flax ``TrainState`` (its ``apply_fn``
            and ``tx`` are kept), an NNX ``(model, nnx.Optimizer)`` pair (its ``tx`` and
            ``wrt`` are kept) or :class:`pureflax.TrainState`. Its arrays give the shapes;
            their values are unused.

    Returns:
        ``like`` with ``tree``'s values (for NNX, new objects: ``like`` is not changed).

    Raises:
        ConversionError: naming the path and both shapes where the trees disagree.
    """
    if _is_nnx_pair(like):
        if not isinstance(tree, TrainState):
            raise ConversionError(f"a train state fills a (model, optimizer) pair: got {type(tree).__name__}")
        return _nnx_pair_from_functional(tree, *like)
    if isinstance(like, (FlaxTrainState, TrainState)):
        if not isinstance(tree, TrainState):
            raise ConversionError(f"a train state fills a train state: got {type(tree).__name__} for {type(like).__name__}")
        params = params_from_functional(tree.params, like.params)
        opt_state = opt_state_from_functional(tree.opt_state, like.opt_state, like.params)
        step = _step(tree.step)
        if isinstance(like, FlaxTrainState):
            return like.replace(step=step, params=params, opt_state=opt_state)
        return TrainState(step=step, params=params, opt_state=opt_state)
    if isinstance(tree, TrainState):
        raise ConversionError(f"a train state cannot fill {type(like).__name__}: pass tree.params")
    return params_from_functional(tree, like)
