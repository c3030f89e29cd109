"""The server's sans-IO transport limits, on bytes: an h2 client's frames in, events out, no socket.

:class:`~joblet.rpc.transport.ServerConnection` must turn an oversized, undecompressible or
reset request into an event on its own stream, hand the stream's flow-control window back to the
connection, and keep serving the others (end to end, with grpcio, in ``test_grpc.py``).
"""

from __future__ import annotations

import gzip
import struct
from typing import Any

import h2.config  # type: ignore[import-untyped]
import h2.connection  # type: ignore[import-untyped]
import h2.settings  # type: ignore[import-untyped]
import pytest
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.events import MessageReceived, RequestEnded, RequestReceived

from joblet.core.errors import InvalidRequest, ResourceExhausted
from joblet.rpc.transport import (
    MAX_FRAME_SIZE,
    RequestRejected,
    ServerConnection,
    StreamReset,
    connection_window,
)

LIMIT = 1000  # maxRecvMsgSize of these connections
STREAMS = 7  # maxConcurrentStreams of these connections


class RecordingConnection(ServerConnection):
    """Our server connection, noting the bytes it hands back to the flow-control window (h2
    sends WINDOW_UPDATE only once they add up to half a window)."""

    def __init__(self, config: Any, *, max_recv: int) -> None:
        self.acknowledged: dict[int, int] = {}
        super().__init__(config, max_recv=max_recv, max_streams=STREAMS)

    def acknowledge_received_data(self, stream_id: int, flow_controlled_length: int) -> None:
        self.acknowledged[stream_id] = self.acknowledged.get(stream_id, 0) + flow_controlled_length
        super().acknowledge_received_data(stream_id, flow_controlled_length)


class Pair:
    """An h2 client and our server connection, wired back to back in memory."""

    def __init__(self, max_recv: int = LIMIT) -> None:
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.server = RecordingConnection(GRPCConfiguration(client_side=False), max_recv=max_recv)
        self.client.initiate_connection()
        self.server.initiate_connection()
        self.to_server()
        self.to_client()
        self.to_server()  # the client's SETTINGS ack

    def to_server(self) -> list[Any]:
        """Deliver what the client has written; the server's events."""
        events: list[Any] = self.server.receive_data(self.client.data_to_send())
        return events

    def to_client(self) -> list[Any]:
        """Deliver what the server has written; the client's events."""
        events: list[Any] = self.client.receive_data(self.server.data_to_send())
        return events

    def start_call(self, encoding: str | None = None) -> int:
        """Open a call's stream with its headers; its stream id."""
        sid: int = self.client.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/joblet.JobService/ListJobs"),
            (":authority", "localhost"),
            ("te", "trailers"),
            ("content-type", "application/grpc"),
        ]
        if encoding is not None:
            headers.append(("grpc-encoding", encoding))
        self.client.send_headers(sid, headers)
        return sid

    def send_message(self, sid: int, payload: bytes, *, compressed: bool = False) -> int:
        """Send one length-prefixed gRPC message and end the stream; the bytes sent."""
        data = struct.pack(">?I", compressed, len(payload)) + payload
        self.client.send_data(sid, data, end_stream=True)
        return len(data)


def test_settings_give_each_stream_room_for_one_request() -> None:
    pair = Pair()
    codes = h2.settings.SettingCodes
    assert pair.client.remote_settings[codes.MAX_CONCURRENT_STREAMS] == STREAMS
    assert pair.client.remote_settings[codes.INITIAL_WINDOW_SIZE] == 65535  # max(64 KiB, limit)
    big = Pair(max_recv=1 << 20)
    assert big.client.remote_settings[codes.INITIAL_WINDOW_SIZE] == (1 << 20) + 5


def test_frames_and_the_connection_window_are_bounded() -> None:
    pair = Pair()
    codes = h2.settings.SettingCodes
    assert pair.client.remote_settings[codes.MAX_FRAME_SIZE] == MAX_FRAME_SIZE == 16384
    assert pair.client.outbound_flow_control_window == connection_window(LIMIT) == 4 << 20
    assert connection_window(64 << 20) == 2 * ((64 << 20) + 5)
    assert pair.server.preface_received


