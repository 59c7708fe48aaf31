"""Layers as pairs of pure functions, with Flax's parameter names, layouts and keys.

Every layer is a :class:`Layer`: ``init(key, x) -> params`` and
``apply(params, x, ...) -> y``. ``x`` given to ``init`` is an example input (only
its shape is read), exactly like ``flax.linen.Module.init``.

Keys follow Flax: a parameter's key is the root key with the layer's path and a
per-layer counter folded in (Flax's ``LazyRng``). So ``dense(4).init(key, x)`` returns
bit-for-bit what ``flax.linen.Dense(4).init(key, x)['params']`` returns, and the same
holds for nested layers whose paths match the Flax module tree.

Examples:
    >>> import jax, jax.numpy as jnp
    >>> from pureflax import nn
    >>> layer = nn.feed_forward((4, 2, 1), drop_last_activation=True)
    >>> params = layer.init(jax.random.key(0), jnp.zeros((1, 8)))
    >>> layer.apply(params, jnp.ones((1, 8))).shape
    (1, 1)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PRNGKeyArray

Params = dict[str, Any]
PathPart = str | int
Example = ArrayLike | jax.ShapeDtypeStruct  # what init reads the input shape from

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "identity": lambda x: x,
}


class Scope(NamedTuple):
    """A root PRNG key and the path folded into it when a key is drawn (Flax's LazyRng)."""

    key: PRNGKeyArray  # the key given to the outermost init/apply
    path: tuple[PathPart, ...] = ()  # module names from the root, e.g. ('encoder', 'Dense_0')


class Layer(NamedTuple):
    """A layer: ``init(key, x) -> params`` and ``apply(params, x, **kw) -> y``."""

    init: Callable[..., Params]
    apply: Callable[..., Array]
    stochastic: bool = False  # apply takes key= and deterministic= keywords


def activation(name: str) -> Callable[[Array], Array]:
    """Look up an activation function by name (``relu``, ``gelu``, ``silu``, ...)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}"
        ) from None


def fold_in_path(key: PRNGKeyArray, path: Sequence[PathPart]) -> PRNGKeyArray:
    """Fold a static path into ``key`` the way Flax does (SHA-1 of the path, first 4 bytes).

    Flax's ``nn.Dropout`` under ``rngs={'dropout': k}`` draws its mask from
    ``fold_in_path(k, (1,))``; the n-th parameter of the module at ``('a', 'b')``
    is initialised from ``fold_in_path(k, ('a', 'b', n))``.

    Args:
        key: a PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``).
        path: module names and counters, outermost first.

    Returns:
        The derived key; ``key`` itself when ``path`` is empty.
    """
    if not path:
        return key
    digest = hashlib.sha1()
    for part in path:
        if isinstance(part, str):
            digest.update(part.encode("utf-8"))
        elif isinstance(part, int) and part >= 0:
            digest.update(part.to_bytes((part.bit_length() + 7) // 8, byteorder="big"))
        else:
            raise ValueError(f"path parts must be str or non-negative int, got {part!r}")
    hash_int = int.from_bytes(digest.digest()[:4], byteorder="big")
    return jax.random.fold_in(key, jnp.uint32(hash_int))


def as_scope(key: PRNGKeyArray | Scope) -> Scope:
    """Accept a bare key (a root scope) or a :class:`Scope`."""
    return key if isinstance(key, Scope) else Scope(key)


def child(key: PRNGKeyArray | Scope, name: str) -> Scope:
    """The scope of a sub-layer called ``name``."""
    scope = as_scope(key)
    return Scope(scope.key, scope.path + (name,))


def param_key(key: PRNGKeyArray | Scope, counter: int) -> PRNGKeyArray:
    """The key for the ``counter``-th (1-based) random draw of a layer, as Flax makes it."""
    scope = as_scope(key)
    return fold_in_path(scope.key, scope.path + (counter,))


def lecun_normal(key: PRNGKeyArray, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """Flax's default kernel init: truncated normal with variance 1 / fan_in."""
    return jax.nn.initializers.lecun_normal()(key, shape, dtype)


