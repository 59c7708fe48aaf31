"""The command line's vocabulary: each setting's flag, the parser built from the config's fields,
and the library's messages in flags.

The library names a setting in backticks (`` `batch_size` 10 does not split evenly over `devices` 4``);
:func:`as_flags` turns each into its flag (``--batch-size 10 does not split evenly over --devices 4``),
and a script shows every message through it. :func:`add_settings` adds one flag per field of a
config dataclass (:mod:`pureflax.config`), with the field's default, help and check.

Light on purpose (argparse and re only): a script's ``--help`` answers before JAX is imported.

Examples:
    >>> as_flags("`optim.lr` must be > 0; `fuse=False`, `native_init=True`; `unknown` stays")
    '--lr must be > 0; --no-fuse, --init native; `unknown` stays'
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from pathlib import Path
from typing import Any

from pureflax import config

# Settings whose flag is not ``--`` + the setting's last name with dashes.
FLAGS = {"native_init": "--init", "pictures": "--no-pictures", "model_kind": "--model", "processes": "--num-processes"}
_NAMED = re.compile(r"`([a-z][a-z0-9_.]*)(?:=([^`]*))?`")


def flag_of(name: str) -> str:
    """The flag that sets a setting: ``optim.lr`` -> ``--lr``, ``native_init`` -> ``--init``."""
    leaf = name.rsplit(".", 1)[-1]
    return FLAGS.get(name, FLAGS.get(leaf, "--" + leaf.replace("_", "-")))


def as_flags(message: str) -> str:
    """``message`` with every setting it names in backticks written as its flag.

    `` `name` `` becomes the flag; `` `name=value` `` the flag that gives it that value
    (``--lr 0.0003``, ``--no-fuse``, ``--init native``, ``--keep-best`` or ``no --keep-best``).
    """
    return _NAMED.sub(lambda found: _as_flag(found[1], found[2]) if _known(found[1]) else found[0], message)


def _as_flag(name: str, value: str | None) -> str:
    flag = flag_of(name)
    if value is None:
        return flag
    spec = SPECS.get(name.rsplit(".", 1)[-1], {})
    kind = spec.get("kind")
    if kind == "choice":
        return f"{flag} {next((w for w, v in spec['choices'].items() if str(v) == value), value)}"
    if kind == "switch":
        return flag if value == "True" else f"--no-{flag[2:]}"
    if kind in ("on", "off"):  # a flag that is given or not: True means given for "on", absent for "off"
        return flag if (value == "True") == (kind == "on") else f"no {flag}"
    return f"{flag} {value}"


def _known(name: str) -> bool:
    return name in FLAGS or name.rsplit(".", 1)[-1] in KNOWN


_FIELDS = [field for kind in (config.TrainConfig, config.OptimConfig) for field in dataclasses.fields(kind)]
SPECS = {field.name: field.metadata["flag"] for field in _FIELDS if "flag" in field.metadata}
SPECS.update(overwrite={"kind": "on"}, resume={"kind": "on"})
# The names a message may put in backticks: every config field, and what fit, load_mnist,
# jax.distributed and a sweep take besides (the script's run flags).
KNOWN = {field.name for field in _FIELDS} | {
    "out", "data", "resume", "overwrite", "backend", "model", "latent_dim", "sweep", "seeds",
    "coordinator", "num_processes", "process_id", "join_timeout", "lost_after"}


def whole(text: str) -> int:
    """A whole number (``16``, ``0x10``)."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def number(text: str) -> float:
    """A finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def a_seed(text: str) -> int:
    """A seed, ``65535`` or ``0xffff``."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number such as 65535 or 0xffff, got {text!r}") from None


def paths(text: str) -> tuple[str, ...]:
    """Comma-separated parameter paths."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    if not parts:
        raise argparse.ArgumentTypeError("expected comma-separated parameter paths, e.g. encoder,pre_latent_proj")
    return parts


def folder(text: str) -> Path:
    """A path that is not empty (an empty one would mean the working folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string (it would mean the working folder)")
    return Path(text)


def checked(parse, check):
    """An argparse type: ``parse`` the text, then ``check`` the value (the field's own rule)."""

    def parse_and_check(text: str) -> Any:
        value = parse(text)
        problem = check(value) if check else None
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse_and_check


_PARSE = {"int": whole, "float": number, "int | None": whole, "float | None": number, "seed": a_seed, "paths": paths}


def _shown(value: Any) -> str:
    return hex(value) if isinstance(value, int) and value == 0xFFFF else str(value)


def add_settings(parser: argparse.ArgumentParser, config: type) -> list[str]:
    """Add one flag per field of the dataclass ``config`` (its default, help and check); return their names.

    A field's ``flag`` metadata (see :func:`pureflax.config.setting`) says how: ``kind`` ``switch``
    (``--X``/``--no-X``), ``on`` (``--X``), ``off`` (``--no-X``), ``choice`` (a word per value),
    ``seed`` or ``paths``; ``choices``; ``hidden`` for none. Fields without metadata (nested configs)
    are skipped.
    """
    added = []
    for field in filter(_flagged, dataclasses.fields(config)):
        spec, name, check = field.metadata["flag"], field.name, field.metadata["check"]
        flag, kind, help = flag_of(name), spec.get("kind"), as_flags(field.metadata["help"])
        default = field.default
        if kind == "switch":
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=default, help=help)
        elif kind == "on":
            parser.add_argument(flag, dest=name, action="store_true", help=help)
        elif kind == "off":
            parser.add_argument(flag, dest=name, action="store_false", help=f"do not {help}")
        elif kind == "choice":
            words = spec["choices"]
            word = next(w for w, v in words.items() if v == default)
            parser.add_argument(flag, dest=name, choices=tuple(words), default=word, help=f"{help} (default {word})")
        elif "choices" in spec:
            parser.add_argument(flag, dest=name, choices=spec["choices"], default=default, help=f"{help} (default {default})")
        else:
            parse = _PARSE[kind or field.type]
            shown = "" if default in (None, ()) else f" (default {_shown(default)})"
            parser.add_argument(flag, dest=name, type=checked(parse, check), default=default, help=help + shown)
        added.append(name)
    return added


def _flagged(field: dataclasses.Field) -> bool:
    return "help" in field.metadata and not field.metadata["flag"].get("hidden")


def values(args: argparse.Namespace, config: type) -> dict[str, Any]:
    """The parsed values of the flags :func:`add_settings` added for ``config``, as the dataclass takes them."""
    out = {}
    for field in filter(_flagged, dataclasses.fields(config)):
        value, spec = getattr(args, field.name), field.metadata["flag"]
        out[field.name] = spec["choices"][value] if spec.get("kind") == "choice" else value
    return out
