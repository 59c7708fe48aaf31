"""The calls that move a tree between the functional form and another, over the containers' table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pureflax.compat.convert import containers
from pureflax.compat.convert.containers import Options, container_of, is_eqx_pair
from pureflax.compat.convert.params import params_from_functional, params_to_functional
from pureflax.compat.convert.trees import ConversionError, has_leaves
from pureflax.state import TrainState


def to_functional(obj: Any, *, names: Mapping[str, str] | None = None, flatten: Mapping[str, Any] | None = None) -> Any:
    """The functional form of ``obj``.

    Args:
        obj: an Equinox module, an NNX module (its params) or params ``State``, Flax variables
            ``{'params': ...}``, a Flax ``TrainState`` (``flax_models.TrainState``: with its
            ``batch_stats``), an NNX ``(model, nnx.Optimizer)`` pair (with the module's BatchStats),
            an Equinox ``(model, opt_state)`` pair, or a :class:`pureflax.TrainState` (params in any
            form; ``model_state`` an ``eqx.nn.State``, an NNX ``State`` of BatchStats or a dict).
            Params with state but no optimiser (Linen ``{'params', 'batch_stats'}``, an Equinox
            ``(model, state)`` pair) go through :func:`variables_to_functional`.
        names: the form's layer path -> the functional path, for models whose names are not
            Flax's: ``{'features/0': 'Conv_0'}``. A name that is not a layer raises, naming close ones.
        flatten: functional Dense path -> ``(H, W, C)`` of the image flattened before it, for a
            model that flattens channels first (Equinox's ``x.reshape(-1)`` of (C, H, W)): the
            kernel's rows, and its optimiser moments, go from (C, H, W) to Flax's (H, W, C) order.

    Returns:
        A params dict with Flax's paths, or a :class:`pureflax.TrainState` whose params,
        optimiser state and model state are functional.
    """
    o = Options(names, flatten)
    row = container_of(obj)
    if row.trains:
        return containers.parts_to_functional(row.split(obj), o)
    if is_eqx_pair(obj):
        raise ConversionError("an Equinox (model, eqx.nn.State) pair: use convert.variables_to_functional(pair) -> (params, model_state)")
    if containers.is_bound_linen(obj):
        params, model_state = variables_to_functional(obj, names=names, flatten=flatten)
        if has_leaves(model_state):
            raise ConversionError("a bound Linen module with batch_stats: use convert.variables_to_functional(module)")
        return params
    return params_to_functional(obj, names=names, flatten=flatten)


def from_functional(tree: Any, like: Any, *, names: Mapping[str, str] | None = None,
                    flatten: Mapping[str, Any] | None = None) -> Any:
    """Fill ``like``'s structure with the values of the functional ``tree``.

    Args:
        tree: functional params (a dict) or a functional :class:`pureflax.TrainState`.
        like: an instance of the wanted form: Equinox module, NNX module or params
            ``State``, Flax variables, functional dict, Flax ``TrainState`` (its ``apply_fn``
            and ``tx`` are kept), an NNX ``(model, nnx.Optimizer)`` pair (its ``tx`` and
            ``wrt`` are kept), an Equinox ``(model, opt_state)`` pair or :class:`pureflax.TrainState`.
            Its arrays give the shapes; their values are unused.
        names: as for :func:`to_functional`, for ``like``'s form.
        flatten: as for :func:`to_functional`, for ``like``'s form.

    Returns:
        ``like`` with ``tree``'s values (for NNX, new objects: ``like`` is not changed).

    Raises:
        ConversionError: naming the path, both shapes and dtypes where the trees disagree.
    """
    o = Options(names, flatten)
    row = container_of(like)
    if row.trains:
        if not isinstance(tree, TrainState):
            raise ConversionError(f"a train state fills {row.name}: got {type(tree).__name__}")
        return row.rebuild(like, tree, o)
    if isinstance(tree, TrainState):
        raise ConversionError(
            f"a train state cannot fill {row.name} ({type(like).__name__}), which has no place for its optimiser state: "
            "pass a train state as like (for Equinox, (model, opt_state)), or tree.params to drop it"
        )
    if is_eqx_pair(like):
        raise ConversionError("an Equinox (model, eqx.nn.State) pair: use "
                              "convert.variables_from_functional(params, model_state, like=pair)")
    if containers.is_bound_linen(like):
        if containers.holds_state(like):
            raise ConversionError("a bound Linen module with batch_stats: use convert.variables_from_functional(params, "
                                  "model_state, like=module)")
        return row.rebuild(like, TrainState(step=0, params=tree, opt_state=None, model_state={}), o)
    return params_from_functional(tree, like, names=names, flatten=flatten)


def variables_to_functional(obj: Any, *, names: Mapping[str, str] | None = None,
                            flatten: Mapping[str, Any] | None = None) -> tuple[dict, dict]:
    """A model's params and model state, functional: ``(params, model_state)``.

    Args:
        obj: Linen variables ``{'params': ..., 'batch_stats': ...}`` (``batch_stats`` optional),
            a bound Linen module, an NNX module (its ``nnx.Param`` and ``nnx.BatchStat``), an
            Equinox ``(model, eqx.nn.State)`` pair, or an Equinox module without an ``eqx.nn.State``.
        names: as for :func:`to_functional`.
        flatten: as for :func:`to_functional`.

    Returns:
        The params dict and the model state (Linen's ``batch_stats`` layout; ``{}`` when there is none).

    Examples:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> net = nn.Sequential([nn.Dense(3), nn.BatchNorm(use_running_average=True)])
        >>> params, model_state = variables_to_functional(net.init(jax.random.key(0), jnp.ones((2, 4))))
        >>> sorted(params), sorted(model_state['layers_1'])
        (['layers_0', 'layers_1'], ['mean', 'var'])
    """
    row = container_of(obj)
    if row.trains or row.bare:
        raise ConversionError(f"cannot take variables from {row.name} ({type(obj).__name__}): expected Linen variables, a bound "
                              "Linen module, an NNX module or an Equinox (model, eqx.nn.State) pair")
    parts = row.split(obj)
    functional = containers.parts_to_functional(parts._replace(opt_state=None), Options(names, flatten))
    return functional.params, functional.model_state


def variables_from_functional(params: Mapping, model_state: Mapping, like: Any, *, names: Mapping[str, str] | None = None,
                              flatten: Mapping[str, Any] | None = None) -> Any:
    """``like``'s form holding the functional ``params`` and ``model_state``.

    Args:
        params: functional, as :func:`variables_to_functional` returns them.
        model_state: functional, as :func:`variables_to_functional` returns them.
        like: Linen variables, a bound Linen module, an NNX module, an Equinox ``(model, eqx.nn.State)``
            pair or an Equinox module; its arrays give the shapes.
        names: as for :func:`from_functional`.
        flatten: as for :func:`from_functional`.

    Returns:
        New Linen variables, a new bound module, a new NNX module, or a new ``(model, eqx.nn.State)`` pair.
    """
    row = container_of(like)
    if row.trains or row.bare:
        raise ConversionError(f"cannot fill variables of {row.name} ({type(like).__name__}): expected Linen variables, a bound "
                              "Linen module, an NNX module or an Equinox (model, eqx.nn.State) pair")
    tree = TrainState(step=0, params=params, opt_state=None, model_state=model_state)
    return row.rebuild(like, tree, Options(names, flatten))
