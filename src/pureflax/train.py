"""The training run: data on the device, the shared step, logs, pictures and a checkpoint.

``fit(config, mnist, out)`` trains the VAE as the tutorial does (same defaults, the same
log line every 100 steps) and writes into ``out``: ``metrics.jsonl``, ``samples.png``,
``reconstructions.png``, ``loss.png`` and ``checkpoints/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from pureflax import checkpoint, loop, optim, step as step_lib, vae, viz
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


def check_out_dir(out: Path, overwrite: bool = False) -> None:
    """Refuse an ``out`` that holds a previous run (unless ``overwrite``) or cannot be written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    existing = [name for name in RUN_FILES if (out / name).exists()]
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


def to_device(split: Split, placement: loop.Placement) -> step_lib.Batch:
    """Put a split on the device(s) once, as uint8 pixels and int32 labels (converted per batch)."""
    return placement.replicate(step_lib.Batch(np.asarray(split.images, np.uint8), np.asarray(split.labels, np.int32)))


def evaluate(eval_step, params, data: step_lib.Batch, key: jax.Array, batch_size: int) -> step_lib.Metrics:
    """Mean loss terms over a whole split, in batches; batch i uses ``fold_in(key, i)``."""
    n = data.labels.shape[0]
    total = np.zeros(3)
    for i, start in enumerate(range(0, n, batch_size)):
        batch = step_lib.Batch(data.images[start : start + batch_size], data.labels[start : start + batch_size])
        metrics = eval_step(params, batch, jax.random.fold_in(key, i))
        total += np.asarray(jax.device_get(jnp.stack(metrics)), np.float64) * batch.labels.shape[0]
    return step_lib.Metrics(*(total / n))


def write_pictures(params, test: step_lib.Batch, model: vae.VAEConfig, key: jax.Array, out: Path, log: list[dict], test_loss: float) -> None:
    """samples.png (row r = class r), reconstructions.png and loss.png."""
    labels = jnp.repeat(jnp.arange(model.num_classes), 10)
    samples = jax.jit(partial(vae.sample, config=model))(params, labels, key)
    viz.save_samples(np.asarray(samples), out / "samples.png", model.num_classes)
    n = min(40, (test.labels.shape[0] // 10) * 10)
    if n:
        x, c = step_lib.to_inputs(step_lib.Batch(test.images[:n], test.labels[:n]), model.num_classes)
        mean, _ = vae.encode(params, x, model)
        viz.save_reconstructions(np.asarray(x), np.asarray(vae.decode(params, mean, c, model)), out / "reconstructions.png")
    steps = [row["global_step"] for row in log]
    curves = {name: [row[name] for row in log] for name in ("loss", "mse", "kl")}
    viz.save_loss_curve(steps, curves, out / "loss.png", test_loss)


def format_line(epoch: int, step: int, loss: float, mse: float, kl: float) -> str:
    """The tutorial's log line."""
    return f"epoch {epoch} | step {step} | loss: {loss:.4f} ~ mse: {mse:.4f}. kl: {kl:.4f}"


class Logger(NamedTuple):
    """Where log lines go: the JSONL file, the terminal (above the bar) and the run's list."""

    file: Any  # open text file, metrics.jsonl
    bar: Any  # tqdm bar
    rows: list[dict[str, Any]]

    def emit(self, row: dict[str, Any], line: str | None = None) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()  # a crash keeps every line already logged
        self.rows.append(row)
        if line is not None:
            self.bar.write(line)


def run_epoch(runner: loop.Runner, state, train: step_lib.Batch, order, train_key, *, epoch: int, steps: int, first_step: int, log_every: int, logger: Logger):
    """Run ``steps`` steps of one epoch in chunks that end at each log line; return the state and epoch means.

    The runner returns per-step metrics, fetched once per chunk.
    """
    epoch_sums, epoch_count = np.zeros(3), 0
    for start, length in loop.chunks(steps, log_every):
        state, metrics = runner(state, train, order, start, train_key, length)
        metrics = np.asarray(jax.device_get(metrics), np.float64)
        epoch_sums, epoch_count = epoch_sums + metrics.sum(axis=0), epoch_count + length
        end = start + length
        if end % log_every == 0:
            loss, mse, kl = metrics.mean(axis=0).tolist()
            row = {"epoch": epoch, "step": end, "global_step": first_step + end, "loss": loss, "mse": mse, "kl": kl}
            logger.emit(row, format_line(epoch, end, loss, mse, kl))
        logger.bar.update(length)
    return state, epoch_sums / max(epoch_count, 1)


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


def fit(
    config: TrainConfig,
    mnist: MNIST,
    out: str | Path,
    *,
    backend: Backend | None = None,
    progress: bool | None = None,
) -> RunResult:
    """Train the VAE in ``backend``'s form and write the run's files into ``out``.

    Args:
        config: settings.
        mnist: the data (host arrays); moved to the device once.
        out: an existing, writable directory (see :func:`check_out_dir`).
        backend: the model form; functional by default (``pureflax.compat.backends``
            has the Equinox and Flax ones).
        progress: show a progress bar; ``None`` shows it on a terminal only.

    Returns:
        The final state, the logged lines and the final metrics.
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
    state = placement.replicate(state)
    make_runner = loop.make_fused_runner if config.fuse else loop.make_per_step_runner
    runner = make_runner(train_step, placement)

    disable = None if progress is None else not progress
    with open(out / "metrics.jsonl", "a") as file, tqdm(total=total, disable=disable, unit="step", dynamic_ncols=True) as bar:
        logger = Logger(file, bar, [])
        done, epoch_means = 0, np.zeros(3)
        epochs = -(-total // steps_per_epoch)  # the epochs max-steps reaches into
        for epoch in range(epochs):
            order = loop.epoch_order(jax.random.fold_in(keys.data, epoch), num_train, config.batch_size)
            steps = min(steps_per_epoch, total - done)
            state, epoch_means = run_epoch(
                runner, state, train, order, keys.train,
                epoch=epoch, steps=steps, first_step=done, log_every=config.log_every, logger=logger,
            )
            done += steps
        test_metrics = evaluate(step_lib.make_eval_step(loss_fn), state.params, test, keys.eval, config.eval_batch_size)
        final = {
            "test_loss": float(test_metrics.loss),
            "test_mse": float(test_metrics.mse),
            "test_kl": float(test_metrics.kl),
            "final_epoch": epoch,
            "final_epoch_loss": float(epoch_means[0]),
            "final_epoch_mse": float(epoch_means[1]),
            "final_epoch_kl": float(epoch_means[2]),
            "steps": done,
            "checkpoint_step": save_state(out / "checkpoints", state, backend),
        }
        write_pictures(backend.to_functional(state).params, test, config.model, keys.sample, out, logger.rows, final["test_loss"])
        final["seconds"] = round(time.perf_counter() - start, 2)
        logger.emit(final)
    print(
        f"test loss: {final['test_loss']:.4f} ~ mse: {final['test_mse']:.4f}. kl: {final['test_kl']:.4f} | "
        f"epoch {epoch} mean loss: {final['final_epoch_loss']:.4f} ~ mse: {final['final_epoch_mse']:.4f}. "
        f"kl: {final['final_epoch_kl']:.4f} | {final['seconds']:.1f} s"
    )
    return RunResult(state, logger.rows[:-1], final)
