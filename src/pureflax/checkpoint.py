"""Orbax checkpoints of training state: save, restore into a target, keep the latest and the best.

A checkpoint is one orbax step folder holding two items: ``state`` (the functional train
state: ``step``, ``params``, ``opt_state``, saved with ``ocp.args.StandardSave``) and
``meta`` (JSON: where in the run it was taken, metrics, the run's settings, and a digest of
every array saved: path, shape, dtype, xxh3 of the bytes). A step counts only once orbax has
committed it, so a save cut short is never taken as good. Once committed, the step is sealed:
``pureflax-digests.json`` records a digest of every file orbax wrote. Every read verifies
both (:func:`verify`): a step whose files or values differ from what was saved raises
:class:`Damaged` naming the file or array, and the readers take the newest step that verifies.
Any backend's state is saved in the functional form and restores into any other.

Examples:
    >>> import tempfile, jax.numpy as jnp, optax
    >>> from pureflax.state import TrainState
    >>> state = TrainState.create({'w': jnp.ones(2)}, optax.adam(1e-3))
    >>> d = tempfile.mkdtemp()
    >>> save(d, state, meta={'epoch': 0})
    0
    >>> restored, meta = restore_with_meta(d, state)
    >>> restored.params['w'].tolist(), meta['epoch']
    ([1.0, 1.0], 0)
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
from orbax.checkpoint import checkpoint_managers as cm

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


def manager(
    directory: str | Path, *, keep: int | None = None, keep_best: bool = False, async_save: bool = True,
    cleanup: bool = False,
) -> ocp.CheckpointManager:
    """An orbax ``CheckpointManager`` on ``directory`` (created) that retains through orbax's own policies.

    Args:
        directory: the checkpoints folder.
        keep: keep the newest ``keep`` steps (``LatestN``); ``None`` keeps every step.
        keep_best: also keep the step with the lowest ``test_loss`` (``BestN`` over the metrics
            passed to :func:`save_with`; orbax writes them beside the step, so they survive a resume).
        async_save: write in orbax's background thread.
        cleanup: remove the temporary folders of saves a killed process left (orbax's
            ``cleanup_tmp_directories``); only for the one process that writes there.
    """
    policy = None
    if keep is not None:
        policy = cm.LatestN(n=keep)
        if keep_best:
            policy = cm.AnyPreservationPolicy([policy, cm.BestN(get_metric_fn=_test_loss, reverse=True, n=1)])
    options = ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=async_save, preservation_policy=policy,
        best_fn=_test_loss if keep_best else None, best_mode="min", cleanup_tmp_directories=cleanup,
    )
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}  # so metadata reads need no args
    mgr = ocp.CheckpointManager(Path(directory).absolute(), options=options, item_handlers=handlers)
    if cleanup:
        # orbax cleans in a background thread that only its next save awaits (close() does not): a
        # run stopped before its first save would leave the thread to die at interpreter shutdown,
        # printing its traceback. Waiting here also means the leftovers are gone once the run starts.
        mgr._maybe_await_cleanup_tmp_directory()
    return mgr


def _test_loss(metrics: dict[str, Any]) -> float:
    return float(metrics["test_loss"])


def _as_tree(state: Any) -> dict[str, Any]:
    """What is saved: step, params, opt_state, and the model state when the model has one.

    A model without state (the MLP VAE: ``model_state == {}``) saves exactly the three items
    checkpoints held before model state existed, so old and new checkpoints restore alike.
    """
    if not hasattr(state, "model_state") and jax.tree_util.tree_leaves(getattr(state, "batch_stats", None)):
        raise ValueError("this state keeps batch_stats, which a checkpoint holds as model_state: "
                         "save pureflax.compat.to_functional(state)")
    tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    if jax.tree_util.tree_leaves(getattr(state, "model_state", {})):
        tree["model_state"] = state.model_state
    return tree


def save_with(mgr: ocp.CheckpointManager, state: Any, meta: dict[str, Any] | None = None, test_loss: float | None = None) -> int:
    """Start saving ``state`` (and ``meta``) at its step with an open manager; orbax may finish in the background.

    ``test_loss`` goes to orbax as the step's metrics, which its ``BestN`` policy ranks.
    """
    step, tree = int(host(state.step)), _as_tree(state)
    meta = {**(meta or {}), ARRAYS: array_digests(tree)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))
    mgr.save(step, args=args, force=True, metrics=None if test_loss is None else {"test_loss": test_loss})
    return step


# orbax's metadata files and the OCDBT manifest beside the arrays: well under 1 MB.
METADATA_BYTES = 1 << 20


def bytes_needed(state: Any) -> int:
    """About what a checkpoint of ``state`` takes on disk: its arrays' bytes plus orbax's metadata (an upper bound)."""
    return METADATA_BYTES + sum(np.size(leaf) * np.dtype(getattr(leaf, "dtype", type(leaf))).itemsize
                                for leaf in jax.tree_util.tree_leaves(state))


def save(directory: str | Path, state: Any, *, meta: dict[str, Any] | None = None, keep: int | None = None) -> int:
    """Save ``state`` (anything with ``step``, ``params``, ``opt_state``) at its step and wait for it.

    Returns:
        The step it was saved under.
    """
    with manager(directory, keep=keep) as mgr:
        step = save_with(mgr, state, meta)
        mgr.wait_until_finished()
    seal(directory, step)
    return step


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


def saved_leaves(directory: str | Path, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{'params/encoder/Dense_0/kernel': ((784, 256), 'float32'), ...}`` as saved, from orbax's metadata.

    Raises:
        Damaged: the metadata cannot be read (the step's files are damaged).
    """
    handler = ocp.StandardCheckpointHandler()
    try:
        tree = handler.metadata((Path(directory) / str(step) / "state").absolute())
    except Exception as err:  # orbax raises various errors for missing or damaged files
        raise Damaged(step, f"its array index cannot be read ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]})") from None
    finally:
        handler.close()
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {path_str(p): (tuple(leaf.shape), str(np.dtype(leaf.dtype))) for p, leaf in leaves if hasattr(leaf, "shape")}


