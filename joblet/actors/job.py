"""The job actor: one per job, owning the job's process, cgroup and log for its whole life.

A :class:`JobActor` runs inside the engine's job nursery. It drives the job's lifecycle
(:mod:`joblet.core.lifecycle`, which decides every status): it has its sandbox create the job's
cgroup and directories and start the command, pumps stdout and stderr into the job's
:class:`~joblet.actors.joblog.JobLog`, enforces ``jobTimeout``, carries out stop requests (SIGTERM
to the job's PID 1, a grace period, then SIGKILL to everything in the cgroup), and always cleans
up: whatever happens, the cgroup is emptied and removed, the log is closed and the job directory
is deleted, shielded and bounded by ``cleanupTimeout``.

Its dependencies are narrow: the job's own log, sampler and sandbox (made for it by the engine),
where its records go (:class:`JobRecords`) and its timeouts.
"""

from __future__ import annotations

import signal
import time
from typing import Protocol

import attrs
import trio

from joblet import logfmt
from joblet.actors.joblog import JobLog
from joblet.actors.sampler import JobSampler
from joblet.actors.sandbox import JobSandbox
from joblet.config import JobletSection
from joblet.core.chunks import STDERR, STDOUT
from joblet.core.errors import StartFailed
from joblet.core.lifecycle import JobLifecycle
from joblet.core.model import JobInfo, JobSpec
from joblet.sys import launch


class JobRecords(Protocol):
    """Where a job's records go (the disk writer, :class:`~joblet.actors.diskwriter.DiskWriter`)."""

    def submit_job(self, info: JobInfo) -> trio.Event:
        """Queue the job's record; the event is set once it is written."""
        ...

    async def save_job(self, info: JobInfo) -> None:
        """Queue the job's record and wait until it is written."""
        ...

    def close_job(self, job_id: str) -> None:
        """The job's log has ended: close its files once its last chunk is written."""
        ...


@attrs.frozen
class JobTimeouts:
    """The bounds a job runs under.

    Attributes:
        job_timeout: Longest run before the job is stopped (``jobTimeout``).
        stop_grace_period: SIGTERM to SIGKILL (``stopGracePeriod``).
        cleanup_timeout: The bound on each cleanup step and record write (``cleanupTimeout``).
    """

    job_timeout: float
    stop_grace_period: float
    cleanup_timeout: float

    @classmethod
    def of(cls, section: JobletSection) -> JobTimeouts:
        """The timeouts the ``joblet:`` section configures."""
        return cls(section.job_timeout, section.stop_grace_period, section.cleanup_timeout)


