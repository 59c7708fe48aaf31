"""A checkpoint directory's step folders, read with care: which steps there are (committed,
stray, set aside, temporary, foreign), each step's metadata, the digests a step is sealed with,
and the verified reads that take the newest step whose files and values are what was saved.
:mod:`pureflax.checkpoint` saves and restores through it and exports its names.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
import xxhash

from pureflax.distributed import host
from pureflax.optim import path_str


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the step and what is wrong."""


class ShapeMismatch(CheckpointError):
    """The checkpoint's params do not fit the model being restored: path and both shapes named."""


class Damaged(CheckpointError):
    """A step whose files or values are not what was saved (or cannot be read): names the step and the file or array."""

    def __init__(self, step: int, why: str):
        super().__init__(f"checkpoint step {step}: {why}")
        self.step, self.why = step, why


# --- the step folders ---------------------------------------------------------------------

ITEMS = ("state", "meta")  # the items of a step, each a folder orbax writes
SEAL = "pureflax-digests.json"  # beside the items, once orbax has committed the step
ARRAYS = "arrays"  # the metadata's record of every array saved: {path: [shape, dtype, xxh3]}
TMP = ".orbax-checkpoint-tmp"  # orbax writes <step>.orbax-checkpoint-tmp-<n> and renames it when it commits
SET_ASIDE = ".damaged"


def _is_step(name: str) -> bool:
    """The manager's step folder name: the number as ``str(step)`` writes it (``400``; not ``0400``)."""
    return name.isascii() and name.isdigit() and name == str(int(name))


def _numbered(directory: str | Path) -> list[tuple[int, Path]]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((int(p.name), p) for p in directory.iterdir() if _is_step(p.name) and p.is_dir())


def all_steps(directory: str | Path) -> list[int]:
    """Every committed step in ``directory``, oldest first (none if it does not exist).

    orbax writes a step into a temporary folder and renames it to the step number when it
    commits, with its ``_CHECKPOINT_METADATA``; a numbered folder without one is not a checkpoint
    (see :func:`stray_steps`), nor is any other name (see :func:`foreign`).
    """
    return [step for step, path in _numbered(directory) if (path / "_CHECKPOINT_METADATA").is_file()]


def stray_steps(directory: str | Path) -> list[int]:
    """Step folders in ``directory`` that hold no orbax checkpoint (copied in, or emptied)."""
    return [step for step, path in _numbered(directory) if not (path / "_CHECKPOINT_METADATA").is_file()]


def set_aside_steps(directory: str | Path) -> list[str]:
    """The names of steps set aside by :func:`set_aside` (``<step>.damaged[-n]``)."""
    return [name for name in _names(directory) if _kind(name) == "set aside"]


def temporary(directory: str | Path) -> list[str]:
    """Saves a killed process left unfinished (``<step>.orbax-checkpoint-tmp-<n>``): removed when the next run starts."""
    return [name for name in _names(directory) if _kind(name) == "temporary"]


def foreign(directory: str | Path) -> list[str]:
    """Names in ``directory`` that are not pureflax's (``0400``, stray files): never read, renamed or removed."""
    return [name for name in _names(directory) if _kind(name) == "foreign"]


def pureflax_names(directory: str | Path) -> list[str]:
    """Every name in ``directory`` that a run wrote: steps, strays, set-aside and temporary folders (not :func:`foreign` ones)."""
    return [name for name in _names(directory) if _kind(name) != "foreign"]


def _names(directory: str | Path) -> list[str]:
    directory = Path(directory)
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def _kind(name: str) -> str:
    head, dot, tail = name.partition(".")
    if _is_step(name):
        return "step"
    if name.startswith(READING):
        return "reading"
    if dot and _is_step(head) and ("." + tail).startswith(SET_ASIDE):
        return "set aside"
    if dot and _is_step(head) and ("." + tail).startswith(TMP):
        return "temporary"
    return "foreign"


def latest_step(directory: str | Path) -> int | None:
    """The newest committed step in ``directory``, or ``None`` (not verified: see :func:`latest_good_step`)."""
    steps = all_steps(directory)
    return steps[-1] if steps else None


def read_meta(directory: str | Path, step: int) -> dict[str, Any]:
    """The JSON metadata saved with ``step`` ({} for a checkpoint saved without any), less the arrays' digests.

    Raises:
        Damaged: the file cannot be read or is not a JSON object.
    """
    return {key: value for key, value in _read_meta(directory, step).items() if key != ARRAYS}


