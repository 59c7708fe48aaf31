"""The layouts table: for each layer kind and form, which array is which functional array, and how.

The functional form keeps Linen's layouts (``kernel`` (in, out), convolutions ``(*k, in//groups,
out)``, statistics in ``batch_stats``). A row says, for one class of one library, which of its
arrays becomes which functional array through which :class:`Rule`, where its running statistics
live and how its settings read in Flax's terms. :func:`register_layer` adds a row for a class of
any library; ``print(layouts_table())`` shows them all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import equinox as eqx
import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

from pureflax.compat import eqx_layers
from pureflax.compat.convert import settings as s
from pureflax.compat.convert.trees import ConversionError


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


def _torch_transpose_to_functional(w: Any) -> Any:
    """torch ConvTranspose (in, out//groups, *k) -> Flax ConvTranspose (*k, in, out), flipped: torch's is the
    transpose of a convolution, Flax's (transpose_kernel=False) a dilated convolution with the kernel as given."""
    spatial = tuple(range(w.ndim - 2))
    return jnp.flip(jnp.transpose(w, tuple(range(2, w.ndim)) + (0, 1)), spatial)


def _torch_transpose_from_functional(k: Any, shape: tuple[int, ...]) -> Any:
    del shape
    n = k.ndim - 2
    return jnp.transpose(jnp.flip(k, tuple(range(n))), (n, n + 1) + tuple(range(n)))


SAME = Rule("as is", lambda x: x, lambda x, shape: x, lambda shape: shape)
TRANSPOSE = Rule("transposed", jnp.transpose, lambda x, shape: jnp.transpose(x), lambda shape: shape[::-1])
CONV_KERNEL = Rule("permuted (out, in//groups, *k) <-> (*k, in//groups, out)", _conv_kernel_to_functional,
                   _conv_kernel_from_functional, lambda shape: shape[2:] + (shape[1], shape[0]))
TORCH_CONV_TRANSPOSE = Rule("permuted (in, out, *k) <-> (*k, in, out), spatially flipped", _torch_transpose_to_functional,
                            _torch_transpose_from_functional, lambda shape: shape[2:] + (shape[0], shape[1]))
CONV_BIAS = Rule("reshaped (out, 1, ..., 1) <-> (out,)", lambda x: jnp.reshape(x, (-1,)),
                 lambda x, shape: jnp.reshape(x, shape), lambda shape: shape[:1])


def rows_chw(rule: Rule, hwc: tuple[int, int, int], where: str) -> Rule:
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


class Layout(NamedTuple):
    """One layer kind in one form: which of its arrays is which functional array, and how."""

    kind: str  # the Linen layer, whose layout the functional form keeps: 'Dense', 'Conv', ...
    form: str  # 'linen', 'equinox' or 'nnx'
    layer: str  # the class as one writes it
    params: tuple[tuple[str, str, Rule], ...]  # (the form's attribute, the functional name, the rule)
    stats: str = ""  # where its running statistics live, as the table prints it; '' when it has none
    cls: type | None = None  # what the walkers dispatch on
    settings: Callable[[Any], dict[str, Any]] | None = None  # its settings in Flax's terms, compared pair by pair
    statistics: tuple[tuple[str, str], ...] = ()  # registered layers: (the form's name, 'mean' or 'var')
    state_index: str = ""  # registered Equinox layers: the StateIndex field whose eqx.nn.State entry holds `statistics`
    channels_first: bool = False  # it computes on (C, *spatial): a flatten after it orders rows C first


_LINEAR = (("kernel", "kernel", SAME), ("bias", "bias", SAME))
_NORM = (("scale", "scale", SAME), ("bias", "bias", SAME))
_EQX_NORM = (("weight", "scale", SAME), ("bias", "bias", SAME))
_EQX_CONV = (("weight", "kernel", CONV_KERNEL), ("bias", "bias", CONV_BIAS))
_BATCH_STATS = "batch_stats {'mean', 'var'}"
_MEAN_VAR = (("mean", "mean"), ("var", "var"))

# A list, so that register_layer's rows are seen wherever LAYOUTS was imported.
LAYOUTS: list[Layout] = [
    Layout("Dense", "linen", "nn.Dense", _LINEAR, cls=nn.Dense, settings=s.nothing),
    Layout("Dense", "equinox", "eqx.nn.Linear", (("weight", "kernel", TRANSPOSE), ("bias", "bias", SAME)), cls=eqx.nn.Linear,
           settings=s.nothing),
    Layout("Dense", "nnx", "nnx.Linear", _LINEAR, cls=nnx.Linear, settings=s.nothing),
    Layout("Conv", "linen", "nn.Conv", _LINEAR, cls=nn.Conv, settings=s.flax_conv),
    Layout("Conv", "equinox", "eqx.nn.Conv (1/2/3-D)", _EQX_CONV, cls=eqx.nn.Conv, settings=s.eqx_conv, channels_first=True),
    Layout("Conv", "nnx", "nnx.Conv", _LINEAR, cls=nnx.Conv, settings=s.flax_conv),
    Layout("ConvTranspose", "linen", "nn.ConvTranspose (transpose_kernel=False)", _LINEAR, cls=nn.ConvTranspose, settings=s.flax_conv_transpose),
    Layout("ConvTranspose", "equinox", "eqx.nn.ConvTranspose (1/2/3-D)", _EQX_CONV, cls=eqx.nn.ConvTranspose,
           settings=s.eqx_conv_transpose, channels_first=True),
    Layout("ConvTranspose", "nnx", "nnx.ConvTranspose", _LINEAR, cls=nnx.ConvTranspose, settings=s.flax_conv_transpose),
    Layout("LayerNorm", "linen", "nn.LayerNorm", _NORM, cls=nn.LayerNorm, settings=s.flax_layer_norm),
    Layout("LayerNorm", "equinox", "eqx.nn.LayerNorm (1-D shape: features last)", _EQX_NORM, cls=eqx.nn.LayerNorm,
           settings=s.eqx_layer_norm),
    Layout("LayerNorm", "nnx", "nnx.LayerNorm", _NORM, cls=nnx.LayerNorm, settings=s.flax_layer_norm),
    Layout("GroupNorm", "linen", "nn.GroupNorm", _NORM, cls=nn.GroupNorm, settings=s.flax_group_norm),
    Layout("GroupNorm", "equinox", "eqx.nn.GroupNorm", _EQX_NORM, cls=eqx.nn.GroupNorm, settings=s.eqx_group_norm,
           channels_first=True),
    Layout("GroupNorm", "nnx", "nnx.GroupNorm", _NORM, cls=nnx.GroupNorm, settings=s.flax_group_norm),
    Layout("Embed", "linen", "nn.Embed", (("embedding", "embedding", SAME),), cls=nn.Embed, settings=s.nothing),
    Layout("Embed", "equinox", "eqx.nn.Embedding", (("weight", "embedding", SAME),), cls=eqx.nn.Embedding, settings=s.nothing),
    Layout("Embed", "nnx", "nnx.Embed", (("embedding", "embedding", SAME),), cls=nnx.Embed, settings=s.nothing),
    Layout("BatchNorm", "linen", "nn.BatchNorm", _NORM, _BATCH_STATS, cls=nn.BatchNorm, settings=s.flax_batch_norm,
           statistics=_MEAN_VAR),
    Layout("BatchNorm", "equinox", "pureflax.compat.eqx_layers.BatchNorm", _EQX_NORM, "eqx.nn.State at state_index: (mean, var)",
           cls=eqx_layers.BatchNorm, settings=s.eqx_batch_norm, statistics=_MEAN_VAR, state_index="state_index",
           channels_first=True),
    Layout("BatchNorm", "equinox", "eqx.nn.BatchNorm (its own update rule)", _EQX_NORM,
           "eqx.nn.State: 'ema' mode (mean, var) at ema_state_index; 'batch' mode hidden / (1 - momentum**counter)",
           cls=eqx.nn.BatchNorm, settings=s.eqx_batch_norm, statistics=_MEAN_VAR, channels_first=True),
    Layout("BatchNorm", "nnx", "nnx.BatchNorm", _NORM, "nnx.BatchStat mean, var", cls=nnx.BatchNorm, settings=s.flax_batch_norm,
           statistics=_MEAN_VAR),
]

# PyTorch's layers, by class name (torch is imported only where it is installed); settings in pytorch.py.
_TORCH_LINEAR = (("weight", "kernel", TRANSPOSE), ("bias", "bias", SAME))
_TORCH_NORM = (("weight", "scale", SAME), ("bias", "bias", SAME))
_RUNNING = (("running_mean", "mean"), ("running_var", "var"))
LAYOUTS += [
    Layout("Dense", "torch", "torch.nn.Linear", _TORCH_LINEAR),
    Layout("Conv", "torch", "torch.nn.Conv1d/2d/3d", (("weight", "kernel", CONV_KERNEL), ("bias", "bias", SAME)), channels_first=True),
    Layout("ConvTranspose", "torch", "torch.nn.ConvTranspose1d/2d/3d", (("weight", "kernel", TORCH_CONV_TRANSPOSE), ("bias", "bias", SAME)),
           channels_first=True),
    Layout("LayerNorm", "torch", "torch.nn.LayerNorm (1-D normalized_shape)", _TORCH_NORM),
    Layout("GroupNorm", "torch", "torch.nn.GroupNorm", _TORCH_NORM, channels_first=True),
    Layout("Embed", "torch", "torch.nn.Embedding", (("weight", "embedding", SAME),)),
    Layout("BatchNorm", "torch", "torch.nn.BatchNorm1d/2d/3d", _TORCH_NORM,
           "buffers running_mean, running_var; num_batches_tracked kept from the target's state_dict", statistics=_RUNNING,
           channels_first=True),
]

KINDS = ("Dense", "Conv", "ConvTranspose", "LayerNorm", "GroupNorm", "Embed", "BatchNorm")
RULES = {"as is": SAME, "transposed": TRANSPOSE, "conv kernel": CONV_KERNEL, "conv bias": CONV_BIAS}


def _form_of(cls: type) -> str:
    for base, form in ((eqx.Module, "equinox"), (nnx.Module, "nnx"), (nn.Module, "linen")):
        if issubclass(cls, base):
            return form
    raise ConversionError(f"register_layer: {cls.__name__} is not an Equinox, Flax NNX or Flax linen module")


def register_layer(cls: type, kind: str, params: Mapping[str, str | tuple[str, str]], *,
                   statistics: Mapping[str, str] | None = None, state_index: str = "",
                   settings: Callable[[Any], dict[str, Any]] | None = None, channels_first: bool | None = None) -> Layout:
    """Add a layer class of any library to :data:`LAYOUTS`, as one row; returns the row.

    Args:
        cls: the layer's class (an Equinox, NNX or Linen module).
        kind: what it computes, one of :data:`KINDS` (its functional layout is that Linen layer's).
        params: its array attribute -> the functional name (``'scale'``, ``'bias'``, ``'kernel'``,
            ``'embedding'``), or -> ``(name, rule)`` with a rule of :data:`RULES` (``'transposed'``,
            ``'conv kernel'``, ``'conv bias'``; default ``'as is'``).
        statistics: a BatchNorm's running statistics -> ``'mean'`` / ``'var'``: module fields
            holding arrays, or, with ``state_index``, the positions' names of the tuple its
            ``eqx.nn.State`` entry holds.
        state_index: the ``eqx.nn.StateIndex`` field holding the statistics (Equinox's stateful layers).
        settings: the module -> its settings in Flax's terms (``{'epsilon': m.eps, 'momentum': 1 - m.momentum}``
            for a layer with torch's momentum), compared with the other side's layer.
        channels_first: it computes on (C, *spatial) (default: an Equinox layer with spatial
            dimensions, a convolution or a norm over channels, does).

    Examples:
        >>> import equinox as eqx, jax.numpy as jnp
        >>> class Scale(eqx.Module):
        ...     gamma: jnp.ndarray
        ...     beta: jnp.ndarray
        >>> row = register_layer(Scale, "LayerNorm", {"gamma": "scale", "beta": "bias"})
        >>> row.kind, row.form, [(a, b) for a, b, _ in row.params]
        ('LayerNorm', 'equinox', [('gamma', 'scale'), ('beta', 'bias')])
        >>> LAYOUTS.remove(row)
    """
    if kind not in KINDS:
        raise ConversionError(f"register_layer: kind {kind!r} is not one of {KINDS}")
    rows = []
    for attr, target in params.items():
        name, rule = (target, "as is") if isinstance(target, str) else target
        if rule not in RULES:
            raise ConversionError(f"register_layer: {attr}: rule {rule!r} is not one of {sorted(RULES)}")
        rows.append((attr, name, RULES[rule]))
    form = _form_of(cls)
    if channels_first is None:
        channels_first = form == "equinox" and kind in ("Conv", "ConvTranspose", "BatchNorm", "GroupNorm")
    stats = tuple((statistics or {}).items())
    where = (f"eqx.nn.State at {state_index}: ({', '.join(a for a, _ in stats)})" if state_index
             else ", ".join(a for a, _ in stats))
    layer = cls.__qualname__ if cls.__module__ in ("__main__", "builtins") else f"{cls.__module__}.{cls.__qualname__}"
    row = Layout(kind, form, layer, tuple(rows), where, cls=cls, settings=settings, statistics=stats,
                 state_index=state_index, channels_first=channels_first)
    LAYOUTS.insert(0, row)  # before the rows of any class it derives from
    return row


def layout_of(module: Any) -> Layout | None:
    """The row of :data:`LAYOUTS` for a layer; ``None`` for anything else (containers)."""
    for row in LAYOUTS:
        if row.cls is not None and isinstance(module, row.cls):
            return row
    return None


def layouts_table() -> str:
    """:data:`LAYOUTS` as a Markdown table: each layer kind, its class in each form, what moves how."""
    rows = ["| layer | form | class | arrays (form -> functional) | running statistics |", "|---|---|---|---|---|"]
    for row in LAYOUTS:
        arrays = "; ".join(f"`{a}` -> `{b}`" + ("" if rule is SAME else f" ({rule.name})") for a, b, rule in row.params)
        rows.append(f"| {row.kind} | {row.form} | `{row.layer}` | {arrays} | {row.stats or '-'} |")
    return "\n".join(rows)


def refuse(module: Any, where: str) -> None:
    """Layers whose computation Flax's counterpart cannot reproduce, whatever their params."""
    if isinstance(module, eqx.nn.LayerNorm) and len(module.shape) != 1:
        raise ConversionError(
            f"{where}: eqx.nn.LayerNorm(shape={module.shape}) normalises over its whole shape, Flax's LayerNorm over "
            "the last axis only: only a 1-D shape (the features, last) converts"
        )
