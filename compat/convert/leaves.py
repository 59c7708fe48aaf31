"""Where each array of a form goes in the functional tree: one walker per form, then ``names=``.

An Equinox module is walked module by module (its layers are the rows of :data:`LAYOUTS`); an
NNX ``State`` and a dict (Linen variables, functional params) are walked leaf by leaf, since NNX
keeps Linen's layouts and only the names move. Each walk gives every array a :class:`Leaf` and
every layer its default functional path, which ``names=`` overrides by prefix.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any, NamedTuple

import equinox as eqx
import jax
from flax import nnx

from pureflax.compat.convert import layouts
from pureflax.compat.convert.layouts import SAME, Rule
from pureflax.compat.convert.trees import ConversionError, Path, flatten as flatten_tree, is_array


class Leaf(NamedTuple):
    """Where one array of a form goes in the functional tree."""

    form: str  # the form's path of the array, '/'-joined ('features/0/weight'): what `names` maps
    path: Path  # its functional path ('Conv_0', 'kernel')
    rule: Rule
    where: str  # how error messages name it ('.features[0].weight')


class Node(NamedTuple):
    """A module of an Equinox model: its pytree keys, its path in the model and its default functional path."""

    keys: tuple
    form: str
    path: Path
    module: eqx.Module


def eqx_nodes(model: Any) -> list[Node]:
    """Every module of an Equinox model, outermost first, in definition order.

    A module field keeps its name; item ``i`` of a list/tuple field is named by the module's
    ``flax_item_name`` (``'Dense_{i}'`` for a compact stack) or else ``'{field}_{i}'`` (how
    ``flax.linen.Sequential`` names them). A layer of :data:`LAYOUTS` ends the walk; any other
    module holding arrays itself has no Flax counterpart until it is registered.
    """
    nodes: list[Node] = []

    def visit(node: Any, keys: tuple, path: Path) -> None:
        where = jax.tree_util.keystr(keys) or "the model"
        if isinstance(node, eqx.nn.StateIndex):
            return  # running statistics: they live in the eqx.nn.State, not in the params
        if isinstance(node, eqx.Module):
            nodes.append(Node(keys, jax.tree_util.keystr(keys, simple=True, separator="/"), path, node))
            if layouts.layout_of(node) is not None:
                layouts.refuse(node, where)
                return
            for field in dataclasses.fields(node):
                if field.metadata.get("static", False):
                    continue
                value, key = getattr(node, field.name), keys + (jax.tree_util.GetAttrKey(field.name),)
                if is_array(value):
                    raise ConversionError(
                        f"{where}: {type(node).__module__}.{type(node).__name__} holds arrays ({field.name}) and is not a "
                        "layer of pureflax.compat.convert.LAYOUTS: add it with pureflax.compat.register_layer("
                        f"{type(node).__name__}, kind, params={{...}}, statistics={{...}})"
                    )
                if isinstance(value, (list, tuple)):
                    template = getattr(type(node), "flax_item_name", field.name + "_{i}")
                    for i, item in enumerate(value):
                        visit(item, key + (jax.tree_util.SequenceKey(i),), path + (template.format(i=i),))
                else:
                    visit(value, key, path + (field.name,))
            return
        if any(is_array(leaf) for leaf in jax.tree_util.tree_leaves(node)):
            raise ConversionError(
                f"{where}: a {type(node).__name__} holding arrays is not a layer of pureflax.compat.convert.LAYOUTS: "
                "add its class with pureflax.compat.register_layer(...)"
            )

    visit(model, (), ())
    return nodes


def _eqx_leaves(model: eqx.Module) -> tuple[dict[str, Leaf], dict[str, Path]]:
    leaves: dict[str, Leaf] = {}
    nodes = eqx_nodes(model)
    for node in nodes:
        row = layouts.layout_of(node.module)
        for attr, name, rule in row.params if row else ():
            if getattr(node.module, attr) is not None:
                key = jax.tree_util.keystr(node.keys + (jax.tree_util.GetAttrKey(attr),))
                leaves[key] = Leaf(f"{node.form}/{attr}".lstrip("/"), node.path + (name,), rule, key)
    return leaves, {node.form: node.path for node in nodes}  # '': the model itself


def nnx_path(parts: tuple) -> Path:
    """An NNX path as Linen names it: item ``i`` of ``layers`` is ``Dense_{i}`` (a compact stack, as
    ``nnx_models.FeedForward``), item ``i`` of any other list ``{field}_{i}`` (Linen's ``setup`` lists)."""
    path: list[str] = []
    for i, part in enumerate(parts):
        if isinstance(part, int) and i:
            path[-1] = f"Dense_{part}" if parts[i - 1] == "layers" else f"{parts[i - 1]}_{part}"
        else:
            path.append(str(part))
    return tuple(path)


def _prefixes(parts: tuple, name) -> dict[str, Path]:
    """The layers above a leaf (not the lists holding them), by '/'-joined path."""
    return {"/".join(map(str, parts[:j])): name(parts[:j]) for j in range(1, len(parts)) if not isinstance(parts[j], int)}


def _nnx_leaves(state: Any) -> tuple[dict[str, Leaf], dict[str, Path]]:
    """An NNX ``State`` (params or BatchStats): Linen's layouts, so only the names move."""
    leaves: dict[str, Leaf] = {}
    layers: dict[str, Path] = {}
    for keys, _ in flatten_tree(state)[0]:
        parts = tuple(k.key for k in keys)
        key = jax.tree_util.keystr(keys)
        leaves[key] = Leaf("/".join(map(str, parts)), nnx_path(parts), SAME, key)
        layers.update(_prefixes(parts, nnx_path))
    return leaves, {"": (), **layers}


def _dict_leaves(tree: Any) -> tuple[dict[str, Leaf], dict[str, Path]]:
    """A functional or Linen dict: Flax's paths already."""
    leaves: dict[str, Leaf] = {}
    layers: dict[str, Path] = {}
    for keys, _ in flatten_tree(tree)[0]:
        parts = tuple(str(k.key) for k in keys)
        leaves[jax.tree_util.keystr(keys)] = Leaf("/".join(parts), parts, SAME, "/".join(parts))
        layers.update(_prefixes(parts, tuple))
    return leaves, {"": (), **layers}


def check_names(option: str, wanted: Mapping[str, Any], have: Mapping[str, Any] | set) -> None:
    """Every key of ``wanted`` (a ``names``/``flatten`` argument) is one of ``have``: else name it and the close ones."""
    for name in wanted:
        if name not in have:
            close = difflib.get_close_matches(name, list(have), n=3, cutoff=0.4)
            raise ConversionError(
                f"{option}: {name!r} is not a layer of this model; close: {close or 'none'}; "
                f"its layers: {sorted(have)[:30]}"
            )


def renamed(form: str, path: Path, layers: Mapping[str, Path], names: Mapping[str, str]) -> Path:
    """``path`` (the default functional path of the form's ``form``) after ``names``: the longest prefix wins."""
    matches = [p for p in names if form == p or p == "" or form.startswith(p + "/")]
    if not matches:
        return path
    prefix = max(matches, key=len)
    return tuple(part for part in names[prefix].split("/") if part) + path[len(layers[prefix]):]


def table(params: Any, names: Mapping[str, str] | None = None, flatten: Mapping[str, Any] | None = None, *,
          strict: bool = True) -> dict[str, Leaf]:
    """Each array of ``params`` (Equinox module, NNX ``State``, torch state_dict or dict), by ``keystr``, with where it goes.

    ``strict=False`` for a model state: it holds the BatchNorms only, so ``names`` of other layers are
    not its (the params' conversion checks every name); of a torch state_dict it reads the statistics.
    """
    from pureflax.compat.convert import pytorch

    if isinstance(params, pytorch.StateDict):
        leaves, layers = pytorch.leaves_of(params) if strict else pytorch.stats_leaves(params)
    elif isinstance(params, eqx.Module):
        leaves, layers = _eqx_leaves(params)
    elif isinstance(params, nnx.State):
        leaves, layers = _nnx_leaves(params)
    else:
        leaves, layers = _dict_leaves(params)
    names, flatten = dict(names or {}), dict(flatten or {})
    if strict:
        check_names("names", names, layers)
    else:
        names = {name: path for name, path in names.items() if name in layers}
    out = {key: leaf._replace(path=renamed(leaf.form, leaf.path, layers, names)) for key, leaf in leaves.items()}
    kernels = {"/".join(leaf.path[:-1]): key for key, leaf in out.items() if leaf.path[-1] == "kernel"}
    check_names("flatten", flatten, kernels)
    for layer, hwc in flatten.items():
        leaf = out[kernels[layer]]
        out[kernels[layer]] = leaf._replace(rule=layouts.rows_chw(leaf.rule, tuple(hwc), leaf.where))
    _no_duplicates(out)
    return out


def _no_duplicates(found: Mapping[str, Leaf]) -> None:
    seen: dict[Path, str] = {}
    for leaf in found.values():
        if leaf.path in seen:
            raise ConversionError(f"names: {seen[leaf.path]} and {leaf.form} both go to {'/'.join(leaf.path)}")
        seen[leaf.path] = leaf.form
