"""How ``rnx`` shows the server's answers: the spec's human blocks, and JSON.

Pure functions from protobuf messages to text; no I/O (``cli.rnx`` writes the results).

Human output follows the spec's examples line for line. Beyond them, a job's ``reason`` (why it
failed or stopped, e.g. ``OOMKilled``) is shown as a ``Reason:`` line when there is one, and
non-default settings the spec's blocks have no line for (``CPUCores``, ``MaxIOBPS`` on ``run``,
an isolated network on ``status``) get a line of their own after the spec's lines.

JSON output is the message itself: every field present (zeros and empty strings included), under
its proto field name (``maxCPU``, ``startTime``; ``uuid`` in a status, as the spec's
``GetJobStatusRes`` names it), 64-bit integers as JSON numbers, ``bytes`` as base64. ``list``
gives an array of ``Job`` objects.
"""

from __future__ import annotations

import base64
import json
import shlex
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from joblet.protocol import joblet_pb2 as pb

_NETWORK_LABELS = {
    "": "host (shared with system)",
    "host": "host (shared with system)",
    "none": "none (isolated, loopback only)",
}
_ENDED_WITH_REASON = ("FAILED", "STOPPED")


def command_line(command: str, args: Sequence[str]) -> str:
    """A job's command as a shell would need it typed (``echo 'hello world'``)."""
    return shlex.join([command, *args])


def network_label(network: str) -> str:
    """The spec's wording for a network mode (``host (shared with system)``)."""
    return _NETWORK_LABELS.get(network, network)


def render_run(job: pb.RunJobRes) -> str:
    """The ``Job started:`` block of ``rnx job run``."""
    lines = [
        "Job started:",
        f"ID: {job.id}",
        f"Command: {command_line(job.command, job.args)}",
        f"Status: {job.status}",
        f"StartTime: {job.startTime}",
        f"MaxCPU: {job.maxCPU}",
        f"MaxMemory: {job.maxMemory}",
    ]
    if job.maxIOBPS:
        lines.append(f"MaxIOBPS: {job.maxIOBPS}")
    if job.cpuCores:
        lines.append(f"CPUCores: {job.cpuCores}")
    lines.append(f"Network: {network_label(job.network)}")
    lines += _reason_lines(job.status, job.reason)
    return "\n".join(lines)


def render_status(job: pb.GetJobStatusRes) -> str:
    """The block of ``rnx job status``."""
    lines = [
        f"Id: {job.uuid}",
        f"Command: {command_line(job.command, job.args)}",
        f"Status: {job.status}",
        f"Started At: {job.startTime}",
        f"Ended At: {job.endTime}",
        f"MaxCPU: {job.maxCPU}",
        f"MaxMemory: {job.maxMemory}",
        f"MaxIOBPS: {job.maxIOBPS}",
        f"ExitCode: {job.exitCode}",
    ]
    if job.cpuCores:
        lines.append(f"CPUCores: {job.cpuCores}")
    if job.network not in ("", "host"):
        lines.append(f"Network: {network_label(job.network)}")
    if job.seccompProfile:
        lines.append(f"Seccomp: {job.seccompProfile}")
        lines.append(f"Landlock: {f'ABI {job.landlockAbi}' if job.landlockAbi else 'off'}")
    lines += _reason_lines(job.status, job.reason)
    return "\n".join(lines)


def render_list(jobs: Iterable[pb.Job]) -> str:
    """The lines of ``rnx job list``, one per job; empty when there are none."""
    return "\n".join(
        f"{job.id} {job.status} StartTime: {job.startTime} "
        f"Command: {command_line(job.command, job.args)}"
        for job in jobs
    )


def render_stop(res: pb.StopJobRes) -> str:
    """The ``Job stopped successfully:`` block of ``rnx job stop``."""
    return "\n".join(
        [
            "Job stopped successfully:",
            f"ID: {res.id}",
            f"Status: {res.status}",
            f"ExitCode: {res.exitCode}",
            f"EndTime: {res.endTime}",
        ]
    )


def render_job_end(job: pb.GetJobStatusRes) -> str:
    """One line saying how a waited-for job ended, when it did not simply complete."""
    details = f"exit code {job.exitCode}"
    if job.reason and job.reason != details:
        details += f", {job.reason}"
    return f"Job {job.uuid} {job.status} ({details})"


def format_bytes(n: float) -> str:
    """A byte count as the spec writes sizes: ``256MB``, ``1.2MB``, ``0B`` (powers of 1024)."""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1024 or unit == "TB":
            if unit == "B":
                return f"{value:.0f}B"
            return f"{value:.1f}{unit}" if abs(value) < 10 else f"{value:.0f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_rate(bytes_per_second: float) -> str:
    """A rate as the spec writes it: ``10MB/s``, ``1.2MB/s``."""
    return format_bytes(bytes_per_second) + "/s"


def render_metrics(sample: pb.JobMetricsSample) -> str:
    """The spec's block for one sample of ``rnx job metrics``, ending with a blank line.

    The ``Network`` line is there only for a job with its own network namespace (a job on the
    host's network has no traffic of its own to show).
    """
    lines = [
        f"Timestamp: {sample.timestamp}",
        f"CPU: {sample.cpu.usagePercent:.1f}%, Memory: {format_bytes(sample.memory.current)}, "
        f"I/O Read: {format_rate(sample.io.readBps)}, I/O Write: {format_rate(sample.io.writeBps)}",
    ]
    if sample.HasField("network"):
        lines.append(
            f"Network RX: {format_rate(sample.network.rxBps)}, "
            f"Network TX: {format_rate(sample.network.txBps)}"
        )
    return "\n".join(lines) + "\n"


def metrics_to_json(sample: pb.JobMetricsSample) -> str:
    """One sample as a single line of JSON (``rnx --json job metrics`` prints JSON Lines).

    The message's fields as :func:`to_json` gives them, except that a metric type the sample does
    not have (``network`` of a job on the host's network) is ``null`` rather than zeros.
    """
    data = message_to_dict(sample)
    for name in ("cpu", "memory", "io", "network", "process"):
        if not sample.HasField(name):
            data[name] = None
    return json.dumps(data, ensure_ascii=False)


def to_json(value: Any) -> str:
    """A message, or a list of messages, as indented JSON."""
    if isinstance(value, list | tuple):
        data: Any = [message_to_dict(m) for m in value]
    else:
        data = message_to_dict(value)
    return json.dumps(data, indent=2, ensure_ascii=False)


def message_to_dict(message: Any) -> dict[str, Any]:
    """Every field of ``message`` under its proto name, with plain JSON values."""
    return {
        field.name: _field_value(field, getattr(message, field.name))
        for field in message.DESCRIPTOR.fields
    }


def _field_value(field: Any, value: Any) -> Any:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        return {key: _scalar(value_field, item) for key, item in value.items()}
    if field.is_repeated:
        return [_scalar(field, item) for item in value]
    return _scalar(field, value)


def _scalar(field: Any, value: Any) -> Any:
    if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
        return message_to_dict(value)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    return value


def _reason_lines(status: str, reason: str) -> list[str]:
    return [f"Reason: {reason}"] if reason and status in _ENDED_WITH_REASON else []
