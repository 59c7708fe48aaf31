"""scripts/train.py end to end on tiny data, and its answers to bad input."""

import dataclasses
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from pureflax import TrainState, checkpoint, optim, train, vae
from pureflax.data import save_mnist

import tiny
from tiny import tiny_mnist  # noqa: F401  (other test files take it from here)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train.py"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "mnist"
    save_mnist(tiny_mnist(), path)
    return path


def load_script():
    return tiny.load_script("train")


def run_script(*args, timeout=240):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


@pytest.fixture(scope="module")
def smoke_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    result = run_script("--data", tiny_data, "--out", out, "--epochs", "2", "--batch-size", "8", "--log-every", "4")
    return result, out


def test_smoke_run_succeeds_and_logs_the_tutorial_line(smoke_run):
    result, _ = smoke_run
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert lines[0].startswith("epoch 0 | step 4 | loss: ") and " ~ mse: " in lines[0] and ". kl: " in lines[0]
    assert len(lines) == 2 * (96 // 8 // 4)
    assert "test loss:" in result.stdout


def test_smoke_run_writes_every_output(smoke_run):
    result, out = smoke_run
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged, final = rows[:-1], rows[-1]
    assert len(logged) == 6
    for row in logged:
        assert {"epoch", "step", "loss", "mse", "kl"} <= row.keys()
        assert np.isclose(row["loss"], row["mse"] + 0.5 * row["kl"], rtol=1e-4)
    assert [r["epoch"] for r in logged] == [0, 0, 0, 1, 1, 1]
    assert {"test_loss", "test_mse", "test_kl", "seconds", "compile_seconds", "step_seconds"} <= final.keys()
    assert 0 < final["compile_seconds"] and 0 < final["step_seconds"]
    assert final["compile_seconds"] + final["step_seconds"] <= final["seconds"]
    assert final["steps"] == 24 and final["checkpoint_step"] == 24
    for name in ("samples.png", "reconstructions.png", "loss.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert (out / "checkpoints" / "24" / "commit_success.txt").exists()


def test_checkpoint_of_the_run_restores(smoke_run):
    _, out = smoke_run
    config = vae.VAEConfig()
    params = vae.init(jax.random.PRNGKey(0), config)
    tx = optim.make_optimizer(optim.OptimConfig(), 24, params)
    restored = checkpoint.restore(out / "checkpoints", TrainState.create(params, tx))
    assert int(restored.step) == 24
    assert not np.array_equal(restored.params["encoder"]["Dense_0"]["kernel"], params["encoder"]["Dense_0"]["kernel"])


def test_fit_is_deterministic_and_learns(tmp_path):
    """Same seed, same run; and the run keeps Python's cycle collector off the heap it found (train.heap_frozen),
    giving it back at the end."""
    config = train.TrainConfig(epochs=3, batch_size=8, log_every=4, seed=3, pictures=False)
    data = tiny_mnist()
    results, frozen = [], []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        results.append(train.fit(config, data, tmp_path / name, progress=False,
                                 hook=lambda event, step: frozen.append(gc.get_freeze_count())))
        assert gc.get_freeze_count() == 0
    assert frozen and min(frozen) > 10_000
    a, b = results
    assert [r["loss"] for r in a.log] == [r["loss"] for r in b.log]
    assert a.log[-1]["loss"] < a.log[0]["loss"]
    assert not list((tmp_path / "a").glob("*.png"))  # pictures=False: none drawn
    for x, y in zip(jax.tree_util.tree_leaves(a.state), jax.tree_util.tree_leaves(b.state)):
        np.testing.assert_array_equal(x, y)


def test_a_heap_frozen_before_is_left_frozen():
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        with train.heap_frozen():
            assert gc.get_freeze_count() <= before  # not frozen again (objects only die meanwhile)
        assert gc.get_freeze_count() > 0  # and not thawed on the way out
    finally:
        gc.unfreeze()


def test_a_failing_run_gives_the_heap_back():
    with pytest.raises(RuntimeError, match="inside"):
        with train.heap_frozen():
            assert gc.get_freeze_count() > 0
            raise RuntimeError("inside")
    assert gc.get_freeze_count() == 0


def test_max_steps_stops_early(tiny_data, tmp_path):
    assert load_script().main(["--data", str(tiny_data), "--out", str(tmp_path / "o"), "--max-steps", "5", "--batch-size", "8",
                               "--log-every", "5"]) == 0
    final = json.loads((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["steps"] == 5
    assert final["final_epoch"] == 0  # 5 steps of a 12-step epoch: the first epoch, not the next


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "--batch-size: must be >= 1"),
        (["--lr", "abc"], "--lr: expected a number"),
        (["--lr", "-1"], "--lr: must be > 0"),
        (["--epochs", "2.5"], "--epochs: expected a whole number"),
        (["--backend", "torch"], "--backend: invalid choice"),
        (["--init", "random"], "--init: invalid choice"),
        (["--optimizer", "rmsprop"], "--optimizer: invalid choice"),
        (["--schedule", "warmup"], "warmup-steps >= 1"),
        (["--ema", "1.5"], "--ema: must be in [0, 1)"),
        (["--seed", "-3"], "--seed: must be in [0, 2**32)"),
        (["--freeze", "encodr"], "--freeze 'encodr' matches no parameter"),
        (["--data", "/no/such/mnist"], "--data /no/such/mnist does not exist"),
        (["--kl-weight", "nan"], "--kl-weight: must be finite"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        load_script().main(["--out", str(tmp_path / "o"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "o").exists()  # nothing was created for a refused run


@pytest.mark.parametrize("args", [["--lr", "abc"], ["--freeze", "encodr"]])
def test_bad_flags_from_the_command_line_print_no_traceback(tmp_path, args):
    result = run_script("--out", tmp_path / "o", *args, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr


def main_exit(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        load_script().main(list(map(str, args)))
    return exit_info.value.code, capsys.readouterr().err


def test_out_holding_a_run_is_refused_unless_overwrite(smoke_run, tiny_data, capsys):
    _, out = smoke_run
    before = (out / "metrics.jsonl").read_text()
    code, err = main_exit(capsys, "--data", tiny_data, "--out", out, "--max-steps", "2", "--batch-size", "8")
    assert code == 2 and "already holds a run" in err and "--overwrite" in err
    assert (out / "metrics.jsonl").read_text() == before


def test_overwrite_replaces_the_run_and_nothing_else(tiny_data, tmp_path):
    out = tmp_path / "o"
    args = ["--data", str(tiny_data), "--out", str(out), "--max-steps", "4", "--batch-size", "8", "--log-every", "2"]
    assert load_script().main(args) == 0
    (out / "notes.txt").write_text("mine")
    assert load_script().main([*args[:-6], "--max-steps", "2", "--batch-size", "8", "--log-every", "2", "--overwrite"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["steps"] == 2 and len(rows) == 2 and checkpoint.all_steps(out / "checkpoints") == [2]
    assert (out / "notes.txt").read_text() == "mine"


def test_unwritable_out_is_refused_before_training(tmp_path, tiny_data, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, err = main_exit(capsys, "--data", tiny_data, "--out", blocker / "sub", "--max-steps", "2", "--batch-size", "8")
    assert code == 2 and "--out" in err and err.count("\n") == 1


@pytest.mark.parametrize("backend", ["functional", "equinox", "flax", "nnx"])
def test_every_flag_works_with_every_backend(tiny_data, tmp_path, backend):
    args = ["--backend", backend, "--data", str(tiny_data), "--out", str(tmp_path / "o"), "--batch-size", "8",
            "--max-steps", "8", "--log-every", "4", "--kl-weight", "0.25", "--lr", "3e-4",
            "--optimizer", "adam", "--schedule", "warmup", "--warmup-steps", "2", "--end-lr", "1e-5",
            "--clip-norm", "1.0", "--ema", "0.9", "--grad-accum", "2", "--freeze", "encoder/Dense_0",
            "--seed", "0x10", "--no-pictures"]
    assert load_script().main(args) == 0
    assert not list((tmp_path / "o").glob("*.png"))
    rows = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[-1]["steps"] == 8
    assert np.isclose(rows[0]["loss"], rows[0]["mse"] + 0.25 * rows[0]["kl"], rtol=1e-4)


def test_the_next_chunk_is_dispatched_before_a_chunks_metrics_are_read(tmp_path, monkeypatch):
    """No host stall between chunks: chunk k+1 is on its way while chunk k is logged; a save waits; the
    evaluation is dispatched behind the last chunk, before its metrics are read."""
    from pureflax import loop, report, rundir

    events = []
    make = loop.make_fused_runner

    def logging_runner(*args, **kwargs):
        run = make(*args, **kwargs)

        def dispatch(state, data, order, start, key, length):
            events.append(("dispatch", int(start)))
            return run(state, data, order, start, key, length)

        return dispatch

    record = rundir.RunFolder.record
    monkeypatch.setattr(loop, "make_fused_runner", logging_runner)
    monkeypatch.setattr(rundir.RunFolder, "record", lambda self, pos, metrics: events.append(("read", pos.step)) or record(self, pos, metrics))
    monkeypatch.setattr(rundir.RunFolder, "save", lambda self, state, pos, *a, save=rundir.RunFolder.save: events.append(("save", pos.step)) or save(self, state, pos, *a))
    start_evaluation = report.start_evaluation
    monkeypatch.setattr(report, "start_evaluation", lambda *a: events.append(("evaluate",)) or start_evaluation(*a))
    config = train.TrainConfig(epochs=1, batch_size=8, log_every=2, ckpt_every=6, pictures=False)
    train.fit(config, tiny_mnist(n_train=80, n_test=8), tmp_path / "o", progress=False)
    # chunks of 2 steps (10 in all), a checkpoint at 6: its chunk is read and saved before the next is dispatched
    assert events == [("dispatch", 0), ("dispatch", 2), ("read", 0), ("dispatch", 4), ("read", 2), ("read", 4),
                      ("save", 6), ("dispatch", 6), ("dispatch", 8), ("read", 6), ("evaluate",), ("read", 8), ("save", 10)]


def test_the_parser_is_built_from_the_configs_fields_with_their_defaults_and_rules():
    from pureflax import config

    script = load_script()
    parser = script.build_parser()
    assert script.configure(parser.parse_args([])) == config.TrainConfig().resolved()  # every default written once
    offered = {action.dest for action in parser._actions}
    for kind in (config.TrainConfig, config.OptimConfig):
        for field in dataclasses.fields(kind):
            if "help" in field.metadata:  # a setting: it has a flag unless it says it is hidden
                assert (field.name in offered) != bool(field.metadata["flag"].get("hidden")), field.name
    # the rule that refuses a flag is the one that refuses the setting in Python
    with pytest.raises(config.SettingError, match="`warmup_steps` must be >= 0, got -1"):
        config.OptimConfig(warmup_steps=-1)
    with pytest.raises(SystemExit):
        parser.parse_args(["--warmup-steps", "-1"])


def test_help_and_flag_errors_answer_without_importing_jax():
    code = ("import runpy, sys\nsys.argv = ['train.py', *sys.argv[1:]]\ntry:\n"
            "    runpy.run_path('scripts/train.py', run_name='__main__')\nexcept SystemExit as exit:\n"
            "    print('exit', exit.code, 'jax' in sys.modules)\n")
    for args, status in ((["--help"], 0), (["--lr", "-1"], 2)):
        result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                                cwd=Path(__file__).parent.parent)
        assert result.stdout.splitlines()[-1] == f"exit {status} False", (args, result.stdout, result.stderr)
