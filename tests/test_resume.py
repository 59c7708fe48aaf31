"""Runs that lose nothing: kill -9 and resume, signals, damage, settings, locks, a full disk, NaN.

Real processes only where the process is the point (kill -9 of the fused and the per-step
loop, SIGINT, a closed pipe); every other fault is injected in-process at a set step through
``fit``'s hook (a crash there is what a kill looks like from inside: nothing after it runs), so
the cases are deterministic — every form's resume included.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pureflax import TrainState, checkpoint, data as data_lib, rundir, train
from pureflax.compat.backends import get_backend
from pureflax.data import save_mnist

from tiny import ROOT, load_script, tiny_mnist

TRAIN, CHECKPOINTS = load_script("train"), load_script("checkpoints")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


class Crash(BaseException):
    """What a kill looks like from inside: nothing below catches it, nothing is saved."""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "mnist"
    save_mnist(tiny_mnist(n_train=160, n_test=16), path)  # 20 steps per epoch at batch 8
    return path


def args_for(data, out, *extra, pictures=False):
    """train.py's flags for these runs, a flag in ``extra`` replacing its value here; the pictures only where a test looks."""
    extra = list(map(str, extra))
    base = {"--data": data, "--out": out, "--batch-size": 8, "--epochs": 3, "--log-every": 4, "--ckpt-every": 10, "--latent-dim": 8}
    flags = [str(x) for flag, value in base.items() if flag not in extra for x in (flag, value)]
    return [*flags, "--no-compile-cache", *([] if pictures else ["--no-pictures"]), *extra]


def cli(capsys, args):
    """scripts/train.py's main in this process: (exit status, stdout, stderr)."""
    try:
        code = TRAIN.main(list(map(str, args)))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def fit_like_cli(args, **kwargs):
    """``train.fit`` with the settings train.py makes of ``args`` (so runs compare with CLI runs)."""
    parsed = TRAIN.build_parser().parse_args(list(map(str, args)))
    config = TRAIN.configure(parsed)
    return train.fit(config, data_lib.load_mnist(parsed.data, log=lambda _: None), parsed.out, progress=False,
                     backend=get_backend(parsed.backend, config.model), resume=parsed.resume, **kwargs)


def crash_at(step, event="chunk"):
    def hook(name, at):
        if name == event and at >= step:
            raise Crash(at)

    return hook


def crashed_run(data, out, step, *extra, event="chunk", pictures=False):
    with pytest.raises(Crash):
        fit_like_cli(args_for(data, out, *extra, pictures=pictures), hook=crash_at(step, event))


