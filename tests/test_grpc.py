"""The gRPC API end to end, with the official ``grpcio`` client (an independent implementation).

Three parts:

- a real daemon in a subprocess (:mod:`tests.daemon`), one per module, called through the
  ``joblet_pb2_grpc`` stubs: every implemented RPC, every kind of client certificate, log streams,
  disconnects, malformed and oversized requests; the daemon must still stop cleanly at the end;
- the server in-process with a fake engine, where what a disconnect or a cancellation leaves
  behind (tasks, open log followers) can be inspected directly;
- the ``joblet`` command's own behaviour (config, certificates, refusals).

grpcio calls block: the daemon tests are plain sync tests, the in-process ones run the client in
a worker thread. Every call has a timeout.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import attrs
import grpc
import h2.config  # type: ignore[import-untyped]
import h2.connection  # type: ignore[import-untyped]
import h2.events  # type: ignore[import-untyped]
import purerpc
import pytest
import trio
import trio.testing
import yaml
from purerpc.grpc_proto import GRPCProtoSocket
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.connection import GRPCConnection

from joblet import main as joblet_main
from joblet.certs import CertPaths, create_ca, init_certs, issue_client_cert
from joblet.config import Config, GrpcSection, StateLayout, load_config
from joblet.core.chunks import Chunk
from joblet.core.errors import JobNotFound, Unauthenticated
from joblet.core.model import JobInfo, JobSpec, JobStatus, RunRequest
from joblet.core.samples import MetricsSample
from joblet.protocol import joblet_grpc
from joblet.protocol import joblet_pb2 as pb
from joblet.protocol import joblet_pb2_grpc as pb_grpc
from joblet.rpc import auth, errors, tls
from joblet.rpc.listeners import open_listener, open_unix_listener
from joblet.rpc.server import GrpcServer
from joblet.rpc.service import MAX_CHUNK, JobService
from joblet.rpc.tls import server_ssl_context
from joblet.rpc.transport import TcpOptionsSocketWrapper
from tests.conftest import require_root
from tests.daemon import REPO, Daemon, running_daemon

T = 10.0  # timeout of every gRPC call, seconds
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
TERMINAL = {"COMPLETED", "FAILED", "STOPPED"}

Code = grpc.StatusCode


# --- fixtures and helpers -----------------------------------------------------------------------


@attrs.frozen
class ClientCerts:
    """Client certificates of every kind, as (cert, key) paths."""

    foreign: tuple[Path, Path]  # issued by another CA, OU=admin
    expired: tuple[Path, Path]  # our CA, OU=admin, expired yesterday
    no_ou: tuple[Path, Path]  # our CA, no OU
    other_ou: tuple[Path, Path]  # our CA, OU=engineering
    several_ous: tuple[Path, Path]  # our CA, OU=engineering then OU=Viewer
    upper_admin: tuple[Path, Path]  # our CA, OU=ADMIN


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    require_root()
    with running_daemon() as d:
        yield d


@pytest.fixture(scope="module")
def client_certs(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> ClientCerts:
    out = tmp_path_factory.mktemp("client-certs")
    ca_cert, ca_key = daemon.certs.ca_cert, daemon.certs.ca_key
    other = create_ca(out / "other-ca", common_name="other-ca")
    now = dt.datetime.now(dt.UTC)
    return ClientCerts(
        foreign=issue_client_cert(other.cert, other.key, out, "foreign", "admin"),
        expired=issue_client_cert(
            ca_cert,
            ca_key,
            out,
            "expired",
            "admin",
            not_before=now - dt.timedelta(days=10),
            not_after=now - dt.timedelta(days=1),
        ),
        no_ou=issue_client_cert(ca_cert, ca_key, out, "no-ou", None),
        other_ou=issue_client_cert(ca_cert, ca_key, out, "other-ou", "engineering"),
        several_ous=issue_client_cert(ca_cert, ca_key, out, "several", ["engineering", "Viewer"]),
        upper_admin=issue_client_cert(ca_cert, ca_key, out, "upper", "ADMIN"),
    )


def open_channel(
    target: str, ca: Path, cert_key: tuple[Path, Path] | None, **options: Any
) -> grpc.Channel:
    """A grpcio channel with mutual TLS (``cert_key`` None: no client certificate)."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=cert_key[1].read_bytes() if cert_key else None,
        certificate_chain=cert_key[0].read_bytes() if cert_key else None,
    )
    return grpc.secure_channel(target, creds, options=list(options.items()))


@pytest.fixture(scope="module")
def stub_for(daemon: Daemon) -> Iterator[Callable[[tuple[Path, Path] | None], Any]]:
    """Make stubs on fresh channels (closed at the end of the module)."""
    channels: list[grpc.Channel] = []

    def make(cert_key: tuple[Path, Path] | None) -> Any:
        channel = open_channel(daemon.target, daemon.certs.ca_cert, cert_key)
        channels.append(channel)
        return job_stub(channel)

    yield make
    for channel in channels:
        channel.close()


@pytest.fixture(scope="module")
def admin(daemon: Daemon, stub_for: Callable[..., Any]) -> Any:
    return stub_for((daemon.certs.admin_cert, daemon.certs.admin_key))


@pytest.fixture(scope="module")
def viewer(daemon: Daemon, stub_for: Callable[..., Any]) -> Any:
    return stub_for((daemon.certs.viewer_cert, daemon.certs.viewer_key))


def job_stub(channel: grpc.Channel) -> Any:
    """A ``JobService`` stub (grpcio's generated code is untyped)."""
    return pb_grpc.JobServiceStub(channel)  # type: ignore[no-untyped-call]


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    """The error ``call`` fails with (it must fail)."""
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, bytes):
            list(result)  # a stream fails when read
    return info.value


def assert_status(err: grpc.RpcError, code: grpc.StatusCode, details: str | None = None) -> None:
    assert err.code() == code, (err.code(), err.details())
    if details is not None:
        assert err.details() == details


def run(stub: Any, command: str, *args: str, **fields: Any) -> Any:
    return stub.RunJob(pb.RunJobReq(command=command, args=list(args), **fields), timeout=T)


def output(stub: Any, job_id: str, offset: int = 0) -> bytes:
    """The job's whole output (the stream ends when the job does)."""
    chunks = stub.GetJobLogs(pb.GetJobLogsReq(id=job_id, offset=offset), timeout=T)
    return b"".join(c.payload for c in chunks)


