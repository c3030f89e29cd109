"""The gRPC port under abuse: each abuse closes the abusive connection only, within its bound,
and a well-behaved grpcio client is served all the while.

A real daemon (one for the module) with short timeouts; the abusers (:mod:`benchmarks.abusers`:
raw sockets, ``ssl``, ``h2``) connect from 127.0.0.2, the good client from 127.0.0.1, as two hosts
would. Memory is checked coarsely on the daemon's ``VmRSS``: the bound catches what each abuse
cost before it was bounded (+100 MiB for 2,000 idle connections, +65 MiB for 50 announced 16 MiB
frames, growth without end for a PING flood), not a few MiB of allocator noise. Latency figures
are ``benchmarks/port_abuse.py``'s; here the good client only has to complete within its deadline.
"""

from __future__ import annotations

import resource
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio.abc
import grpc
import h2.events  # type: ignore[import-untyped]
import h2.settings  # type: ignore[import-untyped]
import hpack  # type: ignore[import-untyped]
import pytest
import trio
from purerpc.grpclib.config import GRPCConfiguration

from benchmarks import abusers
from joblet.certs import CertPaths
from joblet.config import GrpcSection
from joblet.protocol import joblet_pb2 as pb
from joblet.rpc.server import Admission
from joblet.rpc.transport import CallCount, CallStream, ServerSocket
from tests.conftest import require_root
from tests.daemon import Daemon, running_daemon
from tests.test_grpc import FakeEngine, job_stub, open_channel, server_certs, serving

__all__ = ["server_certs"]  # a fixture of test_grpc, used here too

HANDSHAKE = 2.0  # grpc.handshakeTimeout of the daemon, seconds
IDLE = 3.0  # grpc.idleTimeout
STREAMS = 64  # grpc.maxConcurrentStreams
MARGIN = 10.0  # on top of a timeout: when the server must have closed the connection
#: Most the daemon's RSS may grow during one abuse (it grew by 100 MiB and more before).
RSS_GROWTH_KIB = 40 * 1024
T = 30.0  # the good client's deadline


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    require_root()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:  # room for 2,000 connections in this process
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    config = {
        "grpc": {
            "handshakeTimeout": f"{HANDSHAKE}s",
            "idleTimeout": f"{IDLE}s",
            "maxConcurrentStreams": STREAMS,
        }
    }
    with running_daemon(config) as d:
        yield d
        log = d.log()
    assert "Traceback" not in log, log[-4000:]
    assert "connection failed" not in log, log[-4000:]


