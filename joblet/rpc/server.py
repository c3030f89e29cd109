"""The gRPC server: purerpc over mutual TLS 1.3, with our policies wrapped around it.

purerpc (0.8) does the HTTP/2 and gRPC framing; this module keeps its parsers and replaces its
connection loop (:class:`ConnectionHandler`, a subclass of purerpc's), because that loop:

- knows nothing about the client's certificate: here the TLS handshake happens in our own accept
  loop, and the verified certificate becomes a :class:`~joblet.rpc.auth.Peer` in the context
  variable :data:`~joblet.rpc.auth.current_peer`, set in the connection's task before any request
  task is spawned, so every request of that connection inherits it;
- wraps handlers in bare ``except:`` blocks that swallow cancellation: ours catch ``Exception``
  only, so ``trio.Cancelled`` always propagates and never becomes a status;
- ignores a client's RST_STREAM (a cancelled call) and a closed connection: here a reset cancels
  that request's handler and a closed connection cancels all of its handlers, so a client that
  goes away mid-stream leaves no task behind;
- kills the whole connection on a message above its (hard-coded, 32 MiB) limit: here the limit is
  ``grpc.maxRecvMsgSize`` (also after decompression), and an oversized request gets
  RESOURCE_EXHAUSTED on its own stream while the connection carries on.

Responses above ``grpc.maxSendMsgSize`` fail with RESOURCE_EXHAUSTED instead of being sent.
Deadlines a client sends (``grpc-timeout``) are enforced: the handler is cancelled and the call
ends with DEADLINE_EXCEEDED.

The same handler serves a Unix socket without TLS (:func:`open_unix_listener`): there the socket
file's mode is the access control, and every client that can connect acts as
:func:`~joblet.rpc.auth.local_peer` (the Persist Service's socket).

Handlers are plain coroutines: ``async def Unary(request) -> response`` and, for server streaming,
``async def Streaming(request, send) -> None`` where ``await send(message)`` sends one message (a
coroutine rather than an async generator, so a handler may open nurseries). Errors they raise
become statuses in :mod:`joblet.rpc.errors`.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import ssl
import stat
import struct
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import attrs
import h2.exceptions  # type: ignore[import-untyped]
import h2.settings  # type: ignore[import-untyped]
import trio
from anyio.streams.tls import TLSAttribute, TLSStream
from google.protobuf.message import DecodeError
from purerpc.grpc_proto import GRPCProtoSocket, GRPCProtoStream
from purerpc.grpc_socket import GRPCStreamState, SocketWrapper
from purerpc.grpclib.buffers import MessageReadBuffer
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.events import (
    MessageReceived,
    RequestEnded,
    RequestReceived,
    ResponseEnded,
    WindowUpdated,
)
from purerpc.grpclib.exceptions import (
    GRPCError,
    MessageTooLargeError,
    UnsupportedMessageEncodingError,
)
from purerpc.grpclib.status import Status, StatusCode
from purerpc.rpc import Cardinality
from purerpc.server import ConnectionHandler as _PurerpcConnectionHandler

from joblet import logfmt
from joblet.config import GrpcSection
from joblet.core.errors import InvalidRequest, JobletError, PermissionDenied, ResourceExhausted
from joblet.core.errors import Unauthenticated as _Unauthenticated
from joblet.rpc import auth, errors

#: Longest a client may take to complete the TLS handshake.
HANDSHAKE_TIMEOUT = 10.0
#: Streams one connection may have open at once (purerpc's default is 65536). Each may hold up
#: to its receive window of unread request data.
MAX_CONCURRENT_STREAMS = 1000
#: accept() errors that mean "out of resources for now": wait and retry, as trio's serve_listeners.
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_RETRY_DELAY = 0.1
#: The connection or the stream is gone while we answer: there is nobody left to tell.
_GONE: tuple[type[BaseException], ...] = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    h2.exceptions.H2Error,
    ssl.SSLError,
    OSError,
)
#: What sending on a stream the client reset (or on a dead connection) raises.
_GONE_WHILE_SENDING: tuple[type[Exception], ...] = (
    h2.exceptions.H2Error,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
)
_H2_NO_ERROR = 0

Message = Any  # protobuf messages are untyped (no stubs for google.protobuf)
Send = Callable[[Message], Awaitable[None]]
UnaryHandler = Callable[[Message], Awaitable[Message]]
StreamHandler = Callable[[Message, Send], Awaitable[None]]
Handler = UnaryHandler | StreamHandler


def server_ssl_context(ca_cert: Path, server_cert: Path, server_key: Path) -> ssl.SSLContext:
    """The server's TLS context: TLS 1.3 only, a client certificate issued by ``ca_cert`` required.

    Raises:
        OSError: A file is missing or unreadable.
        ssl.SSLError: A file is not a certificate or key, or the key does not match.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(server_cert, server_key)
    ctx.load_verify_locations(cafile=ca_cert)
    # The chain is verified in the handshake, but not the validity period: that is checked per
    # connection (auth.peer_from_certificate and CA_VALIDITY below), so an expired certificate is
    # answered UNAUTHENTICATED "certificate verify failed: certificate has expired" as the spec
    # says, instead of a refused connection that clients only see as UNAVAILABLE.
    ctx.verify_flags |= _X509_V_FLAG_NO_CHECK_TIME
    ctx.set_alpn_protocols(["h2"])  # gRPC clients insist on it
    return ctx


