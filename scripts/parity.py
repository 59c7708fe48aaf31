"""Measure cross-backend agreement and print it as the markdown table of docs/parity.md.

    .venv/bin/python scripts/parity.py            # real MNIST for the training rows (cached or fetched)
    .venv/bin/python scripts/parity.py --synthetic  # MNIST-like synthetic images only, no data needed
    .venv/bin/python scripts/parity.py --model conv # the convolutional VAE (BatchNorm statistics compared too)

Every figure is the largest over the six pairs of the four forms; the per-pair figures are
printed below the table.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from pureflax import data as data_lib, models, step as step_lib
from pureflax.cli import Parser
from pureflax.compat import parity

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import train as train_script  # noqa: E402  (scripts/train.py, run in-process)


def mnist_batches(mnist: data_lib.MNIST, count: int, size: int = 16) -> list[step_lib.Batch]:
    images, labels = jnp.asarray(mnist.train.images[: count * size]), jnp.asarray(mnist.train.labels[: count * size])
    return [step_lib.Batch(images[i * size : (i + 1) * size], labels[i * size : (i + 1) * size]) for i in range(count)]


def cli_runs(data: Path, root: Path, steps: int, model: str = "mlp") -> dict[str, Path]:
    runs = {}
    for name in parity.NAMES:
        runs[name] = root / name
        code = train_script.main(["--backend", name, "--model", model, "--data", str(data), "--out", str(runs[name]),
                                  "--max-steps", str(steps), "--seed", "0xffff"])
        if code != 0:
            raise SystemExit(f"train.py --backend {name} failed with status {code}")
    return runs


def main() -> None:
    parser = Parser(prog="parity.py", description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", action="store_true", help="use MNIST-like synthetic images, no dataset")
    parser.add_argument("--data", type=Path, default=None, help="local MNIST, as for train.py")
    parser.add_argument("--model", choices=tuple(models.KINDS), default="mlp", help="which VAE (default mlp)")
    args = parser.parse_args()

    config, key = models.KINDS[args.model](), jax.random.PRNGKey(0xFFFF)
    params = "params and statistics" if jax.tree_util.tree_leaves(models.of(config).init_state()) else "params"
    train_py = "`train.py --max-steps 300`" if args.model == "mlp" else f"`train.py --model {args.model} --max-steps 300`"
    synthetic = [parity.random_batch(jax.random.PRNGKey(100 + i), 16) for i in range(200)]
    rows = [
        ("forward (recon, mean, logvar), inference mode, max abs", "≤ 1e-5", parity.forward_max_abs_diff(config, key, synthetic[0])),
        ("gradients, max relative", "≤ 1e-5", parity.grad_max_rel_diff(config, key, synthetic[1])),
        (f"{params} after 200 adamw(1e-4) steps, MNIST-like synthetic, max abs", "≤ 1e-4",
         parity.trained_params_max_abs_diff(config, key, synthetic)),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        if not args.synthetic:
            mnist = data_lib.load_mnist(args.data)
            rows.append((f"{params} after 200 adamw(1e-4) steps, real MNIST, max abs", "≤ 1e-4",
                         parity.trained_params_max_abs_diff(config, key, mnist_batches(mnist, 200))))
            rows.append((f"stress: {params} after 200 adamw(1e-3) steps, real MNIST, max abs", "—",
                         parity.trained_params_max_abs_diff(config, key, mnist_batches(mnist, 200), lr=1e-3)))
            data_lib.save_mnist(mnist, Path(tmp) / "mnist")
            runs = cli_runs(Path(tmp) / "mnist", Path(tmp), 300, args.model)
            rows.append((f"{train_py}, same seed, real MNIST: loss/mse/kl logs, max relative", "≤ 1e-3",
                         parity.log_max_rel_diff(runs)))
        rows.append((f"stress: {params} after 200 adamw(1e-3) steps, MNIST-like synthetic, max abs", "—",
                     parity.trained_params_max_abs_diff(config, key, synthetic, lr=1e-3)))
        noise = [parity.noise_batch(jax.random.PRNGKey(100 + i), 16) for i in range(200)]
        rows.append((f"stress: {params} after 200 adamw(1e-4) steps, uniform-noise images, max abs", "—",
                     parity.trained_params_max_abs_diff(config, key, noise)))

    print("| measure | limit | worst pair | functional–flax |")
    print("|---|---|---|---|")
    for name, limit, diffs in rows:
        print(f"| {name} | {limit} | {max(diffs.values()):.3g} | {diffs[('functional', 'flax')]:.3g} |")
    print()
    for name, _, diffs in rows:
        print(f"- {name}: " + ", ".join(f"{a}–{b} {v:.3g}" for (a, b), v in diffs.items()))


if __name__ == "__main__":
    main()
