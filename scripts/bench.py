"""Side-by-side training throughput: the tutorial's loop, the NNX docs' loop, each backend per step and fused.

    .venv/bin/python scripts/bench.py [--json bench.json] [--steps 800] [--repeats 5]

All in one process, batch 16, the full-size VAE, adamw(1e-4). Throughput is the median of
``--repeats`` timed runs after a warm-up, all the loops taking turns in every repeat;
compile time is measured separately. A float32
matmul measured in the same run stands in for the machine's peak, for the MFU column; a fused scan
of only the step's own matrix products (``gemm_run``) is the in-run bound each fused loop is
reported against (``fraction_of_bound``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pureflax import loop, losses, train, vae
from pureflax.compat import flax_models, nnx_models
from pureflax.compat.backends import BACKENDS, get_backend
from pureflax.step import Batch

BATCH, NUM_CLASSES, KL_WEIGHT = 16, 10, 0.5


def model_flops_per_step(config: vae.VAEConfig, batch: int = BATCH) -> int:
    """Matmul FLOPs of one train step: forward 2·B·Σ(in·out) over the dense layers, backward twice that."""
    params = jax.eval_shape(lambda: vae.init(jax.random.PRNGKey(0), config))
    macs = sum(leaf.shape[0] * leaf.shape[1] for leaf in jax.tree_util.tree_leaves(params) if leaf.ndim == 2)
    return 3 * 2 * batch * macs


def interleaved_rates(runs: dict, steps: int, repeats: int) -> dict[str, float]:
    """Median steps/s of each ``run(steps)`` (which blocks until done), the runs taking turns.

    Taking turns within each repeat spreads the machine's slow and fast moments over all
    contenders, so their ratios are fair on a shared, noisy machine.
    """
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run(steps)
            rates[name].append(steps / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


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


def tutorial_loop(images: np.ndarray, labels: np.ndarray):
    """The tutorial's training loop as the tutorial writes it: linen VAE, jitted step, host batches."""
    batch_size, latent_dim, num_classes, kl_weight = BATCH, 32, NUM_CLASSES, KL_WEIGHT
    key = jax.random.PRNGKey(0xFFFF)

    def create_train_step(key, model, optimiser):
        params = model.init(key, jnp.zeros((batch_size, 784)), jnp.zeros((batch_size, num_classes)), jax.random.PRNGKey(0))
        opt_state = optimiser.init(params)

        def loss_fn(params, x, c, key):
            reduce_dims = list(range(1, len(x.shape)))
            c = jax.nn.one_hot(c, num_classes)
            recon, mean, logvar = model.apply(params, x, c, key)
            mse_loss = optax.l2_loss(recon, x).sum(axis=reduce_dims).mean()
            kl_loss = jnp.mean(-0.5 * jnp.sum(1 + logvar - mean**2 - jnp.exp(logvar), axis=reduce_dims))
            loss = mse_loss + kl_weight * kl_loss
            return loss, (mse_loss, kl_loss)

        @jax.jit
        def train_step(params, opt_state, x, c, key):
            losses, grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, c, key)
            loss, (mse_loss, kl_loss) = losses
            updates, opt_state = optimiser.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return params, opt_state, loss, mse_loss, kl_loss

        return train_step, params, opt_state

    key, model_key = jax.random.split(key)
    model = flax_models.VAE(latent_dim=latent_dim)
    optimiser = optax.adamw(learning_rate=1e-4)
    train_step, params, opt_state = create_train_step(model_key, model, optimiser)
    state = {"params": params, "opt_state": opt_state, "key": key}
    num_batches = len(labels) // batch_size

    def run(n: int) -> None:
        params, opt_state, key = state["params"], state["opt_state"], state["key"]
        total_loss, total_mse, total_kl = 0.0, 0.0, 0.0
        for i in range(n):
            key, subkey = jax.random.split(key)
            j = i % num_batches
            batch = images[j * batch_size : (j + 1) * batch_size].reshape(batch_size, 784)  # host numpy, as from the DataLoader
            c = labels[j * batch_size : (j + 1) * batch_size]
            params, opt_state, loss, mse_loss, kl_loss = train_step(params, opt_state, batch, c, subkey)
            total_loss += loss
            total_mse += mse_loss
            total_kl += kl_loss
        jax.block_until_ready(params)
        state.update(params=params, opt_state=opt_state, key=key)

    run(50)  # compile and warm up
    return run


