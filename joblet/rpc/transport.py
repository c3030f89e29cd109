"""purerpc's server connection, with our limits and stream lifecycle.

purerpc (0.8) does the HTTP/2 and gRPC framing; the subclasses here keep its parsers and change
what it does at the edges:

- :class:`LimitedReadBuffer` and :class:`ServerConnection` are the sans-IO part (bytes in, events
  out, no socket): a message above ``grpc.maxRecvMsgSize`` (also after decompression), or one that
  cannot be decompressed, becomes a :class:`RequestRejected` event on its own stream instead of
  killing the whole connection (purerpc's hard-coded 32 MiB limit does that), and its
  flow-control window is handed back; a client's RST_STREAM becomes a :class:`StreamReset` event
  instead of being ignored. Each stream gets room for one whole request and no more.
- :class:`CallStream` is one call: its handler runs in :attr:`CallStream.cancel_scope`, which a
  reset cancels, so a client that goes away mid-stream leaves no task behind.
- :class:`ServerSocket` is the connection's read loop (purerpc's, delivering resets to their
  stream and ignoring events of streams already dropped instead of failing with a KeyError).
- TCP options (keep-alive, no-delay) are set on TCP sockets only: the same code serves a Unix
  socket.

What one connection can make the server hold is bounded (``docs/decisions.md``, "the port under
abuse"): at most ``grpc.maxConcurrentStreams`` calls in flight (a stream above it is refused with
RST_STREAM(REFUSED_STREAM), whatever h2's count of open streams says, so a client that resets
its streams as fast as it opens them cannot pile up handler tasks either); frames of at most
:data:`MAX_FRAME_SIZE`; unread request data up to :func:`connection_window`; and up to
:data:`OUTBOUND_HIGH_WATER` of frames waiting to be sent, above which the connection stops
reading and its calls stop writing until the peer reads (a peer that floods PINGs or SETTINGS
and never reads the acks, or never reads its responses, costs no more than that).
"""

from __future__ import annotations

import socket
import ssl
import zlib
from contextlib import AsyncExitStack
from typing import Any

import anyio
import anyio.abc
import h2.exceptions  # type: ignore[import-untyped]
import h2.frame_buffer  # type: ignore[import-untyped]
import h2.settings  # type: ignore[import-untyped]
import trio
from purerpc.grpc_proto import GRPCProtoSocket, GRPCProtoStream
from purerpc.grpc_socket import GRPCStreamState, SocketWrapper
from purerpc.grpclib.buffers import MessageReadBuffer, MessageWriteBuffer
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.events import (
    MessageReceived,
    RequestEnded,
    RequestReceived,
    ResponseEnded,
    WindowUpdated,
)
from purerpc.grpclib.exceptions import MessageTooLargeError, UnsupportedMessageEncodingError

from joblet.core.errors import InvalidRequest, JobletError, ResourceExhausted

#: Largest frame a client may send: HTTP/2's default and least value (purerpc's is 16 MiB, which
#: h2 would buffer whole for every connection before looking at it).
MAX_FRAME_SIZE = 16384
#: Bytes of frames waiting to be sent above which a connection stops reading and writing.
OUTBOUND_HIGH_WATER = 1 << 20
#: Longest a closing connection waits for its GOAWAY to be sent to a peer that does not read.
GOAWAY_TIMEOUT = 1.0
#: The connection or the stream is gone while we answer: there is nobody left to tell.
GONE: tuple[type[BaseException], ...] = (
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    h2.exceptions.H2Error,
    ssl.SSLError,
    OSError,
)
#: What sending on a stream the client reset (or on a dead connection) raises.
GONE_WHILE_SENDING: tuple[type[Exception], ...] = (
    h2.exceptions.H2Error,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
)
_H2_NO_ERROR = 0
_H2_REFUSED_STREAM = 7


def stream_window(max_recv: int) -> int:
    """Each stream's receive window: room for one whole request (``max_recv`` bytes and its
    5-byte prefix), and no more."""
    return min(2**31 - 1, max(65535, max_recv + 5))


def connection_window(max_recv: int) -> int:
    """The connection's receive window: request data a client may have sent that no call has
    read yet (purerpc's is 1 GiB); room for a few whole requests at once."""
    return min(2**31 - 1, max(4 << 20, 2 * stream_window(max_recv)))


