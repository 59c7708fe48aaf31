"""Move params, optimiser state and model state between the functional, Equinox, Flax linen and NNX forms, exactly.

Two functions do everything:

* :func:`to_functional` takes an Equinox module, an NNX module (its params), Flax variables
  (``{'params': ...}``), a Flax ``TrainState``, an NNX ``(model, nnx.Optimizer)`` pair or a
  :class:`pureflax.TrainState` (of any form) and returns the functional form: a params dict
  with Flax's paths, or a functional ``TrainState`` (its ``model_state`` Linen's ``batch_stats``).
* :func:`from_functional` fills the structure of ``like`` (an instance of the form you
  want; its arrays may be ``jax.ShapeDtypeStruct``) with the values of a functional tree,
  the way orbax restores into an abstract target.

A model's params *and* its running statistics (BatchNorm) without an optimiser are its
*variables*: Linen's ``{'params', 'batch_stats'}``, an NNX module, an Equinox ``(model,
eqx.nn.State)`` pair. :func:`variables_to_functional` gives ``(params, model_state)`` and
:func:`variables_from_functional` fills one back; :func:`to_functional` refuses Linen variables
with ``batch_stats`` rather than drop them, and of an NNX module it takes the ``nnx.Param`` only.
:func:`state_to_functional` / :func:`state_from_functional` convert a model state alone.

Values are carried, never re-initialised: round trips are bit for bit. What each layer kind
transposes, permutes or reshapes is listed in :data:`LAYOUTS` (``print(layouts_table())``);
NNX keeps Linen's layouts, so for NNX only the names move. ``names=`` maps layer paths that
differ from Flax's (``{'features/0': 'Conv_0'}``), ``flatten=`` reorders the rows of a Dense
kernel that follows a channels-first flatten (``{'Dense_0': (7, 7, 64)}``). Optimiser states
convert with their params: every subtree of an optax state shaped like the params (Adam's
``mu``/``nu``, EMA, MultiSteps accumulators, the masked trees of ``multi_transform``) is
converted too. Any mismatch raises :class:`ConversionError` naming the path, both shapes and
both dtypes; :func:`check_layers` refuses two modules whose layers compute different things
(``eps``, ``momentum``, strides, padding, dilation, groups).

BatchNorm's running statistics convert in every form, but only Linen, NNX and
:class:`pureflax.compat.eqx_layers.BatchNorm` update them by the same rule: ``eqx.nn.BatchNorm``
converts (params, and its ``"ema"`` or ``"batch"`` statistics as the statistics it normalises
with) but its update rule differs from Flax's, by order one after 50 steps (docs/layers.md).

Example:
    >>> import equinox as eqx, jax
    >>> from pureflax import vae
    >>> from pureflax.compat import equinox_models, convert
    >>> params = jax.jit(vae.init, static_argnums=1)(jax.random.PRNGKey(0), vae.VAEConfig(latent_dim=4))
    >>> like = eqx.filter_eval_shape(equinox_models.VAE, latent_dim=4, key=jax.random.PRNGKey(1))  # shapes suffice
    >>> model = convert.from_functional(params, like=like)
    >>> bool((model.encoder.layers[0].weight == params['encoder']['Dense_0']['kernel'].T).all())
    True
    >>> back = convert.to_functional(model)
    >>> bool((back['encoder']['Dense_0']['kernel'] == params['encoder']['Dense_0']['kernel']).all())
    True
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import equinox as eqx
import flax.core
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.training import train_state as flax_train_state

from pureflax.compat import eqx_layers, flax_models
from pureflax.state import TrainState

FlaxTrainState = flax_train_state.TrainState
Path = tuple[str, ...]


class ConversionError(ValueError):
    """Two trees that should correspond do not: the message names the path, both shapes and dtypes."""


# ----------------------------------------------------------------------------- rules


class Rule(NamedTuple):
    """How one array of a form becomes its functional counterpart, and back."""

    name: str  # as LAYOUTS and the error messages print it
    to_functional: Callable[[Any], Any]  # the form's array -> the functional array
    from_functional: Callable[[Any, tuple[int, ...]], Any]  # (functional array, the form's shape) -> the form's array
    functional_shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # the form's shape -> the functional one


def _conv_kernel_to_functional(w: Any) -> Any:
    """Equinox (out, in//groups, *k) -> Flax (*k, in//groups, out)."""
    return jnp.transpose(w, tuple(range(2, w.ndim)) + (1, 0))


def _conv_kernel_from_functional(k: Any, shape: tuple[int, ...]) -> Any:
    """Flax (*k, in//groups, out) -> Equinox (out, in//groups, *k)."""
    del shape
    return jnp.transpose(k, (k.ndim - 1, k.ndim - 2) + tuple(range(k.ndim - 2)))


SAME = Rule("as is", lambda x: x, lambda x, shape: x, lambda s: s)
TRANSPOSE = Rule("transposed", jnp.transpose, lambda x, shape: jnp.transpose(x), lambda s: s[::-1])
CONV_KERNEL = Rule("permuted (out, in//groups, *k) <-> (*k, in//groups, out)", _conv_kernel_to_functional,
                   _conv_kernel_from_functional, lambda s: s[2:] + (s[1], s[0]))
CONV_BIAS = Rule("reshaped (out, 1, ..., 1) <-> (out,)", lambda x: jnp.reshape(x, (-1,)),
                 lambda x, shape: jnp.reshape(x, shape), lambda s: s[:1])


def _is_masked(x: Any) -> bool:
    """optax.multi_transform puts a MaskedNode where a frozen param's state would be."""
    return isinstance(x, optax.MaskedNode)


def _is_array(x: Any) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _apply(fn: Callable[[Any], Any], x: Any) -> Any:
    """``fn(x)`` for an array, its shape for a ``ShapeDtypeStruct``; a MaskedNode stays one."""
    if _is_masked(x):
        return x
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.eval_shape(fn, x)
    return fn(x)


def _rows_chw(rule: Rule, hwc: tuple[int, int, int], where: str) -> Rule:
    """``rule`` then the kernel's rows from the form's (C, H, W) order to the functional (H, W, C) one."""
    h, w, c = hwc

    def rows(k: Any) -> int:
        if len(k.shape) != 2 or k.shape[0] != h * w * c:
            raise ConversionError(f"{where}: flatten={hwc} needs a (H·W·C, out) = ({h * w * c}, out) kernel, got {tuple(k.shape)}")
        return k.shape[1]

    def to_functional(x: Any) -> Any:
        k = rule.to_functional(x)
        return jnp.reshape(jnp.transpose(jnp.reshape(k, (c, h, w, rows(k))), (1, 2, 0, 3)), (h * w * c, -1))

    def from_functional(k: Any, shape: tuple[int, ...]) -> Any:
        chw = jnp.reshape(jnp.transpose(jnp.reshape(k, (h, w, c, rows(k))), (2, 0, 1, 3)), (h * w * c, -1))
        return rule.from_functional(chw, shape)

    return Rule(f"{rule.name}; rows (C, H, W) <-> (H, W, C) for (H, W, C) = {hwc}", to_functional, from_functional, rule.functional_shape)


# ------------------------------------------------------------------- layer settings
# Each in Flax's terms, so two forms' layers compare by ==. Paddings become the (low, high)
# pairs lax.conv_general_dilated receives; where those depend on the input size (Flax's
# 'SAME' with a stride) the string stays, and only an equal string matches it.


def _ints(value: Any, n: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * n
    return (int(value),) * n if isinstance(value, int) else tuple(int(v) for v in value)


def _pairs(padding: Any, n: int) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, int):
        return ((padding, padding),) * n
    return tuple((p, p) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in padding)


def _conv_pads(padding: Any, kernel: tuple[int, ...], strides: tuple[int, ...], dilation: tuple[int, ...]) -> Any:
    """The padding ``lax.conv_general_dilated`` applies for ``padding``."""
    if not isinstance(padding, str):
        return _pairs(padding, len(kernel))
    mode = padding.upper()
    if mode == "VALID":
        return ((0, 0),) * len(kernel)
    if mode in ("SAME", "SAME_LOWER") and all(s == 1 for s in strides):  # lax.padtype_to_pads, stride 1
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        low = [(t + (mode == "SAME_LOWER")) // 2 for t in totals]
        return tuple((lo, t - lo) for lo, t in zip(low, totals))
    return mode


def _conv_transpose_pads(padding: Any, kernel: tuple[int, ...], strides: tuple[int, ...], dilation: tuple[int, ...]) -> Any:
    """The padding ``lax.conv_transpose`` (Flax's ``ConvTranspose``) gives ``conv_general_dilated``."""
    if not isinstance(padding, str):
        return _pairs(padding, len(kernel))
    if padding.upper() not in ("SAME", "VALID"):
        return padding.upper()
    pads = []
    for k, s, d in zip(kernel, strides, dilation):  # lax's _conv_transpose_padding on the dilated kernel
        k = d * (k - 1) + 1
        if padding.upper() == "SAME":
            total, low = k + s - 2, (k - 1 if s > k - 1 else -(-(k + s - 2) // 2))
        else:
            total, low = k + s - 2 + max(k - s, 0), k - 1
        pads.append((low, total - low))
    return tuple(pads)


def _eqx_conv_settings(m: eqx.nn.Conv) -> dict[str, Any]:
    pads = _conv_pads(m.padding, m.kernel_size, m.stride, m.dilation)
    return {"strides": m.stride, "kernel_dilation": m.dilation, "input_dilation": (1,) * m.num_spatial_dims,
            "feature_group_count": m.groups, "padding": pads if m.padding_mode == "ZEROS" else f"{m.padding_mode} {m.padding}"}


def _nnx_conv_settings(m: nnx.Conv) -> dict[str, Any]:
    n = len(m.kernel_size)
    strides, dilation = _ints(m.strides, n), _ints(m.kernel_dilation, n)
    return {"strides": strides, "kernel_dilation": dilation, "input_dilation": _ints(m.input_dilation, n),
            "feature_group_count": m.feature_group_count, "padding": _conv_pads(m.padding, m.kernel_size, strides, dilation)}


def _eqx_conv_transpose_settings(m: eqx.nn.ConvTranspose) -> dict[str, Any]:
    pads = m._padding_transpose() if m.padding_mode == "ZEROS" else f"{m.padding_mode} {m.padding}"  # what its __call__ gives lax
    return {"strides": m.stride, "kernel_dilation": m.dilation, "feature_group_count": m.groups, "transpose_kernel": False,
            "padding": pads}


def _nnx_conv_transpose_settings(m: nnx.ConvTranspose) -> dict[str, Any]:
    n = len(m.kernel_size)
    strides, dilation = _ints(m.strides, n), _ints(m.kernel_dilation, n)
    return {"strides": strides, "kernel_dilation": dilation, "feature_group_count": 1, "transpose_kernel": m.transpose_kernel,
            "padding": _conv_transpose_pads(m.padding, m.kernel_size, strides, dilation)}


def _axes(value: Any) -> tuple[int, ...]:
    return (value,) if isinstance(value, int) else tuple(value)


def _no_settings(module: Any) -> dict[str, Any]:
    """A layer with nothing to compare but its kind (its sizes are its arrays' shapes)."""
    del module
    return {}


# ----------------------------------------------------------------------- the table


class Layout(NamedTuple):
    """One layer kind in one form: which of its arrays is which functional array, and how."""

    kind: str  # the Linen layer, whose layout the functional form keeps: 'Dense', 'Conv', ...
    form: str  # 'linen', 'equinox' or 'nnx'
    layer: str  # the class as one writes it
    params: tuple[tuple[str, str, Rule], ...]  # (the form's attribute, the functional name, the rule)
    stats: str = ""  # where its running statistics live; '' when it has none
    cls: type | None = None  # what the converters dispatch on (None: Linen's dicts, taken as they are)
    settings: Callable[[Any], dict[str, Any]] | None = None  # its settings in Flax's terms, for check_layers


_LINEAR = (("kernel", "kernel", SAME), ("bias", "bias", SAME))
_NORM = (("scale", "scale", SAME), ("bias", "bias", SAME))
_EQX_NORM = (("weight", "scale", SAME), ("bias", "bias", SAME))
_BATCH_STATS = "batch_stats {'mean', 'var'}"

LAYOUTS: tuple[Layout, ...] = (
    Layout("Dense", "linen", "nn.Dense", _LINEAR),
    Layout("Dense", "equinox", "eqx.nn.Linear", (("weight", "kernel", TRANSPOSE), ("bias", "bias", SAME)), cls=eqx.nn.Linear,
           settings=_no_settings),
    Layout("Dense", "nnx", "nnx.Linear", _LINEAR, cls=nnx.Linear, settings=_no_settings),
    Layout("Conv", "linen", "nn.Conv", _LINEAR),
    Layout("Conv", "equinox", "eqx.nn.Conv (1/2/3-D)", (("weight", "kernel", CONV_KERNEL), ("bias", "bias", CONV_BIAS)),
           cls=eqx.nn.Conv, settings=_eqx_conv_settings),
    Layout("Conv", "nnx", "nnx.Conv", _LINEAR, cls=nnx.Conv, settings=_nnx_conv_settings),
    Layout("ConvTranspose", "linen", "nn.ConvTranspose (transpose_kernel=False)", _LINEAR),
    Layout("ConvTranspose", "equinox", "eqx.nn.ConvTranspose (1/2/3-D)",
           (("weight", "kernel", CONV_KERNEL), ("bias", "bias", CONV_BIAS)), cls=eqx.nn.ConvTranspose,
           settings=_eqx_conv_transpose_settings),
    Layout("ConvTranspose", "nnx", "nnx.ConvTranspose", _LINEAR, cls=nnx.ConvTranspose, settings=_nnx_conv_transpose_settings),
    Layout("LayerNorm", "linen", "nn.LayerNorm", _NORM),
    Layout("LayerNorm", "equinox", "eqx.nn.LayerNorm (1-D shape: features last)", _EQX_NORM, cls=eqx.nn.LayerNorm,
           settings=lambda m: {"epsilon": m.eps, "axes": ((-1,), (-1,))}),
    Layout("LayerNorm", "nnx", "nnx.LayerNorm", _NORM, cls=nnx.LayerNorm,
           settings=lambda m: {"epsilon": m.epsilon, "axes": (_axes(m.reduction_axes), _axes(m.feature_axes))}),
    Layout("GroupNorm", "linen", "nn.GroupNorm", _NORM),
    Layout("GroupNorm", "equinox", "eqx.nn.GroupNorm", _EQX_NORM, cls=eqx.nn.GroupNorm,
           settings=lambda m: {"epsilon": m.eps, "num_groups": m.groups}),
    Layout("GroupNorm", "nnx", "nnx.GroupNorm", _NORM, cls=nnx.GroupNorm,
           settings=lambda m: {"epsilon": m.epsilon, "num_groups": m.num_groups}),
    Layout("Embed", "linen", "nn.Embed", (("embedding", "embedding", SAME),)),
    Layout("Embed", "equinox", "eqx.nn.Embedding", (("weight", "embedding", SAME),), cls=eqx.nn.Embedding,
           settings=_no_settings),
    Layout("Embed", "nnx", "nnx.Embed", (("embedding", "embedding", SAME),), cls=nnx.Embed, settings=_no_settings),
    Layout("BatchNorm", "linen", "nn.BatchNorm", _NORM, _BATCH_STATS),
    Layout("BatchNorm", "equinox", "pureflax.compat.eqx_layers.BatchNorm", _EQX_NORM,
           "eqx.nn.State at state_index: (mean, var)", cls=eqx_layers.BatchNorm,
           settings=lambda m: {"epsilon": m.eps, "momentum": m.momentum}),
    Layout("BatchNorm", "equinox", "eqx.nn.BatchNorm (its own update rule)", _EQX_NORM,
           "eqx.nn.State: 'ema' mode (mean, var) at ema_state_index; 'batch' mode hidden / (1 - momentum**counter)",
           cls=eqx.nn.BatchNorm, settings=lambda m: {"epsilon": m.eps, "momentum": m.momentum}),
    Layout("BatchNorm", "nnx", "nnx.BatchNorm", _NORM, "nnx.BatchStat mean, var", cls=nnx.BatchNorm,
           settings=lambda m: {"epsilon": m.epsilon, "momentum": m.momentum}),
)


def layouts_table() -> str:
    """:data:`LAYOUTS` as a Markdown table: each layer kind, its class in each form, what moves how."""
    rows = ["| layer | form | class | arrays (form -> functional) | running statistics |", "|---|---|---|---|---|"]
    for row in LAYOUTS:
        arrays = "; ".join(f"`{a}` -> `{b}`" + ("" if rule is SAME else f" ({rule.name})") for a, b, rule in row.params)
        rows.append(f"| {row.kind} | {row.form} | `{row.layer}` | {arrays} | {row.stats or '-'} |")
    return "\n".join(rows)


def _layout(module: Any) -> Layout | None:
    """The row of ``LAYOUTS`` for an Equinox or NNX layer; ``None`` for anything else (containers)."""
    for row in LAYOUTS:
        if row.cls is not None and isinstance(module, row.cls):
            return row
    return None


def _refuse(module: Any, where: str) -> None:
    """Layers whose computation Flax's counterpart cannot reproduce, whatever their params."""
    if isinstance(module, eqx.nn.LayerNorm) and len(module.shape) != 1:
        raise ConversionError(
            f"{where}: eqx.nn.LayerNorm(shape={module.shape}) normalises over its whole shape, Flax's LayerNorm over "
            "the last axis only: only a 1-D shape (the features, last) converts"
        )


# ------------------------------------------------------------------ the leaf tables


class Leaf(NamedTuple):
    """Where one array of a form goes in the functional tree."""

    form: str  # the form's path of the array, '/'-joined ('features/0/weight'): what `names` maps
    path: Path  # its functional path ('Conv_0', 'kernel')
    rule: Rule
    where: str  # how error messages name it ('.features[0].weight')


class _Node(NamedTuple):
    """A module of an Equinox model: its pytree keys, its path in the model and its default functional path."""

    keys: tuple
    form: str
    path: Path
    module: eqx.Module


def _eqx_nodes(model: Any) -> list[_Node]:
    """Every module of an Equinox model, outermost first.

    A module field keeps its name; item ``i`` of a list/tuple field is named by the module's
    ``flax_item_name`` (``'Dense_{i}'`` for a compact stack) or else ``'{field}_{i}'`` (how
    ``flax.linen.Sequential`` names them). A layer of :data:`LAYOUTS` ends the walk; any other
    module holding arrays itself has no Flax counterpart.
    """
    nodes: list[_Node] = []

    def visit(node: Any, keys: tuple, path: Path) -> None:
        where = jax.tree_util.keystr(keys) or "the model"
        if isinstance(node, eqx.nn.StateIndex):
            return  # running statistics: they live in the eqx.nn.State, not in the params
        if isinstance(node, eqx.Module):
            nodes.append(_Node(keys, jax.tree_util.keystr(keys, simple=True, separator="/"), path, node))
            if _layout(node) is not None:
                _refuse(node, where)
                return
            for field in dataclasses.fields(node):
                if field.metadata.get("static", False):
                    continue
                value, key = getattr(node, field.name), keys + (jax.tree_util.GetAttrKey(field.name),)
                if _is_array(value):
                    raise ConversionError(
                        f"{where}: {type(node).__module__}.{type(node).__name__} holds arrays ({field.name}); only the "
                        "layers of pureflax.compat.convert.LAYOUTS have a Flax counterpart"
                    )
                if isinstance(value, (list, tuple)):
                    template = getattr(type(node), "flax_item_name", field.name + "_{i}")
                    for i, item in enumerate(value):
                        visit(item, key + (jax.tree_util.SequenceKey(i),), path + (template.format(i=i),))
                else:
                    visit(value, key, path + (field.name,))
            return
        if any(_is_array(leaf) for leaf in jax.tree_util.tree_leaves(node)):
            raise ConversionError(
                f"{where}: only the layers of pureflax.compat.convert.LAYOUTS have a Flax counterpart, found {type(node).__name__}"
            )

    visit(model, (), ())
    return nodes


def _eqx_leaves(model: eqx.Module) -> tuple[dict[str, Leaf], dict[str, Path]]:
    leaves: dict[str, Leaf] = {}
    nodes = _eqx_nodes(model)
    for node in nodes:
        row = _layout(node.module)
        for attr, name, rule in row.params if row else ():
            if getattr(node.module, attr) is not None:
                key = jax.tree_util.keystr(node.keys + (jax.tree_util.GetAttrKey(attr),))
                leaves[key] = Leaf(f"{node.form}/{attr}".lstrip("/"), node.path + (name,), rule, key)
    return leaves, {node.form: node.path for node in nodes if node.form}


def _nnx_path(parts: tuple) -> Path:
    """An NNX path as Linen names it: item ``i`` of ``layers`` is ``Dense_{i}`` (a compact stack, as
    ``nnx_models.FeedForward``), item ``i`` of any other list ``{field}_{i}`` (Linen's ``setup`` lists)."""
    path: list[str] = []
    for i, part in enumerate(parts):
        if isinstance(part, int) and i:
            path[-1] = f"Dense_{part}" if parts[i - 1] == "layers" else f"{parts[i - 1]}_{part}"
        else:
            path.append(str(part))
    return tuple(path)


def _prefixes(parts: tuple, name: Callable[[tuple], Path]) -> dict[str, Path]:
    """The layers above a leaf (not the lists holding them), by '/'-joined path."""
    return {"/".join(map(str, parts[:j])): name(parts[:j]) for j in range(1, len(parts)) if not isinstance(parts[j], int)}


def _nnx_leaves(state: Any) -> tuple[dict[str, Leaf], dict[str, Path]]:
    """An NNX ``State`` (params or BatchStats): Linen's layouts, so only the names move."""
    leaves: dict[str, Leaf] = {}
    layers: dict[str, Path] = {}
    for keys, _ in _flatten(state)[0]:
        parts = tuple(k.key for k in keys)
        key = jax.tree_util.keystr(keys)
        leaves[key] = Leaf("/".join(map(str, parts)), _nnx_path(parts), SAME, key)
        layers.update(_prefixes(parts, _nnx_path))
    return leaves, layers


def _dict_leaves(tree: Any) -> tuple[dict[str, Leaf], dict[str, Path]]:
    """A functional or Linen dict: Flax's paths already."""
    leaves: dict[str, Leaf] = {}
    layers: dict[str, Path] = {}
    for keys, _ in _flatten(tree)[0]:
        parts = tuple(str(k.key) for k in keys)
        leaves[jax.tree_util.keystr(keys)] = Leaf("/".join(parts), parts, SAME, "/".join(parts))
        layers.update(_prefixes(parts, tuple))
    return leaves, layers


def _check_names(option: str, wanted: Mapping[str, Any], have: Mapping[str, Any] | set) -> None:
    """Every key of ``wanted`` (a ``names``/``flatten`` argument) is one of ``have``: else name it and the close ones."""
    for name in wanted:
        if name not in have:
            close = difflib.get_close_matches(name, list(have), n=3, cutoff=0.4)
            raise ConversionError(
                f"{option}: {name!r} is not a layer of this model; close: {close or 'none'}; "
                f"its layers: {sorted(have)[:30]}"
            )


def _renamed(form: str, path: Path, layers: Mapping[str, Path], names: Mapping[str, str]) -> Path:
    """``path`` (the default functional path of the form's ``form``) after ``names``: the longest prefix wins."""
    matches = [p for p in names if form == p or form.startswith(p + "/")]
    if not matches:
        return path
    prefix = max(matches, key=len)
    return tuple(names[prefix].split("/")) + path[len(layers[prefix]):]


def _table(params: Any, names: Mapping[str, str] | None = None, flatten: Mapping[str, Any] | None = None, *,
           strict: bool = True) -> dict[str, Leaf]:
    """Each array of ``params`` (Equinox module, NNX ``State`` or dict), by ``keystr``, with where it goes.

    ``strict=False`` for a model state: it holds the BatchNorms only, so ``names`` of other layers are
    not its (the params' conversion checks every name).
    """
    if isinstance(params, eqx.Module):
        leaves, layers = _eqx_leaves(params)
    elif isinstance(params, nnx.State):
        leaves, layers = _nnx_leaves(params)
    else:
        leaves, layers = _dict_leaves(params)
    names, flatten = dict(names or {}), dict(flatten or {})
    if strict:
        _check_names("names", names, layers)
    else:
        names = {name: path for name, path in names.items() if name in layers}
    table = {key: leaf._replace(path=_renamed(leaf.form, leaf.path, layers, names)) for key, leaf in leaves.items()}
    kernels = {"/".join(leaf.path[:-1]): key for key, leaf in table.items() if leaf.path[-1] == "kernel"}
    _check_names("flatten", flatten, kernels)
    for layer, hwc in flatten.items():
        leaf = table[kernels[layer]]
        table[kernels[layer]] = leaf._replace(rule=_rows_chw(leaf.rule, tuple(hwc), leaf.where))
    _no_duplicates(table)
    return table


def _no_duplicates(table: Mapping[str, Leaf]) -> None:
    seen: dict[Path, str] = {}
    for leaf in table.values():
        if leaf.path in seen:
            raise ConversionError(f"names: {seen[leaf.path]} and {leaf.form} both go to {'/'.join(leaf.path)}")
        seen[leaf.path] = leaf.form


# ------------------------------------------------------------------------- helpers


def _is_flax_variables(x: Any) -> bool:
    return isinstance(x, Mapping) and not isinstance(x, nnx.State) and set(x.keys()) == {"params"}


def _is_linen_variables_with_state(x: Any) -> bool:
    return isinstance(x, Mapping) and not isinstance(x, nnx.State) and "params" in x and len(x) > 1


def _flatten(tree: Any):
    """Leaves with paths, a MaskedNode counting as a leaf so masks survive conversion."""
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked)


def _plain(tree: Any) -> Any:
    """FrozenDicts to dicts, so dict paths compare equal whatever Flax handed us."""
    return flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree


def _has_leaves(tree: Any) -> bool:
    return bool(jax.tree_util.tree_leaves(tree))


def _get(tree: Mapping, path: Path, where: str) -> Any:
    node = tree
    for depth, name in enumerate(path):
        if not isinstance(node, Mapping) or name not in node:
            have = sorted(node) if isinstance(node, Mapping) else type(node).__name__
            raise ConversionError(f"{where}: the functional tree has no {'/'.join(path[: depth + 1])} (found {have})")
        node = node[name]
    return node


def _set(tree: dict, path: Path, value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _check_leaf(where: str, source: Any, target: Any, rule: Rule = SAME) -> None:
    """THE check of one array against its target: the shape through ``rule``, then the dtype."""
    if _is_masked(source) or _is_masked(target):
        if not (_is_masked(source) and _is_masked(target)):
            raise ConversionError(f"{where}: one tree freezes this param and the other does not")
        return
    have, want = getattr(source, "dtype", None), getattr(target, "dtype", None)
    dtypes = f"; dtypes {np.dtype(have) if have is not None else '?'} and {np.dtype(want) if want is not None else '?'}"
    _check_shape(where, source, tuple(np.shape(target)), rule, dtypes)
    if have is not None and want is not None and np.dtype(have) != np.dtype(want):
        raise ConversionError(
            f"{where}: source dtype {np.dtype(have)} does not match target dtype {np.dtype(want)} "
            f"(source shape {tuple(np.shape(source))}, target shape {tuple(np.shape(target))})"
        )


def _check_shape(where: str, source: Any, target_shape: tuple[int, ...], rule: Rule, dtypes: str = "") -> None:
    shape, expected = tuple(np.shape(source)), tuple(rule.functional_shape(target_shape))
    if shape != expected:
        detail = "" if rule is SAME else f" ({rule.name} from {tuple(target_shape)})"
        raise ConversionError(f"{where}: source shape {shape} does not match target shape {expected}{detail}{dtypes}")


def _no_extra(tree: Mapping, used: set[str]) -> None:
    """Refuse a source with arrays the target has no place for (nothing is dropped silently)."""
    theirs = {jax.tree_util.keystr(k, simple=True, separator="/") for k, _ in _flatten(tree)[0]}
    if theirs - used:
        raise ConversionError(f"the functional tree has params the target lacks: {sorted(theirs - used)}")


# ------------------------------------------------------------------------ params


def _unboxed(params: Any) -> Any:
    """An NNX module or a ``State`` of ``nnx.Variable`` boxes as a pure params ``State``; anything else as it is."""
    if isinstance(params, nnx.Module):
        return nnx.as_pure(nnx.state(params, nnx.Param))
    return nnx.as_pure(params) if isinstance(params, nnx.State) else params


def _refuse_linen_state(obj: Any) -> None:
    if _is_linen_variables_with_state(_plain(obj)):
        raise ConversionError(
            f"Linen variables with {sorted(set(obj) - {'params'})} besides params: use "
            "convert.variables_to_functional(variables) -> (params, model_state), or pass variables['params']"
        )


def param_names(params: Any, *, names: Mapping[str, str] | None = None) -> Any:
    """A tree shaped like ``params`` (any form) whose leaves are functional paths.

    Example: the leaf for ``model.encoder.layers[0].weight`` is ``'encoder/Dense_0/kernel'``;
    for Flax variables, ``variables['params']['encoder']['Dense_0']['kernel']`` gives the same.
    """
    params = _unboxed(params)
    if not isinstance(params, (eqx.Module, nnx.State)):
        params = _plain(params)
        if _is_flax_variables(params):
            return {"params": param_names(params["params"], names=names)}
    table = _table(params, names)

    def name(path, leaf):
        entry = table.get(jax.tree_util.keystr(path))
        return leaf if entry is None else "/".join(entry.path)

    return jax.tree_util.tree_map_with_path(name, params)


def params_to_functional(params: Any, *, names: Mapping[str, str] | None = None, flatten: Mapping[str, Any] | None = None) -> dict:
    """The functional params dict of an Equinox module, an NNX module or ``State``, Flax variables or a dict."""
    params = _unboxed(params)
    if not isinstance(params, (eqx.Module, nnx.State)):
        _refuse_linen_state(params)
        params = _plain(params)
        if _is_flax_variables(params):
            return params_to_functional(params["params"], names=names, flatten=flatten)
        if not isinstance(params, Mapping):
            raise ConversionError(f"cannot convert a {type(params).__name__}: expected an Equinox or NNX module, Flax variables or a dict")
        if not names and not flatten:
            return params
    return _collect(params, _table(params, names, flatten))


def _collect(tree: Any, table: Mapping[str, Leaf]) -> dict:
    """The functional dict of the arrays of ``tree`` that ``table`` names (converted by their rules)."""
    out: dict = {}
    for keys, leaf in _flatten(tree)[0]:
        entry = table.get(jax.tree_util.keystr(keys))
        if entry is not None:  # else not a param: a function inside eqx.nn.Lambda, say
            _set(out, entry.path, _apply(entry.rule.to_functional, leaf))
    return out


def _fill(tree: Mapping, like: Any, table: Mapping[str, Leaf]) -> Any:
    """``like`` with each array of ``table`` taken from ``tree`` (checked, converted); the rest kept."""
    leaves_with_path, treedef = _flatten(like)
    leaves, used = [], set()
    for keys, target in leaves_with_path:
        leaf = table.get(jax.tree_util.keystr(keys))
        if leaf is None:
            leaves.append(target)  # not a param: kept from the target
            continue
        source = _get(tree, leaf.path, leaf.where)
        _check_leaf(leaf.where, source, target, leaf.rule)
        shape = tuple(np.shape(target))
        leaves.append(_apply(lambda x, rule=leaf.rule, shape=shape: rule.from_functional(x, shape), source))
        used.add("/".join(leaf.path))
    _no_extra(tree, used)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def params_from_functional(tree: Mapping, like: Any, *, names: Mapping[str, str] | None = None,
                           flatten: Mapping[str, Any] | None = None) -> Any:
    """``like`` (Equinox or NNX module, NNX ``State``, Flax variables or functional dict) filled with ``tree``'s values.

    An NNX module comes back as a new module (``nnx.merge`` of ``like``'s graph with the
    filled params, its other variables such as BatchStats kept); ``like`` itself is left as it was.
    """
    tree = _plain(tree)
    if isinstance(like, nnx.Module):
        graphdef, params, rest = nnx.split(like, nnx.Param, ...)
        return nnx.merge(graphdef, params_from_functional(tree, nnx.as_pure(params), names=names, flatten=flatten), rest)
    like = nnx.as_pure(like) if isinstance(like, nnx.State) else like  # a State of boxes is filled as a pure one
    _refuse_linen_state(like)
    if _is_flax_variables(_plain(like)):
        filled = {"params": params_from_functional(tree, _plain(like)["params"], names=names, flatten=flatten)}
        return flax.core.freeze(filled) if isinstance(like, flax.core.FrozenDict) else filled
    if isinstance(like, (eqx.Module, nnx.State)):
        return _fill(tree, like, _table(like, names, flatten))
    if isinstance(like, Mapping):
        filled = _fill(tree, _plain(like), _table(_plain(like), names, flatten))
        return flax.core.freeze(filled) if isinstance(like, flax.core.FrozenDict) else filled
    raise ConversionError(f"cannot fill a {type(like).__name__}: expected an Equinox or NNX module, Flax variables or a dict")


# -------------------------------------------------------------------- model state
# The functional model state is Linen's ``batch_stats`` layout: {'encoder': {'norm_0': {'mean', 'var'}}}.
# NNX keeps it as nnx.BatchStat variables at the same paths, Linen as the dict itself; Equinox
# keeps it in an eqx.nn.State, indexed by the StateIndex objects of the module's BatchNorms.

# eqx.nn.BatchNorm(mode="batch") divides its running statistics by 1 - momentum**counter. Filled
# from the functional form its counter is set here: momentum**counter is then exactly 0 in float32,
# so it divides by exactly 1, and its training updates the statistics by Flax's rule from then on.
_SETTLED_COUNTER = 2**30


class _Stats(NamedTuple):
    """One BatchNorm's running statistics in an ``eqx.nn.State`` (its values by StateIndex marker)."""

    path: Path  # functional path of the layer
    where: str  # the module's path, for messages
    markers: tuple  # the StateIndex markers it reads
    get: Callable[[dict], tuple[Any, Any]]  # values -> (mean, var) as Flax's rule reads them
    put: Callable[[dict, Any, Any], None]  # write (mean, var) into values
    like: Callable[[dict], tuple[Any, Any]]  # values -> the arrays (mean, var) are checked against


def _pureflax_stats(m: eqx_layers.BatchNorm) -> tuple:
    marker = m.state_index.marker

    def put(values: dict, mean: Any, var: Any) -> None:
        values[marker] = (mean, var)

    return (marker,), lambda values: tuple(values[marker]), put, lambda values: tuple(values[marker])


def _eqx_ema_stats(m: eqx.nn.BatchNorm) -> tuple:
    first, ema = m.ema_first_time_index.marker, m.ema_state_index.marker

    def get(values: dict) -> tuple[Any, Any]:
        (mean, var), fresh = values[ema], values[first]
        if isinstance(fresh, jax.ShapeDtypeStruct):
            return mean, var
        # never trained: its buffers are empty; Flax's running statistics start at mean 0, variance 1
        return jnp.where(fresh, jnp.zeros_like(mean), mean), jnp.where(fresh, jnp.ones_like(var), var)

    def put(values: dict, mean: Any, var: Any) -> None:
        values[first], values[ema] = jnp.asarray(False), (mean, var)

    return (first, ema), get, put, lambda values: tuple(values[ema])


def _eqx_batch_stats(m: eqx.nn.BatchNorm) -> tuple:
    counter, hidden = m.batch_counter.marker, m.batch_state_index.marker

    def get(values: dict) -> tuple[Any, Any]:
        (mean, var), n = values[hidden], values[counter]
        if isinstance(n, jax.ShapeDtypeStruct):
            return mean, var
        scale = jnp.where(n == 0, 1, 1 - m.momentum**n)  # what its inference mode divides by
        return mean / scale, var / scale

    def put(values: dict, mean: Any, var: Any) -> None:
        values[counter] = jnp.asarray(_SETTLED_COUNTER, np.dtype(values[counter].dtype))
        values[hidden] = (mean, var)

    return (counter, hidden), get, put, lambda values: tuple(values[hidden])


def _eqx_stats(model: eqx.Module, names: Mapping[str, str] | None) -> list[_Stats]:
    """The BatchNorms of an Equinox model, with their functional paths (after ``names``)."""
    nodes = _eqx_nodes(model)
    layers = {node.form: node.path for node in nodes if node.form}
    _check_names("names", dict(names or {}), layers)
    found = []
    for node in nodes:
        m = node.module
        if isinstance(m, eqx_layers.BatchNorm):
            parts = _pureflax_stats(m)
        elif isinstance(m, eqx.nn.BatchNorm):
            parts = _eqx_ema_stats(m) if m.mode == "ema" else _eqx_batch_stats(m)
        else:
            continue
        where = jax.tree_util.keystr(node.keys) or "the model"
        found.append(_Stats(_renamed(node.form, node.path, layers, dict(names or {})), where, *parts))
    return found


def _state_values(state: eqx.nn.State) -> tuple[tuple, dict]:
    """An ``eqx.nn.State``'s markers and a fresh dict of its values (the State itself is not touched)."""
    values, markers = state.tree_flatten()
    return markers, dict(zip(markers, values))


def _check_markers(stats: _Stats, values: dict) -> None:
    if any(marker not in values for marker in stats.markers):
        raise ConversionError(
            f"{stats.where}: the eqx.nn.State does not hold this BatchNorm's statistics: build it from this "
            "model (eqx.nn.make_with_state(Model)(...) or eqx.nn.State(model))"
        )


def _eqx_state_to_functional(state: eqx.nn.State, model: eqx.Module, names: Mapping[str, str] | None) -> dict:
    _, values = _state_values(state)
    out: dict = {}
    for stats in _eqx_stats(model, names):
        _check_markers(stats, values)
        mean, var = stats.get(values)
        _set(out, stats.path + ("mean",), mean)
        _set(out, stats.path + ("var",), var)
    return out


def _eqx_state_from_functional(tree: Mapping, like: eqx.nn.State, model: eqx.Module,
                               names: Mapping[str, str] | None) -> eqx.nn.State:
    markers, values = _state_values(like)
    used = set()
    for stats in _eqx_stats(model, names):
        _check_markers(stats, values)
        sources = []
        for name, target in zip(("mean", "var"), stats.like(values)):
            source = _get(tree, stats.path + (name,), stats.where)
            _check_leaf(f"{stats.where} {name}", source, target)
            sources.append(source)
            used.add("/".join(stats.path + (name,)))
        stats.put(values, *sources)
    _no_extra(tree, used)
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
        return _eqx_state_to_functional(model_state, model, names)
    if model_state is None and isinstance(model, nnx.Module):
        model_state = nnx.state(model, nnx.BatchStat)
    if isinstance(model_state, nnx.State):
        model_state = nnx.as_pure(model_state)
        return _collect(model_state, _table(model_state, names, strict=False))
    if model_state is None:
        return {}
    if isinstance(model_state, Mapping):
        return _collect(_plain(model_state), _table(_plain(model_state), names, strict=False))
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
    tree = _plain(tree)
    if isinstance(like_state, eqx.nn.State):
        if not isinstance(model, eqx.Module):
            raise ConversionError("an eqx.nn.State is filled with the Equinox module that indexes it: pass model=")
        return _eqx_state_from_functional(tree, like_state, model, names)
    if like_state is None and isinstance(model, nnx.Module):
        like_state = nnx.state(model, nnx.BatchStat)
    if isinstance(like_state, nnx.State):
        like_state = nnx.as_pure(like_state)
        return _fill(tree, like_state, _table(like_state, names, strict=False))
    if like_state is None:
        if _has_leaves(tree):
            raise ConversionError(f"the target keeps no model state but the functional tree has {sorted(_leaf_paths(tree))}")
        return None
    if isinstance(like_state, Mapping):
        filled = _fill(tree, _plain(like_state), _table(_plain(like_state), names, strict=False))
        return flax.core.freeze(filled) if isinstance(like_state, flax.core.FrozenDict) else filled
    raise ConversionError(f"cannot fill a model state of type {type(like_state).__name__}")


def _leaf_paths(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(k, simple=True, separator="/") for k, _ in _flatten(tree)[0]]


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

    def fill(like: Any, source: Any) -> Any:
        if is_params(like):
            return params_from_functional(source, like, names=names, flatten=flatten)
        _check_shape("opt_state", source, tuple(np.shape(like)), SAME)
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


# ------------------------------------------------------------------------ variables


def _is_eqx_pair(x: Any) -> bool:
    """An Equinox module and its ``eqx.nn.State``."""
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], eqx.Module) and isinstance(x[1], eqx.nn.State)


def _is_nnx_pair(x: Any) -> bool:
    """An NNX module and its ``nnx.Optimizer`` (which, since Flax 0.11, does not hold the model)."""
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], nnx.Module) and isinstance(x[1], nnx.Optimizer)


