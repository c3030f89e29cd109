"""The Persist Service end to end: the real service on a real Unix socket (and TCP with mutual
TLS), queried with the official ``grpcio`` client.

Logs come from real jobs (the ``joblet`` harness) or are written by the real
:class:`LogFileWriter` with chosen timestamps; metrics by the real :class:`MetricsWriter`.
grpcio calls block: they run in a worker thread, each with a timeout.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import grpc
import pytest
import trio

from joblet.certs import CertPaths, init_certs, issue_client_cert
from joblet.config import (
    Config,
    GrpcSection,
    PersistSection,
    PersistServerSection,
    PersistTlsSection,
)
from joblet.core.chunks import STDERR, STDOUT, Chunk
from joblet.core.lines import Lines
from joblet.core.model import JobStatus
from joblet.core.samples import MetricRecord
from joblet.protocol import persist_pb2 as pb
from joblet.protocol import persist_pb2_grpc as pb_grpc
from joblet.rpc.persist_codec import encode_log_responses
from joblet.rpc.persist_service import (
    PersistServer,
    PersistService,
    open_persist_listeners,
    socket_path,
)
from joblet.rpc.tls import server_ssl_context
from joblet.store.logfiles import LogFileWriter
from joblet.store.metricfiles import MetricsWriter, metrics_path
from joblet.testing import Harness

T = 10.0  # timeout of every gRPC call, seconds
S = 1_000_000_000  # ns per second
BASE = 1_700_000_000  # a Unix time, seconds
JOB = "f47ac10b-58cc-4372-a567-0e02b2c3d479"
OTHER = "f47ac10b-0000-4000-8000-000000000000"
Code = grpc.StatusCode


@attrs.frozen
class Served:
    """A running Persist Service."""

    state: Path
    unix: str  # grpcio target of the Unix socket
    tcp: str  # "localhost:<port>" when TLS is on, else ""


@asynccontextmanager
async def serving(
    state: Path,
    *,
    known: Callable[[], Iterable[str]] | None = None,
    certs: CertPaths | None = None,
    max_send: int = 4 << 20,
) -> AsyncIterator[Served]:
    """Serve ``state``'s logs and metrics; with ``certs``, on TCP with mutual TLS too."""
    with attrs.validators.disabled():  # tcp_port 0, any free port, is refused by its check
        server = PersistServerSection(
            tcp_address="127.0.0.1",
            tcp_port=0,
            tls=PersistTlsSection(enabled=certs is not None),
        )
    config = Config(
        state_dir=state,
        grpc=GrpcSection(max_send_msg_size=max_send),
        persist=PersistSection(server=server),
    )
    ctx = None
    if certs is not None:
        ctx = server_ssl_context(certs.ca_cert, certs.server_cert, certs.server_key)
    service = PersistService(
        state / "logs", state / "metrics", known_jobs=known, max_send_msg_size=max_send
    )
    listeners = await open_persist_listeners(config)
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(PersistServer(service, listeners, ctx, config).run)
        tcp = ""
        if certs is not None:
            tcp = "localhost:" + addresses[1].rsplit(":", 1)[1]
        yield Served(state, f"unix:{socket_path(config)}", tcp)
        nursery.cancel_scope.cancel()


def write_log(
    state: Path, job_id: str, pieces: Sequence[tuple[int, bytes, int]], close: bool = True
) -> LogFileWriter:
    """Write (stream, data, ts_ns) pieces, one chunk each, in batches of two."""
    writer = LogFileWriter(state / "logs" / job_id)
    offset = writer.size
    chunks = []
    for stream, data, ts in pieces:
        chunks.append(Chunk(offset, stream, data, ts))
        offset += len(data)
    for i in range(0, len(chunks), 2):
        writer.append(chunks[i : i + 2])
    if close:
        writer.close()
    return writer


def call(
    target: str, method: str, request: Any, creds: grpc.ChannelCredentials | None = None
) -> list[Any]:
    """Every response message of one streaming call."""
    options = [("grpc.max_receive_message_length", 64 << 20)]
    if creds is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, creds, options=options)
    with channel:
        stub = pb_grpc.PersistServiceStub(channel)  # type: ignore[no-untyped-call]
        return list(getattr(stub, method)(request, timeout=T))


