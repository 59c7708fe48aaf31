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
``--quick`` (under a minute) takes fewer steps and repeats, leaves out the per-step rows and scales the MLP only.
``--train-run`` measures instead what a user's run reaches: ``train.py --epochs 3``, whole ``fit``, against the
fused loop timed around each run (:func:`train_run`).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pureflax import loop, losses, models, train, vae
from pureflax.cli import Parser
from pureflax.compat import equinox_models, flax_models, nnx_models
from pureflax.compat.backends import BACKENDS, get_backend
from pureflax.step import Batch

BATCH, NUM_CLASSES, KL_WEIGHT = 16, 10, 0.5


def model_flops_per_step(config: vae.VAEConfig, batch: int = BATCH) -> int:
    """Matmul FLOPs of one train step: forward 2·B·Σ(in·out) over the dense layers, backward twice that."""
    params = jax.eval_shape(lambda: vae.init(jax.random.PRNGKey(0), config))
    macs = sum(leaf.shape[0] * leaf.shape[1] for leaf in jax.tree_util.tree_leaves(params) if leaf.ndim == 2)
    return 3 * 2 * batch * macs


def interleaved_samples(runs: dict, steps: int, repeats: int, slices: int = 1) -> dict[str, list[float]]:
    """Steps/s of each run in every repeat: ``steps`` steps, as ``slices`` calls of ``run(steps // slices)``
    (each blocks until done), the runs taking turns slice by slice.

    Taking turns spreads the machine's slow and fast moments over all contenders, so their ratios
    are fair on a shared, noisy machine; the finer the slices, the closer in time the contenders run.
    Each round of turns starts one contender later than the round before, so none always runs
    right after the same neighbour.
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


def peak_bytes(compiled) -> int | None:
    """A compiled program's peak memory: its arguments, outputs not aliased to them, and scratch."""
    memory = compiled.memory_analysis()
    if memory is None:  # a backend that does not report it
        return None
    return memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes + memory.temp_size_in_bytes


class Loop(NamedTuple):
    """A contender: ``run(n)`` takes ``n`` steps and blocks; its compile seconds and peak bytes."""

    run: Callable[[int], None]
    compile_seconds: float | None = None
    peak_bytes: int | None = None


