"""The fault battery: storage damage, foreign files, signals at start-up, readers racing a writer, bad flags.

Each test is one row of the table in docs/reliability.md ("Checkpoints you can trust"). The run
they share is `R`: 40 steps at batch 8, a checkpoint every 10, finished; each test damages a copy
of it, and most resume it to 60 steps, which must end where `R` resumed undamaged ends. Real
processes only where the process is the point (Ctrl-C during start-up, a lock held by another
process, a writer beside readers).
"""

import json
import logging
import os
import random
import shlex
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import datasets
import jax
import numpy as np
import optax
import pytest

from pureflax import TrainState, checkpoint, rundir, train, vae
from pureflax.compat import load
from pureflax.data import MNIST, Split, save_mnist

from tiny import ROOT, load_script, tiny_mnist

TRAIN, CHECKPOINTS = load_script("train"), load_script("checkpoints")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
NOISE = ("Traceback", "Exception ignored", "Event loop is closed")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "mnist"
    save_mnist(tiny_mnist(n_train=160, n_test=16), path)  # 20 steps per epoch at batch 8
    return path


def args_for(data, out, *extra):
    """train.py's flags for these runs; a flag in ``extra`` replaces its value here."""
    extra = list(map(str, extra))
    base = {"--data": data, "--out": out, "--batch-size": 8, "--max-steps": 40, "--log-every": 4, "--ckpt-every": 10,
            "--latent-dim": 8}
    flags = [str(x) for flag, value in base.items() if flag not in extra for x in (flag, value)]
    return [*flags, "--no-compile-cache", "--no-pictures", *extra]


def cli(capsys, args, script=TRAIN):
    """A script's main in this process: (exit status, stdout, stderr)."""
    try:
        code = script.main(list(map(str, args)))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def resume(capsys, data, out, *extra):
    return cli(capsys, args_for(data, out, "--max-steps", 60, "--resume", *extra))


