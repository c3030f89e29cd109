"""``joblet.persist.PersistService``: historical queries over the logs and metrics on disk.

The spec's Persist Service (``proto/persist.proto``). It reads what the daemon has written, never
what is only in memory:

- ``QueryLogs`` reads ``<state>/logs/<job_id>/`` (:mod:`joblet.store.loglines`) and answers with
  the job's lines, each stamped with the time its first byte was read from the job. It works on a
  running job too: the answer is the log as far as it was on disk when the call started. The log
  is read a step at a time in a worker thread, so neither a 100 MB log nor a slow client makes
  the daemon hold more than a few MB for the call.
- ``QueryMetrics`` reads ``<state>/metrics/<job_id>/metrics.jsonl.gz``
  (:mod:`joblet.store.metricfiles`).

A job is named by its id or a unique prefix of it, among the jobs the engine knows and the jobs
with files on disk (a job of an earlier run whose record is gone still has its files until
retention removes them).

Where it listens (:class:`PersistServer`): on a Unix socket, ``persist.server.grpc_socket``
(``<state>/run/persist-grpc.sock``), created with mode 0600, so only the daemon's user can connect,
and whoever can connect may query any job (the socket's file mode is the access control: no TLS,
no roles); and, with ``persist.server.tls.enabled``, on TCP with the main service's mutual TLS and
roles (viewer and admin may query).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import anyio.abc
import attrs
import trio

from joblet import logfmt
from joblet.config import Config
from joblet.core.chunks import STDERR, STDOUT, STREAMS
from joblet.core.errors import InvalidRequest
from joblet.core.ids import is_job_id, resolve_prefix
from joblet.core.lines import LineQuery, Lines
from joblet.protocol import persist_grpc
from joblet.rpc.dispatch import Handler, Send, ServiceDef
from joblet.rpc.listeners import UnixSocketListener, open_listener, open_unix_listener
from joblet.rpc.persist_codec import EncodedMessage, encode_log_responses, metric_messages
from joblet.rpc.server import GrpcServer
from joblet.store.logfiles import job_log_dir
from joblet.store.loglines import LogLineReader
from joblet.store.metricfiles import metrics_path, read_metric_records

#: Metric types ``QueryMetrics`` accepts as a filter: the spec's four and the ones joblet samples.
METRIC_TYPES: tuple[str, ...] = ("cpu", "memory", "io", "gpu", "network", "process")
#: Stream names ``QueryLogs`` accepts as a filter (empty = both).
STREAMS_BY_NAME: dict[str, int] = {"stdout": STDOUT, "stderr": STDERR}
#: Bytes per ``QueryLogsResponse`` (about): large messages stream fastest.
MESSAGE_BYTES = 64 << 10
#: Unix socket mode: the daemon's user (root) only.
SOCKET_MODE = 0o600
#: Reader steps (about 1 MB of log each) one worker thread call may take to find lines.
_STEPS_PER_CALL = 16
#: Room left in a message for framing a line's piece (entry tag, lengths, timestamp, stream).
_ENTRY_OVERHEAD = 64
_NS = 1_000_000_000
#: Longest file name (Linux NAME_MAX, bytes; a job id is ASCII).
_NAME_MAX = 255


class PersistService:
    """The implementation of ``joblet.persist.PersistService``.

    Args:
        logs_dir: ``<state>/logs``.
        metrics_dir: ``<state>/metrics``.
        known_jobs: Ids of the jobs the engine knows (called on the event loop), so that a job
            with no file yet is found; files on disk are found without it.
        max_send_msg_size: Largest message the server sends (``grpc.maxSendMsgSize``).
    """

    def __init__(
        self,
        logs_dir: Path,
        metrics_dir: Path,
        *,
        known_jobs: Callable[[], Iterable[str]] | None = None,
        max_send_msg_size: int = 4 << 20,
    ) -> None:
        self._logs_dir = logs_dir
        self._metrics_dir = metrics_dir
        self._known_jobs = known_jobs or (lambda: ())
        # The longest piece of a line one LogEntry carries, so that any entry fits a message.
        self._piece = max(4, max_send_msg_size - _ENTRY_OVERHEAD)
        self._target = min(MESSAGE_BYTES, max_send_msg_size)

    def definition(self) -> ServiceDef:
        """The service as :class:`~joblet.rpc.server.GrpcServer` serves it."""
        return ServiceDef.bind(persist_grpc.PersistServiceServicer(), self.handlers())

    def handlers(self) -> dict[str, Handler]:
        """The RPCs by name."""
        return {"QueryLogs": self.query_logs, "QueryMetrics": self.query_metrics}

    async def query_logs(self, req: Any, send: Send) -> None:
        """QueryLogs: the job's lines, in batches of entries.

        Raises:
            InvalidRequest: A bad stream, time window or limit.
            JobNotFound: No such job.
        """
        stream = req.stream
        if stream and stream not in STREAMS_BY_NAME:
            raise InvalidRequest(f"invalid stream: {stream!r} (must be stdout, stderr or empty)")
        start_ns, end_ns = _window(req.start_time, req.end_time)
        limit = _limit(req.limit)
        job_id = await self._resolve(req.job_id)
        query = LineQuery(
            streams=frozenset({STREAMS_BY_NAME[stream]}) if stream else frozenset(STREAMS),
            start_ns=start_ns,
            end_ns=end_ns,
            limit=limit,
        )
        reader = LogLineReader(job_log_dir(self._logs_dir, job_id), query)
        while not reader.done:
            # Read, split and encode in the worker thread; the event loop only sends.
            messages = await trio.to_thread.run_sync(self._next_log_messages, reader)
            for message in messages:
                await send(message)

    async def query_metrics(self, req: Any, send: Send) -> None:
        """QueryMetrics: the job's samples, in batches.

        Raises:
            InvalidRequest: A bad metric type, time window or limit.
            JobNotFound: No such job.
        """
        metric_type = req.metric_type
        if metric_type and metric_type not in METRIC_TYPES:
            raise InvalidRequest(
                f"invalid metric_type: {metric_type!r} "
                f"(must be one of {', '.join(METRIC_TYPES)} or empty)"
            )
        start_ns, end_ns = _window(req.start_time, req.end_time)
        limit = _limit(req.limit)
        job_id = await self._resolve(req.job_id)
        path = metrics_path(self._metrics_dir, job_id)
        low = start_ns if start_ns is not None else -(1 << 64)
        high = end_ns if end_ns is not None else 1 << 64

        def select() -> list[Any]:
            """The answer's messages (in the worker thread: a long job has many samples)."""
            picked = [
                r
                for r in read_metric_records(path)
                if (not metric_type or r.metric_type == metric_type)
                and low <= r.timestamp_ns < high
            ]
            return metric_messages(picked[:limit] if limit else picked)

        for message in await trio.to_thread.run_sync(select):
            await send(message)

    # --- internals ------------------------------------------------------------------------------

    async def _resolve(self, ref: str) -> str:
        """The id of the job ``ref`` names (its id or a unique prefix of it)."""
        if not ref:
            raise InvalidRequest("job_id is required")
        known = set(self._known_jobs())
        return await trio.to_thread.run_sync(self._resolve_sync, ref, known)

    def _resolve_sync(self, ref: str, known: set[str]) -> str:
        # A whole id whose directory exists needs no listing of the directories (and only a
        # job id that fits a file name may be joined to them as a path: a longer one is no
        # directory's, and stat() refuses it with ENAMETOOLONG).
        if is_job_id(ref) and (
            ref in known
            or (
                len(ref) <= _NAME_MAX
                and ((self._logs_dir / ref).is_dir() or (self._metrics_dir / ref).is_dir())
            )
        ):
            return ref
        candidates = known | _entries(self._logs_dir) | _entries(self._metrics_dir)
        return resolve_prefix(ref, candidates)

    def _next_log_messages(self, reader: LogLineReader) -> list[EncodedMessage]:
        """The next step of a QueryLogs answer as messages (in the worker thread)."""
        groups: list[Lines] = []
        # A window whose lines are far apart may need several steps; a bounded number per call,
        # so a cancelled call (the client went away) waits for at most that.
        for _ in range(_STEPS_PER_CALL):
            if groups or reader.done:
                break
            groups = reader.next_batch()
        return (
            encode_log_responses(groups, target=self._target, piece=self._piece) if groups else []
        )


