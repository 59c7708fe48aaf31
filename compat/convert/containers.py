"""The containers a model travels in — train states, pairs, variables, bare params — as ONE table.

Each :class:`Container` row says how to recognise one, how to split it into its parts in its own
form (params, optimiser state, model state, step) and how to rebuild one like it from functional
parts. :func:`to_functional`, :func:`from_functional`, the ``variables_*`` pair and ``migrate`` loop
over the table; nothing else dispatches on the container.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.training import train_state as flax_train_state

from pureflax.compat import flax_models
from pureflax.compat.convert import pytorch, stats, torch_optim
from pureflax.compat.convert.params import (
    opt_state_from_functional, opt_state_to_functional, params_from_functional,
    params_to_functional,
)
from pureflax.compat.convert.trees import ConversionError, has_leaves, leaf_paths, like_frozen, no_extra, plain
from pureflax.state import TrainState

FlaxTrainState = flax_train_state.TrainState


class Parts(NamedTuple):
    """A container's contents, each in the container's own form."""

    params: Any  # an Equinox module, an NNX params State, Flax variables or a dict
    model_state: Any = None  # an eqx.nn.State, an NNX State of BatchStats, a batch_stats dict; None: none
    model: Any = None  # the module that indexes model_state (Equinox) or holds it (NNX)
    opt_state: Any = None  # None: no optimiser
    step: Any = None
    trained: Any = None  # what opt_state is shaped like, where not params (NNX's wrt)


class Options(NamedTuple):
    """``names=`` and ``flatten=`` for one side, as every converter takes them."""

    names: Mapping[str, str] | None = None
    flatten: Mapping[str, Any] | None = None


class Container(NamedTuple):
    name: str  # as messages say it
    matches: Callable[[Any], bool]
    split: Callable[[Any], Parts]
    rebuild: Callable[[Any, Any, Options], Any]  # (like, functional parts, options) -> like's form
    trains: bool = False  # it holds an optimiser state
    bare: bool = False  # params alone: no place for a model state


def step_of(step: Any) -> Any:
    """The step as an int32 array (Flax starts it as a Python int); shapes-only stays shapes-only."""
    return step if isinstance(step, jax.ShapeDtypeStruct) else jnp.asarray(step, jnp.int32)


def _params(tree: Any, like: Any, o: Options) -> Any:
    return params_from_functional(tree.params, like, names=o.names, flatten=o.flatten)


def _opt(tree: Any, like_opt: Any, like_params: Any, o: Options) -> Any:
    return opt_state_from_functional(tree.opt_state, like_opt, like_params, names=o.names, flatten=o.flatten)


def _stats(tree: Any, like_state: Any, model: Any, o: Options) -> Any:
    return stats.state_from_functional(tree.model_state, like_state, model, names=o.names)


# ------------------------------------------------------------------------- NNX


def _nnx_module(like: nnx.Module, tree: Any, o: Options) -> nnx.Module:
    """A new module of ``like``'s graph with the params as its ``nnx.Param`` and the model state as its ``nnx.BatchStat``."""
    graphdef, p, batch_stats, rest = nnx.split(like, nnx.Param, nnx.BatchStat, ...)
    return nnx.merge(graphdef, _params(tree, nnx.as_pure(p), o), _stats(tree, batch_stats, None, o), rest)


def _nnx_pair_split(pair: tuple) -> Parts:
    model, optimizer = pair
    return Parts(nnx.as_pure(nnx.state(model, nnx.Param)), None, model, nnx.as_pure(optimizer.opt_state),
                 optimizer.step[...], nnx.as_pure(nnx.state(model, optimizer.wrt)))


def _nnx_pair_rebuild(like: tuple, tree: Any, o: Options) -> tuple[nnx.Module, nnx.Optimizer]:
    """A new module and a new ``nnx.Optimizer`` (same ``tx`` and ``wrt``) holding ``tree``'s values."""
    model, optimizer = like
    new_model = _nnx_module(model, tree, o)
    new_optimizer = nnx.Optimizer(new_model, optimizer.tx, wrt=optimizer.wrt)
    trained = nnx.as_pure(nnx.state(new_model, optimizer.wrt))
    opt_state = _opt(tree, nnx.as_pure(new_optimizer.opt_state), trained, o)
    nnx.update(new_optimizer.opt_state, nnx.state(opt_state))  # as nnx.Optimizer.update writes its state
    new_optimizer.step[...] = jnp.asarray(tree.step, jnp.uint32)  # NNX counts in uint32
    return new_model, new_optimizer


# --------------------------------------------------------------- train states


