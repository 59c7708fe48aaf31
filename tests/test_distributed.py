"""train.py across processes on JAX's own multi-controller runtime: real processes on loopback.

Each case starts real ``train.py`` processes joined with ``--coordinator``; every port is free
when chosen and every process is reaped. The runs are short: on one 2-core machine every step
waits for a gloo all-reduce between the processes.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from pureflax import checkpoint
from pureflax.compat import trained

from tiny import ROOT, flags, load_script, saved_mnist

TRAIN = load_script("train")
STEPS = 60


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def args_for(data, out, *extra):
    base = {"--data": data, "--out": out, "--batch-size": 8, "--max-steps": STEPS, "--log-every": 4, "--ckpt-every": 10,
            "--latent-dim": 8}
    return flags(base, ["--no-pictures", *extra])


def env(devices=1, **more):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu", **more}


def launch(args, environ):
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environ, cwd=ROOT)


def start_processes(data, out, *extra, processes=2, devices=1):
    port = free_port()
    return [launch(args_for(data, out, *extra, "--coordinator", f"127.0.0.1:{port}", "--num-processes", processes,
                            "--process-id", i), env(devices)) for i in range(processes)]


def finish(procs, timeout=240):
    """Every process's (exit status, stdout, stderr); none is left running."""
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    return results


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [[r["loss"], r["mse"], r["kl"]] for r in rows if "loss" in r and "step" in r]
    return np.array([*np.ravel(logged), rows[-1]["test_loss"], rows[-1]["final_epoch_loss"]]), rows


SINGLE = """
import sys
sys.path.insert(0, sys.argv[1])
from tiny import load_script
main = load_script("train").main
for devices in (2, 4):
    code = main(sys.argv[3:] + ["--out", f"{sys.argv[2]}/d{devices}", "--devices", str(devices)])
    if code:
        sys.exit(code)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Side by side: 2 processes x 1 device, 2 processes x 2 devices, and one process with --devices 2 and 4."""
    root = tmp_path_factory.mktemp("runs")
    data = saved_mnist(tmp_path_factory, n_train=160)  # 20 steps per epoch at batch 8
    common = args_for(data, root / "unused")
    del common[common.index("--out"):common.index("--out") + 2]  # each of its runs has its own --out
    single = subprocess.Popen([sys.executable, "-c", SINGLE, str(ROOT / "tests"), str(root), *common], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env=env(4))
    two = start_processes(data, root / "p2x1")
    four = start_processes(data, root / "p2x2", "--backend", "flax", devices=2)  # a backend of its own: within 1e-5 of functional
    results = finish([*two, *four, single])
    for code, _, err in results:
        assert code == 0, err[-3000:]
    return root, data, results


def test_two_processes_log_what_one_process_on_as_many_devices_logs(runs):
    root, _, results = runs
    for processes, single in (("p2x1", "d2"), ("p2x2", "d4")):
        (a, rows), (b, _) = losses(root / processes), losses(root / single)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=0)
        assert rows[-1]["steps"] == STEPS
    code, stdout, _ = results[0]
    assert "(fused, 2 devices, data parallel)" in stdout and "test loss" in stdout
    assert "epoch 0 | step 4" not in results[1][1]  # process 1 prints no log lines: the primary's to write
    meta = checkpoint.read_meta(root / "p2x2" / "checkpoints", STEPS)
    assert meta["settings"]["processes"] == 2 and meta["settings"]["devices"] == 4 and meta["settings"]["batch_size"] == 8


def test_a_multi_process_checkpoint_loads_in_every_form(runs):
    root, _, _ = runs
    for form in ("functional", "equinox", "flax", "nnx"):
        trained.load(root / "p2x2", form)
    checkpoint.verify(root / "p2x2" / "checkpoints", STEPS)