def rows(out):
    """metrics.jsonl, read as strict JSON (NaN and Infinity refused)."""
    def refuse(name):
        raise ValueError(f"{name} in metrics.jsonl")

    return [json.loads(line, parse_constant=refuse) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return [(r["global_step"], r["loss"]) for r in rows(out) if "loss" in r]


def the_file(out, step):
    """The largest array file of a step: the one holding the params and the optimiser's moments."""
    files = (out / "checkpoints" / str(step) / "state").rglob("*")
    return max((p for p in files if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)


def flip(path, offset, bit=0):
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("R") / "R"
    assert TRAIN.main(args_for(data, out)) == 0
    assert checkpoint.all_steps(out / "checkpoints") == [10, 20, 30, 40]
    return out


@pytest.fixture
def R(finished, tmp_path):
    """A copy of the finished run, to damage."""
    return Path(shutil.copytree(finished, tmp_path / "R"))


@pytest.fixture(scope="module")
def reference(finished, data, tmp_path_factory):
    """``R`` resumed to 60 steps, undamaged: where every resume below must end."""
    out = Path(shutil.copytree(finished, tmp_path_factory.mktemp("ref") / "R"))
    assert TRAIN.main(args_for(data, out, "--max-steps", 60, "--resume")) == 0
    return out


def assert_ends_like(out, reference):
    assert losses(out) == losses(reference)
    final, expected = rows(out)[-1], rows(reference)[-1]
    assert final["test_loss"] == expected["test_loss"] and final["steps"] == 60
    a, b = (checkpoint.restore_raw(o / "checkpoints", 60)["params"] for o in (out, reference))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)


# --- row 1: the log ---------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["one byte", "garbage"])
def test_unreadable_log_lines_are_kept_aside_never_deleted(R, data, capsys, reference, damage):
    log = R / "metrics.jsonl"
    lines = log.read_bytes().split(b"\n")
    if damage == "one byte":  # row 2 of the log (step 8), one byte changed by a disk error or an editor
        lines[1] = b"\xff" + lines[1][1:]
        bad = {2: lines[1]}
    else:  # a log of garbage: every row before the checkpoint would be lost
        lines = [b"garbage %d" % i for i in range(5)] + [b""]
        bad = {i + 1: line for i, line in enumerate(lines[:-1])}
    log.write_bytes(b"\n".join(lines))
    code, stdout, err = resume(capsys, data, R)
    assert code == 0, err
    assert ("line 2 cannot be read" if damage == "one byte" else "lines 1, 2, 3, 4, 5 cannot be read") in stdout
    kept = (R / "metrics.jsonl.damaged").read_bytes()
    assert kept == b"".join(b"line %d: %s\n" % item for item in bad.items())  # the bytes, as they were
    expected = [row for row in losses(reference) if damage == "one byte" and row[0] != 8 or row[0] > 40]
    assert losses(R) == expected


def test_a_missing_log_beside_checkpoints_is_refused(R, data, capsys):
    (R / "metrics.jsonl").unlink()
    code, _, err = resume(capsys, data, R)
    assert code == 2 and err.count("\n") == 1, err
    assert "metrics.jsonl is missing, though the checkpoints reach step 40" in err and "--overwrite" in err
    assert not (R / "metrics.jsonl").exists() and checkpoint.all_steps(R / "checkpoints") == [10, 20, 30, 40]


# --- rows 2, 13: overwrite -----------------------------------------------------------------------


def test_overwrite_follows_a_symlinked_checkpoints_folder_and_keeps_what_is_not_the_runs(R, data, tmp_path, capsys):
    bigger = tmp_path / "bigger" / "ck"
    bigger.parent.mkdir()
    shutil.move(R / "checkpoints", bigger)
    (bigger / "notes.txt").write_text("mine")
    (R / "checkpoints").symlink_to(bigger)
    code, _, err = cli(capsys, args_for(data, R, "--max-steps", 20, "--overwrite"))
    assert code == 0, err
    assert (R / "checkpoints").is_symlink() and checkpoint.all_steps(bigger) == [10, 20]
    assert (bigger / "notes.txt").read_text() == "mine"
    assert rows(R)[-1]["steps"] == 20 and not list(R.glob(".replaced-*")) and not list(bigger.glob(".replaced-*"))


def test_an_overwrite_that_cannot_be_done_changes_nothing(R, data, capsys):
    shutil.rmtree(R / "checkpoints")
    (R / "checkpoints").symlink_to(R / "no-such-disk")
    before = (R / "metrics.jsonl").read_bytes()
    code, _, err = cli(capsys, args_for(data, R, "--overwrite"))
    assert code == 2 and err.count("\n") == 1 and "is a symlink to" in err and "not a folder" in err, err
    assert (R / "metrics.jsonl").read_bytes() == before and (R / "checkpoints").is_symlink()


def test_a_first_save_cut_short_points_to_overwrite_and_is_listed_until_the_next_start(R, data, capsys):
    directory = R / "checkpoints"
    for step in (20, 30, 40):
        shutil.rmtree(directory / str(step))
    (directory / "10").rename(directory / "10.orbax-checkpoint-tmp-1764000000")  # killed before orbax renamed it
    code, _, err = resume(capsys, data, R)
    assert code == 2 and err.count("\n") == 1, err
    assert "the save of step 10 was cut short" in err and "start again with --overwrite" in err
    code, listing, _ = cli(capsys, ["list", R], CHECKPOINTS)
    assert "unfinished: 10.orbax-checkpoint-tmp-1764000000" in listing
    code, _, err = cli(capsys, args_for(data, R, "--max-steps", 10, "--overwrite"))
    assert code == 0, err
    assert checkpoint.temporary(directory) == [] and checkpoint.all_steps(directory) == [10]


def test_leftovers_of_a_killed_save_are_gone_once_the_writer_has_opened_its_folder(tmp_path):
    # orbax removes them in a background thread that nothing awaited until the first save: a run
    # stopped before it left that thread to die at interpreter shutdown, printing a traceback
    leftover = tmp_path / "10.orbax-checkpoint-tmp-1764000000"
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "half").write_bytes(b"\0" * 10)
    with checkpoint.manager(tmp_path, cleanup=True):
        assert checkpoint.temporary(tmp_path) == []


# --- rows 3, 9, 14: damage inside a checkpoint -------------------------------------------------------


