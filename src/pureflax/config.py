"""A run's settings, each written once: its default, its help and its rule.

:class:`TrainConfig` and :class:`OptimConfig` are frozen dataclasses whose fields carry their
help and their check (:func:`setting`). The same check runs when a config is built and when
``scripts/train.py`` parses a flag (:mod:`pureflax.flags` builds its parser from these fields),
so a rule is written in one place. A broken rule raises :class:`SettingError`, whose message
names the setting in backticks (``\\`lr\\` must be > 0, got -1``); the script shows it with the
flag instead (``--lr must be > 0, got -1``).

Light on purpose (no JAX at import), so a script's ``--help`` and its flag errors answer at once.

Examples:
    >>> OptimConfig(lr=3e-4).lr
    0.0003
    >>> OptimConfig(lr=-1.0)
    Traceback (most recent call last):
    ...
    pureflax.config.SettingError: `lr` must be > 0, got -1.0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

FORMS = ("functional", "equinox", "flax", "nnx")  # the model forms: pureflax.compat.backends.BACKENDS is keyed by them
MODEL_KINDS = ("mlp", "conv")  # the models: pureflax.models.KINDS is keyed by them
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "linear", "warmup")

Check = Callable[[Any], "str | None"]  # value -> what is wrong with it, or None


class SettingError(ValueError):
    """A setting's value breaks its rule; ``name`` is the setting, ``problem`` what is wrong."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"`{name}` {problem}")
        self.name, self.problem = name, problem


def at_least(low: int | float) -> Check:
    """The check ``value >= low`` (``None``, an unset optional setting, passes)."""
    return lambda value: None if value is None or value >= low else f"must be >= {low}, got {value!r}"


def above(low: int | float) -> Check:
    """The check ``value > low`` (``None`` passes)."""
    return lambda value: None if value is None or value > low else f"must be > {low}, got {value!r}"


def below_one(value: Any) -> str | None:
    """The check ``0 <= value < 1``, a decay (``None`` passes)."""
    return None if value is None or 0.0 <= value < 1.0 else f"must be in [0, 1), got {value!r}"


def one_of(choices: tuple[str, ...]) -> Check:
    """The check ``value in choices``."""
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}, got {value!r}"


def a_seed(value: Any) -> str | None:
    """The check ``0 <= value < 2**32``, the seeds ``jax.random.PRNGKey`` takes."""
    return None if 0 <= value < 2**32 else f"must be in [0, 2**32), got {value!r}"


def setting(default: Any, help: str, *, check: Check | None = None, flag: dict[str, Any] | None = None) -> Any:
    """A dataclass field with its help and rule.

    Args:
        default: the default value.
        help: one phrase for ``--help`` (the default is added to it).
        check: the rule, run when the config is built and when the flag is parsed.
        flag: how the command line sets it, for :mod:`pureflax.flags` (``None``: as ``--name VALUE``;
            ``{}``-like overrides such as ``{"kind": "switch"}``; ``{"hidden": True}``: no flag).
    """
    return dataclasses.field(default=default, metadata={"help": help, "check": check, "flag": flag or {}})


