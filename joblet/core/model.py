"""Domain types shared by every layer: job specs, limits, statuses and job records.

Plain attrs classes with no I/O, so they can be built and checked anywhere.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import attrs


class JobStatus(enum.StrEnum):
    """A job's status, with the spec's wire names."""

    SCHEDULED = "SCHEDULED"
    INITIALIZING = "INITIALIZING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"
    CANCELED = "CANCELED"

    @property
    def terminal(self) -> bool:
        """Whether the job has ended."""
        return self in _TERMINAL


_TERMINAL = frozenset(
    {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED}
)


@attrs.frozen
class Limits:
    """Resource limits of one job.

    Attributes:
        cpu_percent: CPU quota in percent of one core (100 = one full core); 0 means unlimited.
        memory_mb: Memory limit in MiB; 0 means unlimited.
        io_bps: Read and write limit in bytes per second on every block device; 0 means unlimited.
        cpu_cores: cpuset specification such as ``"0-1"`` or ``"0,2"``; empty means all cores.
        pids_max: Most processes and threads the job may have at once; 0 means unlimited.
    """

    cpu_percent: int = 100
    memory_mb: int = 512
    io_bps: int = 0
    cpu_cores: str = ""
    pids_max: int = 1024


@attrs.frozen
class RunRequest:
    """What a client sent to run a job, not yet checked: the one list of a run request's fields.

    Zero or empty means "not set" (proto3's default): the configured default applies. The gRPC
    edge fills it from a ``RunJobReq``; the harness from its arguments; the engine checks it
    (:func:`joblet.core.validate.build_spec`).

    Attributes:
        command: The program.
        args: Its arguments.
        max_cpu: CPU quota in percent of one core (``maxCPU``).
        max_memory: Memory limit in MiB (``maxMemory``).
        max_iobps: IO limit in bytes per second (``maxIOBPS``).
        cpu_cores: cpuset list such as ``"0-1"`` (``cpuCores``).
        env: Environment variables for the job (``environment``).
        network: ``"host"``, ``"none"``, or empty for the default.
        name: Optional readable name.
    """

    command: str
    args: tuple[str, ...] = ()
    max_cpu: int = 0
    max_memory: int = 0
    max_iobps: int = 0
    cpu_cores: str = ""
    env: Mapping[str, str] = attrs.field(factory=dict)
    network: str = ""
    name: str = ""


@attrs.frozen
class JobSpec:
    """What a client asked to run.

    Attributes:
        command: The program, resolved on the job's PATH when it has no slash.
        args: Its arguments, passed through untouched.
        limits: The job's resource limits (defaults already applied).
        env: Extra environment variables for the job (the daemon's own are never passed).
        network: ``"host"`` shares the host's network; ``"none"`` gives the job an empty network
            namespace (loopback only).
        name: Optional readable name (workflows).
        seccomp: The syscall filter the job runs under (``default``, ``off`` or a profile's
            path), as the node's configuration had it; empty in records of older joblets.
        landlock: The Landlock ABI version its writes are confined with; 0 for none.
    """

    command: str
    args: tuple[str, ...] = ()
    limits: Limits = Limits()
    env: Mapping[str, str] = attrs.field(factory=dict)
    network: str = "host"
    name: str = ""
    seccomp: str = ""
    landlock: int = 0


@attrs.frozen
class JobInfo:
    """A snapshot of one job, as reported to clients.

    Attributes:
        id: The job's UUIDv4.
        spec: What was asked for.
        status: Current status.
        start_time: When the job was accepted (Unix seconds), or None.
        end_time: When it ended (Unix seconds), or None while it runs.
        exit_code: Process exit code, 128+N when killed by signal N, -1 when stopped.
        reason: Why it ended the way it did (``OOMKilled``, ``signal 9``, ``start failed: ...``,
            ``stopped``, ``timeout``), empty for a normal exit.
        pid: Host PID of the job's top process while it runs, else 0.
        node_id: The node that ran it.
    """

    id: str
    spec: JobSpec
    status: JobStatus
    start_time: float | None = None
    end_time: float | None = None
    exit_code: int = 0
    reason: str = ""
    pid: int = 0
    node_id: str = ""