def test_a_flipped_bit_in_an_array_file_is_found_by_every_reader_and_the_previous_step_used(R, data, tmp_path, capsys, reference):
    target = the_file(R, 40)
    flip(target, target.stat().st_size // 2)
    name = str(target.relative_to(R / "checkpoints" / "40"))
    directory = R / "checkpoints"
    assert f"its file {name} is not the one saved" in checkpoint.damage(directory, 40)
    # the readers: the newest step that verifies, never the damaged one
    params = load(R)
    expected = checkpoint.restore_raw(directory, 30)["params"]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected)))
    code, stdout, _ = cli(capsys, ["export", R, tmp_path / "p.npz"], CHECKPOINTS)
    assert code == 0 and "of step 30" in stdout
    code, _, err = cli(capsys, ["export", R, tmp_path / "p.npz", "--step", 40], CHECKPOINTS)
    assert code == 2 and name in err and err.count("\n") == 1, err
    code, listing, _ = cli(capsys, ["list", R], CHECKPOINTS)
    assert f"damaged: its file {name}" in listing
    # the run: set aside (renamed, never deleted), resumed from 30, ends exactly where the undamaged resume ends
    code, stdout, err = resume(capsys, data, R)
    assert code == 0, err
    assert f"checkpoint step 40 is damaged (its file {name} is not the one saved" in stdout and "resuming from step 30" in stdout
    assert (directory / "40.damaged").is_dir()
    assert_ends_like(R, reference)


def test_a_one_bit_flip_anywhere_in_any_array_file_is_detected_100_of_100(finished, tmp_path):
    directory = Path(shutil.copytree(finished / "checkpoints", tmp_path / "ck"))
    files = sorted(p for p in (directory / "40" / "state").rglob("*") if p.is_file())
    rng, found = random.Random(20261203), 0
    for _ in range(100):
        path = rng.choice(files)
        offset, bit = rng.randrange(path.stat().st_size), rng.randrange(8)
        flip(path, offset, bit)
        found += checkpoint.damage(directory, 40) is not None
        flip(path, offset, bit)  # put it back
    assert found == 100
    assert checkpoint.damage(directory, 40) is None


