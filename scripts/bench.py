"""Side-by-side training throughput: the tutorial's loop, its peers, each backend per step and fused, the bound.

    .venv/bin/python scripts/bench.py [--quick] [--json bench.json] [--steps 800] [--repeats 5]
    .venv/bin/python scripts/bench.py --train-run [--data PATH]

All in one process, the full-size VAE, adamw(1e-4). Throughput is the median of ``--repeats``
timed runs after a warm-up, all the loops taking turns in every repeat; compile time is measured
separately. At batch 16: the tutorial's loop, the NNX docs' and the Equinox examples' loops, every
backend per step and fused, and a fused scan of only the step's own matrix products
(``gemm_run``), the in-run bound each fused loop is reported against (``fraction_of_bound``), and
the step's two parts apart — loss and gradients only, AdamW's update only — whose added times
are the step run one part after the other (``fraction_of_parts``); a float32 matmul measured in
the same run stands in for the machine's peak, for the MFU column. Every ratio pairs the two
loops within each repeat (``paired_ratio``).
Then how cost grows with the batch (16, 64, 256) for the MLP and the conv VAE: images/s,
steps/s, compile seconds and peak memory of the tutorial's way against the fused loop.
``--quick`` takes fewer steps and repeats, leaves out the per-step rows and scales the MLP only.
``--train-run`` measures instead what a user's run reaches: ``train.py --epochs 3``, whole ``fit``, against the
fused loop timed around each run (:func:`train_run`).

This file is the command line and the sections it runs; ``bench_harness.py`` beside it times
contenders taking turns and prints the tables, and ``bench_cases.py`` builds the contenders.
"""

from __future__ import annotations

import json
import os
import statistics  # noqa: F401  (the tests take a plain median from here, to set it beside a paired ratio)
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import jax

from pureflax import vae
from pureflax.cli import Parser
from pureflax.compat.backends import BACKENDS

if str(Path(__file__).resolve().parent) not in sys.path:  # bench_cases and bench_harness beside this file, however it was loaded
    sys.path.append(str(Path(__file__).resolve().parent))

from bench_cases import (  # noqa: E402
    BATCH, CHUNK, SCALING_TABLE, SWEEP_MEMBERS, SWEEP_TABLE, TRAIN_RUN_EPOCHS, TRAIN_RUN_REFERENCE, Data, TrainRunFailed,
    backend_runs, equinox_loop, gemm_run, gemm_shapes, gradient_only_run, model_flops_per_step, nnx_loop, optimizer_only_run,
    scaling, sweep_section, synthetic_mnist, train_run, tutorial_loop,
)
from bench_harness import Loop, Table, Turns, interleaved_samples, matmul_gflops, paired_ratio, peak_bytes, take_turns  # noqa: E402

__all__ = ["Loop", "TrainRunFailed", "backend_runs", "gemm_shapes", "interleaved_samples", "main", "model_flops_per_step",
           "paired_ratio", "peak_bytes", "train_run"]

SAME_PROGRAM = ("functional", "flax", "nnx")  # fused, one program to XLA: test_the_functional_flax_and_nnx_forms_hand_xla_one_program

PEERS = (  # (contender, its row, how it is built): the loops as each library's docs teach them
    ("tutorial", "tutorial's loop (linen, jitted step, host batches)", tutorial_loop),
    ("nnx_loop", "NNX docs' loop (nnx.jit step, nnx.Optimizer, host batches)", nnx_loop),
    ("equinox_loop", "Equinox examples' loop (eqx.filter_jit step, vmapped module, host batches)", equinox_loop),
)


def contenders(data: Data, per_step: bool) -> dict[str, Loop]:
    """The batch-16 contenders, built and warmed up in the order they take turns in: the peers, each backend
    fused (and per step, if ``per_step``), the step's two parts apart (``bound``, ``optimizer``) and the GEMM bound."""
    loops = {name: build(data.images, data.labels) for name, _, build in PEERS}
    for name in BACKENDS:
        each, fused = backend_runs(name, data.device, CHUNK, per_step=per_step)
        loops[f"{name}/fused"] = fused
        if each is not None:
            loops[f"{name}/per_step"] = each
    loops["bound"] = gradient_only_run(data.device, CHUNK)
    loops["optimizer"] = optimizer_only_run(CHUNK)
    loops["gemm"] = gemm_run(jax.eval_shape(lambda: vae.init(jax.random.PRNGKey(0), vae.VAEConfig())), CHUNK)
    return loops


