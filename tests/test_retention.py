"""The retention actor: real directories, a mock clock, a fake engine (end times and forget) and
a fake disk writer (deleting inline).

The file system work runs inline (``run_sync``) so that the mock clock's autojump never jumps
while a worker thread runs: every step is deterministic.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from joblet.actors.retention import DAY, RetentionActor, Sweep
from joblet.config import RetentionSection
from joblet.core.chunks import STDOUT, Chunk
from joblet.core.samples import MetricRecord
from joblet.store.logfiles import LogFileWriter, delete_job_logs
from joblet.store.metricfiles import MetricsWriter, delete_job_metrics, metrics_path

T0 = 1_700_000_000.0  # wall-clock time when the mock clock reads 0


async def inline(fn: Callable[[], Any]) -> Any:
    return fn()


class FakeEngine:
    """End times as the engine reports them, and the records retention dropped."""

    def __init__(self, ends: dict[str, float | None]) -> None:
        self.ends = ends
        self.forgotten: list[tuple[str, float]] = []
        self.forgot = trio.Event()

    def end_times(self) -> dict[str, float | None]:
        return dict(self.ends)

    async def forget(self, job_id: str) -> None:
        await trio.lowlevel.checkpoint()
        self.ends.pop(job_id)
        self.forgotten.append((job_id, trio.current_time()))
        self.forgot.set()


class InlineDeleter:
    """The disk writer's deletions, done at once on the event loop."""

    def __init__(self, state: Path) -> None:
        self.state = state

    async def delete_logs(self, job_id: str) -> None:
        await trio.lowlevel.checkpoint()
        delete_job_logs(self.state / "logs", job_id)

    async def delete_metrics(self, job_id: str) -> None:
        await trio.lowlevel.checkpoint()
        delete_job_metrics(self.state / "metrics", job_id)


def wall() -> float:
    return T0 + trio.current_time()


def make_job_files(state: Path, job_id: str, *, logs: bool = True, metrics: bool = True) -> None:
    """A job's log and metrics, written by the real writers."""
    if logs:
        writer = LogFileWriter(state / "logs" / job_id)
        writer.append([Chunk(0, STDOUT, b"hello\n", int(T0 * 1e9))])
        writer.close()
    if metrics:
        mw = MetricsWriter(metrics_path(state / "metrics", job_id))
        mw.append([MetricRecord(int(T0 * 1e9), "cpu", {"cpu_percent": 1.0})])
        mw.close()


def age(path: Path, mtime: float) -> None:
    """Set the modification time of a directory and of everything in it."""
    for entry in path.iterdir():
        os.utime(entry, (mtime, mtime))
    os.utime(path, (mtime, mtime))


def actor(
    state: Path,
    engine: FakeEngine,
    logs_days: int = 30,
    metrics_days: int = 90,
    interval: float = 3600.0,
) -> RetentionActor:
    return RetentionActor(
        state / "logs",
        state / "metrics",
        RetentionSection(logs_days=logs_days, metrics_days=metrics_days, cleanup_interval=interval),
        end_times=engine.end_times,
        forget=engine.forget,
        delete_logs=InlineDeleter(state).delete_logs,
        delete_metrics=InlineDeleter(state).delete_metrics,
        wall_clock=wall,
        run_sync=inline,
    )


def present(state: Path, job_id: str) -> tuple[bool, bool]:
    return (state / "logs" / job_id).exists(), (state / "metrics" / job_id).exists()


