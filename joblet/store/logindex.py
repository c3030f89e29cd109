"""The job log's on-disk index format (a pure codec: no I/O, no trio).

A job's log is one *merged* byte stream of chunks (:mod:`joblet.core.chunks`). On disk the
two streams are kept apart (``stdout.log.gz``, ``stderr.log.gz``, each a sequence of gzip members)
and a small index of fixed-size records, one per chunk, recovers the merged order, the timestamps
and where to find each chunk's bytes::

    offset  size  field
         0     8  merged_offset         offset of the chunk in the merged stream
         8     8  stream_offset         offset of the chunk in its own stream (uncompressed)
        16     8  ts_ns                 arrival time, ns since the Unix epoch (signed)
        24     8  member_file_offset    where the gzip member holding the chunk starts in the file
        32     8  member_stream_offset  stream offset of the member's first uncompressed byte
        40     4  member_length         compressed length of that member
        44     4  length                chunk length
        48     1  stream                1 = stdout, 2 = stderr
        49     1  version               RECORD_VERSION
        50     2  (zero)
        52     4  crc32                 of bytes 0..51

All integers are little-endian. A record is written only after the member it points to is
complete, so a crash leaves at worst a torn *trailing* record, which the CRC (or the missing bytes)
reveals and :func:`decode_records` drops.
"""

from __future__ import annotations

import struct
import zlib

import attrs

from joblet.core.chunks import STREAM_NAMES

#: Version byte of the record layout below.
RECORD_VERSION = 1
_BODY = struct.Struct("<QQqQQIIBBxx")
_CRC = struct.Struct("<I")
#: Size of one index record in bytes.
RECORD_SIZE = _BODY.size + _CRC.size


@attrs.frozen
class IndexRecord:
    """One chunk's entry in a job's log index (see the module docstring for the layout).

    Attributes:
        merged_offset: Offset of the chunk in the merged stream.
        stream: :data:`~joblet.core.chunks.STDOUT` or :data:`~joblet.core.chunks.STDERR`.
        stream_offset: Offset of the chunk in its own stream.
        length: Chunk length in bytes.
        ts_ns: Arrival time in ns since the Unix epoch.
        member_file_offset: Offset in the stream's gzip file where the chunk's member starts.
        member_stream_offset: Stream offset of the member's first uncompressed byte.
        member_length: Compressed length of the member, in bytes.
    """

    merged_offset: int
    stream: int
    stream_offset: int
    length: int
    ts_ns: int
    member_file_offset: int
    member_stream_offset: int
    member_length: int

    @property
    def merged_end(self) -> int:
        """Merged offset just past the chunk."""
        return self.merged_offset + self.length

    @property
    def offset_in_member(self) -> int:
        """Where the chunk starts in its member's uncompressed bytes."""
        return self.stream_offset - self.member_stream_offset


class RecordError(ValueError):
    """An index record is malformed (bad checksum, version or field)."""


def encode_record(rec: IndexRecord) -> bytes:
    """The record's :data:`RECORD_SIZE` bytes.

    Raises:
        RecordError: A field is out of range.
    """
    if rec.stream not in STREAM_NAMES:
        raise RecordError(f"unknown stream {rec.stream}")
    try:
        body = _BODY.pack(
            rec.merged_offset,
            rec.stream_offset,
            rec.ts_ns,
            rec.member_file_offset,
            rec.member_stream_offset,
            rec.member_length,
            rec.length,
            rec.stream,
            RECORD_VERSION,
        )
    except struct.error as e:
        raise RecordError(f"index record field out of range: {rec}") from e
    return body + _CRC.pack(zlib.crc32(body))


def encode_records(records: list[IndexRecord]) -> bytes:
    """Several records, concatenated (what one batch appends to the index file)."""
    return b"".join(encode_record(r) for r in records)


def decode_record(buf: bytes | bytearray | memoryview, pos: int = 0) -> IndexRecord:
    """The record at byte ``pos`` of ``buf``.

    Raises:
        RecordError: Fewer than :data:`RECORD_SIZE` bytes, a checksum mismatch (a torn or
            overwritten record), or an unknown version or stream.
    """
    if len(buf) - pos < RECORD_SIZE:
        raise RecordError("truncated index record")
    (
        merged_offset,
        stream_offset,
        ts_ns,
        member_file_offset,
        member_stream_offset,
        member_length,
        length,
        stream,
        version,
    ) = _BODY.unpack_from(buf, pos)
    (crc,) = _CRC.unpack_from(buf, pos + _BODY.size)
    if zlib.crc32(memoryview(buf)[pos : pos + _BODY.size]) != crc:
        raise RecordError("index record checksum mismatch")
    if version != RECORD_VERSION:
        raise RecordError(f"unknown index record version {version}")
    if stream not in STREAM_NAMES:
        raise RecordError(f"unknown stream {stream}")
    if stream_offset < member_stream_offset:
        raise RecordError("index record starts before its member")
    return IndexRecord(
        merged_offset=merged_offset,
        stream=stream,
        stream_offset=stream_offset,
        length=length,
        ts_ns=ts_ns,
        member_file_offset=member_file_offset,
        member_stream_offset=member_stream_offset,
        member_length=member_length,
    )


def decode_records(buf: bytes | bytearray | memoryview) -> list[IndexRecord]:
    """Every complete, valid record at the start of ``buf``, in order.

    Decoding stops at the first record that is torn (too short, as after a crash mid-write) or
    fails its checksum; that record and everything after it are ignored, so the result is always
    a prefix of what was written.
    """
    records = []
    for pos in range(0, len(buf) - RECORD_SIZE + 1, RECORD_SIZE):
        try:
            records.append(decode_record(buf, pos))
        except RecordError:
            break
    return records