class Row(NamedTuple):
    """A row of the batch-16 table: its label, the contender it shows, and whether it runs the model's matmuls (else no MFU)."""

    label: str
    contender: str
    model: bool = True


BOUND_ROWS = (
    Row("functional, fused, loss+gradients only (no optimiser)", "bound"),
    Row("functional, fused, AdamW's update only (no model)", "optimizer", model=False),
    Row("the two parts' times added: loss+gradients, then the update", "parts"),
    Row("in-run GEMM bound: the step's matmuls only (forward, dX, dW at the model's shapes), fused", "gemm"),
)
LOOP_TABLE = Table((("loop", "{label}"), ("steps/s", "{rate:.0f}"), ("× tutorial loop", "{tutorial:.2f}"),
                    ("of GEMM bound", "{gemm:.2f}"), ("MFU", "{mfu}"), ("compile s", "{compile}")))


def loop_rows(timed: Iterable[str]) -> list[Row]:
    """The batch-16 table's rows, in order: the peers, the per-step loops that were ``timed``, the fused ones, the bounds."""
    timed = set(timed)
    return [*(Row(label, name) for name, label, _ in PEERS),
            *(Row(f"{name}, per step", f"{name}/per_step") for name in BACKENDS if f"{name}/per_step" in timed),
            *(Row(f"{name}, fused", f"{name}/fused") for name in BACKENDS), *BOUND_ROWS]


def mfu(rate: float, result: dict) -> float:
    """Model FLOPs utilisation at ``rate`` steps/s: the step's matmul FLOPs against the float32 matmul peak of this run."""
    return rate * result["model_flops_per_step"] / (result["matmul_gflops"] * 1e9)


def loop_cells(turns: Turns, row: Row, result: dict) -> dict:
    """What :data:`LOOP_TABLE` shows of ``row``: steps/s, paired against the tutorial's loop and the GEMM bound, MFU, compile s."""
    rate, loop = turns.rate(row.contender), turns.loops.get(row.contender)
    seconds = None if loop is None else loop.compile_seconds
    return {"label": row.label, "rate": rate, "tutorial": turns.ratio(row.contender, "tutorial"), "gemm": turns.ratio(row.contender, "gemm"),
            "mfu": f"{mfu(rate, result):.1%}" if row.model else "—", "compile": "—" if seconds is None else f"{seconds:.1f}"}


def by_backend(turns: Turns, form: str, figure: Callable[[str], Any]) -> dict[str, Any]:
    """``figure`` of each backend's ``form`` contender (``"fused"`` or ``"per_step"``) that was timed, by backend."""
    return {name: figure(f"{name}/{form}") for name in BACKENDS if f"{name}/{form}" in turns.rates}


def rate_of(name: str) -> Callable[[Turns, dict], float]:
    """The figure: ``name``'s median steps/s."""
    return lambda turns, result: turns.rate(name)


def fused_against(other: str) -> Callable[[Turns, dict], dict[str, float]]:
    """The figure: each backend's fused loop against ``other``, paired within each repeat."""
    return lambda turns, result: by_backend(turns, "fused", lambda name: turns.ratio(name, other))


def spread(values: Iterable[float]) -> float:
    """How far apart ``values`` are: the largest over the smallest, less one."""
    values = list(values)
    return max(values) / min(values) - 1


