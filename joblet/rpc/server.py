"""The gRPC server: connections from accept to close, and a graceful stop.

:class:`GrpcServer` accepts on its listeners (:mod:`joblet.rpc.listeners`) and runs one
:class:`ConnectionHandler` task per connection: the TLS handshake (:mod:`joblet.rpc.tls`; none on
a Unix socket, whose file mode is the access control), the caller's identity in
:data:`~joblet.rpc.auth.current_peer` (set in the connection's task before any call task is
spawned, so every call of that connection inherits it), then purerpc's framing with our limits
(:mod:`joblet.rpc.transport`) and one task per call (:mod:`joblet.rpc.dispatch`). A closed
connection cancels all of its calls.

Bounded: each limit of ``grpc:`` (connections in all, per client certificate, handshakes per
client address, the handshake and preface timeout, the idle timeout, calls per connection) is
applied here or in :mod:`joblet.rpc.transport`; a connection over a limit is closed at once and
leaves the others alone, and whatever a connection does wrong ends that connection only, in one
log line (``docs/decisions.md``, "the port under abuse").

Drain, don't cut: :meth:`GrpcServer.stop` closes the listeners first, so connecting is refused
from then on; calls in flight get ``drain_timeout`` to finish (new calls on a connection already
open are answered UNAVAILABLE), every connection closes with GOAWAY once its last call has ended,
and whatever is still running at the deadline is cancelled, as hypercorn's ``graceful_timeout``.
Cancelling :meth:`GrpcServer.run` instead stops at once.
"""

from __future__ import annotations

import collections
import errno
import logging
import math
import ssl
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.abc
import attrs
import trio
from anyio.streams.tls import TLSAttribute
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.exceptions import GRPCError

from joblet import logfmt
from joblet.config import GrpcSection
from joblet.rpc import auth, tls
from joblet.rpc.dispatch import Dispatcher, ServiceDef
from joblet.rpc.listeners import (
    UnixSocketListener,
    format_address,
    listener_addresses,
    open_listener,
)
from joblet.rpc.transport import GONE, CallCount, CallStream, PeerProtocolError, ServerSocket

#: How long calls in flight get to finish once the server stops: longer than the node's grace
#: period for its jobs (10 s), so that log streams end with their jobs rather than at the deadline.
DRAIN_TIMEOUT = 15.0
#: accept() errors that mean "out of resources for now": wait and retry, as trio's serve_listeners.
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_RETRY_DELAY = 0.1
#: Least time between two log lines about connections refused for a limit (each says how many).
REFUSAL_LOG_INTERVAL = 10.0


class Admission:
    """Who is connected, against the connection limits of ``grpc:`` (no I/O).

    A connection is counted from its accept to its close (``maxConnections``); while it has
    not completed its TLS handshake, also under its client's address
    (``maxHandshakesPerAddress``); once it has, under its certificate's subject
    (``maxConnectionsPerClient``). Each method that admits returns the limit it would break
    (its config key), or ``""`` having counted the connection.
    """

    def __init__(self, config: GrpcSection) -> None:
        self._config = config
        self.connections = 0
        self._handshaking: collections.Counter[str] = collections.Counter()
        self._clients: collections.Counter[str] = collections.Counter()

    def accepted(self, address: str | None) -> str:
        """A new connection, from ``address`` (None: a Unix socket)."""
        if self.connections >= self._config.max_connections:
            return "maxConnections"
        if address is not None:
            if self._handshaking[address] >= self._config.max_handshakes_per_address:
                return "maxHandshakesPerAddress"
            self._handshaking[address] += 1
        self.connections += 1
        return ""

    def handshake_ended(self, address: str | None) -> None:
        """The connection from ``address`` has completed (or failed) its handshake."""
        if address is not None:
            _decrement(self._handshaking, address)

    def identified(self, client: str) -> str:
        """The connection's client certificate names ``client`` (its subject)."""
        if self._clients[client] >= self._config.max_connections_per_client:
            return "maxConnectionsPerClient"
        self._clients[client] += 1
        return ""

    def closed(self, client: str | None) -> None:
        """An admitted connection has closed (``client``: as identified, if it was)."""
        self.connections -= 1
        if client is not None:
            _decrement(self._clients, client)


