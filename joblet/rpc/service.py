"""``joblet.JobService``: the RPCs, from protobuf requests to engine calls and back.

RunJob, GetJobStatus, StopJob, ListJobs, GetJobLogs and GetJobMetrics are implemented; every
other RPC of the proto answers UNIMPLEMENTED (``CancelJob is not implemented yet``). Who may call
what is checked before a handler runs (:mod:`joblet.rpc.dispatch`, :mod:`joblet.rpc.auth`); what a
handler raises becomes a status in :mod:`joblet.rpc.errors`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any, Protocol

import trio

from joblet import logfmt
from joblet.config import Config
from joblet.core.chunks import Chunk
from joblet.core.errors import InvalidRequest, JobletError
from joblet.core.model import JobInfo, RunRequest
from joblet.core.samples import MetricsSample
from joblet.protocol import joblet_grpc
from joblet.protocol import joblet_pb2 as pb
from joblet.rpc import auth, convert
from joblet.rpc.dispatch import Handler, Send, ServiceDef

#: Largest ``DataChunk`` payload GetJobLogs sends (bigger pieces of output are split).
MAX_CHUNK = 64 * 1024
#: Output chunks read ahead of the client per GetJobLogs call. Small pieces already available
#: (a replay of a chatty job's history) are merged into one message up to MAX_CHUNK; the bound
#: keeps a slow client from holding more than this many chunks in memory.
LOG_PREFETCH = 16


class JobEngine(Protocol):
    """What the service needs of the engine (:class:`joblet.actors.engine.Engine`)."""

    async def run_job(self, request: RunRequest) -> JobInfo:
        """Start a job."""
        ...

    def get(self, ref: str) -> JobInfo:
        """The job with this id or unique id prefix."""
        ...

    def list_jobs(self) -> list[JobInfo]:
        """Every job."""
        ...

    async def stop_job(self, ref: str) -> JobInfo:
        """Stop a running job and return its final info."""
        ...

    async def delete_job(self, ref: str) -> JobInfo:
        """Delete an ended job with its logs, metrics and metadata."""
        ...

    async def delete_all_jobs(self) -> tuple[int, int]:
        """Delete every ended job: (deleted, skipped)."""
        ...

    def follow_log(self, ref: str, offset: int = 0) -> AsyncGenerator[Chunk, None]:
        """The job's output from ``offset``: what exists, then live, until the job ends."""
        ...

    def follow_metrics(self, ref: str) -> AsyncGenerator[MetricsSample, None]:
        """The job's metrics samples: what is stored, then live ones until the job ends."""
        ...


