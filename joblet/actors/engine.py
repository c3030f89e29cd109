"""The engine: the job registry and the nursery every job actor runs in.

This is the API the gRPC layer and the in-process harness use: run, look up, list, stop, follow
and delete jobs. Ids are UUIDv4; any unique prefix of an id resolves to its job.

A job is a :class:`~joblet.actors.job.JobActor` while it runs and until its cleanup is done and
its final record is in the job database; then the registry keeps only an :class:`EndedJob` (its
record; its log is read from disk), so memory does not grow with the number of ended jobs. Jobs
of earlier runs of the daemon are loaded as :class:`EndedJob` at start-up.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path

import attrs
import trio

from joblet import logfmt
from joblet.actors.diskwriter import DiskWriter
from joblet.actors.job import JobActor, JobTimeouts
from joblet.actors.joblog import JobLog, LogBudget
from joblet.actors.sampler import MetricsHub
from joblet.actors.sandbox import Sandboxes
from joblet.config import Config
from joblet.core.chunks import Chunk
from joblet.core.errors import (
    JobNotFound,
    JobNotRunning,
    JobStillRunning,
    ResourceExhausted,
    ShuttingDown,
)
from joblet.core.ids import new_job_id, resolve_prefix
from joblet.core.model import JobInfo, JobSpec, RunRequest
from joblet.core.samples import MetricsSample
from joblet.core.validate import HostFacts, build_spec
from joblet.store.logfiles import LogFileReader, job_log_dir


@attrs.frozen
class NodeServices:
    """What the engine makes each job's actor with, and answers questions from.

    Attributes:
        config: The daemon configuration.
        disk_writer: Writes (and deletes) logs, metrics and job records on disk.
        budget: The memory budget for log data not yet on disk, shared by all jobs.
        logs_dir: Where the jobs' logs are.
        metrics_dir: Where the jobs' metrics are.
        metrics: The job samplers and their followers.
        sandboxes: Each job's cgroup, directories and process start.
        node_id: This node's id.
    """

    config: Config
    disk_writer: DiskWriter
    budget: LogBudget
    logs_dir: Path
    metrics_dir: Path
    metrics: MetricsHub
    sandboxes: Sandboxes
    node_id: str


class EndedJob:
    """A job that has ended and released everything it owned: its record, and its log on disk.

    Args:
        info: The job's final record.
        logs_dir: Where the jobs' logs are.
    """

    def __init__(self, info: JobInfo, logs_dir: Path) -> None:
        self.id = info.id
        self._info = info
        self._logs_dir = logs_dir

    @property
    def active(self) -> bool:
        """Always False: the job has ended."""
        return False

    def info(self) -> JobInfo:
        """The job's final record."""
        return self._info

    def request_stop(self, reason: str = "stopped") -> None:
        """Raises JobNotRunning: an ended job cannot be stopped."""
        raise JobNotRunning(self.id, self._info.status.value)

    async def wait(self) -> None:
        """Returns at once: the job has ended."""
        await trio.lowlevel.checkpoint()

    async def open_log(self) -> JobLog:
        """The job's complete log, read from disk."""
        logs_dir = self._logs_dir
        return await JobLog.from_disk(
            self.id, lambda: LogFileReader(job_log_dir(logs_dir, self.id))
        )


_Entry = JobActor | EndedJob


