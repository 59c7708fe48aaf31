"""scripts/bench.py's measuring helpers, on tiny programs (the benchmark itself is run by hand)."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from pureflax import vae

spec = importlib.util.spec_from_file_location("bench", Path(__file__).parent.parent / "scripts" / "bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_the_gemm_bound_multiplies_exactly_the_models_matmul_flops():
    config = vae.VAEConfig()
    params = jax.eval_shape(lambda: vae.init(jax.random.PRNGKey(0), config))
    shapes = bench.gemm_shapes(params, batch=16)
    assert len(shapes) == 3 * 9  # forward, dX and dW of each of the nine Dense layers
    flops = sum(2 * a[0] * a[1] * b[1] for a, b in shapes)
    assert flops == bench.model_flops_per_step(config, 16)
    assert all(a[1] == b[0] for a, b in shapes)  # every product's inner sizes agree


def test_contenders_take_turns_a_slice_at_a_time_each_round_starting_one_later():
    calls = []
    runs = {name: (lambda n, name=name: calls.append((name, n))) for name in "abc"}
    samples = bench.interleaved_samples(runs, steps=300, repeats=2, slices=3)
    assert all(n == 100 for _, n in calls) and len(calls) == 2 * 3 * 3
    assert [name for name, _ in calls[:9]] == list("abc" "bca" "cab")
    assert {name: len(rates) for name, rates in samples.items()} == {"a": 2, "b": 2, "c": 2}
    with pytest.raises(ValueError, match="300 steps do not split into 7 slices"):
        bench.interleaved_samples(runs, steps=300, repeats=1, slices=7)


def test_a_paired_ratio_cancels_the_hosts_drift_between_repeats():
    """b is 10% faster than a in the repeats where neither stalled, while the host slows over the run; b stalls
    in two repeats. The paired ratio says 1.1; the ratio of the medians mixes moments and says 0.82."""
    samples = {"a": [100.0, 90.0, 80.0, 70.0, 60.0], "b": [110.0, 99.0, 30.0, 30.0, 66.0]}
    assert bench.paired_ratio(samples, "b", "a") == pytest.approx(1.1)
    assert bench.statistics.median(samples["b"]) / bench.statistics.median(samples["a"]) == pytest.approx(0.825)


def test_peak_bytes_counts_arguments_outputs_and_scratch_once():
    x = jnp.zeros((256, 256), jnp.float32)  # 256 KiB
    donated = jax.jit(lambda a: a * 2.0, donate_argnums=0).lower(x).compile()
    kept = jax.jit(lambda a: a * 2.0).lower(x).compile()
    assert bench.peak_bytes(kept) >= 2 * x.nbytes  # the argument and a separate output
    assert x.nbytes <= bench.peak_bytes(donated) < 2 * x.nbytes  # the output reuses the donated argument


@pytest.mark.parametrize("argv", [["--steps", "50"], ["--steps", "150"], ["--repeats", "0"]])
def test_too_few_steps_or_repeats_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "bench.py: error: --steps must be a multiple of 100 and --repeats >= 1\n"  # one line


def test_train_run_with_missing_data_is_a_usage_error_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--train-run", "--data", "/no/such/mnist"])
    assert exit_info.value.code == 2
    assert "--data /no/such/mnist does not exist" in capsys.readouterr().err


def test_a_failed_train_run_names_train_pys_exit_status_and_last_line(monkeypatch):
    import subprocess

    failed = subprocess.CompletedProcess([], 2, stdout="", stderr="train.py: error: data: not MNIST\n")
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(bench.TrainRunFailed, match="train.py exited 2: train.py: error: data: not MNIST") as err:
        bench.train_run(lambda n: None, None, rounds=1, steps=100)
    assert err.value.returncode == 2


@pytest.mark.parametrize("preset, want", [(None, "false"), ("true", "true")])
def test_train_run_lets_each_process_take_gpu_memory_as_it_needs_unless_told(monkeypatch, tmp_path, preset, want):
    """bench.py --train-run runs train.py beside itself: on a GPU two processes preallocating 75% each cannot both start."""
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "unset by the test")  # restored at teardown
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE")
    if preset is not None:
        monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", preset)
    monkeypatch.setattr(bench, "backend_runs", lambda *args, **kwargs: (None, bench.Loop(lambda n: None)))
    seen = {}

    def train_run(*args, **kwargs):  # what train.py's processes would inherit
        seen["env"] = bench.os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")
        return {"runs": [], "ratio": 1.0}

    monkeypatch.setattr(bench, "train_run", train_run)
    (tmp_path / "mnist.pkl.gz").touch()
    assert bench.main(["--train-run", "--data", str(tmp_path / "mnist.pkl.gz")]) == 0
    assert seen["env"] == want