def test_the_preface_is_noticed() -> None:
    server = RecordingConnection(GRPCConfiguration(client_side=False), max_recv=LIMIT)
    server.initiate_connection()
    server.receive_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert not server.preface_received
    server.receive_data(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # SETTINGS, empty
    assert server.preface_received


def test_a_message_within_the_limit_is_received() -> None:
    pair = Pair()
    sid = pair.start_call()
    pair.send_message(sid, b"x" * LIMIT)
    events = pair.to_server()
    assert [type(e) for e in events] == [RequestReceived, MessageReceived, RequestEnded]
    assert events[1].data == b"x" * LIMIT


def test_an_oversized_message_is_rejected_on_its_stream_and_its_window_returned() -> None:
    pair = Pair()
    sid = pair.start_call()
    sent = pair.send_message(sid, b"x" * (LIMIT + 1))
    events = pair.to_server()
    rejected = [e for e in events if isinstance(e, RequestRejected)]
    assert len(rejected) == 1 and rejected[0].stream_id == sid
    assert isinstance(rejected[0].error, ResourceExhausted)
    assert str(rejected[0].error) == (
        f"request message too large: {LIMIT + 1} bytes (maxRecvMsgSize is {LIMIT})"
    )
    assert pair.server.acknowledged == {sid: sent}
    # The connection carries on: the next call is read as usual.
    other = pair.start_call()
    pair.send_message(other, b"ok")
    assert [e.data for e in pair.to_server() if isinstance(e, MessageReceived)] == [b"ok"]


def test_gzip_messages_are_limited_after_decompression() -> None:
    pair = Pair()
    small = pair.start_call("gzip")
    pair.send_message(small, gzip.compress(b"y" * LIMIT), compressed=True)
    assert [e.data for e in pair.to_server() if isinstance(e, MessageReceived)] == [b"y" * LIMIT]
    bomb = pair.start_call("gzip")
    pair.send_message(bomb, gzip.compress(b"z" * (LIMIT * 100)), compressed=True)
    (rejected,) = [e for e in pair.to_server() if isinstance(e, RequestRejected)]
    assert isinstance(rejected.error, ResourceExhausted)
    assert str(rejected.error) == (
        f"request message too large once decompressed (maxRecvMsgSize is {LIMIT})"
    )


@pytest.mark.parametrize(
    ("encoding", "payload", "message"),
    [
        (
            "snappy",
            b"anything",
            "invalid request: compressed message with unsupported grpc-encoding 'snappy'",
        ),
        (None, b"anything", "invalid request: compressed message with unsupported grpc-encoding"),
        ("gzip", b"not gzip at all", "invalid request: corrupt compressed message"),
        ("gzip", gzip.compress(b"w" * 100)[:-12], "invalid request: truncated compressed message"),
    ],
)
def test_undecompressible_messages_are_invalid(
    encoding: str | None, payload: bytes, message: str
) -> None:
    pair = Pair()
    sid = pair.start_call(encoding)
    sent = pair.send_message(sid, payload, compressed=True)
    (rejected,) = [e for e in pair.to_server() if isinstance(e, RequestRejected)]
    assert isinstance(rejected.error, InvalidRequest)
    assert str(rejected.error).startswith(message)
    assert pair.server.acknowledged == {sid: sent}


def test_a_reset_stream_becomes_an_event_and_returns_its_unread_bytes() -> None:
    pair = Pair()
    sid = pair.start_call()
    # Half a message: the server holds it, waiting for the rest.
    half = struct.pack(">?I", False, 600) + b"h" * 300
    pair.client.send_data(sid, half)
    assert not [e for e in pair.to_server() if isinstance(e, MessageReceived)]
    pair.client.reset_stream(sid)
    events = pair.to_server()
    assert [(type(e), e.stream_id) for e in events] == [(StreamReset, sid)]
    assert pair.server.acknowledged == {sid: len(half)}