def test_a_killed_process_stops_the_other_within_a_minute_and_both_resume_to_the_uninterrupted_end(runs, tmp_path):
    root, data, _ = runs
    out = tmp_path / "out"
    procs = start_processes(data, out, "--lost-after", 3, "--backend", "nnx")
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any(s >= 20 for s in checkpoint.all_steps(out / "checkpoints")
                                                  if (out / "checkpoints").is_dir()):
            assert all(p.poll() is None for p in procs), "a process ended before it could be killed"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.time()
        _, err = procs[0].communicate(timeout=60)
        stopped = time.time() - killed
    finally:
        finish(procs, timeout=5)
    assert procs[0].returncode != 0 and stopped < 60
    last = [line for line in err.splitlines() if line.startswith("train.py:")]
    assert last == ["train.py: process 1 of 2 stopped answering 3 s ago (killed, or its host is gone); "
                    "process 0 stops too: start every process again with --resume"], err[-2000:]
    killed_at = max(checkpoint.all_steps(out / "checkpoints"))
    assert killed_at < STEPS
    results = finish(start_processes(data, out, "--resume", "--backend", "nnx"))
    assert all(code == 0 for code, _, _ in results), [(code, err[-2000:]) for code, _, err in results if code]
    assert f"resuming from step {killed_at}" in results[0][1]
    np.testing.assert_allclose(losses(out)[0], losses(root / "p2x1")[0], rtol=1e-5, atol=0)  # nnx against functional


def test_processes_started_with_other_settings_stop_at_once_naming_the_difference(runs, tmp_path):
    _, data, _ = runs
    port = free_port()
    procs = [launch(args_for(data, tmp_path / "out", "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2,
                             "--process-id", i, "--lr", lr), env()) for i, lr in enumerate(("1e-3", "1e-4"))]
    for code, _, err in finish(procs, timeout=60):
        assert code == 2
        assert err.strip().splitlines()[-1] == ("train.py: error: process 1 was started with other settings than process 0: "
                                                "optim.lr 0.0001 (process 0: 0.001); start every process with the same flags")


@pytest.mark.parametrize("extra, message", [
    (["--num-processes", 2, "--process-id", 2, "--coordinator", "127.0.0.1:1"], "--process-id 2 is not below --num-processes 2"),
    (["--num-processes", 2, "--process-id", 0], "--coordinator, --num-processes and --process-id go together"),
    (["--num-processes", 2, "--process-id", 1, "--coordinator", "localhost"], "expected HOST:PORT"),
])
def test_bad_process_flags_are_one_line_and_exit_2(extra, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        TRAIN.main(["--out", str(tmp_path / "out"), *map(str, extra)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, err


def test_a_coordinator_that_does_not_answer_is_one_line_within_seconds(tmp_path, capsys):
    port = free_port()  # nobody listens there
    start = time.time()
    with pytest.raises(SystemExit) as exit_info:
        TRAIN.main(["--out", str(tmp_path / "out"), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                    "--process-id", "1", "--join-timeout", "2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and time.time() - start < 10
    assert err == f"train.py: error: --coordinator 127.0.0.1:{port} does not answer after 2 s: start process 0 there first, or check the address and port\n"


def test_a_multi_process_run_resumes_in_one_process_noting_the_change(runs, tmp_path, capsys):
    import shutil

    root, data, _ = runs
    out = tmp_path / "out"
    shutil.copytree(root / "p2x1", out)
    code = TRAIN.main(args_for(data, out, "--max-steps", STEPS + 20, "--resume"))
    stdout = capsys.readouterr().out
    assert code == 0
    assert f"resuming from step {STEPS} of {STEPS + 20}" in stdout
    assert "resume: --devices 1 from here on (the run had --devices 2)" in stdout and "--num-processes 1 from here on (the run had --num-processes 2)" in stdout
    assert losses(out)[1][-1]["steps"] == STEPS + 20


def test_a_cluster_job_of_several_processes_is_detected_from_its_environment(monkeypatch):
    from pureflax import distributed

    slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
             "SLURM_LOCALID": "0"}
    for name in slurm:
        monkeypatch.delenv(name, raising=False)
    assert distributed.detected_cluster() is None  # no cluster: train.py runs one process, as always
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    assert distributed.detected_cluster() == ("Slurm", 2)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.detected_cluster() is None  # a job of one process joins nothing