def _nnx_module_from_functional(params: Mapping, model_state: Mapping, like: nnx.Module,
                                names: Mapping[str, str] | None, flatten: Mapping[str, Any] | None) -> nnx.Module:
    """A new module of ``like``'s graph with ``params`` as its ``nnx.Param`` and ``model_state`` as its ``nnx.BatchStat``."""
    graphdef, p, stats, rest = nnx.split(like, nnx.Param, nnx.BatchStat, ...)
    p = params_from_functional(params, nnx.as_pure(p), names=names, flatten=flatten)
    return nnx.merge(graphdef, p, state_from_functional(model_state, stats, names=names), rest)


def variables_to_functional(obj: Any, *, names: Mapping[str, str] | None = None,
                            flatten: Mapping[str, Any] | None = None) -> tuple[dict, dict]:
    """A model's params and model state, functional: ``(params, model_state)``.

    Args:
        obj: Linen variables ``{'params': ..., 'batch_stats': ...}`` (``batch_stats`` optional),
            an NNX module (its ``nnx.Param`` and ``nnx.BatchStat``), an Equinox ``(model,
            eqx.nn.State)`` pair, or an Equinox module without state.
        names, flatten: as for :func:`to_functional`.

    Returns:
        The params dict and the model state (Linen's ``batch_stats`` layout; ``{}`` when there is none).

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> net = nn.Sequential([nn.Dense(3), nn.BatchNorm(use_running_average=True)])
        >>> params, model_state = variables_to_functional(net.init(jax.random.key(0), jnp.ones((2, 4))))
        >>> sorted(params), sorted(model_state['layers_1'])
        (['layers_0', 'layers_1'], ['mean', 'var'])
    """
    if isinstance(obj, nnx.Module):
        return params_to_functional(obj, names=names, flatten=flatten), state_to_functional(None, obj, names=names)
    if _is_eqx_pair(obj):
        return params_to_functional(obj[0], names=names, flatten=flatten), state_to_functional(obj[1], obj[0], names=names)
    if isinstance(obj, eqx.Module):
        stats = _eqx_stats(obj, names)
        if stats:
            raise ConversionError(f"{stats[0].where}: the model keeps BatchNorm statistics: pass (model, its eqx.nn.State)")
        return params_to_functional(obj, names=names, flatten=flatten), {}
    plain = _plain(obj)
    if isinstance(plain, Mapping) and "params" in plain:
        if set(plain) - {"params", "batch_stats"}:
            others = sorted(set(plain) - {"params", "batch_stats"})
            raise ConversionError(f"Linen variables with {others}: only params and batch_stats convert")
        params = params_to_functional(plain["params"], names=names, flatten=flatten)
        return params, state_to_functional(plain.get("batch_stats", {}), names=names)
    raise ConversionError(f"cannot take variables from a {type(obj).__name__}: expected Linen variables, an NNX "
                          "module or an Equinox (model, eqx.nn.State) pair")


