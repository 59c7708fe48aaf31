"""Build the optimiser from a config: the tutorial's optax features, composed in one place.

The chain, outermost first: ``MultiSteps`` (gradient accumulation) wraps a
``multi_transform`` that sends frozen params to ``set_to_zero`` and the rest to
``chain(clip_by_global_norm, sgd|adam|adamw(schedule), ema)``.

Examples:
    >>> import jax.numpy as jnp
    >>> tx = make_optimizer(OptimConfig(optimizer="adam", lr=1e-2, clip_norm=1.0), total_steps=100)
    >>> state = tx.init({'w': jnp.zeros(3)})
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax

from pureflax.config import OptimConfig  # the settings live in pureflax.config

def make_schedule(config: OptimConfig, total_updates: int, lr: Any = None) -> optax.Schedule:
    """The learning-rate schedule over ``total_updates`` optimiser updates.

    ``lr``: the peak learning rate instead of ``config.lr``; it may be a traced value (a sweep's
    members each train with their own, in one program).
    """
    lr = config.lr if lr is None else lr
    if config.schedule == "constant":
        return optax.constant_schedule(lr)
    if config.schedule == "linear":
        return optax.linear_schedule(lr, config.end_lr, max(total_updates, 1))
    decay_steps = max(total_updates - config.warmup_steps, 1)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, lr, config.warmup_steps),
            optax.linear_schedule(lr, config.end_lr, decay_steps),
        ],
        [config.warmup_steps],
    )


def path_str(path: Sequence[Any]) -> str:
    """A key path from ``tree_leaves_with_path`` as ``'encoder/Dense_0/kernel'``."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def param_paths(params: Any) -> list[str]:
    """Every leaf's path in ``params``, e.g. ``'decoder/Dense_2/bias'``."""
    return [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


def _frozen(path: str, prefixes: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def freeze_labels(params: Any, freeze: Sequence[str], names: Any | None = None) -> Any:
    """A tree like ``params`` of ``'freeze'`` / ``'train'`` labels.

    Args:
        params: the params, in any form.
        freeze: functional path prefixes, e.g. ``('encoder', 'decoder/Dense_2')``.
        names: a tree like ``params`` of each leaf's functional path; by default the
            params' own key paths (right for the functional dict).

    Raises:
        ValueError: a path in ``freeze`` matches no param; the message lists the
            top-level names there are.
    """
    if names is None:
        names = jax.tree_util.tree_map_with_path(lambda p, _: path_str(p), params)
    paths = jax.tree_util.tree_leaves(names)
    for prefix in freeze:
        if not any(_frozen(p, [prefix]) for p in paths):
            top = sorted({p.split("/")[0] for p in paths})
            raise ValueError(f"`freeze` {prefix!r} matches no parameter; top-level names are {', '.join(top)}")
    return jax.tree_util.tree_map(lambda name: "freeze" if _frozen(name, freeze) else "train", names)


def notices(config: OptimConfig, total_steps: int, names: Any) -> list[str]:
    """One line for each setting that does nothing, or less than asked, in a run of ``total_steps``.

    Args:
        names: the params' functional paths (:func:`param_paths` of the functional params).

    Examples:
        >>> notices(OptimConfig(warmup_steps=10), 100, ["w"])
        ['warmup-steps 10 does nothing with schedule constant (it is the warmup of schedule warmup)']
    """
    found, updates = [], total_steps // config.grad_accum
    if config.warmup_steps and config.schedule != "warmup":
        found.append(f"warmup-steps {config.warmup_steps} does nothing with schedule {config.schedule} "
                     "(it is the warmup of schedule warmup)")
    if config.schedule == "warmup" and config.warmup_steps >= updates:
        found.append(f"warmup-steps {config.warmup_steps} is not shorter than the run's {updates} optimiser updates: "
                     f"the learning rate never reaches lr {config.lr}")
    if config.end_lr and config.schedule == "constant":
        found.append(f"end-lr {config.end_lr} does nothing with schedule constant")
    if total_steps % config.grad_accum:
        found.append(f"grad-accum {config.grad_accum}: the last {total_steps % config.grad_accum} of the run's {total_steps} "
                     "steps add gradients that are never applied")
    paths = list(names)
    if config.freeze and all(_frozen(path, config.freeze) for path in paths):
        found.append(f"freeze {','.join(config.freeze)} covers every parameter: the run changes no weight")
    return found


def make_optimizer(
    config: OptimConfig, total_steps: int, params: Any | None = None, names: Any | None = None, *, lr: Any = None
) -> optax.GradientTransformation:
    """Compose the optimiser that ``config`` describes.

    Args:
        config: the settings.
        total_steps: train steps in the run (schedules span ``total_steps // grad_accum``
            optimiser updates).
        params: needed when ``config.freeze`` is set, to label the tree.
        names: each param's functional path, for params in another form (see
            :func:`freeze_labels`).
        lr: the peak learning rate instead of ``config.lr``, possibly traced (:func:`make_schedule`).

    Returns:
        An ``optax.GradientTransformation``.
    """
    schedule = make_schedule(config, total_steps // config.grad_accum, lr)
    if config.optimizer == "sgd":
        base = optax.sgd(schedule)
    elif config.optimizer == "adam":
        base = optax.adam(schedule)
    else:
        base = optax.adamw(schedule)
    parts = []
    if config.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(config.clip_norm))
    parts.append(base)
    if config.ema is not None:
        parts.append(optax.ema(config.ema))
    tx = optax.chain(*parts) if len(parts) > 1 else base
    if config.freeze:
        if params is None:
            raise ValueError("make_optimizer: freezing needs the params to label")
        labels = freeze_labels(params, config.freeze, names)
        # through a function: optax would call a labels tree that is callable (an Equinox module)
        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, lambda _: labels)
    if config.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum).gradient_transformation()
    return tx
