"""A sweep's folder: ``sweep.json`` beside one run folder per member, checked before a sweep starts."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pureflax import checkpoint, rundir

SWEEP_FILE = "sweep.json"


def check(out: Path, names: Sequence[str], *, overwrite: bool = False, resume: bool = False) -> None:
    """Whether ``out`` can take this sweep: empty or absent, or a sweep to ``--resume`` (the same members) or ``--overwrite``.

    Raises:
        rundir.RunError: the message says which flag, or which other folder, to use.
    """
    rundir.check(out, overwrite=True, resume=False)  # the folder's kind and permissions; a single run in it is refused below
    single = [name for name in rundir.RUN_FILES if (out / name).exists()]
    if single:
        raise rundir.RunError(f"`out` {out} holds a single run ({', '.join(single)}), not a sweep; choose another `out`")
    if resume and overwrite:
        raise rundir.RunError("`resume` continues the sweep in `out` and `overwrite` replaces it: choose one")
    recorded = read_sweep(out)
    if resume and recorded is None:
        raise rundir.RunError(f"`resume`: `out` {out} holds no sweep ({SWEEP_FILE} is missing); start it without `resume`")
    if resume and [m["name"] for m in recorded["members"]] != list(names):
        had = ", ".join(m["name"] for m in recorded["members"])
        raise rundir.RunError(f"`resume`: the sweep in {out} has the members {had}; these flags make {', '.join(names)}: "
                              "resume with its settings, or start a new sweep in another `out`")
    if recorded is not None and not (resume or overwrite):
        raise rundir.RunError(f"`out` {out} already holds a sweep ({SWEEP_FILE}); pass `resume`, `overwrite`, or choose another `out`")


def read_sweep(out: Path) -> dict[str, Any] | None:
    """``out/sweep.json`` as written, or ``None`` when there is none."""
    path = Path(out) / SWEEP_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise rundir.RunError(f"{path} cannot be read ({err}); move it away to start the sweep again") from None


def write_sweep(out: Path, record: dict[str, Any]) -> None:
    """Write ``sweep.json`` whole or not at all (a temporary file renamed over it)."""
    path = Path(out) / SWEEP_FILE
    tmp = path.with_name(f".{SWEEP_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def completed(folder: Path, total: int) -> dict[str, Any] | None:
    """The final row of a member run already complete at ``total`` steps (a resumed sweep leaves it as it is)."""
    if not (folder / "metrics.jsonl").exists():
        return None
    finals = [row for row in rundir.read_log(folder / "metrics.jsonl").rows if "test_loss" in row]
    return finals[-1] if finals and finals[-1].get("steps") == total else None


def checkpoint_exists(folder: Path) -> bool:
    """Whether a member's folder has a committed checkpoint to resume from."""
    return bool(checkpoint.all_steps(folder / "checkpoints")) if (folder / "checkpoints").is_dir() else False
