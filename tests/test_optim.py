"""pureflax.optim against optax built by hand, as the tutorial builds it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pureflax import vae
from pureflax.optim import OptimConfig, freeze_labels, make_optimizer, make_schedule, param_paths
from pureflax.state import TrainState
from trees import assert_trees_equal

# Three Dense layers each side, as in the tutorial (so decoder/Dense_2 exists), but tiny.
SMALL = vae.VAEConfig(
    encoder_dimensions=(8, 7, 6), decoder_dimensions=(6, 8, 16), latent_dim=2, num_classes=3, input_dim=16
)
TOP_LEVEL = ["class_proj", "decoder", "encoder", "post_latent_proj", "pre_latent_proj"]


@pytest.fixture(scope="module")
def vae_params():
    """A params tree with exactly ``vae.init``'s paths, shapes and dtypes.

    The values are numpy draws: the optimiser does not care, and ``eval_shape`` avoids
    compiling the initialisers (seconds on CPU).
    """
    shapes = jax.eval_shape(lambda key: vae.init(key, SMALL), jax.random.key(42))
    rng = np.random.default_rng(42)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), shapes)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def assert_trees_close(a, b, rtol=1e-6, atol=0.0):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def small_params(rng):
    return {"a": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32), "b": {"c": jnp.asarray(rng.standard_normal(5), jnp.float32)}}


def random_like(rng, tree, scale=1.0):
    """Gradients shaped like ``tree``, drawn with numpy (no per-shape JAX compiles)."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32), tree)


def run(tx, params, grads_seq, jit=False):
    """Apply each gradient in turn through ``tx``; return every intermediate params.

    ``jit`` for MultiSteps: its ``lax.cond`` over fresh closures recompiles every eager call.
    """

    def step(g, state, params):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step) if jit else step
    state = tx.init(params)
    history = []
    for g in grads_seq:
        params, state = step(g, state, params)
        history.append(params)
    return history


# --- the optimizers themselves ---------------------------------------------------------


@pytest.mark.parametrize(
    "name, bare",
    [("sgd", optax.sgd(1e-3)), ("adam", optax.adam(1e-3)), ("adamw", optax.adamw(1e-3))],
)
def test_each_optimizer_is_bare_optax_bitwise(rng, name, bare):
    params = small_params(rng)
    grads = [random_like(rng, params) for _ in range(5)]
    tx = make_optimizer(OptimConfig(optimizer=name, lr=1e-3), total_steps=10)
    got, want = run(tx, params, grads), run(bare, params, grads)
    for g, w in zip(got, want, strict=True):
        assert_trees_equal(g, w)
    assert not np.array_equal(leaves(got[-1])[0], leaves(params)[0])


def test_default_config_is_tutorials_adamw_1e4(rng):
    params = small_params(rng)
    grads = [random_like(rng, params) for _ in range(3)]
    got = run(make_optimizer(OptimConfig(), total_steps=3), params, grads)
    assert_trees_equal(got[-1], run(optax.adamw(1e-4), params, grads)[-1])


def test_optimizers_differ_from_each_other(rng):
    # Guards against the name being ignored: sgd, adam and adamw give different params.
    params = small_params(rng)
    grads = [random_like(rng, params) for _ in range(3)]
    finals = [
        leaves(run(make_optimizer(OptimConfig(optimizer=n, lr=0.1), total_steps=3), params, grads)[-1])[0]
        for n in ("sgd", "adam", "adamw")
    ]
    assert not np.array_equal(finals[0], finals[1])
    assert not np.array_equal(finals[1], finals[2])


# --- schedules -----------------------------------------------------------------------


def test_constant_schedule():
    sched = make_schedule(OptimConfig(lr=3e-3, end_lr=1e-5), total_updates=100)
    for t in (0, 1, 50, 100, 1000):
        assert float(sched(t)) == pytest.approx(3e-3, rel=1e-7)


