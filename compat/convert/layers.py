"""Each side's layers for the matcher: kind, path, functional shapes, settings where visible, order.

One walker per form. An Equinox module is walked field by field and an NNX module attribute by
attribute, in the order they were defined (with an example, ``trace.call_order`` reorders them
as a call reaches them); a Linen module is seen through ``nn.intercept_methods``
during an abstract ``apply`` on the example, in the order its layers are called (Linen's
auto-names follow construction order, which can differ); Linen variables and functional params
are plain dicts, walked in their keys' order, each layer's kind read from its Linen auto-name
or, failing that, from its arrays.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import equinox as eqx
import flax.linen as nn
import jax
import numpy as np
from flax import nnx

from pureflax.compat.convert import layouts, leaves
from pureflax.compat.convert.layouts import Layout
from pureflax.compat.convert.trees import Path, plain

# Kinds that the arrays alone cannot tell apart: a dict layer of one of these is matched within the family.
FAMILIES = {"Conv": "Conv|ConvTranspose", "ConvTranspose": "Conv|ConvTranspose", "LayerNorm": "LayerNorm|GroupNorm",
            "GroupNorm": "LayerNorm|GroupNorm"}
_AUTO_NAME = re.compile(r"^(" + "|".join(layouts.KINDS) + r")_(\d+)$")


class Layer(NamedTuple):
    """One layer of one side, as the matcher sees it."""

    path: str  # the form's own path, '/'-joined ('layers/0', 'ResNetBlock_0/Conv_0'): what names= names
    default: Path  # its functional path before matching (the leaf table's)
    kind: str  # 'Dense', 'Conv', ...; a family ('Conv|ConvTranspose') where only the arrays are known
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (functional name, functional shape) of its params
    settings: dict[str, Any] | None  # in Flax's terms; None where they cannot be seen
    row: Layout | None  # its row of LAYOUTS; None for a dict layer
    order: int  # call order where it was traced, else definition order
    keyed: bool = False  # its order is a mapping's keys', which may have been sorted (not defined, not called)


def _record(path: str, default: Path, row: Layout, module: Any, shapes: tuple, order: int) -> Layer:
    found = row.settings(module) if row.settings is not None else None
    return Layer(path, default, row.kind, shapes, found, row, order)


def _shapes(row: Layout, module: Any) -> tuple:
    out = []
    for attr, name, rule in row.params:
        value = getattr(module, attr, None)
        if value is not None:
            value = value.get_value() if isinstance(value, nnx.Variable) else value
            out.append((name, tuple(rule.functional_shape(tuple(np.shape(value))))))
    return tuple(out)


def eqx_layers(model: eqx.Module) -> list[Layer]:
    found = []
    for node in leaves.eqx_nodes(model):
        row = layouts.layout_of(node.module)
        if row is not None:
            found.append(_record(node.form, node.path, row, node.module, _shapes(row, node.module), len(found)))
    return found


def nnx_modules(module: nnx.Module) -> list[tuple[tuple, Any]]:
    """Every sub-module of an NNX module with its path, in definition order."""
    out: list[tuple[tuple, Any]] = []

    def visit(node: Any, parts: tuple) -> None:
        if isinstance(node, nnx.List) or isinstance(node, (list, tuple)):
            for i, item in enumerate(node):
                visit(item, parts + (i,))
        elif isinstance(node, nnx.Module):
            out.append((parts, node))
            if layouts.layout_of(node) is None:
                for name, value in vars(node).items():
                    if not name.startswith("_"):
                        visit(value, parts + (name,))
        elif isinstance(node, dict):
            for name, value in node.items():
                visit(value, parts + (name,))

    visit(module, ())
    return out


def nnx_layers(module: nnx.Module) -> list[Layer]:
    found = []
    for parts, node in nnx_modules(module):
        row = layouts.layout_of(node)
        if row is not None:
            found.append(_record("/".join(map(str, parts)), leaves.nnx_path(parts), row, node, _shapes(row, node), len(found)))
    return found


def _dict_kind(name: str, arrays: Mapping[str, Any], has_stats: bool) -> str:
    auto = _AUTO_NAME.match(name)
    if auto:
        return auto.group(1)
    if "embedding" in arrays:
        return "Embed"
    if "kernel" in arrays:
        return "Dense" if np.ndim(arrays["kernel"]) == 2 else "Conv|ConvTranspose"
    return "BatchNorm" if has_stats else "LayerNorm|GroupNorm"


def dict_layers(params: Mapping, model_state: Mapping | None = None) -> list[Layer]:
    """The layers of a functional or Linen params dict: each dict whose values are arrays."""
    found: list[Layer] = []
    stats = plain(model_state or {})

    def visit(node: Mapping, parts: Path) -> None:
        if all(not isinstance(v, Mapping) for v in node.values()):
            has_stats = _get(stats, parts) is not None
            kind = _dict_kind(parts[-1] if parts else "", node, has_stats)
            shapes = tuple((name, tuple(np.shape(v))) for name, v in node.items())
            found.append(Layer("/".join(parts), parts, kind, shapes, None, None, len(found), keyed=True))
            return
        for name, value in node.items():
            if isinstance(value, Mapping):
                visit(value, parts + (str(name),))

    visit(plain(params), ())
    return found


def _get(tree: Mapping, parts: Path) -> Any:
    for part in parts:
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


def linen_layers(module: nn.Module, variables: Mapping, run: Callable[[Any], Any]) -> list[Layer]:
    """The layers of a Linen module in the order ``run(bound_module)`` calls them (traced abstractly)."""
    seen: dict[Path, Any] = {}

    def interceptor(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name == "__call__" and layouts.layout_of(m) is not None and m.path not in seen:
            seen[tuple(m.path)] = m
        return next_fun(*args, **kwargs)

    def traced(v):
        with nn.intercept_methods(interceptor):
            return run(module.bind(v))

    jax.eval_shape(traced, variables)
    params = plain(variables).get("params", {})
    found = []
    for path, m in seen.items():
        row = layouts.layout_of(m)
        arrays = _get(params, path) or {}
        shapes = tuple((name, tuple(rule.functional_shape(tuple(np.shape(arrays[attr])))))
                       for attr, name, rule in row.params if attr in arrays)
        found.append(_record("/".join(path), path, row, m, shapes, len(found)))
    return found


def torch_layers(sd: Any) -> list[Layer]:
    """The layers of a torch state_dict (a :class:`pytorch.StateDict`), in its keys' order; settings from its module."""
    from pureflax.compat.convert import pytorch

    modules = dict(sd.module.named_modules()) if sd.module is not None else {}
    found = []
    for path, arrays in pytorch.layer_arrays(sd).items():
        kind = pytorch.kind_of(path, arrays, sd.kinds)
        row = pytorch.row_of(kind)
        shapes = tuple((name, tuple(rule.functional_shape(tuple(np.shape(arrays[attr])))))
                       for attr, name, rule in row.params if attr in arrays)
        module = modules.get(path.replace("/", "."))
        found.append(Layer(path, pytorch.default_path(path), kind, shapes,
                           pytorch.settings_of(module) if module is not None else None, row, len(found), keyed=not sd.ordered))
    return found
