"""A job's log while the daemon runs: an append-only merged byte stream with live readers.

:class:`JobLog` holds the recent part of a job's output in memory and hands every chunk to a
sink (the :class:`~joblet.actors.diskwriter.DiskWriter`), which writes batches to disk and
reports back with :meth:`JobLog.mark_written`. Readers address the log by byte offset:

- :meth:`JobLog.read` returns what exists at an offset, or waits for it. Offsets inside the
  in-memory window are served from memory; older offsets from the log files (in a worker
  thread). A reader therefore never holds memory of its own and is never dropped, however far
  behind it is, and the job never waits for a reader.
- Memory is bounded in two ways: data not yet on disk is charged to a :class:`LogBudget` shared by
  all jobs (at the bound :meth:`JobLog.append` blocks, so the daemon stops reading the job's pipes
  and the job blocks on write); data already on disk stays in memory only while it is among the
  last ``window_bytes`` of the log.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from typing import Protocol

import trio

from joblet.core.chunks import STREAM_NAMES, Chunk
from joblet.core.logwindow import DiskRead, LogWindow
from joblet.store.logfiles import LogCorrupted, LogFileReader

#: Default ``max_bytes`` of :meth:`JobLog.read`: a good gRPC message size for log data.
DEFAULT_READ_BYTES = 64 << 10


class LogBudget:
    """Bytes of log data held in memory and not yet on disk, shared by every job.

    :meth:`acquire` waits while the budget is exhausted; waiters are served first come, first
    served. An amount larger than the whole budget is granted when nothing else is held, so a
    single oversized chunk cannot deadlock.

    Args:
        limit: The budget in bytes (``LogsSection.memory_budget``).
    """

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"log memory budget must not be negative: {limit}")
        self._limit = limit
        self._used = 0
        self._peak = 0
        self._fifo = trio.Lock()
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def limit(self) -> int:
        """The budget in bytes."""
        return self._limit

    @property
    def used(self) -> int:
        """Bytes currently held."""
        return self._used

    @property
    def peak(self) -> int:
        """The most bytes ever held at once (the budget's high-water mark)."""
        return self._peak

    async def acquire(self, n: int) -> None:
        """Take ``n`` bytes of the budget, waiting until they are free.

        Cancellation while waiting takes nothing.
        """
        if n < 0:
            raise ValueError(f"cannot acquire a negative amount: {n}")
        async with self._fifo:
            while self._used > 0 and self._used + n > self._limit:
                await self._lot.park()
            self._used += n
            self._peak = max(self._peak, self._used)

    def release(self, n: int) -> None:
        """Give back ``n`` bytes taken with :meth:`acquire`."""
        if n < 0 or n > self._used:
            raise ValueError(f"cannot release {n} bytes of {self._used} held")
        self._used -= n
        self._lot.unpark_all()


class LogSink(Protocol):
    """Where a :class:`JobLog` sends each new chunk to be written to disk.

    The sink must eventually call :meth:`JobLog.mark_written` for every chunk it was given, in
    order; until then the chunk's bytes stay charged to the budget.
    """

    def submit(self, log: JobLog, chunk: Chunk) -> None:
        """Take a chunk for writing; must not block."""
        ...


class _NoSink:
    def submit(self, log: JobLog, chunk: Chunk) -> None:
        raise RuntimeError(f"log of job {log.job_id} is read-only")


class JobLog:
    """One job's merged stdout/stderr log: append, write to disk, and read from any offset.

    The decisions (chunking, what stays in memory, where a read is served from) are the
    :class:`~joblet.core.logwindow.LogWindow`'s; this class adds the waiting, the memory budget
    and the reads from disk.

    Args:
        job_id: The job's id (names its log directory).
        sink: Receives every chunk for writing (the disk writer).
        budget: Memory budget charged for chunks until they are on disk.
        window_bytes: How much of the end of the log stays in memory after it is on disk, for
            live readers.
        reader: Makes the :class:`LogFileReader` for this job's log files (called once, when a
            reader first needs data that has left memory).
    """

    def __init__(
        self,
        job_id: str,
        *,
        sink: LogSink,
        budget: LogBudget,
        window_bytes: int,
        reader: Callable[[], LogFileReader],
    ) -> None:
        self.job_id = job_id
        self._sink = sink
        self._budget = budget
        self._window = LogWindow(window_bytes)
        self._reader_factory = reader
        self._reader: LogFileReader | None = None
        self._data_lot = trio.lowlevel.ParkingLot()
        self._written_lot = trio.lowlevel.ParkingLot()

    @classmethod
    async def from_disk(cls, job_id: str, reader: Callable[[], LogFileReader]) -> JobLog:
        """The closed log of a job that ended before this daemon started.

        A torn tail left by a crash is dropped (see :meth:`LogFileReader.verify_tail`): the log is
        what was completely written.

        Args:
            job_id: The job's id.
            reader: Makes the reader of the job's log files.
        """
        files = reader()
        size = await trio.to_thread.run_sync(files.verify_tail)
        log = cls(job_id, sink=_NoSink(), budget=LogBudget(0), window_bytes=0, reader=lambda: files)
        log._window = LogWindow.on_disk(size)
        return log

    @property
    def size(self) -> int:
        """Bytes in the merged log so far."""
        return self._window.size

    @property
    def closed(self) -> bool:
        """Whether the log has ended (no more appends)."""
        return self._window.closed

    @property
    def written(self) -> int:
        """Bytes of the merged log known to be on disk."""
        return self._window.written

    @property
    def memory_bytes(self) -> int:
        """Bytes of log data this log holds in memory."""
        return self._window.memory_bytes

    @property
    def memory_start(self) -> int:
        """Offset of the oldest byte still in memory (reads before it go to disk)."""
        return self._window.memory_start

    async def append(self, stream: int, data: bytes | bytearray | memoryview) -> None:
        """Add the job's output to the end of the log.

        Waits while the memory budget is exhausted, never for a reader. The bytes get their merged
        offset and timestamp when they are added, after that wait.

        Args:
            stream: :data:`~joblet.core.chunks.STDOUT` or
                :data:`~joblet.core.chunks.STDERR`.
            data: The bytes read from the job's pipe.

        Raises:
            trio.ClosedResourceError: The log is closed.
            ValueError: Unknown stream.
        """
        if stream not in STREAM_NAMES:
            raise ValueError(f"unknown stream {stream}")
        if self._window.closed:
            raise trio.ClosedResourceError(f"log of job {self.job_id} is closed")
        # The chunk must not change under its readers: take an immutable copy of anything else.
        data = bytes(data)
        n = len(data)
        if n == 0:
            await trio.lowlevel.checkpoint()
            return
        await self._budget.acquire(n)
        if self._window.closed:
            self._budget.release(n)
            raise trio.ClosedResourceError(f"log of job {self.job_id} is closed")
        for chunk in self._window.append(stream, data, time.time_ns()):
            self._sink.submit(self, chunk)
        self._data_lot.unpark_all()

    def close(self) -> None:
        """End the log: readers get end-of-log after the last byte. Idempotent."""
        if self._window.close():
            self._data_lot.unpark_all()

    def mark_written(self, upto: int) -> None:
        """Record that the log is on disk up to merged offset ``upto`` (called by the sink).

        Releases the budget those bytes held and lets them leave memory once they are also
        outside the window.
        """
        if upto > self._window.size:
            raise ValueError(f"cannot mark written up to {upto}: log {self.job_id} has {self.size}")
        if released := self._window.mark_written(upto):
            self._budget.release(released)
            self._written_lot.unpark_all()

    async def wait_written(self, offset: int) -> None:
        """Wait until the log is on disk up to ``offset`` (at most :attr:`size`)."""
        await trio.lowlevel.checkpoint()
        while self._window.written < offset:
            await self._written_lot.park()

    async def read(self, offset: int, max_bytes: int = DEFAULT_READ_BYTES) -> list[Chunk]:
        """The log from ``offset``: at least one chunk, up to ``max_bytes`` in all.

        Waits until there is data at ``offset``. The first chunk starts exactly at ``offset``
        (split if needed) and the chunks are contiguous, so reading on from the end of the last
        one never loses or repeats a byte.

        Returns:
            The chunks, or ``[]`` at the end of a closed log (``offset >= size``).

        Raises:
            ValueError: ``offset`` is negative or ``max_bytes`` is not positive.
            LogCorrupted: The part of the log on disk is missing or damaged.
        """
        await trio.lowlevel.checkpoint()
        while True:
            where = self._window.read(offset, max_bytes)
            if isinstance(where, DiskRead):
                return await self._read_disk(where)
            if where is not None:
                return where
            await self._data_lot.park()

    async def follow(
        self, offset: int = 0, max_bytes: int = DEFAULT_READ_BYTES
    ) -> AsyncGenerator[Chunk, None]:
        """Every chunk from ``offset`` to the end of the log, waiting for new output.

        Args:
            offset: Where to start (resume from the ``end`` of the last chunk received).
            max_bytes: Passed to :meth:`read`; bounds the size of each chunk.
        """
        while chunks := await self.read(offset, max_bytes):
            for chunk in chunks:
                yield chunk
            offset = chunks[-1].end

    # --- internals -----------------------------------------------------------------------------

    async def _read_disk(self, plan: DiskRead) -> list[Chunk]:
        if self._reader is None:
            self._reader = self._reader_factory()
        reader = self._reader

        def read() -> list[Chunk]:
            chunks = reader.read(plan.offset, plan.max_bytes)
            # Once this read reaches memory (or the end of a closed log, which is then all on
            # disk), sequential reading moves on from the files: forget the members cached for it.
            if chunks and chunks[-1].end >= plan.catch_up:
                reader.drop_cache()
            return chunks

        chunks = await trio.to_thread.run_sync(read)
        if not chunks:
            raise LogCorrupted(
                f"log files of job {self.job_id} end before offset {plan.offset} "
                f"(written: {self._window.written})"
            )
        return chunks
