"""Job metrics at the edges: GetJobMetrics with the official grpcio client, and ``rnx job metrics``.

One real daemon (:mod:`tests.daemon`) serves the module, sampling every 200 ms; ``rnx`` runs as a
subprocess. Every call has a timeout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from joblet.protocol import joblet_pb2 as pb
from joblet.protocol import joblet_pb2_grpc as pb_grpc
from tests.conftest import require_root
from tests.daemon import Daemon, running_daemon

pytestmark = pytest.mark.slow

T = 30.0  # timeout of every call, seconds
RNX = [sys.executable, "-m", "cli.rnx"]
TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
SIZE = r"\d+(\.\d)?(B|KB|MB|GB|TB)"
#: A job that allocates 16 MiB, sends 100 KB over its loopback and keeps a CPU busy for 1.5 s.
WORKLOAD = """
import socket, time
data = b"x" * (16 << 20)
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
client = socket.create_connection(server.getsockname())
peer, _ = server.accept()
client.sendall(b"x" * 100_000)
got = 0
while got < 100_000:
    got += len(peer.recv(65536))
end = time.monotonic() + 1.5
while time.monotonic() < end:
    pass
"""


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    require_root()
    with running_daemon({"metrics": {"interval": "200ms"}}) as d:
        yield d


def stub(daemon: Daemon, cert: Path, key: Path) -> Iterator[Any]:
    creds = grpc.ssl_channel_credentials(
        root_certificates=daemon.certs.ca_cert.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )
    with grpc.secure_channel(daemon.target, creds) as channel:
        yield pb_grpc.JobServiceStub(channel)  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def admin(daemon: Daemon) -> Iterator[Any]:
    yield from stub(daemon, daemon.certs.admin_cert, daemon.certs.admin_key)


@pytest.fixture(scope="module")
def viewer(daemon: Daemon) -> Iterator[Any]:
    yield from stub(daemon, daemon.certs.viewer_cert, daemon.certs.viewer_key)


def metrics(stub: Any, job_id: str) -> list[Any]:
    return list(stub.GetJobMetrics(pb.JobMetricsRequest(id=job_id), timeout=T))


# --- gRPC -----------------------------------------------------------------------------------------


def test_get_job_metrics_streams_until_the_job_ends_for_admin_and_viewer(
    admin: Any, viewer: Any
) -> None:
    job = admin.RunJob(
        pb.RunJobReq(command="python3", args=["-c", WORKLOAD], maxCPU=50, network="none"),
        timeout=T,
    )
    live = metrics(admin, job.id)  # started while the job runs: ends when it has ended
    status = admin.GetJobStatus(pb.GetJobStatusReq(id=job.id), timeout=T)
    assert status.status == "COMPLETED", status
    assert len(live) >= 3
    stamps = [s.timestampUnixNano for s in live]
    assert stamps == sorted(set(stamps))
    for s in live:
        assert s.jobId == job.id and re.fullmatch(TIME, s.timestamp)
        for part in ("cpu", "memory", "io", "network", "process"):
            assert s.HasField(part), part
        assert s.memory.limit == 512 << 20  # the configured default
    assert max(s.memory.current for s in live) > 16 << 20
    assert max(s.cpu.usagePercent for s in live) > 0
    assert live[-1].network.rxBytes >= 100_000
    assert live[-1].process.count == 0 and max(s.process.count for s in live) >= 1
    # A finished job replays the same samples, to a viewer as well, by any unique prefix.
    assert metrics(viewer, job.id[:8]) == live
    assert metrics(admin, job.id) == live


def test_a_job_on_the_hosts_network_has_no_network_metrics(admin: Any) -> None:
    job = admin.RunJob(pb.RunJobReq(command="true"), timeout=T)
    samples = metrics(admin, job.id)
    assert samples
    assert not any(s.HasField("network") for s in samples)


def test_get_job_metrics_errors(admin: Any, viewer: Any) -> None:
    for who in (admin, viewer):
        with pytest.raises(grpc.RpcError) as info:
            metrics(who, "00000000-0000-4000-8000-000000000000")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert info.value.details() == "job not found: 00000000-0000-4000-8000-000000000000"
        with pytest.raises(grpc.RpcError) as info:
            metrics(who, "")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- rnx ------------------------------------------------------------------------------------------


def rnx(daemon: Daemon, *args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBLET_", "RNX_"))}
    env.update(
        JOBLET_SERVER=daemon.target,
        JOBLET_CA_PATH=str(daemon.certs.ca_cert),
        JOBLET_CERT_PATH=str(daemon.certs.admin_cert),
        JOBLET_KEY_PATH=str(daemon.certs.admin_key),
        COLUMNS=str(columns),
    )
    return subprocess.run(
        [*RNX, *args],
        env=env,
        cwd=daemon.state_dir,
        capture_output=True,
        text=True,
        timeout=T,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def workload_job(daemon: Daemon) -> str:
    """A job with its own network; rnx follows it live (it runs about 2 s)."""
    started = rnx(
        daemon, "--json", "job", "run", "--max-cpu=50", "--network=none", "python3", "-c", WORKLOAD
    )
    assert started.returncode == 0, started.stderr
    job_id: str = json.loads(started.stdout)["id"]
    return job_id


def test_rnx_job_metrics_human(daemon: Daemon, workload_job: str) -> None:
    proc = rnx(daemon, "job", "metrics", workload_job)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    blocks = proc.stdout.split("\n\n")
    assert blocks[-1] == ""  # every block ends with a blank line
    assert len(blocks) - 1 >= 3
    for block in blocks[:-1]:
        assert re.fullmatch(
            rf"Timestamp: {TIME}\n"
            rf"CPU: \d+\.\d%, Memory: {SIZE}, I/O Read: {SIZE}/s, I/O Write: {SIZE}/s\n"
            rf"Network RX: {SIZE}/s, Network TX: {SIZE}/s",
            block,
        ), block


def test_rnx_job_metrics_json_lines(daemon: Daemon, workload_job: str) -> None:
    proc = rnx(daemon, "--json", "job", "metrics", workload_job[:8])
    assert proc.returncode == 0, proc.stderr
    samples = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(samples) >= 3
    for s in samples:
        # The spec's jq example: {timestamp, cpu: .cpu.usagePercent, memory: .memory.current}
        assert s["jobId"] == workload_job and re.fullmatch(TIME, s["timestamp"])
        assert isinstance(s["cpu"]["usagePercent"], float)
        assert isinstance(s["memory"]["current"], int)
        assert s["network"] is not None
    assert max(s["memory"]["current"] for s in samples) > 16 << 20
    # Without a network of its own, "network" is null rather than zeros.
    plain = json.loads(rnx(daemon, "--json", "job", "run", "true").stdout)["id"]
    lines = rnx(daemon, "--json", "job", "metrics", plain).stdout.splitlines()
    assert lines and all(json.loads(line)["network"] is None for line in lines)


@pytest.mark.parametrize("columns", [60, 120])
def test_rnx_job_metrics_chart_fits_the_terminal(
    daemon: Daemon, workload_job: str, columns: int
) -> None:
    proc = rnx(daemon, "job", "metrics", "--chart", workload_job, columns=columns)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= columns
    assert lines[0].startswith("CPU (% of one core): mean ")
    assert any(line.startswith("Memory: peak ") for line in lines)
    assert any("█" in line for line in lines)
    assert re.search(rf"\d+ samples from {TIME} to {TIME}", proc.stdout)


def test_rnx_job_metrics_errors(daemon: Daemon) -> None:
    missing = rnx(daemon, "job", "metrics", "no-such-job")
    assert (missing.returncode, missing.stdout) == (3, "")
    assert missing.stderr == "rnx: error: job not found: no-such-job\n"
    both = rnx(daemon, "--json", "job", "metrics", "--chart", "x")
    assert (both.returncode, both.stdout) == (2, "")
    assert both.stderr == "rnx: error: --chart cannot be combined with --json\n"
