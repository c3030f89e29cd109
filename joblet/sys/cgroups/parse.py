"""What cgroup files say, as numbers: pure parsers of their text (no I/O).

Each function takes text as the kernel shows it (a whole file, trailing newline included) and
returns numbers; the drivers read the files. A value that is missing or not a number counts as 0,
as the kernel's files differ between versions and configurations. :func:`v1_stats` and
:func:`v2_stats` turn the texts of a job group's files, by file name, into a
:class:`~joblet.core.counters.CgroupStats`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import attrs

from joblet.core.counters import CgroupStats

#: v1 shows an unlimited memory limit as a huge number (about 2**63, rounded down to pages).
V1_UNLIMITED = 1 << 62
_IO_STAT_KEYS = ("rbytes", "wbytes", "rios", "wios")


@attrs.frozen
class Mount:
    """One line of ``/proc/<pid>/mountinfo``.

    Attributes:
        point: Where it is mounted.
        root: The directory of the file system the mount shows as its top.
        fstype: The file system type (``cgroup``, ``cgroup2``...).
        options: The super block options (for cgroup v1: the bound controllers, among others).
    """

    point: str
    root: str
    fstype: str
    options: frozenset[str]


def int_or(text: str) -> int:
    """One integer (``"max"``, empty or anything else that is not a number: 0)."""
    try:
        return int(text.strip())
    except ValueError:
        return 0


def flat_keyed(text: str) -> dict[str, int]:
    """Parse ``key value`` lines (cpu.stat, memory.stat, memory.events, oom_control...)."""
    result: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        result[key] = int_or(value)
    return result


def pid_list(text: str) -> list[int]:
    """The PIDs of a ``cgroup.procs`` or ``tasks`` file, in the file's order."""
    return [int(p) for p in text.split()]


def v1_limit(value: int) -> int:
    """A v1 byte limit, 0 for "unlimited" (the kernel shows PAGE_COUNTER_MAX pages in bytes)."""
    return 0 if value >= V1_UNLIMITED else value


def blkio_rw(text: str) -> tuple[int, int]:
    """Sum the Read and Write lines of a v1 blkio stat file over all devices."""
    read = write = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "Read":
            read += int_or(parts[2])
        elif len(parts) == 3 and parts[1] == "Write":
            write += int_or(parts[2])
    return read, write


def io_stat(text: str) -> dict[str, int]:
    """Sum a v2 ``io.stat`` over its devices: ``rbytes``, ``wbytes``, ``rios``, ``wios``."""
    totals = dict.fromkeys(_IO_STAT_KEYS, 0)
    for line in text.splitlines():
        for item in line.split()[1:]:
            key, _, value = item.partition("=")
            if key in totals:
                totals[key] += int_or(value)
    return totals


def proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` as {controller field: path} (v2's field is ``""``)."""
    result: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            result[parts[1]] = parts[2]
    return result


def mountinfo(text: str) -> list[Mount]:
    """The mounts a ``/proc/<pid>/mountinfo`` lists, in its order (malformed lines skipped)."""
    found = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        pre, post = left.split(), right.split()
        if not sep or len(pre) < 5 or len(post) < 3:
            continue
        found.append(
            Mount(
                point=_unescape(pre[4]),
                root=_unescape(pre[3]),
                fstype=post[0],
                options=frozenset(post[2].split(",")),
            )
        )
    return found


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def v2_stats(texts: Mapping[str, str]) -> CgroupStats:
    """A v2 job group's usage from its files' texts.

    Args:
        texts: File name to content for the files of the group that exist (``cpu.stat``,
            ``memory.stat``, ``io.stat``, ``memory.current``, ``memory.peak``, ``memory.max``,
            ``memory.events``, ``pids.current``, ``pids.max``); a missing one counts as empty.
    """
    cpu = flat_keyed(texts.get("cpu.stat", ""))
    memstat = flat_keyed(texts.get("memory.stat", ""))
    io = io_stat(texts.get("io.stat", ""))
    return CgroupStats(
        cpu_usage_usec=cpu.get("usage_usec", 0),
        cpu_user_usec=cpu.get("user_usec", 0),
        cpu_system_usec=cpu.get("system_usec", 0),
        nr_periods=cpu.get("nr_periods", 0),
        nr_throttled=cpu.get("nr_throttled", 0),
        throttled_usec=cpu.get("throttled_usec", 0),
        memory_current=int_or(texts.get("memory.current", "")),
        # memory.peak is Linux 5.19+.
        memory_peak=int_or(texts.get("memory.peak", "")),
        memory_anon=memstat.get("anon", 0),
        memory_file=memstat.get("file", 0),
        pgfault=memstat.get("pgfault", 0),
        pgmajfault=memstat.get("pgmajfault", 0),
        io_read_bytes=io["rbytes"],
        io_write_bytes=io["wbytes"],
        io_read_ops=io["rios"],
        io_write_ops=io["wios"],
        pids_current=int_or(texts.get("pids.current", "")),
        memory_limit=int_or(texts.get("memory.max", "")),  # "max": 0
        oom_kills=flat_keyed(texts.get("memory.events", "")).get("oom_kill", 0),
        pids_limit=int_or(texts.get("pids.max", "")),
    )


def v1_stats(texts: Mapping[str, str], *, clock_ticks: int) -> CgroupStats:
    """A v1 job group's usage from its files' texts, over all its hierarchies.

    Args:
        texts: File name to content for the files of the job's groups that exist (v1 file
            names are unique across controllers): ``cpu.stat``; ``cpuacct.usage``,
            ``cpuacct.usage_user``, ``cpuacct.usage_sys``, ``cpuacct.stat``; ``memory.stat``,
            ``memory.usage_in_bytes``, ``memory.max_usage_in_bytes``,
            ``memory.limit_in_bytes``, ``memory.oom_control``; the blkio
            ``blkio.throttle.io_service_bytes`` and ``blkio.throttle.io_serviced`` files (each
            also as ``..._recursive``, preferred when not empty); ``pids.current``,
            ``pids.max``. A missing one counts as empty.
        clock_ticks: Clock ticks per second (``SC_CLK_TCK``), the unit of ``cpuacct.stat``,
            used only without ``cpuacct.usage_user`` (kernels before 4.6).
    """

    def text(name: str) -> str:
        return texts.get(name, "")

    def blkio(name: str) -> tuple[int, int]:
        return blkio_rw(text(f"{name}_recursive") or text(name))

    cpu = flat_keyed(text("cpu.stat"))
    usage = int_or(text("cpuacct.usage")) // 1000
    if "cpuacct.usage_user" in texts:
        user = int_or(text("cpuacct.usage_user")) // 1000
        system = int_or(text("cpuacct.usage_sys")) // 1000
    else:
        ticks = flat_keyed(text("cpuacct.stat"))
        usec_per_tick = 1_000_000 // clock_ticks
        user = ticks.get("user", 0) * usec_per_tick
        system = ticks.get("system", 0) * usec_per_tick
    memstat = flat_keyed(text("memory.stat"))
    read_bytes, write_bytes = blkio("blkio.throttle.io_service_bytes")
    read_ops, write_ops = blkio("blkio.throttle.io_serviced")
    return CgroupStats(
        cpu_usage_usec=usage,
        cpu_user_usec=user,
        cpu_system_usec=system,
        nr_periods=cpu.get("nr_periods", 0),
        nr_throttled=cpu.get("nr_throttled", 0),
        throttled_usec=cpu.get("throttled_time", 0) // 1000,
        memory_current=int_or(text("memory.usage_in_bytes")),
        memory_peak=int_or(text("memory.max_usage_in_bytes")),
        # The total_* keys include sub-groups; the plain ones do not.
        memory_anon=memstat.get("total_rss", 0),
        memory_file=memstat.get("total_cache", 0),
        pgfault=memstat.get("total_pgfault", 0),
        pgmajfault=memstat.get("total_pgmajfault", 0),
        io_read_bytes=read_bytes,
        io_write_bytes=write_bytes,
        io_read_ops=read_ops,
        io_write_ops=write_ops,
        pids_current=int_or(text("pids.current")),
        memory_limit=v1_limit(int_or(text("memory.limit_in_bytes"))),
        oom_kills=flat_keyed(text("memory.oom_control")).get("oom_kill", 0),
        pids_limit=int_or(text("pids.max")),
    )