def zeros(key: PRNGKeyArray, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """Flax's default bias init."""
    del key  # the draw is still counted, as in Flax, so later keys stay aligned
    return jnp.zeros(shape, dtype)


def _check_last_dim(where: str, x: ArrayLike, kernel: ArrayLike, *, what: str = "argument x: input", kernel_name: str = "its kernel") -> None:
    """Raise ``ValueError`` unless ``x``'s last dimension is the kernel's input size.

    A Python check on static shapes: under ``jax.jit`` it runs once per trace, not per step.
    """
    shape, expected = tuple(jnp.shape(x)), kernel.shape[0]
    if not shape or shape[-1] != expected:
        raise ValueError(
            f"{where}: {what} has shape {shape} but the layer expects a last "
            f"dimension of {expected} ({kernel_name} is {tuple(kernel.shape)})"
        )


def dense(
    features: int,
    *,
    use_bias: bool = True,
    kernel_init: Callable[..., Array] = lecun_normal,
    bias_init: Callable[..., Array] = zeros,
) -> Layer:
    """A fully connected layer, ``y = x @ kernel + bias`` (Flax's ``nn.Dense``).

    Args:
        features: output size.
        use_bias: whether to add a bias.
        kernel_init: ``init(key, shape, dtype)`` for the (in, out) kernel.
        bias_init: ``init(key, shape, dtype)`` for the (out,) bias.

    Returns:
        A :class:`Layer` whose params are ``{'kernel': (in, out), 'bias': (out,)}``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> layer = dense(2)
        >>> p = layer.init(jax.random.key(0), jnp.zeros(8))
        >>> p['kernel'].shape, layer.apply(p, jnp.ones(8)).shape
        ((8, 2), (2,))
    """
    if not isinstance(features, int) or features < 1:
        raise ValueError(f"dense: features must be a positive int, got {features!r}")

    def init(key: PRNGKeyArray | Scope, x: Example) -> Params:
        in_features = _shape(x)[-1]
        params = {"kernel": kernel_init(param_key(key, 1), (in_features, features))}
        if use_bias:
            params["bias"] = bias_init(param_key(key, 2), (features,))
        return params

    def apply(params: Params, x: ArrayLike) -> Array:
        x = jnp.asarray(x)
        kernel = params["kernel"]
        _check_last_dim("dense", x, kernel)
        y = jnp.dot(x, kernel)
        return _add_bias(y, params["bias"]) if use_bias else y

    return Layer(init, apply)


def feed_forward(
    dimensions: Sequence[int] = (256, 128, 64),
    activation_fn: str = "relu",
    drop_last_activation: bool = False,
) -> Layer:
    """A stack of dense layers with an activation after each (the tutorial's ``FeedForward``).

    Args:
        dimensions: output size of each dense layer, in order.
        activation_fn: activation name, see :data:`ACTIVATIONS`.
        drop_last_activation: leave the last layer linear.

    Returns:
        A :class:`Layer` with params ``{'Dense_0': ..., 'Dense_1': ..., ...}``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> ff = feed_forward((4, 2, 1), drop_last_activation=True)
        >>> p = ff.init(jax.random.key(0), jnp.zeros((1, 8)))
        >>> sorted(p)
        ['Dense_0', 'Dense_1', 'Dense_2']
    """
    dimensions = tuple(dimensions)
    if not dimensions:
        raise ValueError("feed_forward: dimensions must not be empty")
    layers = [dense(d) for d in dimensions]
    act = activation(activation_fn)
    names = [f"Dense_{i}" for i in range(len(layers))]
    last = len(layers) - 1

    def init(key: PRNGKeyArray | Scope, x: Example) -> Params:
        params = {}
        shape = _shape(x)
        for name, layer in zip(names, layers):
            params[name] = layer.init(child(key, name), jax.ShapeDtypeStruct(shape, jnp.float32))
            shape = shape[:-1] + (params[name]["kernel"].shape[1],)
        return params

    def apply(params: Params, x: ArrayLike) -> Array:
        for i, (name, layer) in enumerate(zip(names, layers)):
            # Name the layer: argument x for the first, the previous layer's output after.
            what = "argument x: input" if i == 0 else f"the output of {names[i - 1]}"
            _check_last_dim(f"feed_forward {name}", x, params[name]["kernel"], what=what, kernel_name=f"params[{name!r}]['kernel']")
            x = layer.apply(params[name], x)
            if i != last or not drop_last_activation:
                x = act(x)
        return x

    return Layer(init, apply)


def dropout(rate: float, *, deterministic: bool = False) -> Layer:
    """Dropout with an explicit key; numerically Flax's ``nn.Dropout``.

    ``rate`` is the probability of dropping an element. Kept elements are scaled
    by ``1 / (1 - rate)``. The mask is drawn from ``param_key(key, 1)``, the same key
    Flax's Dropout draws under ``rngs={'dropout': key}``.

    Args:
        rate: drop probability in [0, 1].
        deterministic: default for ``apply``; ``True`` returns the input unchanged.

    Returns:
        A :class:`Layer` with empty params; ``apply(params, x, *, key=None,
        deterministic=None)`` needs ``key`` unless deterministic.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> drop = dropout(0.5)
        >>> y = drop.apply({}, jnp.ones(4), key=jax.random.key(0))
        >>> set(y.tolist()) <= {0.0, 2.0}
        True
    """
    if not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"dropout: rate is a probability in [0, 1], got {rate!r}")
    default_deterministic = deterministic

    def init(key: PRNGKeyArray | Scope, x: Example) -> Params:
        del key, x  # dropout has no parameters
        return {}

    def apply(
        params: Params,
        x: ArrayLike,
        *,
        key: PRNGKeyArray | Scope | None = None,
        deterministic: bool | None = None,
    ) -> Array:
        del params
        x = jnp.asarray(x)
        det = default_deterministic if deterministic is None else deterministic
        if rate == 0.0 or det:
            return x
        if rate == 1.0:
            return jnp.zeros_like(x)
        if key is None:
            raise ValueError(
                "dropout: a key is needed when not deterministic: "
                "apply(params, x, key=jax.random.key(0)) or deterministic=True"
            )
        keep_prob = 1.0 - rate
        mask = jax.random.bernoulli(param_key(key, 1), p=keep_prob, shape=x.shape)
        return jax.lax.select(mask, x / keep_prob, jnp.zeros_like(x))

    return Layer(init, apply, stochastic=True)


