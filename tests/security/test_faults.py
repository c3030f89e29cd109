"""Faults: the state directory's filesystem full, and SIGKILL of the daemon mid-operation.

Disk full: a small loop-mounted ext4 holds a real node's state directory; a host-side filler and a
job's own output fill it. The node must stay up, running jobs wait (their output held in the
bounded log budget, the jobs blocked on write), ``jobs.db`` stays consistent, the writer retries
with backoff (a bounded number of attempts and log lines), and once space is freed every log is
complete and new jobs run.

SIGKILL: a real ``joblet serve`` is killed at many points of each multi-step operation (job start,
DeleteJob, DeleteAllJobs, a retention sweep) and started again on the same state directory and
cgroup parent; after the restart nothing of the interrupted operation may be left behind.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio

from joblet.config import LogsSection, StateLayout
from joblet.core.lifecycle import RESTART_REASON
from joblet.core.model import JobInfo, JobStatus
from joblet.protocol import joblet_pb2 as pb
from joblet.store.jobdb import JobDB
from joblet.testing import open_harness
from tests.conftest import IN_CI, make_config, processes_in_cgroup_named, require_root
from tests.daemon import CrashableDaemon, Daemon, crashable_daemon, spawn_daemon
from tests.daemon import _job_cgroups as job_cgroups
from tests.test_durability import info as stored
from tests.test_grpc import T, job_stub, open_channel, output

#: Size of the loop-mounted filesystem that holds the state directory.
IMAGE_MB = 48
#: Free space the host-side filler leaves: the job's output fills the rest.
LEAVE_FREE = 2 << 20
#: The log memory budget while the disk is full: the blocked job's output waits in it.
BUDGET = 4 << 20
#: What the chatty job writes in all: far more than the free space plus the budget.
CHATTY_BYTES = 24 << 20
CHATTY_SEED = 8
#: A job that writes CHATTY_BYTES of incompressible, reproducible output (stored as it is).
CHATTY = f"""
import random, sys
rng = random.Random({CHATTY_SEED})
out = sys.stdout.buffer
for _ in range({CHATTY_BYTES} // 65536):
    out.write(rng.randbytes(65536))
out.flush()
"""
#: How long the test leaves the disk full once the writer has hit it: long enough for several
#: retries, so a busy loop would show as many attempts.
FULL_FOR = 2.0


def chatty_output() -> bytes:
    rng = random.Random(CHATTY_SEED)
    return b"".join(rng.randbytes(65536) for _ in range(CHATTY_BYTES // 65536))


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        if IN_CI:
            pytest.fail(f"{tool} is missing (.ci/run installs it)")
        pytest.skip(f"needs {tool}")


@contextmanager
def loop_filesystem(tmp: Path, size_mb: int) -> Iterator[Path]:
    """A fresh ext4 of ``size_mb`` on a loop device, mounted for the block; always torn down."""
    require_root()
    for tool in ("mkfs.ext4", "losetup", "mount", "umount", "fallocate"):
        _need(tool)
    # The image lives in memory (tmpfs): when the last user of the mount goes (perhaps a process
    # elsewhere whose mount namespace copied it), freeing the image is instant there, while on a
    # disk mounted with `discard` it is a discard charged to that process's blkio limit.
    image, mnt = (
        Path(tempfile.mkdtemp(prefix="joblet-faults-", dir="/dev/shm")) / "state.img",
        tmp / "mnt",
    )
    mnt.mkdir()
    subprocess.run(["truncate", "-s", f"{size_mb}M", str(image)], check=True)
    # -m 0: no blocks reserved for root (the daemon is root: it could use them).
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    device = subprocess.run(
        ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    mounted = False
    try:
        subprocess.run(["mount", "-t", "ext4", device, str(mnt)], check=True)
        mounted = True
        yield mnt
    finally:
        try:
            if mounted and subprocess.run(["umount", str(mnt)]).returncode:
                # Busy (a failed test's open file): detach it anyway, never leave it mounted.
                subprocess.run(["umount", "-l", str(mnt)], check=True)
        finally:
            subprocess.run(["losetup", "-d", device], check=True)
            image.unlink()
            image.parent.rmdir()
    assert str(mnt) not in Path("/proc/self/mountinfo").read_text()
    # Detached, or (while a process elsewhere still holds a copy of the mount in its own mount
    # namespace) marked to be freed as soon as the last user goes.
    autoclear = Path(f"/sys/block/{Path(device).name}/loop/autoclear")
    listed = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout
    assert not listed.strip() or autoclear.read_text().strip() == "1", listed


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def check_db(path: Path, acknowledged: set[str]) -> list[JobInfo]:
    """``jobs.db`` is intact, every row decodes and every acknowledged job is there."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    db = JobDB(path)
    try:
        jobs = db.load()
        assert db.skipped == []
    finally:
        db.close()
    missing = acknowledged - {j.id for j in jobs}
    assert not missing, f"acknowledged jobs lost: {missing}"
    return jobs


@pytest.fixture
def full_disk_state(root: None, tmp_path: Path) -> Iterator[Path]:
    with loop_filesystem(tmp_path, IMAGE_MB) as mnt:
        yield mnt


async def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:  # noqa: ASYNC109
    """Poll ``predicate()`` until it holds: it reads the disk or the budget, which signal
    nothing to wait on."""
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.05)


