"""The disk writer's queue: what waits to be written, and when and how it becomes a batch.

A :class:`WriteQueue` is the bookkeeping of :class:`~joblet.actors.diskwriter.DiskWriter` without
its waiting and its threads. It holds, per job, the log chunks waiting to be written, whether the
job's log files are to be closed, the job's record (its metadata for the job database, or the
removal of its row) and the deletion of its files. It decides:

- when a batch is due (:meth:`WriteQueue.due`): ``flush_bytes`` of chunks have gathered, the
  oldest queued work has waited ``flush_interval``, a record or a deletion is queued (they never
  wait for the interval), or a caller asked for everything now;
- what goes in a batch (:meth:`WriteQueue.take`): chunks up to a cap, taken round-robin over jobs
  so one busy job cannot starve the others; then, of the jobs with no chunks left, the closes, the
  records and the deletions, in that order. A job's record is written only after every chunk
  queued before it, so a record that says a job ended always comes with its complete log on disk;
  and a job's files are deleted only after its pending writes and after its row, so a crash
  half-way through a deletion leaves files without a row (which retention ages out), never a row
  whose log is gone;
- what a failed batch puts back (:meth:`WriteQueue.requeue`, :meth:`WriteQueue.requeue_records`):
  in front of anything newer, so the log stays in order.

Time is passed in (``now``, in the caller's clock), so the queue can be tested without a loop.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import attrs

from joblet.core.chunks import Chunk
from joblet.core.model import JobInfo

#: A batch writes at most this many times ``flush_bytes`` (at least :data:`MIN_BATCH_CAP`): a
#: backlog is written in bounded steps, which bounds the compressed data held during a write.
BATCH_CAP_FACTOR = 4
#: The smallest batch cap, in bytes.
MIN_BATCH_CAP = 1 << 20

#: Who is told when a job's chunks are on disk (the job's log).
L = TypeVar("L")
#: What waits for a job's record to be written (an event).
W = TypeVar("W")


@attrs.frozen
class JobChunks(Generic[L]):
    """Chunks of one job, contiguous and in order, in a batch.

    Attributes:
        job_id: The job.
        log: Who is told once they are on disk.
        chunks: The chunks (never empty).
    """

    job_id: str
    log: L
    chunks: list[Chunk]

    @property
    def end(self) -> int:
        """Merged offset just past the last chunk: the log is on disk up to here once written."""
        return self.chunks[-1].end


@attrs.define
class Record(Generic[W]):
    """A job's metadata (or its deletion, ``info=None``) waiting to be written.

    Attributes:
        info: What the job database gets; None deletes the job's row.
        waiters: Told when it is written.
    """

    info: JobInfo | None
    waiters: list[W] = attrs.Factory(list)


@attrs.define
class Deletion(Generic[W]):
    """The deletion of a job's files, waiting for the job's pending writes.

    Attributes:
        logs: Delete the job's log files.
        metrics: Delete the job's metrics files.
        waiters: Told when it is done.
    """

    logs: bool = False
    metrics: bool = False
    waiters: list[W] = attrs.Factory(list)

    def merge(self, other: Deletion[W]) -> None:
        """Take on another deletion of the same job (what either deletes, and its waiters)."""
        self.logs = self.logs or other.logs
        self.metrics = self.metrics or other.metrics
        self.waiters.extend(other.waiters)


@attrs.frozen
class Batch(Generic[L, W]):
    """One write, in this order: the chunks, the closes, the records, the deletions.

    Attributes:
        logs: Chunks of each job, in the order to write them.
        closing: Jobs whose log files are closed once their chunks above are written.
        records: Job records to write, by job id.
        deletions: Files to delete once the records are written, by job id.
    """

    logs: list[JobChunks[L]]
    closing: list[str]
    records: dict[str, Record[W]]
    deletions: dict[str, Deletion[W]] = attrs.Factory(dict)

    @property
    def empty(self) -> bool:
        """Whether there is nothing to write."""
        return not (self.logs or self.closing or self.records or self.deletions)


@attrs.define
class _Pending(Generic[L]):
    log: L
    chunks: list[Chunk] = attrs.Factory(list)
    nbytes: int = 0


class WriteQueue(Generic[L, W]):
    """What waits to be written to disk, for every job.

    Args:
        flush_bytes: A batch is due once this many bytes of chunks are queued (at least 1).
        flush_interval: ...or once the oldest queued work has waited this long (seconds).
    """

    def __init__(self, flush_bytes: int, flush_interval: float) -> None:
        self.flush_bytes = max(1, flush_bytes)
        self.flush_interval = max(0.0, flush_interval)
        self.batch_cap = max(BATCH_CAP_FACTOR * self.flush_bytes, MIN_BATCH_CAP)
        # Queued chunks; dict order is the order batches take jobs in.
        self._pending: dict[str, _Pending[L]] = {}
        self._pending_bytes = 0
        self._to_close: set[str] = set()
        # Job records by job id (the latest info wins).
        self._records: dict[str, Record[W]] = {}
        # File deletions by job id.
        self._deletions: dict[str, Deletion[W]] = {}
        # When the oldest queued work arrived; None when nothing is queued.
        self._oldest: float | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes of chunks queued (not taken into a batch)."""
        return self._pending_bytes

    @property
    def deadline(self) -> float | None:
        """When the oldest queued work has waited ``flush_interval`` (None: nothing queued)."""
        return None if self._oldest is None else self._oldest + self.flush_interval

    def has_work(self) -> bool:
        """Whether anything at all is queued."""
        return bool(self._pending or self._to_close or self._records or self._deletions)

    def logs(self) -> list[tuple[str, L]]:
        """Each job with chunks queued, and its log."""
        return [(job_id, p.log) for job_id, p in self._pending.items()]

    def closing(self) -> set[str]:
        """Jobs whose log files are still to be closed."""
        return set(self._to_close)

    def submit(self, job_id: str, log: L, chunk: Chunk, now: float) -> bool:
        """Queue a chunk (chunks of one job in order). Returns whether the writer should wake.

        The writer need not wake for every chunk: only for the first queued work (to start the
        interval) and once ``flush_bytes`` have gathered.
        """
        pending = self._pending.get(job_id)
        if pending is None:
            pending = self._pending[job_id] = _Pending(log)
        pending.chunks.append(chunk)
        pending.nbytes += len(chunk.data)
        self._pending_bytes += len(chunk.data)
        if self._oldest is None:
            self._oldest = now
            return True
        return self._pending_bytes >= self.flush_bytes

    def close_job(self, job_id: str, now: float) -> None:
        """Queue the close of a job's log files (after its queued chunks). Wake the writer."""
        self._to_close.add(job_id)
        self._arrived(now)

    def queue_record(self, job_id: str, info: JobInfo | None, waiter: W, now: float) -> None:
        """Queue a job's record (None: delete its row); ``waiter`` is told once it is written.

        A newer record for the same job replaces the queued one; the waiters of both are told
        when it is written. Wake the writer: records do not wait for the interval.
        """
        record = self._records.get(job_id)
        if record is None:
            record = self._records[job_id] = Record(info)
        else:
            record.info = info
        record.waiters.append(waiter)
        self._arrived(now)

    def queue_deletion(
        self, job_id: str, waiter: W, now: float, *, logs: bool = False, metrics: bool = False
    ) -> None:
        """Queue the deletion of a job's files, after its pending writes; ``waiter`` is told.

        Deletions of the same job queued before it is done are merged. Wake the writer:
        deletions do not wait for the interval.
        """
        deletion = Deletion[W](logs, metrics, [waiter])
        queued = self._deletions.get(job_id)
        if queued is None:
            self._deletions[job_id] = deletion
        else:
            queued.merge(deletion)
        self._arrived(now)

    def due(self, now: float, *, urgent: bool = False) -> bool:
        """Whether a batch should be written now.

        Args:
            now: The time, in the clock ``submit`` and friends were given.
            urgent: Someone waits for everything queued (a flush).
        """
        if self._oldest is None:
            return False
        return (
            self._pending_bytes >= self.flush_bytes
            or urgent
            or bool(self._records)
            or bool(self._deletions)
            or now >= self._oldest + self.flush_interval
        )

    def take(self) -> Batch[L, W]:
        """Dequeue a batch: chunks up to the cap, round-robin over jobs, and what is due after."""
        logs: list[JobChunks[L]] = []
        taken = 0
        for job_id in list(self._pending):
            if taken >= self.batch_cap:
                break
            pending = self._pending.pop(job_id)
            if taken + pending.nbytes <= self.batch_cap:
                logs.append(JobChunks(job_id, pending.log, pending.chunks))
                taken += pending.nbytes
                continue
            k = 0
            part = 0
            while taken + part < self.batch_cap:
                part += len(pending.chunks[k].data)
                k += 1
            logs.append(JobChunks(job_id, pending.log, pending.chunks[:k]))
            taken += part
            # The rest goes to the back of the queue, so one busy job cannot starve the others.
            self._pending[job_id] = _Pending(pending.log, pending.chunks[k:], pending.nbytes - part)
        self._pending_bytes -= taken
        closing = [j for j in self._to_close if j not in self._pending]
        # A record waits for the job's chunks queued before it (they are ahead of it on disk).
        records = {j: r for j, r in self._records.items() if j not in self._pending}
        for job_id in records:
            del self._records[job_id]
        # A deletion waits for the job's pending writes, and comes after its record.
        deletions = {j: d for j, d in self._deletions.items() if j not in self._pending}
        for job_id in deletions:
            del self._deletions[job_id]
        if (
            not self._pending
            and len(closing) == len(self._to_close)
            and not self._records
            and not self._deletions
        ):
            self._oldest = None
        return Batch(logs, closing, records, deletions)

    def closed(self, job_ids: list[str]) -> None:
        """These jobs' log files are closed (a batch with them in ``closing`` was written)."""
        self._to_close.difference_update(job_ids)

    def requeue(self, logs: list[JobChunks[L]], now: float) -> None:
        """Put chunks that were not written back at the front of the queue, ahead of newer ones."""
        front: dict[str, _Pending[L]] = {}
        for item in logs:
            nbytes = sum(len(c.data) for c in item.chunks)
            later = self._pending.pop(item.job_id, None)
            if later is not None:
                front[item.job_id] = _Pending(
                    item.log, item.chunks + later.chunks, nbytes + later.nbytes
                )
            else:
                front[item.job_id] = _Pending(item.log, item.chunks, nbytes)
            self._pending_bytes += nbytes
        self._pending = {**front, **self._pending}
        if logs and self._oldest is None:
            self._oldest = now

    def requeue_records(self, records: dict[str, Record[W]], now: float) -> None:
        """Put records that were not written back, unless a newer one for the job is queued."""
        for job_id, record in records.items():
            newer = self._records.get(job_id)
            if newer is None:
                self._records[job_id] = record
            else:
                # The newer info wins; whoever waits on either is told when it is written.
                newer.waiters.extend(record.waiters)
        if records and self._oldest is None:
            self._oldest = now

    def requeue_deletions(self, deletions: dict[str, Deletion[W]], now: float) -> None:
        """Put deletions that were not done back, merged with any queued since."""
        for job_id, deletion in deletions.items():
            queued = self._deletions.pop(job_id, None)
            if queued is not None:
                deletion.merge(queued)
            self._deletions[job_id] = deletion
        if deletions and self._oldest is None:
            self._oldest = now

    def _arrived(self, now: float) -> None:
        if self._oldest is None:
            self._oldest = now
