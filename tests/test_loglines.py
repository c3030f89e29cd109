"""Lines of a persisted log: timestamps, order across streams, filters, against a reference.

Logs are written by the real :class:`LogFileWriter` into ``tmp_path``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from joblet.core import lines as core_lines
from joblet.core.chunks import STDERR, STDOUT, Chunk
from joblet.core.lines import LineQuery, Lines
from joblet.store.logfiles import LogFileWriter
from joblet.store.loglines import LogLineReader

OUT, ERR = STDOUT, STDERR


def write_log(job_dir: Path, pieces: Sequence[tuple[int, bytes, int]], batch: int = 3) -> None:
    """Write (stream, data, ts_ns) pieces as chunks, a few per batch."""
    writer = LogFileWriter(job_dir)
    chunks = []
    offset = 0
    for stream, data, ts in pieces:
        chunks.append(Chunk(offset, stream, data, ts))
        offset += len(data)
    try:
        for i in range(0, len(chunks), batch):
            writer.append(chunks[i : i + batch])
    finally:
        writer.close()


Line = tuple[int, int, str]


def flat(groups: list[Lines]) -> list[Line]:
    """(ts, stream, text) per line; the bytes must be valid UTF-8."""
    return [(ts, stream, line.decode()) for ts, stream, lines in groups for line in lines]


def read_all(
    job_dir: Path, query: LineQuery | None = None, read_bytes: int = 1 << 20
) -> list[Line]:
    reader = LogLineReader(job_dir, query or LineQuery())
    out: list[Line] = []
    while not reader.done:
        out += flat(reader.next_batch(read_bytes))
    return out


def reference(pieces: Sequence[tuple[int, bytes, int]], query: LineQuery) -> list[Line]:
    """The whole log in memory, the obvious way."""
    starts: list[tuple[int, int, int, bytes]] = []  # (merged offset, ts, stream, line bytes)
    current: dict[int, tuple[int, int, bytearray] | None] = {OUT: None, ERR: None}
    offset = 0
    for stream, data, ts in pieces:
        for i, byte in enumerate(data):
            line = current[stream]
            if line is None:
                line = current[stream] = (offset + i, ts, bytearray())
            if byte == 0x0A:
                starts.append((line[0], line[1], stream, bytes(line[2])))
                current[stream] = None
            else:
                line[2].append(byte)
        offset += len(data)
    for stream, line in current.items():
        if line is not None:
            starts.append((line[0], line[1], stream, bytes(line[2])))
    starts.sort()
    low = query.start_ns if query.start_ns is not None else -(10**30)
    high = query.end_ns if query.end_ns is not None else 10**30
    out = [
        (ts, stream, data.decode("utf-8", "replace"))
        for _, ts, stream, data in starts
        if stream in query.streams and low <= ts < high
    ]
    return out[: query.limit] if query.limit else out


def test_lines_take_the_timestamp_of_the_chunk_they_start_in(tmp_path: Path) -> None:
    write_log(
        tmp_path,
        [(OUT, b"one\ntw", 10), (OUT, b"o\nthr", 20), (OUT, b"ee", 30), (OUT, b"\nfour\n", 40)],
    )
    assert read_all(tmp_path) == [
        (10, OUT, "one"),
        (10, OUT, "two"),
        (20, OUT, "three"),
        (40, OUT, "four"),
    ]


def test_a_line_starting_after_a_newline_at_a_chunk_end_takes_the_next_chunk(
    tmp_path: Path,
) -> None:
    write_log(tmp_path, [(OUT, b"a\n", 1), (OUT, b"b\n\n", 2)])
    assert read_all(tmp_path) == [(1, OUT, "a"), (2, OUT, "b"), (2, OUT, "")]


def test_lines_keep_their_start_order_across_streams(tmp_path: Path) -> None:
    # stdout starts a line, stderr writes two whole lines, stdout finishes its line.
    write_log(
        tmp_path,
        [(OUT, b"progress ", 1), (ERR, b"warn 1\nwarn 2\n", 2), (OUT, b"done\nnext\n", 3)],
    )
    assert read_all(tmp_path) == [
        (1, OUT, "progress done"),
        (2, ERR, "warn 1"),
        (2, ERR, "warn 2"),
        (3, OUT, "next"),
    ]


def test_a_last_line_without_newline_is_returned(tmp_path: Path) -> None:
    write_log(tmp_path, [(OUT, b"a\nb", 1), (ERR, b"e", 2)])
    assert read_all(tmp_path) == [(1, OUT, "a"), (1, OUT, "b"), (2, ERR, "e")]


def test_invalid_utf8_is_replaced_and_split_characters_are_joined(tmp_path: Path) -> None:
    euro = "€".encode()
    write_log(
        tmp_path,
        [
            (OUT, b"bad \xff\xfe\n" + euro[:1], 1),
            (OUT, euro[1:] + b" ok\n", 2),
            (ERR, b"\xe2\x82", 3),
        ],
    )
    assert read_all(tmp_path) == [
        (1, OUT, "bad \ufffd\ufffd"),
        (1, OUT, "€ ok"),
        (3, ERR, "\ufffd"),
    ]


def test_stream_filter_and_limit(tmp_path: Path) -> None:
    write_log(tmp_path, [(OUT, b"o1\n", 1), (ERR, b"e1\n", 2), (OUT, b"o2\no3\n", 3)])
    assert read_all(tmp_path, LineQuery(streams=frozenset({ERR}))) == [(2, ERR, "e1")]
    assert read_all(tmp_path, LineQuery(streams=frozenset({OUT}), limit=2)) == [
        (1, OUT, "o1"),
        (3, OUT, "o2"),
    ]
    assert read_all(tmp_path, LineQuery(limit=3)) == [
        (1, OUT, "o1"),
        (2, ERR, "e1"),
        (3, OUT, "o2"),
    ]


def test_time_window_is_start_inclusive_end_exclusive(tmp_path: Path) -> None:
    write_log(tmp_path, [(OUT, f"l{t}\n".encode(), t) for t in range(10)])
    got = read_all(tmp_path, LineQuery(start_ns=3, end_ns=6))
    assert got == [(3, OUT, "l3"), (4, OUT, "l4"), (5, OUT, "l5")]
    assert read_all(tmp_path, LineQuery(start_ns=100)) == []
    assert read_all(tmp_path, LineQuery(end_ns=0)) == []
    assert read_all(tmp_path, LineQuery(start_ns=5, end_ns=5)) == []


def test_a_missing_directory_is_an_empty_log(tmp_path: Path) -> None:
    assert read_all(tmp_path / "nothing") == []
    assert read_all(tmp_path / "nothing", LineQuery(start_ns=1, end_ns=2)) == []


def test_a_growing_log_is_read_as_it_was_when_the_reader_started(tmp_path: Path) -> None:
    writer = LogFileWriter(tmp_path)
    try:
        writer.append([Chunk(0, OUT, b"a\nb\n", 1)])
        reader = LogLineReader(tmp_path, LineQuery())
        first = flat(reader.next_batch(2))  # the reader has looked: its end is fixed
        writer.append([Chunk(4, OUT, b"c\n", 2)])
        rest: list[Line] = []
        while not reader.done:
            rest += flat(reader.next_batch(2))
        assert first + rest == [(1, OUT, "a"), (1, OUT, "b")]
        assert read_all(tmp_path) == [(1, OUT, "a"), (1, OUT, "b"), (2, OUT, "c")]
    finally:
        writer.close()


def test_an_overlong_line_comes_in_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core_lines, "MAX_LINE_BYTES", 10)
    write_log(tmp_path, [(OUT, b"x" * 6, 1), (OUT, b"y" * 6, 2), (OUT, b"z\n", 3)])
    assert read_all(tmp_path) == [(1, OUT, "xxxxxxyyyyyy"), (3, OUT, "z")]


def test_held_lines_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core_lines, "MAX_HELD_BYTES", 8)
    write_log(
        tmp_path,
        [(OUT, b"slow", 1), (ERR, b"e1\ne2\n", 2), (ERR, b"e3\ne4\ne5\n", 3), (OUT, b" end\n", 4)],
    )
    # stdout's unfinished line is let out once stderr's waiting lines pass the bound.
    assert read_all(tmp_path) == [
        (1, OUT, "slow"),
        (2, ERR, "e1"),
        (2, ERR, "e2"),
        (3, ERR, "e3"),
        (3, ERR, "e4"),
        (3, ERR, "e5"),
        (4, OUT, " end"),
    ]


@pytest.mark.parametrize("seed", range(40))
def test_random_logs_match_the_reference(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    alphabet = [b"a", b"b", b"\n", b"\n", "€".encode(), b"\xff", "é".encode()]
    pieces = []
    ts = 1_000
    monotonic = seed % 4 != 0
    for _ in range(rng.randint(0, 60)):
        raw = b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        # Split characters across chunks now and then.
        cut = rng.randint(1, len(raw))
        ts += rng.randint(0, 3) if monotonic else rng.randint(-3, 3)
        stream = rng.choice((OUT, ERR))
        pieces.append((stream, raw[:cut], ts))
        if raw[cut:]:
            pieces.append((stream, raw[cut:], ts + 1))
    job_dir = tmp_path / "job"
    write_log(job_dir, pieces, batch=rng.randint(1, 5))
    for _ in range(15):
        query = LineQuery(
            streams=rng.choice([frozenset({OUT, ERR}), frozenset({OUT}), frozenset({ERR})]),
            start_ns=rng.choice([None, ts - rng.randint(0, 100)]),
            end_ns=rng.choice([None, ts - rng.randint(-5, 100)]),
            limit=rng.choice([0, 0, rng.randint(1, 20)]),
        )
        got = read_all(job_dir, query, read_bytes=rng.randint(1, 64))
        assert got == reference(pieces, query), query
