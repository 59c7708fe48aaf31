"""The training run: data on the device, the shared step, logs, pictures and checkpoints.

``fit(config, mnist, out)`` trains the VAE as the tutorial does (same defaults, the same
log line every 100 steps) and writes into ``out``: ``metrics.jsonl``, ``samples.png``,
``reconstructions.png``, ``loss.png`` and ``checkpoints/``.

``fit`` builds, then runs the steps chunk by chunk and hands each chunk to the run folder
(:mod:`pureflax.rundir`), which owns everything written into ``out``: the lock, the log,
the checkpoints with the run's settings and position, resume, signals. The data order and
every key derive from the seed and the step, so a resumed run ends where the uninterrupted
one ends.

What ``fit`` raises: :class:`NonFiniteLoss` when the loss goes NaN/Inf (nothing non-finite is
saved, the last good checkpoint stays); :class:`pureflax.rundir.Interrupted` after SIGINT/SIGTERM
(a checkpoint was saved first); :class:`pureflax.rundir.RunError` when ``out`` is in use, holds
another run, or cannot be resumed with these settings; :class:`pureflax.rundir.SaveError` when a
checkpoint, the log or a picture cannot be written (disk full); and
:class:`pureflax.checkpoint.ShapeMismatch` when resuming into another model or optimiser.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from pureflax import checkpoint, data as data_lib, loop, optim, report, rundir, step as step_lib
from pureflax.backend import Backend, functional_backend
from pureflax.config import TrainConfig
from pureflax.data import MNIST, Split


class Keys(NamedTuple):
    """The run's keys, all derived from the seed."""

    model: jax.Array  # the params' init key (the tutorial's model_key)
    train: jax.Array  # folded with the step number inside the train step
    data: jax.Array  # folded with the epoch number for the shuffle
    eval: jax.Array  # folded with the test batch index
    sample: jax.Array  # for the sample grid


@jax.jit
def _split_seed(seed: jax.Array) -> Keys:
    return Keys(*jax.random.split(jax.random.PRNGKey(seed), 5))


def make_keys(seed: int) -> Keys:
    """The run's keys: ``jax.random.split(jax.random.PRNGKey(seed), 5)``, computed by one program."""
    return _split_seed(np.uint32(seed))


class RunResult(NamedTuple):
    """What :func:`fit` returns: the final state in the backend's form, the log and the final row."""
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
    # every program, however quick to compile: building a state runs a dozen small ones (the optimiser's zeros,
    # one per shape), together a good part of start-up; $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS overrides
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 0)))
    return path


class NonFiniteLoss(RuntimeError):
    """The loss went NaN or infinite: names the step and the term."""

    def __init__(self, step: int, term: str, value: float):
        super().__init__(f"step {step}: {term} is {value} (non-finite); stopped before saving anything non-finite")
        self.step, self.term = step, term


def check_test_finite(test: step_lib.Metrics, step: int) -> None:
    """Raise :class:`NonFiniteLoss` when a test metric is NaN or infinite (it is never saved or logged)."""
    for term in ("mse", "kl", "loss"):  # the root cause first
        value = float(getattr(test, term))
        if not np.isfinite(value):
            raise NonFiniteLoss(step, f"the test {term}", value)


def check_finite(metrics: np.ndarray, first_step: int) -> None:
    """Raise :class:`NonFiniteLoss` naming the first step and term that is not finite."""
    bad = ~np.isfinite(metrics)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        for term in (2, 1):  # name the root cause (mse or kl) rather than their sum
            if bad[i, term]:
                j = term
        raise NonFiniteLoss(first_step + int(i) + 1, ("loss", "mse", "kl")[j], float(metrics[i, j]))


def on_host(split: Split) -> step_lib.Batch:
    """A split as uint8 pixels and int32 labels (converted per batch, on the device)."""
    return step_lib.Batch(np.asarray(split.images, np.uint8), np.asarray(split.labels, np.int32))


def to_device(split: Split, placement: loop.Placement) -> step_lib.Batch:
    """Put a split on the device(s) once (:func:`on_host`'s arrays)."""
    return placement.replicate(on_host(split))


def build(config: TrainConfig, backend: Backend, total_steps: int, key: jax.Array) -> tuple[Any, Any, Callable, Callable]:
    """The backend's fresh state, its optimiser and THE train step built for it.

    Returns:
        ``(state, tx, loss_fn, train_step)``: the state in the backend's form, the optax
        transformation, the loss function and the jitted train step.
    """
    params = backend.init_params(key, config.native_init)
    tx = optim.make_optimizer(config.optim, total_steps, params, backend.param_names(params))
    # one program for the optimiser's zeros and the model state, not an eager op for each of their arrays
    state = jax.jit(lambda params: backend.create_state(params, tx, backend.init_model_state()))(params)
    loss_fn = step_lib.make_loss_fn(backend.apply, kl_weight=config.kl_weight, num_classes=config.model.num_classes)
    train_step = step_lib.make_train_step(loss_fn, tx, apply_gradients=backend.apply_gradients(tx), slot=backend.slot)
    return state, tx, loss_fn, train_step


