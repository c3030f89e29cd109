"""Job state that survives the daemon: the job database, restarts, recovery, delete."""

from __future__ import annotations

import secrets
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from joblet.config import CgroupSection, StateLayout
from joblet.core.errors import JobNotFound, JobStillRunning
from joblet.core.lifecycle import RESTART_REASON
from joblet.core.model import JobInfo, JobSpec, JobStatus, Limits
from joblet.store.jobdb import SCHEMA_VERSION, JobDB, JobDBError
from joblet.sys.cgroups import CgroupDriver, detect_driver
from joblet.testing import open_harness
from tests.conftest import cgroup_dirs_named, make_config, processes_in_cgroup_named

# --- the job database -----------------------------------------------------------------------


def info(job_id: str, status: JobStatus = JobStatus.COMPLETED, **kw: object) -> JobInfo:
    spec = JobSpec(
        command="python3",
        args=("-c", "print('x')", "--flag", "ü"),
        limits=Limits(cpu_percent=50, memory_mb=128, io_bps=1 << 20, cpu_cores="0", pids_max=7),
        env={"A": "1", "B": "two words"},
        network="none",
        name="build",
    )
    fields: dict[str, object] = {
        "id": job_id,
        "spec": spec,
        "status": status,
        "start_time": 1700000000.25,
        "end_time": 1700000001.5 if status.terminal else None,
        "exit_code": 3,
        "reason": "exit code 3",
        "node_id": "node-1",
        **kw,
    }
    return JobInfo(**fields)  # type: ignore[arg-type]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[JobDB]:
    jobs = JobDB(StateLayout(tmp_path).jobs_db)
    yield jobs
    jobs.close()


def test_jobs_round_trip_in_first_saved_order(db: JobDB, tmp_path: Path) -> None:
    a, b, c = info("a"), info("b", JobStatus.RUNNING), info("c", JobStatus.FAILED)
    db.save([a, b])
    db.save([c])
    b_done = info("b", JobStatus.STOPPED, exit_code=-1, reason="stopped")
    db.save([b_done])  # an update keeps the job's place
    db.close()
    again = JobDB(StateLayout(tmp_path).jobs_db)
    assert again.load() == [a, b_done, c]
    again.delete(["a", "missing"])
    assert [j.id for j in again.load()] == ["b", "c"]
    again.close()