def variables_from_functional(params: Mapping, model_state: Mapping, like: Any, *, names: Mapping[str, str] | None = None,
                              flatten: Mapping[str, Any] | None = None) -> Any:
    """``like``'s form holding the functional ``params`` and ``model_state``.

    Args:
        params, model_state: functional, as :func:`variables_to_functional` returns them.
        like: Linen variables, an NNX module, an Equinox ``(model, eqx.nn.State)`` pair or an
            Equinox module without state; its arrays give the shapes.
        names, flatten: as for :func:`from_functional`.

    Returns:
        New Linen variables, a new NNX module, or a new ``(model, eqx.nn.State)`` pair.
    """
    if isinstance(like, nnx.Module):
        return _nnx_module_from_functional(params, model_state, like, names, flatten)
    if _is_eqx_pair(like):
        model = params_from_functional(params, like[0], names=names, flatten=flatten)
        return model, state_from_functional(model_state, like[1], like[0], names=names)
    if isinstance(like, eqx.Module):
        if _has_leaves(model_state):
            raise ConversionError("an Equinox module alone keeps no model state: pass like=(model, eqx.nn.State(model))")
        return params_from_functional(params, like, names=names, flatten=flatten)
    plain = _plain(like)
    if isinstance(plain, Mapping) and "params" in plain:
        filled = {"params": params_from_functional(params, plain["params"], names=names, flatten=flatten)}
        filled["batch_stats"] = state_from_functional(model_state, plain.get("batch_stats"), names=names)
        if filled["batch_stats"] is None:
            del filled["batch_stats"]
        return flax.core.freeze(filled) if isinstance(like, flax.core.FrozenDict) else filled
    raise ConversionError(f"cannot fill variables of a {type(like).__name__}: expected Linen variables, an NNX module "
                          "or an Equinox (model, eqx.nn.State) pair")