def compiled_and_seconds(jitted, *args):
    """``jitted`` lowered and compiled for ``args``, and the seconds that took."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def host_batch(images: np.ndarray, labels: np.ndarray, i: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Step ``i``'s batch as a data loader hands it over: numpy slices on the host, cycling through the data."""
    j = i % (len(labels) // batch_size)
    return images[j * batch_size : (j + 1) * batch_size].reshape(batch_size, -1), labels[j * batch_size : (j + 1) * batch_size]


def tutorial_loop(images: np.ndarray, labels: np.ndarray, batch_size: int = BATCH) -> Loop:
    """The tutorial's training loop as the tutorial writes it: linen VAE, jitted step, host batches."""
    latent_dim, num_classes, kl_weight = 32, NUM_CLASSES, KL_WEIGHT
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

    def run(n: int) -> None:
        params, opt_state, key = state["params"], state["opt_state"], state["key"]
        total_loss, total_mse, total_kl = 0.0, 0.0, 0.0
        for i in range(n):
            key, subkey = jax.random.split(key)
            batch, c = host_batch(images, labels, i, batch_size)  # host numpy, as from the DataLoader
            params, opt_state, loss, mse_loss, kl_loss = train_step(params, opt_state, batch, c, subkey)
            total_loss += loss
            total_mse += mse_loss
            total_kl += kl_loss
        jax.block_until_ready(params)
        state.update(params=params, opt_state=opt_state, key=key)

    x0, c0 = images[:batch_size].reshape(batch_size, 784), labels[:batch_size]
    compiled, seconds = compiled_and_seconds(train_step, params, opt_state, x0, c0, key)
    run(50)  # compile and warm up
    return Loop(run, seconds, peak_bytes(compiled))


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

    def run(n: int) -> None:
        key = state["key"]
        total_loss, total_mse, total_kl = 0.0, 0.0, 0.0
        for i in range(n):
            key, subkey = jax.random.split(key)
            batch, c = host_batch(images, labels, i, batch_size)  # host numpy, as from the DataLoader
            loss, mse_loss, kl_loss = train_step(model, optimizer, batch, c, subkey)
            total_loss += loss
            total_mse += mse_loss
            total_kl += kl_loss
        jax.block_until_ready(nnx.state(model))
        state.update(key=key)

    run(50)  # compile and warm up
    return Loop(run)


def equinox_loop(images: np.ndarray, labels: np.ndarray) -> Loop:
    """The loop the Equinox examples teach: an ``eqx.Module``, ``eqx.filter_jit`` step,
    ``eqx.filter_value_and_grad``, optax on ``eqx.filter(model, eqx.is_array)``, host batches.

    The model is written for one example and ``jax.vmap``-ed over the batch with one noise key
    per example, as Equinox code does; batches, keys and loss totals are handled on the host as in
    :func:`tutorial_loop`.
    """
    batch_size, latent_dim, num_classes, kl_weight = BATCH, 32, NUM_CLASSES, KL_WEIGHT
    key, model_key = jax.random.split(jax.random.PRNGKey(0xFFFF))
    model = equinox_models.VAE(latent_dim=latent_dim, key=model_key)
    optim = optax.adamw(learning_rate=1e-4)
    opt_state = optim.init(eqx.filter(model, eqx.is_array))

    def loss_fn(model, x, c, key):
        recon, mean, logvar = jax.vmap(model)(x, c, jax.random.split(key, x.shape[0]))
        return losses.vae_loss(recon, x, mean, logvar, kl_weight)

    @eqx.filter_jit
    def make_step(model, opt_state, x, c, key):
        c = jax.nn.one_hot(c, num_classes)
        (loss, (mse_loss, kl_loss)), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, x, c, key)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        model = eqx.apply_updates(model, updates)
        return model, opt_state, loss, mse_loss, kl_loss

    state = {"model": model, "opt_state": opt_state, "key": key}

    def run(n: int) -> None:
        model, opt_state, key = state["model"], state["opt_state"], state["key"]
        total_loss, total_mse, total_kl = 0.0, 0.0, 0.0
        for i in range(n):
            key, subkey = jax.random.split(key)
            x, c = host_batch(images, labels, i, batch_size)  # host numpy, as from the DataLoader
            model, opt_state, loss, mse_loss, kl_loss = make_step(model, opt_state, x, c, subkey)
            total_loss += loss
            total_mse += mse_loss
            total_kl += kl_loss
        jax.block_until_ready(eqx.filter(model, eqx.is_array))
        state.update(model=model, opt_state=opt_state, key=key)

    run(50)  # compile and warm up
    return Loop(run)


def backend_runs(name: str, data: Batch, chunk: int, model: models.ModelConfig = vae.VAEConfig(),
                 batch: int = BATCH, *, per_step: bool = True) -> tuple[Loop | None, Loop]:
    """(per step, fused) loops of one backend at ``batch``, both warmed up; the fused one with the
    seconds to compile a ``chunk``-step program and that program's peak memory."""
    config = train.TrainConfig(model=model, batch_size=batch)
    backend = get_backend(name, model)
    state, _, _, train_step = train.build(config, backend, 10**6, jax.random.PRNGKey(0xFFFF))
    order = loop.epoch_order(jax.random.PRNGKey(1), int(data.labels.shape[0]), batch)
    if int(order.shape[0]) <= chunk:
        raise ValueError(f"{data.labels.shape[0]} examples make {order.shape[0]} batches of {batch}: fewer than a chunk of {chunk}")
    key = jax.random.PRNGKey(2)
    fused = loop.make_fused_runner(train_step)
    holder = {"state": state}
    compiled, compile_seconds = compiled_and_seconds(fused, holder["state"], data, order, 0, key, chunk)  # trace, lower, compile

    def run_with(runner):
        def run(n: int) -> None:
            for done in range(0, n, chunk):
                start_step = done % (int(order.shape[0]) - chunk)
                holder["state"], metrics = runner(holder["state"], data, order, start_step, key, min(chunk, n - done))
            metrics.block_until_ready()

        return run

    runs = (run_with(loop.make_per_step_runner(train_step)) if per_step else None), run_with(fused)
    for run in runs:
        if run is not None:
            run(chunk)  # compile and warm up
    return (Loop(runs[0]) if per_step else None), Loop(runs[1], compile_seconds, peak_bytes(compiled))


