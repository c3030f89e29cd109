"""Line assembly: a job's merged log, chunk by chunk, as timestamped lines (no I/O).

The log is a merged byte stream of stdout and stderr chunks, each with the time it was read from
the job (:mod:`joblet.core.chunks`). A :class:`LineAssembler` is fed those chunks in order and
turns them into lines:

- a line is the bytes of one stream up to a newline (not included); stdout and stderr lines never
  mix, even when the job interleaved partial lines of both;
- a line's timestamp is that of the chunk holding its first byte, so a line split across chunks
  takes the time it started;
- lines come in the order they started in the merged log, so their timestamps never go backwards
  (while one stream has an unfinished line, finished lines of the other stream that started later
  wait for it, up to :data:`MAX_HELD_BYTES`);
- lines are valid UTF-8: bytes that are not are replaced (U+FFFD), never an error; a character
  split across chunks is joined;
- a last line without a newline is still a line (:meth:`LineAssembler.finish`): a running job's
  log ends with what it has written so far;
- a line longer than :data:`MAX_LINE_BYTES` comes as several lines (cut between chunks).

Lines are handed out in :data:`Lines` groups (the lines that start in one chunk share its
timestamp and stream), and as UTF-8 bytes rather than text, so that a caller encoding them (the
Persist Service) does no per-line work it does not need: that keeps a 100 MB log of short lines
a matter of seconds.

Reading the chunks is the caller's business (:mod:`joblet.store.loglines` reads them from a job's
log files).
"""

from __future__ import annotations

import codecs
from collections import deque

import attrs

from joblet.core.chunks import STDERR, STDOUT, STREAMS, Chunk

#: A line longer than this many bytes is returned in pieces (cut where its chunks meet).
MAX_LINE_BYTES = 1 << 20
#: Bytes of finished lines held back (to keep lines in start order) while the other stream has an
#: unfinished line; beyond this the unfinished line is returned as it is so far, and its remainder
#: becomes a line of its own.
MAX_HELD_BYTES = 4 << 20

#: Lines with one timestamp and stream: (ns since the Unix epoch, stream id, the lines as UTF-8
#: without their newlines).
Lines = tuple[int, int, list[bytes]]

#: A merged offset past any log: no stop (see :attr:`LineAssembler.stop`).
NO_STOP = 1 << 64
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


class LineAssembler:
    """Turns a job's chunks, fed in merged order, into :data:`Lines` groups.

    Args:
        query: Which lines (streams, time window, limit).

    Attributes:
        stop: Lines starting at or after this merged offset are all outside the time window (the
            caller knows it from the log's index); once no line in progress started before it,
            the assembler is done. :data:`NO_STOP` by default.
    """

    def __init__(self, query: LineQuery) -> None:
        self._low = _NO_LOW if query.start_ns is None else query.start_ns
        self._high = _NO_HIGH if query.end_ns is None else query.end_ns
        self._left = query.limit if query.limit > 0 else None
        self._state = {s: _StreamState() for s in STREAMS if s in query.streams}
        self._both = len(self._state) == 2
        self._held = 0
        self._out: list[Lines] = []
        self.stop = NO_STOP
        self._done = not self._state or self._low >= self._high

    @property
    def done(self) -> bool:
        """Whether no more lines will come (some may still wait in :meth:`take`)."""
        return self._done

    @property
    def has_output(self) -> bool:
        """Whether lines wait to be taken."""
        return bool(self._out)

    def take(self) -> list[Lines]:
        """The lines finished so far, in order (each only once)."""
        out, self._out = self._out, []
        return out

    def feed(self, chunk: Chunk) -> None:
        """The next chunk of the merged log (chunks must come in order, without gaps)."""
        if self._done:
            return
        if chunk.offset >= self.stop and self._past_window():
            return
        state = self._state.get(chunk.stream)
        if state is not None:
            self._take(chunk, state)

    def finish(self, end: int) -> None:
        """The log ends at merged offset ``end``: unfinished lines are lines too."""
        if self._done:
            return
        self._finish(end)

    def abandon(self) -> None:
        """No more lines are wanted (nothing of the log is in the window): end now."""
        self._done = True

    # --- internals ------------------------------------------------------------------------------

    def _past_window(self) -> bool:
        """At or past the stop offset: true (and finished) once no line started before it."""
        if any(s.key is not None and s.key[0] < self.stop for s in self._state.values()):
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

    def _finish(self, end: int) -> None:
        for st in self._state.values():
            tail = st.decoder.decode(b"", final=True).encode()
            if tail:
                if st.key is None:  # only bytes of a split character left after a cut
                    st.key = (end, 0)
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
