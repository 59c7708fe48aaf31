"""Inspect and export the checkpoints of a run.

    python scripts/checkpoints.py list   runs/vae            # steps, sizes, the latest and the best
    python scripts/checkpoints.py show   runs/vae [--step N] # position, metrics and the param tree
    python scripts/checkpoints.py export runs/vae params.npz [--step N]   # or params.safetensors

DIR is a run folder (``--out`` of train.py) or its ``checkpoints/`` folder. Exported params
are flat, keyed by their functional path (``encoder/Dense_0/kernel``), float32.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"checkpoints.py: error: {message}\n")
        raise SystemExit(2)


def checkpoints_dir(path: Path) -> Path:
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def flat_params(tree) -> dict[str, np.ndarray]:
    from pureflax.optim import path_str
    import jax

    return {path_str(p): np.asarray(leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def cmd_list(directory: Path) -> None:
    from pureflax import checkpoint

    steps = checkpoint.all_steps(directory)
    latest, best = (steps[-1] if steps else None), checkpoint.best_step(directory)
    print(f"{directory}: {len(steps)} checkpoint(s)")
    print(f"{'step':>8}  {'epoch':>5}  {'test loss':>10}  {'size':>10}  note")
    for step in steps:
        meta = checkpoint.read_meta(directory, step)
        notes = [n for n, s in (("latest", latest), ("best", best)) if s == step]
        loss = meta.get("test_loss")
        print(f"{step:>8}  {meta.get('epoch', '-'):>5}  {loss if loss is None else f'{loss:.4f}':>10}  "
              f"{folder_size(directory / str(step)) / 1e6:>8.2f}MB  {', '.join(notes)}")
    for aside in sorted(directory.glob("*.damaged*")):
        print(f"set aside: {aside.name} (damaged; kept for inspection)")


def cmd_show(directory: Path, step: int | None) -> None:
    from pureflax import checkpoint

    step = checkpoint.latest_step(directory) if step is None else step
    meta = checkpoint.read_meta(directory, step)
    tree = checkpoint.restore_raw(directory, step)
    print(f"step {step} in {directory}")
    for key in ("backend", "epoch", "seed", "test_loss"):
        if key in meta:
            print(f"  {key}: {meta[key]}")
    params = flat_params(tree["params"])
    print(f"  params: {len(params)} arrays, {sum(a.size for a in params.values()):,} values")
    for name, array in params.items():
        print(f"    {name:40s} {str(array.shape):14s} {array.dtype}")


def cmd_export(directory: Path, target: Path, step: int | None) -> None:
    from pureflax import checkpoint

    step = checkpoint.latest_step(directory) if step is None else step
    params = flat_params(checkpoint.restore_raw(directory, step)["params"])
    if target.suffix == ".npz":
        np.savez(target, **params)
    else:
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in params.items()}, str(target))
    print(f"exported {len(params)} arrays of step {step} to {target}")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="checkpoints.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("list", "show", "export"):
        sub = commands.add_parser(name)
        sub.error = parser.error  # one-line errors for subcommands too
        sub.add_argument("dir", type=Path, help="a run folder or its checkpoints/ folder")
        if name == "export":
            sub.add_argument("target", type=Path, help="output file: .npz or .safetensors")
        if name != "list":
            sub.add_argument("--step", type=int, default=None, help="which step (default: the latest)")
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        parser.error(f"{args.dir} is not a folder")
    directory = checkpoints_dir(args.dir)

    from pureflax import checkpoint

    steps = checkpoint.all_steps(directory)
    if not steps:
        parser.error(f"{directory} holds no checkpoints")
    if getattr(args, "step", None) is not None and args.step not in steps:
        parser.error(f"--step {args.step}: not a checkpoint in {directory} (steps: {', '.join(map(str, steps))})")
    if args.command == "export" and args.target.suffix not in (".npz", ".safetensors"):
        parser.error(f"{args.target}: export writes .npz or .safetensors")
    if args.command == "list":
        cmd_list(directory)
    elif args.command == "show":
        cmd_show(directory, args.step)
    else:
        cmd_export(directory, args.target, args.step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
