"""Convolutions and pooling, each as its flax.linen namesake: the same parameter names, layouts
(HWIO kernels), init keys (the n-th param of a layer draws from ``param_key(key, n)``) and the
same operations in the same order, so the same params and inputs give Flax's outputs
(tests/test_layers.py measures each). :mod:`pureflax.nn` exports them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from pureflax.layer import Example, Layer, Params, Scope, _add_bias, _promoted, _shape, lecun_normal, param_key, zeros


def _ints(value: int | Sequence[int], n: int, name: str, where: str) -> tuple[int, ...]:
    """``value`` for each of ``n`` spatial dimensions (an int is repeated)."""
    values = (value,) * n if isinstance(value, int) else tuple(value)
    if len(values) != n or any(not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{where}: {name} must be a positive int or {n} of them, got {value!r}")
    return values


def _padding(padding: str | int | Sequence[Any], n: int, where: str) -> str | tuple[tuple[int, int], ...]:
    """``'SAME'``/``'VALID'``, or explicit ``(low, high)`` pairs per spatial dimension (an int pads both sides)."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"{where}: padding must be 'SAME', 'VALID', an int or (low, high) pairs, got {padding!r}")
        return padding.upper()
    if isinstance(padding, int):
        return ((padding, padding),) * n
    pairs = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    if len(pairs) != n or any(len(p) != 2 for p in pairs):
        raise ValueError(f"{where}: padding needs {n} (low, high) pairs, got {padding!r}")
    return pairs


def _conv_dimension_numbers(ndim: int) -> jax.lax.ConvDimensionNumbers:
    """Channels last, as Flax: inputs (batch, *spatial, features), kernels (*spatial, in, out)."""
    lhs = (0, ndim - 1) + tuple(range(1, ndim - 1))
    rhs = (ndim - 1, ndim - 2) + tuple(range(0, ndim - 2))
    return jax.lax.ConvDimensionNumbers(lhs, rhs, lhs)


def _check_conv_input(where: str, x: Any, spatial: int, in_features: int | None = None) -> None:
    shape = tuple(jnp.shape(x))
    if len(shape) != spatial + 2:
        raise ValueError(f"{where}: input has shape {shape}; expected (batch, {spatial} spatial dims, features)")
    if in_features is not None and shape[-1] != in_features:
        raise ValueError(f"{where}: input has {shape[-1]} features but the kernel expects {in_features}")