def _holds_variables(x: Any) -> bool:
    """Params with a model state beside them: what :func:`variables_from_functional` fills."""
    if isinstance(x, nnx.Module):
        return _has_leaves(nnx.state(x, nnx.BatchStat))
    return _is_eqx_pair(x) or _is_linen_variables_with_state(_plain(x))


# ------------------------------------------------------------------ the two calls


def _step(step: Any) -> Any:
    """The step as an int32 array (Flax starts it as a Python int); shapes-only stays shapes-only."""
    return step if isinstance(step, jax.ShapeDtypeStruct) else jnp.asarray(step, jnp.int32)


def _nnx_pair_to_functional(model: nnx.Module, optimizer: nnx.Optimizer, names, flatten) -> TrainState:
    trained = nnx.as_pure(nnx.state(model, optimizer.wrt))  # what the optimiser state is shaped like
    return TrainState(
        step=_step(optimizer.step[...]),  # NNX counts in uint32
        params=params_to_functional(model, names=names, flatten=flatten),  # every param, also those outside wrt
        opt_state=opt_state_to_functional(nnx.as_pure(optimizer.opt_state), trained, names=names, flatten=flatten),
        model_state=state_to_functional(None, model, names=names),
    )


def _nnx_pair_from_functional(tree: TrainState, model: nnx.Module, optimizer: nnx.Optimizer,
                              names, flatten) -> tuple[nnx.Module, nnx.Optimizer]:
    """A new module and a new ``nnx.Optimizer`` (same ``tx`` and ``wrt``) holding ``tree``'s values."""
    new_model = _nnx_module_from_functional(tree.params, tree.model_state, model, names, flatten)
    new_optimizer = nnx.Optimizer(new_model, optimizer.tx, wrt=optimizer.wrt)
    params = nnx.as_pure(nnx.state(new_model, optimizer.wrt))
    opt_state = opt_state_from_functional(tree.opt_state, nnx.as_pure(new_optimizer.opt_state), params, names=names, flatten=flatten)
    nnx.update(new_optimizer.opt_state, nnx.state(opt_state))  # as nnx.Optimizer.update writes its state
    new_optimizer.step[...] = jnp.asarray(tree.step, jnp.uint32)
    return new_model, new_optimizer