def _read_meta(directory: str | Path, step: int) -> dict[str, Any]:
    path = Path(directory) / str(step) / "meta" / "metadata"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise Damaged(step, f"its metadata cannot be read ({getattr(err, 'strerror', None) or err})") from None
    if not isinstance(meta, dict):
        raise Damaged(step, "its metadata is not a JSON object")
    return meta


# --- digests ------------------------------------------------------------------------------


def _bytes(x: Any) -> memoryview:
    return np.ascontiguousarray(x).reshape(-1).view(np.uint8).data


def array_digests(tree: Any) -> dict[str, list[Any]]:
    """``{path: [shape, dtype, xxh3 of the bytes]}`` for every array of ``tree`` (read to the host)."""
    local = host(tree)
    return {path_str(p): [list(np.shape(x)), str(np.asarray(x).dtype), xxhash.xxh3_64_hexdigest(_bytes(x))]
            for p, x in jax.tree_util.tree_leaves_with_path(local)}


def file_digest(path: str | Path) -> str:
    """xxh3 (64-bit) of a file's bytes, read in 1 MiB blocks."""
    digest = xxhash.xxh3_64()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for item in ITEMS for p in (step_dir / item).rglob("*") if p.is_file())


def seal(directory: str | Path, step: int) -> None:
    """Record the size and digest of every file of committed ``step`` (its :data:`SEAL`), written atomically."""
    step_dir = Path(directory) / str(step)
    files = {str(p.relative_to(step_dir)): [p.stat().st_size, file_digest(p)] for p in _files(step_dir)}
    tmp = step_dir / (SEAL + ".tmp")
    tmp.write_text(json.dumps({"digest": "xxh3_64", "files": files}, sort_keys=True))
    os.replace(tmp, step_dir / SEAL)


def check_files(directory: str | Path, step: int) -> bool:
    """Compare a step's files with its seal: ``True`` when they match, ``False`` when it has no seal yet.

    Raises:
        Damaged: a file is missing, unreadable, or not the one saved (named), or the seal is unreadable.
    """
    step_dir = Path(directory) / str(step)
    try:
        sealed = json.loads((step_dir / SEAL).read_text())["files"]
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise Damaged(step, f"its {SEAL} cannot be read ({type(err).__name__})") from None
    for name, (size, digest) in sorted(sealed.items()):
        try:
            same_size = (step_dir / name).stat().st_size == size
            same = same_size and file_digest(step_dir / name) == digest
        except FileNotFoundError:
            raise Damaged(step, f"its file {name} is missing") from None
        except OSError as err:
            raise Damaged(step, f"its file {name} cannot be read ({err.strerror})") from None
        if not same:
            what = "its digest" if same_size else "its size"
            raise Damaged(step, f"its file {name} is not the one saved ({what} differs from the seal)")
    return True


def check_values(step: int, recorded: Any, values: Any) -> None:
    """Compare restored ``values`` with the digests saved in the metadata, naming the first array that differs.

    Raises:
        Damaged: no digests recorded, an array missing, added, or not the one saved.
    """
    if not isinstance(recorded, dict) or not recorded:
        raise Damaged(step, "its metadata records no digests of its arrays (not written by this version of pureflax)")
    got = array_digests(values)
    for path in sorted(set(recorded) | set(got)):
        if path not in got or path not in recorded:
            raise Damaged(step, f"{path} is {'missing from its arrays' if path not in got else 'not among the arrays saved'}")
        if list(got[path]) != list(recorded[path]):
            (shape, dtype, _), (was_shape, was_dtype, _) = got[path], recorded[path]
            what = "its values differ" if [shape, dtype] == [was_shape, was_dtype] else f"it reads as {shape} {dtype}"
            raise Damaged(step, f"{path} is not the array saved ({what}; saved {tuple(was_shape)} {was_dtype})")


def verify(directory: str | Path, step: int) -> dict[str, Any]:
    """Check ``step`` is what was saved and return its metadata: its files against the seal, else its arrays' values.

    Raises:
        Damaged: naming the file or the array that differs, or what cannot be read.
    """
    sealed = check_files(directory, step)
    meta = _read_meta(directory, step)
    if not isinstance(meta.get(ARRAYS), dict):
        raise Damaged(step, "its metadata records no digests of its arrays (not written by this version of pureflax)")
    if not sealed:  # committed but killed before its seal: the values themselves
        check_values(step, meta[ARRAYS], _read_state(directory, step))
    return meta


def damage(directory: str | Path, step: int) -> str | None:
    """Why ``step`` cannot be used (see :func:`verify`), or ``None`` when it verifies."""
    try:
        verify(directory, step)
    except Damaged as err:
        return str(err)
    return None


def latest_good_step(directory: str | Path) -> int | None:
    """The newest committed step that verifies (damaged ones skipped, never touched), or ``None``."""
    return next((step for step in reversed(all_steps(directory)) if damage(directory, step) is None), None)


