"""A job's stored log as timestamped lines (blocking I/O, meant for a worker thread).

:class:`LogLineReader` reads a job's log files (:mod:`joblet.store.logfiles`) and feeds their
chunks to a :class:`~joblet.core.lines.LineAssembler`, which makes the lines (what a line is, its
timestamp and order: see :mod:`joblet.core.lines`).

The reader never holds more than about :data:`READ_BYTES` of the log plus the lines it has not
handed out yet, so a log of any size can be read. It reads the log as it was when the reader first
looked at it (a running job's log keeps growing; what came later is not part of this read).

With a time window, the index (see :mod:`joblet.store.logindex`) lets it skip the chunks before
the window and stop after it without decompressing them.
"""

from __future__ import annotations

from pathlib import Path

from joblet.core.lines import LineAssembler, LineQuery, Lines
from joblet.store.logfiles import LogFileReader
from joblet.store.logindex import IndexRecord

#: Merged bytes read from the files per step (decompressed); bounds the memory of a read.
READ_BYTES = 1 << 20


class LogLineReader:
    """Reads a job's stored log as :data:`~joblet.core.lines.Lines` groups, a batch at a time.

    Blocking; use from one thread at a time; each :meth:`next_batch` call does a bounded amount
    of work.

    Args:
        job_dir: The job's log directory (see :func:`~joblet.store.logfiles.job_log_dir`); a
            missing directory is an empty log.
        query: Which lines.
    """

    def __init__(self, job_dir: Path, query: LineQuery) -> None:
        self._files = LogFileReader(job_dir)
        self._query = query
        self._lines = LineAssembler(query)
        self._planned = False
        self._offset = 0
        self._end = 0

    @property
    def done(self) -> bool:
        """Whether every line has been returned."""
        return self._lines.done and not self._lines.has_output

    def next_batch(self, read_bytes: int = READ_BYTES) -> list[Lines]:
        """The next lines, in order: up to about ``read_bytes`` of the log's worth.

        May return an empty list before the end (when a step's lines are all outside the
        window); :attr:`done` says when there is nothing more.

        Raises:
            LogCorrupted: A gzip member the index points to is damaged.
        """
        if not self._planned:
            self._plan()
        lines = self._lines
        budget = max(1, read_bytes)
        while not lines.done and budget > 0 and not lines.has_output:
            left = self._end - self._offset
            chunks = self._files.read(self._offset, min(budget, left)) if left > 0 else []
            if not chunks:
                lines.finish(self._end)
                break
            for chunk in chunks:
                self._offset = chunk.end
                budget -= len(chunk.data)
                lines.feed(chunk)
                if lines.done:
                    break
            if self._offset >= self._end:
                lines.finish(self._end)
        return lines.take()

    def _plan(self) -> None:
        """Fix the end of this read, and where to start and stop for the time window."""
        self._planned = True
        query = self._query
        if query.start_ns is None and query.end_ns is None:
            self._end = self._files.size()
            return
        records = self._files.records()
        self._end = records[-1].merged_end if records else 0
        if query.start_ns is not None:
            self._offset = _start_offset(records, query.start_ns)
            if self._offset >= self._end:
                self._lines.abandon()
        if query.end_ns is not None:
            # The longest suffix of chunks all stamped at or after the end: no line starting in
            # it can be in the window (clocks may step back, so look at every chunk).
            q = len(records)
            while q > 0 and records[q - 1].ts_ns >= query.end_ns:
                q -= 1
            if q < len(records):
                self._lines.stop = records[q].merged_offset


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
