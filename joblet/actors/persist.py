"""The persist actor: writes every job's log to disk in batches, off the event loop.

Each :class:`~joblet.store.joblog.JobLog` hands its chunks to :meth:`PersistActor.submit` as they
arrive. The actor gathers chunks from all jobs and writes them as one batch in a worker thread
(one thread hop per batch) when ``LogsSection.flush_bytes`` have gathered or the oldest has waited
``LogsSection.flush_interval``. After a batch is written it tells each log how far it is on disk
(:meth:`JobLog.mark_persisted`), which frees the memory budget those bytes held.

The actor owns the open :class:`~joblet.store.logfiles.LogFileWriter` of every job with output
that is not yet closed, and closes each once the job's last chunk is written
(:meth:`PersistActor.close_job`). What it holds survives a failure of :meth:`PersistActor.run`:
a batch that could not be written is kept and retried when the actor is restarted (see
:func:`joblet.actors.supervisor.supervise`), so log data is never dropped.

It also owns the job database (:class:`~joblet.store.jobdb.JobDB`): :meth:`PersistActor.save_job`
queues a job's metadata, written with the next batch (at once: a saved job does not wait for the
flush interval). A job's record is written only after every log chunk submitted before it, so a
record that says a job ended always comes with its complete log on disk.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import attrs
import trio

from joblet import logfmt
from joblet.config import LogsSection
from joblet.core.chunks import Chunk
from joblet.core.model import JobInfo
from joblet.store.jobdb import JobDB
from joblet.store.joblog import JobLog
from joblet.store.logfiles import LogFileWriter, job_log_dir

#: Longest the final write on shutdown (cancellation of :meth:`PersistActor.run`) may take.
FINAL_FLUSH_TIMEOUT = 30.0
#: A batch writes at most this many times ``flush_bytes`` (at least :data:`_MIN_BATCH_CAP`): a
#: backlog is written in bounded steps, which bounds the compressed data held during a write.
_BATCH_CAP_FACTOR = 4
_MIN_BATCH_CAP = 1 << 20


class LogWriteError(Exception):
    """Writing a batch of log data failed; the batch is kept and retried."""


@attrs.define
class _Pending:
    """Chunks of one job waiting to be written."""

    log: JobLog
    chunks: list[Chunk] = attrs.Factory(list)
    nbytes: int = 0


@attrs.define
class _BatchResult:
    """What the writing thread got done (reported back to the event loop)."""

    written: int = 0
    closed: list[str] = attrs.Factory(list)
    error: BaseException | None = None
    records_saved: bool = False


@attrs.define
class _Record:
    """A job's metadata (or its deletion, ``info=None``) waiting to be written."""

    info: JobInfo | None
    waiters: list[trio.Event] = attrs.Factory(list)