def test_linear_schedule_goes_lr_to_end_lr():
    lr, end, total = 1e-2, 1e-4, 100
    sched = make_schedule(OptimConfig(lr=lr, schedule="linear", end_lr=end), total_updates=total)
    expected = {0: lr, 25: lr + 0.25 * (end - lr), 50: (lr + end) / 2, 99: lr + 0.99 * (end - lr), 100: end, 150: end}
    for t, want in expected.items():
        np.testing.assert_allclose(float(sched(t)), want, rtol=1e-5)  # float32: 2.5e-6 off at t=99 on a GPU


def warmup_reference(t, lr, end_lr, warmup, total):
    """0 -> lr linearly over ``warmup``, then lr -> end_lr linearly over ``total - warmup``."""
    if t < warmup:
        return lr * t / warmup
    decay = total - warmup
    return lr + (end_lr - lr) * min(t - warmup, decay) / decay


@pytest.mark.parametrize("warmup, total", [(10, 100), (1, 20), (30, 40)])
def test_warmup_schedule_is_tutorials_join_schedules(warmup, total):
    lr, end = 2e-3, 1e-5
    sched = make_schedule(OptimConfig(lr=lr, schedule="warmup", warmup_steps=warmup, end_lr=end), total_updates=total)
    tutorial = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.linear_schedule(lr, end, total - warmup)], [warmup]
    )
    steps = sorted({0, 1, warmup // 2, warmup - 1, warmup, warmup + 1, (warmup + total) // 2, total - 1, total, total + 7})
    for t in steps:
        want = warmup_reference(t, lr, end, warmup, total)
        np.testing.assert_allclose(float(sched(t)), want, rtol=1e-5, atol=1e-12, err_msg=f"step {t}")
        np.testing.assert_allclose(float(sched(t)), float(tutorial(t)), rtol=1e-6, atol=1e-12, err_msg=f"step {t}")
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(warmup)), lr, rtol=1e-6)  # the peak sits on the boundary


def sgd_lrs(config, total_steps, calls):
    """The learning rate each call of ``make_optimizer(config)`` applied, read off an sgd run.

    With a gradient of ones and sgd, each real update moves the param by exactly ``-lr``.
    """
    tx = make_optimizer(config, total_steps=total_steps)
    params = {"w": jnp.zeros(())}
    history = run(tx, params, [{"w": jnp.ones(())}] * calls, jit=True)
    ws = [0.0] + [float(p["w"]) for p in history]
    return [a - b for a, b in zip(ws[:-1], ws[1:])]


