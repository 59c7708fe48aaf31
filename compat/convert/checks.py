"""What proves a match: the settings of every pair of layers, and the outputs of both models on an example.

Settings are compared wherever both sides' can be read (:func:`compare_settings`). With an
example both models run after the conversion, each called the way its form is called, the
batch's channels moved where each form's convolutions expect them; a difference over the
tolerance names the first layer whose output differs where the forms let intermediates be seen.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pureflax.compat.convert import layers as walk, leaves, pytorch, trace
from pureflax.compat.convert.containers import FlaxTrainState, container_of, is_bound_linen, is_eqx_pair, is_nnx_pair
from pureflax.compat.convert.trees import ConversionError
from pureflax.state import TrainState

_SAME_WITH_STRIDE = ("'SAME' with a stride pads by the input size ((0, 1) on an even size, (1, 1) on an odd one for a 3x3 "
                     "kernel at stride 2), so they may compute different outputs: give both layers the same padding")


_SHORT = {"kernel_dilation": "dilation", "input_dilation": "input dilation", "feature_group_count": "groups"}


def compare_settings(where: str, source: walk.Layer, target: walk.Layer) -> str:
    """Refuse two layers whose settings differ; the settings compared, as the plan prints them."""
    a, b = source.settings, target.settings
    if a is None or b is None:
        return "not visible" if (a or b) else "-"
    row_a, row_b = source.row, target.row
    for key in (key for key in a if key in b):  # in the row's order: the padding last, strides and dilation decide it
        if a[key] != b[key]:
            fix = (_SAME_WITH_STRIDE if key == "padding" and "SAME" in (a[key], b[key])
                   else f"they would compute different outputs; build the target with {key}={a[key]!r}")
            raise ConversionError(f"{where}: {key} is {a[key]!r} in the source ({row_a.layer}) and {b[key]!r} in the "
                                  f"target ({row_b.layer}): {fix}")
    same = [_SHORT.get(key, key) for key in a if key in b]
    return f"{', '.join(same)} equal" if same else "-"


# ------------------------------------------------------------------- the sides


def module_of(obj: Any) -> Any:
    """The model inside ``obj`` that can be walked and called; None for plain dicts."""
    if isinstance(obj, (eqx.Module, nnx.Module)) or is_bound_linen(obj) or pytorch.is_module(obj):
        return obj
    if is_eqx_pair(obj) or is_nnx_pair(obj):
        return obj[0]
    if isinstance(obj, tuple) and len(obj) == 2 and pytorch.is_module(obj[0]):
        return obj[0]  # (module, optimizer.state_dict())
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], eqx.Module):
        return obj[0]  # (model, opt_state)
    if isinstance(obj, TrainState) and isinstance(obj.params, eqx.Module):
        return obj.params
    if isinstance(obj, FlaxTrainState) and isinstance(getattr(obj.apply_fn, "__self__", None), nn.Module):
        variables = {"params": obj.params, **({"batch_stats": obj.batch_stats} if getattr(obj, "batch_stats", None) else {})}
        return obj.apply_fn.__self__.bind(variables)
    return None


def _torch_side(obj: Any) -> Any:
    """The state_dict of a torch object (a state_dict, a module, a (state_dict, optimiser state) pair); else None."""
    first = obj[0] if isinstance(obj, tuple) and len(obj) == 2 else obj
    return pytorch.state_dict_of(first) if pytorch.is_state_dict(first) or pytorch.is_module(first) else None


def form_of(obj: Any) -> str:
    if _torch_side(obj) is not None:
        return "torch"
    module = module_of(obj)
    if isinstance(module, eqx.Module):
        return "equinox"
    if isinstance(module, nnx.Module):
        return "nnx"
    return "linen" if module is not None else "dict"


def runnable(obj: Any) -> Any:
    """What a call takes: the module, or for Equinox with an ``eqx.nn.State`` the ``(model, state)`` pair."""
    if is_eqx_pair(obj):
        return obj
    if isinstance(obj, TrainState) and isinstance(obj.params, eqx.Module) and isinstance(obj.model_state, eqx.nn.State):
        return obj.params, obj.model_state
    return module_of(obj)


def default_call(model: Any, x: Any) -> Any:
    """A model called the way its form is: Equinox ``jax.vmap`` over the batch, Linen and NNX on the batch."""
    if isinstance(model, tuple):
        return jax.vmap(model[0], in_axes=(0, None), out_axes=(0, None), axis_name="batch")(x, model[1])[0]
    if isinstance(model, eqx.Module):
        return jax.vmap(model)(x)
    if pytorch.is_module(model):
        torch = pytorch.torch_module()
        with torch.no_grad():
            return jnp.asarray(model(torch.from_numpy(np.array(x))).numpy())
    return model(x)


def inference(model: Any) -> Any:
    """The model in inference mode, as the default call compares it: ``eqx.nn.inference_mode``, or an
    NNX copy after ``.eval()``; a Linen module as it is (its call says, through ``call=``)."""
    if isinstance(model, tuple):
        return eqx.nn.inference_mode(model[0]), model[1]
    if isinstance(model, eqx.Module):
        return eqx.nn.inference_mode(model)
    if isinstance(model, nnx.Module):
        model = nnx.clone(model)
        model.eval()
    if pytorch.is_module(model):
        import copy

        model = copy.deepcopy(model).eval()
    return model


def side_layers(obj: Any, example: Any = None, call: Callable | None = None) -> list[walk.Layer]:
    """``obj``'s layers, in the order a call on ``example`` reaches them; without one, as defined."""
    sd = _torch_side(obj)
    if sd is not None:
        found = walk.torch_layers(sd)
        if example is None or sd.module is None:
            return found
        return in_call_order(found, trace.call_order(sd.module, call or default_call, example))
    module = module_of(obj)
    if isinstance(module, (eqx.Module, nnx.Module)):
        found = walk.eqx_layers(module) if isinstance(module, eqx.Module) else walk.nnx_layers(module)
        if example is None:
            return found
        return in_call_order(found, trace.call_order(runnable(obj), call or default_call, example))
    if module is not None:
        if example is None:
            return walk.dict_layers(module.variables.get("params", {}), module.variables.get("batch_stats"))
        unbound, variables = module.unbind()
        return walk.linen_layers(unbound, variables, lambda m: (call or default_call)(m, example))
    parts = container_of(obj).split(obj)
    params = parts.params.get("params", parts.params) if isinstance(parts.params, Mapping) else parts.params
    return walk.dict_layers(params, parts.model_state if isinstance(parts.model_state, Mapping) else None)