class RequestRejected:
    """Stream event: the request cannot be read (too large, undecodable); ``error`` says why."""

    def __init__(self, stream_id: int, error: JobletError) -> None:
        self.stream_id = stream_id
        self.error = error


class StreamReset:
    """Stream event: the client reset the stream (it cancelled the call)."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class CallCount:
    """The calls in flight on one connection, and a way to wait for that number to change."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = trio.Event()

    def begin(self) -> None:
        """A call has started."""
        self.count += 1
        self._notify()

    def end(self) -> None:
        """A call has ended (its handler returned)."""
        self.count -= 1
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        """Return once a call has started or ended."""
        await self._changed.wait()

    async def wait_none(self) -> None:
        """Return once no call is in flight."""
        while self.count:
            await self._changed.wait()


class PeerProtocolError(Exception):
    """The client broke HTTP/2 (h2 has sent it GOAWAY saying how): its connection ends."""


class _Rejected(Exception):
    def __init__(self, error: JobletError) -> None:
        super().__init__(str(error))
        self.error = error


class LimitedReadBuffer(MessageReadBuffer):  # type: ignore[misc]
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


class EarlyLimitFrameBuffer(h2.frame_buffer.FrameBuffer):  # type: ignore[misc]
    """h2's frame buffer, refusing an overlong frame as soon as its header arrives.

    h2 (3.x) checks a frame's length only once the whole frame is buffered, so a peer that
    announces a 16 MiB frame and trickles it would be held to the end.
    """

    def next(self) -> Any:
        if len(self.data) >= 9:
            self._validate_frame_length(int.from_bytes(self.data[:3], "big"))
        return super().next()

    __next__ = next


class ServerConnection(GRPCConnection):  # type: ignore[misc]
    """purerpc's gRPC-over-h2 state machine with per-stream limits instead of fatal errors.

    Attributes:
        preface_received: Whether the client's connection preface (and its SETTINGS) arrived.
    """

    def __init__(self, config: Any, *, max_recv: int, max_streams: int) -> None:
        self._max_recv = max_recv
        self.MAX_CONCURRENT_STREAMS = max_streams
        self.preface_received = False
        super().__init__(config)
        self.h2_connection.incoming_buffer = EarlyLimitFrameBuffer(server=True)

    def _set_h2_connection_local_settings(self) -> None:
        codes = h2.settings.SettingCodes
        self.h2_connection.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                codes.MAX_CONCURRENT_STREAMS: self.MAX_CONCURRENT_STREAMS,
                codes.INITIAL_WINDOW_SIZE: stream_window(self._max_recv),
                codes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
                codes.MAX_HEADER_LIST_SIZE: self.MAX_HEADER_LIST_SIZE,
            },
        )
        self.h2_connection.max_inbound_frame_size = MAX_FRAME_SIZE

    def initiate_connection(self) -> None:
        """Send our preface: SETTINGS, and the connection window of :func:`connection_window`."""
        self.h2_connection.initiate_connection()
        self.h2_connection.increment_flow_control_window(
            connection_window(self._max_recv) - 65535  # HTTP/2's initial connection window
        )

    def _remote_settings_changed(self, event: Any) -> list[Any]:
        self.preface_received = True  # h2 checked the preface; SETTINGS must come first
        events: list[Any] = super()._remote_settings_changed(event)
        return events

    def refuse_stream(self, stream_id: int) -> None:
        """Reset a new stream with REFUSED_STREAM (not processed: the client may retry it)."""
        try:
            self.h2_connection.reset_stream(stream_id, _H2_REFUSED_STREAM)
        except h2.exceptions.StreamClosedError:
            pass  # the client has reset it already (in the same read)
        self.forget_stream(stream_id)

    def _request_received(self, event: Any) -> list[Any]:
        events: list[Any] = super()._request_received(event)
        self.message_read_buffers[event.stream_id] = LimitedReadBuffer(
            events[0].message_encoding, self._max_recv
        )
        return events

    def _data_received(self, event: Any) -> list[Any]:
        sid = event.stream_id
        buf = self.message_read_buffers.get(sid)
        if not isinstance(buf, LimitedReadBuffer) or buf.rejected:
            # Nobody will read it: give the window back at once.
            self.acknowledge_received_data(sid, event.flow_controlled_length)
            return []
        try:
            buf.data_received(event.data, event.flow_controlled_length)
        except _Rejected as exc:
            buf.rejected = True
            self.acknowledge_received_data(sid, buf.held)
            buf.held = 0
            return [RequestRejected(sid, exc.error)]
        return [
            MessageReceived(sid, message, length)
            for message, length in buf.read_all_complete_messages_flowcontrol()
        ]

    def _stream_reset(self, event: Any) -> list[Any]:
        self.forget_stream(event.stream_id)
        return [StreamReset(event.stream_id)]

    def forget_stream(self, stream_id: int) -> None:
        """Drop a stream's partial request and hand its bytes back to the connection window."""
        buf = self.message_read_buffers.pop(stream_id, None)
        if isinstance(buf, LimitedReadBuffer) and buf.held:
            self.acknowledge_received_data(stream_id, buf.held)

    def acknowledge_received_data(self, stream_id: int, flow_controlled_length: int) -> None:
        if flow_controlled_length > 0:
            super().acknowledge_received_data(stream_id, flow_controlled_length)


