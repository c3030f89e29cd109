"""The disk writer: batching thresholds, layout, one thread hop per batch, shutdown, failures.

Real files in ``tmp_path``; time is a ``MockClock`` where a threshold is under test.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from joblet.actors.diskwriter import DeleteError, DiskWriter, LogWriteError, _BatchResult
from joblet.actors.joblog import JobLog, LogBudget
from joblet.config import LogsSection
from joblet.core.chunks import STDERR, STDOUT
from joblet.core.model import JobInfo, JobSpec, JobStatus
from joblet.core.samples import MetricRecord
from joblet.core.writequeue import Batch
from joblet.store.jobdb import JobDB
from joblet.store.logfiles import LogFileReader, stream_path
from joblet.store.metricfiles import metrics_path


def make_log(logs_dir: Path, writer: DiskWriter, job_id: str = "job-1") -> JobLog:
    return JobLog(
        job_id,
        sink=writer,
        budget=LogBudget(64 << 20),
        window_bytes=1 << 20,
        reader=lambda: LogFileReader(logs_dir / job_id),
    )


def open_fds_under(path: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(path)):
            found.append(target)
    return found


async def test_a_batch_is_written_when_flush_bytes_gather(tmp_path: Path) -> None:
    writer = DiskWriter(tmp_path, LogsSection(flush_bytes=1000, flush_interval=3600))
    log = make_log(tmp_path, writer)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            await log.append(STDOUT, b"x" * 999)
            await trio.testing.wait_all_tasks_blocked()
            assert (writer.pending_bytes, log.written) == (999, 0)  # below the threshold
            await log.append(STDERR, b"y")
            await log.wait_written(1000)
            nursery.cancel_scope.cancel()


async def test_a_batch_is_written_when_the_oldest_byte_has_waited_flush_interval(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    writer = DiskWriter(tmp_path, LogsSection(flush_bytes=1 << 30, flush_interval=5.0))
    log = make_log(tmp_path, writer)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await log.append(STDOUT, b"first\n")
        mock_clock.jump(4.0)
        await log.append(STDOUT, b"second\n")  # does not restart the wait
        await trio.testing.wait_all_tasks_blocked()
        assert (writer.pending_bytes, log.written) == (13, 0)
        mock_clock.jump(1.0)
        mock_clock.rate = 1.0  # let real time run, so the ceiling below works
        with trio.fail_after(10):
            await log.wait_written(13)
        assert writer.pending_bytes == 0
        nursery.cancel_scope.cancel()


async def test_files_are_gzip_per_stream_per_job(tmp_path: Path) -> None:
    writer = DiskWriter(tmp_path, LogsSection())
    logs = [make_log(tmp_path, writer, f"job-{i}") for i in range(3)]
    expected: dict[tuple[str, int], bytes] = {}
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            for k in range(50):
                for i, log in enumerate(logs):
                    stream = STDERR if (k + i) % 3 == 0 else STDOUT
                    data = b"job %d line %d on %d\n" % (i, k, stream)
                    await log.append(stream, data)
                    key = (log.job_id, stream)
                    expected[key] = expected.get(key, b"") + data
            for log in logs:
                log.close()
                writer.close_job(log.job_id)
            await writer.flush()
            nursery.cancel_scope.cancel()
        for (job_id, stream), data in expected.items():
            path = stream_path(tmp_path / job_id, stream)
            assert path == tmp_path / job_id / (
                "stdout.log.gz" if stream == STDOUT else "stderr.log.gz"
            )
            out = await trio.run_process(["zcat", str(path)], capture_stdout=True)
            assert out.stdout == data
    assert open_fds_under(tmp_path) == []  # close_job closed every writer


class CountingWriter(DiskWriter):
    """Records which jobs each worker-thread call wrote."""

    batches: list[list[str]]

    def _write_sync(self, batch: Batch[JobLog, Any]) -> _BatchResult:
        self.batches.append([item.job_id for item in batch.logs])
        return super()._write_sync(batch)


async def test_chunks_of_many_jobs_go_to_disk_in_one_thread_hop(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    writer = CountingWriter(tmp_path, LogsSection(flush_bytes=1 << 30, flush_interval=5.0))
    writer.batches = []
    logs = [make_log(tmp_path, writer, f"job-{i}") for i in range(5)]
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for _ in range(20):
            for log in logs:
                await log.append(STDOUT, b"some output\n" * 10)
        await trio.testing.wait_all_tasks_blocked()
        assert writer.batches == []
        mock_clock.rate = 1.0
        with trio.fail_after(10):
            await writer.flush()
        assert writer.batches == [[log.job_id for log in logs]]
        assert all(log.written == log.size for log in logs)
        nursery.cancel_scope.cancel()


async def test_cancellation_writes_what_is_queued_and_closes_the_files(tmp_path: Path) -> None:
    writer = DiskWriter(tmp_path, LogsSection(flush_bytes=1 << 30, flush_interval=3600))
    log = make_log(tmp_path, writer)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            await log.append(STDOUT, b"written at shutdown\n")
            await trio.testing.wait_all_tasks_blocked()
            assert log.written == 0
            nursery.cancel_scope.cancel()  # no flush(): the actor writes on its way out
    assert log.written == log.size
    assert LogFileReader(tmp_path / "job-1").size() == log.size
    assert open_fds_under(tmp_path) == []


async def test_a_failed_write_keeps_the_batch_and_a_restart_writes_it(tmp_path: Path) -> None:
    writer = DiskWriter(tmp_path, LogsSection(flush_interval=0.01))
    log = make_log(tmp_path, writer)
    blocker = tmp_path / "job-1"
    blocker.write_bytes(b"")  # a file where the job's log directory must go
    with trio.fail_after(10):
        with pytest.RaisesGroup(pytest.RaisesExc(LogWriteError, match="job-1")):
            async with trio.open_nursery() as nursery:
                await nursery.start(writer.run)
                await log.append(STDOUT, b"must not be lost\n")
                await log.append(STDERR, b"nor this\n")
                await log.wait_written(log.size)  # never: the actor fails first
        assert (log.written, writer.pending_bytes) == (0, log.size)
        blocker.unlink()
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)  # as the supervisor would
            await log.append(STDOUT, b"after the restart\n")
            await writer.flush()
            nursery.cancel_scope.cancel()
    assert log.written == log.size
    chunks = LogFileReader(tmp_path / "job-1").read(0, 1 << 20)
    assert b"".join(c.data for c in chunks) == b"must not be lost\nnor this\nafter the restart\n"
    assert [c.stream for c in chunks] == [STDOUT, STDERR, STDOUT]
    with trio.fail_after(10):
        path = stream_path(tmp_path / "job-1", STDOUT)
        zcat = await trio.run_process(["zcat", str(path)], capture_stdout=True)
    assert zcat.stdout == b"must not be lost\nafter the restart\n"


async def test_run_twice_at_once_is_refused(tmp_path: Path) -> None:
    writer = DiskWriter(tmp_path, LogsSection())
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            with pytest.raises(RuntimeError, match="already running"):
                await writer.run()
            nursery.cancel_scope.cancel()


async def test_a_job_record_is_written_at_once_and_never_ahead_of_its_log(
    tmp_path: Path,
) -> None:
    db_path = tmp_path / "jobs.db"
    # Thresholds that would hold the chunks for an hour: the record must not wait for them,
    # and must not be written before them.
    writer = DiskWriter(
        tmp_path / "logs", LogsSection(flush_bytes=1 << 30, flush_interval=3600), db_path=db_path
    )
    assert await writer.open_db() == []
    log = make_log(tmp_path / "logs", writer, "job-rec")
    info = JobInfo(id="job-rec", spec=JobSpec(command="true"), status=JobStatus.COMPLETED)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            await log.append(STDOUT, b"before the record\n" * 1000)
            await writer.save_job(info)
            assert log.written == log.size
            assert _stored(db_path) == [info]
            await writer.forget_job("job-rec")
            assert _stored(db_path) == []
            nursery.cancel_scope.cancel()


def _stored(db_path: Path) -> list[JobInfo]:
    db = JobDB(db_path)
    try:
        return db.load()
    finally:
        db.close()


# --- deletion: the disk writer deletes what it wrote, after the job's pending writes -------------


def _writer_with_everything(tmp_path: Path, cls: type[DiskWriter] = DiskWriter) -> DiskWriter:
    # Batches of at most 1 MiB (the smallest cap), written only when something asks for it.
    return cls(
        tmp_path / "logs",
        LogsSection(flush_bytes=64 << 10, flush_interval=3600),
        db_path=tmp_path / "jobs.db",
        metrics_dir=tmp_path / "metrics",
    )


METRICS = [MetricRecord(1, "cpu", {"cpu_percent": 1.0})]


async def test_deleting_a_job_while_its_writes_are_pending_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    writer = _writer_with_everything(tmp_path)
    await writer.open_db()
    job = "job-del"
    log = make_log(tmp_path / "logs", writer, job)
    info = JobInfo(id=job, spec=JobSpec(command="true"), status=JobStatus.COMPLETED)
    with trio.fail_after(10):
        await writer.write_metrics(job, METRICS)  # a sampler's write, before the end
        await writer.close_metrics(job)
        assert metrics_path(tmp_path / "metrics", job).exists()
        # Output (several batches' worth), its close and the final record are all queued;
        # nothing is written yet.
        await log.append(STDOUT, b"last words\n" * (300 << 10))
        log.close()
        writer.close_job(job)
        saved = writer.submit_job(info)
        async with trio.open_nursery() as nursery:

            async def delete_then_stop() -> None:
                await writer.delete_job(job)
                nursery.cancel_scope.cancel()

            nursery.start_soon(delete_then_stop)
            await trio.testing.wait_all_tasks_blocked()
            assert not (tmp_path / "logs" / job).exists()  # the writer is not running yet
            await nursery.start(writer.run)
        assert saved.is_set()
        # delete_job returned: the pending writes were done first, then everything went.
        assert log.written == log.size  # the memory budget those bytes held is free
        assert not (tmp_path / "logs" / job).exists()
        assert not (tmp_path / "metrics" / job).exists()
        assert _stored(tmp_path / "jobs.db") == []
        assert open_fds_under(tmp_path / "logs") == []


class GatedWriter(DiskWriter):
    """Holds the worker thread after writing its first batch until the test opens the gate."""

    gate: threading.Event
    in_batch: threading.Event

    def _write_sync(self, batch: Batch[JobLog, Any]) -> _BatchResult:
        result = super()._write_sync(batch)
        if not self.in_batch.is_set():
            self.in_batch.set()
            self.gate.wait(10)
        return result


async def test_a_delete_racing_the_last_flush_leaves_no_file(tmp_path: Path) -> None:
    writer = _writer_with_everything(tmp_path, GatedWriter)
    assert isinstance(writer, GatedWriter)
    writer.gate, writer.in_batch = threading.Event(), threading.Event()
    await writer.open_db()
    job = "job-race"
    log = make_log(tmp_path / "logs", writer, job)
    other = make_log(tmp_path / "logs", writer, "job-other")
    info = JobInfo(id=job, spec=JobSpec(command="true"), status=JobStatus.COMPLETED)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            await writer.write_metrics(job, METRICS)
            await other.append(STDOUT, b"another job\n" * 100)
            nursery.start_soon(writer.flush)
            await trio.to_thread.run_sync(writer.in_batch.wait)
            # A batch is in the worker thread; the job's last output, close and record queue up
            # behind it, and the deletion comes while that last flush is still to be written.
            await log.append(STDERR, b"the end\n" * 100)
            log.close()
            writer.close_job(job)
            writer.submit_job(info)
            deleted = trio.Event()

            async def delete() -> None:
                await writer.delete_job(job)
                deleted.set()

            nursery.start_soon(delete)
            await trio.testing.wait_all_tasks_blocked()
            assert not deleted.is_set()
            writer.gate.set()
            await deleted.wait()
            assert log.written == log.size
            nursery.cancel_scope.cancel()
    assert not (tmp_path / "logs" / job).exists()
    assert not (tmp_path / "metrics" / job).exists()
    assert _stored(tmp_path / "jobs.db") == []
    assert LogFileReader(tmp_path / "logs" / "job-other").size() == other.size


async def test_retention_deletions_remove_one_kind_and_keep_the_row(tmp_path: Path) -> None:
    writer = _writer_with_everything(tmp_path)
    await writer.open_db()
    job = "job-old"
    log = make_log(tmp_path / "logs", writer, job)
    info = JobInfo(id=job, spec=JobSpec(command="true"), status=JobStatus.COMPLETED)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            await writer.write_metrics(job, METRICS)
            await log.append(STDOUT, b"x\n")
            log.close()
            writer.close_job(job)
            await writer.save_job(info)
            await writer.delete_logs(job)
            assert not (tmp_path / "logs" / job).exists()
            assert metrics_path(tmp_path / "metrics", job).exists()
            await writer.delete_metrics(job)
            assert not (tmp_path / "metrics" / job).exists()
            assert _stored(tmp_path / "jobs.db") == [info]
            await writer.forget_job(job)
            assert _stored(tmp_path / "jobs.db") == []
            with pytest.raises(DeleteError):
                await writer.delete_logs("..")  # not a job id: refused, nothing deleted
            assert (tmp_path / "logs").is_dir()
            nursery.cancel_scope.cancel()
