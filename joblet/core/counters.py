"""The raw counters of a job, as plain data, and the parsers of the procfs text they come from.

A job's counters come from its cgroup (:class:`CgroupStats`, read by the cgroup drivers), from
its processes in ``/proc`` (:class:`ProcessCounts`) and from its network namespace
(:class:`NetCounters`). :mod:`joblet.sys.procfs` and :mod:`joblet.sys.cgroups` read the files;
what the text of a procfs file means is decided here, from strings, without I/O.
:mod:`joblet.core.samples` turns counters into samples.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class CgroupStats:
    """Resource usage of one job group (0 where the host does not report a value).

    Attributes:
        cpu_usage_usec: CPU time used, user plus system.
        cpu_user_usec: CPU time used in user mode.
        cpu_system_usec: CPU time used in kernel mode.
        nr_periods: CFS enforcement periods that have elapsed.
        nr_throttled: Periods in which the group was throttled.
        throttled_usec: Total time the group was throttled.
        memory_current: Memory in use now, in bytes.
        memory_peak: Most memory ever in use, in bytes.
        memory_anon: Anonymous memory, in bytes.
        memory_file: Page cache (including tmpfs), in bytes.
        pgfault: Page faults.
        pgmajfault: Major page faults.
        io_read_bytes: Bytes read from block devices.
        io_write_bytes: Bytes written to block devices.
        io_read_ops: Read operations on block devices.
        io_write_ops: Write operations on block devices.
        pids_current: Tasks (processes and threads) in the group now.
        memory_limit: The memory limit in bytes; 0 when unlimited.
        oom_kills: Processes of the group the kernel's OOM killer has killed.
        pids_limit: Most tasks the group may hold; 0 when unlimited.
    """

    cpu_usage_usec: int = 0
    cpu_user_usec: int = 0
    cpu_system_usec: int = 0
    nr_periods: int = 0
    nr_throttled: int = 0
    throttled_usec: int = 0
    memory_current: int = 0
    memory_peak: int = 0
    memory_anon: int = 0
    memory_file: int = 0
    pgfault: int = 0
    pgmajfault: int = 0
    io_read_bytes: int = 0
    io_write_bytes: int = 0
    io_read_ops: int = 0
    io_write_ops: int = 0
    pids_current: int = 0
    memory_limit: int = 0
    oom_kills: int = 0
    pids_limit: int = 0


@attrs.frozen
class ProcessCounts:
    """Processes of a job and what they hold.

    Attributes:
        processes: Processes that were alive when read.
        threads: Their threads (a single-threaded process counts one).
        open_fds: Their open file descriptors.
    """

    processes: int = 0
    threads: int = 0
    open_fds: int = 0


@attrs.frozen
class NetCounters:
    """Traffic of a network namespace since it was created, summed over its interfaces."""

    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    tx_packets: int = 0


def parse_net_dev(text: str) -> NetCounters:
    """Sum the counters of a ``/proc/net/dev`` table over its interfaces."""
    rx_bytes = tx_bytes = rx_packets = tx_packets = 0
    for line in text.splitlines()[2:]:  # two header lines
        _name, sep, rest = line.partition(":")
        fields = rest.split()
        if not sep or len(fields) < 10:
            continue
        try:
            rx_bytes += int(fields[0])
            rx_packets += int(fields[1])
            tx_bytes += int(fields[8])
            tx_packets += int(fields[9])
        except ValueError:
            continue
    return NetCounters(rx_bytes, tx_bytes, rx_packets, tx_packets)


def status_field(text: str, name: str) -> int:
    """A number field of a ``/proc/<pid>/status`` text (e.g. ``Threads``); 0 if absent or bad."""
    prefix = name + ":"
    for line in text.splitlines():
        if line.startswith(prefix):
            try:
                return int(line[len(prefix) :].split()[0])
            except (ValueError, IndexError):
                return 0
    return 0
