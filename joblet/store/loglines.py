"""A job's persisted log as timestamped lines (blocking I/O, meant for a worker thread).

The log on disk is a merged byte stream of stdout and stderr chunks, each with the time it was
read from the job (:mod:`joblet.store.logfiles`). :class:`LogLineReader` turns it into lines:

- a line is the bytes of one stream up to a newline (not included); stdout and stderr lines never
  mix, even when the job interleaved partial lines of both;
- a line's timestamp is that of the chunk holding its first byte, so a line split across chunks
  takes the time it started;
- lines come in the order they started in the merged log, so their timestamps never go backwards
  (while one stream has an unfinished line, finished lines of the other stream that started later
  wait for it, up to :data:`MAX_HELD_BYTES`);
- lines are valid UTF-8: bytes that are not are replaced (U+FFFD), never an error; a character
  split across chunks is joined;
- a last line without a newline is still a line: a running job's log ends with what it has
  written so far;
- a line longer than :data:`MAX_LINE_BYTES` comes as several lines (cut between chunks).

Lines are handed out in :data:`Lines` groups (the lines that start in one chunk share its
timestamp and stream), and as UTF-8 bytes rather than text, so that a caller encoding them (the
Persist Service) does no per-line work it does not need: that keeps a 100 MB log of short lines
a matter of seconds.

The reader never holds more than about :data:`READ_BYTES` of the log plus the lines it has not
handed out yet, so a log of any size can be read. It reads the log as it was when the reader first
looked at it (a running job's log keeps growing; what came later is not part of this read).

With a time window, the index (see :mod:`joblet.store.logindex`) lets it skip the chunks before
the window and stop after it without decompressing them.
"""

from __future__ import annotations

import codecs
from collections import deque
from pathlib import Path

import attrs

from joblet.core.chunks import STDERR, STDOUT, STREAMS, Chunk
from joblet.store.logfiles import LogFileReader
from joblet.store.logindex import IndexRecord

#: Merged bytes read from the files per step (decompressed); bounds the memory of a read.
READ_BYTES = 1 << 20
#: A line longer than this many bytes is returned in pieces (cut where its chunks meet).
MAX_LINE_BYTES = 1 << 20
#: Bytes of finished lines held back (to keep lines in start order) while the other stream has an
#: unfinished line; beyond this the unfinished line is returned as it is so far, and its remainder
#: becomes a line of its own.
MAX_HELD_BYTES = 4 << 20

#: Lines with one timestamp and stream: (ns since the Unix epoch, stream id, the lines as UTF-8
#: without their newlines).
Lines = tuple[int, int, list[bytes]]

_NO_LOW = -(1 << 64)
_NO_HIGH = 1 << 64
# Order of a line in the merged log: (merged offset of the chunk it starts in, line number
# within that chunk). Lines of different streams never start in the same chunk.
_Key = tuple[int, int]


@attrs.frozen
class LineQuery:
    """Which lines to read.

    Attributes:
        streams: Stream ids to return (:data:`~joblet.core.chunks.STDOUT`,
            :data:`~joblet.core.chunks.STDERR`).
        start_ns: Only lines stamped at or after this time (ns since the epoch); None = no bound.
        end_ns: Only lines stamped before this time (exclusive); None = no bound.
        limit: Most lines returned (the first ones); 0 = no limit.
    """

    streams: frozenset[int] = frozenset(STREAMS)
    start_ns: int | None = None
    end_ns: int | None = None
    limit: int = 0


class _StreamState:
    """The line in progress of one stream, and its finished lines held back for ordering."""

    __slots__ = ("decoder", "key", "last_ts", "parts", "ready", "size", "ts")

    def __init__(self) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.parts: list[bytes] = []
        self.size = 0
        self.key: _Key | None = None  # None: no line in progress
        self.ts = 0
        self.last_ts = 0  # timestamp of the stream's last chunk read
        self.ready: deque[tuple[_Key, int, bytes]] = deque()

    def pending_bytes(self) -> bool:
        """Whether the decoder holds the start of a character split across chunks."""
        return bool(self.decoder.getstate()[0])

    def utf8(self, data: bytes) -> bytes:
        """``data`` as valid UTF-8, continuing a character the last chunk split."""
        if data.isascii() and not self.pending_bytes():
            return data  # the common case, at C speed
        return self.decoder.decode(data).encode()


