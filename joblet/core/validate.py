"""Turning a client's raw request into a :class:`~joblet.core.model.JobSpec`, or a clear error.

Lives in the engine (not the gRPC layer) so every way in (gRPC, the in-process harness) gets the
same checks. Every error names the field and the problem.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

from joblet.core.cpus import CpuListError, parse_cpu_list
from joblet.core.errors import InvalidRequest
from joblet.core.model import JobSpec, Limits

MAX_COMMAND_LEN = 4096
#: Linux refuses a single argv/env string longer than this (MAX_ARG_STRLEN).
MAX_ARG_LEN = 131072
MAX_ARGS = 8192
#: Linux refuses an exec whose argv+envp exceed roughly this (ARG_MAX with an 8 MiB stack).
MAX_TOTAL_ARGS_BYTES = 1 << 20
NETWORK_MODES = ("host", "none")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def host_memory_mb() -> int:
    """Total memory of the host in MiB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)


def host_cpus() -> set[int]:
    """CPUs the daemon may use."""
    return set(os.sched_getaffinity(0))


def _text(field: str, value: str) -> str:
    if "\x00" in value:
        raise InvalidRequest(f"invalid {field}: contains a NUL byte")
    return value


def parse_cpuset(spec: str) -> set[int]:
    """Parse a cpuset list such as ``"0-2,4"``.

    Raises:
        InvalidRequest: The syntax is wrong.
    """
    try:
        return parse_cpu_list(spec)
    except CpuListError as e:
        raise InvalidRequest(f"invalid cpuCores: {e.text!r} ({e.problem})") from None


def build_spec(
    *,
    command: str,
    args: Sequence[str] = (),
    max_cpu: int = 0,
    max_memory: int = 0,
    max_iobps: int = 0,
    cpu_cores: str = "",
    env: Mapping[str, str] | None = None,
    network: str = "",
    name: str = "",
    defaults: Limits,
) -> JobSpec:
    """Validate a run request and apply the configured defaults.

    Zero (proto3's "unset") for a limit means the configured default.

    Raises:
        InvalidRequest: With a message naming the field and the problem.
    """
    if not command or not command.strip():
        raise InvalidRequest("invalid command: command is required")
    _text("command", command)
    if len(command) > MAX_COMMAND_LEN:
        raise InvalidRequest(f"invalid command: longer than {MAX_COMMAND_LEN} characters")
    if len(args) > MAX_ARGS:
        raise InvalidRequest(f"invalid args: more than {MAX_ARGS} arguments")
    total = len(command)
    for i, arg in enumerate(args):
        _text(f"args[{i}]", arg)
        if len(arg.encode()) >= MAX_ARG_LEN:
            raise InvalidRequest(f"invalid args[{i}]: longer than {MAX_ARG_LEN - 1} bytes")
        total += len(arg.encode()) + 1
    env = dict(env or {})
    for key, value in env.items():
        if not _ENV_NAME.match(key):
            raise InvalidRequest(f"invalid environment variable name: {key!r}")
        _text(f"environment[{key}]", value)
        total += len(key) + len(value.encode()) + 2
    if total > MAX_TOTAL_ARGS_BYTES:
        raise InvalidRequest(
            f"invalid args: command, arguments and environment exceed {MAX_TOTAL_ARGS_BYTES} bytes"
        )
    limit_fields: tuple[tuple[str, int], ...] = (
        ("maxCPU", max_cpu),
        ("maxMemory", max_memory),
        ("maxIOBPS", max_iobps),
    )
    for field, limit in limit_fields:
        if limit < 0:
            raise InvalidRequest(f"invalid {field}: must not be negative (got {limit})")
    ncpu = len(host_cpus())
    if max_cpu > 100 * ncpu:
        raise InvalidRequest(
            f"job creation failed: maxCPU exceeds system limits ({max_cpu}% > {100 * ncpu}%)"
        )
    mem_total = host_memory_mb()
    if max_memory > mem_total:
        raise InvalidRequest(
            "job creation failed: maxMemory exceeds system limits "
            f"({max_memory} MB > {mem_total} MB)"
        )
    if cpu_cores:
        missing = parse_cpuset(cpu_cores) - host_cpus()
        if missing:
            raise InvalidRequest(
                f"invalid cpuCores: {cpu_cores!r} names CPUs this host does not have: "
                + ",".join(map(str, sorted(missing)))
            )
    network = network or "host"
    if network not in NETWORK_MODES:
        raise InvalidRequest(f"invalid network: {network!r} (expected one of: host, none)")
    _text("name", name)
    limits = Limits(
        cpu_percent=max_cpu or defaults.cpu_percent,
        memory_mb=max_memory or defaults.memory_mb,
        io_bps=max_iobps or defaults.io_bps,
        cpu_cores=cpu_cores,
        pids_max=defaults.pids_max,
    )
    return JobSpec(
        command=command, args=tuple(args), limits=limits, env=env, network=network, name=name
    )