def writer_failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "joblet" and r.levelno >= logging.ERROR]


@pytest.mark.slow
async def test_state_filesystem_full(
    full_disk_state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="joblet")
    state = full_disk_state / "state"
    layout = StateLayout(state)
    cfg = make_config(logs=LogsSection(memory_budget=BUDGET, flush_interval=0.05))
    filler = full_disk_state / "filler"
    acknowledged: set[str] = set()
    with trio.fail_after(180):
        async with open_harness(cfg, state_dir=state) as joblet:
            before = await joblet.run("seq", "1", "1000")
            acknowledged.add(before.id)
            assert (await joblet.wait(before.id)).status is JobStatus.COMPLETED
            size = free_bytes(full_disk_state) - LEAVE_FREE
            await trio.run_process(["fallocate", "-l", str(size), str(filler)])
            chatty = await joblet.run("python3", "-c", CHATTY)
            assert chatty.status is JobStatus.RUNNING, chatty
            acknowledged.add(chatty.id)
            budget = joblet.engine.services.budget

            # The disk fills; the job's output then waits in the budget and the job blocks.
            writer = joblet.engine.services.disk_writer
            # (A failed batch is cut back off the files, so free space itself goes up and down.)
            await wait_for(lambda: writer.failed_writes > 0)
            await wait_for(lambda: budget.used >= BUDGET // 2)
            failures_at_full = len(writer_failures(caplog))
            attempts_at_full = writer.failed_writes
            await trio.sleep(FULL_FOR)  # let the writer retry for a while, disk still full
            attempts = writer.failed_writes - attempts_at_full
            # Backoff: a busy loop would retry thousands of times; one failure is logged.
            assert attempts <= FULL_FOR / 0.1 + 1, attempts
            assert len(writer_failures(caplog)) - failures_at_full <= 1
            full_lines = [r for r in writer_failures(caplog) if "full" in r.getMessage()]
            assert len(full_lines) == 1, [r.getMessage() for r in writer_failures(caplog)]
            assert "No space left on device" in str(getattr(full_lines[0], "fields", {}))
            assert budget.used <= BUDGET + (1 << 20)

            # The node still answers, the job still runs (blocked on write), the db is intact.
            status = joblet.engine.get(chatty.id)
            assert status.status is JobStatus.RUNNING, status
            assert {j.id for j in joblet.engine.list_jobs()} >= acknowledged
            check_db(layout.jobs_db, acknowledged)

            # Deleting an ended job is how an operator frees space: it must not wait behind the
            # output that cannot be written.
            with trio.fail_after(10):
                await joblet.engine.delete_job(before.id)
            acknowledged.discard(before.id)
            assert not (layout.logs_dir / before.id).exists()

            # A job started now either runs or fails saying the disk is full.
            during = await joblet.run("true")
            acknowledged.add(during.id)
            if during.status is JobStatus.FAILED:
                assert "No space left on device" in during.reason, during

            # Space comes back: the blocked job finishes with its whole output on disk.
            filler.unlink()
            final = await joblet.wait(chatty.id)
            assert final.status is JobStatus.COMPLETED, final
            assert await joblet.output(chatty.id) == chatty_output()
            ended = await joblet.wait(during.id)
            assert ended.status in (JobStatus.COMPLETED, JobStatus.FAILED), ended
            after = await joblet.run("seq", "1", "20000")
            acknowledged.add(after.id)
            assert (await joblet.wait(after.id)).status is JobStatus.COMPLETED
            assert await joblet.output(after.id) == b"".join(b"%d\n" % i for i in range(1, 20001))
            resumed = [r for r in caplog.records if "resumed" in r.getMessage()]
            assert len(resumed) == 1
        jobs = check_db(layout.jobs_db, acknowledged)
        assert all(j.status.terminal for j in jobs), jobs
        # Read back by a new node from disk alone.
        async with open_harness(cfg, state_dir=state) as again:
            assert await again.output(chatty.id) == chatty_output()
            assert again.engine.get(during.id).status is ended.status


def test_a_deleted_jobs_note_lasts_until_its_files_are_gone(tmp_path: Path) -> None:
    db = JobDB(tmp_path / "jobs.db")
    db.save([stored("a"), stored("b"), stored("c")])
    # "a" is deleted whole (its files next), "b" only loses its row (retention's forget).
    db.delete(["a", "b"], files_of=["a"])
    db.close()
    db = JobDB(tmp_path / "jobs.db")  # as after a crash
    try:
        assert [j.id for j in db.load()] == ["c"]
        assert db.deleting() == ["a"]
        db.files_deleted(["a"])
        assert db.deleting() == []
    finally:
        db.close()


# --- SIGKILL of the daemon in the middle of an operation ----------------------------------------

#: Kill points per operation: SIGKILL this many times, after delays spread evenly from 0 to a
#: quarter past the operation's duration (measured once, uninterrupted, on this machine), so the
#: kill lands before, inside and after each of its steps. The assertions hold at every point.
KILL_POINTS = 20
#: What every job prints (so each has a log, and a metrics file from its start and end sample).
PRINT = ("seq", "1", "3000")
PRINTED = b"".join(b"%d\n" % i for i in range(1, 3001))


def spread(duration: float) -> list[float]:
    """The kill delays for an operation that takes ``duration`` seconds uninterrupted."""
    return [1.25 * duration * k / (KILL_POINTS - 1) for k in range(KILL_POINTS)]


def stub_of(daemon: Daemon) -> tuple[grpc.Channel, Any]:
    channel = open_channel(
        daemon.target, daemon.certs.ca_cert, (daemon.certs.admin_cert, daemon.certs.admin_key)
    )
    return channel, job_stub(channel)


def file_owners(daemon: Daemon) -> set[str]:
    """Job ids that have a log or metrics directory."""
    layout = StateLayout(daemon.state_dir)
    return {
        p.name for d in (layout.logs_dir, layout.metrics_dir) if d.is_dir() for p in d.iterdir()
    }


def assert_nothing_left(daemon: Daemon, stub: Any, point: Any) -> dict[str, Any]:
    """After a restart: no job runs, nothing of a job is left but its row and files. Returns
    the jobs by id."""
    layout = StateLayout(daemon.state_dir)
    assert processes_in_cgroup_named(daemon.cgroup_parent) == [], point
    survivors = {p for p in LEFT if start_time(p[0]) == p[1]}
    assert not survivors, f"{point}: processes of the killed daemon still run: {survivors}"
    assert job_cgroups(daemon.cgroup_parent) == [], point
    assert list(layout.jobs_dir.iterdir()) == [], point
    assert str(layout.jobs_dir) not in Path("/proc/self/mountinfo").read_text(), point
    jobs = {j.id: j for j in stub.ListJobs(pb.EmptyRequest(), timeout=T).jobs}
    for job in jobs.values():
        assert job.status in {"COMPLETED", "FAILED", "STOPPED"}, (point, job)
    orphans = file_owners(daemon) - set(jobs)
    assert not orphans, f"{point}: files of jobs without a record: {orphans}"
    return jobs


def assert_works(stub: Any) -> None:
    job = stub.RunJob(pb.RunJobReq(command=PRINT[0], args=list(PRINT[1:])), timeout=T)
    assert output(stub, job.id) == PRINTED
    status = stub.GetJobStatus(pb.GetJobStatusReq(id=job.id), timeout=T)
    assert status.status == "COMPLETED", status


def descendants(pid: int) -> set[tuple[int, str]]:
    """Every live descendant of ``pid``, each with its start time (so a reused PID differs)."""
    found: set[tuple[int, str]] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if (start := start_time(child)) is not None:
                    found.add((child, start))
                    todo.append(child)
    return found


def start_time(pid: int) -> str | None:
    """A live (not zombie) process's start time, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


#: Processes the killed daemon had started (job processes, waiting stage-1 processes).
LEFT: set[tuple[int, str]] = set()


def kill_after(ctl: CrashableDaemon, future: Any, delay: float) -> None:
    if delay:
        time.sleep(delay)  # an injection point, not an ordering: every point must pass
    LEFT.update(descendants(ctl.daemon.process.pid))
    ctl.kill()
    try:
        future.result(timeout=T)
    except Exception:
        pass  # the daemon died under the call


@pytest.fixture
def crashable(root: None) -> Iterator[CrashableDaemon]:
    with crashable_daemon({"logs": {"flushInterval": 0.05}}) as ctl:
        yield ctl


@pytest.mark.slow
def test_sigkill_during_job_start(crashable: CrashableDaemon) -> None:
    req = pb.RunJobReq(command="sh", args=["-c", "echo started; sleep 60"])
    channel, stub = stub_of(crashable.daemon)
    with channel:
        stub.ListJobs(pb.EmptyRequest(), timeout=T)
        t0 = time.monotonic()
        started = {stub.RunJob(req, timeout=T).id}  # left running: the first kill ends it
        took = time.monotonic() - t0
    for point, delay in enumerate(spread(took)):
        channel, stub = stub_of(crashable.daemon)
        try:
            stub.ListJobs(pb.EmptyRequest(), timeout=T)
            future = stub.RunJob.future(req, timeout=T)
            kill_after(crashable, future, delay)
            try:
                started.add(future.result().id)
            except Exception:
                pass
        finally:
            channel.close()
        daemon = crashable.restart()
        channel, stub = stub_of(daemon)
        try:
            jobs = assert_nothing_left(daemon, stub, (point, delay))
            assert started <= set(jobs), f"acknowledged job lost at {point}"
            for job_id in started:
                assert jobs[job_id].status == "FAILED"
                assert jobs[job_id].reason == RESTART_REASON
            for job in jobs.values():
                if job.status == "FAILED":
                    assert job.reason == RESTART_REASON, job
        finally:
            channel.close()
    channel, stub = stub_of(crashable.daemon)
    with channel:
        assert_works(stub)


def make_ended_jobs(stub: Any, n: int) -> list[str]:
    ids = [
        stub.RunJob(pb.RunJobReq(command=PRINT[0], args=list(PRINT[1:])), timeout=T).id
        for _ in range(n)
    ]
    for job_id in ids:
        assert output(stub, job_id) == PRINTED
    return ids


def assert_all_or_nothing(daemon: Daemon, stub: Any, ids: list[str], point: Any) -> int:
    """Each job is either whole (record and complete log) or wholly gone. Returns how many
    are gone."""
    jobs = assert_nothing_left(daemon, stub, point)
    owners = file_owners(daemon)
    gone = 0
    for job_id in ids:
        if job_id in jobs:
            assert output(stub, job_id) == PRINTED, (point, job_id)
        else:
            assert job_id not in owners, (point, job_id)
            gone += 1
    return gone


@pytest.mark.slow
@pytest.mark.parametrize("rpc", ["DeleteJob", "DeleteAllJobs"])
def test_sigkill_during_delete(crashable: CrashableDaemon, rpc: str) -> None:
    n = 1 if rpc == "DeleteJob" else 8

    def delete(stub: Any, ids: list[str]) -> Any:
        if rpc == "DeleteJob":
            return stub.DeleteJob.future(pb.DeleteJobReq(id=ids[0]), timeout=T)
        return stub.DeleteAllJobs.future(pb.DeleteAllJobsReq(), timeout=T)

    channel, stub = stub_of(crashable.daemon)
    with channel:
        ids = make_ended_jobs(stub, n)
        t0 = time.monotonic()
        delete(stub, ids).result()
        took = time.monotonic() - t0
    for point, delay in enumerate(spread(took)):
        channel, stub = stub_of(crashable.daemon)
        try:
            ids = make_ended_jobs(stub, n)
            future = delete(stub, ids)
            kill_after(crashable, future, delay)
            try:
                future.result()
                acked = True
            except Exception:
                acked = False
        finally:
            channel.close()
        daemon = crashable.restart()
        channel, stub = stub_of(daemon)
        try:
            gone = assert_all_or_nothing(daemon, stub, ids, (point, delay))
            if acked:
                assert gone == len(ids), (point, delay)
        finally:
            channel.close()
    channel, stub = stub_of(crashable.daemon)
    with channel:
        assert_works(stub)


#: Jobs whose files and records the sweep deletes each time.
OLD_JOBS = 12


def age_jobs(state: Path, ids: list[str], days: float) -> None:
    """Make ended jobs look as if they ended ``days`` ago (the daemon is down)."""
    then = time.time() - days * 86400
    with closing(sqlite3.connect(StateLayout(state).jobs_db)) as db:
        db.executemany(
            "UPDATE jobs SET start_time = ?, end_time = ? WHERE id = ?",
            [(then - 1, then, j) for j in ids],
        )
        db.commit()


def start_and_kill_in_sweep(
    ctl: CrashableDaemon, delay: float | None, old_jobs: list[str]
) -> float:
    """Start the daemon again, and SIGKILL it ``delay`` after its node has started (its first
    sweep follows at once); None: once the sweep has deleted every old job's files. Returns the
    time from the node's start to the kill."""
    old = ctl.daemon
    base = old.state_dir.parent
    log_start = old.log_path.stat().st_size
    ctl.daemon = spawn_daemon(base, RETENTION, port=old.port, parent=old.cgroup_parent)
    deadline = time.monotonic() + 30
    while b"joblet node starting" not in old.log_path.read_bytes()[log_start:]:
        assert ctl.daemon.process.poll() is None, ctl.daemon.log()[-4000:]
        assert time.monotonic() < deadline, "the node never started"
        time.sleep(0.001)
    t0 = time.monotonic()
    if delay is None:
        owners = {old_jobs[0]}
        while owners & set(old_jobs):
            assert time.monotonic() < deadline, "the sweep never ended"
            time.sleep(0.001)
            owners = file_owners(ctl.daemon)
    elif delay:
        time.sleep(delay)
    took = time.monotonic() - t0
    LEFT.update(descendants(ctl.daemon.process.pid))
    ctl.kill()
    return took


RETENTION = {
    "logs": {"flushInterval": 0.05},
    "persist": {"storage": {"retention": {"logs_days": 1, "metrics_days": 1}}},
}


@pytest.mark.slow
def test_sigkill_during_retention_sweep(root: None) -> None:
    with crashable_daemon(RETENTION) as ctl:
        delays: list[float | None] = [None]  # the first run measures the sweep
        for point in range(KILL_POINTS + 1):
            delay = delays[point]
            channel, stub = stub_of(ctl.daemon)
            try:
                old = make_ended_jobs(stub, OLD_JOBS)
                young = make_ended_jobs(stub, 2)
            finally:
                channel.close()
            ctl.kill()
            age_jobs(ctl.daemon.state_dir, old, days=3)
            took = start_and_kill_in_sweep(ctl, delay, old)
            if delay is None:
                delays += spread(took)
            daemon = ctl.restart()
            channel, stub = stub_of(daemon)
            try:
                # The restarted node's own first sweep finishes the job.
                for _ in range(600):  # bounded: 30 s
                    listed = {j.id for j in stub.ListJobs(pb.EmptyRequest(), timeout=T).jobs}
                    if not listed & set(old):
                        break
                    time.sleep(0.05)
                gone = assert_all_or_nothing(daemon, stub, old + young, (point, delay))
                assert gone == len(old), (point, delay)
            finally:
                channel.close()
        channel, stub = stub_of(ctl.daemon)
        with channel:
            assert_works(stub)
