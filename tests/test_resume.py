"""Runs that lose nothing: kill -9 and resume, signals, damaged checkpoints, NaN, wrong configs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from pureflax import TrainState, checkpoint, train
from pureflax.data import save_mnist

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from test_train import tiny_mnist

    path = tmp_path_factory.mktemp("data") / "mnist"
    save_mnist(tiny_mnist(n_train=160, n_test=16), path)  # 20 steps per epoch at batch 8
    return path


def args_for(data, out, *extra):
    return ["--data", str(data), "--out", str(out), "--batch-size", "8", "--epochs", "3", "--log-every", "4",
            "--ckpt-every", "10", "--latent-dim", "8", *extra]


def start(args):
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, cwd=ROOT)


def run(args, timeout=240):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


def committed(out):
    return checkpoint.all_steps(out / "checkpoints")


def wait_for_checkpoint(process, out, at_least, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            return False
        if any(s >= at_least for s in committed(out)):
            return True
        time.sleep(0.05)
    return False


def logged(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r and "step" in r], rows[-1]


def final_params(out):
    directory = out / "checkpoints"
    step = checkpoint.latest_step(directory)
    meta = checkpoint.read_meta(directory, step)
    assert meta["position"][0] == step
    tree = checkpoint.restore_raw(directory, step)
    return step, tree


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted runs, one per (backend, fuse)."""
    cache = {}

    def get(backend, fuse):
        if (backend, fuse) not in cache:
            out = tmp_path_factory.mktemp(f"ref-{backend}-{fuse}") / "out"
            result = run(args_for(data, out, "--backend", backend, *([] if fuse else ["--no-fuse"])))
            assert result.returncode == 0, result.stderr[-2000:]
            cache[backend, fuse] = out
        return cache[backend, fuse]

    return get


