"""Cloud preemption notices: the watcher against a loopback metadata server, and the
end-to-end path (notice -> graceful stop -> the supervisor reruns -> bitwise equal)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest

from ddptrain.preemption import NoticeWatcher, StopRequest, start_notice_watcher
from tests.launch import FAST_ARGS, _env, complete_steps, events, train_rows, wait_until
from tests.metadata_server import AWS_PATH, GCP_PATH, MetadataServer
from tests.preempt_common import (ONLY_STOP_SAVES, assert_resumed_without_recompute,
                                  ckpt_dir, manifest)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUPERVISOR = os.path.join(REPO, "launch", "supervise.py")
AWS_NOTICE = "aws spot terminate at 2026-12-03T19:30:00Z"


@pytest.fixture
def metadata():
    with MetadataServer() as server:
        yield server


def test_aws_poll_uses_an_imdsv2_token_and_reads_the_notice(metadata):
    metadata.require_token = True
    watcher = NoticeWatcher("aws", metadata.base + AWS_PATH, 1.0, lambda _: None)
    assert watcher.poll() is None  # 404: nothing scheduled
    metadata.post_notice()
    assert watcher.poll() == AWS_NOTICE
    gets = [r for r in metadata.requests if r[0] == "GET"]
    assert gets and all(had_token for _, _, had_token in gets)


def test_aws_poll_falls_back_to_imdsv1(metadata):
    metadata.imdsv2 = False
    watcher = NoticeWatcher("aws", metadata.base + AWS_PATH, 1.0, lambda _: None)
    assert watcher.poll() is None
    metadata.post_notice()
    assert watcher.poll() == AWS_NOTICE


def test_gcp_poll_reads_true_or_false_with_the_metadata_header(metadata):
    watcher = NoticeWatcher("gcp", metadata.base + GCP_PATH, 1.0, lambda _: None)
    assert watcher.poll() is None
    metadata.gcp_preempted = True
    assert watcher.poll() == "gcp preemption"


def test_unreachable_or_odd_endpoints_mean_no_notice(metadata):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # nothing listens once the socket is closed
    for url in (f"http://127.0.0.1:{closed_port}/x", metadata.base + "/elsewhere",
                "not a url"):
        assert NoticeWatcher("aws", url, 1.0, lambda _: None).poll() is None
        assert NoticeWatcher("gcp", url, 1.0, lambda _: None).poll() is None


def test_watcher_thread_requests_one_stop_and_stops_polling(metadata):
    stop = StopRequest([])
    noticed = threading.Event()

    def on_notice(reason: str) -> None:
        stop.request(reason)
        noticed.set()

    watcher = NoticeWatcher("aws", metadata.base + AWS_PATH, 0.01, on_notice).start()
    metadata.post_notice(times=5)
    assert noticed.wait(30)
    watcher._thread.join(30)
    assert not watcher._thread.is_alive()
    assert stop.reason == AWS_NOTICE
    assert metadata.notices == 4  # polling ended with the first notice


def test_only_each_nodes_local_rank_0_watches(metadata):
    stop = StopRequest([])
    assert start_notice_watcher("off", None, 1.0, stop, 0) is None
    assert start_notice_watcher("aws", metadata.base + AWS_PATH, 1.0, stop, 1) is None
    watcher = start_notice_watcher("aws", metadata.base + AWS_PATH, 1.0, stop, 0)
    watcher.stop()
    watcher._thread.join(30)
    assert not watcher._thread.is_alive() and not stop.requested


@pytest.mark.slow
def test_spot_notice_stops_gracefully_and_the_supervisor_reruns_to_the_end(
        reference_run, metadata, tmp_path):
    run_dir = str(tmp_path / "run")
    command = [sys.executable, SUPERVISOR, "--run-dir", run_dir, "--nproc-per-node", "2",
               "--retry-delay", "0", "--shutdown-timeout", "60", "--",
               *FAST_ARGS, *ONLY_STOP_SAVES, "--preempt.notice", "aws",
               "--preempt.notice_url", metadata.base + AWS_PATH,
               "--preempt.poll_seconds", "0.05"]
    with open(tmp_path / "supervise.log", "wb") as log:
        proc = subprocess.Popen(command, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        wait_until(lambda: max(train_rows(run_dir), default=0) >= 26, proc,
                   what="step 26")
        metadata.post_notice()  # seen once; later polls get 404, as on a new machine
        assert proc.wait(timeout=300) == 0
    text = (tmp_path / "supervise.log").read_text()

    [stopped] = events(run_dir, "preempted")
    assert stopped["reason"] == AWS_NOTICE and stopped["seconds_signal_to_commit"] >= 0
    stop_step = stopped["step"]
    assert 26 <= stop_step < 66
    assert manifest(run_dir, stop_step)["reason"] == "preempt"
    assert complete_steps(ckpt_dir(run_dir)) == [stop_step, 66]
    assert_resumed_without_recompute(run_dir, stop_step, reference_run)
    assert "attempt 1: torchrun exited 0, training state preempted" in text
    assert "attempt 2: torchrun exited 0, training state finished" in text
    assert "attempt 3" not in text