def test_schedule_drives_the_optimizer():
    lrs = sgd_lrs(OptimConfig(optimizer="sgd", lr=1.0, schedule="linear", end_lr=0.0), total_steps=4, calls=5)
    np.testing.assert_allclose(lrs, [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-7)


def test_grad_accum_schedule_spans_total_steps_over_grad_accum():
    # 8 train steps with grad_accum 2 are 4 optimiser updates: lr 1, .75, .5, .25, then 0.
    config = OptimConfig(optimizer="sgd", lr=1.0, schedule="linear", end_lr=0.0, grad_accum=2)
    lrs = sgd_lrs(config, total_steps=8, calls=10)
    np.testing.assert_allclose(lrs, [0.0, 1.0, 0.0, 0.75, 0.0, 0.5, 0.0, 0.25, 0.0, 0.0], atol=1e-7)


def test_grad_accum_warmup_counts_updates_not_train_steps():
    config = OptimConfig(optimizer="sgd", lr=1.0, schedule="warmup", warmup_steps=2, end_lr=0.0, grad_accum=3)
    lrs = sgd_lrs(config, total_steps=18, calls=18)  # 6 updates: 2 warmup, 4 decay
    real = lrs[2::3]
    np.testing.assert_allclose(real, [warmup_reference(t, 1.0, 0.0, 2, 6) for t in range(6)], atol=1e-7)
    assert all(v == 0.0 for i, v in enumerate(lrs) if i % 3 != 2)


# --- clipping, ema ---------------------------------------------------------------------


def test_clip_norm_makes_a_unit_norm_step(rng):
    params = small_params(rng)
    grads = random_like(rng, params, scale=1e6)
    tx = make_optimizer(OptimConfig(optimizer="sgd", lr=1.0, clip_norm=1.0), total_steps=1)
    (new,) = run(tx, params, [grads])
    step = [n - p for n, p in zip(leaves(new), leaves(params))]
    norm = np.sqrt(sum((s.astype(np.float64) ** 2).sum() for s in step))
    np.testing.assert_allclose(norm, 1.0, rtol=1e-4)
    g = leaves(grads)
    gnorm = np.sqrt(sum((x.astype(np.float64) ** 2).sum() for x in g))
    for s, x in zip(step, g):
        np.testing.assert_allclose(s, -x / gnorm, rtol=1e-3, atol=1e-6)


def test_clip_norm_leaves_small_gradients_alone(rng):
    params = small_params(rng)
    grads = random_like(rng, params, scale=1e-2)  # global norm well below 1
    tx = make_optimizer(OptimConfig(optimizer="sgd", lr=1.0, clip_norm=1.0), total_steps=1)
    (new,) = run(tx, params, [grads])
    for n, p, g in zip(leaves(new), leaves(params), leaves(grads)):
        np.testing.assert_allclose(n - p, -g, rtol=1e-5, atol=1e-7)


def test_ema_is_chain_adam_ema(rng):
    params = small_params(rng)
    grads = [random_like(rng, params) for _ in range(5)]
    tx = make_optimizer(OptimConfig(optimizer="adam", lr=1e-2, ema=0.9), total_steps=5)
    got = run(tx, params, grads)
    want = run(optax.chain(optax.adam(1e-2), optax.ema(0.9)), params, grads)
    for g, w in zip(got, want, strict=True):
        assert_trees_close(g, w, rtol=1e-6, atol=1e-7)
    plain = run(optax.adam(1e-2), params, grads)
    assert not np.allclose(leaves(got[-1])[0], leaves(plain[-1])[0], rtol=1e-6, atol=0)


def test_clip_adam_ema_is_tutorials_chain(rng):
    params = small_params(rng)
    grads = [random_like(rng, params, scale=3.0) for _ in range(4)]
    tx = make_optimizer(OptimConfig(optimizer="adam", lr=1e-2, clip_norm=1.0, ema=0.999), total_steps=4)
    want = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2), optax.ema(decay=0.999))
    for g, w in zip(run(tx, params, grads), run(want, params, grads), strict=True):
        assert_trees_close(g, w, rtol=1e-6, atol=1e-7)


# --- gradient accumulation -------------------------------------------------------------


def test_multisteps_updates_every_k_with_mean_gradient(rng):
    params = small_params(rng)
    grads = [random_like(rng, params) for _ in range(8)]
    tx = make_optimizer(OptimConfig(optimizer="adam", lr=1e-2, grad_accum=4), total_steps=8)
    history = run(tx, params, grads, jit=True)
    for i in range(3):
        assert_trees_equal(history[i], params)
    assert all(not np.array_equal(a, b) for a, b in zip(leaves(history[3]), leaves(params)))
    for i in range(4, 7):
        assert_trees_equal(history[i], history[3])

    def mean(gs):
        return jax.tree_util.tree_map(lambda *xs: sum(np.asarray(x, np.float64) for x in xs) / len(xs), *gs)

    mean_grads = [jax.tree_util.tree_map(jnp.float32, mean(grads[:4])), jax.tree_util.tree_map(jnp.float32, mean(grads[4:]))]
    want = run(optax.adam(1e-2), params, mean_grads)
    assert_trees_close(history[3], want[0], rtol=1e-5, atol=1e-6)
    assert_trees_close(history[7], want[1], rtol=1e-5, atol=1e-6)
    # ... and not the sum, nor the last gradient alone.
    assert not np.allclose(leaves(history[7])[0], leaves(run(optax.adam(1e-2), params, [grads[3], grads[7]])[1])[0])


