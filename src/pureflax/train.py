"""The training run: data on the device, the shared step, logs, pictures and checkpoints.

``fit(config, mnist, out)`` trains the VAE as the tutorial does (same defaults, the same
log line every 100 steps) and writes into ``out``: ``metrics.jsonl``, ``samples.png``,
``reconstructions.png``, ``loss.png`` and ``checkpoints/``.

A run can be stopped any way at all and resumed with ``fit(..., resume=True)``: a
checkpoint records the position in the run (step, epoch, the partial log window), the
data order and every key derive from the seed and the step, so the resumed run ends
where the uninterrupted one ends. SIGINT/SIGTERM save a checkpoint before stopping;
a non-finite loss stops the run before anything non-finite is saved.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

from pureflax import checkpoint, loop, optim, report, step as step_lib, vae
from pureflax.backend import Backend, functional_backend
from pureflax.data import MNIST, Split

RUN_FILES = ("metrics.jsonl", "samples.png", "reconstructions.png", "loss.png", "checkpoints")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A run's settings; the defaults are the tutorial's."""

    epochs: int = 10
    max_steps: int | None = None  # stop after this many steps in all (None: the epochs)
    batch_size: int = 16
    kl_weight: float = 0.5
    seed: int = 0xFFFF
    log_every: int = 100
    eval_batch_size: int = 1000
    native_init: bool = False  # each library's own initialiser instead of the functional (Flax) one
    fuse: bool = True  # run each chunk of steps (up to the next log line) as one jitted lax.scan
    devices: int = 1  # data parallel over this many local devices
    ckpt_every: int | None = None  # also checkpoint every this many steps (None: only at the end)
    keep: int | None = None  # keep the newest this many checkpoints (None: all)
    keep_best: bool = False  # also keep the checkpoint with the best test loss
    model: vae.VAEConfig = vae.VAEConfig()
    optim: optim.OptimConfig = optim.OptimConfig()

    def __post_init__(self):
        for name in ("epochs", "batch_size", "log_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max-steps must be >= 1, got {self.max_steps!r}")
        if self.kl_weight < 0:
            raise ValueError(f"kl-weight must be >= 0, got {self.kl_weight!r}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed!r}")
        for name in ("ckpt_every", "keep"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)!r}")
        if self.keep_best and self.keep is None:
            raise ValueError("--keep-best needs --keep N (with every checkpoint kept, the best is kept anyway)")
        if self.devices < 1:
            raise ValueError(f"devices must be >= 1, got {self.devices!r}")
        if self.batch_size % self.devices:
            raise ValueError(f"--batch-size {self.batch_size} does not split evenly over --devices {self.devices}")

    def steps_per_epoch(self, num_train: int) -> int:
        """Full batches per epoch (the last partial batch is dropped, as the tutorial's loader does)."""
        steps = num_train // self.batch_size
        if steps < 1:
            raise ValueError(f"batch-size {self.batch_size} is larger than the {num_train} training images")
        return steps

    def total_steps(self, num_train: int) -> int:
        total = self.epochs * self.steps_per_epoch(num_train)
        return total if self.max_steps is None else min(total, self.max_steps)


class Keys(NamedTuple):
    """The run's keys, all derived from the seed."""

    model: jax.Array  # the params' init key (the tutorial's model_key)
    train: jax.Array  # folded with the step number inside the train step
    data: jax.Array  # folded with the epoch number for the shuffle
    eval: jax.Array  # folded with the test batch index
    sample: jax.Array  # for the sample grid


def make_keys(seed: int) -> Keys:
    return Keys(*jax.random.split(jax.random.PRNGKey(seed), 5))


class RunResult(NamedTuple):
    state: Any  # the backend's own state (pureflax or Flax TrainState)
    log: list[dict[str, Any]]  # one dict per logged line
    final: dict[str, Any]  # test metrics, final-epoch means, seconds


def enable_compilation_cache(directory: str | Path | None = None) -> Path:
    """Turn on JAX's persistent compilation cache, so a second run starts without recompiling.

    Args:
        directory: where compiled programs are kept; default ``$JAX_COMPILATION_CACHE_DIR``
            or ``<pureflax cache>/jax`` (``~/.cache/pureflax/jax``).

    Returns:
        The cache directory in use.
    """
    from pureflax.data import default_cache_dir

    path = Path(directory or os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_cache_dir() / "jax")
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return path