def _model_state_of(state: Any) -> Any:
    """A train state's model state: pureflax's ``model_state``, Flax's ``batch_stats`` (None: none)."""
    if isinstance(state, TrainState):
        return state.model_state
    return state.batch_stats if isinstance(state, flax_models.TrainState) else None


def _train_state_from_functional(tree: TrainState, like: Any, names, flatten) -> Any:
    params = params_from_functional(tree.params, like.params, names=names, flatten=flatten)
    opt_state = opt_state_from_functional(tree.opt_state, like.opt_state, like.params, names=names, flatten=flatten)
    step = _step(tree.step)
    if isinstance(like, flax_models.TrainState):
        batch_stats = state_from_functional(tree.model_state, like.batch_stats, names=names)
        return like.replace(step=step, params=params, opt_state=opt_state, batch_stats=batch_stats)
    if isinstance(like, FlaxTrainState):
        if _has_leaves(tree.model_state):
            raise ConversionError(f"Flax's TrainState keeps no batch_stats, so the model state {sorted(_leaf_paths(tree.model_state))} "
                                  "has no place: use pureflax.compat.flax_models.TrainState")
        return like.replace(step=step, params=params, opt_state=opt_state)
    model_state = state_from_functional(tree.model_state, like.model_state, like.params, names=names)
    return TrainState(step=step, params=params, opt_state=opt_state, model_state=model_state)