class JobActor:
    """Owns one job from INITIALIZING to its terminal status and the end of its cleanup.

    Args:
        job_id: The job's UUID.
        spec: What to run (validated, defaults applied).
        node_id: This node's id (on the job's records).
        log: The job's log.
        sampler: The job's metrics sampler.
        sandbox: The job's cgroup, directories and process start.
        records: Where the job's records go.
        timeouts: The bounds the job runs under.
    """

    def __init__(
        self,
        job_id: str,
        spec: JobSpec,
        *,
        node_id: str,
        log: JobLog,
        sampler: JobSampler,
        sandbox: JobSandbox,
        records: JobRecords,
        timeouts: JobTimeouts,
    ) -> None:
        self.id = job_id
        self.spec = spec
        self.log = log
        self.metrics = sampler
        self._node_id = node_id
        self._sandbox = sandbox
        self._records = records
        self._timeouts = timeouts
        self.state = JobLifecycle(job_id, start_time=time.time())
        self._pumps_left = 2
        self._pumps_done = trio.Event()
        self._stop_requested = trio.Event()
        self._exited = trio.Event()
        #: Set once the start is decided: the job runs, or its failed start is on record.
        self.start_reported = trio.Event()
        #: Set once the job has ended and is fully cleaned up, its end on record.
        self.done = trio.Event()

    def info(self) -> JobInfo:
        """The job as clients see it (an end shows only once it is on record)."""
        return self.state.visible(self.spec, self._node_id)

    def _snapshot(self) -> JobInfo:
        """The job as it is decided now (what the job database gets)."""
        return self.state.record(self.spec, self._node_id)

    @property
    def pid(self) -> int:
        """Host PID of the job's top process while it runs, else 0."""
        return self.state.pid

    @property
    def active(self) -> bool:
        """Whether the job has not ended yet (its cleanup may run on after it has)."""
        return not self.state.ended

    async def wait(self) -> None:
        """Wait until the job has ended and is cleaned up."""
        await self.done.wait()

    def request_stop(self, reason: str = "stopped") -> None:
        """Ask the job to stop (returns at once; wait on :attr:`done` for the outcome).

        Raises:
            JobNotRunning: The job has already ended.
        """
        if self.state.request_stop(reason):
            self._stop_requested.set()

    async def run(self) -> None:
        """Run the job to its end; :attr:`start_reported` is set once it runs or failed to start.

        Runs in the engine's job nursery, never under a client's cancel scope: a client that
        stops waiting for its RunJob does not touch the job.

        Never raises an ``Exception``: a failure of the job, or a bug while running it, ends the
        job FAILED with the reason recorded, and the engine and other jobs never notice.
        Cancellation (daemon shutdown) stops the job and cleans up before it propagates.
        """
        proc: trio.Process | None = None
        try:
            self._records.submit_job(self._snapshot())
            proc = await self._sandbox.start(self.spec)
            self.state.started(proc.pid)
            await self._save("RUNNING")
            logfmt.info(
                "job started successfully",
                jobId=self.id,
                pid=proc.pid,
                command=" ".join([self.spec.command, *self.spec.args]),
                duration=f"{(time.time() - (self.state.start_time or 0)) * 1000:.0f}ms",
            )
            self.start_reported.set()
            await self._supervise(proc)
        except StartFailed as e:
            self.state.start_failed(str(e), time.time())
            logfmt.warn("job start failed", jobId=self.id, error=str(e))
        except Exception as e:
            # A bug or an unexpected system error: contained here, the job ends FAILED.
            logfmt.error("job failed internally", jobId=self.id, exc_info=True)
            if not self.state.ended:
                self.state.internal_error(_describe(e), time.time())
        except BaseException:
            # Cancelled: the daemon is shutting down. The cleanup below stops the job.
            if not self.state.ended:
                self.state.request_stop("daemon shutdown")
            raise
        finally:
            with trio.CancelScope(shield=True):
                await self._cleanup(proc)
            self.start_reported.set()

    async def _save(self, what: str) -> None:
        """Write the job's record to the job database and wait for it, bounded.

        Out of time (the disk is stuck), the job goes on and the record is written later.
        """
        with trio.move_on_after(self._timeouts.cleanup_timeout) as scope:
            await self._records.save_job(self._snapshot())
        if scope.cancelled_caught:
            logfmt.error("job record not written in time", jobId=self.id, record=what)

    async def _supervise(self, proc: trio.Process) -> None:
        cfg = self._timeouts
        assert proc.stdout is not None and proc.stderr is not None
        deadline = (self.state.start_time or time.time()) + cfg.job_timeout
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, proc.stdout, STDOUT)
            nursery.start_soon(self._pump, proc.stderr, STDERR)
            nursery.start_soon(self._stopper, proc)
            # Cancelled with the nursery below, it takes the final sample before cleanup.
            nursery.start_soon(self.metrics.run)
            with trio.move_on_after(max(0.0, deadline - time.time())) as timeout:
                await proc.wait()
            if timeout.cancelled_caught:
                logfmt.warn("job timed out", jobId=self.id, jobTimeout=f"{cfg.job_timeout}s")
                self.request_stop("timeout")
                await proc.wait()
            self._exited.set()
            # Whatever the job left behind dies now, so the pipes reach EOF.
            await self._sandbox.kill_all()
            oom = self._sandbox.oom_killed()
            self.state.exited(proc.returncode or 0, oom_killed=oom, now=time.time())
            # The pumps end at EOF; bound the wait in case a pipe was passed outside the job.
            with trio.move_on_after(cfg.cleanup_timeout) as drained:
                await self._pumps_done.wait()
            if drained.cancelled_caught:
                logfmt.warn("job output did not reach EOF in time", jobId=self.id)
            nursery.cancel_scope.cancel()

    async def _pump(self, pipe: trio.abc.ReceiveStream, stream: int) -> None:
        async with pipe:
            while data := await pipe.receive_some(launch.PIPE_SIZE):
                await self.log.append(stream, data)
        self._pumps_left -= 1
        if self._pumps_left == 0:
            self._pumps_done.set()

    async def _stopper(self, proc: trio.Process) -> None:
        """Carry out a stop request: SIGTERM, the grace period, then SIGKILL to the whole group."""
        await self._stop_requested.wait()
        grace = self._timeouts.stop_grace_period
        launch.send_stop_signal(proc, signal.SIGTERM)
        with trio.move_on_after(grace):
            await self._exited.wait()
        if not self._exited.is_set():
            await self._sandbox.kill_all()

    async def _cleanup(self, proc: trio.Process | None) -> None:
        """Release everything the job owns. Shielded by the caller; each step is bounded."""
        timeout = self._timeouts.cleanup_timeout
        with trio.move_on_after(timeout * 2):
            if proc is not None:
                if proc.returncode is None:
                    await self._sandbox.kill_all()
                    with trio.move_on_after(timeout):
                        await proc.wait()
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
                if not self.state.ended:
                    self.state.exited(
                        proc.returncode or 0, oom_killed=self._sandbox.oom_killed(), now=time.time()
                    )
                for pipe in (proc.stdout, proc.stderr):
                    if pipe is not None:
                        await pipe.aclose()
            else:
                await self._sandbox.kill_all()
        if not self.state.ended:
            # No exit status: none was spawned, or it could not be waited for in time.
            self.state.gone(time.time())
        self.metrics.close()
        await self._sandbox.release()
        s = self.state
        await self._save("final")
        # On record (or its write timed out, logged): clients may see the end.
        s.durable()
        # Readers see the log end only now, when the job's end is on record: a client that read
        # the whole log then asks for the status sees the job ended.
        self.log.close()
        self._records.close_job(self.id)
        logfmt.info(
            "job finished",
            jobId=self.id,
            status=s.status.value,
            exitCode=s.exit_code,
            reason=s.reason or "-",
        )
        self.done.set()


def _describe(error: BaseException) -> str:
    """A one-line account of ``error``: a group by each of its errors, each by its message."""
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in error.exceptions)
    return str(error) or type(error).__name__
