"""The in-memory part of a job's log: what is kept, what leaves, and where a read is served from.

A :class:`LogWindow` is the bookkeeping of :class:`~joblet.actors.joblog.JobLog` without its
waiting and its I/O. It holds the chunks of the end of a job's merged log and decides:

- how new output becomes chunks (:meth:`LogWindow.append`: merged offsets, pieces of at most
  :data:`MAX_CHUNK`);
- which chunks may leave memory (they are on disk, see :meth:`LogWindow.mark_written`, and
  outside the last ``window_bytes`` of the log, or the log is closed and all on disk);
- where a read at an offset is served from (:meth:`LogWindow.read`): chunks from memory, a
  :class:`DiskRead` for older offsets, end of log, or nothing yet (the caller waits).

It never waits and never reads a file; the caller does both.
"""

from __future__ import annotations

from bisect import bisect_right
from operator import attrgetter

import attrs

from joblet.core.chunks import STREAM_NAMES, Chunk

#: Largest chunk stored: bigger appends are split, which bounds the size of a gzip member and so
#: the work of a random read.
MAX_CHUNK = 1 << 20

_chunk_offset = attrgetter("offset")


@attrs.frozen
class DiskRead:
    """A read the window cannot serve: its offset has left memory, so it goes to the files.

    Attributes:
        offset: Where the read starts (before :attr:`LogWindow.memory_start`).
        max_bytes: Most bytes to read.
        catch_up: Where memory started when the read was planned: a read that reaches it has
            caught up with memory, and what the file reader cached for sequential reading can go.
    """

    offset: int
    max_bytes: int
    catch_up: int


class LogWindow:
    """The chunks of one job's log held in memory, and the offsets that say which.

    Args:
        window_bytes: How much of the end of the log stays in memory once it is on disk, for
            live readers (negative counts as 0).
    """

    def __init__(self, window_bytes: int) -> None:
        self._window = max(0, window_bytes)
        # Chunks in memory are self._chunks[self._head:], contiguous, covering
        # [self._mem_start, self._size).
        self._chunks: list[Chunk] = []
        self._head = 0
        self._mem_start = 0
        self._mem_bytes = 0
        self._size = 0
        self._written = 0
        self._closed = False

    @classmethod
    def on_disk(cls, size: int) -> LogWindow:
        """The window of a closed log that is entirely on disk (``size`` bytes), none in memory."""
        window = cls(0)
        window._size = window._written = window._mem_start = size
        window._closed = True
        return window

    @property
    def size(self) -> int:
        """Bytes in the merged log so far."""
        return self._size

    @property
    def closed(self) -> bool:
        """Whether the log has ended (no more appends)."""
        return self._closed

    @property
    def written(self) -> int:
        """Bytes of the merged log known to be on disk."""
        return self._written

    @property
    def memory_bytes(self) -> int:
        """Bytes of log data held in memory."""
        return self._mem_bytes

    @property
    def memory_start(self) -> int:
        """Offset of the oldest byte still in memory (reads before it go to disk)."""
        return self._mem_start

    def append(self, stream: int, data: bytes, ts_ns: int) -> list[Chunk]:
        """Add output at the end of the log; returns the new chunks (to be written to disk).

        Args:
            stream: :data:`~joblet.core.chunks.STDOUT` or :data:`~joblet.core.chunks.STDERR`.
            data: The bytes (kept as they are: the caller passes an immutable copy).
            ts_ns: When they were read, in ns since the Unix epoch (every piece gets it).

        Raises:
            ValueError: Unknown stream, or the log is closed.
        """
        if stream not in STREAM_NAMES:
            raise ValueError(f"unknown stream {stream}")
        if self._closed:
            raise ValueError("the log is closed")
        n = len(data)
        new: list[Chunk] = []
        for start in range(0, n, MAX_CHUNK):
            piece = data if n <= MAX_CHUNK else data[start : start + MAX_CHUNK]
            chunk = Chunk(self._size, stream, piece, ts_ns)
            self._chunks.append(chunk)
            self._size += len(piece)
            self._mem_bytes += len(piece)
            new.append(chunk)
        self._evict()
        return new

    def close(self) -> bool:
        """End the log; returns False if it was already closed."""
        if self._closed:
            return False
        self._closed = True
        self._evict()
        return True

    def mark_written(self, upto: int) -> int:
        """Record that the log is on disk up to merged offset ``upto``.

        Returns:
            How many bytes this call found newly on disk (0 if ``upto`` is not news).

        Raises:
            ValueError: ``upto`` is beyond the end of the log.
        """
        if upto <= self._written:
            return 0
        if upto > self._size:
            raise ValueError(f"cannot mark written up to {upto}: the log has {self._size}")
        released = upto - self._written
        self._written = upto
        self._evict()
        return released

    def read(self, offset: int, max_bytes: int) -> list[Chunk] | DiskRead | None:
        """Where the log from ``offset`` (up to ``max_bytes``) is.

        Returns:
            From memory, the chunks: contiguous, the first starting exactly at ``offset`` (split
            if needed); ``[]`` at the end of a closed log. A :class:`DiskRead` if ``offset`` has
            left memory. None if there is nothing at ``offset`` yet (wait for more).

        Raises:
            ValueError: ``offset`` is negative or ``max_bytes`` is not positive.
        """
        if offset < 0 or max_bytes <= 0:
            raise ValueError(f"bad read: offset {offset}, max_bytes {max_bytes}")
        if offset >= self._size:
            return [] if self._closed else None
        if offset < self._mem_start:
            return DiskRead(offset, max_bytes, self._mem_start)
        chunks = self._chunks
        i = bisect_right(chunks, offset, lo=self._head, key=_chunk_offset) - 1
        out: list[Chunk] = []
        left = max_bytes
        while left > 0 and i < len(chunks):
            c = chunks[i]
            skip = offset - c.offset
            take = min(len(c.data) - skip, left)
            if skip == 0 and take == len(c.data):
                out.append(c)
            else:
                out.append(Chunk(offset, c.stream, c.data[skip : skip + take], c.ts_ns))
            offset += take
            left -= take
            i += 1
        return out

    def _evict(self) -> None:
        """Drop chunks that are on disk and outside the window (all on-disk ones once closed)."""
        if self._closed and self._written == self._size:
            limit = self._size
        else:
            limit = min(self._written, self._size - self._window)
        chunks = self._chunks
        i = self._head
        while i < len(chunks) and chunks[i].end <= limit:
            self._mem_bytes -= len(chunks[i].data)
            i += 1
        if i == self._head:
            return
        if i == len(chunks):
            chunks.clear()
            i = 0
        elif 2 * i >= len(chunks):
            # Evicted chunks must leave the list, or their data stays referenced: with big
            # chunks a few slots hold megabytes. Deleting only once they are at least half of
            # the list keeps the cost amortised O(1) per chunk.
            del chunks[:i]
            i = 0
        self._head = i
        self._mem_start = chunks[i].offset if i < len(chunks) else self._size