def to_functional(obj: Any, *, names: Mapping[str, str] | None = None, flatten: Mapping[str, Any] | None = None) -> Any:
    """The functional form of ``obj``.

    Args:
        obj: an Equinox module, an NNX module (its params) or params ``State``, Flax variables
            ``{'params': ...}``, a Flax ``TrainState`` (``flax_models.TrainState``: with its
            ``batch_stats``), an NNX ``(model, nnx.Optimizer)`` pair (with the module's BatchStats)
            or a :class:`pureflax.TrainState` (params in any form; ``model_state`` an ``eqx.nn.State``,
            an NNX ``State`` of BatchStats or a dict). Params with state but no optimiser
            (Linen ``{'params', 'batch_stats'}``, an Equinox ``(model, state)`` pair) go through
            :func:`variables_to_functional`.
        names: the form's layer path -> the functional path, for models whose names are not
            Flax's: ``{'features/0': 'Conv_0'}``. A name that is not a layer raises, naming close ones.
        flatten: functional Dense path -> ``(H, W, C)`` of the image flattened before it, for a
            model that flattens channels first (Equinox's ``x.reshape(-1)`` of (C, H, W)): the
            kernel's rows, and its optimiser moments, go from (C, H, W) to Flax's (H, W, C) order.

    Returns:
        A params dict with Flax's paths, or a :class:`pureflax.TrainState` whose params,
        optimiser state and model state are functional.
    """
    if _is_nnx_pair(obj):
        return _nnx_pair_to_functional(*obj, names, flatten)
    if isinstance(obj, (FlaxTrainState, TrainState)):
        return TrainState(
            step=_step(obj.step),
            params=params_to_functional(obj.params, names=names, flatten=flatten),
            opt_state=opt_state_to_functional(obj.opt_state, obj.params, names=names, flatten=flatten),
            model_state=state_to_functional(_model_state_of(obj), obj.params, names=names),
        )
    if _is_eqx_pair(obj):
        raise ConversionError("an Equinox (model, eqx.nn.State) pair: use convert.variables_to_functional(pair) -> (params, model_state)")
    return params_to_functional(obj, names=names, flatten=flatten)


