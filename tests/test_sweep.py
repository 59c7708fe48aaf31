"""Sweeps: members trained in one vmapped program, each a run of its own, matching separate runs.

Tiny data and a small model; every sweep here is a real ``train.py`` run in this process (or,
for kill -9, in a process of its own), compared with separate runs of each member's settings.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pureflax import checkpoint, sweep, train
from pureflax.compat import trained

from tiny import ROOT, Crash, flags, load_script, saved_mnist

TRAIN, CHECKPOINTS = load_script("train"), load_script("checkpoints")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return saved_mnist(tmp_path_factory, n_train=80)  # 10 steps per epoch at batch 8


def args_for(data, out, *extra):
    """train.py's flags for these sweeps, a flag in ``extra`` replacing its value here."""
    base = {"--data": data, "--out": out, "--batch-size": 8, "--epochs": 2, "--log-every": 5, "--ckpt-every": 10, "--latent-dim": 4}
    return flags(base, ["--no-pictures", "--no-compile-cache", *extra])


def cli(capsys, args, **kwargs):
    try:
        code = TRAIN.main(list(map(str, args)), **kwargs)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def sweep_like_cli(args, **kwargs):
    """``sweep.fit_sweep`` with the members train.py makes of ``args``."""
    from pureflax import data as data_lib
    from pureflax.compat.backends import get_backend

    parsed = TRAIN.build_parser().parse_args(args)
    config = TRAIN.configure(parsed)
    members = TRAIN.sweep_members(parsed, config, args)
    return sweep.fit_sweep(members, data_lib.load_mnist(parsed.data, log=lambda _: None), parsed.out, progress=False,
                           backend=get_backend(parsed.backend, config.model), resume=parsed.resume, **kwargs)


def rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def losses(folder):
    """Every logged (loss, mse, kl) and the final row's test loss and final-epoch loss, as one array."""
    all_rows = rows(folder)
    logged = [[r["loss"], r["mse"], r["kl"]] for r in all_rows if "loss" in r and "step" in r]
    final = all_rows[-1]
    return np.array([*np.ravel(logged), final["test_loss"], final["test_mse"], final["test_kl"], final["final_epoch_loss"]])


def assert_close(a, b, rtol=1e-5):
    np.testing.assert_allclose(losses(a), losses(b), rtol=rtol, atol=0)