# The batch-16 JSON keys in the order written, each from the contenders' turns (t) and the figures before it (r).
# Every ratio pairs the two loops within each repeat (paired_ratio), so the host's drift between repeats cancels.
FIGURES = (
    ("gemm_bound_steps_per_s", rate_of("gemm")),
    ("gradient_only_steps_per_s", rate_of("bound")),
    ("tutorial_loop_steps_per_s", rate_of("tutorial")),
    ("nnx_loop_steps_per_s", rate_of("nnx_loop")),
    ("equinox_loop_steps_per_s", rate_of("equinox_loop")),
    ("per_step_steps_per_s", lambda t, r: by_backend(t, "per_step", t.rate)),
    ("fused_steps_per_s", lambda t, r: by_backend(t, "fused", t.rate)),
    ("compile_seconds", lambda t, r: by_backend(t, "fused", lambda name: t.loops[name].compile_seconds)),
    ("fused_peak_bytes", lambda t, r: by_backend(t, "fused", lambda name: t.loops[name].peak_bytes)),
    ("mfu", lambda t, r: by_backend(t, "fused", lambda name: mfu(t.rate(name), r))),
    ("nnx_loop_vs_tutorial_loop", lambda t, r: t.ratio("nnx_loop", "tutorial")),
    ("fused_vs_tutorial_loop", fused_against("tutorial")),
    ("fused_vs_nnx_loop", fused_against("nnx_loop")),
    ("fused_vs_equinox_loop", fused_against("equinox_loop")),
    ("fraction_of_bound", fused_against("gemm")),
    ("fused_vs_functional", fused_against("functional/fused")),
    ("optimizer_only_steps_per_s", rate_of("optimizer")),
    ("parts_steps_per_s", rate_of("parts")),
    ("fraction_of_parts", fused_against("parts")),
    ("fused_spread", lambda t, r: spread(r["fused_vs_functional"].values())),
    ("same_program_spread", lambda t, r: spread(r["fused_vs_functional"][name] for name in SAME_PROGRAM)),
)
SUMMARY = (  # the lines under the table: how each starts, the per-backend figure it lists, each value's format
    ("\nfraction of the GEMM bound, fused: ", "fraction_of_bound", ".2f"),
    ("fraction of the two parts' added times, fused: ", "fraction_of_parts", ".2f"),
    ("fused, against the functional form in the same repeat: ", "fused_vs_functional", ".3f"),
)