class PersistActor:
    """Writes the logs of all jobs to ``<logs_dir>/<job_id>/``.

    Run :meth:`run` as a long-lived task; :meth:`submit` and :meth:`close_job` work whether or
    not it is running (what they queue is written once it runs).

    Args:
        logs_dir: The directory holding one log directory per job.
        cfg: Batch thresholds (``flush_bytes``, ``flush_interval``).
        db_path: The job database; None keeps no job metadata (log-only use, tests).
    """

    def __init__(self, logs_dir: Path, cfg: LogsSection, db_path: Path | None = None) -> None:
        self._logs_dir = logs_dir
        self._db_path = db_path
        self._db: JobDB | None = None
        # Job records waiting to be written, by job id (the latest info wins).
        self._records: dict[str, _Record] = {}
        self._flush_bytes = max(1, cfg.flush_bytes)
        self._flush_interval = max(0.0, cfg.flush_interval)
        self._batch_cap = max(_BATCH_CAP_FACTOR * self._flush_bytes, _MIN_BATCH_CAP)
        # Queued work; dict order is the order batches take jobs in.
        self._pending: dict[str, _Pending] = {}
        self._pending_bytes = 0
        self._to_close: set[str] = set()
        # trio time the oldest queued work arrived, None when nothing is queued.
        self._oldest: float | None = None
        self._inflight: list[tuple[JobLog, list[Chunk]]] = []
        # Touched only by the writing thread; one batch is written at a time.
        self._writers: dict[str, LogFileWriter] = {}
        self._limiter = trio.CapacityLimiter(1)
        self._kick = trio.Event()
        self._progress = trio.lowlevel.ParkingLot()
        self._urgent = 0
        self._running = False

    @property
    def pending_bytes(self) -> int:
        """Bytes submitted and not yet handed to the writing thread."""
        return self._pending_bytes

    def submit(self, log: JobLog, chunk: Chunk) -> None:
        """Queue a chunk for writing. Never blocks.

        Memory is bounded by the budget the log charged for the chunk, which is released once it
        is written. Chunks of one log must be submitted in order.
        """
        pending = self._pending.get(log.job_id)
        if pending is None:
            pending = self._pending[log.job_id] = _Pending(log)
        pending.chunks.append(chunk)
        pending.nbytes += len(chunk.data)
        self._pending_bytes += len(chunk.data)
        if self._oldest is None:
            self._oldest = trio.current_time()
            self._kick.set()
        elif self._pending_bytes >= self._flush_bytes:
            self._kick.set()

    def close_job(self, job_id: str) -> None:
        """The job's log has ended: close its files once its last chunk is written."""
        self._to_close.add(job_id)
        if self._oldest is None:
            self._oldest = trio.current_time()
        self._kick.set()

    async def open_db(self) -> list[JobInfo]:
        """Open the job database (in a worker thread) and return every job it holds.

        Raises:
            JobDBError: The database cannot be used.
        """
        if self._db_path is None:
            return []
        if self._db is None:
            self._db = await trio.to_thread.run_sync(JobDB, self._db_path)
        return await trio.to_thread.run_sync(self._db.load, limiter=self._limiter)

    def submit_job(self, info: JobInfo) -> trio.Event:
        """Queue a job's metadata for the database; the event is set once it is written.

        Never blocks. A newer submission for the same job replaces the queued info; the events of
        both are set when it is written.
        """
        return self._queue_record(info.id, info)

    async def save_job(self, info: JobInfo) -> None:
        """Queue a job's metadata and wait until it is written (needs :meth:`run` running)."""
        await self.submit_job(info).wait()

    async def forget_job(self, job_id: str) -> None:
        """Delete a job's metadata from the database and wait until that is written."""
        await self._queue_record(job_id, None).wait()

    def _queue_record(self, job_id: str, info: JobInfo | None) -> trio.Event:
        saved = trio.Event()
        if self._db_path is None:
            saved.set()
            return saved
        record = self._records.get(job_id)
        if record is None:
            record = self._records[job_id] = _Record(info)
        else:
            record.info = info
        record.waiters.append(saved)
        if self._oldest is None:
            self._oldest = trio.current_time()
        self._kick.set()
        return saved

    async def flush(self) -> None:
        """Wait until everything submitted (and every close requested) so far is on disk.

        Writes at once rather than at the next threshold. Needs :meth:`run` to be running.
        """
        targets = {p.log.job_id: p.log for p in self._pending.values()}
        targets.update((log.job_id, log) for log, _ in self._inflight)
        ends = [(log, log.size) for log in targets.values()]
        closes = set(self._to_close)
        self._urgent += 1
        self._kick.set()
        try:
            await trio.lowlevel.checkpoint()
            for log, end in ends:
                await log.wait_persisted(end)
            while closes & self._to_close:
                await self._progress.park()
        finally:
            self._urgent -= 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write batches until cancelled; then write what is queued (shielded, bounded).

        Reports ``started`` once the logs directory exists.

        Raises:
            LogWriteError: A batch could not be written (it stays queued for the next run).
            RuntimeError: The actor is already running.
        """
        if self._running:
            raise RuntimeError("the persist actor is already running")
        self._running = True
        try:
            await trio.to_thread.run_sync(
                partial(self._logs_dir.mkdir, parents=True, exist_ok=True)
            )
            task_status.started()
            try:
                while True:
                    await self._wait_for_batch()
                    await self._write_batch()
            except trio.Cancelled:
                await self._final_flush()
                raise
        finally:
            self._running = False

    # --- internals -----------------------------------------------------------------------------

    def _ready(self) -> bool:
        if self._oldest is None:
            return False
        return (
            self._pending_bytes >= self._flush_bytes
            or self._urgent > 0
            or bool(self._records)
            or trio.current_time() >= self._oldest + self._flush_interval
        )

    async def _wait_for_batch(self) -> None:
        while not self._ready():
            self._kick = trio.Event()
            if self._oldest is None:
                await self._kick.wait()
            else:
                with trio.move_on_at(self._oldest + self._flush_interval):
                    await self._kick.wait()

    async def _final_flush(self) -> None:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + FINAL_FLUSH_TIMEOUT
            try:
                while self._pending or self._to_close or self._records:
                    await self._write_batch()
            except LogWriteError as e:
                logfmt.error("log data could not be written at shutdown", error=str(e.__cause__))
            if self._writers:
                await trio.to_thread.run_sync(self._close_writers, limiter=self._limiter)
            if self._db is not None:
                db, self._db = self._db, None
                await trio.to_thread.run_sync(db.close, limiter=self._limiter)
        if scope.cancelled_caught or self._pending:
            logfmt.error(
                "log data not written at shutdown",
                pendingBytes=self._pending_bytes,
                timeout=f"{FINAL_FLUSH_TIMEOUT}s",
            )

    def _take_batch(
        self,
    ) -> tuple[list[tuple[JobLog, list[Chunk]]], list[str], dict[str, _Record]]:
        """Dequeue up to the batch cap, round-robin over jobs, and the closes and records due."""
        batch: list[tuple[JobLog, list[Chunk]]] = []
        taken = 0
        for job_id in list(self._pending):
            if taken >= self._batch_cap:
                break
            pending = self._pending.pop(job_id)
            if taken + pending.nbytes <= self._batch_cap:
                batch.append((pending.log, pending.chunks))
                taken += pending.nbytes
                continue
            k = 0
            part = 0
            while taken + part < self._batch_cap:
                part += len(pending.chunks[k].data)
                k += 1
            batch.append((pending.log, pending.chunks[:k]))
            taken += part
            # The rest goes to the back of the queue, so one busy job cannot starve the others.
            self._pending[job_id] = _Pending(pending.log, pending.chunks[k:], pending.nbytes - part)
        self._pending_bytes -= taken
        closing = [j for j in self._to_close if j not in self._pending]
        # A record waits for the job's chunks queued before it (they are ahead of it on disk).
        records = {j: r for j, r in self._records.items() if j not in self._pending}
        for job_id in records:
            del self._records[job_id]
        if not self._pending and len(closing) == len(self._to_close) and not self._records:
            self._oldest = None
        return batch, closing, records

    def _requeue(self, items: list[tuple[JobLog, list[Chunk]]]) -> None:
        """Put unwritten chunks back at the front of the queue, ahead of newer ones."""
        front: dict[str, _Pending] = {}
        for log, chunks in items:
            nbytes = sum(len(c.data) for c in chunks)
            later = self._pending.pop(log.job_id, None)
            if later is not None:
                front[log.job_id] = _Pending(log, chunks + later.chunks, nbytes + later.nbytes)
            else:
                front[log.job_id] = _Pending(log, chunks, nbytes)
            self._pending_bytes += nbytes
        self._pending = {**front, **self._pending}
        if self._oldest is None:
            self._oldest = trio.current_time()

    async def _write_batch(self) -> None:
        batch, closing, records = self._take_batch()
        if not batch and not closing and not records:
            return
        self._inflight = batch
        try:
            result = await trio.to_thread.run_sync(
                self._write_sync, batch, closing, records, limiter=self._limiter
            )
        except BaseException:
            # Cancelled before the thread started (once started, it is always waited for).
            self._inflight = []
            self._requeue(batch)
            self._requeue_records(records)
            raise
        self._inflight = []
        for log, chunks in batch[: result.written]:
            log.mark_persisted(chunks[-1].end)
        self._to_close.difference_update(result.closed)
        if result.records_saved:
            for record in records.values():
                for event in record.waiters:
                    event.set()
        else:
            self._requeue_records(records)
        self._progress.unpark_all()
        if result.error is not None:
            self._requeue(batch[result.written :])
            if result.written < len(batch):
                failed = batch[result.written][0].job_id
                raise LogWriteError(f"writing the log of job {failed} failed") from result.error
            raise LogWriteError("writing the job database failed") from result.error

    def _requeue_records(self, records: dict[str, _Record]) -> None:
        """Put records that were not written back, unless a newer one for the job is queued."""
        for job_id, record in records.items():
            newer = self._records.get(job_id)
            if newer is None:
                self._records[job_id] = record
            else:
                # The newer info wins; whoever waits on either is told when it is written.
                newer.waiters.extend(record.waiters)
        if records and self._oldest is None:
            self._oldest = trio.current_time()

    def _close_writers(self) -> None:
        """Sync and close every open writer (in the worker thread)."""
        while self._writers:
            job_id, writer = self._writers.popitem()
            try:
                writer.close()
            except OSError as e:
                logfmt.error("log files could not be synced", jobId=job_id, error=str(e))

    def _write_sync(
        self,
        batch: list[tuple[JobLog, list[Chunk]]],
        closing: list[str],
        records: dict[str, _Record],
    ) -> _BatchResult:
        """Write a batch (in the worker thread); stops at the first job that fails.

        Log chunks first, then the job records, so a record never gets ahead of its log.
        """
        result = _BatchResult()
        for log, chunks in batch:
            try:
                writer = self._writers.get(log.job_id)
                if writer is None:
                    writer = LogFileWriter(job_log_dir(self._logs_dir, log.job_id))
                    self._writers[log.job_id] = writer
                writer.append(chunks)
            except Exception as e:
                result.error = e
                return result
            result.written += 1
        for job_id in closing:
            writer = self._writers.pop(job_id, None)
            if writer is not None:
                try:
                    writer.close()
                except OSError as e:
                    logfmt.error("log files could not be synced", jobId=job_id, error=str(e))
            result.closed.append(job_id)
        if records and self._db is not None:
            try:
                saves = [r.info for r in records.values() if r.info is not None]
                if saves:
                    self._db.save(saves)
                deletes = [j for j, r in records.items() if r.info is None]
                if deletes:
                    self._db.delete(deletes)
            except Exception as e:
                result.error = e
                return result
        result.records_saved = True
        return result
