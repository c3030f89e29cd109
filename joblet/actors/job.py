"""The job actor: one per job, owning the job's process, cgroup and log for its whole life.

A :class:`JobActor` runs inside the engine's job nursery. It creates the job's cgroup and
directories, starts the job through the two-stage launcher, pumps stdout and stderr into the job's
:class:`~joblet.store.joblog.JobLog`, enforces ``jobTimeout``, carries out stop requests (SIGTERM to
the job's PID 1, a grace period, then SIGKILL to everything in the cgroup), and always cleans up:
whatever happens, the cgroup is emptied and removed, the log is closed and the job directory is
deleted, shielded and bounded by ``cleanupTimeout``.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import attrs
import trio

from joblet import logfmt
from joblet.actors.diskwriter import DiskWriter
from joblet.actors.prestart import Stage1Pool
from joblet.actors.sampler import MetricsHub
from joblet.config import Config
from joblet.core.chunks import STDERR, STDOUT
from joblet.core.errors import StartFailed
from joblet.core.lifecycle import JobLifecycle
from joblet.core.model import JobInfo, JobSpec
from joblet.store.joblog import JobLog, LogBudget
from joblet.store.logfiles import LogFileReader
from joblet.sys import launch
from joblet.sys.cgroups import CgroupDriver


@attrs.define
class JobContext:
    """The engine's services every job uses.

    Attributes:
        config: The daemon configuration.
        driver: The cgroup driver.
        disk_writer: Writes (and deletes) logs, metrics and job records on disk.
        budget: The memory budget for not-yet-persisted log data, shared by all jobs.
        jobs_dir: Where per-job directories (root mount point, /work) live.
        logs_dir: Where persisted logs live.
        metrics_dir: Where persisted metrics live (``<state>/metrics``).
        metrics: The job samplers and their followers.
        launcher: Starts stage 1 for each job (from its pool of waiting ones when it can).
        init: Path of the job PID 1 binary (dumb-init).
        unshare: Path of util-linux unshare.
        node_id: This node's id.
    """

    config: Config
    driver: CgroupDriver
    disk_writer: DiskWriter
    budget: LogBudget
    jobs_dir: Path
    logs_dir: Path
    metrics_dir: Path
    metrics: MetricsHub
    launcher: Stage1Pool
    init: str
    unshare: str
    node_id: str


class JobActor:
    """Owns one job from INITIALIZING to its terminal status and the end of its cleanup.

    Args:
        job_id: The job's UUID.
        spec: What to run (validated, defaults applied).
        ctx: The engine's services.
    """

    def __init__(self, job_id: str, spec: JobSpec, ctx: JobContext) -> None:
        self.id = job_id
        self.spec = spec
        self._ctx = ctx
        self.state = JobLifecycle(job_id, start_time=time.time())
        self.log = JobLog(
            job_id,
            sink=ctx.disk_writer,
            budget=ctx.budget,
            window_bytes=ctx.config.logs.window_bytes,
            reader=lambda: LogFileReader(ctx.logs_dir / job_id),
        )
        self.metrics = ctx.metrics.sampler(job_id, own_network=spec.network != "host")
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
        return self.state.visible(self.spec, self._ctx.node_id)

    def _snapshot(self) -> JobInfo:
        """The job as it is decided now (what the job database gets)."""
        return self.state.record(self.spec, self._ctx.node_id)

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
        ctx = self._ctx
        job_dir = ctx.jobs_dir / self.id
        proc: trio.Process | None = None
        try:
            ctx.disk_writer.submit_job(self._snapshot())
            proc = await self._start(job_dir)
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
                await self._cleanup(proc, job_dir)
            self.start_reported.set()

    async def _save(self, what: str) -> None:
        """Write the job's record to the job database and wait for it, bounded.

        Out of time (the disk is stuck), the job goes on and the record is written later.
        """
        with trio.move_on_after(self._ctx.config.joblet.cleanup_timeout) as scope:
            await self._ctx.disk_writer.save_job(self._snapshot())
        if scope.cancelled_caught:
            logfmt.error("job record not written in time", jobId=self.id, record=what)

    async def _start(self, job_dir: Path) -> trio.Process:
        ctx = self._ctx
        iso = ctx.config.isolation
        try:
            ctx.driver.create(self.id, self.spec.limits)
        except (OSError, ValueError, RuntimeError) as e:
            raise StartFailed(f"cgroup setup failed: {e}") from e
        root, work = job_dir / "root", job_dir / "work"
        try:
            root.mkdir(parents=True)
            work.mkdir(mode=0o700)
            os.chown(work, iso.run_as_uid, iso.run_as_gid)
        except OSError as e:
            raise StartFailed(f"job directory setup failed: {e}") from e
        spec = launch.LaunchSpec(
            job_id=self.id,
            command=self.spec.command,
            args=self.spec.args,
            env=self.spec.env,
            network=self.spec.network,
            membership=ctx.driver.membership(self.id),
            root=str(root),
            work=str(work),
            uid=iso.run_as_uid,
            gid=iso.run_as_gid,
            system_dirs=iso.system_dirs,
            etc_files=iso.etc_files,
            tmp_size_mb=iso.tmp_size_mb,
            init=ctx.init,
            unshare=ctx.unshare,
        )
        return await ctx.launcher.spawn(spec)

    async def _supervise(self, proc: trio.Process) -> None:
        cfg = self._ctx.config.joblet
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
            await self._kill_all()
            oom = self._oom_killed()
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
        grace = self._ctx.config.joblet.stop_grace_period
        launch.send_stop_signal(proc, signal.SIGTERM)
        with trio.move_on_after(grace):
            await self._exited.wait()
        if not self._exited.is_set():
            await self._kill_all()

    async def _kill_all(self) -> None:
        try:
            await self._ctx.driver.kill_all(self.id, self._ctx.config.joblet.cleanup_timeout)
        except (OSError, TimeoutError) as e:
            logfmt.error("job cleanup could not kill every process", jobId=self.id, error=str(e))

    def _oom_killed(self) -> bool:
        try:
            return self._ctx.driver.oom_killed(self.id)
        except OSError:
            return False

    async def _cleanup(self, proc: trio.Process | None, job_dir: Path) -> None:
        """Release everything the job owns. Shielded by the caller; each step is bounded."""
        ctx = self._ctx
        timeout = ctx.config.joblet.cleanup_timeout
        with trio.move_on_after(timeout * 2):
            if proc is not None:
                if proc.returncode is None:
                    await self._kill_all()
                    with trio.move_on_after(timeout):
                        await proc.wait()
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
                if not self.state.ended:
                    self.state.exited(
                        proc.returncode or 0, oom_killed=self._oom_killed(), now=time.time()
                    )
                for pipe in (proc.stdout, proc.stderr):
                    if pipe is not None:
                        await pipe.aclose()
            else:
                await self._kill_all()
        if not self.state.ended:
            # No process is left (none was spawned, or it could not be waited for in time).
            if self.state.stop_reason is not None:
                self.state.exited(0, oom_killed=False, now=time.time())
            else:
                self.state.internal_error("the job's process could not be waited for", time.time())
        self.metrics.close()
        try:
            await ctx.driver.remove(self.id)
        except OSError as e:
            logfmt.error("job cgroup could not be removed", jobId=self.id, error=str(e))
        await trio.to_thread.run_sync(shutil.rmtree, job_dir, True)
        s = self.state
        await self._save("final")
        # On record (or its write timed out, logged): clients may see the end.
        s.durable()
        # Readers see the log end only now, when the job's end is on record: a client that read
        # the whole log then asks for the status sees the job ended.
        self.log.close()
        ctx.disk_writer.close_job(self.id)
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