def _leaves(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    def describe(x: Any) -> tuple[tuple[int, ...], str]:
        shape = x.shape if hasattr(x, "shape") else np.shape(x)  # a ShapeDtypeStruct too
        return tuple(shape), str(np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype))

    return {path_str(p): describe(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def check_compatible(directory: str | Path, step: int, target: Any) -> None:
    """Raise :class:`ShapeMismatch` naming the first path whose saved and target shape or dtype differ.

    Params are checked first (another model), then the optimiser state (another optimiser), so
    the message says which of the two the run being restored differs in.
    """
    saved = saved_leaves(directory, step)
    parts = (("params", "another model"), ("opt_state", "another optimiser configuration"), ("step", "another kind of state"),
             ("model_state", "another model (its BatchNorm statistics)"))
    for part, hint in parts:
        if hasattr(target, part) or part in ("params", "opt_state", "step"):
            check_part(saved, part, getattr(target, part, {}), step, hint)


def check_part(saved: dict[str, tuple[tuple[int, ...], str]], part: str, tree: Any, step: int, hint: str) -> None:
    """Raise :class:`ShapeMismatch` where ``saved``'s arrays under ``part`` and ``tree`` differ in path, shape or dtype."""
    wanted = _leaves({part: tree})
    have = {p: v for p, v in saved.items() if p == part or p.startswith(part + "/")}
    for path, (shape, dtype) in wanted.items():
        if path not in have:
            raise ShapeMismatch(f"checkpoint step {step} has no {path}: it was written for {hint}")
        if have[path][0] != shape:
            raise ShapeMismatch(
                f"checkpoint step {step}: {path} was saved with shape {have[path][0]} but this model has {shape} "
                "(resume with the settings the run was started with)"
            )
        if have[path][1] != dtype:
            raise ShapeMismatch(f"checkpoint step {step}: {path} was saved as {have[path][1]} but this run has {dtype}")
    extra = sorted(p for p in have if p not in wanted)
    if extra:
        raise ShapeMismatch(f"checkpoint step {step} has {part} this run lacks ({', '.join(extra[:3])}): it was written for {hint}")


def restore_with_meta(directory: str | Path, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restore into ``target``'s structure (a functional TrainState), verified, and return it with the metadata.

    Raises:
        FileNotFoundError: no committed checkpoint in ``directory``.
        ShapeMismatch: the saved params do not fit ``target``.
        Damaged: the step's files or values are not what was saved (the file or array named).
    """
    step = latest_step(directory) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    meta = verify(directory, step)
    check_compatible(directory, step, target)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _as_tree(target))
    tree = _read_state(directory, step, abstract)
    check_values(step, meta[ARRAYS], tree)
    return target._replace(**tree), {key: value for key, value in meta.items() if key != ARRAYS}


def restore(directory: str | Path, target: Any, step: int | None = None) -> Any:
    """Restore into ``target``'s structure: ``target`` with the saved arrays (the latest step by default)."""
    return restore_with_meta(directory, target, step)[0]


def set_aside(directory: str | Path, step: int) -> Path:
    """Rename a damaged step's folder to ``<step>.damaged[-n]`` (kept for inspection, never deleted)."""
    source = Path(directory) / str(step)
    target = source.with_name(f"{step}{SET_ASIDE}")
    n = 1
    while target.exists():
        target, n = source.with_name(f"{step}{SET_ASIDE}-{n}"), n + 1
    source.rename(target)
    return target


PARAM_FILES = (".safetensors", ".npz")


def write_params(params: Any, path: str | Path) -> int:
    """Write a params tree to ``.safetensors`` or ``.npz``, flat, keyed by path (``encoder/Dense_0/kernel``).

    Returns the number of arrays written. :func:`read_params` reads it back as the nested tree.
    """
    path = Path(path)
    flat = {path_str(p): np.ascontiguousarray(leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
    if path.suffix == ".npz":
        with path.open("wb") as f:  # np.savez would append .npz to a name without it
            np.savez(f, **flat)
    elif path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(flat, str(path))
    else:
        raise ValueError(f"{path}: params are written as {' or '.join(PARAM_FILES)}")
    return len(flat)


def read_params(path: str | Path) -> dict[str, Any]:
    """The nested params tree of a file written by :func:`write_params` (or any flat file keyed by ``a/b/c``).

    Examples:
        >>> import tempfile, numpy as np
        >>> f = tempfile.mkdtemp() + '/p.npz'
        >>> write_params({'dense': {'kernel': np.ones((2, 3), np.float32)}}, f)
        1
        >>> read_params(f)['dense']['kernel'].shape
        (2, 3)
    """
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            flat = {key: f[key] for key in f.files}
    elif path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        flat = load_file(str(path))
    else:
        raise ValueError(f"{path}: params are read from {' or '.join(PARAM_FILES)}")
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def best_step(directory: str | Path) -> int | None:
    """The committed step with the lowest ``test_loss`` in its metadata, or ``None`` (unreadable ones skipped)."""
    scored = []
    for step in all_steps(directory):
        try:
            loss = read_meta(directory, step).get("test_loss")
        except Damaged:
            continue
        if isinstance(loss, (int, float)):
            scored.append((loss, step))
    return min(scored)[1] if scored else None


def restore_raw(directory: str | Path, step: int | None = None) -> dict[str, Any]:
    """The saved state as orbax reads it without a target, verified: ``{'step', 'params', 'opt_state'}`` of arrays.

    For inspecting and exporting; to train on, restore into a target with :func:`restore`.

    Raises:
        Damaged: the step's files or values are not what was saved.
    """
    step = latest_step(directory) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    meta = verify(directory, step)
    tree = _read_state(directory, step)
    check_values(step, meta[ARRAYS], tree)
    return tree
