"""The log window: chunking, eviction to the window, and where each read is served from."""

from __future__ import annotations

import pytest

from joblet.core.chunks import STDERR, STDOUT, Chunk
from joblet.core.logwindow import MAX_CHUNK, DiskRead, LogWindow

TS = 1_700_000_000_000_000_000


def test_append_places_chunks_at_merged_offsets_and_keeps_them_until_on_disk() -> None:
    w = LogWindow(window_bytes=0)
    assert w.append(STDOUT, b"abc", TS) == [Chunk(0, STDOUT, b"abc", TS)]
    assert w.append(STDERR, b"de", TS + 1) == [Chunk(3, STDERR, b"de", TS + 1)]
    assert (w.size, w.written, w.memory_bytes, w.memory_start) == (5, 0, 5, 0)
    # Not on disk: kept, whatever the window size.
    assert w.read(0, 100) == [Chunk(0, STDOUT, b"abc", TS), Chunk(3, STDERR, b"de", TS + 1)]


def test_a_big_append_is_split_into_pieces_of_at_most_max_chunk_with_one_timestamp() -> None:
    w = LogWindow(window_bytes=0)
    data = bytes(MAX_CHUNK * 2 + 7)
    chunks = w.append(STDOUT, data, TS)
    assert [len(c.data) for c in chunks] == [MAX_CHUNK, MAX_CHUNK, 7]
    assert [c.offset for c in chunks] == [0, MAX_CHUNK, 2 * MAX_CHUNK]
    assert {c.ts_ns for c in chunks} == {TS}
    assert b"".join(c.data for c in chunks) == data


def test_chunks_on_disk_leave_memory_once_outside_the_window() -> None:
    w = LogWindow(window_bytes=4)
    for i in range(5):
        w.append(STDOUT, b"%d%d" % (i, i), TS + i)  # chunks of 2 bytes at 0, 2, 4, 6, 8
    assert w.mark_written(6) == 6
    # On disk up to 6, window is the last 4 bytes (6..10): chunks ending at or before 6 go.
    assert (w.memory_start, w.memory_bytes) == (6, 4)
    assert w.mark_written(10) == 4
    assert (w.memory_start, w.memory_bytes) == (6, 4)  # all on disk, but inside the window
    assert w.mark_written(8) == 0  # old news


def test_closing_a_log_that_is_all_on_disk_empties_memory() -> None:
    w = LogWindow(window_bytes=1 << 20)
    w.append(STDOUT, b"hello", TS)
    w.mark_written(5)
    assert w.memory_bytes == 5
    assert w.close() is True
    assert (w.memory_bytes, w.memory_start) == (0, 5)
    assert w.close() is False


def test_closing_keeps_what_is_not_on_disk_until_it_is() -> None:
    w = LogWindow(window_bytes=0)
    w.append(STDOUT, b"hello", TS)
    w.close()
    assert w.memory_bytes == 5
    w.mark_written(5)
    assert w.memory_bytes == 0


def test_read_splits_at_the_offset_and_at_max_bytes() -> None:
    w = LogWindow(window_bytes=100)
    w.append(STDOUT, b"abcdef", TS)
    w.append(STDERR, b"ghij", TS + 1)
    assert w.read(2, 5) == [Chunk(2, STDOUT, b"cdef", TS), Chunk(6, STDERR, b"g", TS + 1)]
    assert w.read(9, 100) == [Chunk(9, STDERR, b"j", TS + 1)]


def test_read_says_wait_at_the_end_of_an_open_log_and_end_of_a_closed_one() -> None:
    w = LogWindow(window_bytes=100)
    assert w.read(0, 10) is None
    w.append(STDOUT, b"x", TS)
    assert w.read(1, 10) is None
    w.close()
    assert w.read(1, 10) == []
    assert w.read(50, 10) == []


def test_read_before_memory_goes_to_disk_and_says_where_memory_starts() -> None:
    w = LogWindow(window_bytes=2)
    w.append(STDOUT, b"aaaa", TS)
    w.append(STDOUT, b"bb", TS)
    w.mark_written(6)
    assert w.memory_start == 4
    assert w.read(1, 10) == DiskRead(offset=1, max_bytes=10, catch_up=4)
    assert w.read(4, 10) == [Chunk(4, STDOUT, b"bb", TS)]


def test_a_log_on_disk_reads_everything_from_disk() -> None:
    w = LogWindow.on_disk(10)
    assert (w.size, w.written, w.closed, w.memory_bytes) == (10, 10, True, 0)
    assert w.read(0, 4) == DiskRead(0, 4, 10)
    assert w.read(10, 4) == []


def test_evicted_chunks_leave_the_list_so_their_data_is_freed() -> None:
    w = LogWindow(window_bytes=0)
    for i in range(100):
        w.append(STDOUT, b"x", TS)
        w.mark_written(i + 1)
    assert w.memory_bytes == 0
    assert len(w._chunks) <= 1


def test_bad_calls_are_refused() -> None:
    w = LogWindow(window_bytes=0)
    with pytest.raises(ValueError, match="unknown stream"):
        w.append(3, b"x", TS)
    w.append(STDOUT, b"x", TS)
    with pytest.raises(ValueError, match="cannot mark written up to 2"):
        w.mark_written(2)
    with pytest.raises(ValueError, match="bad read"):
        w.read(-1, 1)
    with pytest.raises(ValueError, match="bad read"):
        w.read(0, 0)
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.append(STDOUT, b"x", TS)