_X509_V_FLAG_NO_CHECK_TIME = 0x200000


def ca_validity_error(ctx: ssl.SSLContext) -> str:
    """The time check the handshake skips, for the CAs themselves: an error unless one is valid."""
    now = time.time()
    for ca in ctx.get_ca_certs():
        start = ssl.cert_time_to_seconds(str(ca["notBefore"]))
        end = ssl.cert_time_to_seconds(str(ca["notAfter"]))
        if start <= now <= end:
            return ""
    return "certificate verify failed: the CA certificate is not valid now"


# --- the service table ----------------------------------------------------------------------------


@attrs.frozen
class Method:
    """One RPC of a service.

    Attributes:
        name: Its name, e.g. ``RunJob``.
        cardinality: purerpc's ``Cardinality`` (unary or streaming on each side).
        request_type: The request message class.
        handler: Our implementation, or None: the call answers UNIMPLEMENTED.
    """

    name: str
    cardinality: Any
    request_type: Any
    handler: Handler | None


@attrs.frozen
class ServiceDef:
    """A gRPC service as the server dispatches it: its full name and its methods."""

    name: str
    methods: Mapping[str, Method]

    @classmethod
    def bind(cls, generated: Any, handlers: Mapping[str, Handler]) -> ServiceDef:
        """Pair a generated purerpc servicer's method table with our handlers.

        Args:
            generated: An instance of the generated ``...Servicer`` class (only its ``service``
                table is used: names, message types, cardinalities).
            handlers: Our implementations by method name; the other methods are UNIMPLEMENTED.

        Raises:
            ValueError: A handler names a method the service does not have.
        """
        table = generated.service
        unknown = sorted(set(handlers) - set(table.methods))
        if unknown:
            raise ValueError(f"{table.name} has no method {', '.join(unknown)}")
        methods = {
            name: Method(
                name=name,
                cardinality=bound.signature.cardinality,
                request_type=bound.signature.request_type,
                handler=handlers.get(name),
            )
            for name, bound in table.methods.items()
        }
        return cls(name=table.name, methods=methods)


# --- purerpc, with our limits ---------------------------------------------------------------------


class _RequestRejected:
    """Stream event: the request cannot be read (too large, undecodable); ``error`` says why."""

    def __init__(self, stream_id: int, error: JobletError) -> None:
        self.stream_id = stream_id
        self.error = error