T = TypeVar("T")


def read_verified(directory: str | Path, read: Callable[[Path, int], T], step: int | None = None, *,
                  settle: float = 0.2, tries: int = 20) -> tuple[int, T]:
    """``(step, read(folder, step))`` for the newest committed step ``read`` verifies and reads, or for ``step`` itself.

    Safe beside a run that writes there: each step is read from a snapshot of hard links taken
    in well under a millisecond (``folder``; the step folder itself where links cannot be made),
    so a run with ``--keep`` deleting it meanwhile does not matter; a step that vanishes before
    its snapshot is complete is never called damaged: the steps are listed again.

    Args:
        read: reads step ``step`` from ``folder``; raises :class:`Damaged` for one that does not
            verify. Any other error escapes (another model: :class:`ShapeMismatch`).

    Raises:
        CheckpointError: no checkpoint, the given step missing, or every step damaged (each named).
    """
    directory = Path(directory)
    for _ in range(tries):
        steps = all_steps(directory)
        if step is not None and step not in steps:
            raise CheckpointError(f"step {step}: not a checkpoint in {directory} (steps: {', '.join(map(str, steps)) or 'none'})")
        damaged: list[Damaged] = []
        for candidate in [step] if step is not None else reversed(steps):
            try:
                with _snapshot(directory, candidate) as folder:
                    return candidate, read(folder, candidate)
            except Damaged as err:
                if _vanishing(directory, candidate, settle):
                    break
                damaged.append(err)
        else:
            if not damaged:
                raise CheckpointError(f"{directory} holds no checkpoint")
            if step is not None:
                raise damaged[0]
            raise CheckpointError(f"{directory}: every checkpoint is damaged ({'; '.join(map(str, damaged))})")
    raise CheckpointError(f"{directory}: its checkpoints kept vanishing while being read (a run deleting old ones?); try again")


READING = ".reading-"  # a reader's snapshot of hard links, beside the steps for as long as it reads


@contextlib.contextmanager
def _snapshot(directory: Path, step: int) -> Iterator[Path]:
    """A folder holding ``step`` as hard links to its files (``directory`` itself where links cannot be made)."""
    source = directory / str(step)
    try:
        folder = Path(tempfile.mkdtemp(prefix=READING, dir=directory))  # the same filesystem: links work
    except OSError:  # a run folder this process may only read
        yield directory
        return
    try:
        try:
            for path in sorted(source.rglob("*")):
                copy = folder / str(step) / path.relative_to(source)
                if path.is_dir():
                    copy.mkdir(parents=True, exist_ok=True)
                else:
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    os.link(path, copy)
        except FileNotFoundError:
            raise Damaged(step, "its files vanished while they were read") from None
        except OSError:  # no hard links here (another kind of filesystem)
            shutil.rmtree(folder, ignore_errors=True)
            yield directory
            return
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _vanishing(directory: Path, step: int, settle: float) -> bool:
    """Whether ``step`` is being deleted: its folder gone or going (checked again after ``settle`` seconds)."""
    path = directory / str(step)
    if not (path / "_CHECKPOINT_METADATA").is_file():
        return True
    time.sleep(settle)
    return not (path / "_CHECKPOINT_METADATA").is_file()


def _read_state(directory: str | Path, step: int, abstract: Any = None) -> Any:
    """The saved state item, into ``abstract``'s structure or raw; any failure to read is :class:`Damaged`."""
    handler = ocp.StandardCheckpointHandler()  # the item alone: no manager listing the other steps
    path = (Path(directory) / str(step) / "state").absolute()
    try:
        if abstract is None:  # as saved, onto this process's first device (a multi-process save recorded a mesh over them all)
            here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract = jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=here)
                                              if hasattr(leaf, "shape") else leaf, handler.metadata(path),
                                              is_leaf=lambda leaf: hasattr(leaf, "shape"))
        return handler.restore(path, args=ocp.args.StandardRestore(abstract))
    except Exception as err:  # tensorstore and orbax report unreadable files in many error types
        raise Damaged(step, f"its arrays cannot be read ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]})") from None
    finally:
        handler.close()


def set_aside(directory: str | Path, step: int) -> Path:
    """Rename a damaged step's folder to ``<step>.damaged[-n]`` (kept for inspection, never deleted)."""
    source = Path(directory) / str(step)
    target = source.with_name(f"{step}{SET_ASIDE}")
    n = 1
    while target.exists():
        target, n = source.with_name(f"{step}{SET_ASIDE}-{n}"), n + 1
    source.rename(target)
    return target