def save_state(directory: str | Path, state: Any, backend: Backend) -> int:
    """Checkpoint any backend's state in the functional form, so every backend can restore it."""
    return checkpoint.save(directory, backend.to_functional(state))


def restore_state(directory: str | Path, like: Any, backend: Backend, step: int | None = None) -> Any:
    """Restore a checkpoint written by any backend into ``like``, a state of ``backend``'s form."""
    functional = checkpoint.restore(directory, backend.to_functional(like), step)
    return backend.from_functional(functional, like)


class Timing(NamedTuple):
    """Where a run's time went: ``compile`` (the first dispatch, which compiles the program that runs
    every chunk, or loads it from the cache), ``steps`` (from the first dispatch to the last chunk's metrics,
    less ``compile``; the evaluation's program is prepared during the last chunk) and ``total`` (all of
    ``fit`` up to the committed final checkpoint: loading the data onto the device, building, every chunk,
    evaluation and saves; the pictures are drawn after it)."""

    compile: float
    steps: float
    total: float


def final_row(test: step_lib.Metrics, pos: rundir.Position, plan: rundir.Plan, checkpoint_step: int, timing: Timing) -> dict[str, Any]:
    """The last row of ``metrics.jsonl``: test metrics, the final epoch's means, where it was saved, the time."""
    loss, mse, kl = rundir.epoch_means(pos)
    return {
        "test_loss": float(test.loss), "test_mse": float(test.mse), "test_kl": float(test.kl),
        "final_epoch": rundir.epoch_of(plan.total, plan.steps_per_epoch), "final_epoch_loss": loss,
        "final_epoch_mse": mse, "final_epoch_kl": kl, "steps": plan.total, "checkpoint_step": checkpoint_step,
        "compile_seconds": round(timing.compile, 2), "step_seconds": round(timing.steps, 2), "seconds": round(timing.total, 2),
    }


def summary(final: dict[str, Any]) -> str:
    """The final line a run prints: test metrics, the final epoch's means and the time."""
    return (
        f"test loss: {final['test_loss']:.4f} ~ mse: {final['test_mse']:.4f}. kl: {final['test_kl']:.4f} | "
        f"epoch {final['final_epoch']} mean loss: {final['final_epoch_loss']:.4f} ~ mse: {final['final_epoch_mse']:.4f}. "
        f"kl: {final['final_epoch_kl']:.4f} | {final['seconds']:.1f} s"
    )


def _no_hook(event: str, step: int) -> None:
    del event, step