def _decrement(counter: collections.Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]  # the counters hold only who is connected now


class _Refusals:
    """Log lines about refused connections: one at most every :data:`REFUSAL_LOG_INTERVAL`."""

    def __init__(self) -> None:
        self._since_logged = 0
        self._last = -math.inf

    def refused(self, limit: str, value: int, remote: str) -> None:
        self._since_logged += 1
        now = trio.current_time()
        if now - self._last >= REFUSAL_LOG_INTERVAL:
            logfmt.warn(
                "connection refused: limit reached",
                limit=limit,
                max=value,
                remote=remote,
                refused=self._since_logged,
            )
            self._since_logged = 0
            self._last = now


class ConnectionHandler:
    """Serves connections: one instance for every connection of a server.

    :meth:`__call__` runs one connection from the accept to its end, within the bounds of
    ``grpc:`` (see :class:`Admission` and :mod:`joblet.rpc.transport`): a connection over a
    limit is closed at once; one that has not completed its TLS handshake and sent the HTTP/2
    preface within ``handshakeTimeout`` is closed; one with no call in flight for
    ``idleTimeout`` is closed with GOAWAY.

    Args:
        services: The services to dispatch to.
        ssl_context: The server's TLS context (see :func:`~joblet.rpc.tls.server_ssl_context`);
            None for a Unix socket, which is served without TLS: its file mode decides who may
            connect, and each client is :func:`~joblet.rpc.auth.local_peer`.
        config: Message size limits, keep-alive, timeouts and connection limits.
    """

    def __init__(
        self,
        services: Sequence[ServiceDef],
        ssl_context: ssl.SSLContext | None,
        config: GrpcSection,
    ) -> None:
        self.dispatcher = Dispatcher(services, config)
        # purerpc checks outgoing messages against this; the dispatcher checks (and words) it first.
        self._purerpc_config = GRPCConfiguration(
            client_side=False, max_message_length=max(config.max_send_msg_size, 1)
        )
        self._ssl_context = ssl_context
        self._grpc = config
        self._draining = trio.Event()
        self._refusals = _Refusals()
        #: The connections open now, by limit.
        self.admission = Admission(config)
        #: Calls in flight on every connection.
        self.calls = 0

    def drain(self) -> None:
        """From now on: new calls are refused, and each connection closes once its calls end."""
        self._draining.set()

    async def __call__(self, raw: anyio.abc.SocketStream) -> None:
        """Serve one connection: admit it, handshake, then its calls until it closes."""
        deadline = trio.current_time() + self._grpc.handshake_timeout
        address: str | None = None  # the client's address, None on a Unix socket
        ctx = self._ssl_context
        if ctx is None:
            remote = auth.unix_peer(raw).remote
        else:
            where = raw.extra(anyio.abc.SocketAttribute.remote_address, "?")
            remote = format_address(where)
            address = str(where[0]) if isinstance(where, tuple) else remote
        refused = self.admission.accepted(address)
        if refused:
            await self._refuse(raw, refused, remote)
            return
        client: str | None = None
        try:
            stream: anyio.abc.ByteStream
            if ctx is None:
                stream, peer = raw, auth.unix_peer(raw)
            else:
                try:
                    handshaken = await tls.server_handshake(raw, remote, ctx, deadline=deadline)
                finally:
                    self.admission.handshake_ended(address)
                if handshaken is None:
                    return
                stream = handshaken
                peer = tls.peer_from_certificate(
                    handshaken.extra(TLSAttribute.peer_certificate_binary, None), remote
                )
                ca_error = tls.ca_validity_error(ctx)
                if ca_error:
                    peer = attrs.evolve(peer, role=None, problem=ca_error, auth_error=ca_error)
                if peer.subject:
                    refused = self.admission.identified(peer.subject)
                    if refused:
                        await self._refuse(stream, refused, remote)
                        return
                    client = peer.subject
            await self._serve(stream, peer, remote, deadline)
        finally:
            self.admission.closed(client)

    async def _refuse(self, stream: anyio.abc.AsyncResource, limit: str, remote: str) -> None:
        value = {
            "maxConnections": self._grpc.max_connections,
            "maxHandshakesPerAddress": self._grpc.max_handshakes_per_address,
            "maxConnectionsPerClient": self._grpc.max_connections_per_client,
        }[limit]
        self._refusals.refused(limit, value, remote)
        with trio.CancelScope(shield=True):
            await anyio.aclose_forcefully(stream)

    async def _serve(
        self, stream: anyio.abc.ByteStream, peer: auth.Peer, remote: str, deadline: float
    ) -> None:
        # Inherited by every call task spawned below: the handlers' view of who is calling.
        auth.current_peer.set(peer)
        logfmt.debug("client connected", remote=remote, client=peer.name, role=peer.role or "-")
        calls = CallCount()
        try:
            # Cancelled to close the connection: the socket's writer task is inside it too.
            with trio.CancelScope() as connection:
                grpc_socket = ServerSocket(
                    self._purerpc_config,
                    stream,
                    max_recv=self._grpc.max_recv_msg_size,
                    keepalive=self._grpc.keep_alive_time,
                    max_streams=self._grpc.max_concurrent_streams,
                    calls=calls,
                )
                async with grpc_socket as sock, trio.open_nursery() as nursery:
                    nursery.start_soon(self._require_preface, sock, deadline, remote, connection)
                    nursery.start_soon(self._close_when_idle, sock, calls, remote, connection)
                    nursery.start_soon(self._close_when_drained, sock, calls, connection)
                    async for call in sock.listen():
                        self.calls += 1
                        nursery.start_soon(self._request_received, call, calls)
                    # The client closed the connection: no answer can reach it any more.
                    connection.cancel()
        except* PeerProtocolError as group:
            logfmt.warn("HTTP/2 protocol error", remote=remote, error=_first_line(group))
        except* GONE as group:
            logfmt.debug("connection lost", remote=remote, error=_first_line(group))
        except* GRPCError as group:
            logfmt.warn("gRPC protocol error", remote=remote, error=_first_line(group))
        except* Exception as group:
            # A bug here: this connection ends, the server carries on. One line at ERROR;
            # the traceback at DEBUG.
            logfmt.error("connection failed", remote=remote, error=_first_line(group))
            logfmt.event(logging.DEBUG, "connection failed", remote=remote, exc_info=True)
        finally:
            with trio.CancelScope(shield=True):
                await anyio.aclose_forcefully(stream)

    async def _request_received(self, call: CallStream, calls: CallCount) -> None:
        try:
            await self.dispatcher.serve(call, refuse=self._draining.is_set())
        finally:
            calls.end()
            self.calls -= 1

    async def _require_preface(
        self, sock: ServerSocket, deadline: float, remote: str, connection: trio.CancelScope
    ) -> None:
        with trio.move_on_at(deadline):
            await sock.preface.wait()
            return
        logfmt.warn("HTTP/2 preface timed out", remote=remote)
        connection.cancel()

    async def _close_when_idle(
        self, sock: ServerSocket, calls: CallCount, remote: str, connection: trio.CancelScope
    ) -> None:
        while True:
            await calls.wait_none()
            with trio.move_on_after(self._grpc.idle_timeout) as idle:
                await calls.wait_changed()
            if idle.cancelled_caught and not calls.count:
                break
        logfmt.debug("idle connection closed", remote=remote)
        await sock.go_away()
        connection.cancel()

    async def _close_when_drained(
        self, sock: ServerSocket, calls: CallCount, connection: trio.CancelScope
    ) -> None:
        await self._draining.wait()
        await calls.wait_none()
        await sock.go_away()
        connection.cancel()  # its GOAWAY sent (or not read within GOAWAY_TIMEOUT)


