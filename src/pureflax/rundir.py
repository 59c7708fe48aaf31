"""The run folder (``--out``): the one owner of everything a run writes there.

A run folder holds ``metrics.jsonl`` (one JSON row per log line, then the final row),
``checkpoints/`` (orbax steps, each with the train state, the run's position and its
settings), the pictures and ``.lock``. :class:`RunFolder` is the only code that writes
there: it takes an OS lock for the whole run, checks the settings of a resumed run against
the ones recorded, restores the latest good checkpoint, records each chunk of steps,
saves (orbax keeps the newest and the best), turns SIGINT/SIGTERM into a saved stop, and
writes the final row.

Where a run is (:mod:`pureflax.progress`), the settings it records (:mod:`pureflax.settings`),
its log (:mod:`pureflax.runlog`) and :class:`StopFlag` (:mod:`pureflax.stopflag`) have modules
of their own; this one exports the names of theirs that its callers use.

Examples:
    >>> out = Path(tempfile.mkdtemp())
    >>> check(out), held(out)
    (None, [])
    >>> _ = (out / "metrics.jsonl").write_text('{"loss": 1.0}')
    >>> check(out)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    pureflax.rundir.RunError: `out` ... already holds a run (metrics.jsonl); pass `overwrite`, `resume`, or choose another `out`
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pureflax import checkpoint, distributed, report
from pureflax.progress import Chunk, Plan, Position, advance, chunks, end_of, epoch_means, epoch_of  # noqa: F401
from pureflax.runlog import dumps, keep_damaged, read_log, rows_up_to, write_rows
from pureflax.settings import compare_settings, settings_of  # noqa: F401
from pureflax.stopflag import StopFlag

PICTURES = ("samples.png", "reconstructions.png", "loss.png")
RUN_FILES = ("metrics.jsonl", *PICTURES, "checkpoints")
LOCK = ".lock"


class RunError(ValueError):
    """A run folder problem the user can fix (exit status 2): the message says how."""


class RunLocked(RunError):
    """Another live process holds the folder's lock."""


class ResumeError(RunError):
    """``--resume`` cannot continue this run: the message says why."""


class SaveError(RuntimeError):
    """Writing into the run folder failed (disk full, I/O error): names the step and the folder."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: the run saved a checkpoint at ``step`` and stopped (``saved``), or
    stopped before taking a step, leaving the folder as it was (a fresh run's as not started)."""

    def __init__(self, signum: int, step: int, saved: bool = True):
        name = signal.Signals(signum).name
        if saved:
            what = f"{name} at step {step}; saved a checkpoint there"
        else:
            what = f"{name} before step {step + 1}; " + ("nothing was written" if step == 0 else f"the run is as it was at step {step}")
        super().__init__(what)
        self.signum, self.step, self.saved = signum, step, saved

# --- the folder -----------------------------------------------------------------------------


