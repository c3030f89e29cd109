"""The disk writer: the one writer and deleter of job logs, metrics files and job rows.

Each :class:`~joblet.actors.joblog.JobLog` hands its chunks to :meth:`DiskWriter.submit` as they
arrive. The actor gathers chunks from all jobs and writes them as one batch in a worker thread
(one thread hop per batch) when ``LogsSection.flush_bytes`` have gathered or the oldest has waited
``LogsSection.flush_interval``. After a batch is written it tells each log how far it is on disk
(:meth:`JobLog.mark_written`), which frees the memory budget those bytes held.

The actor owns the open :class:`~joblet.store.logfiles.LogFileWriter` of every job with output
that is not yet closed, and closes each once the job's last chunk is written
(:meth:`DiskWriter.close_job`). What it holds survives a failure of :meth:`DiskWriter.run`:
a batch that could not be written is kept and retried when the actor is restarted (see
:func:`joblet.actors.supervisor.supervise`), so log data is never dropped. A full filesystem
(ENOSPC, EDQUOT, SQLite's "full") is not a failure of the actor: it retries the batch in place
with backoff, logging once when the disk fills and once when writing resumes; meanwhile the
output waits in the log budget and, at its bound, jobs block on write.

It also owns the job database (:class:`~joblet.store.jobdb.JobDB`): :meth:`DiskWriter.save_job`
queues a job's metadata, written with the next batch (at once: a saved job does not wait for the
flush interval). A job's record is written only after every log chunk submitted before it, so a
record that says a job ended always comes with its complete log on disk.

Each job's metrics file (:mod:`joblet.store.metricfiles`) is written here too, for the job's
sampler (:meth:`DiskWriter.write_metrics`): one writer of every file under ``logs/`` and
``metrics/`` means one order for deleting them. :meth:`DiskWriter.delete_job` removes a job's
row, then its log files, then its metrics files, after the job's pending writes; retention
removes old files with :meth:`DiskWriter.delete_logs` and :meth:`DiskWriter.delete_metrics`
and records with :meth:`DiskWriter.forget_job`. Every write and deletion runs in a worker thread,
one at a time.
"""

from __future__ import annotations

import errno
import sqlite3
from functools import partial
from pathlib import Path
from typing import TypeVar

import attrs
import trio

from joblet import logfmt
from joblet.actors.joblog import JobLog
from joblet.config import LogsSection
from joblet.core.chunks import Chunk
from joblet.core.model import JobInfo
from joblet.core.samples import MetricRecord
from joblet.core.writequeue import Batch, Deletion, JobChunks, Record, WriteQueue
from joblet.store.jobdb import JobDB
from joblet.store.logfiles import LogFileWriter, delete_job_logs, job_log_dir
from joblet.store.metricfiles import MetricsWriter, delete_job_metrics, metrics_path

#: Longest the final write on shutdown (cancellation of :meth:`DiskWriter.run`) may take.
FINAL_FLUSH_TIMEOUT = 30.0
#: While the disk is full, the delay before the first retry; it doubles up to
#: :data:`FULL_RETRY_MAX`. The writer retries in place (no restart, no traceback per attempt),
#: and what waits meanwhile is held by the log budget, so jobs block on write.
FULL_RETRY_MIN = 0.1
#: The longest delay between retries while the disk is full: how late writing resumes at worst
#: once space is freed.
FULL_RETRY_MAX = 2.0


class LogWriteError(Exception):
    """Writing a batch of log data failed; the batch is kept and retried."""


class DeleteError(Exception):
    """A job's files could not be deleted (a later deletion may try again)."""


@attrs.define(eq=False)
class _Done:
    """Someone waiting for a record or a deletion: told when it is done, and how it went."""

    event: trio.Event = attrs.Factory(trio.Event)
    error: Exception | None = None


_Batch = Batch[JobLog, _Done]


@attrs.define
class _BatchResult:
    """What the writing thread got done (reported back to the event loop)."""

    written: int = 0
    closed: list[str] = attrs.Factory(list)
    error: BaseException | None = None
    #: Jobs whose chunks in the batch were not written: their closes, records and deletions
    #: wait for the retry.
    held: set[str] = attrs.Factory(set)
    records_saved: bool = False
    deletions_done: bool = False
    delete_errors: dict[str, Exception] = attrs.Factory(dict)


