"""Shared fixtures: a real in-process joblet per test, and the leak checks that follow each one."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from joblet.config import Config, IsolationSection, JobletSection, LogsSection, MetricsSection
from joblet.testing import Harness, open_harness

#: In CI (``.ci/run`` sets ``CI=true``) a missing capability fails a test instead of skipping it.
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def require_root() -> None:
    """Isolation tests need root: a failure in CI, a skip elsewhere."""
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("joblet's tests need root (namespaces, cgroups); CI must run as root")
        pytest.skip("needs root")


def cgroup_dirs_named(name: str) -> list[Path]:
    """Every directory called ``name`` directly under a cgroup hierarchy root (v1 and v2)."""
    found = []
    candidates = [CGROUP_ROOT] + [p for p in CGROUP_ROOT.iterdir() if p.is_dir()]
    for hierarchy in candidates:
        if (hierarchy / name).is_dir():
            found.append(hierarchy / name)
    return found


def processes_in_cgroup_named(name: str) -> list[int]:
    """PIDs of every live process whose cgroup path mentions ``name``.

    Zombies are left out: on cgroup v2 a zombie keeps showing its old group until its parent (here
    the host's PID 1, outside our control) reaps it, though it holds nothing.
    """
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/cgroup").read_text()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue
        if f"/{name}/" in text or text.rstrip().endswith(f"/{name}"):
            pids.append(int(entry))
    return pids


def stage1_children(ppid: int) -> list[int]:
    """The waiting stage-1 processes started by ``ppid``, as the daemon knows them: the PIDs of
    its ``unshare`` children running a stage 1 whose interpreter has not exec'd a job's PID 1.
    """
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if stat[0] == "Z" or int(stat[1]) != ppid or b"import _stage1" not in cmdline:
                continue
            children = Path(f"/proc/{entry}/task/{entry}/children").read_text().split()
            taken = any(
                Path(f"/proc/{child}/cmdline").read_bytes().startswith(b"/.joblet/init\0")
                for child in children
            )
        except OSError:
            continue
        if not taken:
            pids.append(int(entry))
    return pids


def make_config(
    *,
    metrics: MetricsSection | None = None,
    logs: LogsSection | None = None,
    isolation: IsolationSection | None = None,
    **joblet: Any,
) -> Config:
    """A config for tests: short timeouts, everything else default.

    Args:
        metrics: The ``metrics:`` section (default: the default section).
        logs: The ``logs:`` section (default: the default section).
        isolation: The ``isolation:`` section (default: the default section).
        joblet: ``JobletSection`` fields.
    """
    section = attrs.evolve(JobletSection(cleanup_timeout=5.0), **joblet)
    return Config(
        joblet=section,
        metrics=metrics or MetricsSection(),
        logs=logs or LogsSection(),
        isolation=isolation or IsolationSection(),
    )


@pytest.fixture
def root() -> None:
    """Needs root (a sync fixture: pytest-trio loses the reason of a skip in an async one)."""
    require_root()


@pytest.fixture
async def joblet(root: None, request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """A running in-process joblet; after the test, nothing of it may be left on the host."""
    marker = request.node.get_closest_marker("joblet_config")
    cfg = make_config(**(marker.kwargs if marker else {}))
    async with open_harness(cfg) as harness:
        parent = harness.node.config.cgroup.parent
        state = harness.state_dir
        yield harness
    assert processes_in_cgroup_named(parent) == [], "job processes left behind"
    assert stage1_children(os.getpid()) == [], "waiting stage-1 processes left behind"
    assert cgroup_dirs_named(parent) == [], "job cgroups left behind"
    assert not state.exists(), "harness state directory left behind"
