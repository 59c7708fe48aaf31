"""The contenders ``bench.py`` times, each a :class:`bench_harness.Loop` built and warmed up.

The loops as the tutorial, the Flax NNX docs and the Equinox examples write them; every
backend per step and fused; the fused step's two parts apart and the in-run GEMM bound; the
scaling and sweep sections' pairs; and ``train.py`` run beside the fused loop.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pureflax import loop, losses, models, train, vae
from pureflax.compat import equinox_models, flax_models, nnx_models
from pureflax.compat.backends import get_backend
from pureflax.step import Batch

if str(Path(__file__).resolve().parent) not in sys.path:  # bench_harness beside this file, however this file was loaded
    sys.path.append(str(Path(__file__).resolve().parent))

from bench_harness import (  # noqa: E402
    Chunks, Loop, Repeats, Stepping, Table, Turns, compiled_and_seconds, contender, interleaved_rates, mib, rows_of_turns,
)

BATCH, NUM_CLASSES, KL_WEIGHT = 16, 10, 0.5
CHUNK = 100  # steps per fused call at batch 16: the loops run whole chunks of it


class Data(NamedTuple):
    """The benchmark's MNIST-shaped data: float images and labels on the host, as pixels and labels on the device."""

    images: np.ndarray
    labels: np.ndarray
    device: Batch


def synthetic_mnist() -> Data:
    """8192 random images as ``ToTensor()`` hands them over (floats in [0, 1]) and random labels, and both on the device."""
    rng = np.random.default_rng(0)
    images = (rng.integers(0, 256, (8192, 784)) / 255.0).astype(np.float32)  # like ToTensor() output
    labels = rng.integers(0, NUM_CLASSES, 8192).astype(np.int32)
    return Data(images, labels, Batch(jax.device_put((images * 255).round().astype(np.uint8)), jax.device_put(labels)))


def model_flops_per_step(config: vae.VAEConfig, batch: int = BATCH) -> int:
    """Matmul FLOPs of one train step: forward 2·B·Σ(in·out) over the dense layers, backward twice that."""
    params = jax.eval_shape(lambda: vae.init(jax.random.PRNGKey(0), config))
    macs = sum(leaf.shape[0] * leaf.shape[1] for leaf in jax.tree_util.tree_leaves(params) if leaf.ndim == 2)
    return 3 * 2 * batch * macs