def check_out_dir(out: Path, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse an ``out`` that holds a previous run (unless ``overwrite`` or ``resume``) or cannot be written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: choose one")
    if resume and not (out / "checkpoints").is_dir():
        raise ValueError(f"--resume: {out} holds no checkpoints to resume from")
    existing = [name for name in RUN_FILES if (out / name).exists()] if not resume else []
    if existing and not overwrite:
        raise ValueError(f"--out {out} already holds a run ({', '.join(existing)}); pass --overwrite or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--out {out} is not writable: {err.strerror or err}") from None
    for name in existing:  # --overwrite: clear the old run's files, nothing else in out
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


class NonFiniteLoss(RuntimeError):
    """The loss went NaN or infinite: names the step and the term."""

    def __init__(self, step: int, term: str, value: float):
        super().__init__(f"step {step}: {term} is {value} (non-finite); stopped before saving anything non-finite")
        self.step, self.term = step, term


class ResumeError(ValueError):
    """``--resume`` cannot continue this run: the message says why."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: the run saved a checkpoint at ``step`` and stopped."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"{signal.Signals(signum).name} at step {step}; saved a checkpoint there")
        self.signum, self.step = signum, step


class Position(NamedTuple):
    """Where a run is, beyond the state: what a checkpoint must carry to resume exactly."""

    step: int  # steps taken in all
    window: list[list[float]]  # per-step (loss, mse, kl) since the last log line of this epoch
    epoch_sums: list[float]  # (loss, mse, kl) summed over this epoch's steps so far
    epoch_count: int  # steps of this epoch so far


def to_device(split: Split, placement: loop.Placement) -> step_lib.Batch:
    """Put a split on the device(s) once, as uint8 pixels and int32 labels (converted per batch)."""
    return placement.replicate(step_lib.Batch(np.asarray(split.images, np.uint8), np.asarray(split.labels, np.int32)))


def build(config: TrainConfig, backend: Backend, total_steps: int, key: jax.Array):
    """The backend's fresh state, its optimiser and THE train step built for it.

    Returns:
        ``(state, tx, loss_fn, train_step)``.
    """
    params = backend.init_params(key, config.native_init)
    tx = optim.make_optimizer(config.optim, total_steps, params, backend.param_names(params))
    state = backend.create_state(params, tx)
    loss_fn = step_lib.make_loss_fn(backend.apply, kl_weight=config.kl_weight, num_classes=config.model.num_classes)
    train_step = step_lib.make_train_step(loss_fn, tx, apply_gradients=backend.apply_gradients(tx))
    return state, tx, loss_fn, train_step


def save_state(directory: str | Path, state: Any, backend: Backend) -> int:
    """Checkpoint any backend's state in the functional form, so every backend can restore it."""
    return checkpoint.save(directory, backend.to_functional(state))


def restore_state(directory: str | Path, like: Any, backend: Backend, step: int | None = None) -> Any:
    """Restore a checkpoint written by any backend into ``like``, a state of ``backend``'s form."""
    functional = checkpoint.restore(directory, backend.to_functional(like), step)
    return backend.from_functional(functional, like)


def save_state(directory: str | Path, state: Any, backend: Backend) -> int:
    """Checkpoint any backend's state in the functional form, so every backend can restore it."""
    return checkpoint.save(directory, backend.to_functional(state))


def restore_state(directory: str | Path, like: Any, backend: Backend, step: int | None = None) -> Any:
    """Restore a checkpoint written by any backend into ``like``, a state of ``backend``'s form."""
    functional = checkpoint.restore(directory, backend.to_functional(like), step)
    return backend.from_functional(functional, like)


def resume_point(directory: Path, like: Any, backend: Backend, log) -> tuple[Any, dict]:
    """The latest checkpoint that restores, newest first; damaged ones are set aside (renamed).

    Raises:
        checkpoint.ShapeMismatch: the checkpoint is sound but for another model.
        ResumeError: no checkpoint restores.
    """
    for step in reversed(checkpoint.all_steps(directory)):
        try:
            functional, meta = checkpoint.restore_with_meta(directory, backend.to_functional(like), step)
        except checkpoint.ShapeMismatch:
            raise
        except Exception as err:  # truncated or missing files surface as many error types
            moved = checkpoint.set_aside(directory, step)
            log(f"checkpoint step {step} is damaged ({type(err).__name__}: {str(err)[:200]}); set aside as {moved.name}")
            continue
        if not meta.get("position"):
            raise ResumeError(f"checkpoint step {step} records no run position: it was not written by a pureflax run")
        return backend.from_functional(functional, like), meta
    raise ResumeError(f"--resume: no checkpoint in {directory} could be restored")


def reopen_log(path: Path, up_to_step: int) -> list[dict]:
    """Keep the log lines up to ``up_to_step`` (a resumed run writes the rest again)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    rows = [row for row in rows if row.get("global_step", 10**18) <= up_to_step]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


class StopFlag:
    """Records SIGINT/SIGTERM so the loop can save and stop between chunks (restores the old handlers)."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._set)
            except ValueError:  # not the main thread: no handlers, the run cannot be interrupted cleanly
                pass
        return self

    def _set(self, signum, frame):
        del frame
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def check_finite(metrics: np.ndarray, first_step: int) -> None:
    """Raise :class:`NonFiniteLoss` naming the first step and term that is not finite."""
    bad = ~np.isfinite(metrics)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        for term in (2, 1):  # name the root cause (mse or kl) rather than their sum
            if bad[i, term]:
                j = term
        raise NonFiniteLoss(first_step + int(i) + 1, ("loss", "mse", "kl")[j], float(metrics[i, j]))


def boundaries(begin: int, end: int, epoch_start: int, log_every: int, ckpt_every: int | None) -> list[tuple[int, int]]:
    """Chunks of an epoch from step ``begin`` to ``end`` that end at every log line and checkpoint."""
    stops = {end} | set(range(log_every, end, log_every))
    if ckpt_every:
        stops |= {s - epoch_start for s in range(ckpt_every * (epoch_start // ckpt_every + 1), epoch_start + end, ckpt_every)}
    stops = sorted(s for s in stops if begin < s <= end)
    return [(a, b - a) for a, b in zip([begin] + stops[:-1], stops)]


def fit(
    config: TrainConfig,
    mnist: MNIST,
    out: str | Path,
    *,
    backend: Backend | None = None,
    progress: bool | None = None,
    resume: bool = False,
    log=print,
) -> RunResult:
    """Train the VAE in ``backend``'s form and write the run's files into ``out``.

    Args:
        config: settings.
        mnist: the data (host arrays); moved to the device once.
        out: an existing, writable directory (see :func:`check_out_dir`).
        backend: the model form; functional by default (``pureflax.compat.backends``
            has the Equinox and Flax ones).
        progress: show a progress bar; ``None`` shows it on a terminal only.
        resume: continue from the latest good checkpoint in ``out/checkpoints``.
        log: receives one-line messages (damaged checkpoints, resuming).

    Raises:
        NonFiniteLoss: the loss went NaN/Inf; the last good checkpoint is left as it was.
        Interrupted: SIGINT/SIGTERM; a checkpoint was saved first.
        checkpoint.ShapeMismatch: ``resume`` into a model of other sizes; nothing is written.
        ResumeError: ``resume`` with another seed, no usable checkpoint, or a finished run.
    """
    out = Path(out)
    start = time.perf_counter()
    keys = make_keys(config.seed)
    placement = loop.make_placement(config.devices, config.batch_size)
    train, test = to_device(mnist.train, placement), to_device(mnist.test, placement)
    num_train = int(train.labels.shape[0])
    steps_per_epoch, total = config.steps_per_epoch(num_train), config.total_steps(num_train)
    backend = backend or functional_backend(config.model)
    state, _, loss_fn, train_step = build(config, backend, total, keys.model)
    position, ckpt_dir = Position(0, [], [0.0, 0.0, 0.0], 0), out / "checkpoints"
    rows: list[dict] = []
    if resume:
        state, meta = resume_point(ckpt_dir, state, backend, log)
        if meta.get("seed") != config.seed:
            raise ResumeError(f"--seed {config.seed} differs from the run's {meta.get('seed')}: resume with the same seed")
        position = Position(*meta["position"])
        if position.step >= total:
            raise ResumeError(f"--resume: the run in {out} already took all {total} steps")
        rows = reopen_log(out / "metrics.jsonl", position.step)
        log(f"resuming from step {position.step} of {total}")
    state = placement.replicate(state)
    runner = (loop.make_fused_runner if config.fuse else loop.make_per_step_runner)(train_step, placement)
    eval_step = step_lib.make_eval_step(loss_fn)

    def evaluate(params) -> step_lib.Metrics:  # params in the backend's own form
        return report.evaluate(eval_step, params, test, keys.eval, config.eval_batch_size)

    def meta_of(pos: Position, test_loss: float | None) -> dict:
        return {"position": list(pos), "seed": config.seed, "backend": backend.name, "test_loss": test_loss,
                "model": dataclasses.asdict(config.model), "epoch": pos.step // steps_per_epoch}

    disable = None if progress is None else not progress
    with (
        open(out / "metrics.jsonl", "a") as file,
        tqdm(total=total, initial=position.step, disable=disable, unit="step", dynamic_ncols=True) as bar,
        checkpoint.manager(ckpt_dir) as mgr,
        StopFlag() as stop,
    ):
        logger = report.Logger(file, bar, rows)

        def save(state, pos: Position, test_loss: float | None = None) -> int:
            if config.keep_best and test_loss is None:
                test_loss = float(evaluate(state.params).loss)
            mgr.wait_until_finished()  # the previous save has committed: prune, then start this one
            checkpoint.prune(ckpt_dir, config.keep, config.keep_best)
            # orbax copies the arrays to the host before save_with returns and writes them in the
            # background, so the next chunk may donate the state's buffers meanwhile
            return checkpoint.save_with(mgr, backend.to_functional(state), meta_of(pos, test_loss))

        pos, epoch_means = position, None
        while pos.step < total:
            epoch, begin = divmod(pos.step, steps_per_epoch)
            epoch_start = epoch * steps_per_epoch
            order = loop.epoch_order(jax.random.fold_in(keys.data, epoch), num_train, config.batch_size)
            end = min(steps_per_epoch, total - epoch_start)
            for chunk_start, length in boundaries(begin, end, epoch_start, config.log_every, config.ckpt_every):
                new_state, metrics = runner(state, train, order, chunk_start, keys.train, length)
                metrics = np.asarray(jax.device_get(metrics), np.float64)
                check_finite(metrics, epoch_start + chunk_start)
                state, here = new_state, chunk_start + length
                window = pos.window + metrics.tolist()
                sums = (np.asarray(pos.epoch_sums) + metrics.sum(axis=0)).tolist()
                pos = Position(epoch_start + here, window, sums, pos.epoch_count + length)
                if here % config.log_every == 0:
                    loss, mse, kl = np.mean(window, axis=0).tolist()
                    row = {"epoch": epoch, "step": here, "global_step": pos.step, "loss": loss, "mse": mse, "kl": kl}
                    logger.emit(row, report.format_line(epoch, here, loss, mse, kl))
                    pos = pos._replace(window=[])
                bar.update(length)
                if here == end:  # epoch done: a partial log window is not logged, as in the tutorial
                    epoch_means = np.asarray(pos.epoch_sums) / max(pos.epoch_count, 1)
                    pos = Position(pos.step, [], [0.0, 0.0, 0.0], 0)
                if stop.signum is not None:
                    save(state, pos)
                    raise Interrupted(stop.signum, pos.step)
                if config.ckpt_every and pos.step % config.ckpt_every == 0 and pos.step < total:
                    save(state, pos)
        test_metrics = evaluate(state.params)
        if epoch_means is None:  # resumed at the very end of an epoch
            epoch_means = np.zeros(3)
        final = {
            "test_loss": float(test_metrics.loss),
            "test_mse": float(test_metrics.mse),
            "test_kl": float(test_metrics.kl),
            "final_epoch": (total - 1) // steps_per_epoch,
            "final_epoch_loss": float(epoch_means[0]),
            "final_epoch_mse": float(epoch_means[1]),
            "final_epoch_kl": float(epoch_means[2]),
            "steps": total,
            "checkpoint_step": save(state, pos, float(test_metrics.loss)),
        }
        mgr.wait_until_finished()  # every save has committed before the run reports success
        checkpoint.prune(ckpt_dir, config.keep, config.keep_best)
        logged = [r for r in logger.rows if "loss" in r and "step" in r]
        report.write_pictures(backend.to_functional(state).params, test, config.model, keys.sample, out, logged, final["test_loss"])
        final["seconds"] = round(time.perf_counter() - start, 2)
        logger.emit(final)
    print(
        f"test loss: {final['test_loss']:.4f} ~ mse: {final['test_mse']:.4f}. kl: {final['test_kl']:.4f} | "
        f"epoch {final['final_epoch']} mean loss: {final['final_epoch_loss']:.4f} ~ mse: {final['final_epoch_mse']:.4f}. "
        f"kl: {final['final_epoch_kl']:.4f} | {final['seconds']:.1f} s"
    )
    return RunResult(state, logger.rows[:-1], final)