def final_status(stub: Any, job_id: str) -> Any:
    """The job's status once it has ended: its log stream ends after its status is final."""
    output(stub, job_id)
    status = stub.GetJobStatus(pb.GetJobStatusReq(id=job_id), timeout=T)
    assert status.status in TERMINAL, status
    return status


# --- the implemented RPCs, as admin -------------------------------------------------------------


@pytest.mark.slow
def test_admin_runs_a_job_and_reads_status_list_and_logs(admin: Any, daemon: Daemon) -> None:
    res = run(admin, "sh", "-c", "echo out; echo err >&2")
    assert UUID.fullmatch(res.id)
    assert (res.command, list(res.args)) == ("sh", ["-c", "echo out; echo err >&2"])
    assert res.status in {"RUNNING", "COMPLETED"}
    assert (res.maxCPU, res.maxMemory, res.maxIOBPS) == (100, 512, 0)  # the configured defaults
    assert res.startTime and res.nodeId and res.network == "host"

    # stdout and stderr are separate pipes, merged as they are read: either order.
    assert sorted(output(admin, res.id).splitlines()) == [b"err", b"out"]
    status = admin.GetJobStatus(pb.GetJobStatusReq(id=res.id), timeout=T)
    assert (status.uuid, status.status, status.exitCode) == (res.id, "COMPLETED", 0)
    assert status.endTime and status.nodeId == res.nodeId
    by_prefix = admin.GetJobStatus(pb.GetJobStatusReq(id=res.id[:13]), timeout=T)
    assert by_prefix.uuid == res.id

    listed = {job.id: job for job in admin.ListJobs(pb.EmptyRequest(), timeout=T).jobs}
    assert listed[res.id].status == "COMPLETED"
    assert listed[res.id].command == "sh"

    daemon.wait_for_log(f"job started successfully | jobId={res.id}")
    assert "client=admin-client" in daemon.wait_for_log(f"job run requested | jobId={res.id}")


@pytest.mark.slow
def test_run_job_keeps_requested_limits(admin: Any) -> None:
    res = run(admin, "true", maxCPU=50, maxMemory=64, maxIOBPS=1_000_000)
    assert (res.maxCPU, res.maxMemory, res.maxIOBPS) == (50, 64, 1_000_000)
    assert final_status(admin, res.id).status == "COMPLETED"


@pytest.mark.slow
def test_failing_job_reports_its_exit_code(admin: Any) -> None:
    res = run(admin, "sh", "-c", "exit 7")
    status = final_status(admin, res.id)
    assert (status.status, status.exitCode) == ("FAILED", 7)


@pytest.mark.slow
def test_stop_job_stops_a_running_job_once(admin: Any, daemon: Daemon) -> None:
    res = run(admin, "sleep", "30")
    assert res.status == "RUNNING"
    stopped = admin.StopJob(pb.StopJobReq(id=res.id), timeout=T)
    assert (stopped.id, stopped.status) == (res.id, "STOPPED")
    assert stopped.endTime
    assert final_status(admin, res.id).status == "STOPPED"
    daemon.wait_for_log(f"job stopped on request | jobId={res.id}")

    again = rpc_error(lambda: admin.StopJob(pb.StopJobReq(id=res.id), timeout=T))
    assert_status(
        again, Code.FAILED_PRECONDITION, f"job is not running: {res.id} (current status: STOPPED)"
    )


# --- roles ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_viewer_reads_but_changes_nothing(admin: Any, viewer: Any, daemon: Daemon) -> None:
    res = run(admin, "sh", "-c", "echo seen by viewer")
    assert output(viewer, res.id) == b"seen by viewer\n"
    assert viewer.GetJobStatus(pb.GetJobStatusReq(id=res.id), timeout=T).uuid == res.id
    assert res.id in {j.id for j in viewer.ListJobs(pb.EmptyRequest(), timeout=T).jobs}

    denied = {
        "run_job": lambda: viewer.RunJob(pb.RunJobReq(command="true"), timeout=T),
        "stop_job": lambda: viewer.StopJob(pb.StopJobReq(id=res.id), timeout=T),
        "delete_job": lambda: viewer.DeleteJob(pb.DeleteJobReq(id=res.id), timeout=T),
        "run_workflow": lambda: viewer.RunWorkflow(pb.RunWorkflowRequest(), timeout=T),
    }
    for operation, call in denied.items():
        assert_status(
            rpc_error(call),
            Code.PERMISSION_DENIED,
            f"role viewer is not allowed to perform operation {operation}",
        )
    # Metrics are for reading: the ended job's final sample at least.
    samples = list(viewer.GetJobMetrics(pb.JobMetricsRequest(id=res.id), timeout=T))
    assert samples and {s.jobId for s in samples} == {res.id}
    line = daemon.wait_for_log("permission denied | method=RunJob")
    assert "role=viewer" in line and "client=viewer-client" in line


@pytest.mark.slow
def test_role_ou_is_case_insensitive_and_the_first_naming_a_role_counts(
    client_certs: ClientCerts, stub_for: Callable[..., Any]
) -> None:
    several = stub_for(client_certs.several_ous)  # OU=engineering, OU=Viewer
    several.ListJobs(pb.EmptyRequest(), timeout=T)
    err = rpc_error(lambda: several.RunJob(pb.RunJobReq(command="true"), timeout=T))
    assert_status(
        err, Code.PERMISSION_DENIED, "role viewer is not allowed to perform operation run_job"
    )

    upper = stub_for(client_certs.upper_admin)  # OU=ADMIN
    res = run(upper, "true")
    assert final_status(upper, res.id).status == "COMPLETED"


