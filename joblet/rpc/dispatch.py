"""Call dispatch: from a request's headers to its handler, and from what it raised to a status.

One :class:`Dispatcher` serves every call of a server (:meth:`Dispatcher.serve`), in this order:
find the method (an unknown one is UNIMPLEMENTED, before any role check: a method nobody may call
needs no permission), authorize the caller's role (:func:`joblet.rpc.auth.authorize`), read the one
request message, run the handler under the client's deadline (``grpc-timeout``: the handler is
cancelled and the call ends DEADLINE_EXCEEDED), and check each response against
``grpc.maxSendMsgSize`` (RESOURCE_EXHAUSTED instead of sending it). What a handler raises becomes
a status in :mod:`joblet.rpc.errors`; a cancellation is never an answer: it propagates.

Handlers are plain coroutines: ``async def Unary(request) -> response`` and, for server streaming,
``async def Streaming(request, send) -> None`` where ``await send(message)`` sends one message (a
coroutine rather than an async generator, so a handler may open nurseries).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import attrs
import trio
from google.protobuf.message import DecodeError
from purerpc.grpclib.events import MessageReceived, RequestEnded, RequestReceived
from purerpc.grpclib.status import Status, StatusCode
from purerpc.rpc import Cardinality

from joblet import logfmt
from joblet.config import GrpcSection
from joblet.core.errors import (
    InvalidRequest,
    PermissionDenied,
    ResourceExhausted,
    ShuttingDown,
    Unauthenticated,
)
from joblet.rpc import auth, errors
from joblet.rpc.transport import GONE, GONE_WHILE_SENDING, CallStream, RequestRejected

Message = Any  # protobuf messages are untyped (no stubs for google.protobuf)
Send = Callable[[Message], Awaitable[None]]
UnaryHandler = Callable[[Message], Awaitable[Message]]
StreamHandler = Callable[[Message, Send], Awaitable[None]]
Handler = UnaryHandler | StreamHandler


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


class Dispatcher:
    """Serves calls: one instance serves every call of a server, on all its connections.

    Args:
        services: The services to dispatch to.
        config: The message size limit for responses (``max_send_msg_size``).
    """

    def __init__(self, services: Sequence[ServiceDef], config: GrpcSection) -> None:
        self.services: dict[str, ServiceDef] = {s.name: s for s in services}
        self._max_send = config.max_send_msg_size

    async def serve(self, stream: CallStream, *, refuse: bool = False) -> None:
        """Serve one call, inside its stream's cancel scope (a client reset cancels it).

        Args:
            stream: The call.
            refuse: Answer UNAVAILABLE without running anything (the server is draining).
        """
        with stream.cancel_scope:
            try:
                await self._serve_call(stream, refuse)
            except GONE as exc:
                logfmt.debug("call abandoned: connection or stream gone", error=str(exc))

    async def _serve_call(self, stream: CallStream, refuse: bool) -> None:
        start = await stream.next_event()
        name = getattr(start, "method_name", "?")
        try:
            if not isinstance(start, RequestReceived):
                raise InvalidRequest("expected request headers")
            if refuse:
                raise ShuttingDown("server is shutting down")
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
            if isinstance(exc, Unauthenticated | PermissionDenied):
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

    async def _call(self, stream: CallStream, method: Method) -> None:
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

    async def _receive_request(self, stream: CallStream, request_type: Any) -> Message:
        data: bytes | None = None
        while True:
            event = await stream.next_event()
            if isinstance(event, RequestRejected):
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

    async def _send(self, stream: CallStream, message: Message) -> None:
        size = message.ByteSize()
        limit = self._max_send
        if size > limit:
            raise ResourceExhausted(
                f"response message too large: {size} bytes (maxSendMsgSize is {limit})"
            )
        if not stream.response_started:
            await stream.start_response()
        await stream.send_message(message)


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
        _, rest = exc.split(GONE_WHILE_SENDING)
        return rest is None
    return isinstance(exc, GONE_WHILE_SENDING)