class _StreamReset:
    """Stream event: the client reset the stream (it cancelled the call)."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class _Rejected(Exception):
    def __init__(self, error: JobletError) -> None:
        super().__init__(str(error))
        self.error = error


class _LimitedReadBuffer(MessageReadBuffer):  # type: ignore[misc]
    """purerpc's message reader with our size limit, also applied after decompression.

    Counts the flow-controlled bytes it holds that no message has carried out yet, so that a
    rejected or reset stream can hand them back to the connection's window.
    """

    def __init__(self, message_encoding: str | None, max_message_length: int) -> None:
        super().__init__(message_encoding, max_message_length)
        self.held = 0
        self.rejected = False

    def data_received(self, data: bytes, flow_controlled_length: int | None = None) -> None:
        self.held += len(data) if flow_controlled_length is None else flow_controlled_length
        try:
            super().data_received(data, flow_controlled_length)
        except MessageTooLargeError as exc:
            size = getattr(self, "_message_length", None) or "too many"
            raise _Rejected(
                ResourceExhausted(
                    f"request message too large: {size} bytes "
                    f"(maxRecvMsgSize is {self._max_message_length})"
                )
            ) from exc
        except UnsupportedMessageEncodingError as exc:
            raise _Rejected(InvalidRequest(f"invalid request: {exc}")) from exc

    def read_all_complete_messages_flowcontrol(self) -> Any:
        messages = super().read_all_complete_messages_flowcontrol()
        self.held -= sum(length for _, length in messages)
        return messages

    def decompress(self, data: bytes) -> bytes:
        if self._message_encoding not in ("gzip", "deflate"):
            raise _Rejected(
                InvalidRequest(
                    f"invalid request: compressed message with unsupported grpc-encoding "
                    f"{self._message_encoding or 'identity'!r}"
                )
            )
        inflater = zlib.decompressobj(wbits=47)  # zlib or gzip header, detected
        try:
            out = inflater.decompress(data, self._max_message_length + 1)
        except zlib.error as exc:
            raise _Rejected(
                InvalidRequest(f"invalid request: corrupt compressed message: {exc}")
            ) from exc
        if len(out) > self._max_message_length:
            raise _Rejected(
                ResourceExhausted(
                    "request message too large once decompressed "
                    f"(maxRecvMsgSize is {self._max_message_length})"
                )
            )
        if not inflater.eof:
            raise _Rejected(InvalidRequest("invalid request: truncated compressed message"))
        return out


class _Connection(GRPCConnection):  # type: ignore[misc]
    """purerpc's gRPC-over-h2 state machine with per-stream limits instead of fatal errors."""

    MAX_CONCURRENT_STREAMS = MAX_CONCURRENT_STREAMS

    def __init__(self, config: Any, *, max_recv: int) -> None:
        self._max_recv = max_recv
        super().__init__(config)

    def _set_h2_connection_local_settings(self) -> None:
        codes = h2.settings.SettingCodes
        self.h2_connection.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                codes.MAX_CONCURRENT_STREAMS: self.MAX_CONCURRENT_STREAMS,
                # Room for one whole request per stream, and no more.
                codes.INITIAL_WINDOW_SIZE: min(2**31 - 1, max(65535, self._max_recv + 5)),
                codes.MAX_FRAME_SIZE: self.MAX_INBOUND_FRAME_SIZE,
                codes.MAX_HEADER_LIST_SIZE: self.MAX_HEADER_LIST_SIZE,
            },
        )
        self.h2_connection.max_inbound_frame_size = self.MAX_INBOUND_FRAME_SIZE

    def _request_received(self, event: Any) -> list[Any]:
        events: list[Any] = super()._request_received(event)
        self.message_read_buffers[event.stream_id] = _LimitedReadBuffer(
            events[0].message_encoding, self._max_recv
        )
        return events

    def _data_received(self, event: Any) -> list[Any]:
        sid = event.stream_id
        buf = self.message_read_buffers.get(sid)
        if not isinstance(buf, _LimitedReadBuffer) or buf.rejected:
            # Nobody will read it: give the window back at once.
            self.acknowledge_received_data(sid, event.flow_controlled_length)
            return []
        try:
            buf.data_received(event.data, event.flow_controlled_length)
        except _Rejected as exc:
            buf.rejected = True
            self.acknowledge_received_data(sid, buf.held)
            buf.held = 0
            return [_RequestRejected(sid, exc.error)]
        return [
            MessageReceived(sid, message, length)
            for message, length in buf.read_all_complete_messages_flowcontrol()
        ]

    def _stream_reset(self, event: Any) -> list[Any]:
        self.forget_stream(event.stream_id)
        return [_StreamReset(event.stream_id)]

    def forget_stream(self, stream_id: int) -> None:
        """Drop a stream's partial request and hand its bytes back to the connection window."""
        buf = self.message_read_buffers.pop(stream_id, None)
        if isinstance(buf, _LimitedReadBuffer) and buf.held:
            self.acknowledge_received_data(stream_id, buf.held)

    def acknowledge_received_data(self, stream_id: int, flow_controlled_length: int) -> None:
        if flow_controlled_length > 0:
            super().acknowledge_received_data(stream_id, flow_controlled_length)