def test_grad_accum_returns_a_gradient_transformation():
    # Regression: MultiSteps itself is no GradientTransformation; the hook checks the annotation.
    tx = make_optimizer(OptimConfig(optimizer="sgd", lr=1.0, grad_accum=2), total_steps=4)
    assert isinstance(tx, optax.GradientTransformation)
    state = TrainState.create({"w": jnp.zeros(())}, tx)
    for _ in range(2):
        state = state.apply_gradients(grads={"w": jnp.ones(())}, tx=tx)
    assert float(state.params["w"]) == -1.0


# --- freezing --------------------------------------------------------------------------


def train(tx, params, seed, steps=20, jit=False):
    """``steps`` updates through ``tx`` with random gradients from ``seed``; the final params."""
    rng = np.random.default_rng(seed)
    return run(tx, params, [random_like(rng, params) for _ in range(steps)], jit=jit)[-1]


@pytest.fixture(scope="module")
def plain_adamw(vae_params):
    """20 steps of the bare ``optax.adamw(1e-3)`` on seed 7's gradients (shared, compiled once)."""
    return train(optax.adamw(1e-3), vae_params, seed=7, jit=True)


def frozen_paths(params, freeze):
    return {p for p in param_paths(params) if any(p == f or p.startswith(f + "/") for f in freeze)}


@pytest.mark.parametrize(
    "freeze, expect_frozen",
    [
        (("encoder", "pre_latent_proj"), 8),
        (("decoder/Dense_2",), 2),
        (("decoder/Dense_2/", "class_proj/bias"), 3),
    ],
)
def test_freeze_keeps_frozen_leaves_bitwise_and_trains_the_rest(vae_params, plain_adamw, freeze, expect_frozen):
    tx = make_optimizer(OptimConfig(optimizer="adamw", lr=1e-3, freeze=freeze), total_steps=20, params=vae_params)
    new = train(tx, vae_params, seed=7, jit=True)
    frozen = frozen_paths(vae_params, [f.rstrip("/") for f in freeze])
    assert len(frozen) == expect_frozen
    for path, before, after in zip(param_paths(vae_params), leaves(vae_params), leaves(new), strict=True):
        if path in frozen:
            np.testing.assert_array_equal(after, before, err_msg=path)
        else:
            assert np.all(after != before), f"{path} did not train"
    # The trained leaves move exactly as plain adamw moves them.
    for path, got, want in zip(param_paths(vae_params), leaves(new), leaves(plain_adamw), strict=True):
        if path not in frozen:
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=path)


def test_freeze_with_grad_accum_and_clip(vae_params):
    config = OptimConfig(optimizer="adam", lr=1e-2, clip_norm=0.5, grad_accum=2, freeze=("encoder",))
    tx = make_optimizer(config, total_steps=10, params=vae_params)
    new = train(tx, vae_params, seed=3, steps=4, jit=True)
    for path, before, after in zip(param_paths(vae_params), leaves(vae_params), leaves(new), strict=True):
        if path.startswith("encoder/"):
            np.testing.assert_array_equal(after, before, err_msg=path)
        else:
            assert np.all(after != before), path


def test_freeze_labels_tree(vae_params):
    labels = freeze_labels(vae_params, ("decoder/Dense_2", "class_proj"))
    assert jax.tree_util.tree_structure(labels) == jax.tree_util.tree_structure(vae_params)
    assert labels["decoder"]["Dense_2"] == {"kernel": "freeze", "bias": "freeze"}
    assert labels["class_proj"] == {"kernel": "freeze", "bias": "freeze"}
    assert labels["decoder"]["Dense_1"] == {"kernel": "train", "bias": "train"}
    assert labels["encoder"]["Dense_0"]["kernel"] == "train"
    assert sorted(jax.tree_util.tree_leaves(labels)).count("freeze") == 4
    assert set(jax.tree_util.tree_leaves(freeze_labels(vae_params, ()))) == {"train"}


