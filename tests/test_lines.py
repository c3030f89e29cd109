"""Line assembly from chunks, without files: lines, timestamps, order, partial last lines."""

from __future__ import annotations

from joblet.core.chunks import STDERR, STDOUT, Chunk
from joblet.core.lines import MAX_LINE_BYTES, NO_STOP, LineAssembler, LineQuery

OUT, ERR = STDOUT, STDERR


def assemble(
    parts: list[tuple[int, bytes, int]], query: LineQuery | None = None, stop: int = NO_STOP
) -> list[tuple[int, int, str]]:
    """Feed (stream, data, ts) chunks in order, finish, and flatten the lines."""
    asm = LineAssembler(query or LineQuery())
    asm.stop = stop
    offset = 0
    out = []
    for stream, data, ts in parts:
        asm.feed(Chunk(offset, stream, data, ts))
        offset += len(data)
        out.extend(asm.take())
    asm.finish(offset)
    out.extend(asm.take())
    assert asm.done and not asm.has_output
    return [(ts, stream, line.decode()) for ts, stream, group in out for line in group]


def test_lines_take_the_time_of_the_chunk_they_start_in() -> None:
    assert assemble([(OUT, b"a\nb", 1), (OUT, b"c\nd\n", 2)]) == [
        (1, OUT, "a"),
        (1, OUT, "bc"),
        (2, OUT, "d"),
    ]


def test_a_last_line_without_newline_is_a_line_once_the_log_ends() -> None:
    asm = LineAssembler(LineQuery())
    asm.feed(Chunk(0, OUT, b"done\npartial", 5))
    assert asm.take() == [(5, OUT, [b"done"])]
    assert not asm.done
    asm.finish(12)
    assert asm.take() == [(5, OUT, [b"partial"])]
    assert asm.done


def test_streams_never_mix_and_lines_come_in_start_order() -> None:
    # stdout starts a line, stderr writes two whole lines, stdout finishes its line.
    got = assemble([(OUT, b"slow ", 1), (ERR, b"e1\ne2\n", 2), (OUT, b"line\n", 3)])
    assert got == [(1, OUT, "slow line"), (2, ERR, "e1"), (2, ERR, "e2")]


def test_a_character_split_across_chunks_is_joined_and_bad_bytes_are_replaced() -> None:
    snow = "☃".encode()
    got = assemble([(OUT, snow[:1], 1), (OUT, snow[1:] + b"\xff\n", 2)])
    assert got == [(1, OUT, "☃\ufffd")]


def test_an_overlong_line_is_cut_between_chunks() -> None:
    big = b"x" * MAX_LINE_BYTES
    got = assemble([(OUT, big, 1), (OUT, b"tail\n", 2)])
    assert [(ts, len(line)) for ts, _, line in got] == [(1, MAX_LINE_BYTES), (2, 4)]


def test_query_filters_streams_time_and_count() -> None:
    parts = [(OUT, b"o1\n", 1), (ERR, b"e1\n", 2), (OUT, b"o2\no3\n", 3), (OUT, b"o4\n", 4)]
    assert assemble(parts, LineQuery(streams=frozenset({ERR}))) == [(2, ERR, "e1")]
    assert assemble(parts, LineQuery(start_ns=2, end_ns=4)) == [
        (2, ERR, "e1"),
        (3, OUT, "o2"),
        (3, OUT, "o3"),
    ]
    assert assemble(parts, LineQuery(limit=2)) == [(1, OUT, "o1"), (2, ERR, "e1")]
    assert assemble(parts, LineQuery(streams=frozenset())) == []


def test_past_the_stop_offset_it_ends_once_no_line_started_before_it() -> None:
    # "b" starts before the stop at offset 3 and is finished after it; "c" starts after it.
    parts = [(OUT, b"a\nb", 1), (OUT, b"b\n", 2), (OUT, b"c\n", 9)]
    assert assemble(parts, stop=3) == [(1, OUT, "a"), (1, OUT, "bb")]
    assert assemble(parts) == [(1, OUT, "a"), (1, OUT, "bb"), (9, OUT, "c")]


def test_abandon_ends_without_lines() -> None:
    asm = LineAssembler(LineQuery())
    asm.abandon()
    asm.feed(Chunk(0, OUT, b"ignored\n", 1))
    asm.finish(8)
    assert asm.done and asm.take() == []