@pytest.mark.slow
@pytest.mark.parametrize(("which", "found"), [("no_ou", "none"), ("other_ou", "'engineering'")])
def test_certificate_without_a_role_is_denied_everything(
    client_certs: ClientCerts,
    stub_for: Callable[..., Any],
    daemon: Daemon,
    which: str,
    found: str,
) -> None:
    stub = stub_for(getattr(client_certs, which))
    expected = (
        "failed to extract client role: no role in client certificate: "
        f"OU must be admin or viewer (found: {found})"
    )
    calls = [
        lambda: stub.ListJobs(pb.EmptyRequest(), timeout=T),
        lambda: stub.GetJobStatus(pb.GetJobStatusReq(id="x"), timeout=T),
        lambda: stub.RunJob(pb.RunJobReq(command="true"), timeout=T),
        lambda: stub.GetJobLogs(pb.GetJobLogsReq(id="x"), timeout=T),
        lambda: stub.DeleteAllJobs(pb.DeleteAllJobsReq(), timeout=T),
    ]
    for call in calls:
        assert_status(rpc_error(call), Code.UNAUTHENTICATED, expected)
    daemon.wait_for_log(
        f"client authentication failed | method=ListJobs client={which.replace('_', '-')}"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("which", "logged"),
    [
        (None, "no client certificate provided"),
        ("foreign", "certificate verify failed: unable to get local issuer certificate"),
    ],
)
def test_handshake_refuses_bad_certificates(
    client_certs: ClientCerts, daemon: Daemon, which: str | None, logged: str
) -> None:
    cert_key = getattr(client_certs, which) if which else None
    channel = open_channel(daemon.target, daemon.certs.ca_cert, cert_key)
    try:
        stub = job_stub(channel)
        err = rpc_error(lambda: stub.ListJobs(pb.EmptyRequest(), timeout=T))
        assert err.code() == Code.UNAVAILABLE, (err.code(), err.details())
    finally:
        channel.close()
    daemon.wait_for_log("client authentication failed | remote=127.0.0.1:")
    daemon.wait_for_log(logged)


@pytest.mark.slow
def test_expired_certificate_is_unauthenticated_with_the_specs_message(
    client_certs: ClientCerts, stub_for: Callable[..., Any], daemon: Daemon
) -> None:
    stub = stub_for(client_certs.expired)  # signed by our CA, OU=admin, expired yesterday
    for call in (
        lambda: stub.ListJobs(pb.EmptyRequest(), timeout=T),
        lambda: stub.RunJob(pb.RunJobReq(command="true"), timeout=T),
        lambda: stub.GetJobStatus(pb.GetJobStatusReq(id="x"), timeout=T),
    ):
        assert_status(
            rpc_error(call),
            Code.UNAUTHENTICATED,
            "certificate verify failed: certificate has expired",
        )


def test_certificate_validity_window_is_checked() -> None:
    utc = dt.UTC
    start = dt.datetime(2026, 1, 1, tzinfo=utc)
    end = dt.datetime(2026, 12, 31, tzinfo=utc)
    before = dt.datetime(2025, 12, 31, tzinfo=utc)
    inside = dt.datetime(2026, 6, 1, tzinfo=utc)
    after = dt.datetime(2027, 1, 1, tzinfo=utc)
    assert tls.validity_error(start, end, inside) == ""
    assert tls.validity_error(start, end, before).endswith("certificate is not yet valid")
    assert tls.validity_error(start, end, after).endswith("certificate has expired")
    expired = auth.Peer(remote="r", subject="CN=x", role="admin", auth_error="boom", problem="")
    with pytest.raises(Unauthenticated, match=r"^boom$"):
        auth.authorize("ListJobs", expired)


# --- delete -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_delete_job_and_delete_all(admin: Any, viewer: Any, daemon: Daemon) -> None:
    ended = run(admin, "echo", "bye")
    final_status(admin, ended.id)
    running = run(admin, "sleep", "60")
    try:
        err = rpc_error(lambda: viewer.DeleteJob(pb.DeleteJobReq(id=ended.id), timeout=T))
        assert_status(
            err,
            Code.PERMISSION_DENIED,
            "role viewer is not allowed to perform operation delete_job",
        )
        err = rpc_error(lambda: viewer.DeleteAllJobs(pb.DeleteAllJobsReq(), timeout=T))
        assert_status(err, Code.PERMISSION_DENIED)
        err = rpc_error(lambda: admin.DeleteJob(pb.DeleteJobReq(id=running.id), timeout=T))
        assert_status(
            err,
            Code.FAILED_PRECONDITION,
            f"job is still running: {running.id} (current status: RUNNING)",
        )
        res = admin.DeleteJob(pb.DeleteJobReq(id=ended.id[:8]), timeout=T)
        assert (res.id, res.success) == (ended.id, True)
        assert not (StateLayout(daemon.state_dir).logs_dir / ended.id).exists()
        err = rpc_error(lambda: admin.GetJobStatus(pb.GetJobStatusReq(id=ended.id), timeout=T))
        assert_status(err, Code.NOT_FOUND, f"job not found: {ended.id}")
        err = rpc_error(lambda: admin.DeleteJob(pb.DeleteJobReq(id=ended.id), timeout=T))
        assert_status(err, Code.NOT_FOUND, f"job not found: {ended.id}")
    finally:
        admin.StopJob(pb.StopJobReq(id=running.id), timeout=T)
    jobs = admin.ListJobs(pb.EmptyRequest(), timeout=T).jobs
    active = sum(1 for j in jobs if j.status not in TERMINAL)
    res = admin.DeleteAllJobs(pb.DeleteAllJobsReq(), timeout=T)
    assert (res.success, res.deletedCount, res.skippedCount) == (True, len(jobs) - active, active)
    assert res.message == (
        f"Successfully deleted {len(jobs) - active} jobs, skipped {active} running/scheduled jobs"
    )
    assert [
        j.id for j in admin.ListJobs(pb.EmptyRequest(), timeout=T).jobs if j.status in TERMINAL
    ] == []


# --- not yet implemented --------------------------------------------------------------------------


UNIMPLEMENTED: list[tuple[str, Any]] = [
    ("CancelJob", pb.CancelJobReq(id="x")),
    ("RunWorkflow", pb.RunWorkflowRequest(workflow="w.yaml", yamlContent="jobs: {}")),
    ("GetWorkflowStatus", pb.GetWorkflowStatusRequest(workflowUuid="x")),
    ("ListWorkflows", pb.ListWorkflowsRequest()),
    ("GetWorkflowJobs", pb.GetWorkflowJobsRequest(workflowUuid="x")),
]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "request_"), UNIMPLEMENTED, ids=[m for m, _ in UNIMPLEMENTED])
def test_other_rpcs_are_unimplemented(admin: Any, method: str, request_: Any) -> None:
    err = rpc_error(lambda: getattr(admin, method)(request_, timeout=T))
    assert_status(err, Code.UNIMPLEMENTED, f"{method} is not implemented yet")