def check_settings(config: Any) -> None:
    """Run every field's check on ``config``; raise :class:`SettingError` for the first that fails."""
    for field in dataclasses.fields(config):
        check = field.metadata.get("check")
        problem = check(getattr(config, field.name)) if check else None
        if problem:
            raise SettingError(field.name, problem)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimiser settings; the defaults are the tutorial's ``optax.adamw(1e-4)``.

    ``schedule``: ``constant``; ``linear`` from ``lr`` to ``end_lr`` over the run; ``warmup``:
    linear from 0 to ``lr`` over ``warmup_steps``, then linear to ``end_lr``
    (``optax.join_schedules``, as the tutorial builds it). ``freeze``: param paths
    (``encoder``, ``decoder/Dense_2``, ...) never updated.
    """

    optimizer: str = setting("adamw", "the optax optimiser", check=one_of(OPTIMIZERS), flag={"choices": OPTIMIZERS})
    lr: float = setting(1e-4, "(peak) learning rate", check=above(0))
    schedule: str = setting("constant", "learning-rate schedule", check=one_of(SCHEDULES), flag={"choices": SCHEDULES})
    warmup_steps: int = setting(0, "warmup length in optimiser updates, for `schedule` warmup", check=at_least(0))
    end_lr: float = setting(0.0, "final learning rate of the linear and warmup schedules", check=at_least(0))
    clip_norm: float | None = setting(None, "clip gradients to this global norm first", check=above(0))
    ema: float | None = setting(None, "decay of an optax.ema on the updates", check=below_one)
    grad_accum: int = setting(1, "accumulate gradients over this many steps (optax.MultiSteps)", check=at_least(1))
    freeze: tuple[str, ...] = setting((), "comma-separated param paths to keep fixed", flag={"kind": "paths"})

    def __post_init__(self):
        object.__setattr__(self, "freeze", tuple(self.freeze))
        check_settings(self)
        if self.schedule == "warmup" and self.warmup_steps < 1:
            raise SettingError("schedule", "'warmup' needs `warmup_steps` >= 1")


def _default_model() -> Any:
    from pureflax import vae

    return vae.VAEConfig()


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A run's settings; the defaults are the tutorial's."""

    epochs: int = setting(10, "epochs", check=at_least(1))
    max_steps: int | None = setting(None, "stop after this many steps in all", check=at_least(1))
    batch_size: int = setting(16, "batch size", check=at_least(1))
    kl_weight: float = setting(0.5, "weight of the KL term", check=at_least(0))
    seed: int = setting(0xFFFF, "random seed", check=a_seed, flag={"kind": "seed"})
    log_every: int = setting(100, "log line every N steps", check=at_least(1))
    eval_batch_size: int = setting(1000, "test batch size", check=at_least(1), flag={"hidden": True})
    native_init: bool = setting(False, "functional: the same starting weights in every backend (Flax's init); "
                                "native: each library's own", flag={"kind": "choice", "flag": "--init",
                                                                   "choices": {"functional": False, "native": True}})
    fuse: bool | None = setting(None, "one program per log window, or (off) one dispatch per step; default: fused, "
                                "except the conv VAE on CPU, which runs faster per step", flag={"kind": "switch"})
    devices: int = setting(1, "data parallel over N local devices", check=at_least(1))
    ckpt_every: int | None = setting(None, "also checkpoint every N steps (default: at the end only)", check=at_least(1))
    keep: int | None = setting(None, "keep the newest N checkpoints (default: all)", check=at_least(1))
    keep_best: bool = setting(False, "with `keep`: also keep the checkpoint with the best test loss", flag={"kind": "on"})
    pictures: bool = setting(True, "write samples.png, reconstructions.png and loss.png at the end", flag={"kind": "off"})
    model: Any = dataclasses.field(default_factory=_default_model)  # vae.VAEConfig or convvae.ConvVAEConfig
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)

    def __post_init__(self):
        check_settings(self)
        if self.keep_best and self.keep is None:
            raise SettingError("keep_best", "needs `keep` N (with every checkpoint kept, the best is kept anyway)")

    def resolved(self) -> TrainConfig:
        """This config with every setting left to the machine decided (``fuse=None``: :func:`pureflax.loop.fuses_well`)."""
        from pureflax import loop

        return self if self.fuse is not None else dataclasses.replace(self, fuse=loop.fuses_well(self.model))

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> TrainConfig:
        """The config a run recorded in its checkpoints (the inverse of :func:`pureflax.rundir.settings_of`).

        Names this version does not know (``backend``, ``data``, settings of a later version)
        are ignored; lists, as JSON stores tuples, become tuples again.
        """
        from pureflax import models

        def of(kind: type, prefix: str) -> Any:
            names = {field.name for field in dataclasses.fields(kind)} - {"model", "optim"}
            values = {key[len(prefix):]: value for key, value in settings.items() if key[len(prefix):] in names and key.startswith(prefix)}
            return kind(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})

        model = models.KINDS[settings["model_kind"]]
        return dataclasses.replace(of(cls, ""), model=of(model, "model."), optim=of(OptimConfig, "optim."))

    def steps_per_epoch(self, num_train: int) -> int:
        """Full batches per epoch (the last partial batch is dropped, as the tutorial's loader does)."""
        steps = num_train // self.batch_size
        if steps < 1:
            raise SettingError("batch_size", f"{self.batch_size} is larger than the {num_train} training images")
        return steps

    def total_steps(self, num_train: int) -> int:
        """How many steps the run takes on ``num_train`` examples: ``epochs`` of them, at most ``max_steps``."""
        total = self.epochs * self.steps_per_epoch(num_train)
        return total if self.max_steps is None else min(total, self.max_steps)

    def plan(self, num_train: int) -> Any:
        """Where the run's chunks end: epochs, log lines, checkpoints (:class:`pureflax.rundir.Plan`)."""
        from pureflax import rundir

        return rundir.Plan(self.steps_per_epoch(num_train), self.total_steps(num_train), self.log_every, self.ckpt_every)
