"""The log index codec: round trips and tolerance of torn or damaged records (no I/O)."""

from __future__ import annotations

import attrs
import pytest

from joblet.core.chunks import STDERR, STDOUT, Chunk
from joblet.store.logindex import (
    RECORD_SIZE,
    IndexRecord,
    RecordError,
    decode_record,
    decode_records,
    encode_record,
    encode_records,
)


def _records() -> list[IndexRecord]:
    return [
        IndexRecord(
            merged_offset=0,
            stream=STDOUT,
            stream_offset=0,
            length=10,
            ts_ns=1_700_000_000_000_000_000,
            member_file_offset=0,
            member_stream_offset=0,
            member_length=30,
        ),
        IndexRecord(
            merged_offset=10,
            stream=STDERR,
            stream_offset=0,
            length=5,
            ts_ns=1_700_000_000_000_000_001,
            member_file_offset=0,
            member_stream_offset=0,
            member_length=25,
        ),
        IndexRecord(
            merged_offset=(1 << 40) + 3,
            stream=STDOUT,
            stream_offset=(1 << 40) - 7,
            length=(1 << 32) - 1,
            ts_ns=-1,  # before the epoch: still representable
            member_file_offset=(1 << 50),
            member_stream_offset=(1 << 40) - 100,
            member_length=(1 << 32) - 1,
        ),
    ]


def test_records_round_trip() -> None:
    records = _records()
    buf = encode_records(records)
    assert len(buf) == RECORD_SIZE * len(records)
    assert decode_records(buf) == records
    assert decode_record(buf, RECORD_SIZE) == records[1]
    assert records[2].merged_end == (1 << 40) + 3 + (1 << 32) - 1
    assert records[2].offset_in_member == 93


def test_a_torn_trailing_record_is_ignored() -> None:
    records = _records()
    buf = encode_records(records)
    for cut in range(1, RECORD_SIZE):
        assert decode_records(buf[:-cut]) == records[:2]
    assert decode_records(b"") == []
    assert decode_records(buf[: RECORD_SIZE - 1]) == []


def test_a_damaged_record_ends_the_valid_prefix() -> None:
    records = _records()
    buf = bytearray(encode_records(records))
    buf[RECORD_SIZE + 3] ^= 0xFF  # flip bits inside the second record
    assert decode_records(bytes(buf)) == records[:1]
    zeros = encode_records(records[:1]) + bytes(RECORD_SIZE)  # a zero-filled tail after a crash
    assert decode_records(zeros) == records[:1]
    with pytest.raises(RecordError, match="checksum"):
        decode_record(bytes(buf), RECORD_SIZE)


def test_encoding_rejects_bad_fields() -> None:
    good = _records()[0]
    with pytest.raises(RecordError, match="stream"):
        encode_record(IndexRecord(**{**attrs.asdict(good), "stream": 3}))
    with pytest.raises(RecordError, match="out of range"):
        encode_record(IndexRecord(**{**attrs.asdict(good), "length": 1 << 32}))
    with pytest.raises(RecordError, match="out of range"):
        encode_record(IndexRecord(**{**attrs.asdict(good), "merged_offset": -1}))


def test_chunk_end() -> None:
    assert Chunk(offset=7, stream=STDERR, data=b"abc", ts_ns=0).end == 10
