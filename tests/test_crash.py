"""Durability by fault injection: SIGKILL the daemon at random moments while chatty jobs run.

After every restart: every job a client was told about is there; jobs that were running are
FAILED with the restart reason; a job a client saw end is still ended the same way; every log is
readable and a prefix of what the job wrote (complete for ended jobs); every byte a live reader
got more than the flush interval before the kill is on disk; no job process and no job cgroup
is left.
"""

from __future__ import annotations

import random
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import attrs
import grpc
import pytest

from joblet.core.lifecycle import RESTART_REASON
from joblet.protocol import joblet_pb2 as pb
from tests.conftest import processes_in_cgroup_named
from tests.daemon import CrashableDaemon, crashable_daemon
from tests.test_grpc import T, job_stub, open_channel, output

ITERATIONS = 20
FLUSH_INTERVAL = 0.2
#: Time the disk writer may take to write a batch on a loaded machine, on top of the interval.
WRITE_SLACK = 1.0
#: A job that writes numbered lines for as long as it lives (never ends by itself).
CHATTY = """
import sys, time
i = 0
while True:
    sys.stdout.write(f"line {i:08d} " + "x" * 40 + "\\n")
    sys.stdout.flush()
    i += 1
    if i % 50 == 0:
        time.sleep(0.005)
"""
#: A job that ends at once with a known output.
SHORT = ("seq", "1", "5000")


def chatty_output(n_bytes: int) -> bytes:
    """The first ``n_bytes`` CHATTY writes."""
    line = len(f"line {0:08d} " + "x" * 40 + "\n")
    count = n_bytes // line + 1
    return b"".join(f"line {i:08d} {'x' * 40}\n".encode() for i in range(count))[:n_bytes]


SHORT_OUTPUT = b"".join(b"%d\n" % i for i in range(1, 5001))


@attrs.define
class Follower:
    """A live GetJobLogs reader in a thread, noting when each byte arrived."""

    job_id: str
    received: list[tuple[float, int]] = attrs.Factory(list)  # (monotonic time, total bytes)
    thread: threading.Thread | None = None

    def start(self, stub: Any) -> None:
        def read() -> None:
            total = 0
            try:
                for chunk in stub.GetJobLogs(pb.GetJobLogsReq(id=self.job_id), timeout=60):
                    total += len(chunk.payload)
                    self.received.append((time.monotonic(), total))
            except grpc.RpcError:
                pass  # the daemon was killed

        self.thread = threading.Thread(target=read, daemon=True)
        self.thread.start()

    def bytes_before(self, moment: float) -> int:
        return max((n for t, n in self.received if t <= moment), default=0)


@attrs.define
class Known:
    """What clients were told about a job."""

    kind: str  # "chatty" or "short"
    seen_end: str = ""  # the terminal status a client saw before the crash


@pytest.fixture
def crashable() -> Iterator[CrashableDaemon]:
    with crashable_daemon({"logs": {"flushInterval": FLUSH_INTERVAL}}) as ctl:
        yield ctl


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(crashable: CrashableDaemon) -> None:
    rng = random.Random(0x10B1E7)
    known: dict[str, Known] = {}
    for iteration in range(ITERATIONS):
        daemon = crashable.daemon
        channel = open_channel(
            daemon.target, daemon.certs.ca_cert, (daemon.certs.admin_cert, daemon.certs.admin_key)
        )
        stub = job_stub(channel)
        try:
            followers = []
            for _ in range(2):
                res = stub.RunJob(pb.RunJobReq(command="python3", args=["-c", CHATTY]), timeout=T)
                known[res.id] = Known("chatty")
                follower = Follower(res.id)
                follower.start(stub)
                followers.append(follower)
            short = stub.RunJob(pb.RunJobReq(command=SHORT[0], args=list(SHORT[1:])), timeout=T)
            known[short.id] = Known("short")
            if iteration % 2 == 0:
                # A client sees the short job end before the crash: it must stay ended.
                assert output(stub, short.id) == SHORT_OUTPUT
                status = stub.GetJobStatus(pb.GetJobStatusReq(id=short.id), timeout=T)
                known[short.id].seen_end = status.status
            time.sleep(rng.uniform(0.05, 1.5))
            killed_at = time.monotonic()
            crashable.kill()
        finally:
            channel.close()
        for follower in followers:
            assert follower.thread is not None
            follower.thread.join(10)

        daemon = crashable.restart()
        assert processes_in_cgroup_named(daemon.cgroup_parent) == [], iteration
        channel = open_channel(
            daemon.target, daemon.certs.ca_cert, (daemon.certs.admin_cert, daemon.certs.admin_key)
        )
        stub = job_stub(channel)
        try:
            listed = {j.id: j for j in stub.ListJobs(pb.EmptyRequest(), timeout=T).jobs}
            assert set(known) <= set(listed), f"iteration {iteration}: jobs lost"
            for job_id, k in known.items():
                job = listed[job_id]
                assert job.status in {"COMPLETED", "FAILED", "STOPPED"}, (iteration, job)
                log = output(stub, job_id)
                if k.kind == "chatty":
                    assert job.status == "FAILED", (iteration, job)
                    assert log == chatty_output(len(log)), f"iteration {iteration}: not a prefix"
                else:
                    if k.seen_end:
                        assert job.status == k.seen_end, (iteration, job)
                    if job.status == "COMPLETED":
                        assert log == SHORT_OUTPUT, iteration
                    else:
                        assert SHORT_OUTPUT.startswith(log), iteration
                if k.kind == "chatty":
                    # zcat shows the raw output, a torn last gzip member or not.
                    raw = subprocess.run(
                        ["zcat", str(daemon.state_dir / "logs" / job_id / "stdout.log.gz")],
                        capture_output=True,
                        check=False,
                    ).stdout
                    assert raw[: len(log)] == log[: len(raw)], iteration
                if job.status == "FAILED" and k.kind == "chatty":
                    status = stub.GetJobStatus(pb.GetJobStatusReq(id=job_id), timeout=T)
                    assert status.exitCode == -1
            for follower in followers:
                log = output(stub, follower.job_id)
                promised = follower.bytes_before(killed_at - FLUSH_INTERVAL - WRITE_SLACK)
                assert len(log) >= promised, (
                    f"iteration {iteration}: {len(log)} bytes on disk, "
                    f"{promised} were read live more than the flush interval before the crash"
                )
        finally:
            channel.close()
    # The restart reason reaches clients.
    reasons = {
        crashable_reason(crashable, job_id) for job_id, k in known.items() if k.kind == "chatty"
    }
    assert reasons == {RESTART_REASON}


def crashable_reason(crashable: CrashableDaemon, job_id: str) -> str:
    daemon = crashable.daemon
    with open_channel(
        daemon.target, daemon.certs.ca_cert, (daemon.certs.admin_cert, daemon.certs.admin_key)
    ) as channel:
        job = job_stub(channel).GetJobStatus(pb.GetJobStatusReq(id=job_id), timeout=T)
        reason: str = job.reason
        return reason