def nnx_loop(images: np.ndarray, labels: np.ndarray):
    """The loop the Flax NNX docs teach: NNX VAE, ``nnx.Optimizer``, ``@nnx.jit`` step, host batches.

    The model and optimiser are mutable objects passed to the jitted step, which updates them
    in place (``optimizer.update(model, grads)``). Batches, keys and the running loss totals
    are handled on the host exactly as in :func:`tutorial_loop`, so the two loops differ only
    in how the step is written and called.
    """
    batch_size, latent_dim, num_classes, kl_weight = BATCH, 32, NUM_CLASSES, KL_WEIGHT
    key = jax.random.PRNGKey(0xFFFF)
    model = nnx_models.VAE(latent_dim=latent_dim, num_classes=num_classes, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(learning_rate=1e-4), wrt=nnx.Param)

    def loss_fn(model, x, c, key):
        recon, mean, logvar = model(x, c, key)
        return losses.vae_loss(recon, x, mean, logvar, kl_weight)

    @nnx.jit
    def train_step(model, optimizer, x, c, key):
        c = jax.nn.one_hot(c, num_classes)
        (loss, (mse_loss, kl_loss)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, x, c, key)
        optimizer.update(model, grads)
        return loss, mse_loss, kl_loss

    state = {"key": key}
    num_batches = len(labels) // batch_size

    def run(n: int) -> None:
        key = state["key"]
        total_loss, total_mse, total_kl = 0.0, 0.0, 0.0
        for i in range(n):
            key, subkey = jax.random.split(key)
            j = i % num_batches
            batch = images[j * batch_size : (j + 1) * batch_size].reshape(batch_size, 784)  # host numpy, as from the DataLoader
            c = labels[j * batch_size : (j + 1) * batch_size]
            loss, mse_loss, kl_loss = train_step(model, optimizer, batch, c, subkey)
            total_loss += loss
            total_mse += mse_loss
            total_kl += kl_loss
        jax.block_until_ready(nnx.state(model))
        state.update(key=key)

    run(50)  # compile and warm up
    return run


def backend_runs(name: str, data: Batch, chunk: int):
    """(per-step run, fused run, fused compile seconds) for one backend, both warmed up."""
    config = train.TrainConfig()
    backend = get_backend(name, config.model)
    state, _, _, train_step = train.build(config, backend, 10**6, jax.random.PRNGKey(0xFFFF))
    order = loop.epoch_order(jax.random.PRNGKey(1), int(data.labels.shape[0]), BATCH)
    key = jax.random.PRNGKey(2)
    fused = loop.make_fused_runner(train_step)
    holder = {"state": state}

    start = time.perf_counter()
    fused.lower(holder["state"], data, order, 0, key, chunk).compile()  # the whole fused chunk: trace, lower, compile
    compile_seconds = time.perf_counter() - start

    def run_with(runner):
        def run(n: int) -> None:
            for done in range(0, n, chunk):
                start_step = done % (int(order.shape[0]) - chunk)
                holder["state"], metrics = runner(holder["state"], data, order, start_step, key, min(chunk, n - done))
            metrics.block_until_ready()

        return run

    runs = run_with(loop.make_per_step_runner(train_step)), run_with(fused)
    for run in runs:
        run(chunk)  # compile and warm up
    return runs[0], runs[1], compile_seconds