@pytest.mark.slow
def test_unknown_method_is_unimplemented(daemon: Daemon) -> None:
    cert_key = (daemon.certs.admin_cert, daemon.certs.admin_key)
    with open_channel(daemon.target, daemon.certs.ca_cert, cert_key) as channel:
        call = channel.unary_unary("/joblet.JobService/NoSuchMethod")
        err = rpc_error(lambda: call(b"", timeout=T))
        assert_status(err, Code.UNIMPLEMENTED, "unknown method: joblet.JobService/NoSuchMethod")
        call = channel.unary_unary("/joblet.NoSuchService/RunJob")
        err = rpc_error(lambda: call(b"", timeout=T))
        assert_status(err, Code.UNIMPLEMENTED, "unknown method: joblet.NoSuchService/RunJob")


# --- log streams ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_concurrent_log_streams_are_byte_identical(admin: Any, viewer: Any) -> None:
    script = (
        'i=0; while [ $i -lt 60 ]; do echo "line $i"; echo "err $i" >&2; i=$((i+1)); sleep 0.01;'
        " done"
    )
    res = run(admin, "sh", "-c", script)
    readers = [admin, viewer, admin, viewer, admin]
    with concurrent.futures.ThreadPoolExecutor(len(readers)) as pool:
        outputs = list(pool.map(lambda stub: output(stub, res.id), readers))
    assert len(set(outputs)) == 1
    lines = outputs[0].decode().splitlines()
    assert sorted(lines) == sorted(
        [f"line {i}" for i in range(60)] + [f"err {i}" for i in range(60)]
    )
    # After the end: the same bytes again, from history.
    assert output(viewer, res.id) == outputs[0]


