"""Each layer's settings in Flax's terms, so the settings of two forms' layers compare by ``==``.

Paddings become the (low, high) pairs ``lax.conv_general_dilated`` receives; where those depend
on the input size (Flax's ``'SAME'`` with a stride) the string stays, and only an equal string
matches it. Linen and NNX layers keep the same attribute names, so one function reads both.
"""

from __future__ import annotations

from typing import Any


def ints(value: Any, n: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * n
    return (int(value),) * n if isinstance(value, int) else tuple(int(v) for v in value)


def _pairs(padding: Any, n: int) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, int):
        return ((padding, padding),) * n
    return tuple((p, p) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in padding)


def conv_pads(padding: Any, kernel: tuple[int, ...], strides: tuple[int, ...], dilation: tuple[int, ...]) -> Any:
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


def conv_transpose_pads(padding: Any, kernel: tuple[int, ...], strides: tuple[int, ...], dilation: tuple[int, ...]) -> Any:
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


def eqx_conv(m: Any) -> dict[str, Any]:
    pads = conv_pads(m.padding, m.kernel_size, m.stride, m.dilation)
    return {"strides": m.stride, "kernel_dilation": m.dilation, "input_dilation": (1,) * m.num_spatial_dims,
            "feature_group_count": m.groups, "padding": pads if m.padding_mode == "ZEROS" else f"{m.padding_mode} {m.padding}"}


def flax_conv(m: Any) -> dict[str, Any]:
    """``nn.Conv`` or ``nnx.Conv``."""
    kernel = ints(m.kernel_size, 1)
    n = len(kernel)
    strides, dilation = ints(m.strides, n), ints(m.kernel_dilation, n)
    return {"strides": strides, "kernel_dilation": dilation, "input_dilation": ints(m.input_dilation, n),
            "feature_group_count": m.feature_group_count, "padding": conv_pads(m.padding, kernel, strides, dilation)}


def eqx_conv_transpose(m: Any) -> dict[str, Any]:
    pads = m._padding_transpose() if m.padding_mode == "ZEROS" else f"{m.padding_mode} {m.padding}"  # what its __call__ gives lax
    return {"strides": m.stride, "kernel_dilation": m.dilation, "feature_group_count": m.groups, "transpose_kernel": False,
            "padding": pads}


def flax_conv_transpose(m: Any) -> dict[str, Any]:
    """``nn.ConvTranspose`` or ``nnx.ConvTranspose``."""
    kernel = ints(m.kernel_size, 1)
    n = len(kernel)
    strides, dilation = ints(m.strides, n), ints(m.kernel_dilation, n)
    return {"strides": strides, "kernel_dilation": dilation, "feature_group_count": 1, "transpose_kernel": m.transpose_kernel,
            "padding": conv_transpose_pads(m.padding, kernel, strides, dilation)}


def _axes(value: Any) -> tuple[int, ...]:
    return (value,) if isinstance(value, int) else tuple(value)


def flax_layer_norm(m: Any) -> dict[str, Any]:
    return {"epsilon": m.epsilon, "axes": (_axes(m.reduction_axes), _axes(m.feature_axes))}


def eqx_layer_norm(m: Any) -> dict[str, Any]:
    return {"epsilon": m.eps, "axes": ((-1,), (-1,))}


def flax_group_norm(m: Any) -> dict[str, Any]:
    return {"epsilon": m.epsilon, "num_groups": m.num_groups}


def eqx_group_norm(m: Any) -> dict[str, Any]:
    return {"epsilon": m.eps, "num_groups": m.groups}


def flax_batch_norm(m: Any) -> dict[str, Any]:
    return {"epsilon": m.epsilon, "momentum": m.momentum}


def eqx_batch_norm(m: Any) -> dict[str, Any]:
    return {"epsilon": m.eps, "momentum": m.momentum}


def nothing(module: Any) -> dict[str, Any]:
    """A layer with nothing to compare but its kind (its sizes are its arrays' shapes)."""
    del module
    return {}