async def logs(
    target: str, creds: grpc.ChannelCredentials | None = None, **req: Any
) -> list[tuple[int, str, str]]:
    responses = await trio.to_thread.run_sync(
        call, target, "QueryLogs", pb.QueryLogsRequest(**req), creds
    )
    return [(e.timestamp, e.stream, e.content) for r in responses for e in r.entries]


async def metrics(target: str, **req: Any) -> list[tuple[int, str, dict[str, float]]]:
    responses = await trio.to_thread.run_sync(
        call, target, "QueryMetrics", pb.QueryMetricsRequest(**req), None
    )
    return [(s.timestamp, s.metric_type, dict(s.values)) for r in responses for s in r.samples]


async def error(
    target: str, method: str, creds: grpc.ChannelCredentials | None = None, **req: Any
) -> tuple[Any, str]:
    request = (pb.QueryLogsRequest if method == "QueryLogs" else pb.QueryMetricsRequest)(**req)
    with pytest.raises(grpc.RpcError) as info:
        await trio.to_thread.run_sync(call, target, method, request, creds)
    return info.value.code(), info.value.details()


SAMPLE_LOG = [
    (STDOUT, b"first line\nsecond ", BASE * S + 100),
    (STDERR, b"warning\n", (BASE + 1) * S),
    (STDOUT, b"line\nthird\n", (BASE + 2) * S + 5),
    (STDERR, b"bad \xff byte\n", (BASE + 3) * S),
    (STDOUT, b"no newline at the end", (BASE + 4) * S),
]
SAMPLE_LINES = [
    (BASE * S + 100, "stdout", "first line"),
    (BASE * S + 100, "stdout", "second line"),
    ((BASE + 1) * S, "stderr", "warning"),
    ((BASE + 2) * S + 5, "stdout", "third"),
    ((BASE + 3) * S, "stderr", "bad \ufffd byte"),
    ((BASE + 4) * S, "stdout", "no newline at the end"),
]


# --- QueryLogs ------------------------------------------------------------------------------------


async def test_lines_and_timestamps_in_order(tmp_path: Path) -> None:
    write_log(tmp_path, JOB, SAMPLE_LOG)
    with trio.fail_after(30):
        async with serving(tmp_path) as served:
            assert await logs(served.unix, job_id=JOB) == SAMPLE_LINES


async def test_stream_filter(tmp_path: Path) -> None:
    write_log(tmp_path, JOB, SAMPLE_LOG)
    with trio.fail_after(30):
        async with serving(tmp_path) as served:
            got = await logs(served.unix, job_id=JOB, stream="stderr")
            assert got == [line for line in SAMPLE_LINES if line[1] == "stderr"]
            got = await logs(served.unix, job_id=JOB, stream="stdout")
            assert got == [line for line in SAMPLE_LINES if line[1] == "stdout"]


async def test_time_window_in_whole_seconds_and_limit(tmp_path: Path) -> None:
    write_log(tmp_path, JOB, SAMPLE_LOG)
    with trio.fail_after(30):
        async with serving(tmp_path) as served:
            # Both bounds inclusive, at one-second resolution.
            got = await logs(served.unix, job_id=JOB, start_time=BASE + 1, end_time=BASE + 2)
            assert got == SAMPLE_LINES[2:4]
            got = await logs(served.unix, job_id=JOB, start_time=BASE + 3)
            assert got == SAMPLE_LINES[4:]
            assert await logs(served.unix, job_id=JOB, end_time=BASE) == SAMPLE_LINES[:2]
            assert await logs(served.unix, job_id=JOB, limit=3) == SAMPLE_LINES[:3]
            got = await logs(served.unix, job_id=JOB, stream="stderr", start_time=BASE + 1, limit=1)
            assert got == [SAMPLE_LINES[2]]
            assert await logs(served.unix, job_id=JOB, start_time=BASE + 10) == []


async def test_prefix_ids(tmp_path: Path) -> None:
    write_log(tmp_path, JOB, [(STDOUT, b"job\n", BASE * S)])
    write_log(tmp_path, OTHER, [(STDOUT, b"other\n", BASE * S)])
    with trio.fail_after(30):
        async with serving(tmp_path) as served:
            assert await logs(served.unix, job_id="f47ac10b-58") == [(BASE * S, "stdout", "job")]
            assert await logs(served.unix, job_id="f47ac10b-0") == [(BASE * S, "stdout", "other")]
            code, details = await error(served.unix, "QueryLogs", job_id="f47ac10b")
            assert code == Code.INVALID_ARGUMENT
            assert details == "job id prefix is ambiguous: f47ac10b (matches 2 jobs)"


