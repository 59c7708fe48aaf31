"""Measure how closely the four forms agree, from the same weights (MLP or conv VAE).

Each function returns ``{(a, b): figure}`` for every pair of backends; the tests assert
the limits and ``scripts/parity.py`` prints the figures into ``docs/parity.md``.

Examples:
    >>> import jax
    >>> from pureflax import vae
    >>> config = vae.VAEConfig(encoder_dimensions=(16,), decoder_dimensions=(16, 784), latent_dim=4)
    >>> diffs = forward_max_abs_diff(config, jax.random.PRNGKey(0), random_batch(jax.random.PRNGKey(1), 8))
    >>> max(diffs.values()) <= 1e-5
    True
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pureflax import models, optim, step as step_lib, train, vae
from pureflax.compat.backends import BACKENDS, get_backend

NAMES = tuple(BACKENDS)
PAIRS = tuple(itertools.combinations(NAMES, 2))


def random_batch(key: jax.Array, size: int, config: vae.VAEConfig = vae.VAEConfig()) -> step_lib.Batch:
    """A batch of MNIST-like images: a zero background and random bright pixels in the middle.

    Like MNIST, most pixels are exactly 0 (their gradients are exactly 0 in every form);
    see docs/parity.md for why dense noise images are a poor parity probe for Adam.
    """
    k_x, k_on, k_c = jax.random.split(key, 3)
    side = int(round(config.input_dim**0.5))
    centre = np.zeros((side, side), bool)
    centre[side // 5 : side - side // 5, side // 5 : side - side // 5] = True
    on = jax.random.bernoulli(k_on, 0.3, (size, config.input_dim)) & jnp.asarray(centre.reshape(1, -1)[:, : config.input_dim])
    values = jax.random.randint(k_x, (size, config.input_dim), 64, 256)
    images = jnp.where(on, values, 0).astype(jnp.uint8)
    return step_lib.Batch(images, jax.random.randint(k_c, (size,), 0, config.num_classes).astype(jnp.int32))


def noise_batch(key: jax.Array, size: int, config: vae.VAEConfig = vae.VAEConfig()) -> step_lib.Batch:
    """A batch of dense uniform-noise images (every pixel random), for the stress figure."""
    k_x, k_c = jax.random.split(key)
    images = jax.random.randint(k_x, (size, config.input_dim), 0, 256).astype(jnp.uint8)
    return step_lib.Batch(images, jax.random.randint(k_c, (size,), 0, config.num_classes).astype(jnp.int32))


def _params(config: vae.VAEConfig, key: jax.Array) -> dict[str, Any]:
    """Each backend's params, all from the same functional init."""
    return {name: get_backend(name, config).init_params(key, False) for name in NAMES}


def _max_abs(a: Any, b: Any) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _max_rel(a: Any, b: Any) -> float:
    """Largest per-leaf ``max|a - b| / max|b|``: relative to each leaf's own scale."""
    return max(
        float(jnp.max(jnp.abs(x - y)) / jnp.maximum(jnp.max(jnp.abs(y)), 1e-30))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    )


def _pairwise(values: dict[str, Any], measure) -> dict[tuple[str, str], float]:
    return {(a, b): measure(values[a], values[b]) for a, b in PAIRS}


def _eval_apply(backend, params: Any, x, c, key):
    """The forward pass in inference mode; BatchNorm on the running statistics one training
    call on the same batch leaves (not the initial ones, under which it is affine)."""
    _, model_state = backend.apply(params, backend.init_model_state(), x, c, key, train=True)
    return backend.apply(params, model_state, x, c, key, train=False)[0]


def forward_max_abs_diff(config: models.ModelConfig, key: jax.Array, batch: step_lib.Batch) -> dict[tuple[str, str], float]:
    """Max abs difference of ``(recon, mean, logvar)`` between forms, same weights and key (inference mode)."""
    params = _params(config, key)
    x, c = step_lib.to_inputs(batch, config.num_classes)
    noise = jax.random.PRNGKey(7)
    outputs = {name: jax.jit(partial(_eval_apply, get_backend(name, config)))(params[name], x, c, noise) for name in NAMES}
    return _pairwise(outputs, _max_abs)


def grad_max_rel_diff(config: models.ModelConfig, key: jax.Array, batch: step_lib.Batch) -> dict[tuple[str, str], float]:
    """Max relative difference of the loss gradients (training mode), converted to the functional layout."""
    params = _params(config, key)
    grads = {}
    for name in NAMES:
        backend = get_backend(name, config)
        loss_fn = step_lib.make_loss_fn(backend.apply, num_classes=config.num_classes)
        model_state = backend.init_model_state()
        g = jax.jit(jax.grad(lambda p: loss_fn(p, batch, jax.random.PRNGKey(3), model_state)[0]))(params[name])
        grads[name] = backend.to_functional(g)
    return _pairwise(grads, _max_rel)


def trained_params_max_abs_diff(
    config: models.ModelConfig, key: jax.Array, batches: Sequence[step_lib.Batch], lr: float = 1e-4
) -> dict[tuple[str, str], float]:
    """Max abs difference of the params (and BatchNorm statistics) after adamw steps on the same batches, through the shared step."""
    train_config = train.TrainConfig(model=config, optim=optim.OptimConfig(lr=lr))
    finals = {}
    for name in NAMES:
        backend = get_backend(name, config)
        state, _, _, train_step = train.build(train_config, backend, len(batches), key)
        for batch in batches:
            state, _ = train_step(state, batch, jax.random.PRNGKey(11))
        functional = backend.to_functional(state)
        finals[name] = (functional.params, functional.model_state)
    return _pairwise(finals, _max_abs)


def log_max_rel_diff(runs: dict[str, Path]) -> dict[tuple[str, str], float]:
    """Max relative difference of the logged losses (loss, mse, kl) of ``train.py`` runs."""

    def losses(out: Path) -> np.ndarray:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return np.array([[r["loss"], r["mse"], r["kl"]] for r in rows if "step" in r and "loss" in r])

    logs = {name: losses(out) for name, out in runs.items()}
    for name, log in logs.items():
        if log.shape != logs[NAMES[0]].shape or not len(log):
            raise ValueError(f"{name}'s log has {len(log)} lines, {NAMES[0]}'s has {len(logs[NAMES[0]])}")
    return _pairwise(logs, lambda a, b: float(np.max(np.abs(a - b) / np.abs(b))))
