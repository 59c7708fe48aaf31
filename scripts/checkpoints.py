"""Inspect and export the checkpoints of a run.

    .venv/bin/python scripts/checkpoints.py list   runs/vae            # steps, sizes, the latest and the best
    .venv/bin/python scripts/checkpoints.py show   runs/vae [--step N] # position, metrics and the param tree
    .venv/bin/python scripts/checkpoints.py export runs/vae params.npz [--step N]   # or params.safetensors
    .venv/bin/python scripts/checkpoints.py convert runs/vae --to equinox vae.eqx [--step N]

DIR is a run folder (``--out`` of train.py) or its ``checkpoints/`` folder. Exported params
are flat, keyed by their functional path (``encoder/Dense_0/kernel``), as saved (float32).
``convert --to FORM FILE`` writes the model in that library's own format (equinox: ``.eqx``
by ``eqx.tree_serialise_leaves``; flax: ``.msgpack`` by ``flax.serialization.to_bytes``;
nnx: an orbax checkpoint folder of ``nnx.state(model)`` as a pure dict; functional:
``.safetensors`` or ``.npz``) and prints the Python that loads it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from pureflax.cli import Parser


def checkpoints_dir(path: Path) -> Path:
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cmd_list(directory: Path) -> None:
    from pureflax import checkpoint

    steps = checkpoint.all_steps(directory)
    latest, best = (steps[-1] if steps else None), checkpoint.best_step(directory)
    print(f"{directory}: {len(steps)} checkpoint(s)")
    print(f"{'step':>8}  {'epoch':>5}  {'test loss':>10}  {'size':>10}  note")
    for step in steps:
        try:
            meta, why = checkpoint.verify(directory, step), None
        except checkpoint.Damaged as err:
            meta, why = {}, err.why
        if why is not None and not (directory / str(step)).exists():
            continue  # deleted meanwhile by a run that keeps the newest N
        notes = [n for n, s in (("latest", latest), ("best", best)) if s == step] + [f"damaged: {why}" if why else "verified"]
        loss = meta.get("test_loss")
        shown = f"{loss:.4f}" if isinstance(loss, (int, float)) else "-"
        print(f"{step:>8}  {str(meta.get('epoch', '-')):>5}  {shown:>10}  "
              f"{folder_size(directory / str(step)) / 1e6:>8.2f}MB  {', '.join(notes)}")
    for name in checkpoint.set_aside_steps(directory):
        print(f"set aside: {name} (damaged; kept for inspection)")
    for name in checkpoint.temporary(directory):
        print(f"unfinished: {name} ({folder_size(directory / name) / 1e6:.2f}MB; a save cut short, removed when the next run starts)")
    for step in checkpoint.stray_steps(directory):
        print(f"ignored: {step}/ (a step folder that holds no checkpoint; set aside when the run resumes)")
    for name in checkpoint.foreign(directory):
        print(f"foreign: {name} (not pureflax's; never read or changed)")


def cmd_show(directory: Path, step: int, meta: dict, leaves: dict) -> None:
    print(f"step {step} in {directory} (verified)")
    for key in ("backend", "epoch", "seed", "test_loss"):
        if meta.get(key) is not None:
            print(f"  {key}: {meta[key]}")
    for part in ("params", "model_state"):  # model_state: BatchNorm's running statistics (--model conv)
        arrays = {path[len(part) + 1:]: v for path, v in leaves.items() if path.startswith(part + "/")}
        if part == "params" or arrays:
            print(f"  {part}: {len(arrays)} arrays, {sum(int(np.prod(shape)) for shape, _ in arrays.values()):,} values")
        for name, (shape, dtype) in arrays.items():
            print(f"    {name:40s} {str(shape):14s} {dtype}")


def cmd_export(directory: Path, target: Path, step: int | None) -> None:
    from pureflax import checkpoint

    step, params = checkpoint.read_verified(directory, lambda folder, at: checkpoint.restore_raw(folder, at)["params"], step)
    count = checkpoint.write_params(params, target)
    print(f"exported {count} arrays of step {step} to {target}")


def cmd_convert(directory: Path, form: str, target: Path, step: int | None) -> None:
    from pureflax.compat import trained

    step, code = trained.convert_run(directory, form, target, step=step)
    print(f"wrote step {step} of {directory} as {form} to {target}; load it with:\n")
    print(code, end="")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="checkpoints.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("list", "show", "export", "convert"):
        sub = commands.add_parser(name)
        sub.error = parser.error  # one-line errors for subcommands too
        sub.add_argument("dir", type=Path, help="a run folder or its checkpoints/ folder")
        if name == "export":
            sub.add_argument("target", type=Path, help="output file: .npz or .safetensors")
        if name == "convert":
            sub.add_argument("--to", required=True, metavar="FORM", help="functional, equinox, flax or nnx")
            sub.add_argument("target", type=Path, help="output: .eqx (equinox), .msgpack (flax), .safetensors or .npz (functional), "
                             "a new folder (nnx: an orbax checkpoint)")
        if name != "list":
            sub.add_argument("--step", type=int, default=None, help="which step (default: the latest)")
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        parser.error(f"{args.dir} is not a folder")
    directory = checkpoints_dir(args.dir)

    from pureflax import checkpoint

    steps = checkpoint.all_steps(directory)
    if not steps and not (args.command == "list" and checkpoint.pureflax_names(directory)):
        parser.error(f"{directory} holds no checkpoints")
    if getattr(args, "step", None) is not None and args.step not in steps:
        parser.error(f"--step {args.step}: not a checkpoint in {directory} (steps: {', '.join(map(str, steps))})")
    if args.command == "list":
        cmd_list(directory)
        return 0
    try:
        if args.command == "show":
            step, (meta, leaves) = checkpoint.read_verified(
                directory, lambda folder, at: (checkpoint.verify(folder, at), checkpoint.saved_leaves(folder, at)), args.step)
            cmd_show(directory, step, meta, leaves)
            return 0
        if args.command == "export" and args.target.suffix not in checkpoint.PARAM_FILES:
            parser.error(f"{args.target}: export writes .npz or .safetensors")
        if not args.target.parent.is_dir():
            parser.error(f"{args.target}: the folder {args.target.parent} does not exist; create it or choose another path")
        if args.command == "convert":
            cmd_convert(directory, args.to, args.target, args.step)
        else:
            cmd_export(directory, args.target, args.step)
    except checkpoint.CheckpointError as err:  # damaged, missing, every step damaged
        parser.error(f"{err}; see: checkpoints.py list {directory}")
    except ValueError as err:  # an unknown form, a suffix the form does not write
        parser.error(str(err))
    except BrokenPipeError:
        raise
    except OSError as err:
        parser.error(f"{args.target}: cannot write it ({err.strerror or err})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `show X | head` closed the pipe: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        sys.exit(0)
