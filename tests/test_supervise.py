"""launch/supervise.py's decisions, with a fake torchrun (tests/fake_torchrun.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUPERVISOR = os.path.join(REPO, "launch", "supervise.py")
FAKE = os.path.join(REPO, "tests", "fake_torchrun.py")


def supervise(tmp_path, plan: str, *options: str) -> subprocess.Popen:
    (tmp_path / "plan").write_text(plan)
    env = dict(os.environ, FAKE_PLAN=str(tmp_path / "plan"), FAKE_LOG=str(tmp_path / "log"))
    return subprocess.Popen([sys.executable, SUPERVISOR, "--run-dir", str(tmp_path / "run"),
                             "--python", FAKE, "--retry-delay", "0", *options, "--",
                             "--config", "my.yaml"],
                            env=env, stderr=subprocess.PIPE, text=True)


def fake_log(tmp_path) -> list[str]:
    path = tmp_path / "log"
    return path.read_text().splitlines() if path.exists() else []


def test_reruns_after_a_preemption_until_finished(tmp_path):
    proc = supervise(tmp_path, "preempted crash finished")
    assert proc.wait(timeout=60) == 0
    starts = [line.split()[1] for line in fake_log(tmp_path)]
    assert starts == ["preempted", "crash", "finished"]
    first = fake_log(tmp_path)[0]
    assert "-m torch.distributed.run --standalone" in first
    assert "--signals-to-handle=SIGTERM,SIGUSR1,SIGUSR2" in first
    assert first.endswith(f"-m ddptrain --config my.yaml --run.dir {tmp_path / 'run'}")


def test_bad_input_is_not_retried(tmp_path):
    proc = supervise(tmp_path, "bad_input finished")
    assert proc.wait(timeout=60) == 2
    assert len(fake_log(tmp_path)) == 1


def test_bad_arguments_fail_before_torchrun_starts(tmp_path):
    """Real ddptrain argument parsing: a typo'd key and a cross-field rule are bad input
    (exit 2) found before the first attempt, not crashes to retry."""
    for bad in (["--train.epoch", "3"], ["--train.epochs", "0"]):
        proc = subprocess.run([sys.executable, SUPERVISOR, "--run-dir", str(tmp_path / "r"),
                               "--retry-delay", "0", "--", *bad],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert bad[0].lstrip("-") in proc.stderr and "not starting training" in proc.stderr
        assert "attempt 1" not in proc.stderr
        assert not (tmp_path / "r").exists()


def test_gives_up_after_max_failures_in_a_row(tmp_path):
    proc = supervise(tmp_path, "crash preempted crash crash finished",
                     "--max-failures", "2")
    assert proc.wait(timeout=60) == 1
    assert [line.split()[1] for line in fake_log(tmp_path)] == ["crash", "preempted",
                                                               "crash", "crash"]


def wait_for_fake_start(proc: subprocess.Popen, tmp_path) -> None:
    status = tmp_path / "run" / "status.json"
    deadline = time.monotonic() + 60
    while not (status.exists() and "running" in status.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)


def test_a_signal_is_forwarded_once_and_ends_supervision(tmp_path):
    proc = supervise(tmp_path, "wait finished")
    wait_for_fake_start(proc, tmp_path)
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # a second signal is not passed on
    assert proc.wait(timeout=60) == 75
    assert fake_log(tmp_path)[1:] == ["signals SIGUSR1"]  # not rerun either


def test_ctrl_c_becomes_a_graceful_sigterm(tmp_path):
    proc = supervise(tmp_path, "wait finished")
    wait_for_fake_start(proc, tmp_path)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 75
    assert fake_log(tmp_path)[1:] == ["signals SIGTERM"]
