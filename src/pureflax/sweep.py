"""Many runs in one program: a sweep's members trained together, THE train step ``vmap``ped over them.

A sweep is a grid over seeds, learning rates and KL weights (:data:`SWEEPABLE`). Its members'
states are stacked along a leading member axis and one compiled program takes a step of every
member at once: the shared step, ``jax.vmap``ped, with each member's learning rate and KL weight
as traced values (the optimiser is built inside the step from them, so the optimiser state has
the same structure as a single run's). Each member's data order and keys derive from its own seed,
exactly as in a run of its own.

Each member is a run like any other: its own folder under ``out`` (:class:`pureflax.rundir.RunFolder`
writes it: the log, checkpoints with the member's own settings, the pictures), so
``pureflax.compat.load``, ``checkpoints.py`` and a single run's ``--resume`` read it unchanged.
``out/sweep.json`` lists the members, what varies, their final test losses and the best one.

A member whose loss goes non-finite stops (its folder says why, its last good checkpoint stays)
and the others go on. Members resumed at different steps (a kill between their saves) are caught
up in the same program: a member whose folder is ahead waits, its slice computing steps nobody
reads, until the others reach it.

Examples:
    >>> from pureflax.train import TrainConfig
    >>> [m.name for m in grid(TrainConfig(), {"seed": [0, 1], "lr": [1e-4, 3e-4]})]
    ['seed-0_lr-0.0001', 'seed-0_lr-0.0003', 'seed-1_lr-0.0001', 'seed-1_lr-0.0003']
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from pureflax import data as data_lib, loop, memory, models, optim, report, rundir, step as step_lib, train
from pureflax.backend import Backend, functional_backend
from pureflax.data import MNIST
from pureflax.memory import compiled_bytes, traced_bytes
from pureflax.sweep_folder import checkpoint_exists, completed, write_sweep

# What may vary between the members of one program, and how a value lands in a member's config. Anything
# else changes the program itself (shapes, the optimiser's structure, the batch): those are separate runs.
SWEEPABLE: dict[str, Callable[[train.TrainConfig, Any], train.TrainConfig]] = {
    "seed": lambda config, value: dataclasses.replace(config, seed=int(value)),
    "lr": lambda config, value: dataclasses.replace(config, optim=dataclasses.replace(config.optim, lr=float(value))),
    "kl_weight": lambda config, value: dataclasses.replace(config, kl_weight=float(value)),
}


class SweepError(ValueError):
    """A sweep that cannot run as asked (exit status 2): the message names the setting and what to do."""


class Member(NamedTuple):
    """One run of a sweep: its folder's name, its full config, and its values of what varies."""

    name: str
    config: train.TrainConfig
    values: dict[str, Any]


def show(value: Any) -> str:
    """A value as a member's folder name shows it: ``0.0003``, ``1``, ``65535``."""
    return str(value) if isinstance(value, int) else format(value, "g")


def grid(base: train.TrainConfig, axes: dict[str, Sequence[Any]]) -> list[Member]:
    """Every combination of ``axes`` (name -> values, in order; the first varies slowest) over ``base``.

    A member's name joins ``name-value`` for each axis with more than one value (all axes when none has).

    Raises:
        SweepError: an axis that cannot vary in one program, an empty axis or a value given twice.
        ValueError: a value its setting refuses (``lr`` 0, say): the config's own message.
    """
    for name, values in axes.items():
        if name not in SWEEPABLE:
            raise SweepError(f"`sweep` {name}: only {', '.join(SWEEPABLE)} can vary inside one program "
                             "(any other setting changes the program itself); train those as separate runs")
        if not values:
            raise SweepError(f"`sweep` {name}: no values")
        repeated = [show(value) for value, times in collections.Counter(values).items() if times > 1]
        if repeated:
            raise SweepError(f"`sweep` {name}: {repeated[0]} is given twice")
    varying = [name for name, values in axes.items() if len(values) > 1] or list(axes)
    members = []
    for combination in itertools.product(*axes.values()):
        values = dict(zip(axes, combination))
        config = base
        for name, value in values.items():
            config = SWEEPABLE[name](config, value)
        members.append(Member("_".join(f"{name}-{show(values[name])}" for name in varying), config, values))
    return members


# --- the program ----------------------------------------------------------------------------


class Hyper(NamedTuple):
    """The settings that differ between members, as traced values (one per member once stacked)."""

    lr: jax.Array
    kl_weight: jax.Array


class Members(NamedTuple):
    """What a sweep's step carries: every member's state, stacked, and their settings."""

    states: Any
    hyper: Hyper


