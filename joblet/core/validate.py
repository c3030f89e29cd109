"""Turning a client's :class:`~joblet.core.model.RunRequest` into a checked ``JobSpec``.

The engine calls it (not the gRPC layer), so every way in (gRPC, the in-process harness) gets the
same checks. What it needs to know of the host comes in as :class:`HostFacts` (read once by the
node, :func:`joblet.sys.host.read_host_facts`): validation reads nothing itself. Every error names
the field and the problem.
"""

from __future__ import annotations

import re

import attrs

from joblet.core.cpus import CpuListError, parse_cpu_list
from joblet.core.errors import InvalidRequest
from joblet.core.model import JobSpec, Limits, RunRequest

MAX_COMMAND_LEN = 4096
#: Linux refuses a single argv/env string longer than this (MAX_ARG_STRLEN).
MAX_ARG_LEN = 131072
MAX_ARGS = 8192
#: Linux refuses an exec whose argv+envp exceed roughly this (ARG_MAX with an 8 MiB stack).
MAX_TOTAL_ARGS_BYTES = 1 << 20
NETWORK_MODES = ("host", "none")
#: CPUs a Linux host can have at most (NR_CPUS is at most 8192): a cpuCores list naming more, or a
#: higher CPU number, is refused before it is expanded.
MAX_CPUS = 8192
#: A number or a range of a CPU list (the syntax itself is checked by parse_cpu_list).
_CPU_SPAN = re.compile(r"(\d+)(?:-(\d+))?", re.ASCII)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@attrs.frozen
class HostFacts:
    """What validation needs to know of the host.

    Attributes:
        memory_mb: Total memory in MiB.
        cpus: The CPUs the daemon may use.
    """

    memory_mb: int
    cpus: frozenset[int]


def _text(field: str, value: str) -> str:
    if "\x00" in value:
        raise InvalidRequest(f"invalid {field}: contains a NUL byte")
    return value


def _cpu_number(digits: str) -> int:
    """A CPU number's value, or MAX_CPUS for any longer one (int() of thousands of digits is
    slow, and refused past 4300)."""
    significant = digits.lstrip("0") or "0"
    return int(significant) if len(significant) <= len(str(MAX_CPUS)) else MAX_CPUS


def parse_cpuset(spec: str) -> set[int]:
    """Parse a cpuset list such as ``"0-2,4"``.

    The CPUs it names are counted before they are listed: a client's ``"0-4294967296"`` is
    refused, not expanded into four billion numbers.

    Raises:
        InvalidRequest: The syntax is wrong, or it names CPUs no host has.
    """
    total = 0
    for span in _CPU_SPAN.finditer(spec):
        first = _cpu_number(span.group(1))
        last = _cpu_number(span.group(2) or span.group(1))
        if max(first, last) >= MAX_CPUS:
            raise InvalidRequest(
                f"invalid cpuCores: {spec!r} names CPUs no host has (above {MAX_CPUS - 1})"
            )
        total += max(0, last - first + 1)
        if total > MAX_CPUS:
            raise InvalidRequest(f"invalid cpuCores: {spec!r} names more than {MAX_CPUS} CPUs")
    try:
        return parse_cpu_list(spec)
    except CpuListError as e:
        raise InvalidRequest(f"invalid cpuCores: {e.text!r} ({e.problem})") from None


def build_spec(request: RunRequest, *, defaults: Limits, host: HostFacts) -> JobSpec:
    """Check a run request and apply the configured defaults.

    Zero (proto3's "unset") for a limit means the configured default.

    Args:
        request: What the client sent.
        defaults: The configured limits for what the request leaves unset.
        host: The host's memory and CPUs, which limits may not exceed.

    Raises:
        InvalidRequest: With a message naming the field and the problem.
    """
    command, args, env = request.command, request.args, dict(request.env)
    max_cpu, max_memory, max_iobps = request.max_cpu, request.max_memory, request.max_iobps
    cpu_cores, network, name = request.cpu_cores, request.network, request.name
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
    ncpu = len(host.cpus)
    if max_cpu > 100 * ncpu:
        raise InvalidRequest(
            f"job creation failed: maxCPU exceeds system limits ({max_cpu}% > {100 * ncpu}%)"
        )
    mem_total = host.memory_mb
    if max_memory > mem_total:
        raise InvalidRequest(
            "job creation failed: maxMemory exceeds system limits "
            f"({max_memory} MB > {mem_total} MB)"
        )
    if cpu_cores:
        missing = parse_cpuset(cpu_cores) - host.cpus
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