def test_the_database_is_wal(db: JobDB) -> None:
    with sqlite3.connect(db.path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_damaged_row_is_skipped_not_fatal(db: JobDB) -> None:
    db.save([info("good"), info("bad")])
    with sqlite3.connect(db.path) as raw:
        raw.execute("UPDATE jobs SET spec = '{not json' WHERE id = 'bad'")
    assert [j.id for j in db.load()] == ["good"]
    assert db.skipped == ["bad"]


def test_a_newer_schema_or_a_foreign_file_is_refused(tmp_path: Path) -> None:
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as raw:
        raw.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(JobDBError, match="schema version"):
        JobDB(newer)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(JobDBError, match="cannot be opened"):
        JobDB(garbage)


# --- restarts -------------------------------------------------------------------------------


@pytest.fixture
def kept_state(tmp_path: Path, root: None) -> Iterator[tuple[Path, str]]:
    """A state directory and cgroup parent shared by several harness runs; checked at the end."""
    parent = f"joblet-t{secrets.token_hex(4)}"
    yield tmp_path / "state", parent
    assert processes_in_cgroup_named(parent) == [], "job processes left behind"
    assert cgroup_dirs_named(parent) == [], "job cgroups left behind"


async def test_ended_jobs_and_their_logs_survive_a_restart(kept_state: tuple[Path, str]) -> None:
    state, parent = kept_state
    cfg = make_config()
    with trio.fail_after(60):
        async with open_harness(cfg, state_dir=state, cgroup_parent=parent) as first:
            ok = await first.run("sh", "-c", "seq 1 20000; echo oops >&2")
            bad = await first.run("sh", "-c", "echo failing; exit 7")
            stopped = await first.run("sleep", "60")
            await first.engine.stop_job(stopped.id)
            before = {j.id: j for j in [await first.wait(ok.id), await first.wait(bad.id)]}
            before[stopped.id] = first.engine.get(stopped.id)
            logs = {j: await first.streams(j) for j in before}
            metrics = [s async for s in first.engine.follow_metrics(ok.id)]
            node_id = first.node.engine.services.node_id
        async with open_harness(cfg, state_dir=state, cgroup_parent=parent) as second:
            after = {j.id: j for j in second.engine.list_jobs()}
            assert after == before
            assert [j.id for j in second.engine.list_jobs()] == [ok.id, bad.id, stopped.id]
            for job_id, streams in logs.items():
                assert await second.streams(job_id) == streams
            assert metrics  # at least the start and the final sample
            assert [s async for s in second.engine.follow_metrics(ok.id)] == metrics
            assert second.engine.get(ok.id[:8]).node_id == node_id
            assert after[bad.id].exit_code == 7
            assert after[stopped.id].status is JobStatus.STOPPED


async def test_jobs_left_running_by_a_crash_are_failed_and_their_processes_killed(
    kept_state: tuple[Path, str],
) -> None:
    """What a SIGKILLed daemon leaves: a RUNNING record and a job group with live processes."""
    state, parent = kept_state
    state.mkdir(parents=True)
    job_id = "0b7a7b46-5a4f-4c4e-9f2e-1d2c3b4a5968"
    orphan_group = "4d0f1c2e-aaaa-4bbb-8ccc-123456789abc"  # a group the database never saw
    db = JobDB(StateLayout(state).jobs_db)
    db.save([info(job_id, JobStatus.RUNNING, exit_code=0, reason="")])
    db.close()
    driver = detect_driver(CgroupSection(parent=parent))
    driver.setup()
    victims = []
    for group in (job_id, orphan_group):
        driver.create(group, Limits())
        proc = subprocess.Popen(["sleep", "600"])  # noqa: ASYNC220 (returns at once)
        for path in _procs_files(driver, group):
            path.write_text(str(proc.pid))
        victims.append(proc)
    (StateLayout(state).jobs_dir / "leftover" / "work").mkdir(parents=True)
    try:
        with trio.fail_after(60):
            async with open_harness(make_config(), state_dir=state, cgroup_parent=parent) as h:
                job = h.engine.get(job_id)
                assert (job.status, job.reason, job.exit_code) == (
                    JobStatus.FAILED,
                    RESTART_REASON,
                    -1,
                )
                assert job.end_time is not None
                for proc in victims:
                    assert proc.wait(10) == -9  # already dead: reaps at once
                assert driver.job_groups() == []
                assert list(StateLayout(state).jobs_dir.iterdir()) == []
            # The verdict is on record: a second restart sees the same.
            async with open_harness(make_config(), state_dir=state, cgroup_parent=parent) as h:
                assert h.engine.get(job_id) == job
    finally:
        for proc in victims:
            proc.kill()
            proc.wait()


def _procs_files(driver: CgroupDriver, group: str) -> list[Path]:
    """The cgroup.procs file of the group in every hierarchy the driver uses."""
    return [p / group / "cgroup.procs" for p in driver.parent_dirs()]


# --- delete ---------------------------------------------------------------------------------


async def test_delete_removes_an_ended_job_with_its_files_for_good(
    kept_state: tuple[Path, str],
) -> None:
    state, parent = kept_state
    cfg = make_config()
    with trio.fail_after(60):
        async with open_harness(cfg, state_dir=state, cgroup_parent=parent) as h:
            done = await h.run("echo", "bye")
            await h.wait(done.id)
            running = await h.run("sleep", "60")
            with pytest.raises(JobStillRunning, match=f"job is still running: {running.id}"):
                await h.engine.delete_job(running.id[:13])
            deleted = await h.engine.delete_job(done.id[:13])
            assert deleted.id == done.id
            assert not (StateLayout(state).logs_dir / done.id).exists()
            with pytest.raises(JobNotFound):
                h.engine.get(done.id)
            with pytest.raises(JobNotFound):
                await h.engine.delete_job(done.id)
            await h.engine.stop_job(running.id)
        async with open_harness(cfg, state_dir=state, cgroup_parent=parent) as h:
            assert [j.id for j in h.engine.list_jobs()] == [running.id]


async def test_delete_all_deletes_every_ended_job_and_skips_running_ones(
    kept_state: tuple[Path, str],
) -> None:
    state, parent = kept_state
    with trio.fail_after(60):
        async with open_harness(make_config(), state_dir=state, cgroup_parent=parent) as h:
            ended = [await h.run("true") for _ in range(3)]
            for job in ended:
                await h.wait(job.id)
            running = await h.run("sleep", "60")
            assert await h.engine.delete_all_jobs() == (3, 1)
            assert [j.id for j in h.engine.list_jobs()] == [running.id]
            assert [p.name for p in StateLayout(state).logs_dir.iterdir()] in ([], [running.id])
            assert await h.engine.delete_all_jobs() == (0, 1)
            await h.engine.stop_job(running.id)
            assert await h.engine.delete_all_jobs() == (1, 0)
            assert h.engine.list_jobs() == []
