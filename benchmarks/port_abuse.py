"""The gRPC port under abuse: a well-behaved client's latency during each abuse, next to none.

A real ``joblet serve`` (``tests/daemon.py``) with short timeouts; for each abuse of
:mod:`benchmarks.abusers`, while it goes on: ListJobs on a channel opened before (p50/p99), and
ListJobs on a fresh channel (connect, TLS, call), next to the same without abuse measured in
the same run; the daemon's peak RSS; how long until the server closed every abusive connection.
Run as root: ``python -m benchmarks.port_abuse [--calls 50]``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import grpc

from benchmarks import abusers
from joblet.certs import CertPaths
from joblet.protocol import joblet_pb2 as pb
from joblet.protocol import joblet_pb2_grpc as pb_grpc

#: Timeouts of the daemon under test: short, so that a whole run takes a minute.
CONFIG = {"grpc": {"handshakeTimeout": "2s", "idleTimeout": "5s"}}
CALL_TIMEOUT = 30.0


def rss_kib(pid: int) -> int:
    """A process's resident set, KiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def channel(port: int, certs: CertPaths) -> grpc.Channel:
    """A grpcio channel with the admin certificate."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=certs.ca_cert.read_bytes(),
        private_key=certs.admin_key.read_bytes(),
        certificate_chain=certs.admin_cert.read_bytes(),
    )
    return grpc.secure_channel(f"localhost:{port}", creds)


def good_client(port: int, certs: CertPaths, calls: int) -> tuple[list[float], list[float]]:
    """Latencies (ms) of ``calls`` ListJobs on one open channel, and of a few on fresh ones."""
    warm: list[float] = []
    fresh: list[float] = []
    with channel(port, certs) as ch:
        stub = pb_grpc.JobServiceStub(ch)  # type: ignore[no-untyped-call]
        stub.ListJobs(pb.EmptyRequest(), timeout=CALL_TIMEOUT)
        for _ in range(calls):
            t0 = time.perf_counter()
            stub.ListJobs(pb.EmptyRequest(), timeout=CALL_TIMEOUT)
            warm.append((time.perf_counter() - t0) * 1000)
    for _ in range(max(3, calls // 10)):
        t0 = time.perf_counter()
        with channel(port, certs) as ch:
            stub = pb_grpc.JobServiceStub(ch)  # type: ignore[no-untyped-call]
            stub.ListJobs(pb.EmptyRequest(), timeout=CALL_TIMEOUT)
        fresh.append((time.perf_counter() - t0) * 1000)
    return warm, fresh


def p99(values: list[float]) -> float:
    """The 99th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


