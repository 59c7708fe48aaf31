"""A run's settings as each checkpoint records them, and what a resume may change: a change that
would make the saved state or position mean something else is refused, naming the setting and
both values; any other is noted. Settings are named in backticks, as :func:`pureflax.flags.as_flags`
reads them. :mod:`pureflax.rundir` exports :func:`settings_of` and :func:`compare_settings`.

Examples:
    >>> compare_settings({"seed": 0, "kl_weight": 1.0}, {"seed": 0, "kl_weight": 0.5})
    ([], ['`kl_weight=0.5` from here on (the run had `kl_weight=1.0`)'])
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pureflax import distributed, models


# Settings that change what the saved state or position means: a resume that changes one is refused.
FIXED = {
    "model_kind": "the saved params are that model's",
    "model": "the saved params have the run's model sizes",
    "optim.optimizer": "the saved optimiser state belongs to the run's optimiser",
    "optim.grad_accum": "the saved accumulator and step count belong to it",
    "optim.clip_norm": "the saved optimiser state was built with it",
    "optim.ema": "the saved optimiser state holds its average",
    "optim.freeze": "the saved optimiser state masks those params",
    "batch_size": "the saved position counts batches of this size",
    "seed": "the data order and every key derive from it",
    "data": "the saved position indexes into that data",
}

def flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'optim': {'lr': 1e-4}}`` -> ``{'optim.lr': 1e-4}``; tuples become lists, as JSON stores them.

    Args:
        settings: nested settings, a dict for each group.
        prefix: put before every name (the dotted path of the group ``settings`` is).

    Returns:
        One entry per setting, named by its dotted path.
    """
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = list(value) if isinstance(value, tuple) else value
    return flat


def settings_of(config: Any, backend: str, data: str) -> dict[str, Any]:
    """A run's full settings as recorded in each checkpoint.

    Args:
        config: the run's ``TrainConfig``.
        backend: the form it trains in (``functional``, ``flax``, ...).
        data: the sha256 of its data.

    Returns:
        The config flattened (see :func:`flatten`), with ``model_kind`` (the kind of
        ``config.model``), ``backend``, ``data`` and the number of processes.
    """
    return flatten({**dataclasses.asdict(config), "model_kind": models.kind_of(config.model), "backend": backend, "data": data,
                    "processes": distributed.process_count()})


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return str(value)[:16] if isinstance(value, str) and len(value) == 64 else str(value)  # a sha256: its head


def compare_settings(saved: dict[str, Any], now: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(refused, notes)``: one line for each setting of ``now`` that differs from ``saved``.

    A change in a :data:`FIXED` setting is refused; any other (the learning rate, the kl
    weight, the schedule, the length of the run, the backend, logging) is noted and applies
    from the resumed step on.

    Args:
        saved: the settings the checkpoint recorded (see :func:`settings_of`).
        now: the settings of the resuming run.

    Returns:
        The refusals (each names the setting, both values and why), then the notes.
    """
    refused, notes = [], []
    other_model = saved.get("model_kind") != now.get("model_kind")
    for name in sorted(set(saved) | set(now), key=lambda n: (n != "model_kind", n)):
        old, new = saved.get(name), now.get(name)
        if old == new or name not in saved or (other_model and name.startswith("model.")):
            continue  # another model's sizes: --model says it all
        group = next((g for g in FIXED if name == g or name.startswith(g + ".")), None)
        now_, then = f"`{name}={_show(new)}`", f"`{name}={_show(old)}`"
        if group:
            refused.append(f"`resume`: {now_} differs from the run's {then} ({FIXED[group]}); "
                           f"resume with {then}, or start a new run in another `out`")
        else:
            notes.append(f"{now_} from here on (the run had {then})")
    return refused, notes