def host_batch_loop(model: models.ModelConfig, images: np.ndarray, labels: np.ndarray, batch: int) -> Loop:
    """The tutorial's way of training any model: the Linen form's jitted step, one dispatch per step,
    each batch sliced on the host and sent with the call (for the MLP, :func:`tutorial_loop` is that)."""
    config = train.TrainConfig(model=model, batch_size=batch)
    state, _, _, train_step = train.build(config, get_backend("flax", model), 10**6, jax.random.PRNGKey(0xFFFF))
    pixels, key = (images * 255).round().astype(np.uint8), jax.random.PRNGKey(2)
    holder = {"state": state}
    first = Batch(pixels[:batch], labels[:batch])
    compiled, seconds = compiled_and_seconds(train_step, holder["state"], first, key)

    def run(n: int) -> None:
        for i in range(n):
            holder["state"], metrics = train_step(holder["state"], Batch(*host_batch(pixels, labels, i, batch)), key)
        metrics.loss.block_until_ready()

    run(2)  # compile and warm up
    return Loop(run, seconds, peak_bytes(compiled))


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


def optimizer_only_run(chunk: int):
    """The optimiser's share of a step: fused AdamW updates of the full-size params and nothing else.

    The gradients are ``1e-3 * params`` (read in the same pass as the params, so they add no
    memory traffic, and they change every step, so XLA cannot hoist any of the update out of the loop).
    """
    config = train.TrainConfig()
    state, tx, _, _ = train.build(config, get_backend("functional", config.model), 10**6, jax.random.PRNGKey(0xFFFF))

    @partial(jax.jit, donate_argnums=0)
    def chunk_of(state):
        def body(_, state):
            return state.apply_gradients(grads=jax.tree_util.tree_map(lambda p: 1e-3 * p, state.params), tx=tx)

        return jax.lax.fori_loop(0, chunk, body, state)

    holder = {"state": state}

    def run(n: int) -> None:
        for _ in range(max(1, n // chunk)):
            holder["state"] = chunk_of(holder["state"])
        holder["state"].step.block_until_ready()

    run(chunk)
    return run


def gemm_shapes(params, batch: int = BATCH) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The matrix products of one train step, from the params' 2-D kernels (in, out) at ``batch``:
    forward ``x @ W``, input gradient ``dY @ W.T`` and weight gradient ``X.T @ dY``, each as (lhs, rhs) shapes.

    Each is given row-major operands laid out for it (``W.T`` and ``X.T`` as arrays of their own),
    the fastest way to multiply them: XLA may choose such layouts inside the step, and multiplying
    the (in, out) kernel as it is stored measured slower than the whole backward pass
    (docs/performance.md), so that would be no bound.
    """
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


SCALING_BATCHES = (16, 64, 256)
SCALING_IMAGES = {"mlp": 6400, "conv": 1600}  # images per timed run of each loop (the conv step costs ~4x the MLP's)


def scaling(images: np.ndarray, labels: np.ndarray, data: Batch, repeats: int, kinds: tuple[str, ...], share: float = 1.0) -> list[dict]:
    """How cost grows with the batch: for each model and batch, the tutorial's way (jitted step, host
    batches) against the fused functional loop, taking turns; one row per (model, batch)."""
    rows = []
    for kind in kinds:
        model = models.KINDS[kind]()
        for batch in SCALING_BATCHES:
            steps = max(1, int(SCALING_IMAGES[kind] * share) // batch)
            tutorial = tutorial_loop(images, labels, batch) if kind == "mlp" else host_batch_loop(model, images, labels, batch)
            _, fused = backend_runs("functional", data, steps, model, batch, per_step=False)
            samples = interleaved_samples({"tutorial": tutorial.run, "fused": fused.run}, steps, repeats)
            rates = medians(samples)
            faster = paired_ratio(samples, "fused", "tutorial")
            rows.append({
                "model": kind, "batch": batch,
                "tutorial_steps_per_s": rates["tutorial"], "fused_steps_per_s": rates["fused"],
                "tutorial_images_per_s": rates["tutorial"] * batch, "fused_images_per_s": rates["fused"] * batch,
                "fused_vs_tutorial": faster,
                "tutorial_compile_seconds": tutorial.compile_seconds, "fused_compile_seconds": fused.compile_seconds,
                "tutorial_peak_bytes": tutorial.peak_bytes, "fused_peak_bytes": fused.peak_bytes,
            })
            print(f"  {kind} batch {batch}: fused {rates['fused'] * batch:,.0f} images/s, "
                  f"{faster:.2f}x the tutorial's way", flush=True)
    return rows


SWEEP_MEMBERS = (1, 4, 16, 64)
SWEEP_STEPS = {"mlp": 100, "conv": 20}  # steps of every member per timed repeat (a conv step costs ~10x an MLP's, fused on CPU)


class Stepping:
    """A training state that a contender advances in place between its timed calls (states are donated)."""

    def __init__(self, state):
        self.state = state


def sweep_loops(model: models.ModelConfig, data: Batch, members: int, chunk: int) -> tuple[Loop, Loop]:
    """(sweep, sequential) for ``members`` runs of ``model`` at batch 16, both fused and warmed up: the sweep takes a step of
    every member in one vmapped program; sequential runs each member's own fused program one after another."""
    from pureflax import sweep

    config = train.TrainConfig(model=model, batch_size=BATCH, fuse=True)
    backend = get_backend("functional", model)
    num_train = int(data.labels.shape[0])
    keys = [train.make_keys(seed) for seed in range(members)]
    singles = [train.build(config, backend, 10**6, k.model) for k in keys]
    member_step = sweep.make_member_step(config, backend, 10**6, singles[0][0].params)
    carry = Stepping(jax.device_put(sweep.Members(sweep.stack([s[0] for s in singles]), sweep.stack([sweep.hyper_of(config)] * members))))
    orders = sweep.make_orders(jnp.stack([k.data for k in keys]), num_train, BATCH)(0)
    train_keys = jnp.stack([k.train for k in keys])
    together = loop.make_fused_runner(sweep.vmapped(member_step), capacity=chunk, members=members)
    compiled, compile_seconds = compiled_and_seconds(together, carry.state, data, orders, 0, train_keys, chunk)
    alone = loop.make_fused_runner(singles[0][3], capacity=chunk)
    states = [Stepping(s[0]) for s in singles]
    single_orders = [loop.shuffle(k.data, 0, num_train, BATCH) for k in keys]
    alone_compiled, alone_seconds = compiled_and_seconds(alone, states[0].state, data, single_orders[0], 0, keys[0].train, chunk)
    last = int(orders.shape[0]) - chunk

    def run_sweep(n: int) -> None:
        for done in range(0, n, chunk):
            carry.state, metrics = together(carry.state, data, orders, done % last, train_keys, min(chunk, n - done))
        metrics.block_until_ready()

    def run_sequential(n: int) -> None:
        for state, order, k in zip(states, single_orders, keys):
            for done in range(0, n, chunk):
                state.state, metrics = alone(state.state, data, order, done % last, k.train, min(chunk, n - done))
        metrics.block_until_ready()

    run_sweep(chunk)
    run_sequential(chunk)
    return Loop(run_sweep, compile_seconds, peak_bytes(compiled)), Loop(run_sequential, alone_seconds, peak_bytes(alone_compiled))


def sweep_section(data: Batch, repeats: int, kinds: tuple[str, ...] = ("mlp", "conv"), sizes: tuple[int, ...] = SWEEP_MEMBERS) -> dict:
    """Member-steps/s of an M-member sweep against the same M runs one after another, taking turns, per model and M."""
    rows = []
    for kind in kinds:
        for members in sizes:
            steps = SWEEP_STEPS[kind]
            together, sequential = sweep_loops(models.KINDS[kind](), data, members, steps)
            samples = interleaved_samples({"sweep": together.run, "sequential": sequential.run}, steps, repeats)
            rates = medians(samples)
            rows.append({
                "model": kind, "members": members,
                "sweep_member_steps_per_s": rates["sweep"] * members, "sequential_member_steps_per_s": rates["sequential"] * members,
                "sweep_vs_sequential": paired_ratio(samples, "sweep", "sequential"),
                "sweep_compile_seconds": together.compile_seconds, "single_compile_seconds": sequential.compile_seconds,
                "sweep_peak_bytes": together.peak_bytes, "single_peak_bytes": sequential.peak_bytes,
            })
            print(f"  {kind}, {members} members: {rows[-1]['sweep_member_steps_per_s']:,.0f} member-steps/s, "
                  f"{rows[-1]['sweep_vs_sequential']:.2f}x one after another", flush=True)
    by = lambda key: {kind: {str(r["members"]): r[key] for r in rows if r["model"] == kind} for kind in kinds}  # noqa: E731
    return {"rows": rows, "sweep_member_steps_per_s": by("sweep_member_steps_per_s"), "sweep_vs_sequential": by("sweep_vs_sequential"),
            "sweep_peak_bytes": by("sweep_peak_bytes")}


def print_sweep(section: dict) -> None:
    print("\n| model | members | sweep member-steps/s | one after another | sweep × sequential | compile s sweep / one | "
          "peak MiB sweep / one |")
    print("|---|---|---|---|---|---|---|")
    for r in section["rows"]:
        print(f"| {r['model']} | {r['members']} | {r['sweep_member_steps_per_s']:,.0f} | {r['sequential_member_steps_per_s']:,.0f} | "
              f"{r['sweep_vs_sequential']:.2f} | {r['sweep_compile_seconds']:.1f} / {r['single_compile_seconds']:.1f} | "
              f"{mib(r['sweep_peak_bytes'])} / {mib(r['single_peak_bytes'])} |")


SAME_PROGRAM = ("functional", "flax", "nnx")  # fused, one program to XLA: test_the_functional_flax_and_nnx_forms_hand_xla_one_program

TRAIN_RUN_EPOCHS = 3
TRAIN_RUN_REFERENCE = 2800  # steps per timed repeat of the loop around a run: 4 of them ~ the run's 11,250 steps


class TrainRunFailed(RuntimeError):
    """A ``train.py`` run of :func:`train_run` failed: its exit status and last line."""

    def __init__(self, returncode: int, line: str):
        super().__init__(f"train.py exited {returncode}: {line}")
        self.returncode = returncode


def train_run(fused_run: Callable[[int], None], data: Path | None, rounds: int, steps: int) -> dict:
    """``train.py --epochs 3 --no-pictures`` in a process of its own against the fused loop it runs,
    taking turns: the fused functional loop is timed (``steps`` steps, twice) just before and just
    after each run, and the run is compared with the mean of the two (with the default ``steps``,
    the loop is timed for about as many steps as the run takes, so both see the machine's weather).

    One warm-up run (``--max-steps 100``, the same programs) fills the compilation cache first, as
    a user's second run finds it. Each run's rate counts its whole ``fit`` (``seconds`` in the final
    metrics row: data onto the device, building, compiling or loading, every step, evaluation, the
    final checkpoint). Raises :class:`TrainRunFailed` if a run fails.
    """
    import subprocess
    import tempfile

    script = Path(__file__).with_name("train.py")

    def train(out: Path, *flags: str) -> dict:
        command = [sys.executable, str(script), "--no-pictures", "--out", str(out), *flags]
        command += ["--data", str(data)] if data is not None else []
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines() or ["(no output)"]
            raise TrainRunFailed(done.returncode, lines[-1])
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])

    rows = []
    with tempfile.TemporaryDirectory(prefix="pureflax-bench-") as tmp:
        train(Path(tmp) / "warm", "--max-steps", "100")
        for i in range(rounds):
            before = interleaved_rates({"fused": fused_run}, steps, 2)["fused"]
            final = train(Path(tmp) / f"run{i}", "--epochs", str(TRAIN_RUN_EPOCHS))
            beside = (before + interleaved_rates({"fused": fused_run}, steps, 2)["fused"]) / 2
            rate = final["steps"] / final["seconds"]
            rows.append({"steps": final["steps"], "seconds": final["seconds"], "compile_seconds": final["compile_seconds"],
                         "step_seconds": final["step_seconds"], "fit_steps_per_s": rate, "fused_steps_per_s": beside,
                         "ratio": rate / beside})
            print(f"  train.py --epochs {TRAIN_RUN_EPOCHS}: {final['steps']} steps in {final['seconds']:.2f} s of fit "
                  f"(compile {final['compile_seconds']:.2f}, steps {final['step_seconds']:.2f}) = {rate:,.0f} steps/s, "
                  f"{rate / beside:.2f} of the fused loop's {beside:,.0f} around it", flush=True)
    return {"runs": rows, "ratio": statistics.median(row["ratio"] for row in rows)}


def mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.1f}"


def print_scaling(rows: list[dict]) -> None:
    print("\n| model | batch | tutorial's way images/s (steps/s) | fused images/s (steps/s) | fused × tutorial | "
          "compile s tutorial / fused | peak MiB tutorial / fused |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['tutorial_images_per_s']:,.0f} ({r['tutorial_steps_per_s']:,.0f}) | "
              f"{r['fused_images_per_s']:,.0f} ({r['fused_steps_per_s']:,.0f}) | {r['fused_vs_tutorial']:.2f} | "
              f"{r['tutorial_compile_seconds']:.1f} / {r['fused_compile_seconds']:.1f} | "
              f"{mib(r['tutorial_peak_bytes'])} / {mib(r['fused_peak_bytes'])} |")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed repeat at batch 16, a multiple of 100 (default 800; 200 with "
                        f"--quick; {TRAIN_RUN_REFERENCE} with --train-run)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported (default 5; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a check in under a minute: fewer steps and repeats, "
                        "no per-step rows, the scaling table for the MLP only")
    parser.add_argument("--train-run", action="store_true", help="instead: train.py --epochs 3 (whole fit, three runs) "
                        "against the fused loop timed around each run (about 80 s; needs MNIST)")
    parser.add_argument("--data", type=Path, default=None, help="MNIST for --train-run, as train.py's --data (default: its cache)")
    parser.add_argument("--sweep", action="store_true", help="instead: only the sweep section, M = 1, 4, 16, 64 members "
                        "in one program against the same runs one after another, MLP and conv (about 4 minutes on 2 cores)")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (200 if args.quick else TRAIN_RUN_REFERENCE if args.train_run else 800)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    if steps < 100 or steps % 100 or repeats < 1:  # the loops run whole chunks of 100 steps
        parser.error("--steps must be a multiple of 100 and --repeats >= 1")
    if args.data is not None and not args.data.exists():
        parser.error(f"--data {args.data} does not exist")
    if args.train_run:  # on a GPU, this process and each train.py beside it take memory as they need it, not 75% each
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    began = time.perf_counter()

    rng = np.random.default_rng(0)
    images = (rng.integers(0, 256, (8192, 784)) / 255.0).astype(np.float32)  # like ToTensor() output
    labels = rng.integers(0, NUM_CLASSES, 8192).astype(np.int32)
    device_data = Batch(jax.device_put((images * 255).round().astype(np.uint8)), jax.device_put(labels))

    result = {"device": str(jax.devices()[0]), "batch_size": BATCH, "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "quick": args.quick, "steps": steps, "repeats": repeats}
    if args.train_run:
        _, fused = backend_runs("functional", device_data, 100, per_step=False)
        print(f"train.py --epochs {TRAIN_RUN_EPOCHS} (whole fit) against the fused functional loop, batch {BATCH}:", flush=True)
        try:
            result["train_run"] = train_run(fused.run, args.data, rounds=3, steps=steps)
        except TrainRunFailed as err:  # train.py's own usage error (bad data, say) stays exit status 2
            print(f"bench.py: error: {err}", file=sys.stderr)
            return 2 if err.returncode == 2 else 1
        print(f"train.py reaches {result['train_run']['ratio']:.2f} of the fused loop (median of 3 runs)")
        result["seconds"] = time.perf_counter() - began
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    if args.sweep:
        print(f"sweeps: M members in one vmapped program against M fused runs one after another, batch {BATCH}:", flush=True)
        result["sweep"] = sweep_section(device_data, repeats)
        print_sweep(result["sweep"])
        result["seconds"] = time.perf_counter() - began
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    result["matmul_gflops"] = matmul_gflops()
    result["model_flops_per_step"] = model_flops_per_step(vae.VAEConfig())
    peers = {"tutorial": tutorial_loop(images, labels), "nnx_loop": nnx_loop(images, labels), "equinox_loop": equinox_loop(images, labels)}
    runs = {name: peer.run for name, peer in peers.items()}
    fused_loops = {}
    for name in BACKENDS:
        per_step, fused_loops[name] = backend_runs(name, device_data, 100, per_step=not args.quick)
        runs[f"{name}/fused"] = fused_loops[name].run
        if per_step is not None:
            runs[f"{name}/per_step"] = per_step.run
    compile_seconds = {name: fused.compile_seconds for name, fused in fused_loops.items()}
    runs["bound"] = gradient_only_run(device_data, 100)
    runs["optimizer"] = optimizer_only_run(100)
    shapes = jax.eval_shape(lambda: vae.init(jax.random.PRNGKey(0), vae.VAEConfig()))
    runs["gemm"] = gemm_run(shapes, 100)
    samples = interleaved_samples(runs, steps, repeats, slices=steps // 100)  # a chunk at a time
    rates = medians(samples)
    ratio = lambda a, b: paired_ratio(samples, a, b)  # noqa: E731
    result["gemm_bound_steps_per_s"] = rates["gemm"]
    result["gradient_only_steps_per_s"] = rates["bound"]
    result["tutorial_loop_steps_per_s"] = rates["tutorial"]
    result["nnx_loop_steps_per_s"] = rates["nnx_loop"]
    result["equinox_loop_steps_per_s"] = rates["equinox_loop"]
    per_step = result["per_step_steps_per_s"] = {name: rates[f"{name}/per_step"] for name in BACKENDS if f"{name}/per_step" in rates}
    fused = result["fused_steps_per_s"] = {name: rates[f"{name}/fused"] for name in BACKENDS}
    result["compile_seconds"] = compile_seconds
    result["fused_peak_bytes"] = {name: loop.peak_bytes for name, loop in fused_loops.items()}
    result["mfu"] = {name: rate * result["model_flops_per_step"] / (result["matmul_gflops"] * 1e9) for name, rate in fused.items()}
    # every ratio pairs the two loops within each repeat (paired_ratio), so the host's drift between repeats cancels
    result["nnx_loop_vs_tutorial_loop"] = ratio("nnx_loop", "tutorial")
    result["fused_vs_tutorial_loop"] = {name: ratio(f"{name}/fused", "tutorial") for name in BACKENDS}
    result["fused_vs_nnx_loop"] = {name: ratio(f"{name}/fused", "nnx_loop") for name in BACKENDS}
    result["fused_vs_equinox_loop"] = {name: ratio(f"{name}/fused", "equinox_loop") for name in BACKENDS}
    result["fraction_of_bound"] = {name: ratio(f"{name}/fused", "gemm") for name in BACKENDS}
    result["fused_vs_functional"] = {name: ratio(f"{name}/fused", "functional/fused") for name in BACKENDS}
    # the step's two parts timed apart, their times added repeat by repeat: what the step would take run one after the other
    samples["parts"] = [1 / (1 / grads + 1 / update) for grads, update in zip(samples["bound"], samples["optimizer"], strict=True)]
    rates["parts"] = statistics.median(samples["parts"])
    result["optimizer_only_steps_per_s"] = rates["optimizer"]
    result["parts_steps_per_s"] = rates["parts"]
    result["fraction_of_parts"] = {name: ratio(f"{name}/fused", "parts") for name in BACKENDS}

    base = result["tutorial_loop_steps_per_s"]
    print(f"device {result['device']}, batch {BATCH}, model {result['model_flops_per_step'] / 1e6:.1f} MFLOP/step, "
          f"matmul peak {result['matmul_gflops']:.1f} GFLOP/s, {steps} steps x {repeats} repeats\n")

    def mfu(rate: float) -> str:
        return f"{rate * result['model_flops_per_step'] / (result['matmul_gflops'] * 1e9):.1%}"

    def row(label: str, run: str, compile_s: float | None = None, model: bool = True) -> None:
        rate = rates[run]  # model=False: a loop without the model's matmuls, for which MFU means nothing
        print(f"| {label} | {rate:.0f} | {ratio(run, 'tutorial'):.2f} | {ratio(run, 'gemm'):.2f} | {mfu(rate) if model else '—'} | "
              f"{'—' if compile_s is None else f'{compile_s:.1f}'} |")

    print("| loop | steps/s | × tutorial loop | of GEMM bound | MFU | compile s |")
    print("|---|---|---|---|---|---|")
    row("tutorial's loop (linen, jitted step, host batches)", "tutorial", peers["tutorial"].compile_seconds)
    row("NNX docs' loop (nnx.jit step, nnx.Optimizer, host batches)", "nnx_loop")
    row("Equinox examples' loop (eqx.filter_jit step, vmapped module, host batches)", "equinox_loop")
    for name in per_step:
        row(f"{name}, per step", f"{name}/per_step")
    for name in BACKENDS:
        row(f"{name}, fused", f"{name}/fused", compile_seconds[name])
    row("functional, fused, loss+gradients only (no optimiser)", "bound")
    row("functional, fused, AdamW's update only (no model)", "optimizer", model=False)
    row("the two parts' times added: loss+gradients, then the update", "parts")
    row("in-run GEMM bound: the step's matmuls only (forward, dX, dW at the model's shapes), fused", "gemm")
    print("\nfraction of the GEMM bound, fused: " + ", ".join(f"{name} {value:.2f}" for name, value in result["fraction_of_bound"].items()))
    print("fraction of the two parts' added times, fused: " + ", ".join(f"{name} {value:.2f}" for name, value in result["fraction_of_parts"].items()))
    relative = result["fused_vs_functional"]
    spread = result["fused_spread"] = max(relative.values()) / min(relative.values()) - 1
    print("fused, against the functional form in the same repeat: " + ", ".join(f"{name} {value:.3f}" for name, value in relative.items()))
    same = [relative[name] for name in SAME_PROGRAM]
    noise = result["same_program_spread"] = max(same) / min(same) - 1
    print(f"fused backends within {spread:.1%} of each other ({', '.join(SAME_PROGRAM)} hand XLA one program, "
          f"tests/test_loop.py: the {noise:.1%} between them is this run's noise)\n")

    print("how cost grows with the batch (functional fused vs the tutorial's way):", flush=True)
    result["scaling"] = scaling(images, labels, device_data, repeats, ("mlp",) if args.quick else ("mlp", "conv"),
                                share=0.5 if args.quick else 1.0)
    print_scaling(result["scaling"])
    print("\nsweeps: M members in one vmapped program against the same runs one after another:", flush=True)
    result["sweep"] = sweep_section(device_data, repeats, ("mlp",) if args.quick else ("mlp", "conv"),
                                    (1, 4) if args.quick else SWEEP_MEMBERS)
    print_sweep(result["sweep"])
    result["seconds"] = time.perf_counter() - began
    print(f"\nbench took {result['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