class _Stream(GRPCProtoStream):  # type: ignore[misc]
    """One call. Its handler runs inside :attr:`cancel_scope`, cancelled if the client resets it."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.cancel_scope = trio.CancelScope()
        self.reset_by_client = False

    @property
    def response_started(self) -> bool:
        """Whether the response headers have been sent."""
        return bool(self._response_started)

    async def next_event(self) -> Any:
        """The next event of this stream (purerpc's ``_receive``, knowing our own events)."""
        event = await self._incoming_events[1].receive()
        if isinstance(event, MessageReceived):
            self._grpc_connection.acknowledge_received_data(
                self._stream_id, event.flow_controlled_length
            )
            await self._socket.flush()
        elif isinstance(event, RequestEnded | ResponseEnded):
            self._end_stream_event = event
        elif isinstance(event, RequestReceived):
            self._start_stream_event = event
        return event

    def client_reset(self) -> None:
        """The client reset the stream: stop its handler, return the window of unread data."""
        self.reset_by_client = True
        self._state = GRPCStreamState.CLOSED
        self.cancel_scope.cancel()
        while True:
            try:
                event = self._incoming_events[1].receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
            if isinstance(event, MessageReceived):
                self._grpc_connection.acknowledge_received_data(
                    self._stream_id, event.flow_controlled_length
                )

    async def finish(self, status: Any) -> None:
        """End the call with ``status``; if the client is still sending, ask it to stop."""
        if self.reset_by_client:
            return
        await self.close(status)
        if self._state is GRPCStreamState.HALF_CLOSED_LOCAL:
            # We answered before the whole request arrived (rejected, unimplemented): RFC 7540
            # 8.1 lets us stop the upload with RST_STREAM(NO_ERROR) after a complete response.
            self._grpc_connection.reset_stream(self._stream_id, _H2_NO_ERROR)
            self._grpc_connection.forget_stream(self._stream_id)
            self._grpc_socket._streams.pop(self._stream_id, None)
            self._state = GRPCStreamState.CLOSED
            await self._socket.flush()


class _SocketWrapper(SocketWrapper):  # type: ignore[misc]
    """purerpc's socket wrapper, setting its TCP options on TCP sockets only."""

    @staticmethod
    def _set_socket_options(stream: anyio.abc.SocketStream) -> None:
        if _is_tcp(stream):
            SocketWrapper._set_socket_options(stream)


def _is_tcp(stream: anyio.abc.ByteStream) -> bool:
    family = stream.extra(anyio.abc.SocketAttribute.family, None)
    return family in (socket.AF_INET, socket.AF_INET6)


class _Socket(GRPCProtoSocket):  # type: ignore[misc]
    """purerpc's server-side connection with our connection state machine and streams."""

    StreamClass = _Stream

    def __init__(
        self, config: Any, sock: anyio.abc.ByteStream, *, max_recv: int, keepalive: float
    ) -> None:
        # purerpc's GRPCSocket.__init__ without its SocketWrapper, whose TCP options a Unix
        # socket rejects: the same four attributes, with our connection and wrapper.
        AsyncExitStack.__init__(self)
        self._grpc_connection = _Connection(config, max_recv=max_recv)
        self._socket = _SocketWrapper(self._grpc_connection, sock)
        self._receive_buffer_size = 1024 * 1024
        self._streams: dict[int, Any] = {}
        _set_keepalive(sock, keepalive)  # after purerpc's own socket options (idle 300 s)

    async def _listen(self) -> Any:
        # purerpc's loop, plus: resets reach their stream, events of streams we already dropped
        # are ignored instead of failing the connection with a KeyError.
        while True:
            try:
                data = await self._socket.recv(self._receive_buffer_size)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return
            events = self._grpc_connection.receive_data(data)
            await self._socket.flush()
            for event in events:
                if isinstance(event, WindowUpdated):
                    if event.stream_id == 0:
                        for stream in list(self._streams.values()):
                            await stream._set_flow_control_update()
                    elif event.stream_id in self._streams:
                        await self._streams[event.stream_id]._set_flow_control_update()
                elif isinstance(event, RequestReceived):
                    stream = self._allocate_stream(event.stream_id)
                    await stream._incoming_events[0].send(event)
                    yield stream
                elif isinstance(event, _StreamReset):
                    stream = self._streams.pop(event.stream_id, None)
                    if stream is not None:
                        stream.client_reset()
                else:
                    stream = self._streams.get(event.stream_id)
                    if stream is None:
                        continue
                    await stream._incoming_events[0].send(event)
                    if isinstance(event, RequestEnded | ResponseEnded):
                        stream._close_remote()


def _format_address(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


def _set_keepalive(stream: anyio.abc.ByteStream, idle: float) -> None:
    """TCP keep-alive probes after ``idle`` seconds of silence (``grpc.keepAliveTime``)."""
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
    if sock is None or not hasattr(socket, "TCP_KEEPIDLE") or not _is_tcp(stream):
        return
    seconds = max(1, int(idle))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, seconds)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, min(seconds, 30))