async def test_logs_and_metrics_go_after_their_own_periods(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    now = wall()
    engine = FakeEngine(
        {
            "old": now - 100 * DAY,  # both periods over
            "middle": now - 40 * DAY,  # logs over, metrics not yet
            "recent": now - 1 * DAY,
            "running": None,
        }
    )
    for job_id in engine.ends:
        make_job_files(tmp_path, job_id)
    sweep = await actor(tmp_path, engine).sweep()
    assert sweep == Sweep(
        logs_deleted=("middle", "old"), metrics_deleted=("old",), forgotten=("old",)
    )
    assert present(tmp_path, "old") == (False, False)
    assert present(tmp_path, "middle") == (False, True)
    assert present(tmp_path, "recent") == (True, True)
    assert present(tmp_path, "running") == (True, True)
    assert [j for j, _ in engine.forgotten] == ["old"]


async def test_a_running_job_is_never_touched(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    engine = FakeEngine({"running": None})
    make_job_files(tmp_path, "running")
    # Even with files that look ancient.
    age(tmp_path / "logs" / "running", T0 - 1000 * DAY)
    age(tmp_path / "metrics" / "running", T0 - 1000 * DAY)
    assert await actor(tmp_path, engine, logs_days=1, metrics_days=1).sweep() == Sweep()
    assert present(tmp_path, "running") == (True, True)
    assert engine.forgotten == []


async def test_unknown_jobs_age_by_their_newest_file(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    engine = FakeEngine({})
    for job_id in ("stale", "fresh", "fresh-file"):
        make_job_files(tmp_path, job_id)
        age(tmp_path / "logs" / job_id, T0 - 60 * DAY)
        age(tmp_path / "metrics" / job_id, T0 - 100 * DAY)
    age(tmp_path / "logs" / "fresh", T0)
    # The directory is old but a file in it was written to recently.
    os.utime(tmp_path / "logs" / "fresh-file" / "index", (T0, T0))
    (tmp_path / "logs" / "not-a-dir").write_text("x")
    os.utime(tmp_path / "logs" / "not-a-dir", (T0 - 100 * DAY, T0 - 100 * DAY))
    sweep = await actor(tmp_path, engine).sweep()
    assert sweep.logs_deleted == ("stale",)
    assert sweep.metrics_deleted == ("fresh", "fresh-file", "stale")
    assert sweep.forgotten == ()  # nothing to forget: the engine does not know them
    assert (tmp_path / "logs" / "not-a-dir").exists()


async def test_zero_days_keeps_files_and_records_forever(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    engine = FakeEngine({"old": wall() - 1000 * DAY})
    make_job_files(tmp_path, "old")
    sweep = await actor(tmp_path, engine, logs_days=0, metrics_days=1).sweep()
    assert sweep == Sweep(metrics_deleted=("old",))
    assert present(tmp_path, "old") == (True, False)
    assert engine.forgotten == []


async def test_a_job_without_files_is_forgotten_only_once_both_periods_are_over(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    now = wall()
    engine = FakeEngine({"quiet-old": now - 91 * DAY, "quiet-new": now - 31 * DAY})
    (tmp_path / "logs").mkdir()
    (tmp_path / "metrics").mkdir()
    sweep = await actor(tmp_path, engine).sweep()
    assert sweep == Sweep(forgotten=("quiet-old",))


async def test_missing_directories_are_fine(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    engine = FakeEngine({"old": wall() - 1000 * DAY})
    assert await actor(tmp_path / "nothing", engine).sweep() == Sweep(forgotten=("old",))


async def test_a_failing_forget_is_retried_at_the_next_sweep(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    calls = []

    async def forget(job_id: str) -> None:
        calls.append(job_id)
        if len(calls) == 1:
            raise RuntimeError("database is locked")

    ends: dict[str, float | None] = {"old": wall() - 1000 * DAY}
    retention = RetentionActor(
        tmp_path / "logs",
        tmp_path / "metrics",
        RetentionSection(),
        end_times=lambda: ends,
        forget=forget,
        delete_logs=InlineDeleter(tmp_path).delete_logs,
        delete_metrics=InlineDeleter(tmp_path).delete_metrics,
        wall_clock=wall,
        run_sync=inline,
    )
    assert (await retention.sweep()).forgotten == ()
    assert (await retention.sweep()).forgotten == ("old",)
    assert calls == ["old", "old"]


async def test_run_cleans_up_at_start_and_every_interval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Ended 29.5 days ago: its log is due in 12 hours, at the first clean-up after that.
    engine = FakeEngine({"job": wall() - 29.5 * DAY})
    make_job_files(tmp_path, "job", metrics=False)
    retention = actor(tmp_path, engine, logs_days=30, metrics_days=30, interval=3600.0)
    with trio.fail_after(2 * DAY):
        async with trio.open_nursery() as nursery:
            await nursery.start(retention.run)
            await trio.testing.wait_all_tasks_blocked()
            assert present(tmp_path, "job") == (True, False)  # the start-up sweep kept it
            await engine.forgot.wait()
            nursery.cancel_scope.cancel()
    assert present(tmp_path, "job") == (False, False)
    # Forgotten at the first hourly clean-up past the period (12 h; 12 sweeps after the first).
    [(name, when)] = engine.forgotten
    assert name == "job"
    assert when == pytest.approx(13 * 3600.0)