def hyper_of(config: train.TrainConfig) -> Hyper:
    """The hyperparameters a member traces: its learning rate and KL weight, as float32."""
    return Hyper(np.float32(config.optim.lr), np.float32(config.kl_weight))


def make_member_step(config: train.TrainConfig, backend: Backend, total_steps: int, params: Any) -> Callable:
    """THE train step of one member whose learning rate and KL weight are traced: ``step(state, batch, key, hyper)``.

    The optimiser and the loss are built inside the step, from ``hyper``, by the same functions a
    single run builds them with; ``params`` (any member's) labels the tree for ``freeze``.
    """
    names = backend.param_names(params)

    def member_step(state: Any, batch: step_lib.Batch, key: jax.Array, hyper: Hyper):
        tx = optim.make_optimizer(config.optim, total_steps, params, names, lr=hyper.lr)
        loss_fn = step_lib.make_loss_fn(backend.apply, kl_weight=hyper.kl_weight, num_classes=config.model.num_classes)
        step = step_lib.make_train_step(loss_fn, tx, apply_gradients=backend.apply_gradients(tx), slot=backend.slot)
        return step(state, batch, key)

    return member_step


def vmapped(member_step: Callable) -> Callable:
    """The sweep's step: ``step(members, batch, keys) -> (members, Metrics of (M,) arrays)``, batch and keys per member."""

    def sweep_step(members: Members, batch: step_lib.Batch, keys: jax.Array):
        states, metrics = jax.vmap(member_step)(members.states, batch, keys, members.hyper)
        return members._replace(states=states), metrics

    return sweep_step


def make_evaluation(backend: Backend, config: train.TrainConfig, test: step_lib.Batch) -> Callable:
    """``evaluate(members, keys) -> (M, 3)`` test means, each member with its own KL weight and eval key (one program)."""

    def one(state: Any, key: jax.Array, hyper: Hyper) -> jax.Array:
        loss_fn = step_lib.make_loss_fn(backend.apply, kl_weight=hyper.kl_weight, num_classes=config.model.num_classes)
        eval_step = step_lib.make_eval_step(loss_fn)
        return report.split_means(eval_step, state.params, backend.model_state(state), test, key, config.eval_batch_size)

    return jax.jit(lambda members, keys: jax.vmap(one)(members.states, keys, members.hyper))


def make_orders(keys: jax.Array, num_train: int, batch_size: int) -> Callable[[int], jax.Array]:
    """``order(epoch)``: every member's batch order for the epoch, (steps, members, batch), each from its own data key."""
    program = jax.jit(lambda keys, epoch: jax.vmap(lambda key: loop.shuffle(key, epoch, num_train, batch_size))(keys).transpose(1, 0, 2))
    return functools.lru_cache(maxsize=1)(lambda epoch: program(keys, epoch))


def stack(trees: Sequence[Any]) -> Any:
    """Trees of one structure as one tree of arrays with a leading member axis."""
    return jax.tree.map(lambda *leaves: np.stack([np.asarray(leaf) for leaf in leaves]), *trees)


def member(tree: Any, k: int) -> Any:
    """Member ``k``'s slice of a stacked tree."""
    return jax.tree.map(lambda leaf: leaf[k], tree)


# --- memory ---------------------------------------------------------------------------------


