"""The measuring half of ``bench.py``: contenders, taking turns, paired ratios and the tables they print.

A contender is a :class:`Loop`: ``run(n)`` takes ``n`` training steps and blocks until they are
done. :func:`take_turns` times any set of them a slice at a time, round after round, and hands
back :class:`Turns`: each contender's steps/s in every repeat, their medians, and ratios paired
within a repeat (:func:`paired_ratio`). What the contenders are is ``bench_cases.py``'s business.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax


class Loop(NamedTuple):
    """A contender: ``run(n)`` takes ``n`` steps and blocks; its compile seconds and peak bytes."""

    run: Callable[[int], None]
    compile_seconds: float | None = None
    peak_bytes: int | None = None


class Stepping:
    """A training state that a contender advances in place between its timed calls (states are donated)."""

    def __init__(self, state: Any):
        self.state = state


def compiled_and_seconds(jitted: Any, *args: Any) -> tuple[Any, float]:
    """``jitted`` lowered and compiled for ``args``, and the seconds that took."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def peak_bytes(compiled: Any) -> int | None:
    """A compiled program's peak memory: its arguments, outputs not aliased to them, and scratch."""
    memory = compiled.memory_analysis()
    if memory is None:  # a backend that does not report it
        return None
    return memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes + memory.temp_size_in_bytes


def contender(run: Callable[[int], None], warm_up: int, compiled: Any = None, compile_seconds: float | None = None) -> Loop:
    """``run`` as a :class:`Loop`, after ``run(warm_up)`` has compiled and warmed it up.

    Args:
        run: takes ``n`` steps and blocks until they are done.
        warm_up: the steps it takes before it is timed.
        compiled: the program it runs, compiled apart, for its peak memory (:func:`peak_bytes`); None: not reported.
        compile_seconds: what compiling that program took (:func:`compiled_and_seconds`).
    """
    run(warm_up)
    return Loop(run, compile_seconds, None if compiled is None else peak_bytes(compiled))


class Chunks(NamedTuple):
    """A runner ``(state, data, order, start, key, length) -> (state, metrics)`` called a chunk of steps at a time.

    Each call advances ``stepping.state``; chunk after chunk starts ``done`` steps into ``order``,
    wrapping before the last chunk would run past its end. Calling it takes ``n`` steps and blocks.
    """

    runner: Callable
    stepping: Stepping
    data: Any
    order: jax.Array
    key: jax.Array
    chunk: int

    def dispatch(self, n: int) -> jax.Array:
        """Hands out ``n`` steps, a chunk per call; returns the last chunk's metrics without waiting for them."""
        last = int(self.order.shape[0]) - self.chunk
        for done in range(0, n, self.chunk):
            self.stepping.state, metrics = self.runner(self.stepping.state, self.data, self.order, done % last, self.key,
                                                       min(self.chunk, n - done))
        return metrics

    def __call__(self, n: int) -> None:
        """Takes ``n`` steps and waits for them."""
        self.dispatch(n).block_until_ready()


