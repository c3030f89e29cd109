"""The pool of waiting stage-1 processes (``isolation.prestart``), with real processes and jobs."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

from joblet.actors.prestart import Stage1Pool
from joblet.core.model import JobStatus
from joblet.sys import _stage1, launch
from joblet.testing import Harness, open_harness
from tests.conftest import (
    cgroup_dirs_named,
    make_config,
    processes_in_cgroup_named,
    stage1_children,
)
from tests.daemon import POLL, crashable_daemon

pytestmark = pytest.mark.slow


@asynccontextmanager
async def pooled_harness(prestart: int) -> AsyncIterator[Harness]:
    """A harness whose pool keeps ``prestart`` stage 1s waiting; checked for leftovers after."""
    cfg = make_config()
    cfg = attrs.evolve(cfg, isolation=attrs.evolve(cfg.isolation, prestart=prestart))
    async with open_harness(cfg) as harness:
        parent = harness.node.config.cgroup.parent
        yield harness
    assert processes_in_cgroup_named(parent) == [], "job processes left behind"
    assert cgroup_dirs_named(parent) == [], "job cgroups left behind"
    assert stage1_children(os.getpid()) == [], "waiting stage-1 processes left behind"


def pool_of(harness: Harness) -> Stage1Pool:
    return harness.engine.services.sandboxes.launcher


async def exited(pid: int) -> None:
    """Wait until process ``pid`` (any process, not only our child) has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


def test_the_protocol_constants_agree() -> None:
    assert launch.ACK == _stage1.ACK
    assert launch.HEADER_SIZE == _stage1.HEADER_SIZE


async def test_jobs_start_from_the_pool_and_it_refills(root: None) -> None:
    with trio.fail_after(60):
        async with pooled_harness(2) as joblet:
            pool = pool_of(joblet)
            await pool.wait_full()
            first = pool.waiting_pids()
            assert len(first) == 2 and sorted(stage1_children(os.getpid())) == sorted(first)
            job = await joblet.run("sh", "-c", "echo out; echo err >&2; ls /proc/self/fd")
            # The oldest waiting process became the job (its stage 1 execs the job's PID 1).
            assert job.pid == first[0]
            final = await joblet.wait(job.id)
            assert final.status is JobStatus.COMPLETED
            out, err = await joblet.streams(job.id)
            # stdin, stdout, stderr and ls's own directory: nothing else reached the job.
            assert out.decode().split() == ["out", "0", "1", "2", "3"] and err == b"err\n"
            await pool.wait_full()
            assert first[0] not in pool.waiting_pids() and first[1] in pool.waiting_pids()


async def test_a_killed_waiting_stage1_is_replaced_and_never_used(root: None) -> None:
    with trio.fail_after(60):
        async with pooled_harness(2) as joblet:
            pool = pool_of(joblet)
            await pool.wait_full()
            victims = pool.waiting_pids()
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            # No checkpoint in between: the pool may or may not have noticed the deaths yet.
            job = await joblet.run("echo", "hello")
            assert job.status is JobStatus.RUNNING and job.pid not in victims
            final = await joblet.wait(job.id)
            assert final.status is JobStatus.COMPLETED
            assert await joblet.output(job.id) == b"hello\n"
            await pool.wait_full()
            assert not set(victims) & set(pool.waiting_pids())