class DiskWriter:
    """Writes (and deletes) the logs of all jobs in ``<logs_dir>/<job_id>/``, their metrics in
    ``<metrics_dir>/<job_id>/`` and their rows in the job database.

    Run :meth:`run` as a long-lived task; :meth:`submit` and :meth:`close_job` work whether or
    not it is running (what they queue is written once it runs). What is written when is the
    :class:`~joblet.core.writequeue.WriteQueue`'s decision; this actor waits for it, runs the
    writes in a worker thread and reports back.

    Args:
        logs_dir: The directory holding one log directory per job.
        cfg: Batch thresholds (``flush_bytes``, ``flush_interval``).
        db_path: The job database; None keeps no job metadata (log-only use, tests).
        metrics_dir: The directory holding one metrics directory per job; None keeps no metrics
            (log-only use, tests).
    """

    def __init__(
        self,
        logs_dir: Path,
        cfg: LogsSection,
        db_path: Path | None = None,
        *,
        metrics_dir: Path | None = None,
    ) -> None:
        self._logs_dir = logs_dir
        self._metrics_dir = metrics_dir
        self._db_path = db_path
        self._db: JobDB | None = None
        self._queue: WriteQueue[JobLog, _Done] = WriteQueue(cfg.flush_bytes, cfg.flush_interval)
        self._inflight: list[JobChunks[JobLog]] = []
        # Touched only by the worker thread, which runs one write at a time (the limiter).
        self._writers: dict[str, LogFileWriter] = {}
        self._metric_writers: dict[str, MetricsWriter] = {}
        self._limiter = trio.CapacityLimiter(1)
        self._kick = trio.Event()
        self._progress = trio.lowlevel.ParkingLot()
        self._urgent = 0
        self._running = False
        #: Batches that failed because the disk was full (each one retried later).
        self.failed_writes = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes submitted and not yet handed to the writing thread."""
        return self._queue.pending_bytes

    def submit(self, log: JobLog, chunk: Chunk) -> None:
        """Queue a chunk for writing. Never blocks.

        Memory is bounded by the budget the log charged for the chunk, which is released once it
        is written. Chunks of one log must be submitted in order.
        """
        if self._queue.submit(log.job_id, log, chunk, trio.current_time()):
            self._kick.set()

    def close_job(self, job_id: str) -> None:
        """The job's log has ended: close its files once its last chunk is written."""
        self._queue.close_job(job_id, trio.current_time())
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

    async def finish_deletions(self) -> list[str]:
        """Delete the files of jobs whose deletion a crash interrupted (their rows are gone).

        Call once at start-up, after :meth:`open_db`, with :meth:`run` running. Returns the jobs.
        """
        if self._db is None:
            return []
        job_ids = await trio.to_thread.run_sync(self._db.deleting, limiter=self._limiter)
        for job_id in job_ids:
            try:
                await self._delete(job_id, logs=True, metrics=True)
            except DeleteError as e:
                logfmt.error(
                    "files of a deleted job could not be deleted",
                    jobId=job_id,
                    error=str(e.__cause__),
                )
        return job_ids

    def submit_job(self, info: JobInfo) -> trio.Event:
        """Queue a job's metadata for the database; the event is set once it is written.

        Never blocks. A newer submission for the same job replaces the queued info; the events of
        both are set when it is written.
        """
        return self._queue_record(info.id, info).event

    async def save_job(self, info: JobInfo) -> None:
        """Queue a job's metadata and wait until it is written (needs :meth:`run` running)."""
        await self.submit_job(info).wait()

    async def forget_job(self, job_id: str) -> None:
        """Delete a job's row from the database, leaving its files, and wait until that is done.

        For retention, once the job's files are gone by age (needs :meth:`run` running).
        """
        await self._queue_record(job_id, None).event.wait()

    async def delete_job(self, job_id: str) -> None:
        """Delete a job: its row, then its log files, then its metrics files; wait until done.

        The deletion comes after every write of the job queued before it (so nothing is written
        after it). Call it once the job has ended (its log closed, its sampler done). Needs
        :meth:`run` running.

        Raises:
            DeleteError: The files could not be deleted (the row is gone).
        """
        row = self._queue_record(job_id, None)
        await self._delete(job_id, logs=True, metrics=True)
        await row.event.wait()

    async def delete_logs(self, job_id: str) -> None:
        """Delete a job's log files, after its queued writes (retention). Needs :meth:`run`.

        Raises:
            DeleteError: They could not be deleted.
        """
        await self._delete(job_id, logs=True)

    async def delete_metrics(self, job_id: str) -> None:
        """Delete a job's metrics files (retention). Needs :meth:`run`.

        Raises:
            DeleteError: They could not be deleted.
        """
        await self._delete(job_id, metrics=True)

    async def write_metrics(self, job_id: str, records: list[MetricRecord]) -> None:
        """Append records to a job's metrics file as one gzip member; wait until written.

        Runs in the worker thread at once (metrics do not wait for a batch), one write at a time
        with the batches. Does not need :meth:`run` running.

        Raises:
            OSError: Writing failed (nothing was written).
            ValueError: A value is not finite, or this writer keeps no metrics.
        """
        if self._metrics_dir is None:
            raise ValueError("this disk writer keeps no metrics")
        await trio.to_thread.run_sync(
            self._append_metrics, self._metrics_dir, job_id, records, limiter=self._limiter
        )

    async def close_metrics(self, job_id: str) -> None:
        """The job's sampling has ended: sync its metrics file and forget its writer.

        Raises:
            OSError: The file could not be synced.
        """
        await trio.to_thread.run_sync(self._close_metrics, job_id, limiter=self._limiter)

    def _queue_record(self, job_id: str, info: JobInfo | None) -> _Done:
        done = _Done()
        if self._db_path is None:
            done.event.set()
            return done
        self._queue.queue_record(job_id, info, done, trio.current_time())
        self._kick.set()
        return done

    async def _delete(self, job_id: str, *, logs: bool = False, metrics: bool = False) -> None:
        done = _Done()
        self._queue.queue_deletion(job_id, done, trio.current_time(), logs=logs, metrics=metrics)
        self._kick.set()
        await done.event.wait()
        if done.error is not None:
            raise DeleteError(f"files of job {job_id} could not be deleted") from done.error

    async def flush(self) -> None:
        """Wait until everything submitted (and every close requested) so far is on disk.

        Writes at once rather than at the next threshold. Needs :meth:`run` to be running.
        """
        targets = dict(self._queue.logs())
        targets.update((item.job_id, item.log) for item in self._inflight)
        ends = [(log, log.size) for log in targets.values()]
        closes = self._queue.closing()
        self._urgent += 1
        self._kick.set()
        try:
            await trio.lowlevel.checkpoint()
            for log, end in ends:
                await log.wait_written(end)
            while closes & self._queue.closing():
                await self._progress.park()
        finally:
            self._urgent -= 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write batches until cancelled; then write what is queued (shielded, bounded).

        Reports ``started`` once the logs directory exists.

        Raises:
            LogWriteError: A batch could not be written, for another reason than a full disk
                (it stays queued for the next run).
            RuntimeError: The actor is already running.
        """
        if self._running:
            raise RuntimeError("the disk writer is already running")
        self._running = True
        try:
            await trio.to_thread.run_sync(
                partial(self._logs_dir.mkdir, parents=True, exist_ok=True)
            )
            task_status.started()
            try:
                await self._write_batches()
            except trio.Cancelled:
                await self._final_flush()
                raise
        finally:
            self._running = False

    # --- internals -----------------------------------------------------------------------------

    async def _write_batches(self) -> None:
        """Write each batch when due; a full disk is retried here, other failures raise."""
        backoff = 0.0
        while True:
            if backoff:
                # Not woken by new work: every chunk would otherwise be a retry.
                await trio.sleep(backoff)
            else:
                await self._wait_for_batch()
            try:
                await self._write_batch()
            except LogWriteError as e:
                if not is_disk_full(e.__cause__):
                    raise
                self.failed_writes += 1
                if not backoff:
                    logfmt.error(
                        "state filesystem full: job output and records wait in memory, "
                        "jobs block on write",
                        error=f"{e}: {e.__cause__}",
                        retry=f"every {FULL_RETRY_MAX}s at most",
                    )
                backoff = min(max(backoff * 2, FULL_RETRY_MIN), FULL_RETRY_MAX)
                continue
            if backoff:
                logfmt.info("state filesystem writable again: writes resumed")
                backoff = 0.0

    async def _wait_for_batch(self) -> None:
        queue = self._queue
        while not queue.due(trio.current_time(), urgent=self._urgent > 0):
            self._kick = trio.Event()
            deadline = queue.deadline
            if deadline is None:
                await self._kick.wait()
            else:
                with trio.move_on_at(deadline):
                    await self._kick.wait()

    async def _final_flush(self) -> None:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + FINAL_FLUSH_TIMEOUT
            try:
                while self._queue.has_work():
                    await self._write_batch()
            except LogWriteError as e:
                logfmt.error("log data could not be written at shutdown", error=str(e.__cause__))
            if self._writers or self._metric_writers:
                await trio.to_thread.run_sync(self._close_writers, limiter=self._limiter)
            if self._db is not None:
                db, self._db = self._db, None
                await trio.to_thread.run_sync(db.close, limiter=self._limiter)
        if scope.cancelled_caught or self._queue.logs():
            logfmt.error(
                "log data not written at shutdown",
                pendingBytes=self._queue.pending_bytes,
                timeout=f"{FINAL_FLUSH_TIMEOUT}s",
            )

    async def _write_batch(self) -> None:
        queue = self._queue
        batch = queue.take()
        if batch.empty:
            return
        self._inflight = batch.logs
        try:
            result = await trio.to_thread.run_sync(self._write_sync, batch, limiter=self._limiter)
        except BaseException:
            # Cancelled before the thread started (once started, it is always waited for).
            self._inflight = []
            queue.requeue(batch.logs, trio.current_time())
            queue.requeue_records(batch.records, trio.current_time())
            queue.requeue_deletions(batch.deletions, trio.current_time())
            raise
        self._inflight = []
        for item in batch.logs[: result.written]:
            item.log.mark_written(item.end)
        queue.closed(result.closed)
        now = trio.current_time()
        records, held_records = _split(batch.records, result.held)
        if result.records_saved:
            _tell(records)
        else:
            queue.requeue_records(records, now)
        queue.requeue_records(held_records, now)
        deletions, held_deletions = _split(batch.deletions, result.held)
        if result.deletions_done:
            _tell(deletions, result.delete_errors)
        else:
            queue.requeue_deletions(deletions, now)
        queue.requeue_deletions(held_deletions, now)
        self._progress.unpark_all()
        if result.error is not None:
            queue.requeue(batch.logs[result.written :], trio.current_time())
            if result.written < len(batch.logs):
                failed = batch.logs[result.written].job_id
                raise LogWriteError(f"writing the log of job {failed} failed") from result.error
            raise LogWriteError("writing the job database failed") from result.error

    def _close_writers(self) -> None:
        """Sync and close every open writer (in the worker thread)."""
        while self._writers:
            job_id, writer = self._writers.popitem()
            try:
                writer.close()
            except OSError as e:
                logfmt.error("log files could not be synced", jobId=job_id, error=str(e))
        while self._metric_writers:
            job_id, metrics = self._metric_writers.popitem()
            try:
                metrics.close()
            except OSError as e:
                logfmt.error("metrics file could not be synced", jobId=job_id, error=str(e))

    def _append_metrics(self, metrics_dir: Path, job_id: str, records: list[MetricRecord]) -> None:
        """Append to a job's metrics file (in the worker thread)."""
        writer = self._metric_writers.get(job_id)
        if writer is None:
            writer = MetricsWriter(metrics_path(metrics_dir, job_id))
            self._metric_writers[job_id] = writer
        writer.append(records)

    def _close_metrics(self, job_id: str) -> None:
        """Sync a job's metrics file and forget its writer (in the worker thread)."""
        writer = self._metric_writers.pop(job_id, None)
        if writer is not None:
            writer.close()

    def _delete_files(self, job_id: str, deletion: Deletion[_Done]) -> None:
        """Delete a job's log files, then its metrics files (in the worker thread).

        Raises:
            OSError: A file could not be deleted.
            ValueError: ``job_id`` is not a plain file name.
        """
        if deletion.logs:
            writer = self._writers.pop(job_id, None)
            if writer is not None:
                try:
                    writer.close()
                except OSError:
                    pass  # its files are deleted next: nothing left to sync
            delete_job_logs(self._logs_dir, job_id)
        if deletion.metrics and self._metrics_dir is not None:
            self._metric_writers.pop(job_id, None)  # holds no open file between writes
            delete_job_metrics(self._metrics_dir, job_id)

    def _write_sync(self, batch: _Batch) -> _BatchResult:
        """Write a batch (in the worker thread); log chunks stop at the first job that fails.

        Log chunks first, then the job records, so a record never gets ahead of its log; then the
        deletions, so files go only after their job's row (a crash in between leaves the note
        that recovery finishes, never a row whose log is gone). A job whose chunks were not
        written keeps its close, record and deletion for the retry; the other jobs' go on, so
        that deleting jobs frees space while another job's output cannot be written.
        """
        result = _BatchResult()
        for item in batch.logs:
            try:
                writer = self._writers.get(item.job_id)
                if writer is None:
                    writer = LogFileWriter(job_log_dir(self._logs_dir, item.job_id))
                    self._writers[item.job_id] = writer
                writer.append(item.chunks)
            except Exception as e:
                result.error = e
                break
            result.written += 1
        held = result.held = {item.job_id for item in batch.logs[result.written :]}
        for job_id in batch.closing:
            if job_id in held:
                continue
            writer = self._writers.pop(job_id, None)
            if writer is not None:
                try:
                    writer.close()
                except OSError as e:
                    logfmt.error("log files could not be synced", jobId=job_id, error=str(e))
            result.closed.append(job_id)
        records = {j: r for j, r in batch.records.items() if j not in held}
        if records and self._db is not None:
            try:
                saves = [r.info for r in records.values() if r.info is not None]
                if saves:
                    self._db.save(saves)
                deletes = [j for j, r in records.items() if r.info is None]
                if deletes:
                    # A job deleted whole is noted with its row: a crash before its files are
                    # gone leaves the note, and the next start finishes the deletion.
                    whole = [j for j in deletes if _whole(batch.deletions.get(j))]
                    self._db.delete(deletes, files_of=whole)
            except Exception as e:
                if result.error is None:
                    result.error = e
                return result
        result.records_saved = True
        for job_id, deletion in batch.deletions.items():
            if job_id in held:
                continue
            try:
                self._delete_files(job_id, deletion)
            except (OSError, ValueError) as e:
                result.delete_errors[job_id] = e
        result.deletions_done = True
        gone = [
            j
            for j, d in batch.deletions.items()
            if _whole(d) and j not in held and j not in result.delete_errors
        ]
        if gone and self._db is not None:
            try:
                self._db.files_deleted(gone)
            except Exception as e:  # the notes stay: the next start deletes nothing again
                logfmt.warn("deletion notes could not be dropped", error=str(e))
        return result


_V = TypeVar("_V")


def _split(items: dict[str, _V], held: set[str]) -> tuple[dict[str, _V], dict[str, _V]]:
    """``items`` of the jobs not held, and of those held."""
    return (
        {j: v for j, v in items.items() if j not in held},
        {j: v for j, v in items.items() if j in held},
    )


def _whole(deletion: Deletion[_Done] | None) -> bool:
    """Whether a deletion removes all of a job's files (a deleted job's, not retention's)."""
    return deletion is not None and deletion.logs and deletion.metrics


def is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` says the filesystem is full (ENOSPC, EDQUOT, or SQLite's "full")."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(error, sqlite3.Error):
        return getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return False


def _tell(
    done: dict[str, Record[_Done]] | dict[str, Deletion[_Done]],
    errors: dict[str, Exception] | None = None,
) -> None:
    """Tell whoever waits on these records or deletions that they are done (and how)."""
    for job_id, item in done.items():
        error = errors.get(job_id) if errors else None
        for waiter in item.waiters:
            waiter.error = error
            waiter.event.set()
