"""The Persist Service's wire encoding: answers built from what is on disk.

``QueryLogsResponse`` messages are encoded by hand (:func:`encode_log_responses`): building a
protobuf object per line costs about five times more than the rest of a query, and the layout is
three fields. ``QueryMetricsResponse`` messages are built with protobuf (:func:`metric_messages`).
Pure functions of their input: no I/O, testable on bytes.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate, chain
from operator import add
from typing import Any

from joblet.core.chunks import STREAM_NAMES
from joblet.core.lines import Lines
from joblet.core.samples import MetricRecord
from joblet.protocol import persist_pb2 as pb

#: Samples per ``QueryMetricsResponse``.
METRIC_BATCH = 1000


class EncodedMessage:
    """A message serialized already: what :func:`encode_log_responses` makes.

    The server sends a message through ``ByteSize()`` and ``SerializeToString()`` only (see
    :class:`joblet.rpc.dispatch.Dispatcher`), which this provides.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def ByteSize(self) -> int:
        """Size of the serialized message."""
        return len(self.data)

    def SerializeToString(self) -> bytes:
        """The serialized message."""
        return self.data


def encode_log_responses(groups: list[Lines], *, target: int, piece: int) -> list[EncodedMessage]:
    """``QueryLogsResponse`` messages holding ``groups``' lines, each about ``target`` bytes.

    Lines are valid UTF-8 already (see
    :mod:`joblet.store.loglines`); one longer than ``piece`` bytes is sent as several entries
    with the same timestamp, cut between characters, so that no message is larger than
    ``piece`` plus one entry's framing.
    """
    messages: list[EncodedMessage] = []
    parts: list[bytes] = []
    size = 0
    for ts, stream, lines in groups:
        if max(map(len, lines)) > piece:
            lines = [p for line in lines for p in _pieces(line, piece)]
        prefix = _TIMESTAMP_TAG + _varint(ts) + _STREAM_FIELDS[stream] + _CONTENT_TAG
        lengths = list(map(len, lines))
        heads = {n: _entry_head(prefix, n) for n in set(lengths)}
        head_of = list(map(heads.__getitem__, lengths))
        # ends[i]: bytes of lines 0..i with their heads.
        ends = list(accumulate(map(add, map(len, head_of), lengths)))
        start = 0
        while start < len(lines):
            base = ends[start - 1] if start else 0
            stop = bisect_right(ends, base + target - size, lo=start)
            if stop == start:
                if size:  # this message is full: the next line starts a new one
                    messages.append(EncodedMessage(b"".join(parts)))
                    parts, size = [], 0
                    continue
                stop = start + 1  # a line larger than ``target`` goes alone
            parts.extend(
                chain.from_iterable(zip(head_of[start:stop], lines[start:stop], strict=True))
            )
            size += ends[stop - 1] - base
            start = stop
    if parts:
        messages.append(EncodedMessage(b"".join(parts)))
    return messages


# Field keys of LogEntry (timestamp = 1 varint, stream = 2 and content = 3 length-delimited) and
# of QueryLogsResponse.entries (1, length-delimited).
_TIMESTAMP_TAG = b"\x08"
_CONTENT_TAG = b"\x1a"
_ENTRIES_TAG = b"\x0a"
_STREAM_FIELDS = {
    stream: b"\x12" + bytes([len(name)]) + name.encode() for stream, name in STREAM_NAMES.items()
}


def _varint(n: int) -> bytes:
    """Protobuf's base-128 varint; a negative int64 takes ten bytes (two's complement)."""
    n &= (1 << 64) - 1
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _entry_head(prefix: bytes, n: int) -> bytes:
    """What precedes an ``n``-byte line in the message: the entry's key and length, its
    timestamp and stream fields, the content's key and length."""
    length = _varint(n)
    return _ENTRIES_TAG + _varint(len(prefix) + len(length) + n) + prefix + length


def _pieces(line: bytes, size: int) -> list[bytes]:
    """``line`` cut into pieces of at most ``size`` bytes, never inside a UTF-8 character."""
    out = []
    start = 0
    while len(line) - start > size:
        cut = start + size
        while line[cut] & 0xC0 == 0x80:  # a continuation byte: back to the character's start
            cut -= 1
        out.append(line[start:cut])
        start = cut
    out.append(line[start:])
    return out


def metric_messages(records: list[MetricRecord]) -> list[Any]:
    """``QueryMetricsResponse`` messages holding ``records``, :data:`METRIC_BATCH` per message."""
    messages = []
    for i in range(0, len(records), METRIC_BATCH):
        message = pb.QueryMetricsResponse()
        add = message.samples.add
        for r in records[i : i + METRIC_BATCH]:
            add(timestamp=r.timestamp_ns, metric_type=r.metric_type, values=r.values)
        messages.append(message)
    return messages
