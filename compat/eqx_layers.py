"""Equinox layers that compute what their Flax counterparts compute, for exact conversion.

``eqx.nn.BatchNorm`` keeps its running statistics by another rule than Flax's
``nn.BatchNorm`` (its ``"ema"`` mode normalises a training batch with the running
statistics, its ``"batch"`` mode keeps zero-debiased ones); :class:`BatchNorm` here follows
Flax's rule exactly, with its state in an ``eqx.nn.State`` as Equinox's stateful layers keep it:

* training: normalise with the batch's mean and variance (``E[x²] − E[x]²``, clipped at 0,
  Flax's ``use_fast_variance``) and update ``running = momentum · running + (1 − momentum) · batch``;
* inference: normalise with the running statistics (initially mean 0, variance 1).

It is called on ONE example, channels first, inside ``jax.vmap(..., axis_name="batch")``
(the batch statistics are ``lax.pmean`` over that axis), as Equinox's own BatchNorm is.

Examples:
    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> norm, state = eqx.nn.make_with_state(BatchNorm)(2)
    >>> x = jnp.array([[[0.0]], [[2.0]]]).repeat(2, axis=1)  # (batch 2, channels 2, 1 pixel)
    >>> y, state = jax.vmap(norm, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
    >>> [round(float(v), 3) for v in y[:, 0, 0]], [round(float(v), 3) for v in state.get(norm.state_index)[0]]
    ([-1.0, 1.0], [0.01, 0.01])
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array


class BatchNorm(eqx.Module):
    """Batch normalisation by Flax's rule; params ``weight``/``bias`` (Flax's ``scale``/``bias``), state (mean, var)."""

    weight: Array | None
    bias: Array | None
    state_index: eqx.nn.StateIndex
    inference: bool | None  # None (no leaf, so jax.grad sees arrays only): training; eqx.nn.inference_mode sets it
    num_features: int = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    axis_name: str = eqx.field(static=True)

    def __init__(self, num_features: int, *, momentum: float = 0.99, eps: float = 1e-5,
                 channelwise_affine: bool = True, axis_name: str = "batch", inference: bool | None = None, dtype=jnp.float32):
        if not 0 <= momentum <= 1:
            raise ValueError(f"BatchNorm: momentum must be in [0, 1], got {momentum!r}")
        self.weight = jnp.ones((num_features,), dtype) if channelwise_affine else None
        self.bias = jnp.zeros((num_features,), dtype) if channelwise_affine else None
        self.state_index = eqx.nn.StateIndex((jnp.zeros((num_features,), jnp.float32), jnp.ones((num_features,), jnp.float32)))
        self.num_features, self.momentum, self.eps, self.axis_name = num_features, momentum, eps, axis_name
        self.inference = inference

    def __call__(self, x: Array, state: eqx.nn.State, *, inference: bool | None = None, key=None) -> tuple[Array, eqx.nn.State]:
        """``x``: (channels, *spatial) of one example. Returns the normalised ``x`` and the new state.

        ``inference=None`` takes the layer's own ``inference`` field (``eqx.nn.inference_mode`` sets it).
        """
        del key
        inference = bool(self.inference) if inference is None else inference
        if x.shape[0] != self.num_features:
            raise ValueError(f"BatchNorm: x has {x.shape[0]} channels (shape {x.shape}) but the layer has {self.num_features}")
        spatial = tuple(range(1, x.ndim))
        if inference:
            mean, var = state.get(self.state_index)
        else:
            xf = jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32))
            mean = lax.pmean(xf.mean(spatial), self.axis_name)
            mean2 = lax.pmean(lax.square(xf).mean(spatial), self.axis_name)
            var = jnp.maximum(0.0, mean2 - lax.square(mean))
            running_mean, running_var = state.get(self.state_index)
            state = state.set(self.state_index, (self.momentum * running_mean + (1 - self.momentum) * mean,
                                                 self.momentum * running_var + (1 - self.momentum) * var))
        shape = (-1,) + (1,) * len(spatial)
        mul = lax.rsqrt(var + self.eps).reshape(shape)
        if self.weight is not None:
            mul = mul * self.weight.reshape(shape)
        y = (x - mean.reshape(shape)) * mul
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        return jnp.asarray(y, jnp.result_type(x, *(p for p in (self.weight, self.bias) if p is not None))), state


def vmap_stateful(fn, **kwargs):
    """``fn(x, state, ...)`` of one example over a batch, the state shared (``axis_name="batch"``)."""
    return jax.vmap(fn, axis_name="batch", in_axes=(0, None), out_axes=(0, None), **kwargs)