def rss_kib(daemon: Daemon) -> int:
    for line in Path(f"/proc/{daemon.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def served(daemon: Daemon) -> None:
    """A well-behaved client, on a connection of its own, gets its answer."""
    certs = daemon.certs
    with open_channel(daemon.target, certs.ca_cert, (certs.admin_cert, certs.admin_key)) as ch:
        jobs = job_stub(ch).ListJobs(pb.EmptyRequest(), timeout=T)
    assert list(jobs.jobs) == []


def tls(daemon: Daemon) -> ssl.SSLSocket:
    certs = daemon.certs
    ctx = abusers.client_context(certs.ca_cert, certs.admin_cert, certs.admin_key)
    return abusers.tls_connect(daemon.port, ctx)


def test_connections_that_never_handshake_are_closed_and_others_served(daemon: Daemon) -> None:
    before = rss_kib(daemon)
    with abusers.many_connections(daemon.port, 2000) as socks:
        served(daemon)
        abusers.wait_all_closed(socks, HANDSHAKE + MARGIN)
        assert rss_kib(daemon) - before < RSS_GROWTH_KIB
    served(daemon)
    line = daemon.wait_for_log("connection refused: limit reached")
    assert "limit=maxHandshakesPerAddress max=32" in line


def test_a_tls_connection_without_the_http2_preface_is_closed(daemon: Daemon) -> None:
    socks = [tls(daemon) for _ in range(20)]
    try:
        served(daemon)
        abusers.wait_all_closed(list(socks), HANDSHAKE + MARGIN)
    finally:
        for s in socks:
            s.close()
    daemon.wait_for_log("HTTP/2 preface timed out")


def _garbage() -> dict[str, bytes]:
    settings = abusers.PREFACE + abusers.EMPTY_SETTINGS
    headers = abusers.raw_frame(0x1, 0x4, 1, b"\xff" * 100)  # END_HEADERS, undecodable HPACK
    continuation_flood = abusers.raw_frame(0x1, 0, 1, b"") + b"".join(
        abusers.raw_frame(0x9, 0, 1, b"\0" * 100) for _ in range(100)
    )
    big = hpack.Encoder().encode([*abusers.CALL_HEADERS, ("x-big", "a" * 100_000)])
    blocks = [big[i : i + 16384] for i in range(0, len(big), 16384)]
    oversized = abusers.raw_frame(0x1, 0, 1, blocks[0]) + b"".join(
        abusers.raw_frame(0x9, 0x4 if i == len(blocks) - 1 else 0, 1, block)
        for i, block in enumerate(blocks[1:], 1)
    )
    return {
        "random bytes after TLS": abusers.random_bytes(4096, 7),
        "a 100 kB header": settings + oversized,
        "a wrong preface": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "DATA on stream 0": settings + abusers.raw_frame(0x0, 0, 0, b"x" * 10),
        "undecodable headers": settings + headers,
        "a 16 MiB frame announced": settings + (2**24 - 1).to_bytes(3, "big") + b"\0\0\0\0\0\1",
        "100 CONTINUATION frames": settings + continuation_flood,
        "SETTINGS with a bad value": settings + abusers.raw_frame(0x4, 0, 0, b"\0\2\0\0\0\5"),
        "a WINDOW_UPDATE of 0": settings + abusers.raw_frame(0x8, 0, 0, b"\0\0\0\0"),
    }


@pytest.mark.parametrize("name", list(_garbage()))
def test_garbage_closes_that_connection_only(daemon: Daemon, name: str) -> None:
    bystander = tls(daemon)  # a connection open before, which must live on
    try:
        bystander.sendall(abusers.PREFACE + abusers.EMPTY_SETTINGS)
        with tls(daemon) as sock:
            host, port = sock.getsockname()[:2]
            sock.sendall(_garbage()[name])
            abusers.wait_all_closed([sock], MARGIN)
        assert not abusers.closed_by_peer(bystander)
    finally:
        bystander.close()
    served(daemon)
    # One line at most, and not an error: the server logs before it closes.
    lines = [line for line in daemon.log().splitlines() if f"remote={host}:{port}" in line]
    assert len(lines) <= 1 and not any("[ERROR]" in line for line in lines), lines
    if name != "random bytes after TLS":  # TLS records that do not decrypt: debug
        assert lines and "[WARN] HTTP/2 protocol error" in lines[0], lines


def test_random_bytes_instead_of_a_client_hello(daemon: Daemon) -> None:
    with abusers.many_connections(daemon.port, 200, payload=abusers.random_bytes(2048, 3)) as socks:
        abusers.wait_all_closed(socks, MARGIN)
    served(daemon)


def test_one_connection_opening_thousands_of_streams(daemon: Daemon) -> None:
    before = rss_kib(daemon)
    with tls(daemon) as sock:
        client = abusers.H2Client(sock)
        client.drain()
        advertised = client.conn.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS]
        assert advertised == STREAMS
        for _ in range(100):  # 5,000 in all, in batches the server reads as they come
            client.open_streams(50)
            client.drain(0.02)
            if client.closed:
                break
        client.drain()
        # Ignoring the limit costs the connection (h2's GOAWAY; the reset of the unread rest
        # may overtake it on the wire).
        assert client.closed  # EOF or reset from the server
    assert rss_kib(daemon) - before < RSS_GROWTH_KIB
    served(daemon)


def test_streams_reset_as_fast_as_they_open(daemon: Daemon) -> None:
    before = rss_kib(daemon)
    with tls(daemon) as sock:
        client = abusers.H2Client(sock)
        for _ in range(40):  # 20,000 streams
            client.rapid_reset(500)
            client.drain(0.01)
        served(daemon)
        # No call is left in flight, so the connection is idle: closed with GOAWAY.
        abusers.wait_all_closed([sock], IDLE + MARGIN)
    assert rss_kib(daemon) - before < RSS_GROWTH_KIB