@pytest.mark.parametrize("damage", ["zeroed", "truncated"])
def test_a_zeroed_or_truncated_array_file_is_set_aside_without_noise(R, data, capsys, caplog, reference, damage):
    target = the_file(R, 40)
    size = target.stat().st_size
    target.write_bytes(bytes(size) if damage == "zeroed" else target.read_bytes()[: size // 3])
    code, stdout, err = resume(capsys, data, R)
    assert code == 0, err
    assert "checkpoint step 40 is damaged" in stdout and not any(noise in err for noise in NOISE), err
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]  # asyncio's "never retrieved"
    assert_ends_like(R, reference)


def test_unreadable_latest_metadata_falls_back_to_an_older_step(R, data, capsys, reference):
    (R / "checkpoints" / "40" / "meta" / "metadata").write_text("{}")
    code, stdout, err = resume(capsys, data, R)
    assert code == 0, err
    assert "checkpoint step 40 is damaged (its file meta/metadata is not the one saved" in stdout
    assert "resuming from step 30" in stdout
    assert_ends_like(R, reference)


# --- rows 4, 8: names that are not the manager's ----------------------------------------------------


def test_foreign_names_in_checkpoints_are_ignored_never_set_aside(R, data, capsys, reference):
    directory = R / "checkpoints"
    (directory / "0040").mkdir()  # the good step 40 beside it must not be touched
    (directory / "0050").mkdir()
    (directory / "50.orbax-checkpoint-tmp-x").mkdir()  # a save of step 50 cut short: orbax removes it at the next start
    (directory / "README").write_text("mine")
    code, listing, _ = cli(capsys, ["list", R], CHECKPOINTS)
    assert "foreign: 0040" in listing and "foreign: README" in listing and "unfinished: 50.orbax-checkpoint-tmp-x" in listing
    code, stdout, err = resume(capsys, data, R)
    assert code == 0, err
    assert "resuming from step 40" in stdout and "damaged" not in stdout
    assert checkpoint.set_aside_steps(directory) == [] and (directory / "0040").is_dir() and (directory / "0050").is_dir()
    assert (directory / "README").read_text() == "mine" and checkpoint.temporary(directory) == []
    assert_ends_like(R, reference)


def test_a_log_that_is_a_folder_is_refused_in_one_line(R, data, capsys):
    (R / "metrics.jsonl").unlink()
    (R / "metrics.jsonl").mkdir()
    code, _, err = resume(capsys, data, R)
    assert code == 2 and err.count("\n") == 1 and "metrics.jsonl is a folder" in err, err


# --- row 5: nothing non-finite saved or logged ----------------------------------------------------------


def test_a_non_finite_test_loss_stops_with_exit_3_and_nothing_non_finite_is_written(tmp_path, capsys):
    # BatchNorm evaluates on its running statistics: test images unlike every training image (all 0) blow
    # up the encoder's log-variance, so the test KL is infinite while every training step stays finite
    rng = np.random.default_rng(0)
    labels = lambda n: rng.integers(0, 10, n).astype(np.int32)  # noqa: E731
    mnist = MNIST(Split(np.zeros((160, 784), np.uint8), labels(160)), Split(np.full((16, 784), 255, np.uint8), labels(16)))
    save_mnist(mnist, tmp_path / "d")
    out = tmp_path / "out"
    code, _, err = cli(capsys, args_for(tmp_path / "d", out, "--model", "conv", "--latent-dim", 32, "--kl-weight", 3e38,
                                        "--max-steps", 20))
    assert code == 3 and err.count("\n") == 1, err
    assert "step 20: the test loss is inf (non-finite)" in err and "the last verified checkpoint (step 10) is kept" in err
    assert all("test_loss" not in row for row in rows(out))  # strict JSON throughout, and no final row
    assert checkpoint.all_steps(out / "checkpoints") == [10]


# --- rows 6, 7 (readers) -----------------------------------------------------------------------------


def test_load_checks_the_functional_form_against_the_recorded_settings(tmp_path):
    recorded = rundir.settings_of(train.TrainConfig(model=vae.VAEConfig(latent_dim=16)), "functional", "ab" * 32)
    state = TrainState.create(vae.init(jax.random.PRNGKey(0), vae.VAEConfig(latent_dim=8)), optax.adamw(1e-4))
    checkpoint.save(tmp_path, state, meta={"settings": recorded})
    with pytest.raises(checkpoint.ShapeMismatch, match=r"checkpoint step 0: params/\S+ was saved with shape"):
        load(tmp_path, "functional")


def test_readers_beside_a_writer_that_keeps_one_checkpoint_always_read_a_verified_step(data, tmp_path, capsys):
    out = tmp_path / "w"
    writer = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"),
                               *args_for(data, out, "--max-steps", 100_000, "--epochs", 100_000, "--ckpt-every", 2,
                                         "--keep", 1, "--log-every", 2)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while not checkpoint.all_steps(out / "checkpoints") and time.time() < deadline and writer.poll() is None:
            time.sleep(0.05)
        seen, calls, stop = set(), 0, time.time() + 60  # until the writer has moved on while they read
        while (calls < 3 or len(seen) < 2) and time.time() < stop and writer.poll() is None:
            state = load(out, state=True)  # the train state: a full restore of the newest step
            seen.add(int(state.step))
            code, _, err = cli(capsys, ["convert", out, "--to", "functional", tmp_path / f"p{calls}.npz"], CHECKPOINTS)
            assert code == 0, err
            calls += 1
        assert writer.poll() is None, writer.stderr.read()[-2000:]
        assert calls >= 3 and len(seen) >= 2, (calls, seen)  # the writer moved on while they read
    finally:
        writer.kill()
        writer.communicate()


# --- rows 7, 11, 12: signals and the lock -------------------------------------------------------------


def test_ctrl_c_at_any_moment_of_start_up_exits_130_in_one_line_leaving_a_run_not_started(data, tmp_path):
    script = str(ROOT / "scripts" / "train.py")
    cases = {"imports": 0.4, "after data": "training ", "held down": 0.6}
    runs = {}
    for name in cases:
        out = tmp_path / name.replace(" ", "-")
        runs[name] = out, subprocess.Popen([sys.executable, script, *args_for(data, out)], stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    try:
        started = time.time()
        for name, when in cases.items():
            out, process = runs[name]
            if isinstance(when, str):  # once the banner is printed: the data loaded, the program not yet compiled
                assert when in process.stdout.readline()
            else:
                time.sleep(max(0.0, started + when - time.time()))
            for _ in range(40 if name == "held down" else 1):
                process.send_signal(signal.SIGINT)
                time.sleep(0.02)
        for name, (out, process) in runs.items():
            _, err = process.communicate(timeout=120)
            assert process.returncode == 130, (name, err)
            assert err.count("\n") == 1 and "SIGINT before step 1; nothing was written" in err, (name, err)
            assert not any(noise in err for noise in NOISE), (name, err)
            assert rundir.held(out) == [] if out.exists() else True, (name, rundir.held(out))
            rundir.check(out)  # a plain re-run is accepted: no --overwrite needed
            assert f"to start it: " in err and "--resume" not in err and "--overwrite" not in err
    finally:  # a failed assertion leaves no process running into the next test
        for _, process in runs.values():
            process.kill()
            process.communicate()


def test_the_command_printed_after_sigterm_continues_a_run_started_with_overwrite(data, tmp_path, capsys, monkeypatch, reference):
    out = Path(shutil.copytree(reference, tmp_path / "R"))  # a run to replace
    record = rundir.RunFolder.record

    def record_then_signal(self, pos, metrics):
        pos = record(self, pos, metrics)
        if pos.step == 12:
            os.kill(os.getpid(), signal.SIGTERM)
        return pos

    monkeypatch.setattr(rundir.RunFolder, "record", record_then_signal)
    code, _, err = cli(capsys, args_for(data, out, "--overwrite"))
    assert code == 143 and "to continue: " in err, err
    monkeypatch.undo()
    command = shlex.split(err.split("to continue: ", 1)[1])
    assert "--overwrite" not in command and command[-1] == "--resume"
    code, _, err = cli(capsys, command[2:])  # what follows the interpreter and the script
    assert code == 0, err
    assert rows(out)[-1]["steps"] == 40 and losses(out)[:10] == losses(reference)[:10]


def test_a_lock_held_by_another_process_names_that_process_not_the_pid_in_the_file(R, data, capsys):
    (R / ".lock").write_text("999999\n")  # written by a run long gone
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(R / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = resume(capsys, data, R)
        assert code == 2 and f"in use by another run (pid {holder.pid})" in err and "999999" not in err, err
    finally:
        holder.kill()
        holder.communicate()


# --- row 8 (messages), row 15 (settings that do nothing) ---------------------------------------------------


def test_a_dangling_out_a_lock_folder_and_other_data_each_say_what_is_wrong(data, tmp_path, capsys):
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "gone")
    code, _, err = cli(capsys, args_for(data, dangling))
    assert code == 2 and f"--out {dangling} is a symlink to {tmp_path / 'gone'}, which does not exist" in err, err
    (tmp_path / "o" / ".lock").mkdir(parents=True)
    code, _, err = cli(capsys, args_for(data, tmp_path / "o"))
    assert code == 2 and ".lock is a folder" in err and err.count("\n") == 1, err
    small = datasets.Features({"image": datasets.Array2D((14, 14), "uint8"), "label": datasets.Value("int64")})
    split = lambda n: datasets.Dataset.from_dict({"image": np.zeros((n, 14, 14), np.uint8), "label": [1] * n}, features=small)  # noqa: E731
    datasets.DatasetDict({"train": split(4), "test": split(2)}).save_to_disk(str(tmp_path / "small"))
    code, _, err = cli(capsys, args_for(tmp_path / "small", tmp_path / "o2"))
    assert code == 2 and "not MNIST-shaped" in err and "damaged" not in err, err


def test_settings_that_do_nothing_are_warned_on_stderr_and_in_the_log(data, tmp_path, capsys):
    top = sorted(vae.init(jax.random.PRNGKey(0), vae.VAEConfig(latent_dim=8)))  # every top-level name: all of it frozen
    out = tmp_path / "warned"
    code, _, err = cli(capsys, args_for(data, out, "--max-steps", 8, "--schedule", "warmup", "--warmup-steps", 100,
                                        "--grad-accum", 3, "--freeze", ",".join(top)))
    assert code == 0, err
    warned = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 3, err
    assert "warmup-steps 100 is not shorter than the run's 2 optimiser updates" in warned[0]
    assert "grad-accum 3: the last 2 of the run's 8 steps add gradients that are never applied" in warned[1]
    assert "covers every parameter" in warned[2]
    assert [row["warning"] for row in rows(out) if "warning" in row] == [line[len("warning: "):] for line in warned]
    code, _, err = cli(capsys, args_for(data, tmp_path / "w2", "--max-steps", 4, "--warmup-steps", 5, "--end-lr", 1e-5))
    assert code == 0 and "warning: warmup-steps 5 does nothing with schedule constant" in err
    assert "warning: end-lr 1e-05 does nothing with schedule constant" in err


@pytest.mark.parametrize("args, message", [(["--out", ""], "--out: expected a path, got an empty string"),
                                           (["--lr", "1e-4", "--lr", "2e-4"], "--lr is given twice (0.0001, then 0.0002)")])
def test_flags_that_can_only_be_a_mistake_are_refused(capsys, args, message):
    code, _, err = cli(capsys, args)
    assert code == 2 and message in err and err.count("\n") == 1, err