def gradient_only_run(data: Batch, chunk: int):
    """The bound: fused steps that compute the loss and gradients but skip the optimiser update."""
    config = train.TrainConfig()
    state, _, loss_fn, _ = train.build(config, get_backend("functional", config.model), 10**6, jax.random.PRNGKey(0xFFFF))

    def grad_step(state, batch, key):
        (loss, (mse, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, jax.random.fold_in(key, state.step))
        kept = jax.tree_util.tree_map(lambda p, g: p - 0.0 * g, state.params, grads)  # keeps the gradients computed
        return state._replace(step=state.step + 1, params=kept), (loss, mse, kl)

    fused = loop.make_fused_runner(grad_step)
    order = loop.epoch_order(jax.random.PRNGKey(1), int(data.labels.shape[0]), BATCH)
    holder = {"state": state}

    def run(n: int) -> None:
        for done in range(0, n, chunk):
            holder["state"], metrics = fused(holder["state"], data, order, done % (int(order.shape[0]) - chunk), jax.random.PRNGKey(2), min(chunk, n - done))
        metrics.block_until_ready()

    run(chunk)
    return run


def gemm_shapes(params, batch: int = BATCH) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The matrix products of one train step, from the params' 2-D kernels (in, out) at ``batch``:
    forward ``x @ W``, input gradient ``dY @ W.T`` and weight gradient ``X.T @ dY``, each as (lhs, rhs) shapes."""
    shapes = []
    for kernel in (leaf for leaf in jax.tree_util.tree_leaves(params) if leaf.ndim == 2):
        n_in, n_out = kernel.shape
        shapes += [((batch, n_in), (n_in, n_out)), ((batch, n_out), (n_out, n_in)), ((n_in, batch), (batch, n_out))]
    return shapes


def gemm_run(params, chunk: int, batch: int = BATCH):
    """The in-run bound: a fused ``lax.scan`` of only the step's matrix products, at the model's own shapes.

    Each product reads a scalar the one before it wrote, so XLA can neither hoist, drop nor overlap
    them: one after another, as a step's forward and input-gradient products are (its weight
    gradients could overlap those; a scale and a sum per product ride along).
    """
    shapes = gemm_shapes(params, batch)
    keys = jax.random.split(jax.random.PRNGKey(3), 2 * len(shapes))
    operands = [(jax.random.normal(keys[2 * i], a), jax.random.normal(keys[2 * i + 1], b)) for i, (a, b) in enumerate(shapes)]

    @jax.jit
    def chunk_of(carry, operands):
        def body(carry, _):
            for lhs, rhs in operands:  # each product scaled by the one before: in order, none dropped or hoisted
                carry = jnp.sum((lhs * (1.0 + carry * 1e-30)) @ rhs) * 1e-30
            return carry, None

        return jax.lax.scan(body, carry, None, length=chunk)[0]

    holder = {"carry": jnp.zeros(())}

    def run(n: int) -> None:
        for _ in range(max(1, n // chunk)):
            holder["carry"] = chunk_of(holder["carry"], operands)
        holder["carry"].block_until_ready()

    run(chunk)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--steps", type=int, default=800, help="steps per timed repeat (default 800)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats, median reported (default 5)")
    args = parser.parse_args(argv)
    if args.steps < 100 or args.repeats < 1:
        parser.error("--steps must be >= 100 and --repeats >= 1")

    rng = np.random.default_rng(0)
    images = (rng.integers(0, 256, (4096, 784)) / 255.0).astype(np.float32)  # like ToTensor() output
    labels = rng.integers(0, NUM_CLASSES, 4096).astype(np.int32)
    device_data = Batch(jax.device_put((images * 255).round().astype(np.uint8)), jax.device_put(labels))

    result = {"device": str(jax.devices()[0]), "batch_size": BATCH, "xla_flags": os.environ.get("XLA_FLAGS", "")}
    result["matmul_gflops"] = matmul_gflops()
    result["model_flops_per_step"] = model_flops_per_step(vae.VAEConfig())
    runs, compile_seconds = {"tutorial": tutorial_loop(images, labels), "nnx_loop": nnx_loop(images, labels)}, {}
    for name in BACKENDS:
        runs[f"{name}/per_step"], runs[f"{name}/fused"], compile_seconds[name] = backend_runs(name, device_data, 100)
    runs["bound"] = gradient_only_run(device_data, 100)
    runs["gemm"] = gemm_run(jax.eval_shape(lambda: vae.init(jax.random.PRNGKey(0), vae.VAEConfig())), 100)
    rates = interleaved_rates(runs, args.steps, args.repeats)
    result["gemm_bound_steps_per_s"] = rates["gemm"]
    result["gradient_only_steps_per_s"] = rates["bound"]
    result["tutorial_loop_steps_per_s"] = rates["tutorial"]
    result["nnx_loop_steps_per_s"] = rates["nnx_loop"]
    per_step = result["per_step_steps_per_s"] = {name: rates[f"{name}/per_step"] for name in BACKENDS}
    fused = result["fused_steps_per_s"] = {name: rates[f"{name}/fused"] for name in BACKENDS}
    result["compile_seconds"] = compile_seconds
    result["mfu"] = {name: rate * result["model_flops_per_step"] / (result["matmul_gflops"] * 1e9) for name, rate in fused.items()}
    result["nnx_loop_vs_tutorial_loop"] = rates["nnx_loop"] / rates["tutorial"]
    result["fused_vs_nnx_loop"] = {name: rate / rates["nnx_loop"] for name, rate in fused.items()}
    result["fraction_of_bound"] = {name: rate / rates["gemm"] for name, rate in fused.items()}

    base = result["tutorial_loop_steps_per_s"]
    print(f"device {result['device']}, batch {BATCH}, model {result['model_flops_per_step'] / 1e6:.1f} MFLOP/step, "
          f"matmul peak {result['matmul_gflops']:.1f} GFLOP/s\n")
    nnx_base = result["nnx_loop_steps_per_s"]

    def mfu(rate: float) -> str:
        return f"{rate * result['model_flops_per_step'] / (result['matmul_gflops'] * 1e9):.1%}"

    print("| loop | steps/s | × tutorial loop | × NNX loop | MFU | compile s |")
    print("|---|---|---|---|---|---|")
    print(f"| tutorial's loop (linen, jitted step, host batches) | {base:.0f} | 1.00 | {base / nnx_base:.2f} | {mfu(base)} | — |")
    print(f"| NNX docs' loop (nnx.jit step, nnx.Optimizer, host batches) | {nnx_base:.0f} | {nnx_base / base:.2f} | 1.00 | "
          f"{mfu(nnx_base)} | — |")
    for name in BACKENDS:
        print(f"| {name}, per step | {per_step[name]:.0f} | {per_step[name] / base:.2f} | {per_step[name] / nnx_base:.2f} | — | — |")
    for name in BACKENDS:
        print(f"| {name}, fused | {fused[name]:.0f} | {fused[name] / base:.2f} | {fused[name] / nnx_base:.2f} | "
              f"{result['mfu'][name]:.1%} | {compile_seconds[name]:.1f} |")
    print(f"| bound: functional, fused, loss+gradients only (no optimiser) | {rates['bound']:.0f} | {rates['bound'] / base:.2f} | "
          f"{rates['bound'] / nnx_base:.2f} | {mfu(rates['bound'])} | — |")
    print(f"| in-run GEMM bound: the step's matmuls only (forward, dX, dW at the model's shapes), fused | {rates['gemm']:.0f} | "
          f"{rates['gemm'] / base:.2f} | {rates['gemm'] / nnx_base:.2f} | {mfu(rates['gemm'])} | — |")
    print("\nfraction of the GEMM bound, fused: " + ", ".join(f"{name} {value:.2f}" for name, value in result["fraction_of_bound"].items()))
    spread = max(fused.values()) / min(fused.values()) - 1
    print(f"\nfused backends within {spread:.1%} of each other")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