async def test_a_stage1_that_dies_before_taking_its_spec_never_gets_the_job(
    root: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A stand-in stage 1 that reads the first byte of its spec and exits: it looks alive when it
    # is taken from the pool and dies before it could take the job.
    monkeypatch.setattr(
        launch,
        "STAGE1_BOOT",
        "import os, sys; os.read(int(sys.argv[1]), 1); sys.exit(3)",
    )
    with trio.fail_after(60):
        async with pooled_harness(1) as joblet:
            pool = pool_of(joblet)
            await pool.wait_full()
            (impostor,) = pool.waiting_pids()
            monkeypatch.undo()  # the next stage 1s are real ones
            job = await joblet.run("echo", "hello")
            assert job.status is JobStatus.RUNNING, job
            assert job.pid != impostor
            assert "a waiting stage 1 exited before it took its job" in caplog.text
            assert (await joblet.wait(job.id)).status is JobStatus.COMPLETED
            assert await joblet.output(job.id) == b"hello\n"
            await pool.wait_full()
            assert impostor not in pool.waiting_pids()


async def stop_stage1(pid: int) -> None:
    """SIGSTOP a waiting stage 1: its ``unshare`` process, then (once that one is stopped, so it
    can no longer fork) the interpreter under it, if it was started already."""
    os.kill(pid, signal.SIGSTOP)
    # Another process's state, with nothing to wait on: poll, as tests/daemon.py does.
    while _state(pid) != "T":  # noqa: ASYNC110
        await trio.sleep(POLL)
    for child in _children(pid):
        os.kill(child, signal.SIGSTOP)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def test_a_stopped_waiting_stage1_fails_its_start_in_bounded_time(
    root: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launch, "STAGE1_REPORT_TIMEOUT", 0.5)
    with trio.fail_after(60):
        async with pooled_harness(1) as joblet:
            pool = pool_of(joblet)
            await pool.wait_full()
            (stopped,) = pool.waiting_pids()
            await stop_stage1(stopped)
            job = await joblet.run("echo", "hello")
            assert job.status is JobStatus.FAILED, job
            assert f"stage 1 did not start the job within 0.5s (pid {stopped})" in job.reason
            await exited(stopped)
            # The next start works.
            again = await joblet.run("echo", "again")
            assert (await joblet.wait(again.id)).status is JobStatus.COMPLETED


async def test_a_cold_stage1_that_dies_before_taking_its_spec_fails_the_start(
    root: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launch, "STAGE1_BOOT", "import sys; sys.exit(3)")
    with trio.fail_after(60):
        async with pooled_harness(0) as joblet:
            job = await joblet.run("true")
            assert job.status is JobStatus.FAILED
            assert "stage 1 exited before it took the launch spec (exit status 3)" in job.reason


async def test_prestart_0_starts_each_stage1_with_its_job(root: None) -> None:
    with trio.fail_after(60):
        async with pooled_harness(0) as joblet:
            pool = pool_of(joblet)
            await pool.wait_full()
            for _ in range(3):
                job = await joblet.run("sh", "-c", "echo out; ls /proc/self/fd")
                assert (await joblet.wait(job.id)).status is JobStatus.COMPLETED
                assert (await joblet.output(job.id)).decode().split() == ["out", "0", "1", "2", "3"]
                assert pool.waiting_pids() == [] and stage1_children(os.getpid()) == []


async def test_concurrent_starts_beyond_the_pool_size(root: None) -> None:
    n = 12
    with trio.fail_after(120):
        async with pooled_harness(2) as joblet:
            await pool_of(joblet).wait_full()
            ids: dict[int, str] = {}

            async def start(i: int) -> None:
                job = await joblet.run("echo", f"job {i}")
                assert job.status is JobStatus.RUNNING, job
                ids[i] = job.id

            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(start, i)
            for i, job_id in ids.items():
                assert (await joblet.wait(job_id)).status is JobStatus.COMPLETED
                assert await joblet.output(job_id) == f"job {i}\n".encode()
            assert len(ids) == n


async def test_shutdown_kills_and_reaps_every_waiting_stage1(root: None) -> None:
    with trio.fail_after(60):
        async with pooled_harness(3) as joblet:
            pool = pool_of(joblet)
            await pool.wait_full()
            waiting = pool.waiting_pids()
            assert len(waiting) == 3
        # Reaped, not merely dead: a zombie would still take a signal.
        for pid in waiting:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert pool.waiting_pids() == []


async def test_waiting_stage1s_exit_when_their_daemon_dies(root: None) -> None:
    with trio.fail_after(90), crashable_daemon() as ctl:
        pid = ctl.daemon.process.pid
        # Another process's pool, with nothing of ours to wait on: poll, as tests/daemon.py does.
        while len(waiting := stage1_children(pid)) < 2:  # noqa: ASYNC110
            await trio.sleep(POLL)
        ctl.kill()
        # EOF on their status sockets: they exit by themselves, having done nothing.
        for child in waiting:
            await exited(child)
        ctl.restart()