class ConnectionHandler(_PurerpcConnectionHandler):  # type: ignore[misc]
    """purerpc's connection handler with our TLS identity, auth, limits and error policy.

    One instance serves every connection; :meth:`__call__` runs one connection from the TCP
    accept to its end.

    Args:
        services: The services to dispatch to.
        ssl_context: The server's TLS context (see :func:`server_ssl_context`); None for a Unix
            socket, which is served without TLS: its file mode decides who may connect, and
            each client is :func:`~joblet.rpc.auth.local_peer`.
        config: Message size limits and keep-alive.
    """

    def __init__(
        self,
        services: Sequence[ServiceDef],
        ssl_context: ssl.SSLContext | None,
        config: GrpcSection,
    ) -> None:
        super().__init__({s.name: s for s in services}, None)
        # purerpc checks outgoing messages against this; we check (and word) it first.
        self.config = GRPCConfiguration(
            client_side=False, max_message_length=max(config.max_send_msg_size, 1)
        )
        self._ssl_context = ssl_context
        self._grpc = config

    async def __call__(self, raw: anyio.abc.SocketStream) -> None:
        """Serve one connection: handshake, then its requests until it closes."""
        stream: anyio.abc.ByteStream
        if self._ssl_context is None:
            stream = raw
            peer = _local_peer(raw)
            remote = peer.remote
        else:
            remote = _format_address(raw.extra(anyio.abc.SocketAttribute.remote_address, "?"))
            tls = await self._handshake(raw, remote, self._ssl_context)
            if tls is None:
                return
            stream = tls
            peer = auth.peer_from_certificate(
                tls.extra(TLSAttribute.peer_certificate_binary, None), remote
            )
            ca_error = ca_validity_error(self._ssl_context)
            if ca_error:
                peer = attrs.evolve(peer, role=None, problem=ca_error, auth_error=ca_error)
        # Inherited by every request task spawned below: the handlers' view of who is calling.
        auth.current_peer.set(peer)
        logfmt.debug("client connected", remote=remote, client=peer.name, role=peer.role or "-")
        try:
            grpc_socket = _Socket(
                self.config,
                stream,
                max_recv=self._grpc.max_recv_msg_size,
                keepalive=self._grpc.keep_alive_time,
            )
            async with grpc_socket as sock:
                async with trio.open_nursery() as requests:
                    async for grpc_stream in sock.listen():
                        requests.start_soon(self.request_received, grpc_stream)
                    # The client closed the connection: no answer can reach it any more.
                    requests.cancel_scope.cancel()
        except* _GONE as group:
            logfmt.debug("connection lost", remote=remote, error=_first_line(group))
        except* GRPCError as group:
            logfmt.warn("gRPC protocol error", remote=remote, error=_first_line(group))
        except* Exception:
            # A bug here: this connection ends, the server carries on.
            logfmt.error("connection failed", remote=remote, exc_info=True)
        finally:
            with trio.CancelScope(shield=True):
                await anyio.aclose_forcefully(stream)

    async def _handshake(
        self, raw: anyio.abc.SocketStream, remote: str, ssl_context: ssl.SSLContext
    ) -> TLSStream | None:
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                return await TLSStream.wrap(
                    raw, server_side=True, ssl_context=ssl_context, standard_compatible=False
                )
        except ssl.SSLCertVerificationError as exc:
            reason = f"certificate verify failed: {exc.verify_message}"
            logfmt.error("client authentication failed", remote=remote, error=reason)
        except ssl.SSLError as exc:
            if exc.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
                reason = "no client certificate provided"
                logfmt.error("client authentication failed", remote=remote, error=reason)
            else:
                logfmt.warn("TLS handshake failed", remote=remote, error=exc.reason or str(exc))
        except trio.TooSlowError:
            logfmt.warn("TLS handshake timed out", remote=remote, timeout=f"{HANDSHAKE_TIMEOUT}s")
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
            logfmt.debug("connection closed during TLS handshake", remote=remote, error=str(exc))
        with trio.CancelScope(shield=True):
            await anyio.aclose_forcefully(raw)
        return None

    async def request_received(self, stream: _Stream) -> None:
        """Serve one call, inside its stream's cancel scope (a client reset cancels it)."""
        with stream.cancel_scope:
            try:
                await self._serve_call(stream)
            except _GONE as exc:
                logfmt.debug("call abandoned: connection or stream gone", error=str(exc))

    async def _serve_call(self, stream: _Stream) -> None:
        start = await stream.next_event()
        name = getattr(start, "method_name", "?")
        try:
            if not isinstance(start, RequestReceived):
                raise InvalidRequest("expected request headers")
            method = self._lookup(start)
            auth.authorize(method.name)
            with trio.CancelScope() as deadline:
                if start.timeout is not None:
                    deadline.deadline = trio.current_time() + start.timeout.total_seconds()
                await self._call(stream, method)
            if deadline.cancelled_caught:
                raise errors.DeadlineExceeded()
        except Exception as exc:  # not BaseException: cancellation is never an answer
            if stream.reset_by_client or _connection_gone(exc):
                logfmt.debug("call abandoned: client gone", method=name, error=str(exc))
                return
            if isinstance(exc, _Unauthenticated | PermissionDenied):
                _log_denied(exc, name)
            status = errors.status_for(exc, name)
        else:
            status = Status(StatusCode.OK)
        await stream.finish(status)

    def _lookup(self, start: Any) -> Method:
        service: ServiceDef | None = self.services.get(start.service_name)
        method = service.methods.get(start.method_name) if service is not None else None
        if method is None:
            # Checked before the role: a method nobody may call needs no permission.
            raise errors.Unimplemented(
                f"{start.service_name}/{start.method_name}", message="unknown method"
            )
        return method

    async def _call(self, stream: _Stream, method: Method) -> None:
        if method.handler is None:
            raise errors.Unimplemented(method.name)
        request = await self._receive_request(stream, method.request_type)
        send = functools.partial(self._send, stream)
        handler: Any = method.handler
        if method.cardinality == Cardinality.UNARY_UNARY:
            await send(await handler(request))
        elif method.cardinality == Cardinality.UNARY_STREAM:
            await handler(request, send)
        else:  # no client-streaming RPC in our API
            raise errors.Unimplemented(method.name)

    async def _receive_request(self, stream: _Stream, request_type: Any) -> Message:
        data: bytes | None = None
        while True:
            event = await stream.next_event()
            if isinstance(event, _RequestRejected):
                raise event.error
            if isinstance(event, RequestEnded):
                break
            if isinstance(event, MessageReceived):
                if data is not None:
                    raise InvalidRequest("invalid request: more than one request message")
                data = event.data
        if data is None:
            raise InvalidRequest("invalid request: no request message")
        try:
            return request_type.FromString(data)
        except DecodeError as exc:
            raise InvalidRequest(
                f"invalid request: cannot parse {request_type.DESCRIPTOR.full_name}: {exc}"
            ) from exc

    async def _send(self, stream: _Stream, message: Message) -> None:
        size = message.ByteSize()
        limit = self._grpc.max_send_msg_size
        if size > limit:
            raise ResourceExhausted(
                f"response message too large: {size} bytes (maxSendMsgSize is {limit})"
            )
        if not stream.response_started:
            await stream.start_response()
        await stream.send_message(message)


