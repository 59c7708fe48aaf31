"""The training state: a NamedTuple of arrays, nothing hidden."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import optax


class TrainState(NamedTuple):
    """Step count, params, optimiser state and model state of a training run.

    Unlike Flax's ``TrainState`` it holds no functions, so it is a plain PyTree that
    jit, orbax and the converters take as it is; the optimiser is passed explicitly.
    ``model_state`` is what a model keeps besides its params and does not train (Flax's
    ``batch_stats``: BatchNorm's running mean and variance); it is ``{}`` — no leaves —
    for a model without any, such as the MLP VAE.
    """

    step: Any  # shape=(), dtype=int32: optimiser steps taken so far
    params: Any  # PyTree of float32 arrays, the model's params
    opt_state: Any  # PyTree: the optimiser's state for ``params``
    model_state: Any = {}  # PyTree: non-trained model state (batch statistics); {} when there is none

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, model_state: Any = None) -> TrainState:
        """A fresh state at step 0 with ``tx.init(params)`` (and ``model_state``, default ``{}``).

        Examples:
            >>> import jax.numpy as jnp, optax
            >>> state = TrainState.create({'w': jnp.ones(2)}, optax.sgd(0.1))
            >>> int(state.step)
            0
        """
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   model_state={} if model_state is None else model_state)

    def apply_gradients(self, *, grads: Any, tx: optax.GradientTransformation) -> TrainState:
        """One optimiser update: the state after applying ``grads`` through ``tx``.

        Examples:
            >>> import jax.numpy as jnp, optax
            >>> tx = optax.sgd(0.5)
            >>> state = TrainState.create({'w': jnp.ones(2)}, tx)
            >>> state = state.apply_gradients(grads={'w': jnp.ones(2)}, tx=tx)
            >>> state.params['w'].tolist(), int(state.step)
            ([0.5, 0.5], 1)
        """
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self._replace(step=self.step + 1, params=params, opt_state=opt_state)