def conv(
    features: int,
    kernel_size: int | Sequence[int],
    *,
    strides: int | Sequence[int] = 1,
    padding: str | int | Sequence[Any] = "SAME",
    input_dilation: int | Sequence[int] = 1,
    kernel_dilation: int | Sequence[int] = 1,
    feature_group_count: int = 1,
    use_bias: bool = True,
    kernel_init: Callable[..., Array] = lecun_normal,
    bias_init: Callable[..., Array] = zeros,
) -> Layer:
    """A convolution over 1, 2 or 3 spatial dimensions (Flax's ``nn.Conv``), channels last.

    Params: ``kernel`` of shape ``kernel_size + (in_features // feature_group_count, features)``
    (Flax's HWIO) and ``bias`` (features,). ``'SAME'`` pads as ``lax.conv_general_dilated``
    does, which with a stride is not symmetric (more on the high side).

    Args:
        features: output channels.
        kernel_size: the window, one int per spatial dimension (an int: one dimension).
        strides: the step per spatial dimension (an int is repeated).
        padding: ``'SAME'``, ``'VALID'``, an int (both sides of every dimension) or one
            ``(low, high)`` pair per spatial dimension.
        input_dilation: the input's dilation per spatial dimension (an int is repeated).
        kernel_dilation: the kernel's dilation per spatial dimension (an int is repeated).
        feature_group_count: how many groups the input and output channels split into.
        use_bias: whether to add a bias.
        kernel_init: ``init(key, shape, dtype)`` for the kernel.
        bias_init: ``init(key, shape, dtype)`` for the (features,) bias.

    Returns:
        A :class:`Layer` whose params are ``{'kernel': ..., 'bias': (features,)}``.

    Raises:
        ValueError: if a size, stride, dilation or padding is malformed, or ``features`` is not
            a positive multiple of ``feature_group_count``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> layer = conv(8, (3, 3), strides=2)
        >>> p = layer.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
        >>> p['kernel'].shape, layer.apply(p, jnp.ones((2, 28, 28, 1))).shape
        ((3, 3, 1, 8), (2, 14, 14, 8))
    """
    kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    n = len(kernel_size)
    where = f"conv{n}d"
    kernel_size = _ints(kernel_size, n, "kernel_size", where)
    strides_, in_dil, k_dil = (_ints(v, n, name, where) for v, name in
                               ((strides, "strides"), (input_dilation, "input_dilation"), (kernel_dilation, "kernel_dilation")))
    pad = _padding(padding, n, where)
    if not isinstance(features, int) or features < 1 or feature_group_count < 1 or features % feature_group_count:
        raise ValueError(f"{where}: features ({features!r}) must be a positive multiple of feature_group_count ({feature_group_count!r})")

    def init(key: PRNGKeyArray | Scope, x: Example) -> Params:
        shape = _shape(x)
        _check_conv_input(where, jax.ShapeDtypeStruct(shape, jnp.float32), n)
        if shape[-1] % feature_group_count:
            raise ValueError(f"{where}: {shape[-1]} input features do not split into {feature_group_count} groups")
        params = {"kernel": kernel_init(param_key(key, 1), kernel_size + (shape[-1] // feature_group_count, features))}
        if use_bias:
            params["bias"] = bias_init(param_key(key, 2), (features,))
        return params

    def apply(params: Params, x: ArrayLike) -> Array:
        x, kernel = _promoted(x, params["kernel"])
        _check_conv_input(where, x, n, kernel.shape[-2] * feature_group_count)
        y = jax.lax.conv_general_dilated(
            x, kernel, strides_, pad, lhs_dilation=in_dil, rhs_dilation=k_dil,
            dimension_numbers=_conv_dimension_numbers(x.ndim), feature_group_count=feature_group_count,
        )
        return _add_bias(y, params["bias"]) if use_bias else y

    return Layer(init, apply)


def conv_transpose(
    features: int,
    kernel_size: int | Sequence[int],
    *,
    strides: int | Sequence[int] = 1,
    padding: str | int | Sequence[Any] = "SAME",
    kernel_dilation: int | Sequence[int] = 1,
    transpose_kernel: bool = False,
    use_bias: bool = True,
    kernel_init: Callable[..., Array] = lecun_normal,
    bias_init: Callable[..., Array] = zeros,
) -> Layer:
    """A transposed convolution (Flax's ``nn.ConvTranspose``, ``lax.conv_transpose``), channels last.

    Params: ``kernel`` of shape ``kernel_size + (in_features, features)`` (``(features,
    in_features)`` last with ``transpose_kernel=True``) and ``bias`` (features,).

    Args:
        features: output channels.
        kernel_size: the window, one int per spatial dimension (an int: one dimension).
        strides: the step per spatial dimension (an int is repeated).
        padding: ``'SAME'``, ``'VALID'``, an int (both sides of every dimension) or one
            ``(low, high)`` pair per spatial dimension.
        kernel_dilation: the kernel's dilation per spatial dimension (an int is repeated).
        transpose_kernel: flip the kernel spatially and swap its last two axes, as the
            gradient of a convolution does.
        use_bias: whether to add a bias.
        kernel_init: ``init(key, shape, dtype)`` for the kernel.
        bias_init: ``init(key, shape, dtype)`` for the (features,) bias.

    Returns:
        A :class:`Layer` whose params are ``{'kernel': ..., 'bias': (features,)}``.

    Raises:
        ValueError: if a size, stride, dilation or padding is malformed, or ``features`` is not
            a positive int.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> layer = conv_transpose(1, (3, 3), strides=2)
        >>> p = layer.init(jax.random.key(0), jnp.zeros((1, 14, 14, 8)))
        >>> layer.apply(p, jnp.ones((2, 14, 14, 8))).shape
        (2, 28, 28, 1)
    """
    kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    n = len(kernel_size)
    where = f"conv_transpose{n}d"
    kernel_size = _ints(kernel_size, n, "kernel_size", where)
    strides_, k_dil = _ints(strides, n, "strides", where), _ints(kernel_dilation, n, "kernel_dilation", where)
    pad = _padding(padding, n, where)
    if not isinstance(features, int) or features < 1:
        raise ValueError(f"{where}: features must be a positive int, got {features!r}")

    def init(key: PRNGKeyArray | Scope, x: Example) -> Params:
        shape = _shape(x)
        _check_conv_input(where, jax.ShapeDtypeStruct(shape, jnp.float32), n)
        io = (features, shape[-1]) if transpose_kernel else (shape[-1], features)
        params = {"kernel": kernel_init(param_key(key, 1), kernel_size + io)}
        if use_bias:
            params["bias"] = bias_init(param_key(key, 2), (features,))
        return params

    def apply(params: Params, x: ArrayLike) -> Array:
        x, kernel = _promoted(x, params["kernel"])
        _check_conv_input(where, x, n, kernel.shape[-1] if transpose_kernel else kernel.shape[-2])
        y = jax.lax.conv_transpose(x, kernel, strides_, pad, rhs_dilation=k_dil, transpose_kernel=transpose_kernel)
        return _add_bias(y, params["bias"]) if use_bias else y

    return Layer(init, apply)


def _pool(x: ArrayLike, init: float, op: Callable, window: Sequence[int], strides: Sequence[int] | None, padding: Any) -> Array:
    x = jnp.asarray(x)
    window = tuple(window)
    strides = tuple(strides) if strides is not None else (1,) * len(window)
    if x.ndim != len(window) + 2:
        raise ValueError(f"pool: input has shape {x.shape}; expected (batch, {len(window)} spatial dims, features)")
    pad = _padding(padding, len(window), "pool")
    if not isinstance(pad, str):
        pad = ((0, 0),) + pad + ((0, 0),)
    return jax.lax.reduce_window(x, init, op, (1,) + window + (1,), (1,) + strides + (1,), pad)


def avg_pool(x: ArrayLike, window_shape: Sequence[int], strides: Sequence[int] | None = None, padding: Any = "VALID") -> Array:
    """Average over windows (Flax's ``nn.avg_pool``, padding counted).

    Args:
        x: the input, ``(batch, *spatial, features)``.
        window_shape: the window, one int per spatial dimension.
        strides: the step per spatial dimension; ``None`` steps by 1.
        padding: ``'SAME'``, ``'VALID'``, an int or one ``(low, high)`` pair per spatial dimension.

    Returns:
        The window means, ``(batch, *pooled, features)``.

    Raises:
        ValueError: if ``x`` does not have one spatial dimension per window entry, or the
            padding is malformed.
    """
    return _pool(x, 0.0, jax.lax.add, window_shape, strides, padding) / float(jnp.prod(jnp.array(window_shape)))


def max_pool(x: ArrayLike, window_shape: Sequence[int], strides: Sequence[int] | None = None, padding: Any = "VALID") -> Array:
    """The maximum over windows (Flax's ``nn.max_pool``).

    Args:
        x: the input, ``(batch, *spatial, features)``.
        window_shape: the window, one int per spatial dimension.
        strides: the step per spatial dimension; ``None`` steps by 1.
        padding: ``'SAME'``, ``'VALID'``, an int or one ``(low, high)`` pair per spatial dimension.

    Returns:
        The window maxima, ``(batch, *pooled, features)``.

    Raises:
        ValueError: if ``x`` does not have one spatial dimension per window entry, or the
            padding is malformed.
    """
    return _pool(x, -jnp.inf, jax.lax.max, window_shape, strides, padding)