def assert_same_run(a, b):
    rows_a, final_a = logged(a)
    rows_b, final_b = logged(b)
    assert [r["global_step"] for r in rows_a] == [r["global_step"] for r in rows_b]
    for x, y in zip(rows_a, rows_b):
        for key in ("loss", "mse", "kl"):
            assert abs(x[key] - y[key]) <= 1e-6 * max(1.0, abs(y[key])), (key, x, y)
    assert final_a["steps"] == final_b["steps"]
    assert abs(final_a["test_loss"] - final_b["test_loss"]) <= 1e-6 * abs(final_b["test_loss"])
    step_a, tree_a = final_params(a)
    step_b, tree_b = final_params(b)
    assert step_a == step_b
    for x, y in zip(jax.tree_util.tree_leaves(tree_a), jax.tree_util.tree_leaves(tree_b)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend, fuse", [("functional", True), ("functional", False), ("equinox", True), ("flax", True)])
def test_kill_9_and_resume_ends_where_the_uninterrupted_run_ends(data, tmp_path, reference, backend, fuse):
    extra = ["--backend", backend, *([] if fuse else ["--no-fuse"])]
    out = tmp_path / "out"
    process = start(args_for(data, out, *extra))
    reached = wait_for_checkpoint(process, out, at_least=20)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert reached and process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = max(committed(out))
    assert killed_at < 60
    result = run(args_for(data, out, *extra, "--resume"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming from step {killed_at}" in result.stdout
    assert_same_run(out, reference(backend, fuse))


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_save_print_how_to_resume_and_exit(data, tmp_path, reference, sig, status):
    out = tmp_path / "out"
    process = start(args_for(data, out))
    assert wait_for_checkpoint(process, out, at_least=10)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == status, stderr[-2000:]
    assert signal.Signals(sig).name in stderr and "--resume" in stderr and "Traceback" not in stderr
    stopped_at = max(committed(out))
    assert stopped_at < 60  # it stopped early, and saved where it stopped
    assert checkpoint.read_meta(out / "checkpoints", stopped_at)["position"][0] == stopped_at
    if sig == signal.SIGTERM:
        return  # resuming after a signal is the same as after SIGINT, checked below; spare the suite a run
    result = run(args_for(data, out, "--resume"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(out, reference("functional", True))


def test_a_half_written_checkpoint_is_never_taken_as_good(data, tmp_path, reference):
    out = tmp_path / "out"
    process = start(args_for(data, out))
    assert wait_for_checkpoint(process, out, at_least=10)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    good = max(committed(out))
    # what a kill in the middle of orbax writing step good+10 leaves: its temporary folder, partly written
    partial = out / "checkpoints" / f"{good + 10}.orbax-checkpoint-tmp-1234"
    partial.mkdir()
    (partial / "state").mkdir()
    (partial / "state" / "half").write_bytes(b"\0" * 10)
    assert max(committed(out)) == good
    result = run(args_for(data, out, "--resume"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming from step {good}" in result.stdout
    assert_same_run(out, reference("functional", True))


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_a_damaged_latest_checkpoint_is_set_aside(data, tmp_path, reference, damage):
    out = tmp_path / "out"
    process = start(args_for(data, out))
    assert wait_for_checkpoint(process, out, at_least=20)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    steps = committed(out)
    latest, previous = steps[-1], steps[-2]
    files = sorted(p for p in (out / "checkpoints" / str(latest) / "state").rglob("*") if p.is_file() and p.stat().st_size > 0)
    assert files
    for path in files:
        if damage == "truncate":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
        else:
            path.unlink()
    result = run(args_for(data, out, "--resume"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"checkpoint step {latest} is damaged" in result.stdout
    assert f"resuming from step {previous}" in result.stdout
    assert (out / "checkpoints" / f"{latest}.damaged").is_dir()  # set aside, not deleted
    assert_same_run(out, reference("functional", True))


def test_a_non_finite_loss_stops_with_the_step_and_term_and_saves_nothing_bad(data, tmp_path):
    out = tmp_path / "out"
    result = run(args_for(data, out, "--lr", "1e12", "--optimizer", "sgd", "--ckpt-every", "2"))
    assert result.returncode == 3, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    assert "non-finite" in message and ("mse is" in message or "kl is" in message) and "Traceback" not in result.stderr
    bad_step = int(message.split("step ")[1].split(":")[0])
    steps = committed(out)
    assert all(s < bad_step for s in steps)
    if steps:
        tree = checkpoint.restore_raw(out / "checkpoints", steps[-1])
        assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree["params"]))


def test_check_finite_names_the_root_term():
    metrics = np.array([[1.0, 1.0, 0.0], [np.inf, np.inf, 0.5], [np.nan, 1.0, np.nan]])
    with pytest.raises(train.NonFiniteLoss, match="step 12: mse is inf"):
        train.check_finite(metrics, 10)
    with pytest.raises(train.NonFiniteLoss, match="step 3: kl is nan"):
        train.check_finite(metrics[2:], 2)


def test_resume_with_another_model_names_the_path_and_both_shapes_and_writes_nothing(data, tmp_path):
    out = tmp_path / "out"
    assert run(args_for(data, out, "--max-steps", "12")).returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = run(args_for(data, out, "--resume", "--latent-dim", "16", "--max-steps", "24"))
    assert result.returncode == 2
    assert "latent_proj/kernel was saved with shape" in result.stderr  # the path, then both shapes
    assert ("(8, 64)" in result.stderr and "(16, 64)" in result.stderr) or ("(64, 16)" in result.stderr and "(64, 32)" in result.stderr)
    assert "Traceback" not in result.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_and_overwrite_conflict_and_resume_needs_checkpoints(data, tmp_path):
    result = run(args_for(data, tmp_path / "none", "--resume"))
    assert result.returncode == 2 and "holds no checkpoints" in result.stderr
    result = run(args_for(data, tmp_path / "none", "--resume", "--overwrite"))
    assert result.returncode == 2 and "choose one" in result.stderr


def test_prune_keeps_the_newest_and_the_best(tmp_path):
    tx = optax.sgd(0.1)
    state = TrainState.create({"w": np.ones(2, np.float32)}, tx)
    losses = {2: 5.0, 4: 1.0, 6: 3.0, 8: 4.0, 10: 6.0}
    for step, loss in losses.items():
        checkpoint.save(tmp_path, state._replace(step=np.int32(step)), meta={"test_loss": loss})
    assert checkpoint.best_step(tmp_path) == 4
    deleted = checkpoint.prune(tmp_path, keep=2, keep_best=True)
    assert sorted(deleted) == [2, 6]
    assert checkpoint.all_steps(tmp_path) == [4, 8, 10]
    assert checkpoint.latest_step(tmp_path) == 10  # resuming takes the latest, not the best


def checkpoints_script(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "checkpoints.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=ENV, cwd=ROOT)


def test_checkpoints_script_lists_shows_and_exports(data, tmp_path):
    out = tmp_path / "out"
    assert run(args_for(data, out, "--max-steps", "24", "--keep", "2", "--keep-best")).returncode == 0
    listing = checkpoints_script("list", out)
    assert listing.returncode == 0, listing.stderr
    steps = checkpoint.all_steps(out / "checkpoints")
    assert 24 in steps and len(steps) <= 3  # newest two and the best
    assert "latest" in listing.stdout and "best" in listing.stdout
    shown = checkpoints_script("show", out, "--step", 24)
    assert shown.returncode == 0 and "encoder/Dense_0/kernel" in shown.stdout and "(784, 256)" in shown.stdout
    tree = checkpoint.restore_raw(out / "checkpoints", 24)["params"]
    for target in (tmp_path / "p.npz", tmp_path / "p.safetensors"):
        exported = checkpoints_script("export", out, target)
        assert exported.returncode == 0, exported.stderr
        if target.suffix == ".npz":
            arrays = dict(np.load(target))
        else:
            from safetensors.numpy import load_file

            arrays = load_file(str(target))
        np.testing.assert_array_equal(arrays["encoder/Dense_0/kernel"], tree["encoder"]["Dense_0"]["kernel"])
        assert len(arrays) == 18  # 9 dense layers, kernel and bias


@pytest.mark.parametrize(
    "args, message",
    [(["list", "/no/such/run"], "is not a folder"), (["export", ".", "p.txt"], "holds no checkpoints"),
     (["frobnicate", "."], "invalid choice")],
)
def test_checkpoints_script_bad_input_exits_2_with_one_line(args, message):
    result = checkpoints_script(*args)
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1