class Repeats(NamedTuple):
    """A program ``state -> state`` that runs ``chunk`` steps, called ``n // chunk`` times (at least once) for ``n`` steps.

    Calling it advances ``stepping.state`` and blocks on ``ready(state)``.
    """

    program: Callable[[Any], Any]
    stepping: Stepping
    chunk: int
    ready: Callable[[Any], jax.Array] = lambda state: state

    def __call__(self, n: int) -> None:
        """Takes ``n`` steps, whole chunks of them, and waits for them."""
        for _ in range(max(1, n // self.chunk)):
            self.stepping.state = self.program(self.stepping.state)
        self.ready(self.stepping.state).block_until_ready()


def interleaved_samples(runs: dict, steps: int, repeats: int, slices: int = 1) -> dict[str, list[float]]:
    """Steps/s of each run in every repeat: ``steps`` steps, as ``slices`` calls of ``run(steps // slices)``
    (each blocks until done), the runs taking turns slice by slice.

    Taking turns spreads the machine's slow and fast moments over all contenders, so their ratios
    are fair on a shared, noisy machine; the finer the slices, the closer in time the contenders run.
    Each round of turns starts one contender later than the round before, so none always runs
    right after the same neighbour.

    Raises:
        ValueError: ``steps`` does not split into ``slices`` equal slices.
    """
    if steps % slices:
        raise ValueError(f"{steps} steps do not split into {slices} slices")
    rates: dict[str, list[float]] = {name: [] for name in runs}
    names, rounds = list(runs), 0
    for _ in range(repeats):
        seconds = dict.fromkeys(runs, 0.0)
        for _ in range(slices):
            first, rounds = rounds % len(names), rounds + 1
            for name in names[first:] + names[:first]:
                start = time.perf_counter()
                runs[name](steps // slices)
                seconds[name] += time.perf_counter() - start
        for name in runs:
            rates[name].append(steps / seconds[name])
    return rates


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    """Each run's median steps/s over the repeats of :func:`interleaved_samples`."""
    return {name: statistics.median(values) for name, values in samples.items()}


def interleaved_rates(runs: dict, steps: int, repeats: int) -> dict[str, float]:
    """Median steps/s of each run over :func:`interleaved_samples`' repeats."""
    return medians(interleaved_samples(runs, steps, repeats))


def paired_ratio(samples: dict[str, list[float]], a: str, b: str) -> float:
    """How fast ``a`` runs against ``b``: the median over the repeats of their ratio within one repeat.

    The two were timed seconds apart in each repeat, so the machine's drift from one repeat to the
    next (a shared host's neighbours come and go) cancels, where a ratio of two medians keeps it.
    """
    return statistics.median(x / y for x, y in zip(samples[a], samples[b], strict=True))


class Turns:
    """Contenders timed taking turns: each one's steps/s per repeat (``samples``), their medians (``rates``),
    paired ratios, and the :class:`Loop` each came from (``loops``)."""

    def __init__(self, loops: dict[str, Loop], samples: dict[str, list[float]]):
        self.loops, self.samples, self.rates = loops, samples, medians(samples)

    def rate(self, name: str) -> float:
        """``name``'s median steps/s."""
        return self.rates[name]

    def ratio(self, a: str, b: str) -> float:
        """``a`` against ``b``, paired within each repeat (:func:`paired_ratio`)."""
        return paired_ratio(self.samples, a, b)

    def derive(self, name: str, combine: Callable[..., float], *of: str) -> None:
        """Adds ``name``, timed by no loop of its own: ``combine`` of the rates of ``of`` in each repeat, repeat by repeat."""
        self.samples[name] = [combine(*rates) for rates in zip(*(self.samples[other] for other in of), strict=True)]
        self.rates[name] = statistics.median(self.samples[name])


def take_turns(loops: dict[str, Loop], steps: int, repeats: int, slices: int = 1) -> Turns:
    """``loops`` timed by :func:`interleaved_samples`, taking turns in the order given."""
    return Turns(loops, interleaved_samples({name: each.run for name, each in loops.items()}, steps, repeats, slices))


def rows_of_turns(cells: Iterable[tuple], contenders: Callable[..., tuple[dict[str, Loop], int]],
                  row: Callable[..., dict], note: str, repeats: int) -> list[dict]:
    """One row per cell, each of its contenders taking turns with the others.

    Args:
        cells: each row's parameters (a model and a batch, say), in order.
        contenders: ``contenders(*cell)``: the cell's loops, built and warmed up, and the steps each takes per turn.
        row: ``row(*cell, turns)``: the row, from the cell and its :class:`Turns`.
        note: printed as each row is done, formatted with the row's keys.
        repeats: turns per cell, each a repeat.
    """
    rows = []
    for cell in cells:
        loops, steps = contenders(*cell)
        rows.append(row(*cell, take_turns(loops, steps, repeats)))
        print(note.format_map(rows[-1]), flush=True)
    return rows


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """float32 matmul throughput, median of ``repeats`` timed runs of 10 products."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n))
    mm = jax.jit(lambda a: a @ a)
    mm(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(10):
            out = mm(a)
        out.block_until_ready()
        times.append((time.perf_counter() - start) / 10)
    return 2 * n**3 / statistics.median(times) / 1e9


def mib(n: int | None) -> str:
    """``n`` bytes in MiB to one decimal, or a dash where a backend did not report it."""
    return "—" if n is None else f"{n / 2**20:.1f}"


class Table(NamedTuple):
    """A markdown table: each column a heading and how a row shows in it, a format string over the row's
    keys or a function of the row.

    Examples:
        >>> Table((("model", "{model}"), ("steps/s", "{rate:,.0f}"))).show([{"model": "mlp", "rate": 1234.5}])
        | model | steps/s |
        |---|---|
        | mlp | 1,234 |
    """

    columns: tuple[tuple[str, str | Callable[[Any], str]], ...]

    def show(self, rows: Iterable[Any], lead: str = "") -> None:
        """Prints the heading (after ``lead``), the rule and one line per row."""
        print(lead + "| " + " | ".join(heading for heading, _ in self.columns) + " |")
        print("|" + "---|" * len(self.columns))
        for row in rows:
            cells = (cell.format_map(row) if isinstance(cell, str) else cell(row) for _, cell in self.columns)
            print("| " + " | ".join(cells) + " |")