@contextlib.contextmanager
def heap_frozen():
    """Python's cycle collector leaves the objects alive on entry alone until exit (``gc.freeze``).

    After importing JAX, Flax, Equinox and Orbax a process holds some 300,000 objects; a full
    collection walks them all (a pause of a good fraction of a second, for about ten freed objects), and a run
    allocates enough to set one off mid-start-up. Objects made inside are collected as usual; on exit
    the frozen ones go back to the collector. A heap someone else froze is left as it is.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@heap_frozen()
def fit(
    config: TrainConfig,
    mnist: MNIST,
    out: str | Path,
    *,
    backend: Backend | None = None,
    progress: bool | None = None,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
    stop: rundir.StopFlag | None = None,
    hook: Callable[[str, int], None] = _no_hook,
) -> RunResult:
    """Train the VAE in ``backend``'s form (functional by default) and write the run into the folder ``out``.

    ``progress=None`` shows a bar on a terminal only; ``resume`` continues from the latest good
    checkpoint (or only finishes a run whose steps are all taken); ``log`` receives one-line
    messages and ``warn`` each setting that does less than asked (default: stderr); ``stop`` is the
    :class:`pureflax.rundir.StopFlag` to watch (a script's, set before ``fit`` was called) or ``None``
    for one of its own; ``hook(event, step)`` is called with ``"chunk"`` after each chunk is recorded and
    ``"final"`` once the final checkpoint has committed.

    Raises:
        NonFiniteLoss, rundir.Interrupted, rundir.RunError, rundir.SaveError, checkpoint.ShapeMismatch: see above.
    """
    start, keys, config = time.perf_counter(), make_keys(config.seed), config.resolved()
    placement = loop.make_placement(config.devices, config.batch_size)
    across = jax.process_count() > 1  # then each process feeds its own part of every batch (loop.fed_from_each_process)
    train, test = on_host(mnist.train) if across else to_device(mnist.train, placement), to_device(mnist.test, placement)
    num_train = int(train.labels.shape[0])
    plan, backend = config.plan(num_train), backend or functional_backend(config.model)
    state, _, loss_fn, train_step = build(config, backend, plan.total, keys.model)
    eval_step = step_lib.make_eval_step(loss_fn)
    start_evaluation = lambda state: report.start_evaluation(eval_step, state.params, test, keys.eval,  # noqa: E731
                                                             config.eval_batch_size, backend.model_state(state))

    def evaluated(means: Any, step: int) -> step_lib.Metrics:
        metrics = report.read_means(means)
        check_test_finite(metrics, step)
        return metrics

    settings = rundir.settings_of(config, backend.name, data_lib.fingerprint(mnist))
    order = functools.lru_cache(maxsize=1)(lambda e: loop.shuffle(keys.data, e, num_train, config.batch_size))
    with rundir.RunFolder(out, settings, plan, resume=resume, overwrite=overwrite, keep=config.keep,
                          keep_best=config.keep_best, progress=progress, log=log, warn=warn, stop=stop) as folder:
        state, pos = folder.start(state, backend.to_functional, backend.from_functional)
        first = pos.step
        for notice in optim.notices(config.optim, plan.total, optim.param_paths(backend.to_functional(state).params)):
            folder.warn(notice, pos.step)
        state = placement.replicate(state)
        if config.fuse:  # a chunk never crosses a log line: one program runs them all
            runner = loop.make_fused_runner(train_step, placement, capacity=plan.log_every)
        else:
            runner = loop.make_per_step_runner(train_step, placement)
        if across:
            runner = loop.fed_from_each_process(runner, placement, plan.log_every if config.fuse else 1)

        def take(pos: rundir.Position, done: loop.Dispatched) -> rundir.Position:
            """A dispatched chunk: its metrics read (waiting for them), checked, recorded."""
            metrics = loop.read_metrics(done.metrics, done.chunk.length)
            check_finite(metrics, pos.step)
            pos = folder.record(pos, metrics)
            hook("chunk", pos.step)
            return pos

        def sync(chunk: rundir.Chunk) -> bool:  # a save needs the state after this chunk before the next one donates it
            return folder.stop_signal is not None or plan.checkpoint_due(rundir.end_of(chunk, plan))

        if folder.stop_signal is not None:
            raise rundir.Interrupted(folder.stop_signal, pos.step, saved=False)  # no step taken: nothing to save
        clock, test_means = loop.Clock(), None  # the first dispatch returns once the program is compiled (or loaded) and queued
        for done in clock.timed(loop.dispatched(runner, state, train, order, keys.train, rundir.chunks(pos.step, plan), sync)):
            if folder.stop_signal is not None and pos.step == first and done.state is not None:
                raise rundir.Interrupted(folder.stop_signal, pos.step, saved=False)  # stopped while it compiled
            folder.wait()  # the previous save commits (or fails, loudly) while this chunk computes
            if done.state is None:
                pos = take(pos, done)  # logged while the next chunk computes (no host stall)
                continue
            state = done.state
            if rundir.end_of(done.chunk, plan) == plan.total and folder.stop_signal is None:
                test_means = start_evaluation(state)  # its program is prepared while the last chunk computes
            pos = take(pos, done)
            if folder.stop_signal is not None or plan.checkpoint_due(pos.step):
                folder.save(backend.to_functional(state), pos, float(evaluated(start_evaluation(state), pos.step).loss) if config.keep_best else None)
            if folder.stop_signal is not None:
                raise rundir.Interrupted(folder.stop_signal, pos.step)
        test_means = start_evaluation(state) if test_means is None else test_means
        steps_seconds = clock.steps()  # no compile: a resumed run with no step left to take
        test_metrics = evaluated(test_means, pos.step)
        if folder.saved != plan.total:  # a resumed run that only lacked its final row has it already
            folder.save(backend.to_functional(state), pos, float(test_metrics.loss))
        folder.wait()
        timing = Timing(clock.compile, steps_seconds, time.perf_counter() - start)  # the pictures come after the timing
        hook("final", pos.step)
        if config.pictures:
            with folder.writing("pictures", pos.step):
                functional = backend.to_functional(state)
                report.write_pictures(functional.params, functional.model_state, test, config.model, keys.sample,
                                      folder.out, folder.logged(), float(test_metrics.loss))
        final = final_row(test_metrics, pos, plan, folder.saved, timing)
        folder.finish(final)
    print(summary(final))
    return RunResult(state, folder.logged(), final)