def _entries(directory: Path) -> set[str]:
    try:
        return set(os.listdir(directory))
    except FileNotFoundError:
        return set()


def _window(start_time: int, end_time: int) -> tuple[int | None, int | None]:
    """A request's time window in ns: [start, end + 1 s), None for an unbounded side.

    Raises:
        InvalidRequest: A negative time, or an end before the start.
    """
    if start_time < 0:
        raise InvalidRequest(f"invalid start_time: {start_time} (Unix seconds, 0 = unbounded)")
    if end_time < 0:
        raise InvalidRequest(f"invalid end_time: {end_time} (Unix seconds, 0 = unbounded)")
    if start_time and end_time and end_time < start_time:
        raise InvalidRequest(f"invalid time window: end_time {end_time} < start_time {start_time}")
    # Whole seconds: a line at 10:00:00.5 is in a window ending at 10:00:00.
    return (start_time * _NS if start_time else None, (end_time + 1) * _NS if end_time else None)


def _limit(limit: int) -> int:
    if limit < 0:
        raise InvalidRequest(f"invalid limit: {limit} (0 = no limit)")
    return limit


# --- the servers ----------------------------------------------------------------------------------


def socket_path(config: Config) -> Path:
    """The Unix socket's path (``persist.server.grpc_socket``, relative to the state directory)."""
    return config.layout.persist_socket