class GrpcServer:
    """The gRPC server as a long-lived actor.

    Example::

        server = GrpcServer([ServiceDef.bind(...)], ssl_context, config.grpc)
        addresses = await nursery.start(server.run)
        ...
        server.stop()  # run() returns once drained

    Args:
        services: What to serve.
        ssl_context: TLS settings (see :func:`~joblet.rpc.tls.server_ssl_context`); None only
            with a Unix socket listener (see :class:`ConnectionHandler`).
        config: Address, port, message size limits, keep-alive, timeouts, connection limits.
        listener: An already bound listener (see :func:`~joblet.rpc.listeners.open_listener` and
            :func:`~joblet.rpc.listeners.open_unix_listener`), so a bind failure can surface
            before the caller starts anything else; by default :meth:`run` binds ``config``'s
            address and port. :meth:`run` closes it when it ends.
        name: What the server is called in log lines.
        drain_timeout: How long calls in flight get to finish after :meth:`stop`.
    """

    def __init__(
        self,
        services: Sequence[ServiceDef],
        ssl_context: ssl.SSLContext | None,
        config: GrpcSection,
        *,
        listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = None,
        name: str = "gRPC server",
        drain_timeout: float = DRAIN_TIMEOUT,
    ) -> None:
        if ssl_context is None and not isinstance(listener, UnixSocketListener):
            raise ValueError("a gRPC server without TLS may only listen on a Unix socket")
        self._handler = ConnectionHandler(services, ssl_context, config)
        self._config = config
        self._listener = listener
        self._name = name
        self._drain_timeout = drain_timeout
        self._stop = trio.Event()

    def stop(self) -> None:
        """Stop gracefully: close the listeners now, give calls in flight ``drain_timeout``.

        Returns at once; :meth:`run` returns when the last connection has closed, or at the
        deadline, having cancelled what was left. Idempotent.
        """
        self._stop.set()

    async def run(
        self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until :meth:`stop` (then drain) or cancelled (then stop at once).

        ``started()`` reports the listening addresses once they listen.

        Raises:
            OSError: The address cannot be bound (only if no listener was given).
        """
        listener = self._listener
        if listener is None:
            listener = await open_listener(self._config.address, self._config.port)
        addresses = listener_addresses(listener)
        label = ",".join(addresses)
        try:
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    for part in getattr(listener, "listeners", [listener]):
                        accepting.start_soon(self._accept_loop, part, connections)
                    logfmt.info(f"{self._name} listening", address=label)
                    task_status.started(addresses)
                    await self._stop.wait()
                    accepting.cancel_scope.cancel()
                await listener.aclose()  # first: from here on, connecting is refused
                logfmt.info(
                    f"{self._name} draining",
                    address=label,
                    calls=self._handler.calls,
                    timeout=f"{self._drain_timeout:g}s",
                )
                self._handler.drain()
                connections.cancel_scope.deadline = trio.current_time() + self._drain_timeout
            if connections.cancel_scope.cancelled_caught:
                logfmt.warn(
                    f"{self._name} drain deadline passed: calls still running were cancelled",
                    address=label,
                )
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
            logfmt.info(f"{self._name} stopped", address=label)

    async def _accept_loop(self, listener: anyio.abc.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except anyio.BrokenResourceError as exc:
                cause = exc.__cause__
                if isinstance(cause, OSError) and cause.errno in _ACCEPT_CAPACITY_ERRNOS:
                    logfmt.warn("cannot accept connections for now", error=str(cause))
                    await trio.sleep(_ACCEPT_RETRY_DELAY)
                    continue
                raise
            nursery.start_soon(self._handler, stream)


def _first_line(group: BaseExceptionGroup[Any]) -> str:
    first = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return f"{type(first).__name__}: {first}".splitlines()[0]