async def test_unknown_job_is_not_found(tmp_path: Path) -> None:
    write_log(tmp_path, JOB, SAMPLE_LOG[:1])
    with trio.fail_after(30):
        async with serving(tmp_path) as served:
            for method in ("QueryLogs", "QueryMetrics"):
                for ref in ("nope", ".", "..", "../logs", "f47ac10b-58cc-4372-a567-0e02b2c3d47x"):
                    code, details = await error(served.unix, method, job_id=ref)
                    assert (code, details) == (Code.NOT_FOUND, f"job not found: {ref}")


async def test_an_id_longer_than_a_file_name_is_not_found(tmp_path: Path) -> None:
    """Found by fuzzing: such an id was joined to the logs directory and stat() failed with
    ENAMETOOLONG (INTERNAL)."""
    write_log(tmp_path, JOB, SAMPLE_LOG[:1])
    with trio.fail_after(30):
        async with serving(tmp_path) as served:
            for method in ("QueryLogs", "QueryMetrics"):
                for ref in ("x" * 256, JOB + "0" * 4096):
                    code, details = await error(served.unix, method, job_id=ref)
                    assert code == Code.NOT_FOUND, details
                    assert details.startswith(f"job not found: {ref[:40]}"), details


async def test_a_job_the_engine_knows_without_files_has_no_lines(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with serving(tmp_path, known=lambda: [JOB]) as served:
            assert await logs(served.unix, job_id=JOB[:8]) == []
            assert await metrics(served.unix, job_id=JOB) == []


@pytest.mark.parametrize(
    ("method", "request_fields", "details"),
    [
        (
            "QueryLogs",
            {"stream": "stdin"},
            "invalid stream: 'stdin' (must be stdout, stderr or empty)",
        ),
        (
            "QueryLogs",
            {"stream": "STDOUT"},
            "invalid stream: 'STDOUT' (must be stdout, stderr or empty)",
        ),
        ("QueryLogs", {"limit": -1}, "invalid limit: -1 (0 = no limit)"),
        ("QueryLogs", {"start_time": -5}, "invalid start_time: -5 (Unix seconds, 0 = unbounded)"),
        (
            "QueryLogs",
            {"start_time": 20, "end_time": 10},
            "invalid time window: end_time 10 < start_time 20",
        ),
        ("QueryLogs", {"job_id": ""}, "job_id is required"),
        (
            "QueryMetrics",
            {"metric_type": "disk"},
            "invalid metric_type: 'disk' "
            "(must be one of cpu, memory, io, gpu, network, process or empty)",
        ),
        ("QueryMetrics", {"end_time": -1}, "invalid end_time: -1 (Unix seconds, 0 = unbounded)"),
    ],
)
async def test_bad_filters_are_invalid_arguments(
    tmp_path: Path, method: str, request_fields: dict[str, Any], details: str
) -> None:
    write_log(tmp_path, JOB, SAMPLE_LOG[:1])
    with trio.fail_after(30):
        async with serving(tmp_path) as served:
            fields = {"job_id": JOB, **request_fields}
            assert await error(served.unix, method, **fields) == (Code.INVALID_ARGUMENT, details)


async def test_many_lines_come_in_large_batches(tmp_path: Path) -> None:
    lines = [f"line {i:06d}".encode() for i in range(50_000)]
    data = b"\n".join(lines) + b"\n"
    pieces = [(STDOUT, data[i : i + 65536], BASE * S + i) for i in range(0, len(data), 65536)]
    write_log(tmp_path, JOB, pieces)
    with trio.fail_after(60):
        async with serving(tmp_path) as served:
            responses = await trio.to_thread.run_sync(
                call, served.unix, "QueryLogs", pb.QueryLogsRequest(job_id=JOB), None
            )
            got = [e.content for r in responses for e in r.entries]
            assert got == [line.decode() for line in lines]
            assert 5 < len(responses) < 100  # batches of about 64 KiB


async def test_a_line_larger_than_a_message_is_split(tmp_path: Path) -> None:
    long = "é" * 100_000  # 200 KB of UTF-8
    write_log(tmp_path, JOB, [(STDOUT, long.encode() + b"\nshort\n", BASE * S)])
    with trio.fail_after(30):
        async with serving(tmp_path, max_send=64 << 10) as served:
            got = await logs(served.unix, job_id=JOB)
            assert "".join(c for _, _, c in got[:-1]) == long
            assert len(got) > 4 and got[-1] == (BASE * S, "stdout", "short")
            assert {ts for ts, _, _ in got} == {BASE * S}


async def test_a_growing_log_written_by_the_real_writer(tmp_path: Path) -> None:
    writer = write_log(tmp_path, JOB, [(STDOUT, b"one\ntw", BASE * S)], close=False)
    try:
        with trio.fail_after(30):
            async with serving(tmp_path) as served:
                assert await logs(served.unix, job_id=JOB) == [
                    (BASE * S, "stdout", "one"),
                    (BASE * S, "stdout", "tw"),  # what there is so far
                ]
                writer.append([Chunk(writer.size, STDOUT, b"o\nthree\n", (BASE + 1) * S)])
                assert await logs(served.unix, job_id=JOB) == [
                    (BASE * S, "stdout", "one"),
                    (BASE * S, "stdout", "two"),
                    ((BASE + 1) * S, "stdout", "three"),
                ]
    finally:
        writer.close()


# --- real jobs ------------------------------------------------------------------------------------


def engine_ids(joblet: Harness) -> Callable[[], Iterable[str]]:
    return lambda: [info.id for info in joblet.engine.list_jobs()]


async def test_a_real_job(joblet: Harness) -> None:
    with trio.fail_after(60):
        job = await joblet.run("sh", "-c", "echo out1; echo err1 >&2; printf 'out2\\nno end'")
        final = await joblet.wait(job.id)
        assert final.status is JobStatus.COMPLETED
        await joblet.engine.services.disk_writer.flush()
        async with serving(joblet.state_dir, known=engine_ids(joblet)) as served:
            got = await logs(served.unix, job_id=job.id[:13])
            # stdout and stderr are separate pipes: only each stream's own order is certain.
            assert [c for _, s, c in got if s == "stdout"] == ["out1", "out2", "no end"]
            assert [c for _, s, c in got if s == "stderr"] == ["err1"]
            stamps = [ts for ts, _, _ in got]
            assert stamps == sorted(stamps)
            assert final.start_time is not None and final.end_time is not None
            assert final.start_time - 1 <= stamps[0] / S <= stamps[-1] / S <= final.end_time + 1


async def test_a_running_job_s_log_grows(joblet: Harness) -> None:
    script = 'trap "echo stopping; exit 0" TERM; echo first; while :; do sleep 0.05; done'
    with trio.fail_after(60):
        job = await joblet.run("sh", "-c", script)
        seen = b""
        async with aclosing(joblet.engine.follow_log(job.id)) as chunks:
            async for chunk in chunks:
                seen += chunk.data
                if b"first\n" in seen:
                    break
        await joblet.engine.services.disk_writer.flush()
        async with serving(joblet.state_dir, known=engine_ids(joblet)) as served:
            running = await logs(served.unix, job_id=job.id)
            assert [c for _, _, c in running] == ["first"]
            assert joblet.engine.get(job.id).status is JobStatus.RUNNING
            await joblet.engine.stop_job(job.id)
            await joblet.engine.services.disk_writer.flush()
            # (sh may also report its killed sleep on stderr)
            ended = await logs(served.unix, job_id=job.id, stream="stdout")
            assert [c for _, _, c in ended] == ["first", "stopping"]
            assert ended[0] == running[0]


# --- QueryMetrics ---------------------------------------------------------------------------------


def write_metrics(state: Path, job_id: str) -> None:
    writer = MetricsWriter(metrics_path(state / "metrics", job_id))
    try:
        for i in range(5):
            ts = (BASE + i) * S
            writer.append(
                [
                    MetricRecord(ts, "cpu", {"cpu_percent": float(i)}),
                    MetricRecord(ts, "memory", {"memory_rss": 1000.0 * i, "memory_percent": 0.5}),
                ]
            )
    finally:
        writer.close()


async def test_query_metrics(tmp_path: Path) -> None:
    write_metrics(tmp_path, JOB)
    with trio.fail_after(30):
        async with serving(tmp_path) as served:
            everything = await metrics(served.unix, job_id=JOB[:8])
            assert len(everything) == 10
            assert everything[:2] == [
                (BASE * S, "cpu", {"cpu_percent": 0.0}),
                (BASE * S, "memory", {"memory_rss": 0.0, "memory_percent": 0.5}),
            ]
            cpu = await metrics(served.unix, job_id=JOB, metric_type="cpu")
            assert [(ts // S - BASE, v["cpu_percent"]) for ts, _, v in cpu] == [
                (i, float(i)) for i in range(5)
            ]
            window = await metrics(
                served.unix,
                job_id=JOB,
                metric_type="memory",
                start_time=BASE + 1,
                end_time=BASE + 2,
            )
            assert [ts // S - BASE for ts, _, _ in window] == [1, 2]
            assert len(await metrics(served.unix, job_id=JOB, limit=3)) == 3
            assert await metrics(served.unix, job_id=JOB, metric_type="gpu") == []


# --- the Unix socket --------------------------------------------------------------------------


async def test_the_socket_is_private_replaces_a_stale_one_and_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "run" / "persist-grpc.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on: what a crash leaves
    with trio.fail_after(30):
        async with serving(tmp_path) as served:
            st = os.lstat(path)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            assert served.unix == f"unix:{path}"
            code, _ = await error(served.unix, "QueryLogs", job_id="x")
            assert code == Code.NOT_FOUND
            # A second service on the same socket is refused while the first one lives.
            with pytest.raises(OSError, match="in use by another process"):
                await open_persist_listeners(Config(state_dir=tmp_path))
            assert path.is_socket()
    assert not path.exists()


async def test_a_file_in_the_socket_s_place_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "run" / "persist-grpc.sock"
    path.parent.mkdir()
    path.write_text("not a socket")
    with pytest.raises(OSError, match="exists and is not a socket"):
        await open_persist_listeners(Config(state_dir=tmp_path))
    assert path.read_text() == "not a socket"


# --- TCP with mutual TLS --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return init_certs(tmp_path_factory.mktemp("persist-certs"))


def tls(certs: CertPaths, cert_key: tuple[Path, Path] | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=certs.ca_cert.read_bytes(),
        private_key=cert_key[1].read_bytes() if cert_key else None,
        certificate_chain=cert_key[0].read_bytes() if cert_key else None,
    )


async def test_tcp_with_mutual_tls_and_roles(tmp_path: Path, certs: CertPaths) -> None:
    write_log(tmp_path, JOB, SAMPLE_LOG)
    write_metrics(tmp_path, JOB)
    no_role = issue_client_cert(certs.ca_cert, certs.ca_key, tmp_path, "no-role", "engineering")
    with trio.fail_after(60):
        async with serving(tmp_path, certs=certs) as served:
            for cert_key in (
                (certs.admin_cert, certs.admin_key),
                (certs.viewer_cert, certs.viewer_key),
            ):
                creds = tls(certs, cert_key)
                assert await logs(served.tcp, creds, job_id=JOB) == SAMPLE_LINES
                responses = await trio.to_thread.run_sync(
                    call, served.tcp, "QueryMetrics", pb.QueryMetricsRequest(job_id=JOB), creds
                )
                assert sum(len(r.samples) for r in responses) == 10
            code, details = await error(served.tcp, "QueryLogs", tls(certs, no_role), job_id=JOB)
            assert code == Code.UNAUTHENTICATED
            assert details.startswith(
                "failed to extract client role: no role in client certificate"
            )
            code, _ = await error(served.tcp, "QueryLogs", tls(certs, None), job_id=JOB)
            assert code == Code.UNAVAILABLE  # refused in the handshake
            # The Unix socket is served at the same time, without TLS.
            assert await logs(served.unix, job_id=JOB, limit=1) == SAMPLE_LINES[:1]


# --- the hand-made encoding -----------------------------------------------------------------------


@pytest.mark.parametrize("target", [1, 50, 300, 64 << 10])
def test_encoded_responses_decode_with_protobuf(target: int) -> None:
    groups: list[Lines] = [
        (BASE * S, STDOUT, [b"", b"a", "é€".encode() * 30, b"x" * 200]),
        (-5, STDERR, [b"negative time"]),
        ((1 << 63) - 1, STDOUT, [b"y" * 129, b"z" * 16_400]),
    ]
    piece = 1000
    messages = encode_log_responses(groups, target=target, piece=piece)
    entries = []
    for m in messages:
        decoded = pb.QueryLogsResponse.FromString(m.SerializeToString())
        assert m.ByteSize() == len(m.data)
        assert m.ByteSize() <= max(target, piece + 64)
        entries += [(e.timestamp, e.stream, e.content) for e in decoded.entries]
    expected = []
    for ts, stream, lines in groups:
        name = "stdout" if stream == STDOUT else "stderr"
        for line in lines:
            if len(line) <= piece:
                expected.append((ts, name, line.decode()))
            else:
                expected += [(ts, name, "z" * 1000)] * 16 + [(ts, name, "z" * 400)]
    assert entries == expected
    if target >= 64 << 10:
        assert len(messages) == 1


def test_long_lines_are_cut_between_characters() -> None:
    line = "€".encode() * 1000  # 3000 bytes, 3-byte characters
    messages = encode_log_responses([(1, STDOUT, [line])], target=100, piece=100)
    contents = [
        e.content for m in messages for e in pb.QueryLogsResponse.FromString(m.data).entries
    ]
    assert "".join(contents) == "€" * 1000
    assert all(len(c.encode()) <= 100 for c in contents)


# --- the daemon -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_joblet_serve_runs_the_persist_service(root: None) -> None:
    """``joblet serve`` with TLS on: the Unix socket and the TCP port, removed on stop."""
    from joblet.protocol import joblet_pb2, joblet_pb2_grpc
    from tests.daemon import POLL, running_daemon

    port = _free_port()
    persist = {"server": {"tcp_address": "127.0.0.1", "tcp_port": port, "tls": {"enabled": True}}}
    with running_daemon({"persist": persist}) as daemon:
        sock = daemon.state_dir / "run" / "persist-grpc.sock"
        assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o600
        certs = daemon.certs
        admin = tls(certs, (certs.admin_cert, certs.admin_key))
        with grpc.secure_channel(daemon.target, admin) as channel:
            jobs = joblet_pb2_grpc.JobServiceStub(channel)  # type: ignore[no-untyped-call]
            res = jobs.RunJob(
                joblet_pb2.RunJobReq(command="sh", args=["-c", "echo hello; echo oops >&2"]),
                timeout=T,
            )
            for _ in jobs.GetJobLogs(joblet_pb2.GetJobLogsReq(id=res.id), timeout=T):
                pass  # the stream ends with the job
        want = [("stdout", "hello"), ("stderr", "oops")]
        deadline = time.monotonic() + T
        got: list[tuple[str, str]] = []
        while time.monotonic() < deadline:  # the log reaches the disk within flushInterval
            responses = call(f"unix:{sock}", "QueryLogs", pb.QueryLogsRequest(job_id=res.id))
            got = sorted((e.stream, e.content) for r in responses for e in r.entries)
            if got == sorted(want):
                break
            time.sleep(POLL)
        assert got == sorted(want)
        viewer = tls(certs, (certs.viewer_cert, certs.viewer_key))
        responses = call(
            f"localhost:{port}", "QueryLogs", pb.QueryLogsRequest(job_id=res.id[:8]), viewer
        )
        assert sorted((e.stream, e.content) for r in responses for e in r.entries) == sorted(want)
    assert not sock.exists()


def test_serve_reports_a_persist_socket_it_cannot_take(root: None, tmp_path: Path) -> None:
    state = tmp_path / "s"
    (state / "run").mkdir(parents=True)
    (state / "run" / "persist-grpc.sock").write_text("not a socket")
    result = subprocess.run(
        [
            *(sys.executable, "-m", "joblet.main", "serve", "--state-dir", str(state)),
            *("--address", "127.0.0.1", "--port", str(_free_port())),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"joblet: persist service: cannot listen on {state / 'run' / 'persist-grpc.sock'}: "
        "exists and is not a socket\n"
    )
