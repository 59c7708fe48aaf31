"""The layer protocol of :mod:`pureflax.nn`: ``Layer(init, apply)`` and ``StatefulLayer``, Flax's
key folding (a parameter's key is the root key with the layer's path and a per-layer counter
folded in, as Flax's ``LazyRng``), and the default initialisers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
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
    """Look up an activation function by name (``relu``, ``gelu``, ``silu``, ...).

    Args:
        name: a key of :data:`ACTIVATIONS`.

    Returns:
        The activation, an elementwise function of an array.

    Raises:
        ValueError: if ``name`` is not a key of :data:`ACTIVATIONS`.
    """
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

    Raises:
        ValueError: if a part of ``path`` is neither a str nor a non-negative int.
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
    """Accept a bare key (a root scope) or a :class:`Scope`.

    Args:
        key: a PRNG key or a :class:`Scope`.

    Returns:
        ``key`` if it is a :class:`Scope`, else the root scope ``Scope(key)``.
    """
    return key if isinstance(key, Scope) else Scope(key)


def child(key: PRNGKeyArray | Scope, name: str) -> Scope:
    """The scope of a sub-layer called ``name``.

    Args:
        key: the parent layer's key or :class:`Scope`.
        name: the sub-layer's name, as Flax names the module (``'Dense_0'``).

    Returns:
        The parent's scope with ``name`` appended to its path.
    """
    scope = as_scope(key)
    return Scope(scope.key, scope.path + (name,))


def param_key(key: PRNGKeyArray | Scope, counter: int) -> PRNGKeyArray:
    """The key for the ``counter``-th (1-based) random draw of a layer, as Flax makes it.

    Args:
        key: the layer's key or :class:`Scope`.
        counter: which draw of the layer, counting from 1.

    Returns:
        The root key with the layer's path and ``counter`` folded in.
    """
    scope = as_scope(key)
    return fold_in_path(scope.key, scope.path + (counter,))


def lecun_normal(key: PRNGKeyArray, shape: tuple[int, ...], dtype: DTypeLike = jnp.float32) -> Array:
    """Flax's default kernel init: truncated normal with variance 1 / fan_in.

    Args:
        key: the PRNG key to draw from.
        shape: the kernel's shape, ``(..., in, out)``.
        dtype: the kernel's dtype.

    Returns:
        The kernel.
    """
    return jax.nn.initializers.lecun_normal()(key, shape, dtype)


def zeros(key: PRNGKeyArray, shape: tuple[int, ...], dtype: DTypeLike = jnp.float32) -> Array:
    """Flax's default bias init.

    Args:
        key: unused; the draw is still counted, as in Flax.
        shape: the bias's shape.
        dtype: the bias's dtype.

    Returns:
        Zeros of ``shape``.
    """
    del key  # the draw is still counted, as in Flax, so later keys stay aligned
    return jnp.zeros(shape, dtype)


def ones(key: PRNGKeyArray, shape: tuple[int, ...], dtype: DTypeLike = jnp.float32) -> Array:
    """Flax's default scale init.

    Args:
        key: unused; the draw is still counted, as in Flax.
        shape: the scale's shape.
        dtype: the scale's dtype.

    Returns:
        Ones of ``shape``.
    """
    del key  # counted, as in Flax
    return jnp.ones(shape, dtype)


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


def _shape(x: Example) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, jax.ShapeDtypeStruct) else jnp.shape(x)


class StatefulLayer(NamedTuple):
    """A layer with state besides its params (BatchNorm's running statistics).

    ``init(key, x) -> params``; ``init_state(x) -> state``;
    ``apply(params, state, x, *, train) -> (y, new_state)``.
    """

    init: Callable[..., Params]
    init_state: Callable[..., Params]
    apply: Callable[..., tuple[Array, Params]]


def _promoted(x: ArrayLike, kernel: ArrayLike) -> tuple[Array, Array]:
    """Input and kernel in their common float dtype, as Flax's ``promote_dtype`` (uint8 pixels work)."""
    dtype = jnp.result_type(x, kernel)
    if not jnp.issubdtype(dtype, jnp.inexact):
        dtype = jnp.promote_types(jnp.float32, dtype)
    return jnp.asarray(x, dtype), jnp.asarray(kernel, dtype)


def _add_bias(y: Array, bias: ArrayLike) -> Array:
    """``y + bias`` over the last axis, the rank spelled out (rank promotion is an error in the tests)."""
    return y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
