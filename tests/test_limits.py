"""Resource limits enforced on real jobs, as clients see them (status, exit code, reason).

These run on the host's cgroup driver (v1 here) and again inside a real cgroup v2 kernel by
``just test-cgroup2`` (the ``cgroup2`` marker). The bands are physical limits measured from the
job's own cgroup counters, not timing assertions on the code.
"""

from __future__ import annotations

import re

import pytest
import trio

from joblet.core.model import JobStatus
from joblet.testing import Harness

pytestmark = [pytest.mark.slow, pytest.mark.cgroup2]

FORK_BOMB = """
import os, time
while True:
    try:
        if os.fork() == 0:
            time.sleep(600)
            os._exit(0)
    except OSError:
        time.sleep(0.001)
"""


async def test_memory_limit_oom_kills_and_says_so(joblet: Harness) -> None:
    # tail buffers its whole input line: 200 MB of NULs without a newline.
    with trio.fail_after(60):
        job = await joblet.run("sh", "-c", "head -c 200m /dev/zero | tail", max_memory=64)
        final = await joblet.wait(job.id)
    assert (final.status, final.reason, final.exit_code) == (JobStatus.FAILED, "OOMKilled", 137)


async def test_under_the_memory_limit_nothing_is_killed(joblet: Harness) -> None:
    with trio.fail_after(60):
        job = await joblet.run("sh", "-c", "head -c 20m /dev/zero | tail | wc -c", max_memory=64)
        final = await joblet.wait(job.id)
        assert await joblet.output(job.id) == b"20971520\n"
    assert (final.status, final.exit_code) == (JobStatus.COMPLETED, 0)


async def test_cpu_limit_holds_a_busy_loop_to_its_share(joblet: Harness) -> None:
    driver = joblet.engine.services.sandboxes.driver
    with trio.fail_after(60):
        job = await joblet.run("sh", "-c", "while :; do :; done", max_cpu=20)
        await trio.sleep(0.5)  # let it reach its steady state
        before = driver.stats(job.id).cpu_usage_usec
        t0 = trio.current_time()
        await trio.sleep(2.0)  # a measurement window, not an ordering device
        used = driver.stats(job.id).cpu_usage_usec - before
        elapsed = trio.current_time() - t0
        await joblet.engine.stop_job(job.id)
    share = used / 1e6 / elapsed
    assert 0.12 <= share <= 0.28, f"busy loop got {share:.2f} of a core under a 20% limit"


async def test_io_limit_holds_direct_writes_to_about_1_mb_per_s(joblet: Harness) -> None:
    with trio.fail_after(60):
        job = await joblet.run(
            "dd",
            "if=/dev/zero",
            "of=/work/f",
            "bs=64k",
            "count=48",
            "oflag=direct",
            max_iobps=1024 * 1024,
        )
        final = await joblet.wait(job.id)
        _out, err = await joblet.streams(job.id)
    assert final.status is JobStatus.COMPLETED, (final, err)
    # dd reports e.g. "3145728 bytes (3.1 MB, 3.0 MiB) copied, 3.00012 s, 1.0 MB/s"
    m = re.search(rb"(\d+) bytes .* copied, ([0-9.]+) s", err)
    assert m, err
    rate = int(m.group(1)) / float(m.group(2)) / (1024 * 1024)
    assert 0.5 <= rate <= 1.6, f"direct writes ran at {rate:.2f} MiB/s under a 1 MiB/s limit"


@pytest.mark.joblet_config(default_pids_limit=40)
async def test_fork_bomb_stops_at_pids_max_and_the_job_can_be_stopped(joblet: Harness) -> None:
    driver = joblet.engine.services.sandboxes.driver
    with trio.fail_after(60):
        # Forks forever: once pids.max is reached every fork fails and the loop keeps trying.
        # (Shell bombs can die out: dash exits on a failed fork.)
        job = await joblet.run("python3", "-c", FORK_BOMB)
        # Wait (bounded) until the bomb has filled the group up to pids.max.
        peak = 0
        while peak < 35:
            peak = max(peak, driver.stats(job.id).pids_current)
            await trio.sleep(0.05)
        assert driver.stats(job.id).pids_current <= 40
        final = await joblet.engine.stop_job(job.id)
    assert (final.status, final.exit_code) == (JobStatus.STOPPED, -1)
    # The fixture then checks that no process and no cgroup of the job is left.