class LogLineReader:
    """Reads a job's persisted log as :data:`Lines` groups, a batch at a time (blocking).

    Use from one thread at a time; each :meth:`next_batch` call does a bounded amount of work.

    Args:
        job_dir: The job's log directory (see :func:`~joblet.store.logfiles.job_log_dir`); a
            missing directory is an empty log.
        query: Which lines.
    """

    def __init__(self, job_dir: Path, query: LineQuery) -> None:
        self._files = LogFileReader(job_dir)
        self._query = query
        self._low = _NO_LOW if query.start_ns is None else query.start_ns
        self._high = _NO_HIGH if query.end_ns is None else query.end_ns
        self._left = query.limit if query.limit > 0 else None
        self._state = {s: _StreamState() for s in STREAMS if s in query.streams}
        self._both = len(self._state) == 2
        self._held = 0
        self._out: list[Lines] = []
        self._planned = False
        self._offset = 0
        self._end = 0
        # Lines starting at or after this merged offset are all outside the window.
        self._stop = _NO_HIGH
        self._done = not self._state or self._low >= self._high

    @property
    def done(self) -> bool:
        """Whether every line has been returned."""
        return self._done and not self._out

    def next_batch(self, read_bytes: int = READ_BYTES) -> list[Lines]:
        """The next lines, in order: up to about ``read_bytes`` of the log's worth.

        May return an empty list before the end (when a step's lines are all outside the
        window); :attr:`done` says when there is nothing more.

        Raises:
            LogCorrupted: A gzip member the index points to is damaged.
        """
        if not self._planned:
            self._plan()
        budget = max(1, read_bytes)
        while not self._done and budget > 0 and not self._out:
            left = self._end - self._offset
            chunks = self._files.read(self._offset, min(budget, left)) if left > 0 else []
            if not chunks:
                self._finish()
                break
            for chunk in chunks:
                self._offset = chunk.end
                budget -= len(chunk.data)
                if chunk.offset >= self._stop and self._past_window():
                    break
                state = self._state.get(chunk.stream)
                if state is not None:
                    self._take(chunk, state)
                if self._done:
                    break
            if not self._done and self._offset >= self._end:
                self._finish()
        out, self._out = self._out, []
        return out

    # --- internals ------------------------------------------------------------------------------

    def _plan(self) -> None:
        """Fix the end of this read, and where to start and stop for the time window."""
        self._planned = True
        if self._query.start_ns is None and self._query.end_ns is None:
            self._end = self._files.size()
            return
        records = self._files.records()
        self._end = records[-1].merged_end if records else 0
        if self._query.start_ns is not None:
            self._offset = _start_offset(records, self._low)
            if self._offset >= self._end:
                self._done = True
        if self._query.end_ns is not None:
            # The longest suffix of chunks all stamped at or after the end: no line starting in
            # it can be in the window (clocks may step back, so look at every chunk).
            q = len(records)
            while q > 0 and records[q - 1].ts_ns >= self._high:
                q -= 1
            if q < len(records):
                self._stop = records[q].merged_offset

    def _past_window(self) -> bool:
        """At or past the stop offset: true (and finished) once no line started before it."""
        if any(s.key is not None and s.key[0] < self._stop for s in self._state.values()):
            return False
        for state in self._state.values():
            state.key = None
            state.parts = []
        self._release(None)
        self._done = True
        return True

    def _take(self, chunk: Chunk, st: _StreamState) -> None:
        """Split one chunk of a wanted stream into lines."""
        data = st.utf8(chunk.data)
        st.last_ts = chunk.ts_ns
        if st.key is None:
            st.key = (chunk.offset, 0)
            st.ts = chunk.ts_ns
        parts = data.split(b"\n")
        if len(parts) == 1:
            st.parts.append(data)
            st.size += len(data)
            if st.size >= MAX_LINE_BYTES:
                self._cut(chunk.stream, st)
            return
        first = b"".join(st.parts) + parts[0] if st.parts else parts[0]
        first_key, first_ts = st.key, st.ts
        last = parts[-1]
        if last or st.pending_bytes():
            st.parts = [last]
            st.size = len(last)
            st.key = (chunk.offset, len(parts) - 1)
            st.ts = chunk.ts_ns
        else:
            st.parts = []
            st.size = 0
            st.key = None
        del parts[-1]
        other = self._state.get(STDERR if chunk.stream == STDOUT else STDOUT)
        if other is None or (other.key is None and not other.ready and not st.ready):
            # Nothing of the other stream can come before these lines: out they go.
            self._emit(first_ts, chunk.stream, first)
            if len(parts) > 1 and not self._done:
                del parts[0]
                self._emit_block(chunk.ts_ns, chunk.stream, parts)
            return
        st.ready.append((first_key, first_ts, first))
        self._held += len(first)
        for i in range(1, len(parts)):
            st.ready.append(((chunk.offset, i), chunk.ts_ns, parts[i]))
            self._held += len(parts[i])
        self._release(self._bound())
        if self._held > MAX_HELD_BYTES:
            # The line in progress that holds the others back goes out unfinished.
            blockers = [(s.key, stream) for stream, s in self._state.items() if s.key is not None]
            if blockers:
                stream = min(blockers)[1]
                self._cut(stream, self._state[stream])

    def _cut(self, stream: int, st: _StreamState) -> None:
        """Return a stream's unfinished line as it is; what follows starts a new line."""
        key, ts = st.key, st.ts
        data = b"".join(st.parts)
        st.parts = []
        st.size = 0
        st.key = None
        if key is None:
            return
        if self._both:
            st.ready.append((key, ts, data))
            self._held += len(data)
            self._release(self._bound())
        else:
            self._emit(ts, stream, data)

    def _finish(self) -> None:
        """The end of the log: unfinished lines are lines too."""
        for st in self._state.values():
            tail = st.decoder.decode(b"", final=True).encode()
            if tail:
                if st.key is None:  # only bytes of a split character left after a cut
                    st.key = (self._end, 0)
                    st.ts = st.last_ts
                st.parts.append(tail)
            if st.key is not None:
                st.ready.append((st.key, st.ts, b"".join(st.parts)))
            st.key = None
            st.parts = []
        self._release(None)
        self._done = True

    def _bound(self) -> _Key | None:
        """The earliest start of a line in progress: finished lines before it may go out."""
        keys = [s.key for s in self._state.values() if s.key is not None]
        return min(keys) if keys else None

    def _release(self, bound: _Key | None) -> None:
        """Emit held lines that start before ``bound`` (all of them if None), in start order."""
        queues = [(stream, st.ready) for stream, st in self._state.items() if st.ready]
        while queues and not self._done:
            stream, queue = min(queues, key=lambda q: q[1][0][0])
            key, ts, line = queue[0]
            if bound is not None and key >= bound:
                break
            queue.popleft()
            self._held -= len(line)
            self._emit(ts, stream, line)
            if not queue:
                queues = [q for q in queues if q[1]]

    def _emit(self, ts: int, stream: int, line: bytes) -> None:
        if not self._low <= ts < self._high:
            return
        self._out.append((ts, stream, [line]))
        if self._left is not None:
            self._left -= 1
            if self._left <= 0:
                self._done = True

    def _emit_block(self, ts: int, stream: int, lines: list[bytes]) -> None:
        """Lines that all start in one chunk (one timestamp)."""
        if not self._low <= ts < self._high:
            return
        if self._left is not None:
            if len(lines) > self._left:
                del lines[self._left :]
            self._left -= len(lines)
            if self._left <= 0:
                self._done = True
        self._out.append((ts, stream, lines))


def _start_offset(records: list[IndexRecord], start_ns: int) -> int:
    """Where to start reading for lines stamped at or after ``start_ns``.

    The chunks of the longest prefix all stamped before ``start_ns`` hold no line of the window,
    but a stream's line may still begin in its last chunk there: reading starts at the earliest
    of those last chunks, and the lines read from there that started before the window are
    dropped by their timestamps.
    """
    i = 0
    while i < len(records) and records[i].ts_ns < start_ns:
        i += 1
    if i == len(records):
        return records[-1].merged_end if records else 0
    last: dict[int, int] = {}
    for rec in records[:i]:
        last[rec.stream] = rec.merged_offset
    return min(last.values(), default=records[i].merged_offset)
