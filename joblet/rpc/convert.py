"""Conversion between the domain types (:mod:`joblet.core.model`) and the protobuf messages.

Explicit functions rather than reflection: every wire field is named once, here. Nothing in this
module validates a request (that is :func:`joblet.core.validate.build_spec`'s job); it only moves
values and makes them fit their wire types:

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

from google.protobuf.descriptor import FieldDescriptor

from joblet.core.model import JobInfo, RunRequest
from joblet.core.samples import MetricsSample
from joblet.protocol import joblet_pb2 as pb

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
        seccompProfile=spec.seccomp,
        landlockAbi=spec.landlock,
    )


def stop_job_res(info: JobInfo) -> pb.StopJobRes:
    """The ``StopJob`` response: the job's id, status, end time and exit code."""
    return pb.StopJobRes(
        id=info.id,
        status=str(info.status),
        endTime=rfc3339(info.end_time),
        exitCode=clamp_int32(info.exit_code),
    )


def run_request(req: pb.RunJobReq) -> RunRequest:
    """A ``RunJobReq``'s values, not checked (the engine checks them).

    Proto3 zeros stay zeros ("unset": the engine applies its defaults).
    """
    return RunRequest(
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


# Wire field of each Job*Metrics message -> the sample's value name (see joblet.core.samples);
# fields whose name ends in "Percent" or "Bps" are doubles, the others integers.
_METRIC_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "cpu": (
        ("usagePercent", "cpu_percent"),
        ("usageUsec", "cpu_usage_usec"),
        ("userUsec", "cpu_user_usec"),
        ("systemUsec", "cpu_system_usec"),
        ("nrPeriods", "cpu_nr_periods"),
        ("nrThrottled", "cpu_nr_throttled"),
        ("throttledUsec", "cpu_throttled_usec"),
    ),
    "memory": (
        ("current", "memory_current"),
        ("peak", "memory_peak"),
        ("limit", "memory_limit"),
        ("anon", "memory_anon"),
        ("file", "memory_file"),
        ("pgFault", "memory_pgfault"),
        ("pgMajFault", "memory_pgmajfault"),
        ("oomKills", "memory_oom_kills"),
    ),
    "io": (
        ("readBytes", "io_read_bytes"),
        ("writeBytes", "io_write_bytes"),
        ("readOps", "io_read_ops"),
        ("writeOps", "io_write_ops"),
        ("readBps", "io_read_bps"),
        ("writeBps", "io_write_bps"),
    ),
    "network": (
        ("rxBytes", "net_rx_bytes"),
        ("txBytes", "net_tx_bytes"),
        ("rxPackets", "net_rx_packets"),
        ("txPackets", "net_tx_packets"),
        ("rxBps", "net_rx_bps"),
        ("txBps", "net_tx_bps"),
    ),
    "process": (
        ("count", "process_count"),
        ("threads", "process_threads"),
        ("openFds", "process_open_fds"),
        ("pidsLimit", "process_pids_limit"),
    ),
}


def metrics_sample_to_pb(job_id: str, sample: MetricsSample) -> pb.JobMetricsSample:
    """The ``JobMetricsSample`` for one sample of a job.

    A metric type the sample does not have (``network`` of a job on the host's network) is left
    unset, so clients can tell "not measured" from zero.
    """
    msg = pb.JobMetricsSample(
        jobId=job_id,
        timestamp=rfc3339(sample.timestamp_ns / 1e9),
        timestampUnixNano=clamp_int64(sample.timestamp_ns),
    )
    for metric_type, fields in _METRIC_FIELDS.items():
        values = sample.values.get(metric_type)
        if values is None:
            continue
        part = getattr(msg, metric_type)
        part.SetInParent()
        for field, name in fields:
            value = values.get(name, 0.0)
            if field.endswith(("Percent", "Bps")):
                setattr(part, field, value if math.isfinite(value) else 0.0)
            else:
                is_int32 = part.DESCRIPTOR.fields_by_name[field].type == FieldDescriptor.TYPE_INT32
                number = int(value) if math.isfinite(value) else 0
                setattr(part, field, clamp_int32(number) if is_int32 else clamp_int64(number))
    return msg


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
