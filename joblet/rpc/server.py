"""The gRPC server: connections from accept to close, and a graceful stop.

:class:`GrpcServer` accepts on its listeners (:mod:`joblet.rpc.listeners`) and runs one
:class:`ConnectionHandler` task per connection: the TLS handshake (:mod:`joblet.rpc.tls`; none on
a Unix socket, whose file mode is the access control), the caller's identity in
:data:`~joblet.rpc.auth.current_peer` (set in the connection's task before any call task is
spawned, so every call of that connection inherits it), then purerpc's framing with our limits
(:mod:`joblet.rpc.transport`) and one task per call (:mod:`joblet.rpc.dispatch`). A closed
connection cancels all of its calls.

Drain, don't cut: :meth:`GrpcServer.stop` closes the listeners first, so connecting is refused
from then on; calls in flight get ``drain_timeout`` to finish (new calls on a connection already
open are answered UNAVAILABLE), every connection closes with GOAWAY once its last call has ended,
and whatever is still running at the deadline is cancelled, as hypercorn's ``graceful_timeout``.
Cancelling :meth:`GrpcServer.run` instead stops at once.
"""

from __future__ import annotations

import errno
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
from joblet.rpc.transport import GONE, CallStream, ServerSocket

#: How long calls in flight get to finish once the server stops: longer than the node's grace
#: period for its jobs (10 s), so that log streams end with their jobs rather than at the deadline.
DRAIN_TIMEOUT = 15.0
#: accept() errors that mean "out of resources for now": wait and retry, as trio's serve_listeners.
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_RETRY_DELAY = 0.1


@attrs.define
class _Calls:
    """The calls in flight on one connection."""

    count: int = 0
    _none_left: trio.Event = attrs.field(factory=trio.Event)

    def begin(self) -> None:
        self.count += 1

    def end(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._none_left.set()

    async def wait_none(self) -> None:
        """Return once no call is in flight."""
        while self.count:
            self._none_left = trio.Event()
            await self._none_left.wait()


class ConnectionHandler:
    """Serves connections: one instance for every connection of a server.

    :meth:`__call__` runs one connection from the accept to its end.

    Args:
        services: The services to dispatch to.
        ssl_context: The server's TLS context (see :func:`~joblet.rpc.tls.server_ssl_context`);
            None for a Unix socket, which is served without TLS: its file mode decides who may
            connect, and each client is :func:`~joblet.rpc.auth.local_peer`.
        config: Message size limits and keep-alive.
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
        #: Calls in flight on every connection.
        self.calls = 0

    def drain(self) -> None:
        """From now on: new calls are refused, and each connection closes once its calls end."""
        self._draining.set()

    async def __call__(self, raw: anyio.abc.SocketStream) -> None:
        """Serve one connection: handshake, then its calls until it closes."""
        stream: anyio.abc.ByteStream
        if self._ssl_context is None:
            stream = raw
            peer = auth.unix_peer(raw)
            remote = peer.remote
        else:
            remote = format_address(raw.extra(anyio.abc.SocketAttribute.remote_address, "?"))
            handshaken = await tls.server_handshake(raw, remote, self._ssl_context)
            if handshaken is None:
                return
            stream = handshaken
            peer = tls.peer_from_certificate(
                handshaken.extra(TLSAttribute.peer_certificate_binary, None), remote
            )
            ca_error = tls.ca_validity_error(self._ssl_context)
            if ca_error:
                peer = attrs.evolve(peer, role=None, problem=ca_error, auth_error=ca_error)
        # Inherited by every call task spawned below: the handlers' view of who is calling.
        auth.current_peer.set(peer)
        logfmt.debug("client connected", remote=remote, client=peer.name, role=peer.role or "-")
        try:
            grpc_socket = ServerSocket(
                self._purerpc_config,
                stream,
                max_recv=self._grpc.max_recv_msg_size,
                keepalive=self._grpc.keep_alive_time,
            )
            async with grpc_socket as sock:
                calls = _Calls()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._close_when_drained, sock, calls, nursery.cancel_scope)
                    async for call in sock.listen():
                        calls.begin()
                        self.calls += 1
                        nursery.start_soon(self._request_received, call, calls)
                    # The client closed the connection: no answer can reach it any more.
                    nursery.cancel_scope.cancel()
        except* GONE as group:
            logfmt.debug("connection lost", remote=remote, error=_first_line(group))
        except* GRPCError as group:
            logfmt.warn("gRPC protocol error", remote=remote, error=_first_line(group))
        except* Exception:
            # A bug here: this connection ends, the server carries on.
            logfmt.error("connection failed", remote=remote, exc_info=True)
        finally:
            with trio.CancelScope(shield=True):
                await anyio.aclose_forcefully(stream)

    async def _request_received(self, call: CallStream, calls: _Calls) -> None:
        try:
            await self.dispatcher.serve(call, refuse=self._draining.is_set())
        finally:
            calls.end()
            self.calls -= 1

    async def _close_when_drained(
        self, sock: ServerSocket, calls: _Calls, connection: trio.CancelScope
    ) -> None:
        await self._draining.wait()
        await calls.wait_none()
        await sock.go_away()
        connection.cancel()  # stop reading: the connection closes, its GOAWAY sent


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
        config: Address, port, message size limits, keep-alive.
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