def check_memory(members: int, bound: int, fixed: int, device: jax.Device, exact: Callable[[], int]) -> None:
    """Refuse a sweep whose memory exceeds what is free on ``device``, naming the estimate.

    ``bound`` is a member's upper bound (:func:`pureflax.memory.traced_bytes`, from tracing alone); only when
    ``members`` of it do not fit is ``exact()`` (:func:`pureflax.memory.compiled_bytes`, a compile) asked.

    Raises:
        SweepError: too large; the message gives the estimate, what is free and how many members fit.
    """
    free = memory.available_bytes(device)
    if free is None or members * bound + fixed <= free:
        return
    per_member = exact()
    need = members * per_member + fixed
    if need > free:
        fit = max((free - fixed) // per_member, 0)
        raise SweepError(f"a sweep of {members} members needs about {need / 1e9:.1f} GB ({per_member / 1e6:.1f} MB a member "
                         f"and {fixed / 1e6:.0f} MB of data) and {device.platform} has {free / 1e9:.1f} GB free; "
                         f"about {fit} members fit: sweep fewer at a time")


# --- the run folders ----------------------------------------------------------------------


class MemberRun:
    """A member as the sweep drives it: its folder, position and state (a result once it is done)."""

    def __init__(self, index: int, spec: Member, folder: rundir.RunFolder | None):
        self.index, self.spec, self.folder = index, spec, folder
        self.pos: rundir.Position | None = None
        self.waiting: Any = None  # a state resumed ahead of the sweep: put in its slice once the sweep gets there
        self.stopped: str | None = None  # why it stopped (non-finite loss)
        self.final: dict[str, Any] | None = None
        self.test: step_lib.Metrics | None = None  # its test metrics, once evaluated at the end

    @property
    def name(self) -> str:
        return self.spec.name

    def live_at(self, step: int) -> bool:
        """Whether this member takes the sweep's steps from ``step`` on (it is there, and has not stopped)."""
        return self.folder is not None and self.stopped is None and self.final is None and self.pos.step == step

    def record(self) -> dict[str, Any]:
        """This member's row of ``sweep.json``: its name, folder, values, status and, once finished, its losses."""
        status = "stopped" if self.stopped else "finished" if self.final else "running"
        row = {"name": self.name, "folder": self.name, "values": self.spec.values, "status": status}
        if self.final:
            row.update({key: self.final[key] for key in ("test_loss", "test_mse", "test_kl", "final_epoch_loss", "steps")})
        if self.stopped:
            row["reason"] = self.stopped
        return row


def line(epoch: int, step: int, runs: Sequence[MemberRun], losses: dict[str, float]) -> str:
    """One log line for every member: each member's loss (up to 8), else the best, the median and the worst."""
    if len(losses) <= 8:
        shown = " | ".join(f"{name} {loss:.4f}" for name, loss in losses.items())
    else:
        ranked = sorted(losses.items(), key=lambda item: item[1])
        shown = (f"best {ranked[0][1]:.4f} ({ranked[0][0]}), median {statistics.median(losses.values()):.4f}, "
                 f"worst {ranked[-1][1]:.4f} ({ranked[-1][0]})")
    stopped = sum(run.stopped is not None for run in runs)
    return f"epoch {epoch} | step {step} | loss: {shown}" + (f" ({stopped} stopped)" if stopped else "")


class SweepResult(NamedTuple):
    """What :func:`fit_sweep` returns: every member's row of ``sweep.json``, the best member and the stopped ones."""
    members: list[dict[str, Any]]  # sweep.json's rows
    best: str | None  # the finished member with the lowest test loss
    stopped: list[str]  # members whose loss went non-finite


def _no_hook(event: str, step: int) -> None:
    del event, step


@train.heap_frozen()
def fit_sweep(
    members: Sequence[Member],
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
) -> SweepResult:
    """Train ``members`` (from :func:`grid`) in one program and write each into its folder under ``out``.

    The arguments are :func:`pureflax.train.fit`'s; ``hook(event, step)`` is called with ``"chunk"``
    after each chunk is recorded. A member whose loss goes non-finite stops and the others go on.

    Raises:
        SweepError: more members than memory holds, or than split over the devices.
        rundir.Interrupted, rundir.RunError, rundir.SaveError, checkpoint.ShapeMismatch: as ``fit``.
    """
    start = time.perf_counter()
    out, config, count = Path(out), members[0].config.resolved(), len(members)
    if config.devices > 1 and count % config.devices:
        raise SweepError(f"`devices` {config.devices}: the sweep's {count} members do not split evenly over them")
    placement = loop.make_placement(config.devices, count)
    plan, backend = config.plan(len(mnist.train.labels)), backend or functional_backend(config.model)
    first = train.make_keys(config.seed)
    params = backend.init_params(first.model, config.native_init)
    tx = optim.make_optimizer(config.optim, plan.total, params, backend.param_names(params))
    create = jax.jit(lambda params: backend.create_state(params, tx, backend.init_model_state()))
    member_step = make_member_step(config, backend, plan.total, params)
    batch = step_lib.Batch(jax.ShapeDtypeStruct((config.batch_size, config.model.input_dim), np.uint8),
                           jax.ShapeDtypeStruct((config.batch_size,), np.int32))
    fixed = sum(np.asarray(a).nbytes for a in (*mnist.train, *mnist.test))
    args = (jax.eval_shape(create, params), batch, first.train, hyper_of(config))
    check_memory(count, traced_bytes(member_step, *args), fixed, jax.devices()[0], lambda: compiled_bytes(member_step, *args))  # before anything is allocated

    configs = [m.config.resolved() for m in members]
    keys = [train.make_keys(c.seed) for c in configs]
    train_data, test = train.to_device(mnist.train, placement), train.to_device(mnist.test, placement)
    num_train = int(train_data.labels.shape[0])

    stop = stop or rundir.StopFlag()
    warned: set[str] = set()
    say_once = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))

    def warn_once(message: str) -> None:
        if message not in warned:
            warned.add(message)
            say_once(message)

    with contextlib.ExitStack() as stack_:
        stack_.enter_context(stop)
        out.mkdir(parents=True, exist_ok=True)
        runs: list[MemberRun] = []
        for k, (spec, member_config) in enumerate(zip(members, configs)):
            folder_path = out / spec.name
            done = completed(folder_path, plan.total) if resume else None
            has_checkpoint = resume and checkpoint_exists(folder_path)
            if done is not None:
                run = MemberRun(k, spec, None)
                run.final = done
                runs.append(run)
                continue
            settings = rundir.settings_of(member_config, backend.name, data_lib.fingerprint(mnist))
            folder = rundir.RunFolder(folder_path, settings, plan, resume=has_checkpoint,
                                      overwrite=overwrite or (resume and not has_checkpoint), keep=config.keep,
                                      keep_best=config.keep_best, progress=False, log=lambda m, n=spec.name: log(f"{n}: {m}"),
                                      warn=warn_once, stop=stop, echo=False)
            runs.append(MemberRun(k, spec, stack_.enter_context(folder)))
        if resume and not any(run.folder is not None and run.folder.resume for run in runs) and not any(run.final for run in runs):
            raise rundir.ResumeError(f"`resume`: no member of the sweep in {out} has a checkpoint to restore; start again with `overwrite`")
        states = []
        for run, k in zip(runs, keys):
            fresh = create(backend.init_params(k.model, config.native_init))
            if run.folder is None:
                states.append(fresh)
                continue
            state, run.pos = run.folder.start(fresh, backend.to_functional, backend.from_functional)
            for notice in optim.notices(run.spec.config.optim, plan.total, optim.param_paths(backend.to_functional(state).params)):
                run.folder.warn(notice, run.pos.step)
            states.append(state)
        live = [run for run in runs if run.folder is not None]
        step = min((run.pos.step for run in live), default=plan.total)
        for run in live:
            if run.pos.step > step:
                run.waiting = states[run.index]
        write_sweep(out, sweep_record(runs, config, backend, count))

        carry = Members(placement.split(stack(states)), placement.split(stack([hyper_of(c) for c in configs])))
        del states
        train_keys = placement.split(jnp.stack([k.train for k in keys]))
        eval_keys = jnp.stack([k.eval for k in keys])
        order = make_orders(jnp.stack([k.data for k in keys]), num_train, config.batch_size)
        sweep_step = vmapped(member_step)
        if config.fuse:
            runner = loop.make_fused_runner(sweep_step, placement, capacity=plan.log_every, members=count)
        else:
            runner = loop.make_per_step_runner(sweep_step, placement)
        evaluate = make_evaluation(backend, config, test)
        bar = stack_.enter_context(tqdm(total=plan.total, initial=step, disable=None if progress is None else not progress,
                                        unit="step", dynamic_ncols=True))

        def save_all(carry: Members, at: int, test_losses: np.ndarray | None) -> None:
            host = jax.device_get(carry.states)
            for run in runs:
                if run.live_at(at):
                    loss = None if test_losses is None else float(test_losses[run.index])
                    run.folder.save(backend.to_functional(member(host, run.index)), run.pos, loss)

        def take(done: loop.Dispatched, at: int) -> None:
            metrics = loop.read_metrics(done.metrics, done.chunk.length)
            losses, row_at = {}, None
            for run in runs:
                if not run.live_at(at):
                    continue
                mine = metrics[:, :, run.index]
                try:
                    train.check_finite(mine, at)
                except train.NonFiniteLoss as err:
                    stop_member(run, err)
                    continue
                before = len(run.folder.rows)
                run.pos = run.folder.record(run.pos, mine)
                if len(run.folder.rows) > before and "loss" in run.folder.rows[-1]:
                    row_at = run.folder.rows[-1]
                    losses[run.name] = row_at["loss"]
            if row_at is not None:
                bar.write(line(row_at["epoch"], row_at["step"], runs, losses))
            bar.update(done.chunk.length)
            hook("chunk", at + done.chunk.length)

        def stop_member(run: MemberRun, err: train.NonFiniteLoss) -> None:
            run.stopped = str(err)
            kept = run.folder.saved
            run.folder.emit({"event": "stopped", "global_step": err.step, "reason": str(err)})
            where = "no checkpoint was written before it" if kept is None else f"its last verified checkpoint (step {kept}) is kept"
            log(f"{run.name}: {err}; {where}; the other members go on")
            run.folder.wait()

        clock = loop.Clock()
        while step < plan.total and any(run.stopped is None and run.final is None for run in live):
            until = min([run.pos.step for run in live if run.pos.step > step], default=plan.total)
            chunks = itertools.takewhile(lambda c: rundir.end_of(c, plan) <= until, rundir.chunks(step, plan))

            def sync(chunk: rundir.Chunk) -> bool:
                end = rundir.end_of(chunk, plan)
                return stop.signum is not None or plan.checkpoint_due(end) or end == until

            if stop.signum is not None and not clock.compiled:
                raise rundir.Interrupted(stop.signum, step, saved=False)  # no step taken: nothing to save
            for done in clock.timed(loop.dispatched(runner, carry, train_data, order, train_keys, chunks, sync)):
                if stop.signum is not None and not clock.compiled and done.state is not None:
                    raise rundir.Interrupted(stop.signum, step, saved=False)  # stopped while it compiled
                for run in live:
                    run.folder.wait()
                at = rundir.end_of(done.chunk, plan) - done.chunk.length
                take(done, at)
                if done.state is None:
                    continue
                carry, end = done.state, at + done.chunk.length
                if stop.signum is not None or plan.checkpoint_due(end):
                    test_losses = np.asarray(evaluate(carry, eval_keys))[:, 0] if config.keep_best else None
                    save_all(carry, end, test_losses)
                if stop.signum is not None:
                    raise rundir.Interrupted(stop.signum, end)
            step = until
            for run in live:  # members that were ahead join here
                if run.waiting is not None and run.pos.step == step:
                    carry = carry._replace(states=placement.split(jax.tree.map(
                        lambda s, m, k=run.index: jnp.asarray(s).at[k].set(m), carry.states, run.waiting)))
                    run.waiting = None
        steps_seconds = clock.steps()

        means = np.asarray(evaluate(carry, eval_keys), np.float64)
        host = jax.device_get(carry.states)
        for run in live:
            if run.stopped is not None:
                continue
            test_metrics = step_lib.Metrics(*means[run.index])
            try:
                train.check_test_finite(test_metrics, run.pos.step)
            except train.NonFiniteLoss as err:
                stop_member(run, err)
                continue
            if run.folder.saved != plan.total:
                run.folder.save(backend.to_functional(member(host, run.index)), run.pos, float(test_metrics.loss))
            run.folder.wait()
            run.test = test_metrics
        timing = train.Timing(clock.compile, steps_seconds, time.perf_counter() - start)
        hook("final", plan.total)
        for run in live:
            if run.stopped is not None:
                continue
            if config.pictures:
                with run.folder.writing("pictures", run.pos.step):
                    functional = backend.to_functional(member(host, run.index))
                    report.write_pictures(functional.params, functional.model_state, test, config.model, keys[run.index].sample,
                                          run.folder.out, run.folder.logged(), float(run.test.loss))
            run.final = train.final_row(run.test, run.pos, plan, run.folder.saved, timing)
            run.folder.finish(run.final)
        record = sweep_record(runs, config, backend, count)
        write_sweep(out, record)
    for row in sorted(record["members"], key=lambda r: r.get("test_loss", float("inf"))):
        if row["status"] == "finished":
            print(f"{row['name']}: test loss {row['test_loss']:.4f} | final epoch mean loss {row['final_epoch_loss']:.4f}")
        else:
            print(f"{row['name']}: {row['status']} ({row.get('reason', '')})")
    if record["best"] is not None:
        print(f"best: {record['best']} ({timing.total:.1f} s for {count} members)")
    return SweepResult(record["members"], record["best"], [run.name for run in runs if run.stopped])


def sweep_record(runs: Sequence[MemberRun], config: train.TrainConfig, backend: Backend, count: int) -> dict[str, Any]:
    """``sweep.json``: the members, what varies, their results, the best; and how the program ran."""
    rows = [run.record() for run in runs]
    finished = [row for row in rows if row["status"] == "finished"]
    varying = sorted({name for run in runs for name in run.spec.values}, key=list(SWEEPABLE).index)
    return {
        "members": rows,
        "varying": varying,
        "best": min(finished, key=lambda row: row["test_loss"])["name"] if finished else None,
        "backend": backend.name,
        "model": models.kind_of(config.model),
        "program": {"members": count, "fused": bool(config.fuse), "devices": config.devices},
    }