def _local_peer(stream: anyio.abc.SocketStream) -> auth.Peer:
    """The client of a Unix socket connection, named by its credentials (``SO_PEERCRED``)."""
    path = str(stream.extra(anyio.abc.SocketAttribute.local_address, "?"))
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
    try:
        if sock is None:
            raise OSError("no socket")
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        pid, uid, _gid = _UCRED.unpack(creds)
    except OSError:
        return auth.local_peer(f"unix:{path}")
    return auth.local_peer(f"unix:{path}", uid=uid, pid=pid)


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _log_denied(exc: Exception, method: str) -> None:
    peer = auth.current_peer.get() or auth.Peer(remote="-")
    if isinstance(exc, PermissionDenied):
        logfmt.warn(
            "permission denied",
            method=method,
            role=peer.role,
            client=peer.name,
            remote=peer.remote,
            error=str(exc),
        )
    else:
        logfmt.error(
            "client authentication failed",
            method=method,
            client=peer.name,
            remote=peer.remote,
            error=str(exc),
        )


def _connection_gone(exc: BaseException) -> bool:
    """Whether ``exc`` (or every exception of a group) says the stream or connection is gone."""
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(_GONE_WHILE_SENDING)
        return rest is None
    return isinstance(exc, _GONE_WHILE_SENDING)


