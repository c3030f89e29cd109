"""Request validation on given host facts: no host is read, so any host can be described."""

from __future__ import annotations

import pytest

from joblet.core.errors import InvalidRequest
from joblet.core.model import Limits, RunRequest
from joblet.core.validate import HostFacts, build_spec

SMALL = HostFacts(memory_mb=1024, cpus=frozenset({0, 1}))


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            RunRequest(command="x", max_memory=2048),
            "job creation failed: maxMemory exceeds system limits (2048 MB > 1024 MB)",
        ),
        (
            RunRequest(command="x", max_cpu=250),
            "job creation failed: maxCPU exceeds system limits (250% > 200%)",
        ),
        (
            RunRequest(command="x", cpu_cores="1-3"),
            "invalid cpuCores: '1-3' names CPUs this host does not have: 2,3",
        ),
    ],
)
def test_limits_are_checked_against_the_given_host(request_: RunRequest, message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        build_spec(request_, defaults=Limits(), host=SMALL)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("cpus", "message"),
    [
        ("0-4294967296", "names CPUs no host has (above 8191)"),
        ("8192", "names CPUs no host has (above 8191)"),
        ("1" * 5000 + "-0", "names CPUs no host has (above 8191)"),
        ("0-1," * 4097, "names more than 8192 CPUs"),
        ("0-8191,0", "names more than 8192 CPUs"),
    ],
)
def test_cpu_lists_are_counted_before_they_are_expanded(cpus: str, message: str) -> None:
    """Found by fuzzing: "0-4294967296" became a set of four billion ints (the daemon hung and
    was killed), and a 5000-digit number failed int() (INTERNAL)."""
    with pytest.raises(InvalidRequest) as info:
        build_spec(RunRequest(command="x", cpu_cores=cpus), defaults=Limits(), host=SMALL)
    assert str(info.value) == f"invalid cpuCores: {cpus!r} {message}"


def test_what_the_host_has_is_accepted_and_defaults_fill_the_rest() -> None:
    request = RunRequest(command="x", args=("a",), max_memory=1024, max_cpu=200, cpu_cores="0-1")
    spec = build_spec(request, defaults=Limits(io_bps=5, pids_max=9), host=SMALL)
    assert (spec.limits.memory_mb, spec.limits.cpu_percent, spec.limits.cpu_cores) == (
        1024,
        200,
        "0-1",
    )
    assert (spec.limits.io_bps, spec.limits.pids_max, spec.network) == (5, 9, "host")