def _shape_fn(layer: Layer, params: Params) -> Callable[[Array], Array]:
    """``layer.apply`` with its params, deterministic: used only to infer shapes."""
    if layer.stochastic:
        return lambda v: layer.apply(params, v, deterministic=True)
    return lambda v: layer.apply(params, v)


def _shape(x: Example) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, jax.ShapeDtypeStruct) else jnp.shape(x)


def sequential(layers: Sequence[Layer | Callable[[Array], Array]]) -> Layer:
    """Chain layers and plain functions (Flax's ``nn.Sequential``).

    Layers with parameters are named ``layers_{i}`` by their index in ``layers``,
    as Flax names them; plain functions such as ``jax.nn.relu`` take no params.
    ``apply(params, x, *, key=None)`` passes each random layer (dropout) the scope
    ``layers_{i}`` of ``key``, so masks match Flax's under ``rngs={'dropout': key}``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> net = sequential([dense(4), jax.nn.relu, dense(2)])
        >>> p = net.init(jax.random.key(0), jnp.zeros((1, 8)))
        >>> sorted(p), net.apply(p, jnp.ones((1, 8))).shape
        (['layers_0', 'layers_2'], (1, 2))
    """
    layers = list(layers)
    if not layers:
        raise ValueError("sequential: needs at least one layer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer) and not callable(layer):
            raise TypeError(f"sequential: layers[{i}] is {layer!r}, not a Layer or a function")
    names = [f"layers_{i}" for i in range(len(layers))]

    def init(key: PRNGKeyArray | Scope, x: Example) -> Params:
        params = {}
        example = jax.ShapeDtypeStruct(_shape(x), jnp.float32)
        for name, layer in zip(names, layers):
            if isinstance(layer, Layer):
                p = layer.init(child(key, name), example)
                if p:
                    params[name] = p
                fn = _shape_fn(layer, p)
            else:
                fn = layer
            example = jax.eval_shape(fn, example)
        return params

    def apply(params: Params, x: ArrayLike, *, key: PRNGKeyArray | Scope | None = None) -> Array:
        for i, (name, layer) in enumerate(zip(names, layers)):
            if not isinstance(layer, Layer):
                x = layer(x)
                continue
            try:
                if layer.stochastic:
                    x = layer.apply(params.get(name, {}), x, key=None if key is None else child(key, name))
                else:
                    x = layer.apply(params.get(name, {}), x)
            except ValueError as e:  # name the failing layer (shape errors: once per trace)
                fed = "argument x" if i == 0 else f"the output of {names[i - 1]}"
                raise ValueError(f"sequential {name} (fed {fed}): {e}") from e
        return x

    return Layer(init, apply)


class Bound(NamedTuple):
    """An apply function with its params attached, callable like a stateful model.

    For inference and debugging (the tutorial's ``model.bind(params)``); train with
    ``apply`` and explicit params instead.
    """

    apply: Callable[..., Any]
    params: Params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply(self.params, *args, **kwargs)


def bind(apply: Callable[..., Any], params: Params) -> Bound:
    """Attach ``params`` to ``apply``: ``bind(layer.apply, p)(x) == layer.apply(p, x)``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> layer = dense(2)
        >>> model = bind(layer.apply, layer.init(jax.random.key(0), jnp.zeros(8)))
        >>> model(jnp.ones(8)).shape
        (2,)
    """
    return Bound(apply, params)


def unbind(bound: Bound) -> tuple[Callable[..., Any], Params]:
    """Split a :class:`Bound` back into ``(apply, params)``."""
    return bound.apply, bound.params


# --- beyond Dense: convolutions, normalisation, embeddings, pooling --------------------------
#
# Each follows its flax.linen namesake: the same parameter names, layouts, init keys (the n-th
# param of a layer draws from ``param_key(key, n)``) and the same operations in the same order,
# so the same params and inputs give Flax's outputs (tests/test_layers.py measures each).


def ones(key: PRNGKeyArray, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """Flax's default scale init."""
    del key  # counted, as in Flax
    return jnp.ones(shape, dtype)


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


def _promoted(x: ArrayLike, kernel: ArrayLike) -> tuple[Array, Array]:
    """Input and kernel in their common float dtype, as Flax's ``promote_dtype`` (uint8 pixels work)."""
    dtype = jnp.result_type(x, kernel)
    if not jnp.issubdtype(dtype, jnp.inexact):
        dtype = jnp.promote_types(jnp.float32, dtype)
    return jnp.asarray(x, dtype), jnp.asarray(kernel, dtype)


def _add_bias(y: Array, bias: ArrayLike) -> Array:
    """``y + bias`` over the last axis, the rank spelled out (rank promotion is an error in the tests)."""
    return y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


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


def _stats(x: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
    """Mean and variance over ``axes`` as Flax computes them: E[x²] − E[x]², clipped at 0."""
    x = jnp.asarray(x, jnp.promote_types(jnp.result_type(x), jnp.float32))
    mean, mean2 = x.mean(axes), jax.lax.square(x).mean(axes)
    return mean, jnp.maximum(0.0, mean2 - jax.lax.square(mean))


def _normalize(params: Params, x: Array, mean: Array, var: Array, reduction_axes: tuple[int, ...],
               epsilon: float, use_scale: bool, use_bias: bool) -> Array:
    """``(x − mean) · rsqrt(var + ε) · scale + bias`` in Flax's order of operations (features last)."""
    feature_shape = (1,) * (x.ndim - 1) + (x.shape[-1],)
    y = x - jnp.expand_dims(mean, reduction_axes)
    mul = jax.lax.rsqrt(jnp.expand_dims(var, reduction_axes) + epsilon)
    if use_scale:
        mul = mul * params["scale"].reshape(feature_shape)
    y = y * mul
    if use_bias:
        y = y + params["bias"].reshape(feature_shape)
    # the statistics are float32 at least; the output takes the input's and the params' dtype, as Flax's
    return jnp.asarray(y, jnp.result_type(x, *(params[k] for k in ("scale", "bias") if k in params)))


def _norm_params(key: PRNGKeyArray | Scope, features: int, use_scale: bool, use_bias: bool) -> Params:
    params = {}
    if use_scale:
        params["scale"] = ones(param_key(key, 1), (features,))
    if use_bias:
        params["bias"] = zeros(param_key(key, 1 + use_scale), (features,))
    return params


def layer_norm(*, epsilon: float = 1e-6, use_scale: bool = True, use_bias: bool = True) -> Layer:
    """Normalise each example over its last axis (Flax's ``nn.LayerNorm``: ε = 1e-6; Equinox's is 1e-5).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> layer = layer_norm()
        >>> p = layer.init(jax.random.key(0), jnp.zeros((2, 4)))
        >>> [round(float(v), 3) for v in layer.apply(p, jnp.array([[1., 2., 3., 4.]]))[0]]
        [-1.342, -0.447, 0.447, 1.342]
    """

    def init(key: PRNGKeyArray | Scope, x: Example) -> Params:
        return _norm_params(key, _shape(x)[-1], use_scale, use_bias)

    def apply(params: Params, x: ArrayLike) -> Array:
        x = jnp.asarray(x)
        mean, var = _stats(x, (x.ndim - 1,))
        return _normalize(params, x, mean, var, (x.ndim - 1,), epsilon, use_scale, use_bias)

    return Layer(init, apply)


def group_norm(num_groups: int = 32, *, epsilon: float = 1e-6, use_scale: bool = True, use_bias: bool = True) -> Layer:
    """Normalise each example over its spatial axes and groups of features (Flax's ``nn.GroupNorm``)."""
    if not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"group_norm: num_groups must be a positive int, got {num_groups!r}")

    def init(key: PRNGKeyArray | Scope, x: Example) -> Params:
        features = _shape(x)[-1]
        if features % num_groups:
            raise ValueError(f"group_norm: {num_groups} groups do not divide {features} features")
        return _norm_params(key, features, use_scale, use_bias)

    def apply(params: Params, x: ArrayLike) -> Array:
        x = jnp.asarray(x)
        if x.shape[-1] % num_groups:
            raise ValueError(f"group_norm: {num_groups} groups do not divide {x.shape[-1]} features")
        size = x.shape[-1] // num_groups
        grouped = x.reshape(x.shape[:-1] + (num_groups, size))
        mean, var = _stats(grouped, tuple(range(1, x.ndim - 1)) + (grouped.ndim - 1,))
        mean, var = jnp.repeat(mean, size, axis=-1), jnp.repeat(var, size, axis=-1)
        return _normalize(params, x, mean, var, tuple(range(1, x.ndim - 1)), epsilon, use_scale, use_bias)

    return Layer(init, apply)


class StatefulLayer(NamedTuple):
    """A layer with state besides its params (BatchNorm's running statistics).

    ``init(key, x) -> params``; ``init_state(x) -> state``;
    ``apply(params, state, x, *, train) -> (y, new_state)``.
    """

    init: Callable[..., Params]
    init_state: Callable[..., Params]
    apply: Callable[..., tuple[Array, Params]]


def batch_norm(*, momentum: float = 0.99, epsilon: float = 1e-5, use_scale: bool = True, use_bias: bool = True) -> StatefulLayer:
    """Batch normalisation over every axis but the last (Flax's ``nn.BatchNorm``).

    Params ``scale``/``bias``; state ``mean`` (zeros) and ``var`` (ones) — Flax's
    ``batch_stats``. ``train=True`` normalises with the batch's statistics and returns the
    running ones updated as ``momentum · running + (1 − momentum) · batch``; ``train=False``
    uses the running statistics and returns the state unchanged.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> layer = batch_norm()
        >>> x = jnp.array([[0.0], [2.0]])
        >>> p, s = layer.init(jax.random.key(0), x), layer.init_state(x)
        >>> y, s = layer.apply(p, s, x, train=True)
        >>> [round(float(v), 3) for v in y[:, 0]], round(float(s['mean'][0]), 3), round(float(s['var'][0]), 3)
        ([-1.0, 1.0], 0.01, 1.0)
    """
    if not 0 <= momentum <= 1:
        raise ValueError(f"batch_norm: momentum must be in [0, 1], got {momentum!r}")

    def init(key: PRNGKeyArray | Scope, x: Example) -> Params:
        return _norm_params(key, _shape(x)[-1], use_scale, use_bias)

    def init_state(x: Example) -> Params:
        features = _shape(x)[-1]
        return {"mean": jnp.zeros((features,), jnp.float32), "var": jnp.ones((features,), jnp.float32)}

    def apply(params: Params, state: Params, x: ArrayLike, *, train: bool) -> tuple[Array, Params]:
        x = jnp.asarray(x)
        axes = tuple(range(x.ndim - 1))
        if train:
            mean, var = _stats(x, axes)
            state = {"mean": momentum * state["mean"] + (1 - momentum) * mean,
                     "var": momentum * state["var"] + (1 - momentum) * var}
        else:
            mean, var = state["mean"], state["var"]
        return _normalize(params, x, mean, var, axes, epsilon, use_scale, use_bias), state

    return StatefulLayer(init, init_state, apply)


def embed(num_embeddings: int, features: int, *, embedding_init: Callable[..., Array] | None = None) -> Layer:
    """A lookup table (Flax's ``nn.Embed``): params ``embedding`` (num_embeddings, features).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> layer = embed(10, 4)
        >>> p = layer.init(jax.random.key(0), jnp.zeros((2,), jnp.int32))
        >>> layer.apply(p, jnp.array([[1, 2, 3]])).shape
        (1, 3, 4)
    """
    init_fn = embedding_init or jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)

    def init(key: PRNGKeyArray | Scope, x: Example) -> Params:
        del x
        return {"embedding": init_fn(param_key(key, 1), (num_embeddings, features), jnp.float32)}

    def apply(params: Params, x: ArrayLike) -> Array:
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"embed: indices must be integers, got {x.dtype}")
        return jnp.take(params["embedding"], x, axis=0)

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
    """Average over windows (Flax's ``nn.avg_pool``, padding counted): ``(batch, *spatial, features)``."""
    return _pool(x, 0.0, jax.lax.add, window_shape, strides, padding) / float(jnp.prod(jnp.array(window_shape)))


def max_pool(x: ArrayLike, window_shape: Sequence[int], strides: Sequence[int] | None = None, padding: Any = "VALID") -> Array:
    """The maximum over windows (Flax's ``nn.max_pool``)."""
    return _pool(x, -jnp.inf, jax.lax.max, window_shape, strides, padding)