class CallStream(GRPCProtoStream):  # type: ignore[misc]
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

    async def _send(self, message: bytes, compress: bool = False) -> None:
        # purerpc's, waiting while the connection has more than its high-water mark to send.
        buffer = MessageWriteBuffer(
            self._grpc_connection.config.message_encoding,
            self._grpc_connection.config.max_message_length,
        )
        buffer.write_message(message, compress)
        while buffer:
            await self._socket.wait_writable()
            window_size = self._grpc_connection.flow_control_window(self._stream_id)
            if window_size <= 0:
                await self._wait_flow_control_update()
                continue
            data = buffer.data_to_send(min(window_size, len(buffer)))
            self._grpc_connection.send_data(self._stream_id, data)
            await self._socket.flush()

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


class TcpOptionsSocketWrapper(SocketWrapper):  # type: ignore[misc]
    """purerpc's socket wrapper, setting its TCP options on TCP sockets only."""

    @staticmethod
    def _set_socket_options(stream: anyio.abc.SocketStream) -> None:
        if _is_tcp(stream):
            SocketWrapper._set_socket_options(stream)


class BoundedSocketWrapper(TcpOptionsSocketWrapper):
    """The server's socket wrapper: it knows how much is waiting to be sent, so that the
    connection's reader and its calls can wait while that is above :data:`OUTBOUND_HIGH_WATER`.
    """

    def __init__(self, grpc_connection: ServerConnection, stream: anyio.abc.ByteStream) -> None:
        super().__init__(grpc_connection, stream)
        self._sending = 0
        self._sent = trio.Event()

    def pending(self) -> int:
        """Bytes queued or being sent."""
        # purerpc makes h2's outbound buffer a bytearray (grpclib/_h2_monkeypatch.py).
        return self._sending + len(self._grpc_connection.h2_connection._data_to_send)

    async def _writer_thread(self) -> None:
        while True:
            data = self._grpc_connection.data_to_send()
            if data:
                self._sending = len(data)
                await self._stream.send(data)
                self._sending = 0
                self._sent.set()
                self._sent = trio.Event()
            elif self._running:
                flushed: anyio.Event = self._flush_event  # type: ignore[has-type]
                await flushed.wait()
                self._flush_event = anyio.Event()
            else:
                return

    async def wait_writable(self) -> None:
        """Return once no more than :data:`OUTBOUND_HIGH_WATER` bytes wait to be sent."""
        while self.pending() > OUTBOUND_HIGH_WATER:
            await self._sent.wait()

    async def wait_sent(self) -> None:
        """Return once everything queued has been sent."""
        await self.flush()
        while self.pending():
            await self._sent.wait()


def _is_tcp(stream: anyio.abc.ByteStream) -> bool:
    family = stream.extra(anyio.abc.SocketAttribute.family, None)
    return family in (socket.AF_INET, socket.AF_INET6)