SWEEP = ["--seeds", "0,1", "--sweep", "lr=1e-3,3e-3"]
NAMES = ["seed-0_lr-0.001", "seed-0_lr-0.003", "seed-1_lr-0.001", "seed-1_lr-0.003"]
SEPARATE = [NAMES[0], NAMES[3]]  # the two members that share neither seed nor lr, each also run on its own


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted sweep, and two of its members run on their own."""
    root = tmp_path_factory.mktemp("reference")
    assert TRAIN.main(args_for(data, root / "sweep", *SWEEP)) == 0
    for name in SEPARATE:
        seed, lr = name.split("_")
        assert TRAIN.main(args_for(data, root / "single" / name, "--seed", seed.split("-")[1], "--lr", lr.split("-")[1])) == 0
    return root


def test_grid_names_members_by_what_varies_and_refuses_what_cannot_vary():
    base = train.TrainConfig()
    assert [m.name for m in sweep.grid(base, {"seed": [3], "kl_weight": [0.5, 1.0]})] == ["kl_weight-0.5", "kl_weight-1"]
    member = sweep.grid(base, {"lr": [3e-4]})[0]
    assert member.name == "lr-0.0003" and member.config.optim.lr == 3e-4 and member.config.seed == base.seed
    with pytest.raises(sweep.SweepError, match="`sweep` batch_size: only seed, lr, kl_weight can vary"):
        sweep.grid(base, {"batch_size": [8, 16]})
    with pytest.raises(sweep.SweepError, match="lr: 0.001 is given twice"):
        sweep.grid(base, {"lr": [1e-3, 1e-3]})
    with pytest.raises(ValueError, match="`lr` must be > 0"):
        sweep.grid(base, {"lr": [1e-3, 0.0]})


def test_each_member_matches_a_separate_run_and_is_a_run_like_any_other(reference, capsys):
    record = json.loads((reference / "sweep" / "sweep.json").read_text())
    assert [m["name"] for m in record["members"]] == NAMES and record["varying"] == ["seed", "lr"]
    assert all(m["status"] == "finished" and m["steps"] == 20 for m in record["members"])
    best = min(record["members"], key=lambda m: m["test_loss"])
    assert record["best"] == best["name"]
    for name in SEPARATE:
        member, single = reference / "sweep" / name, reference / "single" / name
        assert_close(member, single)
        meta = checkpoint.read_meta(member / "checkpoints", 20)
        assert meta["settings"] == checkpoint.read_meta(single / "checkpoints", 20)["settings"]  # its own settings, as a run's
    for form in ("functional", "equinox", "flax", "nnx"):  # the best member loads in every form
        trained.load(reference / "sweep" / record["best"], form)
    assert CHECKPOINTS.main(["list", str(reference / "sweep" / NAMES[0])]) == 0
    assert "20" in capsys.readouterr().out


def test_a_member_folder_resumes_as_a_single_run(reference, data, tmp_path, capsys):
    out = tmp_path / "member"
    shutil.copytree(reference / "sweep" / NAMES[1], out)
    code, stdout, err = cli(capsys, args_for(data, out, "--seed", 0, "--lr", 3e-3, "--epochs", 3, "--resume"))
    assert code == 0, err
    assert "resuming from step 20" in stdout
    assert rows(out)[-1]["steps"] == 30


GRID = ["--sweep", "lr=1e-3,3e-3", "kl_weight=0.5,1", "--epochs", 1]


@pytest.fixture(scope="module")
def functional_grid(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("grid") / "functional"
    assert TRAIN.main(args_for(data, out, *GRID)) == 0
    return out


@pytest.mark.parametrize("backend", ["equinox", "flax", "nnx"])
def test_every_backend_sweeps_lr_and_kl_weight_as_the_functional_form_does(backend, data, functional_grid, tmp_path, capsys):
    code, stdout, err = cli(capsys, args_for(data, tmp_path / backend, *GRID, "--backend", backend))
    assert code == 0, err
    for name in ("lr-0.001_kl_weight-0.5", "lr-0.001_kl_weight-1", "lr-0.003_kl_weight-0.5", "lr-0.003_kl_weight-1"):
        assert_close(tmp_path / backend / name, functional_grid / name)


def test_per_step_sweeps_and_the_conv_model_match_separate_runs(data, tmp_path, capsys):
    conv = ["--model", "conv", "--epochs", 1, "--no-fuse"]
    assert cli(capsys, args_for(data, tmp_path / "sweep", *conv, "--sweep", "kl_weight=0.5,1"))[0] == 0
    for weight in ("0.5", "1"):
        assert cli(capsys, args_for(data, tmp_path / weight, *conv, "--kl-weight", weight))[0] == 0
        assert_close(tmp_path / "sweep" / f"kl_weight-{weight}", tmp_path / weight)


def test_a_member_whose_loss_goes_nan_stops_alone_and_keeps_its_last_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "out"
    diverging = ["--optimizer", "sgd", "--schedule", "warmup", "--warmup-steps", 19, "--ckpt-every", 5]  # lr 1.5 diverges at step 6
    code, stdout, err = cli(capsys, args_for(data, out, "--sweep", "lr=0.05,1.5", *diverging))
    assert code == 3, err
    assert err.startswith("train.py: 1 of 2 members stopped on a non-finite loss (lr-1.5;") and err.count("\n") == 1, err
    assert "lr-1.5: step 6: mse is nan" in stdout and "its last verified checkpoint (step 5) is kept; the other members go on" in stdout
    record = json.loads((out / "sweep.json").read_text())
    good, bad = record["members"]
    assert good["status"] == "finished" and good["steps"] == 20 and record["best"] == "lr-0.05"
    assert bad["status"] == "stopped" and "step 6: mse is nan" in bad["reason"]
    stopped = [r for r in rows(out / "lr-1.5") if r.get("event") == "stopped"]
    assert len(stopped) == 1 and stopped[0]["global_step"] == 6
    assert checkpoint.all_steps(out / "lr-1.5" / "checkpoints") == [5]
    checkpoint.verify(out / "lr-1.5" / "checkpoints", 5)
    assert checkpoint.all_steps(out / "lr-0.05" / "checkpoints") == [5, 10, 15, 20]  # the other member went on


def test_a_sweep_too_large_for_memory_is_refused_up_front(data, tmp_path, capsys):
    code, _, err = cli(capsys, args_for(data, tmp_path / "out", "--seeds", "0-49999"))
    assert code == 2
    assert "train.py: error: a sweep of 50000 members needs about" in err and "GB free" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "3-1"], "a range runs from low to high"),
    (["--seeds", "0,1", "--seed", "4"], "--seed and --seeds: give one"),
    (["--sweep", "lr"], "expected SETTING=V1,V2"),
    (["--sweep", "optimizer=1,2"], "only seed, lr, kl_weight can vary"),
])
def test_bad_sweep_flags_are_one_line_and_exit_2(argv, message, data, tmp_path, capsys):
    code, _, err = cli(capsys, args_for(data, tmp_path / "out", *argv))
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_a_sweep_folder_is_not_a_run_folder(reference, data, tmp_path, capsys):
    code, _, err = cli(capsys, args_for(data, reference / "sweep" / NAMES[0], *SWEEP))
    assert code == 2 and "holds a single run" in err, err
    code, _, err = cli(capsys, args_for(data, reference / "sweep", *SWEEP))
    assert code == 2 and "already holds a sweep" in err, err
    code, _, err = cli(capsys, args_for(data, reference / "sweep", "--seeds", "0,1,2", "--resume"))
    assert code == 2 and "has the members seed-0_lr-0.001" in err, err


def test_members_resumed_at_different_steps_catch_up_and_end_as_the_uninterrupted_sweep(reference, data, tmp_path, capsys):
    """A kill between two members' saves of step 10: one member resumes at 10, the other from scratch."""
    out = tmp_path / "out"

    def crash(event, at):
        if event == "chunk" and at >= 15:
            raise Crash(at)

    with pytest.raises(Crash):
        sweep_like_cli(args_for(data, out, *SWEEP), hook=crash)
    assert all(checkpoint.all_steps(out / name / "checkpoints") == [10] for name in NAMES)
    shutil.rmtree(out / NAMES[2] / "checkpoints")  # its save of step 10 never landed
    code, stdout, err = cli(capsys, args_for(data, out, *SWEEP, "--resume"))
    assert code == 0, err
    assert f"{NAMES[0]}: resuming from step 10" in stdout
    for name in NAMES:
        assert_close(out / name, reference / "sweep" / name, rtol=1e-6)


