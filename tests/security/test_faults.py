"""Faults: the state directory's filesystem full.

Disk full: a small loop-mounted ext4 holds a real node's state directory; a host-side filler and a
job's own output fill it. The node must stay up, running jobs wait (their output held in the
bounded log budget, the jobs blocked on write), ``jobs.db`` stays consistent, the writer retries
with backoff (a bounded number of attempts and log lines), and once space is freed every log is
complete and new jobs run.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
import trio

from joblet.config import LogsSection, StateLayout
from joblet.core.model import JobInfo, JobStatus
from joblet.store.jobdb import JobDB
from joblet.testing import open_harness
from tests.conftest import IN_CI, make_config, require_root

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
