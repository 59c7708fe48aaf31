"""Fused and per-step training agree; data parallel over 4 devices agrees with 1 device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from pureflax import loop, train

ROOT = Path(__file__).resolve().parents[1]


def test_chunks_end_at_every_log_line():
    assert loop.chunks(250, 100) == [(0, 100), (100, 100), (200, 50)]
    assert loop.chunks(100, 100) == [(0, 100)]
    assert loop.chunks(7, 3) == [(0, 3), (3, 3), (6, 1)]


def test_epoch_order_is_a_permutation_without_the_remainder():
    order = np.asarray(loop.epoch_order(jax.random.PRNGKey(0), 50, 8))
    assert order.shape == (6, 8)
    assert len(set(order.ravel().tolist())) == 48 and order.max() < 50


@pytest.mark.parametrize("backend", ["functional", "equinox"])
def test_fused_and_per_step_give_the_same_losses_and_state(tmp_path, backend):
    from pureflax.compat.backends import get_backend
    from test_train import tiny_mnist

    data = tiny_mnist(n_train=96, n_test=16)
    results = {}
    for fuse in (True, False):
        config = train.TrainConfig(epochs=2, batch_size=8, log_every=4, fuse=fuse)
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


def test_too_many_devices_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"--devices 64: this machine has \d+ .*xla_force_host_platform_device_count"):
        loop.make_placement(64)


def test_a_batch_that_does_not_split_is_refused():
    with pytest.raises(ValueError, match="--batch-size 10 does not split evenly over --devices 4"):
        train.TrainConfig(batch_size=10, devices=4)


def test_four_devices_match_one_device(tmp_path):
    """scripts/train.py on 4 forced CPU devices logs the same losses as on 1 (subprocesses: the flag is per process)."""
    from pureflax.data import save_mnist
    from test_train import tiny_mnist

    save_mnist(tiny_mnist(n_train=128, n_test=16), tmp_path / "data")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    logs = {}
    for devices in (1, 4):
        out = tmp_path / f"d{devices}"
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "train.py"), "--data", str(tmp_path / "data"), "--out", str(out),
             "--epochs", "2", "--batch-size", "16", "--log-every", "4", "--devices", str(devices)],
            capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert ("4 devices, data parallel" in result.stdout) == (devices == 4)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        logs[devices] = np.array([[r["loss"], r["mse"], r["kl"]] for r in rows if "step" in r and "loss" in r])
    assert logs[1].shape == logs[4].shape == (4, 3)
    np.testing.assert_allclose(logs[4], logs[1], rtol=1e-5)