class JobService:
    """The implementation of ``joblet.JobService``.

    Args:
        engine: The node's engine.
        config: The daemon's configuration (message sizes).
    """

    def __init__(self, engine: JobEngine, config: Config) -> None:
        self._engine = engine
        # A DataChunk adds at most 6 bytes (tag, length) to its payload.
        self._chunk_size = max(1, min(MAX_CHUNK, config.grpc.max_send_msg_size - 6))

    def definition(self) -> ServiceDef:
        """The service as :class:`~joblet.rpc.server.GrpcServer` serves it."""
        return ServiceDef.bind(joblet_grpc.JobServiceServicer(), self.handlers())

    def handlers(self) -> dict[str, Handler]:
        """The implemented RPCs by name; the proto's others are UNIMPLEMENTED."""
        return {
            "RunJob": self.run_job,
            "GetJobStatus": self.get_job_status,
            "StopJob": self.stop_job,
            "DeleteJob": self.delete_job,
            "DeleteAllJobs": self.delete_all_jobs,
            "ListJobs": self.list_jobs,
            "GetJobLogs": self.get_job_logs,
            "GetJobMetrics": self.get_job_metrics,
        }

    async def run_job(self, req: Any) -> Any:
        """RunJob: validate the request, start the job, answer with its metadata.

        A job that fails to start is not an error of the call: it is answered with status FAILED
        and the reason (``reason``), like any other job that ended.
        """
        info = await self._engine.run_job(convert.run_request(req))
        logfmt.info(
            "job run requested",
            jobId=info.id,
            client=_client_name(),
            status=info.status.value,
        )
        return convert.run_job_res(info)

    async def get_job_status(self, req: Any) -> Any:
        """GetJobStatus: the job's current metadata."""
        return convert.job_status_res(self._engine.get(_job_ref(req.id)))

    async def stop_job(self, req: Any) -> Any:
        """StopJob: SIGTERM, the grace period, SIGKILL; answers once the job has ended."""
        info = await self._engine.stop_job(_job_ref(req.id))
        logfmt.info(
            "job stopped on request",
            jobId=info.id,
            client=_client_name(),
            status=info.status.value,
            exitCode=info.exit_code,
        )
        return convert.stop_job_res(info)

    async def delete_job(self, req: Any) -> Any:
        """DeleteJob: remove an ended job with its logs, metrics and metadata."""
        info = await self._engine.delete_job(_job_ref(req.id))
        logfmt.info("job deleted on request", jobId=info.id, client=_client_name())
        return pb.DeleteJobRes(id=info.id, success=True, message="Job deleted successfully")

    async def delete_all_jobs(self, req: Any) -> Any:
        """DeleteAllJobs: remove every ended job; running ones are skipped and counted."""
        deleted, skipped = await self._engine.delete_all_jobs()
        logfmt.info(
            "jobs deleted on request",
            deleted=deleted,
            skipped=skipped,
            client=_client_name(),
        )
        return pb.DeleteAllJobsRes(
            success=True,
            message=(
                f"Successfully deleted {deleted} jobs, skipped {skipped} running/scheduled jobs"
            ),
            deletedCount=deleted,
            skippedCount=skipped,
        )

    async def list_jobs(self, req: Any) -> Any:
        """ListJobs: every job, oldest first."""
        return convert.jobs_to_pb(self._engine.list_jobs())

    async def get_job_logs(self, req: Any, send: Send) -> None:
        """GetJobLogs: the output so far, then live output until the job ends.

        Starts at byte ``offset`` of the job's merged output (0: the beginning). Messages carry
        at most :data:`MAX_CHUNK` bytes (less if ``grpc.maxSendMsgSize`` is smaller). If the
        client goes away the call is cancelled, which closes the engine's log follower.
        """
        ref = _job_ref(req.id)
        if req.offset < 0:
            raise InvalidRequest(f"invalid offset: must not be negative (got {req.offset})")
        job = self._engine.get(ref)  # unknown or ambiguous: fail before the stream starts
        size = self._chunk_size
        chunks_in, chunks_out = trio.open_memory_channel[bytes](LOG_PREFETCH)
        failure: list[JobletError] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_log, job.id, req.offset, chunks_in, failure)
                async with chunks_out:
                    async for first in chunks_out:
                        pending = first
                        while pending:
                            pending = _take_ready(pending, chunks_out, size)
                            # Full messages while output keeps coming; a short one only when
                            # the client has seen everything else (never hold bytes back).
                            await send(pb.DataChunk(payload=pending[:size]))
                            pending = pending[size:]
        except* JobletError as group:
            # Only the sending loop can raise one here (the reader reports through `failure`),
            # so there is exactly one: the call's answer.
            raise group.exceptions[0] from None
        if failure:
            raise failure[0]

    async def _read_log(
        self,
        job_id: str,
        offset: int,
        out: trio.MemorySendChannel[bytes],
        failure: list[JobletError],
    ) -> None:
        """Feed the job's output into ``out`` (the only sender; closes it when done)."""
        follower = self._engine.follow_log(job_id, offset)
        async with out:
            try:
                async for chunk in follower:
                    if chunk.data:
                        await out.send(chunk.data)
            except JobletError as exc:  # e.g. the job vanished: the call's answer
                failure.append(exc)
            finally:
                aclose = getattr(follower, "aclose", None)
                if aclose is not None:
                    await aclose()

    async def get_job_metrics(self, req: Any, send: Send) -> None:
        """GetJobMetrics: every sample so far, then live samples until the job ends.

        One message per sample. A slow client never holds up the job's sampler: it catches up
        from the stored samples (:mod:`joblet.actors.sampler`). If the client goes away the call
        is cancelled, which closes the engine's follower.
        """
        job = self._engine.get(_job_ref(req.id))  # unknown or ambiguous: fail before streaming
        async with aclosing(self._engine.follow_metrics(job.id)) as samples:
            async for sample in samples:
                await send(convert.metrics_sample_to_pb(job.id, sample))


def _client_name() -> str:
    """The calling client's certificate name, for log lines ("-" outside a connection)."""
    peer = auth.current_peer.get()
    return peer.name if peer else "-"


def _job_ref(ref: str) -> str:
    """A job id or id prefix from a request, checked for the obvious mistakes."""
    if not ref:
        raise InvalidRequest("invalid id: a job id is required")
    if "\x00" in ref:
        raise InvalidRequest("invalid id: contains a NUL byte")
    return ref


def _take_ready(first: bytes, chunks: trio.MemoryReceiveChannel[bytes], limit: int) -> bytes:
    """``first`` and the output already waiting, until there are ``limit`` bytes or none left."""
    parts, size = [first], len(first)
    while size < limit:
        try:
            more = chunks.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            break
        parts.append(more)
        size += len(more)
    return b"".join(parts) if len(parts) > 1 else first
