"""What pureflax's scripts share on the command line: a usage error is one line and exit status 2.

Light on purpose (argparse and sys only), so a script's ``--help`` and its flag errors answer
before JAX is imported.

Example:
    >>> parser = Parser(prog="train.py")
    >>> _ = parser.add_argument("--steps", type=int)
    >>> parser.parse_args(["--steps", "3"]).steps
    3
"""

from __future__ import annotations

import argparse
import sys


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr, ``<prog>: error: <message>``, and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)