def _train_state_split(state: Any) -> Parts:
    model_state = state.model_state if isinstance(state, TrainState) else getattr(state, "batch_stats", None)
    return Parts(state.params, model_state, state.params, state.opt_state, state.step)


def _flax_rebuild(like: Any, tree: Any, o: Options) -> Any:
    fields = dict(step=step_of(tree.step), params=_params(tree, like.params, o), opt_state=_opt(tree, like.opt_state, like.params, o))
    if isinstance(like, flax_models.TrainState):
        return like.replace(batch_stats=_stats(tree, like.batch_stats, None, o), **fields)
    if has_leaves(tree.model_state):
        raise ConversionError(f"Flax's TrainState keeps no batch_stats, so the model state {sorted(leaf_paths(tree.model_state))} "
                              "has no place: use pureflax.compat.flax_models.TrainState")
    return like.replace(**fields)


def _pureflax_rebuild(like: TrainState, tree: Any, o: Options) -> TrainState:
    return TrainState(step=step_of(tree.step), params=_params(tree, like.params, o), opt_state=_opt(tree, like.opt_state, like.params, o),
                      model_state=_stats(tree, like.model_state, like.params, o))


def _count(opt_state: Any) -> Any:
    """The step an optax state counts (its first ``count``), 0 where it counts none."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        if path and getattr(path[-1], "name", None) == "count":
            return leaf
    return 0


def _is_eqx_opt_pair(x: Any) -> bool:
    """Equinox's documented ``(model, opt_state)``: a module and an optax state."""
    return (isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], eqx.Module) and isinstance(x[1], tuple)
            and not isinstance(x[1], (eqx.nn.State, eqx.Module)))  # optax states are tuples (sgd's has no leaves)


# ------------------------------------------------------------------ variables


def is_eqx_pair(x: Any) -> bool:
    """An Equinox module and its ``eqx.nn.State``."""
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], eqx.Module) and isinstance(x[1], eqx.nn.State)


def is_nnx_pair(x: Any) -> bool:
    """An NNX module and its ``nnx.Optimizer`` (which, since Flax 0.11, does not hold the model)."""
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], nnx.Module) and isinstance(x[1], nnx.Optimizer)


def is_bound_linen(x: Any) -> bool:
    return isinstance(x, nn.Module) and x.scope is not None


def _eqx_module_rebuild(like: eqx.Module, tree: Any, o: Options, state: Any = None) -> Any:
    model = _params(tree, like, o)
    model, used = stats.eqx_module_from_functional(plain(tree.model_state) or {}, model, o.names)
    if state is not None:
        return model, stats.eqx_from_functional(plain(tree.model_state), state, model, o.names, used)
    if has_leaves(tree.model_state) and not used:
        raise ConversionError("an Equinox module alone keeps no model state: pass like=(model, eqx.nn.State(model))")
    if used:
        no_extra(plain(tree.model_state), used)  # statistics its layers keep in fields: nothing else dropped
    return model


def _is_linen_variables(x: Any) -> bool:
    return isinstance(plain(x), Mapping) and not isinstance(x, nnx.State) and "params" in plain(x)


def _linen_variables_split(variables: Any) -> Parts:
    plain_vars = plain(variables)
    others = sorted(set(plain_vars) - {"params", "batch_stats"})
    if others:
        raise ConversionError(f"Linen variables with {others}: only params and batch_stats convert")
    return Parts({"params": plain_vars["params"]}, plain_vars.get("batch_stats", {}))


def _linen_variables_rebuild(like: Any, tree: Any, o: Options) -> Any:
    plain_like = plain(like)
    filled = {"params": params_from_functional(tree.params, plain_like["params"], names=o.names, flatten=o.flatten)}
    batch_stats = _stats(tree, plain_like.get("batch_stats"), None, o)
    if batch_stats is not None:
        filled["batch_stats"] = batch_stats
    return like_frozen(filled, like)


def _bound_rebuild(like: nn.Module, tree: Any, o: Options) -> nn.Module:
    module, variables = like.unbind()
    return module.bind(_linen_variables_rebuild(variables, tree, o))


# ----------------------------------------------------------------------- PyTorch


def _torch_fill(like_sd: pytorch.StateDict, tree: Any, o: Options) -> pytorch.StateDict:
    filled = params_from_functional(tree.params, like_sd, names=o.names, flatten=o.flatten)
    return stats.state_from_functional(tree.model_state, filled, None, names=o.names)


def _is_torch_pair(x: Any) -> bool:
    return (isinstance(x, tuple) and len(x) == 2 and (pytorch.is_state_dict(x[0]) or pytorch.is_module(x[0]))
            and torch_optim.is_optimizer_state(x[1]))