def _first_line(group: BaseExceptionGroup[Any]) -> str:
    first = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return f"{type(first).__name__}: {first}".splitlines()[0]


# --- the actor ------------------------------------------------------------------------------------


async def open_listener(address: str, port: int) -> anyio.abc.Listener[anyio.abc.SocketStream]:
    """Bind the server's TCP socket(s) (every address ``address`` resolves to).

    Raises:
        OSError: The address cannot be bound (in use, not local, ...).
    """
    return await anyio.create_tcp_listener(local_host=address, local_port=port)


class UnixSocketListener(anyio.abc.SocketListener):
    """A listening Unix socket that removes its socket file when closed.

    Made by :func:`open_unix_listener`. The file is removed only if it is still the one this
    listener created (another process may have replaced it meanwhile).
    """

    def __init__(self, inner: anyio.abc.SocketListener, path: Path, inode: tuple[int, int]) -> None:
        self._inner = inner
        self.path = path
        self._inode = inode
        self._closed = False

    @property
    def _raw_socket(self) -> socket.socket:
        return self._inner.extra(anyio.abc.SocketAttribute.raw_socket)

    async def accept(self) -> anyio.abc.SocketStream:
        """Wait for a connection."""
        return await self._inner.accept()

    async def aclose(self) -> None:
        """Close the socket and remove its file; idempotent."""
        try:
            await self._inner.aclose()
        finally:
            if not self._closed:
                self._closed = True
                _unlink_if_same(self.path, self._inode)


def _unlink_if_same(path: Path, inode: tuple[int, int]) -> None:
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logfmt.warn("socket file could not be removed", path=str(path), error=str(exc))