def host_batch(images: np.ndarray, labels: np.ndarray, i: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Step ``i``'s batch as a data loader hands it over: numpy slices on the host, cycling through the data."""
    j = i % (len(labels) // batch_size)
    return images[j * batch_size : (j + 1) * batch_size].reshape(batch_size, -1), labels[j * batch_size : (j + 1) * batch_size]


def host_batch_steps(step: Callable, carry: tuple, key: jax.Array, ready: Callable[[tuple], Any],
                     images: np.ndarray, labels: np.ndarray, batch_size: int = BATCH) -> Callable[[int], None]:
    """A docs' loop as the docs write it: ``run(n)`` makes ``n`` calls of the jitted ``step(*carry, x, c, key)``.

    Each call gets a key split off on the host and its batch sliced from host numpy arrays, as
    from a DataLoader. The step returns the carry's new values, then loss, MSE and KL (a step that
    updates the carry in place, as NNX's does, returns only the three), which are added to running
    totals on the host as the loops keep them for their epoch report. ``run`` ends by waiting for
    ``ready(carry)``; the carry and key go on from there in the next call.

    Args:
        step: the loop's jitted train step.
        carry: what the step takes before the batch and returns first (params and optimiser state, say).
        key: the key each step's key is split from.
        ready: what of the carry to wait for.
        images: float images, one a row.
        labels: their labels.
        batch_size: examples per step.
    """
    stepping = Stepping((carry, key))

    def run(n: int) -> None:
        carry, key = stepping.state
        total_loss, total_mse, total_kl = 0.0, 0.0, 0.0
        for i in range(n):
            key, subkey = jax.random.split(key)
            x, c = host_batch(images, labels, i, batch_size)  # host numpy, as from the DataLoader
            *carried, loss, mse_loss, kl_loss = step(*carry, x, c, subkey)
            carry = tuple(carried) or carry
            total_loss += loss
            total_mse += mse_loss
            total_kl += kl_loss
        jax.block_until_ready(ready(carry))
        stepping.state = carry, key

    return run


def tutorial_loop(images: np.ndarray, labels: np.ndarray, batch_size: int = BATCH) -> Loop:
    """The tutorial's training loop as the tutorial writes it: linen VAE, jitted step, host batches."""
    latent_dim, num_classes, kl_weight = 32, NUM_CLASSES, KL_WEIGHT
    key = jax.random.PRNGKey(0xFFFF)

    def create_train_step(key, model, optimiser):
        params = model.init(key, jnp.zeros((batch_size, 784)), jnp.zeros((batch_size, num_classes)), jax.random.PRNGKey(0))
        train_step = flax_models.tutorial_train_step(model, optimiser, kl_weight=kl_weight, num_classes=num_classes)
        return train_step, params, optimiser.init(params)

    key, model_key = jax.random.split(key)
    model = flax_models.VAE(latent_dim=latent_dim)
    optimiser = optax.adamw(learning_rate=1e-4)
    train_step, params, opt_state = create_train_step(model_key, model, optimiser)
    compiled, seconds = compiled_and_seconds(train_step, params, opt_state, *host_batch(images, labels, 0, batch_size), key)
    run = host_batch_steps(train_step, (params, opt_state), key, lambda carry: carry[0], images, labels, batch_size)
    return contender(run, 50, compiled, seconds)


def nnx_loop(images: np.ndarray, labels: np.ndarray) -> Loop:
    """The loop the Flax NNX docs teach: NNX VAE, ``nnx.Optimizer``, ``@nnx.jit`` step, host batches.

    The model and optimiser are mutable objects passed to the jitted step, which updates them
    in place (``optimizer.update(model, grads)``). Batches, keys and the running loss totals
    are handled on the host exactly as in :func:`tutorial_loop` (:func:`host_batch_steps`), so
    the two loops differ only in how the step is written and called.
    """
    latent_dim, num_classes, kl_weight = 32, NUM_CLASSES, KL_WEIGHT
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

    run = host_batch_steps(train_step, (model, optimizer), key, lambda carry: nnx.state(carry[0]), images, labels)
    return contender(run, 50)


def equinox_loop(images: np.ndarray, labels: np.ndarray) -> Loop:
    """The loop the Equinox examples teach: an ``eqx.Module``, ``eqx.filter_jit`` step,
    ``eqx.filter_value_and_grad``, optax on ``eqx.filter(model, eqx.is_array)``, host batches.

    The model is written for one example and ``jax.vmap``-ed over the batch with one noise key
    per example, as Equinox code does; batches, keys and loss totals are handled on the host as in
    :func:`tutorial_loop` (:func:`host_batch_steps`).
    """
    latent_dim, num_classes, kl_weight = 32, NUM_CLASSES, KL_WEIGHT
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

    run = host_batch_steps(make_step, (model, opt_state), key, lambda carry: eqx.filter(carry[0], eqx.is_array), images, labels)
    return contender(run, 50)


def backend_runs(name: str, data: Batch, chunk: int, model: models.ModelConfig = vae.VAEConfig(),
                 batch: int = BATCH, *, per_step: bool = True) -> tuple[Loop | None, Loop]:
    """(per step, fused) loops of one backend at ``batch``, both warmed up and advancing one state; the fused
    one with the seconds to compile a ``chunk``-step program and that program's peak memory.

    Raises:
        ValueError: the data make no more than ``chunk`` batches.
    """
    config = train.TrainConfig(model=model, batch_size=batch)
    backend = get_backend(name, model)
    state, _, _, train_step = train.build(config, backend, 10**6, jax.random.PRNGKey(0xFFFF))
    order = loop.epoch_order(jax.random.PRNGKey(1), int(data.labels.shape[0]), batch)
    if int(order.shape[0]) <= chunk:
        raise ValueError(f"{data.labels.shape[0]} examples make {order.shape[0]} batches of {batch}: fewer than a chunk of {chunk}")
    key, stepping = jax.random.PRNGKey(2), Stepping(state)
    fused = loop.make_fused_runner(train_step)
    compiled, compile_seconds = compiled_and_seconds(fused, stepping.state, data, order, 0, key, chunk)  # trace, lower, compile
    each = contender(Chunks(loop.make_per_step_runner(train_step), stepping, data, order, key, chunk), chunk) if per_step else None
    return each, contender(Chunks(fused, stepping, data, order, key, chunk), chunk, compiled, compile_seconds)


def host_batch_loop(model: models.ModelConfig, images: np.ndarray, labels: np.ndarray, batch: int) -> Loop:
    """The tutorial's way of training any model: the Linen form's jitted step, one dispatch per step,
    each batch sliced on the host and sent with the call (for the MLP, :func:`tutorial_loop` is that)."""
    config = train.TrainConfig(model=model, batch_size=batch)
    state, _, _, train_step = train.build(config, get_backend("flax", model), 10**6, jax.random.PRNGKey(0xFFFF))
    pixels, key = (images * 255).round().astype(np.uint8), jax.random.PRNGKey(2)
    stepping = Stepping(state)
    compiled, seconds = compiled_and_seconds(train_step, stepping.state, Batch(pixels[:batch], labels[:batch]), key)

    def run(n: int) -> None:
        for i in range(n):
            stepping.state, metrics = train_step(stepping.state, Batch(*host_batch(pixels, labels, i, batch)), key)
        metrics.loss.block_until_ready()

    return contender(run, 2, compiled, seconds)


def gradient_only_run(data: Batch, chunk: int) -> Loop:
    """The bound: fused steps that compute the loss and gradients but skip the optimiser update."""
    config = train.TrainConfig()
    state, _, loss_fn, _ = train.build(config, get_backend("functional", config.model), 10**6, jax.random.PRNGKey(0xFFFF))

    def grad_step(state, batch, key):
        (loss, (mse, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, jax.random.fold_in(key, state.step))
        kept = jax.tree_util.tree_map(lambda p, g: p - 0.0 * g, state.params, grads)  # keeps the gradients computed
        return state._replace(step=state.step + 1, params=kept), (loss, mse, kl)

    order = loop.epoch_order(jax.random.PRNGKey(1), int(data.labels.shape[0]), BATCH)
    return contender(Chunks(loop.make_fused_runner(grad_step), Stepping(state), data, order, jax.random.PRNGKey(2), chunk), chunk)


def optimizer_only_run(chunk: int) -> Loop:
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

    return contender(Repeats(chunk_of, Stepping(state), chunk, lambda state: state.step), chunk)


def gemm_shapes(params: Any, batch: int = BATCH) -> list[tuple[tuple[int, int], tuple[int, int]]]:
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


def gemm_run(params: Any, chunk: int, batch: int = BATCH) -> Loop:
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

    return contender(Repeats(lambda carry: chunk_of(carry, operands), Stepping(jnp.zeros(())), chunk), chunk)


SCALING_BATCHES = (16, 64, 256)
SCALING_IMAGES = {"mlp": 6400, "conv": 1600}  # images per timed run of each loop (the conv step costs more than the MLP's)
SCALING_TABLE = Table((
    ("model", "{model}"), ("batch", "{batch}"),
    ("tutorial's way images/s (steps/s)", "{tutorial_images_per_s:,.0f} ({tutorial_steps_per_s:,.0f})"),
    ("fused images/s (steps/s)", "{fused_images_per_s:,.0f} ({fused_steps_per_s:,.0f})"),
    ("fused × tutorial", "{fused_vs_tutorial:.2f}"),
    ("compile s tutorial / fused", "{tutorial_compile_seconds:.1f} / {fused_compile_seconds:.1f}"),
    ("peak MiB tutorial / fused", lambda r: f"{mib(r['tutorial_peak_bytes'])} / {mib(r['fused_peak_bytes'])}"),
))


def scaling(images: np.ndarray, labels: np.ndarray, data: Batch, repeats: int, kinds: tuple[str, ...], share: float = 1.0) -> list[dict]:
    """How cost grows with the batch: for each model and batch, the tutorial's way (jitted step, host
    batches) against the fused functional loop, taking turns; one row per (model, batch)."""

    def contenders(kind: str, batch: int) -> tuple[dict[str, Loop], int]:
        steps, model = max(1, int(SCALING_IMAGES[kind] * share) // batch), models.KINDS[kind]()
        tutorial = tutorial_loop(images, labels, batch) if kind == "mlp" else host_batch_loop(model, images, labels, batch)
        _, fused = backend_runs("functional", data, steps, model, batch, per_step=False)
        return {"tutorial": tutorial, "fused": fused}, steps

    def row(kind: str, batch: int, turns: Turns) -> dict:
        tutorial, fused = turns.loops["tutorial"], turns.loops["fused"]
        return {
            "model": kind, "batch": batch,
            "tutorial_steps_per_s": turns.rate("tutorial"), "fused_steps_per_s": turns.rate("fused"),
            "tutorial_images_per_s": turns.rate("tutorial") * batch, "fused_images_per_s": turns.rate("fused") * batch,
            "fused_vs_tutorial": turns.ratio("fused", "tutorial"),
            "tutorial_compile_seconds": tutorial.compile_seconds, "fused_compile_seconds": fused.compile_seconds,
            "tutorial_peak_bytes": tutorial.peak_bytes, "fused_peak_bytes": fused.peak_bytes,
        }

    cells = [(kind, batch) for kind in kinds for batch in SCALING_BATCHES]
    return rows_of_turns(cells, contenders, row, "  {model} batch {batch}: fused {fused_images_per_s:,.0f} images/s, "
                         "{fused_vs_tutorial:.2f}x the tutorial's way", repeats)


SWEEP_MEMBERS = (1, 4, 16, 64)
SWEEP_STEPS = {"mlp": 100, "conv": 20}  # steps of every member per timed repeat (a conv step costs more than an MLP's)
SWEEP_TABLE = Table((
    ("model", "{model}"), ("members", "{members}"),
    ("sweep member-steps/s", "{sweep_member_steps_per_s:,.0f}"), ("one after another", "{sequential_member_steps_per_s:,.0f}"),
    ("sweep × sequential", "{sweep_vs_sequential:.2f}"),
    ("compile s sweep / one", "{sweep_compile_seconds:.1f} / {single_compile_seconds:.1f}"),
    ("peak MiB sweep / one", lambda r: f"{mib(r['sweep_peak_bytes'])} / {mib(r['single_peak_bytes'])}"),
))


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
    each = [Chunks(alone, state, data, order, k.train, chunk) for state, order, k in zip(states, single_orders, keys)]

    def run_sequential(n: int) -> None:
        for member in each:
            metrics = member.dispatch(n)
        metrics.block_until_ready()

    return (contender(Chunks(together, carry, data, orders, train_keys, chunk), chunk, compiled, compile_seconds),
            contender(run_sequential, chunk, alone_compiled, alone_seconds))


def sweep_section(data: Batch, repeats: int, kinds: tuple[str, ...] = ("mlp", "conv"), sizes: tuple[int, ...] = SWEEP_MEMBERS) -> dict:
    """Member-steps/s of an M-member sweep against the same M runs one after another, taking turns, per model and M."""

    def contenders(kind: str, members: int) -> tuple[dict[str, Loop], int]:
        together, sequential = sweep_loops(models.KINDS[kind](), data, members, SWEEP_STEPS[kind])
        return {"sweep": together, "sequential": sequential}, SWEEP_STEPS[kind]

    def row(kind: str, members: int, turns: Turns) -> dict:
        together, sequential = turns.loops["sweep"], turns.loops["sequential"]
        return {
            "model": kind, "members": members,
            "sweep_member_steps_per_s": turns.rate("sweep") * members, "sequential_member_steps_per_s": turns.rate("sequential") * members,
            "sweep_vs_sequential": turns.ratio("sweep", "sequential"),
            "sweep_compile_seconds": together.compile_seconds, "single_compile_seconds": sequential.compile_seconds,
            "sweep_peak_bytes": together.peak_bytes, "single_peak_bytes": sequential.peak_bytes,
        }

    rows = rows_of_turns([(kind, members) for kind in kinds for members in sizes], contenders, row,
                         "  {model}, {members} members: {sweep_member_steps_per_s:,.0f} member-steps/s, "
                         "{sweep_vs_sequential:.2f}x one after another", repeats)
    by = lambda key: {kind: {str(r["members"]): r[key] for r in rows if r["model"] == kind} for kind in kinds}  # noqa: E731
    return {"rows": rows, "sweep_member_steps_per_s": by("sweep_member_steps_per_s"), "sweep_vs_sequential": by("sweep_vs_sequential"),
            "sweep_peak_bytes": by("sweep_peak_bytes")}


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
    final checkpoint).

    Raises:
        TrainRunFailed: a run failed.
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
