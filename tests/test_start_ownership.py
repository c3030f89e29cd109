"""A job's start belongs to the engine: a RunJob whose caller gives up still starts its job.

Once RunJob has created a job, the client's deadline or disconnect only ends the client's wait:
the job starts (or fails to start) exactly as it would have had the client waited, and is never
left INITIALIZING.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
import trio
import trio.lowlevel

from joblet.core.model import JobInfo, JobStatus
from joblet.protocol import joblet_pb2 as pb
from joblet.testing import Harness
from tests.daemon import Daemon, running_daemon
from tests.test_grpc import T, job_stub, open_channel

pytestmark = pytest.mark.slow

#: Scheduling rounds at which the caller's wait is cancelled, up to the measured length of an
#: uncancelled start: every early round (the synchronous part of the start), then spread out.
SWEEP_POINTS = 40


async def _rounds_of_a_start(joblet: Harness, *command: str) -> int:
    """How many scheduling rounds an uncancelled ``run`` of ``command`` takes."""
    rounds = 0
    done = False

    async def count() -> None:
        nonlocal rounds
        while not done:
            await trio.lowlevel.checkpoint()
            rounds += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(count)
        job = await joblet.run(*command)
        done = True
    await joblet.wait(job.id)
    return rounds


def _sweep(total: int) -> list[int]:
    points = set(range(min(total, SWEEP_POINTS // 2)))
    step = max(1, total // (SWEEP_POINTS // 2))
    points.update(range(0, total + step, step))
    return sorted(points)


async def _run_cancelled_after(joblet: Harness, rounds: int, *command: str) -> JobInfo | None:
    """``run`` with the caller's wait cancelled after ``rounds`` rounds; what it returned."""
    returned: JobInfo | None = None
    with trio.CancelScope() as caller:

        async def give_up() -> None:
            for _ in range(rounds):
                await trio.lowlevel.checkpoint()
            caller.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(give_up)
            returned = await joblet.run(*command)
            nursery.cancel_scope.cancel()
    return returned


@pytest.mark.parametrize(
    ("command", "status", "exit_code", "reason", "output"),
    [
        (("sh", "-c", "echo hello"), JobStatus.COMPLETED, 0, "", b"hello\n"),
        (
            ("no-such-command-xyz",),
            JobStatus.FAILED,
            -1,
            "start failed: command not found: no-such-command-xyz",
            b"",
        ),
    ],
    ids=["runs", "fails-to-start"],
)
async def test_a_run_cancelled_at_every_point_of_the_start_ends_as_an_uncancelled_one(
    joblet: Harness,
    command: tuple[str, ...],
    status: JobStatus,
    exit_code: int,
    reason: str,
    output: bytes,
) -> None:
    with trio.fail_after(120):
        total = await _rounds_of_a_start(joblet, *command)
        points = _sweep(total)
        cancelled = 0
        for rounds in points:
            before = {j.id for j in joblet.engine.list_jobs()}
            returned = await _run_cancelled_after(joblet, rounds, *command)
            [job_id] = {j.id for j in joblet.engine.list_jobs()} - before
            cancelled += returned is None
            final = await joblet.wait(job_id)
            assert (final.status, final.exit_code, final.reason) == (status, exit_code, reason), (
                f"cancelled after {rounds} rounds"
            )
            assert await joblet.output(job_id) == output
        # The sweep did cancel waits at many points (not only after the start had returned).
        assert cancelled >= min(len(points) // 2, 10), (cancelled, points)
        assert not [j for j in joblet.engine.list_jobs() if not j.status.terminal]


# --- against a real daemon, with grpcio deadlines -------------------------------------------------


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with running_daemon() as d:
        yield d


def test_grpc_run_jobs_with_1_to_20_ms_deadlines_never_stay_initializing(daemon: Daemon) -> None:
    channel = open_channel(
        daemon.target, daemon.certs.ca_cert, (daemon.certs.admin_cert, daemon.certs.admin_key)
    )
    with channel:
        stub = job_stub(channel)
        before = {j.id for j in stub.ListJobs(pb.EmptyRequest(), timeout=T).jobs}
        outcomes = []
        for ms in range(1, 21):
            try:
                res = stub.RunJob(
                    pb.RunJobReq(command="sh", args=["-c", "echo hello"]), timeout=ms / 1000
                )
                outcomes.append(res.status)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e
                outcomes.append("DEADLINE_EXCEEDED")
        assert "DEADLINE_EXCEEDED" in outcomes  # the deadlines did cut RunJob short
        # Every job that was created ends as an uncancelled one would, within a bound.
        deadline = time.monotonic() + 30
        while True:
            jobs = [
                j for j in stub.ListJobs(pb.EmptyRequest(), timeout=T).jobs if j.id not in before
            ]
            if jobs and all(j.status == "COMPLETED" for j in jobs):
                break
            stuck = [(j.id, j.status) for j in jobs if j.status != "COMPLETED"]
            assert time.monotonic() < deadline, f"jobs not ended after 30 s: {stuck}"
            time.sleep(0.1)
        assert len(jobs) <= 20
        assert len(jobs) >= outcomes.count("RUNNING")
        for job in jobs:
            assert job.exitCode == 0
            logs = stub.GetJobLogs(pb.GetJobLogsReq(id=job.id), timeout=T)
            assert b"".join(chunk.payload for chunk in logs) == b"hello\n"


# --- what clients see of a start and of an internal error ----------------------------------------


async def test_a_failed_start_is_never_visible_as_running(joblet: Harness) -> None:
    seen: list[JobStatus] = []
    done = False

    async def watch() -> None:
        # Every scheduling round, what a client asking now would be told.
        while not done:
            seen.extend(j.status for j in joblet.engine.list_jobs())
            await trio.lowlevel.checkpoint()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            job = await joblet.run("no-such-command-xyz")
            assert job.status is JobStatus.FAILED
            await joblet.wait(job.id)
            done = True
    assert JobStatus.RUNNING not in seen
    assert seen.count(JobStatus.INITIALIZING) > 0  # the watcher did see the start under way


async def test_an_internal_error_ends_the_job_with_its_own_reason(
    joblet: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    from joblet.actors.job import JobActor

    async def broken_stopper(self: JobActor, proc: trio.Process) -> None:
        await trio.lowlevel.checkpoint()
        raise RuntimeError("the stopper broke")

    with trio.fail_after(30):
        bystander = await joblet.run("sleep", "300")
        monkeypatch.setattr(JobActor, "_stopper", broken_stopper)
        job = await joblet.run("sleep", "300")
        final = await joblet.wait(job.id)
        assert (final.status, final.exit_code, final.reason) == (
            JobStatus.FAILED,
            -1,
            "internal error: the stopper broke",
        )
        # The other job never noticed.
        assert joblet.engine.get(bystander.id).status is JobStatus.RUNNING
        monkeypatch.undo()
        stopped = await joblet.engine.stop_job(bystander.id)
        assert stopped.status is JobStatus.STOPPED