def test_kill_9_of_a_sweep_then_resume_ends_where_the_uninterrupted_sweep_ends(reference, data, tmp_path, capsys):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *args_for(data, out, *SWEEP, "--epochs", 8)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None:
            if all((out / name / "checkpoints").is_dir() and checkpoint.all_steps(out / name / "checkpoints") for name in NAMES):
                break  # every member has committed a checkpoint
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == -signal.SIGKILL, "the sweep ended before it could be killed"
    code, stdout, err = cli(capsys, args_for(data, out, *SWEEP, "--epochs", 8, "--resume"))
    assert code == 0, err
    assert "resuming from step" in stdout
    uninterrupted = tmp_path / "uninterrupted"
    assert TRAIN.main(args_for(data, uninterrupted, *SWEEP, "--epochs", 8)) == 0
    for name in NAMES:
        assert_close(out / name, uninterrupted / name, rtol=1e-6)


def test_a_signal_saves_every_member_where_it_is_and_resume_ends_as_the_uninterrupted_sweep(reference, data, tmp_path, capsys):
    from pureflax import rundir

    out = tmp_path / "out"

    def signal_at(event, at):
        if event == "chunk" and at == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the sweep's StopFlag, in this process

    with pytest.raises(rundir.Interrupted) as stopped:
        sweep_like_cli(args_for(data, out, *SWEEP), hook=signal_at)
    assert stopped.value.step == 10 and stopped.value.saved  # the chunk under way when it came ends at 10
    assert all(checkpoint.all_steps(out / name / "checkpoints") == [10] for name in NAMES)
    code, stdout, err = cli(capsys, args_for(data, out, *SWEEP, "--resume"))
    assert code == 0, err
    for name in NAMES:
        assert_close(out / name, reference / "sweep" / name, rtol=1e-6)