@attrs.define
class PersistListeners:
    """The Persist Service's bound sockets (see :func:`open_persist_listeners`); closing them
    removes the Unix socket file.

    Attributes:
        unix: The Unix socket.
        tcp: The TCP listener, with ``persist.server.tls.enabled``.
    """

    unix: UnixSocketListener
    tcp: anyio.abc.Listener[anyio.abc.SocketStream] | None = None

    async def aclose(self) -> None:
        """Close both (idempotent)."""
        with trio.CancelScope(shield=True):
            try:
                await self.unix.aclose()
            finally:
                if self.tcp is not None:
                    await self.tcp.aclose()

    async def __aenter__(self) -> PersistListeners:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def open_persist_listeners(config: Config) -> PersistListeners:
    """Bind the Persist Service's Unix socket and, with TLS enabled, its TCP port.

    Raises:
        OSError: A socket cannot be bound (the message names it).
    """
    path = socket_path(config)
    try:
        unix = await open_unix_listener(path, SOCKET_MODE)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {path}: {exc.strerror or exc}") from exc
    server = config.persist.server
    if not server.tls.enabled:
        return PersistListeners(unix)
    try:
        tcp = await open_listener(server.tcp_address, server.tcp_port)
    except OSError as exc:
        await unix.aclose()
        raise OSError(
            exc.errno,
            f"cannot listen on {server.tcp_address}:{server.tcp_port}: {exc.strerror or exc}",
        ) from exc
    return PersistListeners(unix, tcp)


class PersistServer:
    """The Persist Service on its listeners, as a long-lived actor.

    Example::

        async with await open_persist_listeners(config) as listeners:
            server = PersistServer(service, listeners, ssl_context, config)
            await nursery.start(server.run)

    Args:
        service: What to serve.
        listeners: Bound by :func:`open_persist_listeners`; :meth:`run` closes them when it ends.
        ssl_context: The main server's TLS context, for the TCP listener.
        config: Message size limits and keep-alive (``grpc``), addresses (``persist.server``).
    """

    def __init__(
        self,
        service: PersistService,
        listeners: PersistListeners,
        ssl_context: ssl.SSLContext | None,
        config: Config,
    ) -> None:
        definition = service.definition()
        self._servers = [
            GrpcServer(
                [definition],
                None,
                config.grpc,
                listener=listeners.unix,
                name="persist gRPC server (unix)",
            )
        ]
        if listeners.tcp is not None:
            if ssl_context is None:
                raise ValueError("the persist TCP listener needs a TLS context")
            self._servers.append(
                GrpcServer(
                    [definition],
                    ssl_context,
                    config.grpc,
                    listener=listeners.tcp,
                    name="persist gRPC server (tls)",
                )
            )
        self._listeners = listeners

    def stop(self) -> None:
        """Stop gracefully: close the listeners, drain (see :meth:`GrpcServer.stop`)."""
        for server in self._servers:
            server.stop()

    async def run(
        self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until :meth:`stop` (then drain) or cancelled; ``started()`` reports every
        listening address."""
        try:
            async with trio.open_nursery() as nursery:
                addresses: list[str] = []
                for server in self._servers:
                    addresses += await nursery.start(server.run)
                task_status.started(addresses)
        finally:
            await self._listeners.aclose()
            logfmt.debug("persist service stopped")