class Engine:
    """Owns every job actor and answers questions about jobs.

    Use :meth:`run` as a long-lived task (``await nursery.start(engine.run)``); it returns only
    when cancelled, after stopping every job.

    Args:
        services: What each job's actor is made with.
        host: The host's memory and CPUs, for checking requests.
        past: The jobs of earlier runs, all ended.
    """

    def __init__(
        self, services: NodeServices, host: HostFacts, past: list[JobInfo] | None = None
    ) -> None:
        self._ctx = services
        self._host = host
        self._defaults = services.config.default_limits()
        self._timeouts = JobTimeouts.of(services.config.joblet)
        self._jobs: dict[str, _Entry] = {i.id: EndedJob(i, services.logs_dir) for i in past or ()}
        self._nursery: trio.Nursery | None = None
        self._closing = False

    @property
    def services(self) -> NodeServices:
        """What each job's actor is made with."""
        return self._ctx

    async def run(self, *, task_status: trio.TaskStatus[Engine] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the job nursery until cancelled; on the way out every job is cleaned up."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._closing = True
            self._nursery = None

    async def shutdown(self, grace: float) -> None:
        """Stop every running job gracefully (SIGTERM, grace period, SIGKILL) and wait for them.

        Args:
            grace: Longest time to wait for all jobs to end before giving up waiting.
        """
        self._closing = True
        running = [a for a in self._jobs.values() if isinstance(a, JobActor) and a.active]
        for actor in running:
            try:
                actor.request_stop("daemon shutdown")
            except JobNotRunning:  # ended meanwhile: nothing to stop
                continue
        with trio.move_on_after(grace):
            for actor in running:
                await actor.done.wait()

    async def run_job(self, request: RunRequest) -> JobInfo:
        """Check a run request, start its job and return once it runs, or has failed to start.

        Args:
            request: What the client sent (checked here: :func:`joblet.core.validate.build_spec`).

        Returns:
            The job's info: RUNNING, or FAILED with ``reason`` "start failed: ...".

        Raises:
            InvalidRequest: The request is malformed or exceeds the host (nothing was created).
            ResourceExhausted: ``maxConcurrentJobs`` jobs are already running.
            ShuttingDown: The engine is stopping.
        """
        confinement = self._ctx.sandboxes.confinement
        spec = attrs.evolve(
            build_spec(request, defaults=self._defaults, host=self._host),
            seccomp=confinement.seccomp,
            landlock=confinement.landlock,
        )
        if self._closing or self._nursery is None:
            raise ShuttingDown("joblet is shutting down")
        cap = self._ctx.config.joblet.max_concurrent_jobs
        active = sum(1 for a in self._jobs.values() if a.active)
        if cap and active >= cap:
            raise ResourceExhausted(
                f"maximum concurrent jobs reached ({cap}): wait for a job to end or stop one"
            )
        job_id = new_job_id()
        actor = self._new_actor(job_id, spec)
        self._jobs[job_id] = actor
        # From here the job's start belongs to the engine: the actor runs in the job nursery, and
        # a caller that stops waiting (a client's deadline, a disconnect) only ends its own wait.
        self._nursery.start_soon(self._run_actor, actor)
        await actor.start_reported.wait()
        return actor.info()

    def _new_actor(self, job_id: str, spec: JobSpec) -> JobActor:
        ctx = self._ctx
        log = JobLog(
            job_id,
            sink=ctx.disk_writer,
            budget=ctx.budget,
            window_bytes=ctx.config.logs.window_bytes,
            reader=lambda: LogFileReader(job_log_dir(ctx.logs_dir, job_id)),
        )
        return JobActor(
            job_id,
            spec,
            node_id=ctx.node_id,
            log=log,
            sampler=ctx.metrics.sampler(job_id, own_network=spec.network != "host"),
            sandbox=ctx.sandboxes.for_job(job_id),
            records=ctx.disk_writer,
            timeouts=self._timeouts,
        )

    async def _run_actor(self, actor: JobActor) -> None:
        """Run one job actor; once it is done, keep only its record."""
        try:
            await actor.run()
        finally:
            if self._jobs.get(actor.id) is actor and actor.done.is_set():
                self._jobs[actor.id] = EndedJob(actor.info(), self._ctx.logs_dir)

    def _resolve(self, ref: str) -> _Entry:
        return self._jobs[resolve_prefix(ref, self._jobs)]

    def get(self, ref: str) -> JobInfo:
        """The job with this id or unique id prefix.

        Raises:
            JobNotFound: No such job.
            AmbiguousJobId: The prefix matches several jobs.
        """
        return self._resolve(ref).info()

    def list_jobs(self) -> list[JobInfo]:
        """Every job, oldest first."""
        return [a.info() for a in self._jobs.values()]

    async def stop_job(self, ref: str) -> JobInfo:
        """Stop a running job: SIGTERM, the grace period, SIGKILL; returns its final info.

        Raises:
            JobNotFound: No such job.
            JobNotRunning: The job has already ended.
        """
        actor = self._resolve(ref)
        actor.request_stop("stopped")
        logfmt.info("job stop requested", jobId=actor.id)
        await actor.wait()
        return actor.info()

    async def wait_job(self, ref: str) -> JobInfo:
        """Wait until the job has ended and is cleaned up; returns its final info."""
        actor = self._resolve(ref)
        await actor.wait()
        return actor.info()

    async def delete_job(self, ref: str) -> JobInfo:
        """Delete an ended job with its log, metrics and metadata; returns its last record.

        Raises:
            JobNotFound: No such job.
            JobStillRunning: The job has not ended (stop it first).
        """
        entry = self._resolve(ref)
        if entry.active:
            raise JobStillRunning(entry.id, entry.info().status.value)
        await entry.wait()  # ended, but its cleanup may still be running
        await self._delete(entry.id)
        return entry.info()

    async def delete_all_jobs(self) -> tuple[int, int]:
        """Delete every ended job; returns (deleted, skipped because still active)."""
        deleted = skipped = 0
        for entry in list(self._jobs.values()):
            if entry.active:
                skipped += 1
                continue
            await entry.wait()
            if self._jobs.get(entry.id) is not None:
                await self._delete(entry.id)
                deleted += 1
        return deleted, skipped

    def end_times(self) -> dict[str, float | None]:
        """Every job's end time (Unix seconds), None while it is active (for retention)."""
        return {
            job_id: None if e.active else (e.info().end_time or e.info().start_time or time.time())
            for job_id, e in self._jobs.items()
        }

    async def forget(self, job_id: str) -> None:
        """Drop an ended job's metadata, leaving its files alone (retention removes those)."""
        entry = self._jobs.get(job_id)
        if entry is None or entry.active:
            return
        await self._drop_record(job_id)

    async def _delete(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        await self._ctx.disk_writer.delete_job(job_id)
        logfmt.info("job deleted", jobId=job_id)

    async def _drop_record(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        await self._ctx.disk_writer.forget_job(job_id)

    async def follow_log(self, ref: str, offset: int = 0) -> AsyncGenerator[Chunk, None]:
        """The job's merged output from byte ``offset``: what exists, then live, until the end.

        Raises:
            JobNotFound: No such job (raised at the first iteration).
        """
        entry = self._resolve(ref)
        log = entry.log if isinstance(entry, JobActor) else await entry.open_log()
        async with aclosing(log.follow(offset)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def follow_metrics(self, ref: str) -> AsyncGenerator[MetricsSample, None]:
        """The job's metrics samples: what is stored, then live ones until the job ends.

        A job that has ended (also before a daemon restart) gets its stored samples only. Like
        :meth:`follow_log`, the samples end once the job's final status is known.

        Raises:
            JobNotFound: No such job (raised at the first iteration).
            AmbiguousJobId: The prefix matches several jobs.
        """
        job_id = self.get(ref).id
        async with aclosing(self._ctx.metrics.follow(job_id)) as samples:
            async for sample in samples:
                yield sample
        try:
            # The sampler ends before the job's cleanup does: wait for it, so that the job's
            # status is final once its samples end (as with follow_log).
            await self.wait_job(job_id)
        except JobNotFound:
            pass  # deleted meanwhile: its samples were all given