@pytest.fixture(scope="module")
def crashed_once(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("crashed") / "out"
    crashed_run(data, out, 24)
    assert committed(out) == [10, 20]
    return out


@pytest.fixture
def crashed(crashed_once, tmp_path):
    """A functional run that crashed at step 24, after its checkpoints at 10 and 20: a copy of its own."""
    out = tmp_path / "out"
    shutil.copytree(crashed_once, out)
    return out


def committed(out):
    return checkpoint.all_steps(out / "checkpoints")


def logged(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r and "step" in r], rows[-1]


def final_params(out):
    directory = out / "checkpoints"
    step = checkpoint.latest_step(directory)
    assert checkpoint.read_meta(directory, step)["position"][0] == step
    return step, checkpoint.restore_raw(directory, step)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted runs, one per (backend, fuse), run once."""
    cache = {}

    def get(backend="functional", fuse=True):
        if (backend, fuse) not in cache:
            out = tmp_path_factory.mktemp(f"ref-{backend}-{fuse}") / "out"
            assert TRAIN.main(args_for(data, out, "--backend", backend, *([] if fuse else ["--no-fuse"]))) == 0
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
    for key in ("test_loss", "final_epoch_loss"):
        assert abs(final_a[key] - final_b[key]) <= 1e-6 * abs(final_b[key]), key
    step_a, tree_a = final_params(a)
    step_b, tree_b = final_params(b)
    assert step_a == step_b
    for x, y in zip(jax.tree_util.tree_leaves(tree_a), jax.tree_util.tree_leaves(tree_b)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


# --- real processes: kill -9, a second run on a locked folder, SIGINT -----------------------


def start(args):
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)


def wait_for_checkpoint(process, out, at_least, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            return False
        if any(s >= at_least for s in committed(out)):
            return True
        time.sleep(0.05)
    return False


def test_kill_9_and_resume_ends_where_the_uninterrupted_run_ends_and_the_lock_holds_meanwhile(data, tmp_path, reference, capsys):
    # the fused runner in a real process; the per-step one crashes in-process below (flax)
    out = tmp_path / "out"
    process = start(args_for(data, out))
    reached = wait_for_checkpoint(process, out, at_least=20)
    # a second run, or a resume, on the folder while the first one trains: refused at once, naming the holder
    for second in (args_for(data, out), args_for(data, out, "--overwrite"), args_for(data, out, "--resume")):
        code, _, err = cli(capsys, second)
        assert code == 2 and f"in use by another run (pid {process.pid})" in err and err.count("\n") == 1, err
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert reached and process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = max(committed(out))
    assert killed_at < 60
    assert (out / ".lock").read_text().strip() == str(process.pid)  # a dead holder's lock does not block
    code, stdout, err = cli(capsys, args_for(data, out, "--resume"))
    assert code == 0, err
    assert f"resuming from step {killed_at}" in stdout
    assert_same_run(out, reference())


def test_sigint_saves_prints_how_to_resume_and_exits_130(data, tmp_path, reference, capsys):
    out = tmp_path / "out"
    process = start(args_for(data, out))
    assert wait_for_checkpoint(process, out, at_least=10)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "SIGINT" in stderr and "--resume" in stderr and "Traceback" not in stderr
    stopped_at = max(committed(out))
    assert stopped_at < 60  # it stopped early, and saved where it stopped
    assert checkpoint.read_meta(out / "checkpoints", stopped_at)["position"][0] == stopped_at
    code, _, err = cli(capsys, args_for(data, out, "--resume"))
    assert code == 0, err
    assert_same_run(out, reference())


# --- in-process faults at a set step ----------------------------------------------------------


@pytest.mark.parametrize("backend, fuse", [("equinox", True), ("flax", False), ("nnx", True)],
                         ids=["equinox", "flax-per-step", "nnx"])
def test_a_crash_between_checkpoints_resumes_exactly_in_every_form(data, tmp_path, reference, capsys, backend, fuse):
    out = tmp_path / "out"
    extra = ["--backend", backend, *([] if fuse else ["--no-fuse"])]
    crashed_run(data, out, 24, *extra)
    assert committed(out) == [10, 20]
    code, stdout, err = cli(capsys, args_for(data, out, *extra, "--resume"))
    assert code == 0, err
    assert "resuming from step 20" in stdout
    # Linen and NNX compute the functional form's numbers bit for bit (tests/test_parity.py):
    # the functional run is their uninterrupted run too; Equinox's rounds differently.
    assert_same_run(out, reference("equinox" if backend == "equinox" else "functional", fuse))


def test_sigterm_saves_where_it_stopped_and_exits_143(data, tmp_path, reference, capsys, monkeypatch):
    out = tmp_path / "out"
    record = rundir.RunFolder.record

    def record_then_signal(self, pos, metrics):
        pos = record(self, pos, metrics)
        if pos.step == 12:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the run's StopFlag, in this process
        return pos

    monkeypatch.setattr(rundir.RunFolder, "record", record_then_signal)
    code, _, err = cli(capsys, args_for(data, out))
    # noticed while logging step 12, with the chunk to step 16 already running: that one ends and is saved
    assert code == 143 and "SIGTERM at step 16" in err and "--resume" in err, err
    assert committed(out) == [10, 16]
    monkeypatch.undo()
    code, _, err = cli(capsys, args_for(data, out, "--resume"))
    assert code == 0, err
    assert_same_run(out, reference())


def test_a_half_written_checkpoint_is_never_taken_as_good(data, crashed, reference, capsys):
    out = crashed
    # what a kill in the middle of orbax writing step 30 leaves: its temporary folder, partly written
    partial = out / "checkpoints" / "30.orbax-checkpoint-tmp-1234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half").write_bytes(b"\0" * 10)
    assert max(committed(out)) == 20
    code, stdout, err = cli(capsys, args_for(data, out, "--resume"))
    assert code == 0, err
    assert "resuming from step 20" in stdout
    assert_same_run(out, reference())


@pytest.mark.parametrize("damage", ["truncate", "remove", "stray"])
def test_a_damaged_latest_checkpoint_is_set_aside(data, crashed, reference, capsys, damage):
    out = crashed
    latest = out / "checkpoints" / "20"
    files = sorted(p for p in (latest / "state").rglob("*") if p.is_file() and p.stat().st_size > 0)
    assert files
    for path in files:
        if damage == "truncate":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
        elif damage == "remove":
            path.unlink()
    if damage == "stray":  # a numbered folder copied in by hand, newer than any checkpoint
        (out / "checkpoints" / "25" / "state").mkdir(parents=True)
    code, stdout, err = cli(capsys, args_for(data, out, "--resume"))
    assert code == 0, err
    step = 25 if damage == "stray" else 20
    assert f"checkpoint step {step} is damaged" in stdout
    assert f"resuming from step {10 if damage != 'stray' else 20}" in stdout
    assert (out / "checkpoints" / f"{step}.damaged").is_dir()  # set aside, not deleted
    assert_same_run(out, reference())


# issue row 1: a resume configured differently never sets a good checkpoint aside
@pytest.mark.parametrize(
    "flags, named",
    [(["--optimizer", "sgd"], "--optimizer sgd differs from the run's --optimizer adamw"),
     (["--optimizer", "adam"], "--optimizer adam differs from the run's --optimizer adamw"),
     (["--grad-accum", "2"], "--grad-accum 2 differs from the run's --grad-accum 1"),
     (["--clip-norm", "1"], "--clip-norm 1.0 differs from the run's --clip-norm unset"),
     (["--batch-size", "16"], "--batch-size 16 differs from the run's --batch-size 8"),  # row 4: the position would be reinterpreted
     (["--seed", "7"], "--seed 7 differs from the run's --seed 65535"),
     (["--latent-dim", "16"], "--latent-dim 16 differs from the run's --latent-dim 8")],
)
def test_resume_with_a_setting_that_changes_the_saved_state_is_refused_and_sets_nothing_aside(
        data, crashed, reference, capsys, flags, named):
    out = crashed
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    code, _, err = cli(capsys, args_for(data, out, "--resume", *flags))
    assert code == 2 and named in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before
    assert not list((out / "checkpoints").glob("*.damaged*"))
    if flags[0] == "--optimizer" and flags[1] == "sgd":  # the files are unchanged, so one case shows the right resume works
        code, _, err = cli(capsys, args_for(data, out, "--resume"))
        assert code == 0, err
        assert_same_run(out, reference())


def test_resume_with_another_lr_kl_weight_or_schedule_continues_and_says_so(data, crashed, capsys):
    out = crashed
    code, stdout, err = cli(capsys, args_for(data, out, "--resume", "--lr", "3e-4", "--kl-weight", "0.25",
                                             "--schedule", "linear", "--epochs", "4"))
    assert code == 0, err
    for line in ("resume: --lr 0.0003 from here on (the run had --lr 0.0001)",
                 "resume: --kl-weight 0.25 from here on (the run had --kl-weight 0.5)",
                 "resume: --schedule linear from here on (the run had --schedule constant)",
                 "resume: --epochs 4 from here on (the run had --epochs 3)"):
        assert line in stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    event = next(r for r in rows if r.get("event") == "resume")
    assert event["global_step"] == 20 and len(event["changed"]) == 4
    settings = checkpoint.read_meta(out / "checkpoints", 80)["settings"]  # recorded: the next resume checks these
    assert (settings["optim.lr"], settings["kl_weight"], settings["optim.schedule"], settings["epochs"]) == (3e-4, 0.25, "linear", 4)
    assert settings["batch_size"] == 8 and settings["backend"] == "functional" and len(settings["data"]) == 64
    assert rows[-1]["steps"] == 80


def test_a_run_checkpoint_without_its_settings_is_set_aside_never_resumed_unchecked(data, tmp_path, capsys):
    out = tmp_path / "out"
    crashed_run(data, out, 12)
    # every checkpoint of a run records its settings; one that does not cannot be checked, so it is not trusted
    meta = out / "checkpoints" / "10" / "meta" / "metadata"
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "settings"}))
    checkpoint.seal(out / "checkpoints", 10)  # its arrays sound and verified
    code, stdout, err = cli(capsys, args_for(data, out, "--resume", "--latent-dim", "16"))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "checkpoint step 10 is damaged (its metadata records no run settings)" in stdout
    assert "--resume: no checkpoint in" in err and "--overwrite" in err
    assert committed(out) == [] and list((out / "checkpoints").glob("10.damaged*"))  # renamed, never deleted


# issue row 5: a kill after the last checkpoint, before the final row and the pictures
def test_resume_of_a_run_killed_before_its_final_row_finishes_it(data, tmp_path, reference, capsys):
    out = tmp_path / "out"
    crashed_run(data, out, 60, event="final", pictures=True)
    assert max(committed(out)) == 60 and not (out / "samples.png").exists()
    assert "test_loss" not in (out / "metrics.jsonl").read_text()
    code, stdout, err = cli(capsys, args_for(data, out, "--resume", pictures=True))
    assert code == 0, err
    assert "test loss:" in stdout
    assert_same_run(out, reference())
    for name in ("samples.png", "reconstructions.png", "loss.png"):  # the resumed run drew what the killed one had not
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    code, _, err = cli(capsys, args_for(data, out, "--resume"))  # now it is complete: nothing left to do
    assert code == 2 and "is complete (60 steps" in err and "--epochs" in err


# issue row 8
def test_resume_drops_a_half_written_last_log_line(data, crashed, reference, capsys):
    out = crashed
    with open(out / "metrics.jsonl", "a") as file:
        file.write('{"epoch": 1, "step": 8, "global_st')
    code, stdout, err = cli(capsys, args_for(data, out, "--resume"))
    assert code == 0, err
    assert """dropped its last line, cut short by the stop (34 bytes: '{"epoch": 1, "step": 8, "global_st')""" in stdout
    assert not (out / "metrics.jsonl.damaged").exists()  # only a line in the middle is kept aside
    assert_same_run(out, reference())


# issue row 7: a full disk surfaces at the save that failed, and what was saved before stays good
def test_a_full_disk_stops_at_the_failing_save_with_one_line_and_keeps_earlier_checkpoints(
        data, tmp_path, reference, capsys, monkeypatch):
    out = tmp_path / "out"
    save_fn = ocp.JsonCheckpointHandler._save_fn

    async def full_from_step_30(self, x, directory):
        if isinstance(x, dict) and x.get("position", [0])[0] >= 30:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await save_fn(self, x, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full_from_step_30)
    code, _, err = cli(capsys, args_for(data, out))
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "checkpoint at step 30" in err and "No space left on device" in err and str(out / "checkpoints") in err
    assert "latest: step 20" in err
    rows = logged(out)[0]
    assert max(r["global_step"] for r in rows) <= 40  # stopped within a chunk of the failing save, not at the end
    monkeypatch.undo()
    assert committed(out) == [10, 20]
    code, _, err = cli(capsys, args_for(data, out, "--resume"))
    assert code == 0, err
    assert_same_run(out, reference())


def test_a_save_that_would_not_fit_is_refused_before_writing_a_byte(data, tmp_path, reference, capsys, monkeypatch):
    """The free space is checked before each save: no half-written step, no orbax or tensorstore tracebacks."""
    out = tmp_path / "out"
    real = shutil.disk_usage

    def full_after_two_saves(path):
        usage = real(path)
        return usage._replace(free=10**9 if len(committed(out)) < 2 else 1000)

    monkeypatch.setattr(shutil, "disk_usage", full_after_two_saves)
    code, _, err = cli(capsys, args_for(data, out))
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "checkpoint at step 30" in err and "0.0 MB are free" in err and "latest: step 20" in err, err
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["10", "20"]  # nothing started for step 30
    code, _, err = cli(capsys, args_for(data, out, "--resume"))
    assert code == 0, err
    assert_same_run(out, reference())


# issue row 13
def test_a_non_finite_loss_stops_with_the_step_and_term_and_says_no_checkpoint_exists(data, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = cli(capsys, args_for(data, out, "--lr", "1e12", "--optimizer", "sgd"))
    assert code == 3, err
    message = err.strip().splitlines()[-1]
    assert "non-finite" in message and ("mse is" in message or "kl is" in message) and "Traceback" not in err
    assert "no checkpoint was written" in message and "is kept" not in message
    assert committed(out) == []


def test_a_non_finite_loss_keeps_the_last_good_checkpoint_and_saves_nothing_bad(data, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = cli(capsys, args_for(data, out, "--lr", "3", "--optimizer", "sgd", "--ckpt-every", "2"))
    assert code == 3, err
    message = err.strip().splitlines()[-1]
    bad_step = int(message.split("step ")[1].split(":")[0])
    steps = committed(out)
    assert steps and all(s < bad_step for s in steps)
    assert f"the last verified checkpoint (step {steps[-1]}) is kept" in message
    tree = checkpoint.restore_raw(out / "checkpoints", steps[-1])
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree["params"]))


def test_check_finite_names_the_root_term():
    metrics = np.array([[1.0, 1.0, 0.0], [np.inf, np.inf, 0.5], [np.nan, 1.0, np.nan]])
    with pytest.raises(train.NonFiniteLoss, match="step 12: mse is inf"):
        train.check_finite(metrics, 10)
    with pytest.raises(train.NonFiniteLoss, match="step 3: kl is nan"):
        train.check_finite(metrics[2:], 2)


def test_resume_and_overwrite_conflict_and_resume_needs_checkpoints(data, tmp_path, capsys):
    code, _, err = cli(capsys, args_for(data, tmp_path / "none", "--resume"))
    assert code == 2 and "holds no checkpoints" in err
    code, _, err = cli(capsys, args_for(data, tmp_path / "none", "--resume", "--overwrite"))
    assert code == 2 and "choose one" in err


def test_a_locked_folder_is_refused_before_any_work(data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with rundir._locked(out):
        code, _, err = cli(capsys, args_for(data, out))
    assert code == 2 and f"--out {out} is in use by another run (pid {os.getpid()})" in err and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


# issue row 11 and row 10 through the script: data errors are user errors
def test_data_errors_exit_2_with_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    save_mnist(tiny_mnist(n_train=16, n_test=16), empty)
    import datasets

    datasets.DatasetDict({"train": datasets.load_from_disk(str(empty))["train"].select([]),
                          "test": datasets.load_from_disk(str(empty))["test"]}).save_to_disk(str(tmp_path / "zero"))
    capsys.readouterr()  # the writers' progress bars
    for bad in (tmp_path / "zero", tmp_path / "mnist.pkl.gz"):
        if bad.suffix == ".gz":
            bad.write_bytes(b"not gzip at all")
        code, _, err = cli(capsys, ["--data", bad, "--out", tmp_path / "o", "--no-compile-cache"])
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and str(bad) in err, err


# issue row 12
def test_too_many_devices_names_the_device_count_not_the_batch(tmp_path, capsys):
    code, _, err = cli(capsys, ["--devices", "3", "--out", tmp_path / "o"])
    assert code == 2 and "--devices 3: this machine has 1" in err and "batch" not in err, err


def test_retention_is_orbax_policy_and_survives_a_resume(tmp_path):
    state = TrainState.create({"w": np.ones(2, np.float32)}, __import__("optax").sgd(0.1))
    losses = {2: 5.0, 4: 1.0, 6: 3.0, 8: 4.0, 10: 6.0}
    for chunk in ((2, 4, 6), (8, 10)):  # two managers: the second sees the first one's metrics
        with checkpoint.manager(tmp_path, keep=2, keep_best=True) as mgr:
            for step in chunk:
                checkpoint.save_with(mgr, state._replace(step=np.int32(step)), {"test_loss": losses[step]}, losses[step])
    assert checkpoint.best_step(tmp_path) == 4
    assert checkpoint.all_steps(tmp_path) == [4, 8, 10]
    assert checkpoint.latest_step(tmp_path) == 10  # resuming takes the latest, not the best


# --- scripts/checkpoints.py ---------------------------------------------------------------------


def checkpoints(capsys, *args):
    try:
        code = CHECKPOINTS.main(list(map(str, args)))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def kept_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("kept") / "out"
    assert TRAIN.main(args_for(data, out, "--max-steps", "40", "--keep", "2", "--keep-best")) == 0
    return out


def test_checkpoints_script_lists_shows_and_exports(kept_run, tmp_path, capsys):
    out = kept_run
    code, listing, err = checkpoints(capsys, "list", out)
    assert code == 0, err
    steps = committed(out)
    assert 40 in steps and len(steps) <= 3  # newest two and the best
    assert "latest" in listing and "best" in listing
    row = next(line for line in listing.splitlines() if line.split()[:1] == ["40"])
    assert row.split()[1] == "1"  # the epoch the run printed for step 40 (20 steps an epoch: epoch 1)
    code, shown, _ = checkpoints(capsys, "show", out, "--step", 40)
    assert code == 0 and "encoder/Dense_0/kernel" in shown and "(784, 256)" in shown and "epoch: 1" in shown
    tree = checkpoint.restore_raw(out / "checkpoints", 40)["params"]
    for target in (tmp_path / "p.npz", tmp_path / "p.safetensors"):
        code, _, err = checkpoints(capsys, "export", out, target)
        assert code == 0, err
        if target.suffix == ".npz":
            arrays = dict(np.load(target))
        else:
            from safetensors.numpy import load_file

            arrays = load_file(str(target))
        np.testing.assert_array_equal(arrays["encoder/Dense_0/kernel"], tree["encoder"]["Dense_0"]["kernel"])
        assert len(arrays) == 18  # 9 dense layers, kernel and bias


# issue row 6: a run with --ckpt-every and no --keep-best has checkpoints without a test loss
def test_checkpoints_script_lists_steps_without_a_test_loss(data, crashed, capsys):
    out = crashed
    code, listing, err = checkpoints(capsys, "list", out)
    assert code == 0, err
    rows = [line.split()[:3] for line in listing.splitlines() if line.split()[:1] in (["10"], ["20"])]
    assert rows == [["10", "0", "-"], ["20", "0", "-"]], listing


# issue row 9
def test_checkpoints_script_answers_damage_strays_and_bad_paths_in_one_line(data, crashed, tmp_path, capsys):
    out = crashed
    for path in (out / "checkpoints" / "20" / "state").rglob("*"):
        if path.is_file():
            path.unlink()
    (out / "checkpoints" / "999").mkdir()  # a stray numbered folder: ignored
    code, listing, err = checkpoints(capsys, "list", out)
    assert code == 0 and "ignored: 999/" in listing and "damaged: its file state/" in listing, err
    for args, message in [(["show", out, "--step", 20], "checkpoint step 20: its file state/"),
                          (["export", out, tmp_path / "p.npz", "--step", 20], "checkpoint step 20"),
                          (["export", out, tmp_path / "no" / "such" / "p.npz", "--step", 10], "does not exist"),
                          (["show", out, "--step", 999], "not a checkpoint")]:
        code, _, err = checkpoints(capsys, *args)
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)
    code, shown, err = checkpoints(capsys, "show", out, "--step", 10)
    assert code == 0 and "params:" in shown, err
    code, shown, err = checkpoints(capsys, "show", out)  # no --step: the newest that verifies
    assert code == 0 and "step 10 in" in shown, err


def test_checkpoints_script_show_into_a_closed_pipe_prints_no_traceback(kept_run):
    script = ROOT / "scripts" / "checkpoints.py"
    # `true` exits without reading, long before the script has imported jax: every write meets a closed pipe
    result = subprocess.run(["bash", "-o", "pipefail", "-c", f"'{sys.executable}' '{script}' show '{kept_run}' | true"],
                            capture_output=True, text=True, timeout=120, env=ENV, cwd=ROOT)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize(
    "args, message",
    [(["list", "/no/such/run"], "is not a folder"), (["export", ".", "p.txt"], "holds no checkpoints"),
     (["frobnicate", "."], "invalid choice")],
)
def test_checkpoints_script_bad_input_exits_2_with_one_line(args, message, capsys):
    code, _, err = checkpoints(capsys, *args)
    assert code == 2 and message in err and err.count("\n") == 1
