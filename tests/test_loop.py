"""Fused and per-step training agree; data parallel over 4 devices agrees with 1 device."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from pureflax import loop, rundir, train, vae
from pureflax import step as step_lib
from tiny import tiny_mnist

ROOT = Path(__file__).resolve().parents[1]

# A small model: whether the fused scan and the per-step loop agree does not depend on the
# model's size, and compiling the full-size one (twice per backend) took most of the time.
SMALL = vae.VAEConfig(encoder_dimensions=(32, 16), decoder_dimensions=(16, 784), latent_dim=4)


def test_chunks_end_at_every_log_line():
    def chunks(total, log_every):  # one epoch of ``total`` steps: (start, length) of each chunk
        return [(c.start, c.length) for c in rundir.chunks(0, rundir.Plan(total, total, log_every, None))]

    assert chunks(250, 100) == [(0, 100), (100, 100), (200, 50)]
    assert chunks(100, 100) == [(0, 100)]
    assert chunks(7, 3) == [(0, 3), (3, 3), (6, 1)]


def test_epoch_order_is_a_permutation_without_the_remainder():
    order = np.asarray(loop.epoch_order(jax.random.PRNGKey(0), 50, 8))
    assert order.shape == (6, 8)
    assert len(set(order.ravel().tolist())) == 48 and order.max() < 50


@pytest.mark.parametrize("backend", ["functional", "equinox", "nnx"])
def test_fused_and_per_step_give_the_same_losses_and_state(tmp_path, backend):
    from pureflax.compat.backends import get_backend

    data = tiny_mnist(n_train=96, n_test=16)
    results = {}
    for fuse in (True, False):
        config = train.TrainConfig(epochs=2, batch_size=8, log_every=4, fuse=fuse, model=SMALL, pictures=False)
        out = tmp_path / f"fuse-{fuse}"
        out.mkdir()
        results[fuse] = train.fit(config, data, out, backend=get_backend(backend, config.model), progress=False)
    fused, per_step = results[True], results[False]
    assert len(fused.log) == len(per_step.log) == 6
    for a, b in zip(fused.log, per_step.log):
        for name in ("loss", "mse", "kl"):
            assert abs(a[name] - b[name]) <= 1e-5 * abs(b[name]), (name, a, b)
    for a, b in zip(jax.tree_util.tree_leaves(fused.state), jax.tree_util.tree_leaves(per_step.state)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_one_fused_program_runs_every_chunk_up_to_its_capacity():
    """An epoch that ends mid log window makes a shorter chunk: the same program runs it (no second
    compile, and no slicing op on the device: its metrics come back padded, read_metrics trims them
    on the host), and each chunk's metrics are its own steps', as the per-step runner gives them."""
    from pureflax.compat.backends import get_backend

    config = train.TrainConfig(epochs=2, batch_size=8, log_every=4, model=SMALL)  # the programs of the test above
    data = train.to_device(tiny_mnist(n_train=96, n_test=16).train, loop.Placement(None))
    order, key = loop.epoch_order(jax.random.PRNGKey(1), 96, 8), jax.random.PRNGKey(2)
    results = {}
    for fused in (True, False):
        state, _, _, train_step = train.build(config, get_backend("functional", SMALL), 24, jax.random.PRNGKey(0))
        runner = loop.make_fused_runner(train_step, capacity=4) if fused else loop.make_per_step_runner(train_step)
        metrics, rows = [], []
        for start, length in ((0, 4), (4, 3), (7, 1)):
            state, chunk = runner(state, data, order, start, key, length)
            rows.append(chunk.shape[0])
            metrics.append(loop.read_metrics(chunk, length))
        results[fused] = metrics, state
        if fused:
            assert runner.program._cache_size() == 1
            assert rows == [4, 4, 4]  # the program's own output, padded
            assert not np.asarray(chunk)[1:].any()  # the last chunk's 3 rows of padding are zeros
        else:
            assert rows == [4, 3, 1]
    assert [m.shape for m in results[True][0]] == [(4, 3), (3, 3), (1, 3)]
    np.testing.assert_allclose(np.concatenate(results[True][0]), np.concatenate(results[False][0]), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(results[True][1]), jax.tree_util.tree_leaves(results[False][1])):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _program(lowered) -> list[str]:
    """A lowered program's StableHLO without what only names it: locations and quoted strings."""
    text = re.sub(r"loc\(#loc\d*\)|\"[^\"]*\"", "", lowered.as_text())
    return [line.strip() for line in text.splitlines() if not line.startswith("#loc")]


def test_the_functional_flax_and_nnx_forms_hand_xla_one_program():
    """Fused, the functional, Flax and NNX forms are one program to XLA, line for line but for
    names, so one speed on any platform: a gap between them in a benchmark is its noise."""
    from pureflax.compat.backends import get_backend

    data = tiny_mnist(n_train=32, n_test=8).train
    batch = step_lib.Batch(jax.numpy.asarray(data.images), jax.numpy.asarray(data.labels))
    order, config = loop.epoch_order(jax.random.PRNGKey(1), 32, 8), train.TrainConfig(model=SMALL, batch_size=8)
    programs = {}
    for name in ("functional", "flax", "nnx"):
        state, _, _, step = train.build(config, get_backend(name, SMALL), 100, jax.random.PRNGKey(0))
        programs[name] = _program(loop.make_fused_runner(step).lower(state, batch, order, 0, jax.random.PRNGKey(2), 4))
    assert len(programs["functional"]) > 100
    assert programs["flax"] == programs["functional"]
    assert programs["nnx"] == programs["functional"]


