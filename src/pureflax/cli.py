"""What pureflax's scripts share on the command line: a usage error is one line and exit status 2.

Light on purpose (no JAX), so a script's ``--help`` and its flag errors answer
before JAX is imported.

Examples:
    >>> parser = Parser(prog="train.py")
    >>> _ = parser.add_argument("--steps", type=int)
    >>> parser.parse_args(["--steps", "3"]).steps
    3
"""

from __future__ import annotations

import argparse
import sys

from pureflax.flags import as_flags


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr, ``<prog>: error: <message>``, and exit status 2;
    and a flag given twice (``--lr 1e-4 --lr 2e-4``) is refused, not decided by the last one."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print ``prog: error: message`` on stderr, one line, settings named as flags, and exit with status 2."""
        sys.stderr.write(f"{self.prog}: error: {as_flags(message)}\n")
        raise SystemExit(2)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        """argparse's ``add_argument``; an option given twice on one command line is then an error."""
        action = super().add_argument(*args, **kwargs)
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            action.__class__ = _once(type(action))
        return action

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        """argparse's ``parse_known_args``, without the record of which options were given."""
        namespace, extras = super().parse_known_args(args, namespace)
        vars(namespace).pop(_GIVEN, None)
        return namespace, extras


_GIVEN = "_flags_given"
_ONCE: dict[type, type] = {}


def _once(kind: type) -> type:
    """``kind`` of argparse action, refusing a second use of its flag in one command line."""
    if kind not in _ONCE:
        def __call__(self, parser, namespace, values, option_string=None):
            given = vars(namespace).setdefault(_GIVEN, {})
            if self.dest in given:
                shown = "" if values in ([], None) else f" ({given[self.dest]}, then {' '.join(map(str, values)) if isinstance(values, list) else values})"
                parser.error(f"{option_string} is given twice{shown}; give it once")
            given[self.dest] = " ".join(map(str, values)) if isinstance(values, list) else values
            kind.__call__(self, parser, namespace, values, option_string)

        _ONCE[kind] = type(kind.__name__, (kind,), {"__call__": __call__})
    return _ONCE[kind]