def check(out: Path, *, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse, before any work, an ``out`` that cannot take this run; changes nothing.

    Args:
        out: the run folder (``--out``).
        overwrite: ``--overwrite`` was given.
        resume: ``--resume`` was given.

    Raises:
        RunError: ``out`` is a file, holds a run (without ``overwrite``/``resume``), holds no
            checkpoints (with ``resume``), or cannot be written;
        RunLocked: another run holds it.
    """
    out = Path(out)
    _check_kind(out)
    if out.is_dir():
        with _locked(out):  # a live run's folder is refused first, whatever else it holds
            pass
    _check_contents(out, overwrite, resume)
    parent = next((p for p in [out, *out.parents] if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise RunError(f"`out` {out} is not writable ({parent} is not a writable folder)")


def _check_kind(out: Path) -> None:
    if out.is_symlink() and not out.exists():
        raise RunError(f"`out` {out} is a symlink to {os.readlink(out)}, which does not exist; create that folder or choose another `out`")
    if out.exists() and not out.is_dir():
        raise RunError(f"`out` {out} exists and is not a directory")


def held(out: Path) -> list[str]:
    """The run files ``out`` holds; empty for a folder whose run has not started (an empty log, no checkpoint files)."""
    def holds(name: str) -> bool:
        path = out / name
        if name == "metrics.jsonl" and path.is_file():
            return path.stat().st_size > 0
        if name == "checkpoints" and path.is_dir():
            return any(path.iterdir())
        return path.exists() or path.is_symlink()

    return [name for name in RUN_FILES if holds(name)]


def _check_contents(out: Path, overwrite: bool, resume: bool) -> None:
    _check_kind(out)
    if resume and overwrite:
        raise RunError("`resume` continues the run in `out` and `overwrite` replaces it: choose one")
    if resume:
        _check_resumable(out)
    existing = held(out) if not resume else []
    if existing and not overwrite:
        raise RunError(f"`out` {out} already holds a run ({', '.join(existing)}); pass `overwrite`, `resume`, or choose another `out`")


def _check_resumable(out: Path) -> None:
    ckpt, log = out / "checkpoints", out / "metrics.jsonl"
    if not ckpt.is_dir():
        raise RunError(f"`resume`: {out} holds no checkpoints to resume from")
    steps = checkpoint.all_steps(ckpt)
    if log.is_dir():
        raise RunError(f"`resume`: {log} is a folder, not the run's log; move it away, then resume")
    if steps and not log.is_file():
        raise RunError(f"`resume`: {log} is missing, though the checkpoints reach step {steps[-1]}; "
                       "put the log back and resume, or start again with `overwrite`")


REPLACED = ".replaced-"  # the prefix of the folder an overwritten run's files wait in


def move_aside(out: Path) -> list[Path]:
    """Move the run in ``out`` aside for ``--overwrite``: renames only, checked first, undone if one fails.

    The run's files go into ``out/.replaced-*/``. A ``checkpoints/`` that is a symlink (to a
    bigger disk) is followed and kept: its steps go into ``.replaced-*/`` beside them, and
    anything else there is left alone. The folders are deleted by :func:`_discard` once the new
    run is set up, so an overwrite stopped half way has lost nothing it had not replaced.

    Raises:
        RunError: a symlinked ``checkpoints/`` that leads nowhere, or a folder that cannot be written.
    """
    ckpt = out / "checkpoints"
    follow = ckpt.is_symlink()
    if follow and not ckpt.is_dir():
        raise RunError(f"`overwrite`: {ckpt} is a symlink to {os.readlink(ckpt)}, which is not a folder; "
                       "fix or remove the link, then run again")
    for folder in [out] + ([ckpt.resolve()] if follow else []):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise RunError(f"`overwrite`: {folder} is not writable, so the run in it cannot be replaced")
    moves = [(out / name, name) for name in RUN_FILES if (name != "checkpoints" or not follow) and
             ((out / name).exists() or (out / name).is_symlink())]
    trash = [Path(tempfile.mkdtemp(prefix=REPLACED, dir=out))]
    if follow:
        trash.append(Path(tempfile.mkdtemp(prefix=REPLACED, dir=ckpt.resolve())))
        moves += [(ckpt / name, name) for name in checkpoint.pureflax_names(ckpt)]
    done: list[tuple[Path, Path]] = []
    try:
        for source, name in moves:
            target = (trash[1] if source.parent == ckpt and follow else trash[0]) / name
            source.rename(target)
            done.append((source, target))
    except OSError as err:
        for source, target in reversed(done):
            target.rename(source)
        _discard(trash)
        raise RunError(f"`overwrite`: cannot move {source} aside ({err.strerror or err}); nothing was changed") from None
    return trash


def _leftovers(out: Path) -> list[Path]:
    """``.replaced-*`` folders of an overwrite whose process died before deleting them."""
    places = [out] + ([(out / "checkpoints").resolve()] if (out / "checkpoints").is_dir() else [])
    return [path for place in places for path in place.glob(REPLACED + "*") if path.is_dir()]


def _discard(folders: list[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``out/.lock``; the kernel drops it when the process dies, so a kill leaves no stale lock."""
    try:
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except IsADirectoryError:
        raise RunError(f"`out` {out}: {LOCK} is a folder, where pureflax keeps its lock file; remove it (rmdir {out / LOCK}), "
                       "then run again") from None
    except OSError as err:
        raise RunError(f"`out` {out} is not writable: {err.strerror or err}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(
                f"`out` {out} is in use by another run (pid {lock_holder(fd)}); wait for it to end, or choose another `out`"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def lock_holder(fd: int) -> str:
    """The pid holding the ``flock`` on ``fd``'s file, as the kernel lists it in ``/proc/locks`` ("unknown" elsewhere)."""
    st = os.fstat(fd)
    ident, inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}", f":{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "unknown"
    # "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"; a process waiting for it is "1: -> FLOCK ..."
    held_here = [parts for parts in map(str.split, lines) if len(parts) >= 6 and parts[1] == "FLOCK"]
    for match in (lambda dev: dev == ident, lambda dev: dev.endswith(inode)):  # overlay filesystems report another device
        pids = [parts[4] for parts in held_here if match(parts[5])]
        if pids:
            return pids[0]
    return "unknown"


def _lines(numbers: list[int]) -> str:
    """``line 2`` or ``lines 2, 5, ...``: the line numbers a log message names (the first five, then how many more)."""
    shown = ", ".join(map(str, numbers[:5])) + (f" and {len(numbers) - 5} more" if len(numbers) > 5 else "")
    return f"line{'s' if len(numbers) > 1 else ''} {shown}"


@contextlib.contextmanager
def _writing(what: str, step: int, out: Path) -> Iterator[None]:
    """Turn an I/O failure into one :class:`SaveError` that names the step and the folder."""
    try:
        yield
    except (RunError, SaveError):
        raise
    except Exception as err:  # orbax and tensorstore report a full disk in several error types
        reason = os.strerror(errno.ENOSPC) if "RESOURCE_EXHAUSTED" in str(err) else (getattr(err, "strerror", None) or str(err))
        raise SaveError(f"could not write {what} at step {step} in {out}: {reason.splitlines()[0][:200]}") from err


class RunFolder:
    """An open run folder: the lock, ``metrics.jsonl``, the orbax manager, the progress bar and signals.

    Use as a context manager; :meth:`start` gives the state to train from, :meth:`record`
    each chunk, :meth:`save` checkpoints, :meth:`finish` the final row.
    """

    def __init__(self, out: str | Path, settings: dict[str, Any], plan: Plan, *, resume: bool = False,
                 overwrite: bool = False, keep: int | None = None, keep_best: bool = False,
                 progress: bool | None = None, log: Callable[[str], None] = print, warn: Callable[[str], None] | None = None,
                 stop: StopFlag | None = None, echo: bool = True):
        self.out, self.ckpt_dir = Path(out), Path(out) / "checkpoints"
        self.echo = echo  # print each log line (a sweep prints one line for all its members instead)
        self.primary = distributed.primary()  # of several processes, only the first writes the folder; all take part in saves
        if not self.primary:  # its messages are the primary's to print
            self.log, self._warn = (lambda message: None), (lambda message: None)
        self.settings, self.plan, self.resume, self.overwrite = settings, plan, resume, overwrite
        self.keep, self.keep_best, self.progress, self.log = keep, keep_best, progress, log
        self._warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
        self.stop = stop
        self.rows: list[dict[str, Any]] = []
        self._replaced: list[Path] = []  # an overwritten run's files, deleted once the new run is set up
        self.pending: int | None = None  # a save orbax may still be writing
        self.saved: int | None = None  # the newest committed step of this run
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> RunFolder:
        if not self.primary:  # the primary checks, locks and sets the folder up; the others wait for it
            distributed.barrier(f"pureflax-set-up {self.out}")
            self.stop = self._stack.enter_context(self.stop or StopFlag())
            return self
        _check_contents(self.out, self.overwrite, self.resume)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunError(f"`out` {self.out} is not writable: {err.strerror or err}") from None
        self._stack.enter_context(_locked(self.out))
        _check_contents(self.out, self.overwrite, self.resume)  # again, now that no other run can change it
        _discard(_leftovers(self.out))  # an overwrite killed before it could delete the run it replaced
        if self.overwrite and not self.resume:
            self._replaced = move_aside(self.out)
        distributed.barrier(f"pureflax-set-up {self.out}")
        self.stop = self._stack.enter_context(self.stop or StopFlag())
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    # -- resume

    def start(self, like: Any, to_functional: Callable, from_functional: Callable) -> tuple[Any, Position]:
        """The state to train from (``like`` itself, or the latest good checkpoint restored into its form) and its position."""
        position, state, notes = Position.start(), like, []
        if self.resume:
            # the primary sets damaged checkpoints aside first; the others then read the folder it leaves
            if not self.primary:
                distributed.barrier(f"pureflax-resume-point {self.out}")
            try:
                functional, meta, notes = self._resume_point(to_functional(like))
            finally:  # also when it refuses: the others then find the same reason themselves
                if self.primary:
                    distributed.barrier(f"pureflax-resume-point {self.out}")
            state, position = from_functional(functional, like), Position(*meta["position"])
            self._check_length(position.step)
            self.saved = position.step
        path = self.out / "metrics.jsonl"
        with _writing("metrics.jsonl", position.step, self.out):
            log = read_log(path)
            if log.damaged:
                kept = keep_damaged(path, log.damaged)
                self.log(f"metrics.jsonl: {_lines([n for n, _ in log.damaged])} cannot be read; "
                         f"kept in {kept.name} under their line numbers")
            if log.cut is not None:
                shown = log.cut[:60].decode(errors="replace") + ("..." if len(log.cut) > 60 else "")
                self.log(f"metrics.jsonl: dropped its last line, cut short by the stop ({len(log.cut)} bytes: {shown!r})")
            self.rows = rows_up_to(log.rows, position.step)
            later = [row for row in log.rows if row not in self.rows]
            if later and self.primary:
                self.log(f"metrics.jsonl: {len(later)} row(s) logged after step {position.step} are written again from there")
            if notes:
                self.rows.append({"event": "resume", "global_step": position.step, "changed": notes})
            if self.primary:
                write_rows(path, self.rows)
                self._file = self._stack.enter_context(open(path, "a"))
            self._manager = self._stack.enter_context(
                checkpoint.manager(self.ckpt_dir, keep=self.keep, keep_best=self.keep_best, cleanup=self.primary))
        distributed.barrier(f"pureflax-started {self.out}")
        self._stack.callback(self._settle)  # registered after the manager: runs before it closes
        _discard(self._replaced)  # the new run is set up: the one it replaces goes
        disable = None if self.progress is None and self.primary else not (self.progress and self.primary)
        self.bar = self._stack.enter_context(
            tqdm(total=self.plan.total, initial=position.step, disable=disable, unit="step", dynamic_ncols=True)
        )
        if self.resume and self.primary:
            self.log(f"resuming from step {position.step} of {self.plan.total}")
        return state, position

    def _resume_point(self, like: Any) -> tuple[Any, dict[str, Any], list[str]]:
        """The newest checkpoint that verifies and restores; a damaged one is set aside (renamed, never deleted).

        Raises:
            ResumeError: the checkpoint is sound but the settings differ, or none restores.
            checkpoint.ShapeMismatch: the checkpoint is sound but for another model or optimiser.
        """
        for step in checkpoint.stray_steps(self.ckpt_dir):
            self._set_aside(step, "it holds no orbax checkpoint")
        for step in reversed(checkpoint.all_steps(self.ckpt_dir)):
            try:
                meta = checkpoint.verify(self.ckpt_dir, step)
                if not meta.get("position") or meta.get("settings") is None:  # a run writes both into every checkpoint
                    raise checkpoint.Damaged(step, f"its metadata records no run {'position' if not meta.get('position') else 'settings'}")
                notes = self._check_settings(meta["settings"])
                functional, meta = checkpoint.restore_with_meta(self.ckpt_dir, like, step)
            except checkpoint.Damaged as err:  # a sound checkpoint of another configuration raises otherwise, and stays
                self._set_aside(step, err.why)
                continue
            if not (self.ckpt_dir / str(step) / checkpoint.SEAL).exists():
                checkpoint.seal(self.ckpt_dir, step)  # committed, then killed before its seal; its values verified
            return functional, meta, notes
        cut = checkpoint.temporary(self.ckpt_dir)
        why = (f"the save of step {cut[0].split('.')[0]} was cut short, so no step was committed" if cut
               else "none verifies" if checkpoint.set_aside_steps(self.ckpt_dir) else "it holds none")
        raise ResumeError(f"`resume`: no checkpoint in {self.ckpt_dir} can be restored ({why}); start again with `overwrite`")

    def _set_aside(self, step: int, why: str) -> None:
        if not self.primary:
            return
        moved = checkpoint.set_aside(self.ckpt_dir, step)
        self.log(f"checkpoint step {step} is damaged ({why}); set aside as {moved.name}")

    def _check_settings(self, saved: dict[str, Any]) -> list[str]:
        """Refuse a change that alters what the checkpoint's state means; log (and return) the accepted ones."""
        refused, notes = compare_settings(saved, self.settings)
        if refused:
            raise ResumeError(refused[0])
        for note in notes:
            self.log(f"resume: {note}")
        return notes

    def _check_length(self, step: int) -> None:
        if step > self.plan.total:
            raise ResumeError(
                f"`resume`: the run in {self.out} has taken {step} steps, more than the {self.plan.total} these settings ask for; "
                "pass a larger `epochs` or `max_steps`"
            )
        finals = [row for row in read_log(self.out / "metrics.jsonl").rows if "test_loss" in row and row.get("steps") == step]
        if step == self.plan.total and finals:
            raise ResumeError(
                f"`resume`: the run in {self.out} is complete ({step} steps, test loss {finals[-1]['test_loss']:.4f}); "
                "pass a larger `epochs` or `max_steps` to train further"
            )

    # -- each chunk

    def record(self, pos: Position, metrics: np.ndarray) -> Position:
        """Advance ``pos`` by a chunk's metrics; write its log row (file, terminal, bar)."""
        pos, row = advance(pos, metrics, self.plan)
        if row is not None:
            self.emit(row)
        if row is not None and self.echo and self.primary:
            self.bar.write(report.format_line(row["epoch"], row["step"], row["loss"], row["mse"], row["kl"]))
        self.bar.update(len(metrics))
        return pos

    def emit(self, row: dict[str, Any]) -> None:
        """Write one row to ``metrics.jsonl`` (only the primary process writes; the others keep it)."""
        if not self.primary:
            self.rows.append(row)
            return
        with _writing("metrics.jsonl", row.get("global_step", row.get("steps", 0)), self.out):
            self._file.write(dumps(row) + "\n")
            self._file.flush()  # a crash keeps every line already logged
        self.rows.append(row)

    def save(self, state: Any, pos: Position, test_loss: float | None = None) -> int:
        """Start saving the functional ``state`` at ``pos``; orbax writes it in the background.

        orbax copies the arrays to the host before this returns, so the next chunk may donate
        the state's buffers meanwhile.
        """
        self.wait()
        need, free = checkpoint.bytes_needed(state), shutil.disk_usage(self.ckpt_dir if self.ckpt_dir.exists() else self.out).free
        if need > free:  # refused before a byte is written: orbax would fail half way, in its own threads
            raise SaveError(f"could not write checkpoint at step {pos.step} in {self.ckpt_dir}: "
                            f"it needs about {need / 1e6:.1f} MB and {free / 1e6:.1f} MB are free")
        meta = {"position": list(pos), "epoch": epoch_of(pos.step, self.plan.steps_per_epoch), "test_loss": test_loss,
                "backend": self.settings.get("backend"), "seed": self.settings.get("seed"), "settings": self.settings,
                "plan": self.plan._asdict()}
        with _writing("checkpoint", pos.step, self.ckpt_dir):
            self.pending = checkpoint.save_with(self._manager, state, meta, test_loss)
        return self.pending

    def wait(self) -> None:
        """Return once the pending save has committed; raise :class:`SaveError` at once if it failed."""
        if self.pending is None:
            return
        step, self.pending = self.pending, None
        with _writing("checkpoint", step, self.ckpt_dir):
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
            if self.primary:
                checkpoint.seal(self.ckpt_dir, step)
        self.saved = step

    def _settle(self) -> None:
        """On any exit: let a save already under way commit, and keep its failure from hiding the first error."""
        try:
            self.wait()
        except SaveError as err:
            self.log(f"train.py: {err}")

    @property
    def stop_signal(self) -> int | None:
        """The SIGINT or SIGTERM that arrived during the run, or ``None``: the loop saves and stops on one."""
        return self.stop.signum

    def writing(self, what: str, step: int) -> contextlib.AbstractContextManager[None]:
        """A block whose I/O failure becomes a :class:`SaveError` naming ``what``, the step and the folder."""
        return _writing(what, step, self.out)

    def logged(self) -> list[dict[str, Any]]:
        """The log rows of the run so far (no events, no final row)."""
        return [row for row in self.rows if "loss" in row and "step" in row]

    def warn(self, message: str, step: int) -> None:
        """A setting that does less than asked: one line on stderr and a ``warning`` row in the log (once per run)."""
        self._warn(message)
        if not any(row.get("warning") == message for row in self.rows):
            self.emit({"event": "warning", "global_step": step, "warning": message})

    def finish(self, final: dict[str, Any]) -> None:
        """Write the final row: the run is complete."""
        self.emit(final)
