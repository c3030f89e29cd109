"""The in-memory job log: subscribers, replay, resume, eviction and the memory budget.

Real files in ``tmp_path`` and, unless a test is about the sink itself, the real disk writer.
Ordering is forced with ``trio.testing`` and events, never with sleeps.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from joblet.actors.diskwriter import DiskWriter
from joblet.actors.joblog import JobLog, LogBudget
from joblet.config import LogsSection
from joblet.core.chunks import STDERR, STDOUT, Chunk
from joblet.core.logwindow import MAX_CHUNK
from joblet.store.logfiles import LogFileReader, LogFileWriter

JOB = "job-1"


def make_log(
    logs_dir: Path,
    sink: DiskWriter | ManualSink,
    budget: LogBudget,
    *,
    window: int = 64 << 10,
    job_id: str = JOB,
) -> JobLog:
    return JobLog(
        job_id,
        sink=sink,
        budget=budget,
        window_bytes=window,
        reader=lambda: LogFileReader(logs_dir / job_id),
    )


@asynccontextmanager
async def running_writer(logs_dir: Path, **cfg: int | float) -> AsyncIterator[DiskWriter]:
    """A running disk writer, cancelled (which flushes) on exit."""
    writer = DiskWriter(logs_dir, LogsSection(**cfg))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        yield writer
        nursery.cancel_scope.cancel()


class ManualSink:
    """A sink the test drives: chunks are written and marked written only when told."""

    def __init__(self, job_dir: Path) -> None:
        self.queued: list[Chunk] = []
        self.writer = LogFileWriter(job_dir)

    def submit(self, log: JobLog, chunk: Chunk) -> None:
        self.queued.append(chunk)

    def write_upto(self, log: JobLog, offset: int) -> None:
        batch = [c for c in self.queued if c.end <= offset]
        self.queued = [c for c in self.queued if c.end > offset]
        self.writer.append(batch)
        log.mark_written(offset)


def workload(seed: int, n: int) -> list[tuple[int, bytes]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        stream = STDOUT if rng.random() < 0.6 else STDERR
        size = rng.choice([1, 17, 500, 4096, 30_000, 70_000])
        line = b"%d:%d " % (stream, i)
        out.append((stream, (line * (size // len(line) + 1))[:size]))
    return out


def runs(chunks: list[Chunk]) -> list[tuple[int, int, bytes]]:
    """The chunks with adjacent pieces of one write (same stream and timestamp) joined.

    Two readers that got the same bytes with the same stream and timestamp for every byte get
    equal runs, however their reads were split.
    """
    out: list[tuple[int, int, bytes]] = []
    expected_offset = 0
    for c in chunks:
        assert c.offset == expected_offset, "a gap or an overlap"
        expected_offset = c.end
        if out and out[-1][0] == c.stream and out[-1][1] == c.ts_ns:
            out[-1] = (c.stream, c.ts_ns, out[-1][2] + c.data)
        else:
            out.append((c.stream, c.ts_ns, c.data))
    return out


async def collect(log: JobLog, offset: int = 0, max_bytes: int = 65536) -> list[Chunk]:
    return [c async for c in log.follow(offset, max_bytes)]


# --- the budget -------------------------------------------------------------------------------


async def test_budget_is_first_come_first_served() -> None:
    budget = LogBudget(10)
    order: list[str] = []

    async def take(name: str, n: int) -> None:
        await budget.acquire(n)
        order.append(name)

    with trio.fail_after(5):
        await budget.acquire(6)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(take, "big", 6)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(take, "small", 1)  # fits, but waits its turn
            await trio.testing.wait_all_tasks_blocked()
            assert order == []
            budget.release(6)
        assert order == ["big", "small"]
        assert budget.used == 7


async def test_budget_grants_an_oversized_amount_when_free_and_cancel_takes_nothing() -> None:
    budget = LogBudget(10)
    with trio.fail_after(5):
        await budget.acquire(100)
        assert budget.used == 100
        with trio.move_on_after(0) as scope:  # cancelled while waiting
            await budget.acquire(1)
        assert scope.cancelled_caught
        assert budget.used == 100
        budget.release(100)
        with pytest.raises(ValueError):
            budget.release(1)


# --- readers ----------------------------------------------------------------------------------


async def test_many_subscribers_get_byte_identical_streams_and_late_ones_replay_it(
    tmp_path: Path,
) -> None:
    items = workload(1, 300)
    merged = b"".join(data for _, data in items)
    results: dict[str, list[Chunk]] = {}
    appended = trio.Event()

    async def subscriber(name: str, max_bytes: int, stall: bool) -> None:
        chunks = []
        async with aclosing(log.follow(0, max_bytes)) as it:
            async for c in it:
                chunks.append(c)
                if stall and len(chunks) == 1:
                    await appended.wait()  # falls far behind the window: reads from disk
        results[name] = chunks

    with trio.fail_after(30):
        async with running_writer(tmp_path, flush_bytes=64 << 10) as writer:
            log = make_log(tmp_path, writer, LogBudget(1 << 20), window=32 << 10)
            async with trio.open_nursery() as nursery:
                for i, max_bytes in enumerate([1 << 30, 65536, 4096, 65536, 3001]):
                    nursery.start_soon(subscriber, f"live-{i}", max_bytes, False)
                    nursery.start_soon(subscriber, f"stalled-{i}", max_bytes, True)
                await trio.testing.wait_all_tasks_blocked()
                for stream, data in items:
                    await log.append(stream, data)
                assert log.memory_start > 0
                appended.set()
                log.close()
                writer.close_job(JOB)
            await writer.flush()
            # After the end: from memory-less JobLog state, then from a log loaded from disk.
            assert log.memory_bytes == 0
            results["late"] = await collect(log)
            loaded = await JobLog.from_disk(JOB, lambda: LogFileReader(tmp_path / JOB))
            results["from-disk"] = await collect(loaded)

    reference = runs(results["live-0"])
    assert b"".join(r[2] for r in reference) == merged
    assert _join_streams([(s, d) for s, _, d in reference]) == _join_streams(items)
    for name, chunks in results.items():
        assert runs(chunks) == reference, name
    assert loaded.closed and loaded.size == len(merged)


def _join_streams(items: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    for stream, data in items:
        if out and out[-1][0] == stream:
            out[-1] = (stream, out[-1][1] + data)
        else:
            out.append((stream, data))
    return out


async def test_reads_resume_from_any_offset_without_loss_or_duplication(tmp_path: Path) -> None:
    items = workload(2, 200)
    merged = b"".join(data for _, data in items)
    rng = random.Random(2)
    with trio.fail_after(30):
        async with running_writer(tmp_path, flush_bytes=32 << 10) as writer:
            log = make_log(tmp_path, writer, LogBudget(1 << 20), window=16 << 10)
            for stream, data in items:
                await log.append(stream, data)
            await writer.flush()
            assert 0 < log.memory_start < log.size  # part on disk only, part in memory
            offsets = [0, 1, log.memory_start - 1, log.memory_start, log.size - 1]
            offsets += [rng.randrange(log.size) for _ in range(30)]
            for offset in offsets:
                first = await log.read(offset, rng.choice([1, 100, 65536]))
                assert first[0].offset == offset
                got = b"".join(c.data for c in first)
                got += b"".join(c.data for c in await collect_until(log, offset + len(got)))
                assert got == merged[offset:]
            log.close()


async def collect_until(log: JobLog, offset: int) -> list[Chunk]:
    """Everything from ``offset`` to the current end of a log that is still open."""
    out = []
    while offset < log.size:
        chunks = await log.read(offset)
        out.extend(chunks)
        offset = chunks[-1].end
    return out


async def test_read_waits_for_data_and_ends_after_close(tmp_path: Path) -> None:
    sink = ManualSink(tmp_path / JOB)
    log = make_log(tmp_path, sink, LogBudget(1 << 20))
    got: list[list[Chunk]] = []

    async def reader(offset: int) -> None:
        got.append(await log.read(offset))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, 0)
            nursery.start_soon(reader, 3)  # beyond the end: waits until it exists
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            await log.append(STDOUT, b"ab")
            await trio.testing.wait_all_tasks_blocked()
            assert [c.data for cs in got for c in cs] == [b"ab"]
            await log.append(STDERR, b"cdef")
        assert [c.data for cs in got for c in cs] == [b"ab", b"def"]
        assert got[1][0] == Chunk(3, STDERR, b"def", got[1][0].ts_ns)
        await log.append(STDOUT, b"")  # nothing to add: no chunk
        assert log.size == 6
        log.close()
        log.close()
        assert await log.read(6) == []
        assert await log.read(100) == []
        with pytest.raises(trio.ClosedResourceError):
            await log.append(STDOUT, b"late")
        with pytest.raises(ValueError):
            await log.read(-1)
        with pytest.raises(ValueError):
            await log.read(0, 0)
    sink.writer.close()


async def test_big_appends_are_split_into_bounded_chunks(tmp_path: Path) -> None:
    data = bytes(range(256)) * (MAX_CHUNK * 5 // 2 // 256)
    with trio.fail_after(10):
        async with running_writer(tmp_path) as writer:
            log = make_log(tmp_path, writer, LogBudget(1 << 30))
            await log.append(STDOUT, data)
            chunks = await log.read(0, 1 << 30)
            assert [len(c.data) for c in chunks] == [
                MAX_CHUNK,
                MAX_CHUNK,
                len(data) - 2 * MAX_CHUNK,
            ]
            assert len({c.ts_ns for c in chunks}) == 1
            log.close()
            await writer.flush()
            assert b"".join(c.data for c in await collect(log, 0, 1 << 30)) == data


# --- memory -------------------------------------------------------------------------------


async def test_chunks_leave_memory_once_written_and_outside_the_window(tmp_path: Path) -> None:
    sink = ManualSink(tmp_path / JOB)
    budget = LogBudget(1 << 20)
    log = make_log(tmp_path, sink, budget, window=100)
    with trio.fail_after(5):
        for stream in (STDOUT, STDERR, STDOUT):
            await log.append(stream, bytes([65 + stream]) * 60)
        assert (log.memory_bytes, budget.used) == (180, 180)
        sink.write_upto(log, 60)  # on disk and 120 bytes from the end: leaves memory
        assert (log.memory_bytes, log.memory_start, budget.used) == (120, 60, 120)
        sink.write_upto(log, 180)  # all on disk, but the last 100 bytes stay for readers
        assert (log.memory_bytes, log.memory_start, budget.used) == (120, 60, 0)
        assert (await log.read(0, 1000))[0].data == b"B" * 60  # from disk
        await log.append(STDERR, b"C" * 60)
        assert (log.memory_bytes, log.memory_start) == (120, 120)  # pushed out of the window
        log.close()
        sink.write_upto(log, 240)
        assert (log.memory_bytes, log.memory_start) == (0, 240)  # ended and on disk: all gone
        chunks = await collect(log)
        assert b"".join(c.data for c in chunks) == b"B" * 60 + b"C" * 60 + b"B" * 60 + b"C" * 60
        assert [c.stream for c in chunks] == [STDOUT, STDERR, STDOUT, STDERR]
    sink.writer.close()


async def test_a_stalled_subscriber_neither_slows_appends_nor_holds_memory(tmp_path: Path) -> None:
    total = 200 * 1024 * 1024
    size = 64 << 10
    budget_bytes = 4 << 20
    window = 1 << 20
    block = b"".join(b"line %d of the job's output\n" % i for i in range(20_000))[:size]
    resume = trio.Event()
    subscribed = trio.Event()
    sent = hashlib.sha256()
    received = hashlib.sha256()
    received_bytes = 0
    peak_memory = 0

    async def stalled_subscriber() -> None:
        nonlocal received_bytes
        async with aclosing(log.follow(0)) as it:
            async for chunk in it:
                received.update(chunk.data)
                received_bytes += len(chunk.data)
                if not subscribed.is_set():
                    subscribed.set()
                    await resume.wait()  # stalls while the job writes everything

    with trio.fail_after(60):
        async with running_writer(tmp_path, flush_bytes=1 << 20) as writer:
            budget = LogBudget(budget_bytes)
            log = make_log(tmp_path, writer, budget, window=window)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stalled_subscriber)
                await log.append(STDOUT, b"%08d" % 0 + block[8:])
                sent.update(b"%08d" % 0 + block[8:])
                await subscribed.wait()
                for i in range(1, total // size):
                    data = b"%08d" % i + block[8:]
                    await log.append(STDERR if i % 5 == 0 else STDOUT, data)
                    sent.update(data)
                    peak_memory = max(peak_memory, log.memory_bytes)
                # Every append returned while the subscriber sat on its first chunk.
                assert not resume.is_set() and received_bytes == size
                assert log.size == total
                assert peak_memory <= budget_bytes + window + size
                assert budget.used <= budget_bytes
                log.close()
                writer.close_job(JOB)
                resume.set()
    assert received_bytes == total
    assert received.hexdigest() == sent.hexdigest()
    assert log.memory_bytes == 0


async def test_append_blocks_at_the_budget_until_the_disk_writer_runs(tmp_path: Path) -> None:
    limit = 64 << 10
    budget = LogBudget(limit)
    writer = DiskWriter(tmp_path, LogsSection(flush_interval=0.01))
    log = make_log(tmp_path, writer, budget)
    first = bytes(limit)
    second = b"more output\n"
    done = trio.Event()

    async def append_more() -> None:
        await log.append(STDERR, second)
        done.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await log.append(STDOUT, first)  # fills the budget
            nursery.start_soon(append_more)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()  # blocked: nothing reached the disk yet
            assert (log.size, budget.used, writer.pending_bytes) == (limit, limit, limit)
            await nursery.start(writer.run)
            await done.wait()  # the actor wrote the first chunk, so the second fits
            log.close()
            writer.close_job(JOB)
            await writer.flush()
            assert budget.used == 0
            nursery.cancel_scope.cancel()
        chunks = await collect(log)
    assert [(s, d) for s, _, d in runs(chunks)] == [(STDOUT, first), (STDERR, second)]
    assert LogFileReader(tmp_path / JOB).size() == limit + len(second)


async def test_a_log_loaded_from_disk_is_closed_and_complete(tmp_path: Path) -> None:
    items = workload(3, 50)
    with trio.fail_after(10):
        async with running_writer(tmp_path) as writer:
            log = make_log(tmp_path, writer, LogBudget(1 << 20))
            for stream, data in items:
                await log.append(stream, data)
            log.close()
            writer.close_job(JOB)
        live = await collect(log)
        loaded = await JobLog.from_disk(JOB, lambda: LogFileReader(tmp_path / JOB))
        assert (loaded.closed, loaded.size, loaded.memory_bytes) == (True, log.size, 0)
        assert runs(await collect(loaded)) == runs(live)
        assert (
            b"".join(c.data for c in await collect(loaded, 12345))
            == b"".join(d for _, d in items)[12345:]
        )
        with pytest.raises(trio.ClosedResourceError):
            await loaded.append(STDOUT, b"x")
        empty = await JobLog.from_disk("never-ran", lambda: LogFileReader(tmp_path / "none"))
        assert empty.size == 0 and await empty.read(0) == []
