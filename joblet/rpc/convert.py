"""Conversion between the domain types (:mod:`joblet.model`) and the protobuf messages.

Explicit functions rather than reflection: every wire field is named once, here. Nothing in this
module validates a request (that is :func:`joblet.validate.build_spec`'s job); it only moves values
and makes them fit their wire types:

- times are RFC3339 UTC strings with second precision (``"2024-01-15T10:30:00Z"``), empty if unset;
- integers are clamped into the range of their wire type (``int32``/``int64``), never overflowing.

Every string field of a request is decoded by protobuf itself, which rejects invalid UTF-8 when it
parses the message (``DecodeError``); ``bytes`` fields (``DataChunk.payload``,
``FileUpload.content``) are passed through undecoded, and whoever decodes them must check their
UTF-8.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from typing import TypedDict

from joblet.model import JobInfo
from joblet.rpc._gen import joblet_pb2 as pb

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

_RFC3339 = "%Y-%m-%dT%H:%M:%SZ"


def clamp_int32(value: int) -> int:
    """``value`` limited to the range of a protobuf ``int32``."""
    return max(INT32_MIN, min(INT32_MAX, value))


def clamp_int64(value: int) -> int:
    """``value`` limited to the range of a protobuf ``int64``."""
    return max(INT64_MIN, min(INT64_MAX, value))


def rfc3339(timestamp: float | None) -> str:
    """Format Unix seconds as an RFC3339 UTC string, ``""`` for None.

    Sub-second digits are dropped, as in the spec's examples. A time outside what the calendar can
    represent (NaN, infinities, far-off years) also gives ``""`` rather than an error.
    """
    if timestamp is None or not math.isfinite(timestamp):
        return ""
    try:
        return dt.datetime.fromtimestamp(math.floor(timestamp), dt.UTC).strftime(_RFC3339)
    except (OverflowError, OSError, ValueError):
        return ""


def parse_rfc3339(text: str) -> float | None:
    """Parse an RFC3339 time into Unix seconds; ``""`` gives None.

    Accepts any offset (``Z``, ``+02:00``) and fractional seconds.

    Raises:
        ValueError: ``text`` is not an RFC3339 time.
    """
    if not text:
        return None
    parsed = dt.datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise ValueError(f"RFC3339 time without an offset: {text!r}")
    return parsed.timestamp()


def job_to_pb(info: JobInfo) -> pb.Job:
    """The ``Job`` message describing ``info``."""
    msg = pb.Job()
    _fill_job(msg, info)
    return msg


def run_job_res(info: JobInfo) -> pb.RunJobRes:
    """The ``RunJob`` response for a newly accepted job (same fields as ``Job``)."""
    msg = pb.RunJobRes()
    _fill_job(msg, info)
    return msg


def jobs_to_pb(infos: Iterable[JobInfo]) -> pb.Jobs:
    """The ``ListJobs`` response."""
    return pb.Jobs(jobs=[job_to_pb(info) for info in infos])


def job_status_res(info: JobInfo) -> pb.GetJobStatusRes:
    """The ``GetJobStatus`` response for ``info``."""
    spec, limits = info.spec, info.spec.limits
    return pb.GetJobStatusRes(
        uuid=info.id,
        name=spec.name,
        command=spec.command,
        args=list(spec.args),
        maxCPU=clamp_int32(limits.cpu_percent),
        cpuCores=limits.cpu_cores,
        maxMemory=clamp_int32(limits.memory_mb),
        maxIOBPS=clamp_int64(limits.io_bps),
        status=str(info.status),
        startTime=rfc3339(info.start_time),
        endTime=rfc3339(info.end_time),
        exitCode=clamp_int32(info.exit_code),
        environment=dict(spec.env),
        network=spec.network,
        nodeId=info.node_id,
        reason=info.reason,
    )


def stop_job_res(info: JobInfo) -> pb.StopJobRes:
    """The ``StopJob`` response: the job's id, status, end time and exit code."""
    return pb.StopJobRes(
        id=info.id,
        status=str(info.status),
        endTime=rfc3339(info.end_time),
        exitCode=clamp_int32(info.exit_code),
    )


class RunRequestFields(TypedDict):
    """The raw values of a ``RunJobReq``, named as :func:`joblet.validate.build_spec` takes them."""

    command: str
    args: tuple[str, ...]
    max_cpu: int
    max_memory: int
    max_iobps: int
    cpu_cores: str
    env: dict[str, str]
    network: str
    name: str


def spec_fields_from_run_req(req: pb.RunJobReq) -> RunRequestFields:
    """Extract a ``RunJobReq``'s values without validating them.

    Proto3 zeros stay zeros ("unset": the engine applies its defaults). The result is meant for
    ``build_spec(**fields, defaults=...)``, which does every check.
    """
    return RunRequestFields(
        command=req.command,
        args=tuple(req.args),
        max_cpu=req.maxCPU,
        max_memory=req.maxMemory,
        max_iobps=req.maxIOBPS,
        cpu_cores=req.cpuCores,
        env=dict(req.environment),
        network=req.network,
        name=req.name,
    )


def _fill_job(msg: pb.Job | pb.RunJobRes, info: JobInfo) -> None:
    spec, limits = info.spec, info.spec.limits
    msg.id = info.id
    msg.name = spec.name
    msg.command = spec.command
    msg.args.extend(spec.args)
    msg.maxCPU = clamp_int32(limits.cpu_percent)
    msg.cpuCores = limits.cpu_cores
    msg.maxMemory = clamp_int32(limits.memory_mb)
    msg.maxIOBPS = clamp_int32(limits.io_bps)
    msg.status = str(info.status)
    msg.startTime = rfc3339(info.start_time)
    msg.endTime = rfc3339(info.end_time)
    msg.exitCode = clamp_int32(info.exit_code)
    msg.environment.update(spec.env)
    msg.nodeId = info.node_id
    msg.reason = info.reason
    msg.network = spec.network