class ServerSocket(GRPCProtoSocket):  # type: ignore[misc]
    """purerpc's server-side connection with our connection state machine, streams and limits.

    Args:
        config: purerpc's configuration (server side, its send limit).
        sock: The connection.
        max_recv: ``grpc.maxRecvMsgSize``.
        keepalive: ``grpc.keepAliveTime``.
        max_streams: ``grpc.maxConcurrentStreams``: a new stream while ``calls`` has this many
            is refused.
        calls: The calls in flight on this connection, counted by whoever runs them.

    Attributes:
        preface: Set once the client's HTTP/2 preface has arrived.
    """

    StreamClass = CallStream

    def __init__(
        self,
        config: Any,
        sock: anyio.abc.ByteStream,
        *,
        max_recv: int,
        keepalive: float,
        max_streams: int,
        calls: CallCount,
    ) -> None:
        # purerpc's GRPCSocket.__init__ without its SocketWrapper, whose TCP options a Unix
        # socket rejects: the same four attributes, with our connection and wrapper.
        AsyncExitStack.__init__(self)
        self._grpc_connection = ServerConnection(config, max_recv=max_recv, max_streams=max_streams)
        self._socket = BoundedSocketWrapper(self._grpc_connection, sock)
        # One TLS record at most arrives per read anyway; this bounds a Unix socket's reads.
        self._receive_buffer_size = 64 * 1024
        self._streams: dict[int, Any] = {}
        self._max_streams = max_streams
        self._calls = calls
        self.preface = trio.Event()
        _set_keepalive(sock, keepalive)  # after purerpc's own socket options (idle 300 s)

    async def go_away(self) -> None:
        """Send GOAWAY(NO_ERROR): the last frame before a graceful close.

        Only once no call is in flight: h2 (3.x) treats a connection it sent or received GOAWAY
        on as closed, on both sides, so a stream still running would fail in a client built on
        it (such as purerpc's). Waits up to :data:`GOAWAY_TIMEOUT` for it to be sent.
        """
        self._grpc_connection.h2_connection.close_connection()
        with trio.move_on_after(GOAWAY_TIMEOUT):
            await self._socket.wait_sent()

    async def _listen(self) -> Any:
        # purerpc's loop, plus: resets reach their stream, events of streams we already dropped
        # are ignored instead of failing the connection with a KeyError, streams above the
        # limit are refused, and nothing more is read while too much waits to be sent.
        while True:
            await self._socket.wait_writable()
            try:
                data = await self._socket.recv(self._receive_buffer_size)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return
            try:
                events = self._grpc_connection.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                # h2 has queued a GOAWAY saying what was wrong: send it, then fail.
                with trio.move_on_after(GOAWAY_TIMEOUT):
                    await self._socket.wait_sent()
                raise PeerProtocolError(str(exc) or type(exc).__name__) from exc
            if self._grpc_connection.preface_received:
                self.preface.set()
            await self._socket.flush()
            for event in events:
                if isinstance(event, WindowUpdated):
                    if event.stream_id == 0:
                        for stream in list(self._streams.values()):
                            await stream._set_flow_control_update()
                    elif event.stream_id in self._streams:
                        await self._streams[event.stream_id]._set_flow_control_update()
                elif isinstance(event, RequestReceived):
                    if self._calls.count >= self._max_streams:
                        self._grpc_connection.refuse_stream(event.stream_id)
                        await self._socket.flush()
                        continue
                    stream = self._allocate_stream(event.stream_id)
                    await stream._incoming_events[0].send(event)
                    self._calls.begin()
                    yield stream
                elif isinstance(event, StreamReset):
                    stream = self._streams.pop(event.stream_id, None)
                    if stream is not None:
                        stream.client_reset()
                else:
                    stream = self._streams.get(event.stream_id)
                    if stream is None:
                        if isinstance(event, MessageReceived):  # nobody will read it
                            self._grpc_connection.acknowledge_received_data(
                                event.stream_id, event.flow_controlled_length
                            )
                        continue
                    await stream._incoming_events[0].send(event)
                    if isinstance(event, RequestEnded | ResponseEnded):
                        stream._close_remote()


def _set_keepalive(stream: anyio.abc.ByteStream, idle: float) -> None:
    """TCP keep-alive probes after ``idle`` seconds of silence (``grpc.keepAliveTime``)."""
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
    if sock is None or not hasattr(socket, "TCP_KEEPIDLE") or not _is_tcp(stream):
        return
    seconds = max(1, int(idle))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, seconds)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, min(seconds, 30))