@pytest.mark.parametrize("bad", ["encodr", "enc", "decoder/Dense_9", "encoder/Dense_0/kern", "Dense_0"])
def test_freeze_labels_unknown_path_raises(vae_params, bad):
    with pytest.raises(ValueError) as info:
        freeze_labels(vae_params, ("encoder", bad))
    message = str(info.value)
    assert repr(bad) in message
    for name in TOP_LEVEL:
        assert name in message


def test_make_optimizer_unknown_freeze_path_raises(vae_params):
    with pytest.raises(ValueError, match="decodr"):
        make_optimizer(OptimConfig(freeze=("decodr",)), total_steps=10, params=vae_params)


def test_make_optimizer_freeze_needs_params():
    with pytest.raises(ValueError, match="params"):
        make_optimizer(OptimConfig(freeze=("encoder",)), total_steps=10)


def test_param_paths(vae_params):
    paths = param_paths(vae_params)
    expected = {f"{block}/Dense_{i}/{p}" for block in ("encoder", "decoder") for i in range(3) for p in ("kernel", "bias")}
    expected |= {f"{name}/{p}" for name in ("pre_latent_proj", "post_latent_proj", "class_proj") for p in ("kernel", "bias")}
    assert set(paths) == expected
    assert len(paths) == len(expected) == len(jax.tree_util.tree_leaves(vae_params))
    assert "encoder/Dense_0/kernel" in paths and "decoder/Dense_2/bias" in paths
    # Path i names leaf i.
    for path, leaf in zip(paths, jax.tree_util.tree_leaves(vae_params), strict=True):
        node = vae_params
        for part in path.split("/"):
            node = node[part]
        assert node is leaf


def test_param_paths_on_nested_dict():
    assert param_paths({"b": {"y": 1.0, "x": 2.0}, "a": 3.0}) == ["a", "b/x", "b/y"]


# --- config validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"optimizer": "Adam"}, "optimizer"),
        ({"schedule": "cosine"}, "schedule"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -1e-3}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"schedule": "warmup", "warmup_steps": 0}, "warmup_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"end_lr": -1e-5}, "end_lr"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"ema": 1.0}, "ema"),
        ({"ema": -0.1}, "ema"),
        ({"ema": 1.5}, "ema"),
        ({"grad_accum": 0}, "grad_accum"),
        ({"grad_accum": -2}, "grad_accum"),
    ],
)
def test_config_validation(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        OptimConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ema": 0.0},
        {"ema": 0.999},
        {"schedule": "warmup", "warmup_steps": 1},
        {"schedule": "linear", "end_lr": 0.0},
        {"clip_norm": 1e-3},
        {"grad_accum": 1},
    ],
)
def test_config_accepts_edge_values(rng, kwargs):
    config = OptimConfig(**kwargs)
    for name, value in kwargs.items():  # kept as given, not clamped or replaced
        assert getattr(config, name) == value, name
    # ... and the optimiser it describes works: two updates (a warmup starts at lr 0) are
    # finite and move every param (lr > 0, nothing frozen).
    params = small_params(rng)
    tx = make_optimizer(config, total_steps=10, params=params)
    final = run(tx, params, [random_like(rng, params) for _ in range(2)])[-1]
    assert jax.tree_util.tree_structure(final) == jax.tree_util.tree_structure(params)
    for before, after in zip(leaves(params), leaves(final), strict=True):
        assert after.shape == before.shape and after.dtype == before.dtype
        assert np.all(np.isfinite(after))
        assert np.all(after != before)


def test_config_is_frozen_and_defaults_are_tutorials():
    config = OptimConfig()
    assert (config.optimizer, config.lr, config.schedule, config.grad_accum, config.freeze) == (
        "adamw", 1e-4, "constant", 1, ()
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0