def from_functional(tree: Any, like: Any, *, names: Mapping[str, str] | None = None,
                    flatten: Mapping[str, Any] | None = None) -> Any:
    """Fill ``like``'s structure with the values of the functional ``tree``.

    Args:
        tree: functional params (a dict) or a functional :class:`pureflax.TrainState`.
        like: an instance of the wanted form: Equinox module, NNX module or params
            ``State``, Flax variables, functional dict, Flax ``TrainState`` (its ``apply_fn``
            and ``tx`` are kept), an NNX ``(model, nnx.Optimizer)`` pair (its ``tx`` and
            ``wrt`` are kept) or :class:`pureflax.TrainState`. Its arrays give the shapes;
            their values are unused.
        names, flatten: as for :func:`to_functional`, for ``like``'s form.

    Returns:
        ``like`` with ``tree``'s values (for NNX, new objects: ``like`` is not changed).

    Raises:
        ConversionError: naming the path, both shapes and dtypes where the trees disagree.
    """
    if _is_nnx_pair(like):
        if not isinstance(tree, TrainState):
            raise ConversionError(f"a train state fills a (model, optimizer) pair: got {type(tree).__name__}")
        return _nnx_pair_from_functional(tree, *like, names, flatten)
    if isinstance(like, (FlaxTrainState, TrainState)):
        if not isinstance(tree, TrainState):
            raise ConversionError(f"a train state fills a train state: got {type(tree).__name__} for {type(like).__name__}")
        return _train_state_from_functional(tree, like, names, flatten)
    if isinstance(tree, TrainState):
        raise ConversionError(f"a train state cannot fill {type(like).__name__}: pass tree.params")
    if _is_eqx_pair(like):
        raise ConversionError("an Equinox (model, eqx.nn.State) pair: use "
                              "convert.variables_from_functional(params, model_state, like=pair)")
    return params_from_functional(tree, like, names=names, flatten=flatten)