def batch_16(args: Any, data: Data, result: dict) -> None:
    """The batch-16 section: every contender taking turns a chunk at a time, its figures into ``result``, the table."""
    result["matmul_gflops"] = matmul_gflops()
    result["model_flops_per_step"] = model_flops_per_step(vae.VAEConfig())
    turns = take_turns(contenders(data, per_step=not args.quick), args.steps, args.repeats, slices=args.steps // CHUNK)
    # the step's two parts timed apart, their times added repeat by repeat: what the step would take run one after the other
    turns.derive("parts", lambda grads, update: 1 / (1 / grads + 1 / update), "bound", "optimizer")
    for key, figure in FIGURES:
        result[key] = figure(turns, result)
    print(f"device {result['device']}, batch {BATCH}, model {result['model_flops_per_step'] / 1e6:.1f} MFLOP/step, "
          f"matmul peak {result['matmul_gflops']:.1f} GFLOP/s, {args.steps} steps x {args.repeats} repeats\n")
    LOOP_TABLE.show(loop_cells(turns, row, result) for row in loop_rows(turns.rates))
    for lead, key, spec in SUMMARY:
        print(lead + ", ".join(f"{name} {value:{spec}}" for name, value in result[key].items()))
    print(f"fused backends within {result['fused_spread']:.1%} of each other ({', '.join(SAME_PROGRAM)} hand XLA one program, "
          f"tests/test_loop.py: the {result['same_program_spread']:.1%} between them is this run's noise)\n")


def scaling_section(args: Any, data: Data, result: dict) -> None:
    """How cost grows with the batch: the tutorial's way against the fused loop (the MLP only, on half the images, with ``--quick``)."""
    print("how cost grows with the batch (functional fused vs the tutorial's way):", flush=True)
    result["scaling"] = scaling(data.images, data.labels, data.device, args.repeats, ("mlp",) if args.quick else ("mlp", "conv"),
                                share=0.5 if args.quick else 1.0)
    SCALING_TABLE.show(result["scaling"], lead="\n")


def sweeps(args: Any, data: Data, result: dict) -> None:
    """The sweep section of a full run (the MLP only, 1 and 4 members, with ``--quick``)."""
    print("\nsweeps: M members in one vmapped program against the same runs one after another:", flush=True)
    result["sweep"] = sweep_section(data.device, args.repeats, ("mlp",) if args.quick else ("mlp", "conv"),
                                    (1, 4) if args.quick else SWEEP_MEMBERS)
    SWEEP_TABLE.show(result["sweep"]["rows"], lead="\n")


def sweeps_alone(args: Any, data: Data, result: dict) -> None:
    """``--sweep``: only the sweep section, every model and member count."""
    print(f"sweeps: M members in one vmapped program against M fused runs one after another, batch {BATCH}:", flush=True)
    result["sweep"] = sweep_section(data.device, args.repeats)
    SWEEP_TABLE.show(result["sweep"]["rows"], lead="\n")


def train_run_section(args: Any, data: Data, result: dict) -> int | None:
    """``--train-run``: :func:`train_run` against the fused functional loop; a failed run's exit status (2 stays 2, else 1)."""
    _, fused = backend_runs("functional", data.device, CHUNK, per_step=False)
    print(f"train.py --epochs {TRAIN_RUN_EPOCHS} (whole fit) against the fused functional loop, batch {BATCH}:", flush=True)
    try:
        result["train_run"] = train_run(fused.run, args.data, rounds=3, steps=args.steps)
    except TrainRunFailed as err:  # train.py's own usage error (bad data, say) stays exit status 2
        print(f"bench.py: error: {err}", file=sys.stderr)
        return 2 if err.returncode == 2 else 1
    print(f"train.py reaches {result['train_run']['ratio']:.2f} of the fused loop (median of 3 runs)")
    return None


FULL_RUN = (batch_16, scaling_section, sweeps)


def parser() -> Parser:
    """The command line's flags."""
    p = Parser(prog="bench.py", description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--steps", type=int, default=None, help="steps per timed repeat at batch 16, a multiple of 100 (default 800; 200 with "
                   f"--quick; {TRAIN_RUN_REFERENCE} with --train-run)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported (default 5; 2 with --quick)")
    p.add_argument("--quick", action="store_true", help="a check in under a minute: fewer steps and repeats, "
                   "no per-step rows, the scaling table for the MLP only")
    p.add_argument("--train-run", action="store_true", help="instead: train.py --epochs 3 (whole fit, three runs) "
                   "against the fused loop timed around each run (about 80 s; needs MNIST)")
    p.add_argument("--data", type=Path, default=None, help="MNIST for --train-run, as train.py's --data (default: its cache)")
    p.add_argument("--sweep", action="store_true", help="instead: only the sweep section, M = 1, 4, 16, 64 members "
                   "in one program against the same runs one after another, MLP and conv (about 4 minutes on 2 cores)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the sections ``argv`` asks for (the module's docstring) and prints them.

    Returns:
        0; or, where a ``train.py`` run of ``--train-run`` failed, 2 for its usage error and 1 otherwise.
    """
    flags = parser()
    args = flags.parse_args(argv)
    if args.steps is None:
        args.steps = 200 if args.quick else TRAIN_RUN_REFERENCE if args.train_run else 800
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.steps < 100 or args.steps % 100 or args.repeats < 1:  # the loops run whole chunks of 100 steps
        flags.error("--steps must be a multiple of 100 and --repeats >= 1")
    if args.data is not None and not args.data.exists():
        flags.error(f"--data {args.data} does not exist")
    if args.train_run:  # on a GPU, this process and each train.py beside it take memory as they need it, not 75% each
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    began = time.perf_counter()
    data = synthetic_mnist()
    result = {"device": str(jax.devices()[0]), "batch_size": BATCH, "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "quick": args.quick, "steps": args.steps, "repeats": args.repeats}
    sections = (train_run_section,) if args.train_run else (sweeps_alone,) if args.sweep else FULL_RUN
    for section in sections:
        if status := section(args, data, result):
            return status
    result["seconds"] = time.perf_counter() - began
    if sections is FULL_RUN:
        print(f"\nbench took {result['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