def _torch_pair_split(pair: tuple) -> Parts:
    sd = pytorch.state_dict_of(pair[0])
    opt = torch_optim.from_torch(pair[1], sd)
    return Parts(sd, sd, None, opt, opt.step)


def _torch_pair_rebuild(like: tuple, tree: Any, o: Options) -> tuple:
    sd = pytorch.state_dict_of(like[0])
    params_only = sd.replace({k: sd[k] for k in pytorch.param_keys(sd)})
    moments = torch_optim.to_torch(
        tree.opt_state, like[1], lambda moment: params_from_functional(moment, params_only, names=o.names, flatten=o.flatten),
        tree.step)
    return pytorch.back(_torch_fill(sd, tree, o)), moments


def _torch_split(obj: Any) -> Parts:
    sd = pytorch.state_dict_of(obj)
    return Parts(sd, sd)


CONTAINERS: tuple[Container, ...] = (
    Container("a torch (state_dict, optimizer.state_dict()) pair", _is_torch_pair, _torch_pair_split, _torch_pair_rebuild,
              trains=True),
    Container("a torch state_dict", lambda x: pytorch.is_state_dict(x) or pytorch.is_module(x), _torch_split,
              lambda like, tree, o: pytorch.back(_torch_fill(pytorch.state_dict_of(like), tree, o))),
    Container("an NNX (model, nnx.Optimizer) pair", is_nnx_pair, _nnx_pair_split, _nnx_pair_rebuild, trains=True),
    Container("Flax's TrainState", lambda x: isinstance(x, FlaxTrainState), _train_state_split, _flax_rebuild, trains=True),
    Container("a pureflax.TrainState", lambda x: isinstance(x, TrainState), _train_state_split, _pureflax_rebuild, trains=True),
    Container("an Equinox (model, opt_state) pair", _is_eqx_opt_pair,
              lambda pair: Parts(pair[0], None, pair[0], pair[1], _count(pair[1])),
              lambda like, tree, o: (_eqx_module_rebuild(like[0], tree, o), _opt(tree, like[1], like[0], o)), trains=True),
    Container("an Equinox (model, eqx.nn.State) pair", is_eqx_pair, lambda pair: Parts(pair[0], pair[1], pair[0]),
              lambda like, tree, o: _eqx_module_rebuild(like[0], tree, o, like[1])),
    Container("a bound Linen module", is_bound_linen, lambda m: _linen_variables_split(m.variables),
              _bound_rebuild),
    Container("Linen variables", _is_linen_variables, _linen_variables_split,
              _linen_variables_rebuild),
    Container("an NNX module", lambda x: isinstance(x, nnx.Module), lambda m: Parts(m, None, m), _nnx_module),
    Container("an Equinox module", lambda x: isinstance(x, eqx.Module), lambda m: Parts(m, None, m), _eqx_module_rebuild),
    Container("params", lambda x: True, lambda p: Parts(p), lambda like, tree, o: _params(tree, like, o), bare=True),
)


def container_of(obj: Any) -> Container:
    return next(row for row in CONTAINERS if row.matches(obj))


def parts_to_functional(parts: Parts, o: Options) -> TrainState:
    """The functional parts: params, optimiser state (None without one), model state, step."""
    params = params_to_functional(parts.params, names=o.names, flatten=o.flatten)
    trained = parts.trained if parts.trained is not None else parts.params
    opt_state = None if parts.opt_state is None else opt_state_to_functional(parts.opt_state, trained, names=o.names, flatten=o.flatten)
    if parts.model_state is None and isinstance(parts.model, (nnx.Module, eqx.Module)):
        model_state = stats.state_to_functional(None, parts.model, names=o.names)
    else:
        model_state = stats.state_to_functional(parts.model_state, parts.model, names=o.names)
    return TrainState(step=step_of(parts.step if parts.step is not None else 0), params=params, opt_state=opt_state,
                      model_state=model_state)


def holds_state(obj: Any) -> bool:
    """A model with running statistics and no optimiser: what the ``variables_*`` calls move."""
    row = container_of(obj)
    if row.bare or row.trains:
        return False
    parts = row.split(obj)
    if isinstance(parts.model_state, eqx.nn.State):
        return True
    if isinstance(parts.model, nnx.Module):
        return has_leaves(nnx.state(parts.model, nnx.BatchStat))
    if isinstance(parts.model, eqx.Module):
        return bool(stats.eqx_field_stats(parts.model, None))
    return has_leaves(parts.model_state)


def split(obj: Any, o: Options = Options()) -> tuple[Container, TrainState]:
    """``obj``'s container and its contents in the functional form."""
    row = container_of(obj)
    return row, parts_to_functional(row.split(obj), o)