# ------------------------------------------------------------- layers on both sides


def _module_of(obj: Any) -> Any:
    """The Equinox or NNX module inside ``obj`` (a module, a pair, a pureflax TrainState); else None."""
    if isinstance(obj, (eqx.Module, nnx.Module)):
        return obj
    if _is_eqx_pair(obj) or _is_nnx_pair(obj):
        return obj[0]
    if isinstance(obj, TrainState) and isinstance(obj.params, eqx.Module):
        return obj.params
    return None


def _layer_settings(obj: Any, names: Mapping[str, str] | None) -> dict[Path, tuple[Layout, dict[str, Any]]]:
    """Each layer of ``obj``'s module, by functional path (after ``names``): its row and its settings."""
    module = _module_of(obj)
    if isinstance(module, eqx.Module):
        found = [(node.form, node.path, node.module) for node in _eqx_nodes(module)]
    elif isinstance(module, nnx.Module):
        found = [("/".join(map(str, parts)), _nnx_path(parts), node) for parts, node in nnx.iter_graph(module)
                 if isinstance(node, nnx.Module)]
    else:
        return {}  # dicts: Linen variables and functional params carry no settings
    layers = {form: path for form, path, _ in found if form}
    _check_names("names", dict(names or {}), layers)
    out = {}
    for form, path, module in found:
        row = _layout(module)
        if row is not None and row.settings is not None:
            out[_renamed(form, path, layers, dict(names or {}))] = (row, row.settings(module))
    return out


_SAME_WITH_STRIDE = ("'SAME' with a stride pads by the input size ((0, 1) on an even size, (1, 1) on an odd one for a 3x3 "
                     "kernel at stride 2), so they may compute different outputs: give both layers padding='SAME'")


def check_layers(source: Any, target: Any, *, source_names: Mapping[str, str] | None = None,
                 names: Mapping[str, str] | None = None) -> None:
    """Refuse two models whose layers at the same functional path would compute different things.

    Only where both sides are modules (Equinox or NNX, alone, in a pair or a TrainState) are
    their settings known: ``eps``/``epsilon``, BatchNorm's ``momentum``, a convolution's strides,
    padding (as the (low, high) pairs lax receives), dilations, groups, LayerNorm's axes.

    Raises:
        ConversionError: naming the layer, the setting and both values.

    Example:
        >>> import jax, equinox as eqx
        >>> from flax import nnx
        >>> try:
        ...     check_layers(eqx.nn.LayerNorm(4), nnx.LayerNorm(4, rngs=nnx.Rngs(0)))
        ... except ConversionError as err:
        ...     print(err)
        the model: epsilon is 1e-05 in the source (eqx.nn.LayerNorm (1-D shape: features last)) and 1e-06 in the target (nnx.LayerNorm): they would compute different outputs; build the target with epsilon=1e-05
    """
    theirs, ours = _layer_settings(source, source_names), _layer_settings(target, names)
    for path in sorted(set(theirs) & set(ours)):
        (row_a, a), (row_b, b) = theirs[path], ours[path]
        where = "/".join(path) or "the model"
        if row_a.kind != row_b.kind:
            raise ConversionError(f"{where}: a {row_a.kind} in the source ({row_a.layer}) but a {row_b.kind} in the target ({row_b.layer})")
        for key in (key for key in a if key in b):  # in the row's order: the padding last, strides and dilation decide it
            if a[key] != b[key]:
                fix = (_SAME_WITH_STRIDE if key == "padding" and "SAME" in (a[key], b[key])
                       else f"they would compute different outputs; build the target with {key}={a[key]!r}")
                raise ConversionError(f"{where}: {key} is {a[key]!r} in the source ({row_a.layer}) and {b[key]!r} in the "
                                      f"target ({row_b.layer}): {fix}")


def transfer(source: Any, like: Any, *, source_names: Mapping[str, str] | None = None, names: Mapping[str, str] | None = None,
             source_flatten: Mapping[str, Any] | None = None, flatten: Mapping[str, Any] | None = None) -> Any:
    """``source`` in ``like``'s form, its layers checked (:func:`check_layers`): what ``migrate`` does.

    Variables (Linen ``{'params', 'batch_stats'}``, an NNX module with BatchStats, an Equinox
    ``(model, state)`` pair) go through :func:`variables_to_functional` /
    :func:`variables_from_functional`; anything else through :func:`to_functional` /
    :func:`from_functional`. ``source_names``/``source_flatten`` are for the source's form,
    ``names``/``flatten`` for ``like``'s.
    """
    check_layers(source, like, source_names=source_names, names=names)
    if _holds_variables(like):
        params, model_state = variables_to_functional(source, names=source_names, flatten=source_flatten)
        return variables_from_functional(params, model_state, like, names=names, flatten=flatten)
    return from_functional(to_functional(source, names=source_names, flatten=source_flatten), like, names=names, flatten=flatten)