@contextmanager
def rss_peak(pid: int) -> Iterator[list[int]]:
    """Sample ``pid``'s RSS every 50 ms while the block runs; yields [start, peak] (KiB)."""
    out = [rss_kib(pid), rss_kib(pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            try:
                out[1] = max(out[1], rss_kib(pid))
            except (OSError, RuntimeError):
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()


# --- the abuses: each a context manager that holds the abuse up while the good client runs -----


@contextmanager
def idle_tcp(port: int, certs: CertPaths) -> Iterator[list[Any]]:
    """2,000 TCP connections that never send a byte."""
    with abusers.many_connections(port, 2000) as socks:
        yield list(socks)


@contextmanager
def random_bytes(port: int, certs: CertPaths) -> Iterator[list[Any]]:
    """500 connections sending 4 KiB of random bytes instead of a ClientHello."""
    with abusers.many_connections(port, 500, payload=abusers.random_bytes(4096, 1)) as socks:
        yield list(socks)


def _tls(port: int, certs: CertPaths) -> Any:
    ctx = abusers.client_context(certs.ca_cert, certs.admin_cert, certs.admin_key)
    return abusers.tls_connect(port, ctx)


@contextmanager
def tls_no_preface(port: int, certs: CertPaths) -> Iterator[list[Any]]:
    """50 TLS connections (a valid certificate) that never send the HTTP/2 preface."""
    socks = [_tls(port, certs) for _ in range(50)]
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


@contextmanager
def tls_garbage(port: int, certs: CertPaths) -> Iterator[list[Any]]:
    """50 TLS connections sending garbage instead of HTTP/2, 50 sending an invalid frame."""
    socks = []
    try:
        for i in range(100):
            s = _tls(port, certs)
            socks.append(s)
            if i % 2:
                s.sendall(abusers.random_bytes(2048, i))
            else:  # a DATA frame on stream 0: a connection error
                s.sendall(
                    abusers.PREFACE
                    + abusers.EMPTY_SETTINGS
                    + abusers.raw_frame(0x0, 0, 0, b"x" * 10)
                )
        yield socks
    finally:
        for s in socks:
            s.close()


@contextmanager
def many_streams(port: int, certs: CertPaths) -> Iterator[list[Any]]:
    """One connection opening 5,000 calls whose requests never come."""
    tls = _tls(port, certs)
    try:
        client = abusers.H2Client(tls)
        for _ in range(100):
            client.open_streams(50)
            client.drain(0.01)
        print(f"    (5000 streams: {client.refused()} refused, GOAWAY: {client.went_away()})")
        yield [tls]
    finally:
        tls.close()


@contextmanager
def rapid_reset(port: int, certs: CertPaths) -> Iterator[list[Any]]:
    """One connection opening and at once resetting 20,000 calls."""
    tls = _tls(port, certs)
    try:
        client = abusers.H2Client(tls)
        for _ in range(40):
            client.rapid_reset(500)
            client.drain(0.01)
        print(
            f"    (rapid reset: {client.refused()} streams refused, GOAWAY: {client.went_away()})"
        )
        yield [tls]
    finally:
        tls.close()


@contextmanager
def ping_flood(port: int, certs: CertPaths) -> Iterator[list[Any]]:
    """One connection sending 64 MiB of PINGs and never reading the acks."""
    tls = _tls(port, certs)
    sent = [0]
    stop = threading.Event()

    def flood() -> None:
        tls.sendall(abusers.PREFACE + abusers.EMPTY_SETTINGS)
        chunk = abusers.PING * 4000
        try:
            while not stop.is_set() and sent[0] < 64 << 20:
                tls.sendall(chunk)
                sent[0] += len(chunk)
        except OSError:
            pass

    tls.settimeout(10)
    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        time.sleep(2)  # the flood gets going before the good client measures
        yield [tls]
    finally:
        stop.set()
        thread.join(15)
        print(f"    (ping flood: {sent[0] >> 20} MiB of PINGs sent)")
        tls.close()


@contextmanager
def settings_flood(port: int, certs: CertPaths) -> Iterator[list[Any]]:
    """One connection sending SETTINGS frames for 5 s, never reading the acks."""
    tls = _tls(port, certs)
    tls.settimeout(5)
    sent = 0
    try:
        tls.sendall(abusers.PREFACE + abusers.EMPTY_SETTINGS)
        chunk = abusers.EMPTY_SETTINGS * 7000
        while sent < 256 << 20:
            tls.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass
    print(f"    (SETTINGS flood: {sent >> 20} MiB sent before the server stopped reading)")
    try:
        yield [tls]
    finally:
        tls.close()


@contextmanager
def big_frame_trickle(port: int, certs: CertPaths) -> Iterator[list[Any]]:
    """50 connections each announcing a 16 MiB frame and sending 1 MiB of it."""
    socks = []
    try:
        for _ in range(50):
            s = _tls(port, certs)
            socks.append(s)
            head = (2**24 - 1).to_bytes(3, "big") + bytes([0x0, 0]) + (1).to_bytes(4, "big")
            try:
                s.sendall(abusers.PREFACE + abusers.EMPTY_SETTINGS + head + b"\0" * (1 << 20))
            except OSError:
                pass
        yield socks
    finally:
        for s in socks:
            s.close()


ABUSES: dict[str, Callable[[int, CertPaths], AbstractContextManager[list[Any]]]] = {
    "2000 idle TCP connections": idle_tcp,
    "500 random-byte ClientHellos": random_bytes,
    "50 TLS connections, no preface": tls_no_preface,
    "100 TLS connections, garbage": tls_garbage,
    "1 connection, 5000 streams": many_streams,
    "1 connection, 20000 rapid resets": rapid_reset,
    "PING flood, acks never read": ping_flood,
    "SETTINGS flood, acks never read": settings_flood,
    "50 x 16 MiB frame, 1 MiB sent": big_frame_trickle,
}


def main() -> None:
    """Run every abuse against one daemon; print a table."""
    from tests.daemon import running_daemon

    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--only", default="")
    parser.add_argument("--no-config", action="store_true", help="the daemon's defaults")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 10000)), hard))
    with running_daemon(None if args.no_config else CONFIG) as daemon:
        certs, port, pid = daemon.certs, daemon.port, daemon.process.pid
        warm, fresh = good_client(port, certs, args.calls)
        print(
            f"{'abuse':34} {'open ch p50/p99 ms':>20} {'new ch p50 ms':>14} "
            f"{'RSS start/peak MiB':>19} {'closed after s':>15}"
        )

        def show(
            name: str, warm: list[float], fresh: list[float], rss: list[int], closed: str
        ) -> None:
            print(
                f"{name:34} {statistics.median(warm):9.1f}/{p99(warm):<9.1f} "
                f"{statistics.median(fresh):14.1f} {rss[0] / 1024:9.0f}/{rss[1] / 1024:<9.0f} "
                f"{closed:>15}",
                flush=True,
            )

        show("none (baseline)", warm, fresh, [rss_kib(pid)] * 2, "-")
        for name, abuse in ABUSES.items():
            if args.only and args.only not in name:
                continue
            with rss_peak(pid) as rss:
                try:
                    t0 = time.monotonic()
                    with abuse(port, certs) as socks:
                        warm, fresh = good_client(port, certs, args.calls)
                        try:
                            abusers.wait_all_closed(socks, 30)
                            closed = f"{time.monotonic() - t0:.1f}"
                        except TimeoutError as exc:
                            closed = f"no: {exc}"[:40]
                except grpc.RpcError as exc:
                    print(f"{name:34} good client failed: {exc.code()} {exc.details()}")
                    continue
            show(name, warm, fresh, rss, closed)
        warm, fresh = good_client(port, certs, args.calls)
        show("none (after)", warm, fresh, [rss_kib(pid)] * 2, "-")


if __name__ == "__main__":
    main()