def test_fused_by_default_except_the_conv_vae_on_cpu():
    from pureflax import convvae

    conv = convvae.ConvVAEConfig()
    assert loop.fuses_well(SMALL, "cpu") and loop.fuses_well(SMALL, "gpu") and loop.fuses_well(conv, "gpu")
    assert not loop.fuses_well(conv, "cpu")
    # the run's config says which it used (its checkpoints record it); a flag given is kept
    assert train.TrainConfig(model=conv).resolved().fuse is (jax.default_backend() != "cpu")
    assert train.TrainConfig(model=SMALL).resolved().fuse is True
    assert train.TrainConfig(model=conv, fuse=True).resolved().fuse is True


def test_too_many_devices_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"`devices` 64: this machine has \d+ .*xla_force_host_platform_device_count"):
        loop.make_placement(64)


def test_a_batch_that_does_not_split_is_refused(monkeypatch):
    # As if there were 4 devices (this process has 1): the split is checked before any is used.
    monkeypatch.setattr(jax, "devices", lambda *args, **kwargs: [jax.local_devices()[0]] * 4)
    with pytest.raises(ValueError, match="`batch_size` 10 does not split evenly over `devices` 4"):
        loop.make_placement(4, batch_size=10)


# Both runs in one process that has 4 forced CPU devices (the flag is per process, hence a
# subprocess): the 1-device run places everything on the first device alone, as in a
# 1-device process, and the process starts (imports, shared compiles) once, not twice.
TWO_RUNS = """
import sys
sys.path.insert(0, sys.argv[1])
from tiny import load_script

main = load_script("train").main
for devices in (1, 4):
    print(f"=== --devices {devices}", flush=True)
    code = main(["--data", sys.argv[2], "--out", f"{sys.argv[3]}/d{devices}", "--epochs", "2",
                 "--batch-size", "16", "--log-every", "4", "--devices", str(devices), "--no-pictures"])
    sys.stdout.flush()
    if code:
        sys.exit(code)
for devices in (1, 4):  # a sweep of 4 members, split over the devices
    print(f"=== sweep --devices {devices}", flush=True)
    code = main(["--data", sys.argv[2], "--out", f"{sys.argv[3]}/s{devices}", "--epochs", "1", "--seeds", "0-3",
                 "--batch-size", "16", "--log-every", "4", "--devices", str(devices), "--no-pictures"])
    sys.stdout.flush()
    if code:
        sys.exit(code)

# the chunk's batches fed from this process's rows (as each of several processes does) against gathered on the devices
import jax, numpy as np
from pureflax import loop, train, vae
from tiny import tiny_mnist
config = train.TrainConfig(batch_size=8, model=vae.VAEConfig(encoder_dimensions=(32, 16), decoder_dimensions=(16, 784), latent_dim=4))
placement, host = loop.make_placement(4, 8), train.on_host(tiny_mnist(n_train=64, n_test=8).train)
keys = train.make_keys(0)
state, _, _, step = train.build(config, train.functional_backend(config.model), 100, keys.model)
state = jax.device_get(state)
order = loop.shuffle(keys.data, 0, 64, 8)
for runner, fed in ((loop.make_fused_runner(step, placement, 4), loop.fed_from_each_process(loop.make_fused_runner(step, placement, 4), placement, 4)),
                    (loop.make_per_step_runner(step, placement), loop.fed_from_each_process(loop.make_per_step_runner(step, placement), placement))):
    a = runner(placement.replicate(state), train.to_device(train.on_host(tiny_mnist(n_train=64, n_test=8).train), placement), order, 2, keys.train, 3)
    b = fed(placement.replicate(state), host, order, 2, keys.train, 3)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
print("=== fed: the same bits", flush=True)
"""


def test_four_devices_match_one_device(tmp_path):
    """scripts/train.py on 4 forced CPU devices logs the same losses as on 1."""
    from pureflax.data import save_mnist

    save_mnist(tiny_mnist(n_train=128, n_test=16), tmp_path / "data")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", TWO_RUNS, str(Path(__file__).resolve().parent), str(tmp_path / "data"), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.rstrip().endswith("=== fed: the same bits")
    runs, sweeps = result.stdout.split("=== sweep --devices ", 1)
    _, one, four = runs.split("=== --devices ")
    assert "a sweep of 4 members in one program (fused, members split over 4 devices)" in sweeps
    for seed in range(4):  # each member trains on its share of the devices as it does on one
        member = [[tmp_path / f"s{devices}" / f"seed-{seed}" / "metrics.jsonl"] for devices in (1, 4)]
        rows = [[json.loads(line) for line in path.read_text().splitlines()] for (path,) in member]
        losses = [np.array([[r["loss"], r["mse"], r["kl"]] for r in found if "loss" in r and "step" in r]) for found in rows]
        np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
        assert abs(rows[1][-1]["test_loss"] - rows[0][-1]["test_loss"]) <= 1e-5 * abs(rows[0][-1]["test_loss"])
    logs = {}
    for devices, stdout in ((1, one), (4, four)):
        assert stdout.startswith(f"{devices}\n")
        assert ("4 devices, data parallel" in stdout) == (devices == 4)
        rows = [json.loads(line) for line in (tmp_path / f"d{devices}" / "metrics.jsonl").read_text().splitlines()]
        logs[devices] = np.array([[r["loss"], r["mse"], r["kl"]] for r in rows if "step" in r and "loss" in r])
    assert logs[1].shape == logs[4].shape == (4, 3)
    np.testing.assert_allclose(logs[4], logs[1], rtol=1e-5)