@pytest.mark.parametrize("frame", [abusers.PING, abusers.EMPTY_SETTINGS], ids=["PING", "SETTINGS"])
def test_a_flood_whose_acks_are_never_read_stalls_only_itself(daemon: Daemon, frame: bytes) -> None:
    before = rss_kib(daemon)
    flood_bytes = 256 << 20
    sent = 0
    with tls(daemon) as sock:
        sock.settimeout(2.0)  # the server stops reading: sending stalls
        chunk = frame * (65536 // len(frame))
        try:
            sock.sendall(abusers.PREFACE + abusers.EMPTY_SETTINGS)
            while sent < flood_bytes:
                sock.sendall(chunk)
                sent += len(chunk)
        except (TimeoutError, OSError):
            pass
        assert sent < flood_bytes  # the server pushed back
        served(daemon)
        assert rss_kib(daemon) - before < RSS_GROWTH_KIB
        abusers.wait_all_closed([sock], IDLE + MARGIN)


def test_an_idle_connection_is_closed_and_the_client_reconnects(daemon: Daemon) -> None:
    certs = daemon.certs
    states: list[grpc.ChannelConnectivity] = []
    went_idle = threading.Event()

    def seen(state: grpc.ChannelConnectivity) -> None:
        states.append(state)
        if grpc.ChannelConnectivity.READY in states and state is grpc.ChannelConnectivity.IDLE:
            went_idle.set()  # the server's GOAWAY

    with open_channel(daemon.target, certs.ca_cert, (certs.admin_cert, certs.admin_key)) as ch:
        stub = job_stub(ch)
        stub.ListJobs(pb.EmptyRequest(), timeout=T)
        ch.subscribe(seen)
        assert went_idle.wait(IDLE + MARGIN), states
        stub.ListJobs(pb.EmptyRequest(), timeout=T)  # on a new connection
        ch.unsubscribe(seen)


# --- limits on connections and streams, in-process (small limits) -------------------------------


async def test_a_stream_over_the_calls_in_flight_is_refused() -> None:
    """REFUSED_STREAM while handlers are still running, even if h2 counts fewer open streams
    (the client reset them: the handlers may still be finishing)."""
    near, far = socket.socketpair()
    stream = await anyio.abc.SocketStream.from_socket(near)
    calls = CallCount()
    server = ServerSocket(
        GRPCConfiguration(client_side=False),
        stream,
        max_recv=1000,
        keepalive=30,
        max_streams=2,
        calls=calls,
    )
    received: list[CallStream] = []

    def client() -> abusers.H2Client:
        far.settimeout(5)
        h2c = abusers.H2Client(far)  # type: ignore[arg-type]
        h2c.drain()
        for i in range(3):
            (sid,) = h2c.open_streams(1)
            h2c.conn.send_data(sid, b"\0\0\0\0\0", end_stream=True)
            if i < 2:
                h2c.conn.reset_stream(sid, 8)  # CANCEL: h2's count of open streams goes down
            h2c.flush()
            h2c.drain(0.2)
        return h2c

    async def listen() -> None:
        async for call in server.listen():
            received.append(call)  # never ended: still in flight

    with trio.fail_after(20), far:
        async with stream, server, trio.open_nursery() as nursery:
            nursery.start_soon(listen)
            h2c = await trio.to_thread.run_sync(client)
            nursery.cancel_scope.cancel()
    assert len(received) == 2 and calls.count == 2
    assert h2c.refused() == 1


# --- limits on connections, in-process (small limits) ------------------------------------------


def test_admission_counts_every_limit() -> None:
    admission = Admission(
        GrpcSection(max_connections=3, max_handshakes_per_address=2, max_connections_per_client=1)
    )
    assert admission.accepted("10.0.0.1") == ""
    assert admission.accepted("10.0.0.1") == ""
    assert admission.accepted("10.0.0.1") == "maxHandshakesPerAddress"
    assert admission.accepted("10.0.0.2") == ""
    assert admission.accepted(None) == "maxConnections"
    admission.handshake_ended("10.0.0.1")
    assert admission.identified("CN=a") == ""
    assert admission.identified("CN=a") == "maxConnectionsPerClient"
    admission.closed(None)  # the refused one
    admission.closed("CN=a")
    assert admission.connections == 1
    assert admission.identified("CN=a") == ""  # a's slot is free again


async def test_connections_over_the_limits_are_closed_at_once_and_the_others_live_on(
    server_certs: CertPaths,
) -> None:
    ctx = abusers.client_context(
        server_certs.ca_cert, server_certs.admin_cert, server_certs.admin_key
    )

    def connect_h2(port: int) -> abusers.H2Client:
        client = abusers.H2Client(abusers.tls_connect(port, ctx, source="127.0.0.1"))
        client.drain()
        return client

    limits: dict[str, Any] = {"max_connections_per_client": 2, "max_connections": 3}
    with trio.fail_after(30):
        async with serving(FakeEngine(), server_certs, **limits) as (port, _):
            first = await trio.to_thread.run_sync(connect_h2, port)
            second = await trio.to_thread.run_sync(connect_h2, port)
            third = await trio.to_thread.run_sync(connect_h2, port)  # admin's third: refused
            assert third.closed and not first.closed and not second.closed
            # 2 open + 1 pending handshake = 3: the next one is over maxConnections.
            with await trio.to_thread.run_sync(abusers.connect, port) as pending:
                over = await trio.to_thread.run_sync(abusers.connect, port)
                with over:
                    await trio.to_thread.run_sync(abusers.wait_all_closed, [over], MARGIN)
                assert not abusers.closed_by_peer(pending)
            # The first two still serve calls.
            for client in (first, second):
                (sid,) = client.open_streams(1)
                client.conn.send_data(sid, b"\0\0\0\0\0", end_stream=True)
                client.flush()
                events = await trio.to_thread.run_sync(client.drain, 2.0)
                assert any(isinstance(e, h2.events.StreamEnded) for e in events), events
                client.tls.close()
            third.tls.close()
