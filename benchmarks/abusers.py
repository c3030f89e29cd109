"""Abusive clients of the gRPC port, for ``tests/security/test_port_abuse.py`` and
``benchmarks/port_abuse.py``: raw sockets, ``ssl`` and ``h2`` doing what a well-behaved client
never does. Each is synchronous (a thread each, or the caller's own), bounded in count and time,
and talks to loopback only.

An abuser connects from its own loopback address (:data:`ABUSER_ADDRESS`, in 127/8 like the
daemon's 127.0.0.1), so that limits per client address keep the abuse apart from the well-behaved
client, as they would for two hosts.
"""

from __future__ import annotations

import os
import selectors
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import h2.config  # type: ignore[import-untyped]
import h2.connection  # type: ignore[import-untyped]
import h2.events  # type: ignore[import-untyped]
import h2.exceptions  # type: ignore[import-untyped]
import h2.settings  # type: ignore[import-untyped]

#: The address abusers connect from.
ABUSER_ADDRESS = "127.0.0.2"
#: A gRPC call's request headers (ListJobs, which a viewer or admin may call).
CALL_HEADERS = [
    (":method", "POST"),
    (":scheme", "https"),
    (":path", "/joblet.JobService/ListJobs"),
    (":authority", "localhost"),
    ("te", "trailers"),
    ("content-type", "application/grpc"),
]


def connect(port: int, *, source: str = ABUSER_ADDRESS, timeout: float = 10.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:``port`` from ``source``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """A client TLS context with ``cert``, trusting ``ca``, offering h2."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def tls_connect(
    port: int, ctx: ssl.SSLContext, *, source: str = ABUSER_ADDRESS, timeout: float = 10.0
) -> ssl.SSLSocket:
    """A completed TLS connection to the daemon (``localhost``'s certificate)."""
    raw = connect(port, source=source, timeout=timeout)
    try:
        return ctx.wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise


@contextmanager
def many_connections(port: int, n: int, *, payload: bytes = b"") -> Iterator[list[socket.socket]]:
    """``n`` TCP connections that send ``payload`` (nothing by default) and then nothing more.

    Connections the server refuses or resets while they are being opened are kept as they are
    (closed on the server's side): :func:`wait_all_closed` sees their EOF.
    """
    with ExitStack() as stack:
        socks: list[socket.socket] = []
        for _ in range(n):
            sock = stack.enter_context(connect(port))
            socks.append(sock)
            if payload:
                try:
                    sock.sendall(payload)
                except OSError:
                    pass
        yield socks


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (EOF or reset), without blocking."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return False
    except OSError:
        return True


def wait_all_closed(socks: list[socket.socket], timeout: float) -> float:
    """Wait until the server has closed every socket of ``socks``; the seconds it took.

    Raises:
        TimeoutError: Some are still open after ``timeout`` seconds.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    open_ = [s for s in socks if not closed_by_peer(s)]
    with selectors.DefaultSelector() as sel:
        for s in open_:
            sel.register(s, selectors.EVENT_READ)
        remaining = len(open_)
        while remaining:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{remaining} of {len(socks)} connections still open")
            for key, _ in sel.select(left):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if closed_by_peer(sock):
                    sel.unregister(sock)
                    remaining -= 1
    return time.monotonic() - t0


def random_bytes(n: int, seed: int) -> bytes:
    """``n`` pseudo-random bytes (reproducible from ``seed``), never starting a TLS record."""
    out = bytearray(n)
    x = seed or 1
    for i in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) & (2**64 - 1)
        out[i] = x >> 56
    if out and out[0] == 0x16:
        out[0] = 0x17
    return bytes(out)


class H2Client:
    """An HTTP/2 client over a completed TLS connection, doing as told (and nothing else).

    It never reads unless asked: :meth:`drain` reads what the server sent, without blocking
    for long.
    """

    def __init__(self, tls: ssl.SSLSocket, *, settings: dict[int, int] | None = None) -> None:
        self.tls = tls
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.conn.local_settings = h2.settings.Settings(client=True, initial_values=settings or {})
        self.events: list[object] = []
        self.closed = False
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        """Send what h2 has queued (nothing once the server has closed the connection)."""
        data = self.conn.data_to_send()
        if data and not self.closed:
            try:
                self.tls.sendall(data)
            except OSError:
                self.closed = True

    def drain(self, timeout: float = 0.2) -> list[object]:
        """Read and process what the server has sent within ``timeout``; the new events."""
        new: list[object] = []
        self.tls.settimeout(timeout)
        try:
            while True:
                data = self.tls.recv(65536)
                if not data:
                    self.closed = True
                    break
                try:
                    new += self.conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    pass
                self.flush()
        except (TimeoutError, ssl.SSLWantReadError):
            pass
        except OSError:
            self.closed = True
        self.events += new
        return new

    def open_streams(self, n: int) -> list[int]:
        """Open ``n`` calls (headers only, the request never sent), ignoring the server's
        MAX_CONCURRENT_STREAMS; their stream ids."""
        # h2 would refuse to open more than the server allows: tell it the server allows all.
        self.conn.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 2**31 - 1
        ids = []
        for _ in range(n):
            if self.closed:
                break
            sid = self.conn.get_next_available_stream_id()
            try:
                self.conn.send_headers(sid, CALL_HEADERS)
            except h2.exceptions.ProtocolError:  # the server sent GOAWAY
                self.closed = True
                break
            ids.append(sid)
        self.flush()
        return ids

    def rapid_reset(self, n: int) -> None:
        """Open ``n`` calls, each reset as soon as it is opened (CVE-2023-44487)."""
        self.conn.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 2**31 - 1
        for _ in range(n):
            if self.closed:
                break
            sid = self.conn.get_next_available_stream_id()
            try:
                self.conn.send_headers(sid, CALL_HEADERS)
                self.conn.send_data(sid, b"\0\0\0\0\0")  # an empty request message
                self.conn.reset_stream(sid, 8)  # CANCEL
            except h2.exceptions.ProtocolError:
                self.closed = True
                break
        self.flush()

    def refused(self) -> int:
        """How many of its streams the server reset with REFUSED_STREAM."""
        return sum(
            1 for e in self.events if isinstance(e, h2.events.StreamReset) and e.error_code == 7
        )

    def went_away(self) -> bool:
        """Whether the server sent GOAWAY."""
        return any(isinstance(e, h2.events.ConnectionTerminated) for e in self.events)


def raw_frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """One HTTP/2 frame as bytes, whatever it says."""
    return (
        len(payload).to_bytes(3, "big")
        + bytes([kind, flags])
        + stream_id.to_bytes(4, "big")
        + payload
    )


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = raw_frame(0x4, 0, 0, b"")
PING = raw_frame(0x6, 0, 0, os.urandom(8))