@pytest.mark.slow
def test_large_output_comes_in_messages_of_at_most_64k_and_resumes_at_an_offset(
    admin: Any,
) -> None:
    size = 1_000_000
    res = run(admin, "sh", "-c", f"yes 0123456789abcdef | head -c {size}")
    messages = [m.payload for m in admin.GetJobLogs(pb.GetJobLogsReq(id=res.id), timeout=T)]
    assert max(len(m) for m in messages) <= MAX_CHUNK == 64 * 1024
    data = b"".join(messages)
    assert data == (b"0123456789abcdef\n" * (size // 17 + 1))[:size]
    assert output(admin, res.id, offset=123_457) == data[123_457:]
    assert output(admin, res.id, offset=size) == b""


@pytest.mark.slow
def test_client_disconnecting_mid_stream_costs_nothing(admin: Any, daemon: Daemon) -> None:
    res = run(admin, "sh", "-c", "while true; do echo tick; sleep 0.02; done")
    # The disk writer opens the job's log files with its first write: count after that.
    index = StateLayout(daemon.state_dir).logs_dir / res.id / "index"
    for _ in range(200):
        if index.exists() and index.stat().st_size > 0:
            break
        threading.Event().wait(0.05)
    fds_before = len(os.listdir(f"/proc/{daemon.process.pid}/fd"))

    # Cancelled calls on a channel that stays open (the client resets the HTTP/2 stream).
    for _ in range(10):
        call = admin.GetJobLogs(pb.GetJobLogsReq(id=res.id), timeout=T)
        assert next(call).payload.startswith(b"tick")
        call.cancel()
    # Channels closed under a live stream (the connection goes away).
    for _ in range(3):
        cert_key = (daemon.certs.admin_cert, daemon.certs.admin_key)
        channel = open_channel(daemon.target, daemon.certs.ca_cert, cert_key)
        stub = job_stub(channel)
        call = stub.GetJobLogs(pb.GetJobLogsReq(id=res.id), timeout=T)
        next(call)
        channel.close()

    # The daemon answers, the job runs on, and the closed connections are gone.
    status = admin.GetJobStatus(pb.GetJobStatusReq(id=res.id), timeout=T)
    assert status.status == "RUNNING"
    for _ in range(100):
        if len(os.listdir(f"/proc/{daemon.process.pid}/fd")) <= fds_before:
            break
        threading.Event().wait(0.05)
    assert len(os.listdir(f"/proc/{daemon.process.pid}/fd")) <= fds_before
    assert admin.StopJob(pb.StopJobReq(id=res.id), timeout=T).status == "STOPPED"
    assert "internal error" not in daemon.log()


# --- malformed and oversized requests ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fields", "details"),
    [
        ({"command": ""}, "invalid command: command is required"),
        ({"command": "   "}, "invalid command: command is required"),
        ({"command": "ec\x00ho"}, "invalid command: contains a NUL byte"),
        ({"command": "echo", "args": ["a", "b\x00"]}, "invalid args[1]: contains a NUL byte"),
        ({"command": "true", "maxCPU": -1}, "invalid maxCPU: must not be negative (got -1)"),
        ({"command": "true", "maxMemory": -5}, "invalid maxMemory: must not be negative (got -5)"),
        ({"command": "true", "maxIOBPS": -1}, "invalid maxIOBPS: must not be negative (got -1)"),
        ({"command": "true", "network": "bridge"}, None),
        ({"command": "true", "maxMemory": 2**31 - 1}, None),
        ({"command": "true", "environment": {"1BAD": "x"}}, None),
    ],
)
def test_invalid_run_requests(admin: Any, fields: dict[str, Any], details: str | None) -> None:
    err = rpc_error(lambda: admin.RunJob(pb.RunJobReq(**fields), timeout=T))
    assert_status(err, Code.INVALID_ARGUMENT, details)


@pytest.mark.slow
@pytest.mark.parametrize(
    "raw",
    [
        b"\x0a\x02\xff\xfe",  # command = invalid UTF-8
        b"\x12\x03a\xc3(",  # args[0] = invalid UTF-8
        b"\xff\xff\xff\xff",  # not protobuf at all
    ],
    ids=["command-not-utf8", "arg-not-utf8", "garbage"],
)
def test_undecodable_requests_are_invalid_argument(daemon: Daemon, admin: Any, raw: bytes) -> None:
    cert_key = (daemon.certs.admin_cert, daemon.certs.admin_key)
    with open_channel(daemon.target, daemon.certs.ca_cert, cert_key) as channel:
        call = channel.unary_unary("/joblet.JobService/RunJob")
        err = rpc_error(lambda: call(raw, timeout=T))
        assert err.code() == Code.INVALID_ARGUMENT
        assert err.details().startswith("invalid request: cannot parse joblet.RunJobReq")
        # The connection is still usable.
        call = channel.unary_unary("/joblet.JobService/ListJobs")
        call(b"", timeout=T)


@pytest.mark.slow
def test_oversized_requests_get_resource_exhausted_and_the_connection_lives_on(
    admin: Any,
) -> None:
    for size in (600_000, 40 << 20):  # above maxRecvMsgSize; above purerpc's own 32 MiB too
        err = rpc_error(partial(run, admin, "echo", "x" * size))
        assert err.code() == Code.RESOURCE_EXHAUSTED
        assert re.fullmatch(
            r"request message too large: \d+ bytes \(maxRecvMsgSize is 524288\)", err.details()
        ), err.details()
        admin.ListJobs(pb.EmptyRequest(), timeout=T)


@pytest.mark.slow
def test_compressed_requests_are_limited_after_decompression(daemon: Daemon) -> None:
    cert_key = (daemon.certs.admin_cert, daemon.certs.admin_key)
    with open_channel(daemon.target, daemon.certs.ca_cert, cert_key) as channel:
        stub = job_stub(channel)
        gzip = grpc.Compression.Gzip
        res = stub.RunJob(
            pb.RunJobReq(command="echo", args=["zipped"]), timeout=T, compression=gzip
        )
        assert output(stub, res.id) == b"zipped\n"
        # ~1 KB on the wire, 2 MB once inflated.
        bomb = pb.RunJobReq(command="echo", args=["a" * (2 << 20)])
        err = rpc_error(lambda: stub.RunJob(bomb, timeout=T, compression=gzip))
        assert_status(
            err,
            Code.RESOURCE_EXHAUSTED,
            "request message too large once decompressed (maxRecvMsgSize is 524288)",
        )
        stub.ListJobs(pb.EmptyRequest(), timeout=T)


@pytest.mark.slow
def test_unknown_and_malformed_job_ids(admin: Any, viewer: Any) -> None:
    missing = str(uuid.uuid4())
    for stub in (admin, viewer):
        err = rpc_error(partial(stub.GetJobStatus, pb.GetJobStatusReq(id=missing), timeout=T))
        assert_status(err, Code.NOT_FOUND, f"job not found: {missing}")
        err = rpc_error(partial(stub.GetJobLogs, pb.GetJobLogsReq(id=missing), timeout=T))
        assert_status(err, Code.NOT_FOUND, f"job not found: {missing}")
        err = rpc_error(partial(stub.GetJobStatus, pb.GetJobStatusReq(id=""), timeout=T))
        assert_status(err, Code.INVALID_ARGUMENT, "invalid id: a job id is required")
    err = rpc_error(lambda: admin.StopJob(pb.StopJobReq(id=missing), timeout=T))
    assert_status(err, Code.NOT_FOUND, f"job not found: {missing}")
    err = rpc_error(lambda: admin.GetJobLogs(pb.GetJobLogsReq(id="a\x00b"), timeout=T))
    assert_status(err, Code.INVALID_ARGUMENT, "invalid id: contains a NUL byte")
    res = run(admin, "true")
    err = rpc_error(lambda: admin.GetJobLogs(pb.GetJobLogsReq(id=res.id, offset=-1), timeout=T))
    assert_status(err, Code.INVALID_ARGUMENT, "invalid offset: must not be negative (got -1)")


@pytest.mark.slow
def test_an_error_quoting_a_huge_request_is_cut_and_the_connection_lives_on(admin: Any) -> None:
    """Found by fuzzing: "job not found: <the id>" with a 500 KB id was a trailer no client
    accepts (grpcio: RESOURCE_EXHAUSTED from 4 KB on); at 500 KB the connection stalled."""
    for ref in ("😀" * 131_000, "x" * 10_000):
        err = rpc_error(partial(admin.GetJobStatus, pb.GetJobStatusReq(id=ref), timeout=T))
        assert err.code() == Code.NOT_FOUND, (err.code(), err.details()[:200])
        details = err.details()
        assert details.startswith(f"job not found: {ref[:100]}")
        assert details.endswith(f"... ({len(ref.encode()) + 15} bytes in all)")
        assert len(details.encode()) <= 1024
        admin.ListJobs(pb.EmptyRequest(), timeout=T)


def test_status_messages_are_cut_between_characters() -> None:
    assert errors.bounded_message("short") == "short"
    assert errors.bounded_message("x" * 1024) == "x" * 1024
    cut = errors.bounded_message("é" * 1000, limit=100)  # 2 bytes each
    assert cut == "é" * 38 + "... (2000 bytes in all)"  # 76 bytes + 23: no half character
    status = errors.status_for(JobNotFound("😀" * 1000), "GetJobStatus")
    assert status.status_message.startswith("job not found: 😀😀")
    assert len(status.status_message.encode()) <= errors.MAX_STATUS_MESSAGE


@pytest.mark.slow
def test_daemon_logged_no_internal_error(admin: Any, daemon: Daemon) -> None:
    admin.ListJobs(pb.EmptyRequest(), timeout=T)
    log = daemon.log()
    assert "internal error" not in log
    assert "Traceback" not in log


# --- the server in-process, with a fake engine ----------------------------------------------------


class FakeEngine:
    """An engine whose jobs are canned and whose waits are observable."""

    def __init__(self, jobs: int = 1, output: bytes | None = None) -> None:
        # What follow_log yields before it ends; None: b"first\n", then b"last\n" once released.
        self.output = output
        spec = JobSpec(command="echo", args=("x" * 100,))
        self.jobs = [
            JobInfo(id=str(uuid.uuid4()), spec=spec, status=JobStatus.COMPLETED, start_time=0.0)
            for _ in range(jobs)
        ]
        self.follow_started = trio.Event()
        self.release = trio.Event()
        self.follow_closed = trio.Event()
        self.stop_started = trio.Event()
        self.stop_cancelled = trio.Event()

    async def run_job(self, request: RunRequest) -> JobInfo:
        raise AssertionError("not used")

    def get(self, ref: str) -> JobInfo:
        for job in self.jobs:
            if job.id.startswith(ref):
                return job
        raise JobNotFound(ref)

    def list_jobs(self) -> list[JobInfo]:
        return list(self.jobs)

    async def stop_job(self, ref: str) -> JobInfo:
        self.stop_started.set()
        try:
            await trio.sleep_forever()
        finally:
            self.stop_cancelled.set()
        raise AssertionError("unreachable")

    async def follow_log(self, ref: str, offset: int = 0) -> AsyncGenerator[Chunk, None]:
        if self.output is not None:
            for start in range(offset, len(self.output), 100_000):
                yield Chunk(start, 1, self.output[start : start + 100_000], 0)
            return
        try:
            yield Chunk(0, 1, b"first\n", 0)
            self.follow_started.set()
            await self.release.wait()
            yield Chunk(6, 1, b"last\n", 0)
        finally:
            self.follow_closed.set()

    async def delete_job(self, ref: str) -> JobInfo:
        raise AssertionError("not used")

    async def delete_all_jobs(self) -> tuple[int, int]:
        raise AssertionError("not used")

    async def follow_metrics(self, ref: str) -> AsyncGenerator[MetricsSample, None]:
        raise AssertionError("not used")
        yield  # an async generator, as the engine's


@pytest.fixture(scope="module")
def server_certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return init_certs(tmp_path_factory.mktemp("server-certs"))


@asynccontextmanager
async def serving(
    engine: FakeEngine, certs: CertPaths, **grpc: Any
) -> AsyncIterator[tuple[int, trio.CancelScope]]:
    """Serve ``engine`` on 127.0.0.1; yields the port and the server's cancel scope."""
    ctx = server_ssl_context(certs.ca_cert, certs.server_cert, certs.server_key)
    config = GrpcSection(address="127.0.0.1", **grpc)
    listener = await open_listener("127.0.0.1", 0)
    service = JobService(engine, Config(grpc=config))
    server = GrpcServer([service.definition()], ctx, config, listener=listener)
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(server.run)
        yield int(addresses[0].rsplit(":", 1)[1]), nursery.cancel_scope
        nursery.cancel_scope.cancel()


def local_stub(certs: CertPaths, port: int) -> tuple[grpc.Channel, Any]:
    channel = open_channel(f"localhost:{port}", certs.ca_cert, (certs.admin_cert, certs.admin_key))
    return channel, job_stub(channel)


def request_tasks() -> list[trio.lowlevel.Task]:
    """Every task of this trio run serving a gRPC call."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    found: list[trio.lowlevel.Task] = []
    todo = [root]
    while todo:
        task = todo.pop()
        if task.name.endswith("request_received"):
            found.append(task)
        todo.extend(t for n in task.child_nurseries for t in n.child_tasks)
    return found


def stream_then_drop_connection(certs: CertPaths, port: int, job_id: str) -> bytes:
    """Call GetJobLogs with a bare HTTP/2 client, read one message, then drop the connection
    without resetting the stream (what a crashed client or a lost network does)."""
    ctx = ssl.create_default_context(cafile=certs.ca_cert)
    ctx.load_cert_chain(certs.admin_cert, certs.admin_key)
    ctx.set_alpn_protocols(["h2"])
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(
        sid,
        [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", "/joblet.JobService/GetJobLogs"),
            (":authority", "localhost"),
            ("te", "trailers"),
            ("content-type", "application/grpc"),
        ],
    )
    body = pb.GetJobLogsReq(id=job_id).SerializeToString()
    conn.send_data(sid, struct.pack(">?I", False, len(body)) + body, end_stream=True)
    with socket.create_connection(("127.0.0.1", port), timeout=T) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(conn.data_to_send())
            while data := tls.recv(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        return bytes(event.data)
                tls.sendall(conn.data_to_send())
    raise AssertionError("the server closed the connection")


@pytest.mark.parametrize("how", ["cancel", "close-channel", "drop-connection"])
async def test_disconnect_closes_the_log_follower_and_leaves_no_task(
    server_certs: CertPaths, how: str
) -> None:
    engine = FakeEngine()
    job_id = engine.jobs[0].id
    with trio.fail_after(10):
        async with serving(engine, server_certs) as (port, _):
            if how == "drop-connection":
                message = await trio.to_thread.run_sync(
                    stream_then_drop_connection, server_certs, port, job_id, abandon_on_cancel=True
                )
                assert message.endswith(b"first\n")
                await engine.follow_closed.wait()
                await trio.testing.wait_all_tasks_blocked()
                assert request_tasks() == []
                return
            channel, stub = local_stub(server_certs, port)
            try:
                # A deadline well past the test's own: the server must notice the disconnect.
                call = stub.GetJobLogs(pb.GetJobLogsReq(id=job_id), timeout=60)
                first = await trio.to_thread.run_sync(next, call, abandon_on_cancel=True)
                assert first.payload == b"first\n"
                await engine.follow_started.wait()
                assert len(request_tasks()) == 1
                if how == "cancel":
                    call.cancel()  # RST_STREAM; the connection stays
                else:
                    channel.close()
                await engine.follow_closed.wait()
                await trio.testing.wait_all_tasks_blocked()
                assert request_tasks() == []
                if how == "cancel":  # the same connection still serves
                    jobs = await trio.to_thread.run_sync(
                        lambda: stub.ListJobs(pb.EmptyRequest(), timeout=T)
                    )
                    assert [j.id for j in jobs.jobs] == [job_id]
            finally:
                channel.close()


async def test_server_shutdown_cancels_live_calls(
    server_certs: CertPaths, caplog: pytest.LogCaptureFixture
) -> None:
    engine = FakeEngine()
    failures: list[grpc.RpcError] = []

    def read_all() -> None:
        channel, stub = local_stub(server_certs, port)
        try:
            list(stub.GetJobLogs(pb.GetJobLogsReq(id=engine.jobs[0].id), timeout=T))
        except grpc.RpcError as exc:
            failures.append(exc)
        finally:
            channel.close()

    with trio.fail_after(20):
        async with trio.open_nursery() as clients:
            async with serving(engine, server_certs) as (port, scope):
                clients.start_soon(trio.to_thread.run_sync, read_all)
                await engine.follow_started.wait()
                scope.cancel()  # the daemon stopping: the call is cut, not answered
            await engine.follow_closed.wait()
    assert [f.code() for f in failures] == [Code.UNAVAILABLE]
    assert "internal error" not in caplog.text


async def test_client_deadline_cancels_the_handler(server_certs: CertPaths) -> None:
    engine = FakeEngine()
    with trio.fail_after(20):
        async with serving(engine, server_certs) as (port, _):
            channel, stub = local_stub(server_certs, port)
            try:
                err = await trio.to_thread.run_sync(
                    rpc_error, lambda: stub.StopJob(pb.StopJobReq(id="x"), timeout=0.3)
                )
                assert err.code() == Code.DEADLINE_EXCEEDED
                await engine.stop_cancelled.wait()
            finally:
                channel.close()


async def test_response_above_max_send_size_is_resource_exhausted(server_certs: CertPaths) -> None:
    engine = FakeEngine(jobs=20)
    with trio.fail_after(20):
        async with serving(engine, server_certs, max_send_msg_size=1000) as (port, _):
            channel, stub = local_stub(server_certs, port)
            try:
                err = await trio.to_thread.run_sync(
                    rpc_error, lambda: stub.ListJobs(pb.EmptyRequest(), timeout=T)
                )
                assert err.code() == Code.RESOURCE_EXHAUSTED
                assert re.fullmatch(
                    r"response message too large: \d+ bytes \(maxSendMsgSize is 1000\)",
                    err.details(),
                )
                one = await trio.to_thread.run_sync(
                    lambda: stub.GetJobStatus(pb.GetJobStatusReq(id=engine.jobs[0].id), timeout=T)
                )
                assert one.uuid == engine.jobs[0].id
            finally:
                channel.close()


async def test_log_messages_fit_max_send_size(server_certs: CertPaths) -> None:
    data = bytes(range(256)) * 2000  # 512000 bytes, in 100 kB chunks
    engine = FakeEngine(output=data)
    with trio.fail_after(20):
        async with serving(engine, server_certs, max_send_msg_size=10_000) as (port, _):
            channel, stub = local_stub(server_certs, port)
            try:
                req = pb.GetJobLogsReq(id=engine.jobs[0].id, offset=1000)
                messages = await trio.to_thread.run_sync(
                    lambda: [m.payload for m in stub.GetJobLogs(req, timeout=T)]
                )
            finally:
                channel.close()
    assert b"".join(messages) == data[1000:]
    assert max(len(m) for m in messages) == 10_000 - 6


# --- a graceful stop: drain, don't cut -----------------------------------------------------------

DRAIN = 15.0  # drain timeout of these servers (mock seconds)


class UnixClientSocket(GRPCProtoSocket):  # type: ignore[misc]
    """purerpc's client connection on a Unix socket, failing its calls when the connection ends.

    purerpc's own would set TCP options on the socket, and leave calls waiting forever when the
    connection closes under them.
    """

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        AsyncExitStack.__init__(self)
        self._grpc_connection = GRPCConnection(GRPCConfiguration(client_side=True))
        self._socket = TcpOptionsSocketWrapper(self._grpc_connection, stream)
        self._receive_buffer_size = 1 << 20
        self._streams: dict[int, Any] = {}

    async def _reader_thread(self) -> None:
        try:
            await super()._reader_thread()
        finally:
            for stream in list(self._streams.values()):
                stream._incoming_events[0].close()


class UnixChannel:
    """What purerpc's stubs need of a channel."""

    def __init__(self, grpc_socket: UnixClientSocket) -> None:
        self._grpc_socket = grpc_socket
        self._host = "localhost"
        self._port = 0


@asynccontextmanager
async def unix_client(path: Path) -> AsyncIterator[Any]:
    """A purerpc ``JobService`` stub on a connection to the Unix socket at ``path``."""
    async with await anyio.connect_unix(path) as stream:
        async with UnixClientSocket(stream) as sock:
            yield joblet_grpc.JobServiceStub(UnixChannel(sock))


async def unix_server(engine: FakeEngine, path: Path) -> GrpcServer:
    """A server of ``engine`` on a Unix socket (each client is admin), draining for DRAIN."""
    listener = await open_unix_listener(path)
    service = JobService(engine, Config())
    return GrpcServer(
        [service.definition()], None, GrpcSection(), listener=listener, drain_timeout=DRAIN
    )


# In these tests client and server share the trio run and talk over a Unix socket, whose data
# is readable as soon as it is sent: the mock clock only jumps when every task waits for time.


async def test_stop_refuses_new_connections_and_lets_calls_in_flight_finish(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    engine = FakeEngine()
    path = tmp_path / "drain.sock"
    server = await unix_server(engine, path)  # bound before the ceiling: binding uses a thread
    received: list[bytes] = []
    with trio.fail_after(DRAIN / 2):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            async with unix_client(path) as stub, trio.open_nursery() as calls:

                async def follow() -> None:
                    async for chunk in stub.GetJobLogs(pb.GetJobLogsReq(id=engine.jobs[0].id)):
                        received.append(chunk.payload)

                calls.start_soon(follow)
                await engine.follow_started.wait()
                stopped_at = trio.current_time()
                server.stop()
                await trio.testing.wait_all_tasks_blocked()
                assert not path.exists()
                with pytest.raises(FileNotFoundError):
                    await anyio.connect_unix(path)
                # A new call on a connection already open is answered, not run.
                with pytest.raises(purerpc.RpcFailedError) as refused:
                    await stub.ListJobs(pb.EmptyRequest())
                assert refused.value.status.status_code == purerpc.StatusCode.UNAVAILABLE
                assert refused.value.status.status_message == "server is shutting down"
                assert received == [b"first\n"]
                engine.release.set()
            # The connection closed once its last call ended; then run() returned.
    assert b"".join(received) == b"first\nlast\n"
    assert engine.follow_closed.is_set()
    assert trio.current_time() == stopped_at  # drained before any deadline


async def test_stop_cancels_what_is_still_running_at_the_drain_deadline(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    engine = FakeEngine()
    path = tmp_path / "drain.sock"
    server = await unix_server(engine, path)
    failures: list[BaseException] = []
    with trio.fail_after(DRAIN * 2):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            async with unix_client(path) as stub, trio.open_nursery() as calls:

                async def stop_job() -> None:
                    try:
                        await stub.StopJob(pb.StopJobReq(id=engine.jobs[0].id))
                    except (purerpc.RpcFailedError, anyio.EndOfStream) as exc:
                        failures.append(exc)

                calls.start_soon(stop_job)
                await engine.stop_started.wait()
                stopped_at = trio.current_time()
                server.stop()
                await engine.stop_cancelled.wait()
                assert trio.current_time() - stopped_at == pytest.approx(DRAIN)
    # Cut, not answered: the client sees its connection end.
    assert [type(f) for f in failures] == [anyio.EndOfStream]
    assert "drain deadline passed" in caplog.text
    assert "internal error" not in caplog.text


async def test_grpcio_streams_finish_while_the_server_drains(server_certs: CertPaths) -> None:
    engine = FakeEngine()
    ctx = server_ssl_context(
        server_certs.ca_cert, server_certs.server_cert, server_certs.server_key
    )
    config = GrpcSection(address="127.0.0.1")
    listener = await open_listener("127.0.0.1", 0)
    service = JobService(engine, Config(grpc=config))
    server = GrpcServer([service.definition()], ctx, config, listener=listener, drain_timeout=60)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(server.run)
            port = int(addresses[0].rsplit(":", 1)[1])
            channel, stub = local_stub(server_certs, port)
            try:
                call = stub.GetJobLogs(pb.GetJobLogsReq(id=engine.jobs[0].id), timeout=T)
                first = await trio.to_thread.run_sync(next, call, abandon_on_cancel=True)
                assert first.payload == b"first\n"
                server.stop()
                await trio.testing.wait_all_tasks_blocked()
                fresh, fresh_stub = local_stub(server_certs, port)
                with fresh:
                    err = await trio.to_thread.run_sync(
                        rpc_error, lambda: fresh_stub.ListJobs(pb.EmptyRequest(), timeout=T)
                    )
                assert err.code() == Code.UNAVAILABLE  # connection refused
                engine.release.set()
                rest = await trio.to_thread.run_sync(lambda: [c.payload for c in call])
                assert rest == [b"last\n"]
                assert call.code() == Code.OK
            finally:
                channel.close()


# --- roles, without a server ----------------------------------------------------------------------


def test_operation_names_are_snake_case() -> None:
    assert auth.operation_name("RunJob") == "run_job"
    assert auth.operation_name("GetJobStatus") == "get_job_status"
    assert auth.operation_name("DeleteAllJobs") == "delete_all_jobs"


def test_role_table() -> None:
    methods = pb.DESCRIPTOR.services_by_name["JobService"].methods_by_name
    viewer = {m for m in methods if auth.is_allowed("viewer", m)}
    assert viewer == {
        "GetJobStatus",
        "ListJobs",
        "GetJobLogs",
        "GetJobMetrics",
        "GetWorkflowStatus",
        "ListWorkflows",
        "GetWorkflowJobs",
    }
    assert all(auth.is_allowed("admin", m) for m in methods)
    assert not any(auth.is_allowed("reader", m) for m in methods)


def test_a_request_outside_any_connection_has_no_tls_information() -> None:
    with pytest.raises(Unauthenticated) as info:
        auth.authorize("ListJobs")
    assert str(info.value) == "failed to extract client role: no TLS information found"


# --- the joblet command ---------------------------------------------------------------------------


def test_config_print_is_the_default_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert joblet_main.main(["config", "print"]) == 0
    path = tmp_path / "joblet-config.yml"
    path.write_text(capsys.readouterr().out)
    assert load_config(path) == Config()


def test_config_errors_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_root()
    path = tmp_path / "joblet-config.yml"
    path.write_text(yaml.safe_dump({"grpc": {"prot": 1}}))
    assert joblet_main.main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == "joblet: config error: grpc.prot: unknown key (did you mean 'port'?)\n"


def test_serve_refuses_a_non_linux_host(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert joblet_main.main(["serve"]) == 1
    assert capsys.readouterr().err == (
        "joblet: job execution requires Linux server (current: darwin)\n"
    )


def test_serve_refuses_to_run_unprivileged(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert joblet_main.main(["serve"]) == 1
    assert capsys.readouterr().err == (
        "joblet: joblet serve must run as root: jobs need namespaces and cgroups "
        "(current uid: 1000)\n"
    )


@pytest.mark.slow
def test_sigterm_refuses_new_connections_and_lets_log_streams_end_with_their_jobs() -> None:
    require_root()
    with running_daemon() as d:
        channel = open_channel(d.target, d.certs.ca_cert, (d.certs.admin_cert, d.certs.admin_key))
        with channel:
            stub = job_stub(channel)
            job = run(stub, "sh", "-c", "echo hi; exec sleep 1000")
            call = stub.GetJobLogs(pb.GetJobLogsReq(id=job.id), timeout=T)
            assert next(call).payload == b"hi\n"
            d.process.send_signal(signal.SIGTERM)
            d.wait_for_log("gRPC server draining")
            with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
                probe.connect(("127.0.0.1", d.port))
            assert list(call) == []  # the job was stopped: its stream ends, it is not cut
            assert call.code() == Code.OK
        assert d.process.wait(T) == 0
        assert "drain deadline passed" not in d.log()


@pytest.mark.slow
def test_serve_reports_a_port_in_use(daemon: Daemon, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "joblet.main", "serve", "--state-dir", str(tmp_path / "s")),
            *("--address", "127.0.0.1", "--port", str(daemon.port)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 1
    assert result.stderr.endswith(
        f"joblet: cannot listen on 127.0.0.1:{daemon.port}: Address already in use\n"
    )
    assert "Traceback" not in result.stderr


def test_certs_init_writes_every_file_and_keeps_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs = tmp_path / "certs"
    assert joblet_main.main(["certs", "init", "--dir", str(certs), "--host", "joblet.example"]) == 0
    paths = CertPaths.in_dir(certs)
    files = (paths.ca_cert, paths.ca_key, *paths.leaf_files())
    assert all(p.is_file() for p in files)
    before = {p: p.read_bytes() for p in files}
    assert joblet_main.main(["certs", "init", "--dir", str(certs)]) == 0
    assert {p: p.read_bytes() for p in files} == before
    assert "admin-client-cert.pem" in capsys.readouterr().out
    (paths.admin_key).unlink()
    assert joblet_main.main(["certs", "init", "--dir", str(certs)]) == 1
    assert capsys.readouterr().err.startswith("joblet: certificate error: found admin-client-cert")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "missing command (see --help)"),
        (["certs"], "missing command (see --help)"),
        (["bogus"], "unknown command 'bogus' (see --help)"),
        (["--bogus"], "unknown option '--bogus' (see --help)"),
        # Worded by cyclopts: the part that names the problem.
        (["serve", "--port", "x"], "--port"),
        (["serve", "--log-level", "loud"], '"loud" for --log-level'),
        (["certs", "init", "--days"], "--days requires an argument"),
        (["config", "print", "extra"], "extra"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert joblet_main.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("joblet: ")
    assert err.endswith("\n")
    assert err.count("\n") == 1
    assert message in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert joblet_main.main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--config", "--state-dir", "--port", "--address", "--log-level"):
        assert option in out
