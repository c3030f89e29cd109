"""The write queue: when a batch is due, what goes in it, and what a failed one puts back."""

from __future__ import annotations

from joblet.core.chunks import STDOUT, Chunk
from joblet.core.model import JobInfo, JobSpec, JobStatus
from joblet.core.writequeue import MIN_BATCH_CAP, WriteQueue

Queue = WriteQueue[str, str]


def chunks(n: int, size: int = 10, start: int = 0) -> list[Chunk]:
    return [Chunk(start + i * size, STDOUT, bytes(size), i) for i in range(n)]


def info(job_id: str, status: JobStatus = JobStatus.COMPLETED) -> JobInfo:
    return JobInfo(id=job_id, spec=JobSpec(command="true"), status=status)


def test_a_batch_is_due_at_flush_bytes_or_after_the_interval() -> None:
    q = Queue(flush_bytes=25, flush_interval=5.0)
    assert not q.due(0.0) and q.deadline is None
    c = chunks(3)
    assert q.submit("a", "log-a", c[0], now=10.0) is True  # the first: the interval starts
    assert q.submit("a", "log-a", c[1], now=11.0) is False  # nothing new to wake for
    assert q.deadline == 15.0
    assert not q.due(14.9)
    assert q.due(15.0)
    assert q.submit("a", "log-a", c[2], now=12.0) is True  # 30 bytes >= 25
    assert q.due(12.0)


def test_urgent_and_records_make_a_batch_due_at_once() -> None:
    q = Queue(flush_bytes=1 << 20, flush_interval=5.0)
    assert not q.due(0.0, urgent=True)  # nothing queued: nothing to do
    q.submit("a", "log-a", chunks(1)[0], now=0.0)
    assert not q.due(1.0)
    assert q.due(1.0, urgent=True)
    q.queue_record("b", info("b"), "w", now=1.0)
    assert q.due(1.0)


def test_a_record_waits_for_the_chunks_of_its_job_queued_before_it() -> None:
    q = Queue(flush_bytes=15, flush_interval=5.0)
    q.submit("a", "log-a", chunks(3)[0], now=0.0)
    q.queue_record("a", info("a"), "w1", now=0.0)
    q.queue_record("b", info("b"), "w2", now=0.0)
    q.close_job("a", now=0.0)
    batch = q.take()
    # Both fit the batch, so "a"'s record and close come in the same batch, after its chunks.
    assert [(i.job_id, i.end) for i in batch.logs] == [("a", 10)]
    assert sorted(batch.records) == ["a", "b"]
    assert batch.closing == ["a"]
    assert q.closing() == {"a"}  # until the batch is written
    q.closed(batch.closing)
    assert not q.has_work() and q.deadline is None


def test_a_job_with_chunks_left_keeps_its_record_and_close_for_a_later_batch() -> None:
    q = Queue(flush_bytes=1, flush_interval=5.0)
    big = [Chunk(i * MIN_BATCH_CAP, STDOUT, bytes(MIN_BATCH_CAP), i) for i in range(2)]
    for c in big:
        q.submit("a", "log-a", c, now=0.0)
    q.queue_record("a", info("a"), "w", now=0.0)
    q.close_job("a", now=0.0)
    first = q.take()
    assert [len(i.chunks) for i in first.logs] == [1]
    assert first.records == {} and first.closing == []
    second = q.take()
    assert [i.chunks for i in second.logs] == [big[1:]]
    assert list(second.records) == ["a"] and second.closing == ["a"]


def test_batches_are_capped_and_round_robin_so_one_busy_job_cannot_starve_others() -> None:
    q = Queue(flush_bytes=1, flush_interval=0.0)
    size = MIN_BATCH_CAP // 4
    for c in [Chunk(i * size, STDOUT, bytes(size), i) for i in range(8)]:
        q.submit("busy", "log-busy", c, now=0.0)
    q.submit("quiet", "log-quiet", Chunk(0, STDOUT, b"x", 0), now=0.0)
    first = q.take()
    assert [(i.job_id, len(i.chunks)) for i in first.logs] == [("busy", 4)]
    second = q.take()
    # The rest of the busy job went to the back: the quiet one comes first now.
    assert [(i.job_id, len(i.chunks)) for i in second.logs] == [("quiet", 1), ("busy", 4)]
    assert q.pending_bytes == 0


def test_a_newer_record_replaces_the_queued_one_and_keeps_both_waiters() -> None:
    q = Queue(flush_bytes=1, flush_interval=0.0)
    q.queue_record("a", info("a", JobStatus.RUNNING), "w1", now=0.0)
    q.queue_record("a", info("a"), "w2", now=0.0)
    batch = q.take()
    record = batch.records["a"]
    assert record.info is not None and record.info.status is JobStatus.COMPLETED
    assert record.waiters == ["w1", "w2"]


def test_requeued_chunks_go_back_ahead_of_newer_ones() -> None:
    q = Queue(flush_bytes=1, flush_interval=5.0)
    c = chunks(2)
    q.submit("a", "log-a", c[0], now=0.0)
    failed = q.take()
    assert q.deadline is None
    q.submit("b", "log-b", Chunk(0, STDOUT, b"b", 0), now=1.0)
    q.submit("a", "log-a", c[1], now=1.0)
    q.requeue(failed.logs, now=2.0)
    assert q.pending_bytes == 21
    assert [(i.job_id, [x.offset for x in i.chunks]) for i in q.take().logs] == [
        ("a", [0, 10]),
        ("b", [0]),
    ]


def test_a_requeued_record_yields_to_a_newer_one_and_its_waiters_join_it() -> None:
    q = Queue(flush_bytes=1, flush_interval=5.0)
    q.queue_record("a", info("a", JobStatus.RUNNING), "old", now=0.0)
    failed = q.take()
    q.queue_record("a", info("a"), "new", now=1.0)
    q.requeue_records(failed.records, now=2.0)
    record = q.take().records["a"]
    assert record.info is not None and record.info.status is JobStatus.COMPLETED
    assert record.waiters == ["new", "old"]
    q.requeue_records({"a": record}, now=3.0)  # nothing newer: it is queued as it was
    assert q.take().records == {"a": record}