#: Longest path a Unix socket can be bound to (``sun_path`` holds 108 bytes with the NUL).
UNIX_PATH_MAX = 107


async def open_unix_listener(path: Path, mode: int = 0o600) -> UnixSocketListener:
    """Listen on a Unix socket at ``path``, created with ``mode``.

    The socket file never exists with a wider mode (it is created with ``mode`` already, see
    unix(7)), and its parent directory is created if missing. A socket file left behind by a
    process that is gone (a crash) is replaced; one that a live process listens on is not.

    Raises:
        OSError: ``path`` is too long, is in use by a live listener (EADDRINUSE), exists and is
            not a socket (EEXIST), or cannot be bound.
    """
    sock, inode = await trio.to_thread.run_sync(_bind_unix, path, mode)
    try:
        inner = await anyio.abc.SocketListener.from_socket(sock)
    except BaseException:
        sock.close()
        _unlink_if_same(path, inode)
        raise
    return UnixSocketListener(inner, path, inode)


def _bind_unix(path: Path, mode: int) -> tuple[socket.socket, tuple[int, int]]:
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise OSError(errno.ENAMETOOLONG, f"longer than {UNIX_PATH_MAX} bytes", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The file bind() creates takes the socket inode's mode (less the umask): set it first,
        # so there is no moment where the file is more open than ``mode``.
        os.fchmod(sock.fileno(), mode)
        sock.bind(os.fspath(path))
        os.chmod(path, mode)  # the umask may have taken bits away
        st = os.lstat(path)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, (st.st_dev, st.st_ino)


def _remove_stale_socket(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, "exists and is not a socket", str(path))
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        # Nobody listens: left behind by a process that is gone.
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    except OSError:
        pass  # cannot tell (e.g. the backlog is full): assume it is alive
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "in use by another process", str(path))


def listener_addresses(listener: anyio.abc.Listener[Any]) -> list[str]:
    """The ``host:port`` each socket of ``listener`` listens on."""
    parts = getattr(listener, "listeners", [listener])
    return [
        _format_address(part.extra(anyio.abc.SocketAttribute.local_address, "?")) for part in parts
    ]


class GrpcServer:
    """The gRPC server as a long-lived actor.

    Example::

        server = GrpcServer([ServiceDef.bind(...)], ssl_context, config.grpc)
        addresses = await nursery.start(server.run)

    Args:
        services: What to serve.
        ssl_context: TLS settings (see :func:`server_ssl_context`); None only with a Unix socket
            listener (see :class:`ConnectionHandler`).
        config: Address, port, message size limits, keep-alive.
        listener: An already bound listener (see :func:`open_listener` and
            :func:`open_unix_listener`), so a bind failure can surface before the caller starts
            anything else; by default :meth:`run` binds ``config``'s address and port.
        name: What the server is called in log lines.
    """

    def __init__(
        self,
        services: Sequence[ServiceDef],
        ssl_context: ssl.SSLContext | None,
        config: GrpcSection,
        *,
        listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = None,
        name: str = "gRPC server",
    ) -> None:
        if ssl_context is None and not isinstance(listener, UnixSocketListener):
            raise ValueError("a gRPC server without TLS may only listen on a Unix socket")
        self._handler = ConnectionHandler(services, ssl_context, config)
        self._config = config
        self._listener = listener
        self._name = name

    async def run(
        self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; ``started()`` reports the listening addresses once they listen.

        Raises:
            OSError: The address cannot be bound (only if no listener was given).
        """
        listener = self._listener
        if listener is None:
            listener = await open_listener(self._config.address, self._config.port)
        addresses = listener_addresses(listener)
        try:
            async with trio.open_nursery() as nursery:
                for part in getattr(listener, "listeners", [listener]):
                    nursery.start_soon(self._accept_loop, part, nursery)
                logfmt.info(f"{self._name} listening", address=",".join(addresses))
                task_status.started(addresses)
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
            logfmt.info(f"{self._name} stopped", address=",".join(addresses))

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
