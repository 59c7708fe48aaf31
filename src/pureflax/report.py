"""What a run reports: log lines, the test-set evaluation and the pictures."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pureflax import models, step as step_lib, viz
from pureflax.distributed import host


def evaluate(eval_step, params, data: step_lib.Batch, key: jax.Array, batch_size: int, model_state=None) -> step_lib.Metrics:
    """Mean loss terms over a whole split, in batches; batch i uses ``fold_in(key, i)``.

    One jitted program (a ``lax.scan`` over the full batches, then the last partial one), read
    back once; ``model_state`` (BatchNorm's running statistics) goes to the eval step as it is.
    """
    return read_means(start_evaluation(eval_step, params, data, key, batch_size, model_state))


def start_evaluation(eval_step, params, data: step_lib.Batch, key: jax.Array, batch_size: int, model_state=None) -> jax.Array:
    """:func:`evaluate`'s program, dispatched: its (loss, mse, kl) means on the device, not waited for.

    Queued behind the program that computes ``params``, so it is prepared while that one runs.
    """
    return _split_means(eval_step, params, model_state, data, key, batch_size)


def read_means(means: jax.Array) -> step_lib.Metrics:
    """The (loss, mse, kl) means of :func:`start_evaluation` on the host (waiting for them)."""
    return step_lib.Metrics(*np.asarray(host(means), np.float64))


def split_means(eval_step, params, model_state, data: step_lib.Batch, key: jax.Array, batch_size: int) -> jax.Array:
    """The (loss, mse, kl) means over ``data`` as a traceable function (:func:`start_evaluation` runs it jitted)."""
    n = data.labels.shape[0]
    full = n // batch_size

    def batch_sums(i, batch: step_lib.Batch) -> jax.Array:
        return jnp.stack(eval_step(params, batch, jax.random.fold_in(key, i), model_state)) * batch.labels.shape[0]

    def body(total, i):
        batch = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, i * batch_size, batch_size), data)
        return total + batch_sums(i, batch), None

    total = jax.lax.scan(body, jnp.zeros(3), jnp.arange(full))[0] if full else jnp.zeros(3)
    if n % batch_size:
        total = total + batch_sums(full, jax.tree_util.tree_map(lambda a: a[full * batch_size :], data))
    return total / n


_split_means = jax.jit(split_means, static_argnums=(0, 5))


@partial(jax.jit, static_argnames="config")
def _samples(params, model_state, labels: jax.Array, key: jax.Array, config: models.ModelConfig) -> jax.Array:
    return models.of(config).sample(params, model_state, labels, key)


@partial(jax.jit, static_argnames="config")
def _reconstruct(params, model_state, x: jax.Array, c: jax.Array, config: models.ModelConfig) -> jax.Array:
    """The decoded latent mean: the reconstruction without the sampling noise."""
    return models.of(config).reconstruct(params, model_state, x, c)


def write_pictures(params, model_state, test: step_lib.Batch, model: models.ModelConfig, key: jax.Array, out: Path,
                   log: list[dict], test_loss: float) -> None:
    """samples.png (row r = class r), reconstructions.png and loss.png; ``model_state`` is ``{}`` for the MLP."""
    labels = jnp.repeat(jnp.arange(model.num_classes), 10)
    samples = _samples(params, model_state, labels, key, config=model)  # compiled once per model and process
    viz.save_samples(np.asarray(host(samples)), out / "samples.png", model.num_classes)
    n = min(40, (test.labels.shape[0] // 10) * 10)
    if n:
        x, c = step_lib.to_inputs(step_lib.Batch(test.images[:n], test.labels[:n]), model.num_classes)
        viz.save_reconstructions(np.asarray(x), np.asarray(host(_reconstruct(params, model_state, x, c, config=model))), out / "reconstructions.png")
    steps = [row["global_step"] for row in log]
    curves = {name: [row[name] for row in log] for name in ("loss", "mse", "kl")}
    viz.save_loss_curve(steps, curves, out / "loss.png", test_loss)


def format_line(epoch: int, step: int, loss: float, mse: float, kl: float) -> str:
    """The tutorial's log line."""
    return f"epoch {epoch} | step {step} | loss: {loss:.4f} ~ mse: {mse:.4f}. kl: {kl:.4f}"
