"""Every pair of backends computes the same thing from the same weights (limits from the design)."""

import jax
import pytest

from pureflax import vae
from pureflax.compat import parity
from pureflax.data import save_mnist

CONFIG = vae.VAEConfig()  # full size: the shapes that matter
SEED = jax.random.PRNGKey(0xFFFF)


def test_there_are_three_pairs():
    assert set(parity.PAIRS) == {("functional", "equinox"), ("functional", "flax"), ("equinox", "flax")}


def test_forward_outputs_agree_within_1e_5():
    diffs = parity.forward_max_abs_diff(CONFIG, SEED, parity.random_batch(jax.random.PRNGKey(1), 16))
    assert max(diffs.values()) <= 1e-5, diffs


def test_gradients_agree_within_1e_5_relative():
    diffs = parity.grad_max_rel_diff(CONFIG, SEED, parity.random_batch(jax.random.PRNGKey(2), 16))
    assert max(diffs.values()) <= 1e-5, diffs


def test_params_agree_within_1e_4_after_200_adamw_steps():
    batches = [parity.random_batch(jax.random.PRNGKey(100 + i), 16) for i in range(200)]
    diffs = parity.trained_params_max_abs_diff(CONFIG, SEED, batches)
    assert max(diffs.values()) <= 1e-4, diffs


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """train.py for each backend, same seed, 300 steps on a small dataset."""
    from test_train import load_script, tiny_mnist

    root = tmp_path_factory.mktemp("parity")
    save_mnist(tiny_mnist(n_train=480, n_test=32), root / "data")
    script = load_script()
    runs = {}
    for name in parity.NAMES:
        runs[name] = root / name
        args = ["--backend", name, "--data", str(root / "data"), "--out", str(runs[name]),
                "--max-steps", "300", "--seed", "7", "--log-every", "25"]
        assert script.main(args) == 0
    return runs


def test_train_py_loss_logs_agree_within_1e_3_relative(cli_runs):
    diffs = parity.log_max_rel_diff(cli_runs)
    assert max(diffs.values()) <= 1e-3, diffs
