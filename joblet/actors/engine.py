"""The engine: the job registry and the nursery every job actor runs in.

This is the API the gRPC layer and the in-process harness use: run, look up, list, stop and follow
jobs. Ids are UUIDv4; any unique prefix of an id resolves to its job.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

import trio

from joblet import logfmt
from joblet.actors.job import JobActor, JobContext
from joblet.errors import AmbiguousJobId, JobNotFound, ResourceExhausted, ShuttingDown
from joblet.metrics import MetricsSample
from joblet.model import JobInfo, JobSpec
from joblet.store.logindex import Chunk


class Engine:
    """Owns every job actor and answers questions about jobs.

    Use :meth:`run` as a long-lived task (``await nursery.start(engine.run)``); it returns only
    when cancelled, after stopping every job.

    Args:
        ctx: The services every job uses.
    """

    def __init__(self, ctx: JobContext) -> None:
        self._ctx = ctx
        self._jobs: dict[str, JobActor] = {}
        self._nursery: trio.Nursery | None = None
        self._closing = False

    @property
    def context(self) -> JobContext:
        """The services shared by every job."""
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
        running = [a for a in self._jobs.values() if not a.state.status.terminal]
        for actor in running:
            try:
                actor.request_stop("daemon shutdown")
            except Exception:  # already ended: nothing to stop
                continue
        with trio.move_on_after(grace):
            for actor in running:
                await actor.done.wait()

    async def run_job(self, spec: JobSpec) -> JobInfo:
        """Start a job and return once it runs, or has failed to start.

        Args:
            spec: A validated spec (see :func:`joblet.validate.build_spec`).

        Returns:
            The job's info: RUNNING, or FAILED with ``reason`` "start failed: ...".

        Raises:
            ResourceExhausted: ``maxConcurrentJobs`` jobs are already running.
            ShuttingDown: The engine is stopping.
        """
        if self._closing or self._nursery is None:
            raise ShuttingDown("joblet is shutting down")
        cap = self._ctx.config.joblet.max_concurrent_jobs
        active = sum(1 for a in self._jobs.values() if not a.state.status.terminal)
        if cap and active >= cap:
            raise ResourceExhausted(
                f"maximum concurrent jobs reached ({cap}): wait for a job to end or stop one"
            )
        job_id = str(uuid.uuid4())
        actor = JobActor(job_id, spec, self._ctx)
        self._jobs[job_id] = actor
        info: JobInfo = await self._nursery.start(actor.run)
        return info

    def _resolve(self, ref: str) -> JobActor:
        actor = self._jobs.get(ref)
        if actor is not None:
            return actor
        if ref:
            matches = [a for jid, a in self._jobs.items() if jid.startswith(ref)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise AmbiguousJobId(ref, len(matches))
        raise JobNotFound(ref)

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
        await actor.done.wait()
        return actor.info()

    async def wait_job(self, ref: str) -> JobInfo:
        """Wait until the job has ended and is cleaned up; returns its final info."""
        actor = self._resolve(ref)
        await actor.done.wait()
        return actor.info()

    async def follow_log(self, ref: str, offset: int = 0) -> AsyncIterator[Chunk]:
        """The job's merged output from byte ``offset``: what exists, then live, until the end.

        Raises:
            JobNotFound: No such job (raised at the first iteration).
        """
        actor = self._resolve(ref)
        async with aclosing(actor.log.follow(offset)) as chunks:
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