def channels_first(found: list[walk.Layer]) -> bool:
    return any(l.row is not None and l.row.channels_first for l in found)


def move_channels(x: Any, source_first: bool, target_first: bool) -> Any:
    if source_first == target_first or np.ndim(x) < 3:
        return x
    return jnp.moveaxis(x, -1, 1) if target_first else jnp.moveaxis(x, 1, -1)


# ------------------------------------------------------------------ intermediates


def in_call_order(found: list[walk.Layer], order: list[str]) -> list[walk.Layer]:
    """``found`` in the order a traced call reached them; layers it never reached after, as defined."""
    rank = {path: i for i, path in enumerate(order)}
    ranked = sorted(found, key=lambda l: (rank.get(l.path, len(rank)), l.order))
    return [l._replace(order=i) for i, l in enumerate(ranked)]


def _relative(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-12)) if a.size else 0.0


def compare_outputs(plan: Any, source: tuple, target: tuple, layouts_first: tuple[bool, bool], tolerance: float) -> float:
    """Refuse outputs further apart than ``tolerance`` (relative to the source's largest); their distance."""
    (y_source, inner_source), (y_target, inner_target) = source, target
    moved = jax.tree_util.tree_map(lambda y: move_channels(y, layouts_first[1], layouts_first[0]), y_target)
    try:
        diffs = jax.tree_util.tree_map(_relative, y_source, moved)
    except ValueError:
        raise ConversionError(f"the outputs differ in structure: {jax.tree_util.tree_structure(y_source)} and "
                              f"{jax.tree_util.tree_structure(moved)}") from None
    worst = max(jax.tree_util.tree_leaves(diffs), default=0.0)
    if worst <= tolerance:
        return worst
    where = ""
    for pair in plan.pairs:
        a, b = inner_source.get(pair.source.path), inner_target.get(pair.target.path)
        if a is not None and b is not None:
            d = _relative(a, move_channels(b, layouts_first[1], layouts_first[0]))
            if d > tolerance:
                where = f"; the first layer whose output differs: {pair.source.path} -> {pair.target.path} (by {d:.3g})"
                break
    raise ConversionError(f"the converted model computes another function: outputs differ by {worst:.3g} (relative; tolerance "
                          f"{tolerance:g}){where}")


# ----------------------------------------------------------------- check_layers


def _module_paths(module: Any) -> dict[str, tuple]:
    """Each sub-module's own path -> its default functional path (the whole tree, containers too)."""
    if isinstance(module, eqx.Module):
        return {node.form: node.path for node in leaves.eqx_nodes(module) if node.form}
    return {"/".join(map(str, parts)): leaves.nnx_path(parts) for parts, _ in walk.nnx_modules(module) if parts}


def check_layers(source: Any, target: Any, *, source_names: Mapping[str, str] | None = None,
                 names: Mapping[str, str] | None = None) -> None:
    """Refuse two models whose layers at the same functional path would compute different things.

    Only where both sides are modules (Equinox or NNX, alone, in a pair or a TrainState) are
    their settings known: ``eps``/``epsilon``, BatchNorm's ``momentum``, a convolution's strides,
    padding (as the (low, high) pairs lax receives), dilations, groups, LayerNorm's axes.

    Raises:
        ConversionError: naming the layer, the setting and both values.

    Examples:
        >>> import jax, equinox as eqx
        >>> from flax import nnx
        >>> try:
        ...     check_layers(eqx.nn.LayerNorm(4), nnx.LayerNorm(4, rngs=nnx.Rngs(0)))
        ... except ConversionError as err:
        ...     print(err)
        the model: epsilon is 1e-05 in the source (eqx.nn.LayerNorm (1-D shape: features last)) and 1e-06 in the target (nnx.LayerNorm): they would compute different outputs; build the target with epsilon=1e-05
    """

    def by_path(obj: Any, option: Mapping[str, str] | None) -> dict:
        if form_of(obj) not in ("equinox", "nnx"):
            return {}
        found = side_layers(obj)
        paths = _module_paths(module_of(obj))  # every module, so names= may rename a block and all inside it
        leaves.check_names("names", dict(option or {}), paths)
        return {leaves.renamed(l.path, l.default, paths, dict(option or {})): l for l in found}

    theirs, ours = by_path(source, source_names), by_path(target, names)
    for path in sorted(set(theirs) & set(ours)):
        a, b = theirs[path], ours[path]
        where = "/".join(path) or "the model"
        if a.kind != b.kind:
            raise ConversionError(f"{where}: a {a.kind} in the source ({a.row.layer}) but a {b.kind} in the target ({b.row.layer})")
        compare_settings(where, a, b)
