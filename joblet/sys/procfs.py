"""What a job's processes look like in ``/proc``: threads, open files, network counters.

This module reads ``/proc`` and enters namespaces; the counters it returns and the parsing of
the texts it reads are in :mod:`joblet.core.counters`.

The cgroup files (:mod:`joblet.sys.cgroups`) account CPU, memory and block I/O for a whole job;
what they do not count is read here from the job's processes. Every function tolerates processes
that exit while they are read (they are skipped) and is cheap enough to call once per sample.

A job's network namespace is held open by a file descriptor (:func:`open_net_namespace`): the
namespace, with its traffic counters, then outlives the job's last process, so the final sample
still has the job's final totals.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from joblet.core.counters import NetCounters, ProcessCounts, parse_net_dev, status_field

PROC = Path("/proc")
#: setns(2) flag of a network namespace.
CLONE_NEWNET = 0x40000000


def process_counts(pids: Iterable[int], proc: Path = PROC) -> ProcessCounts:
    """Count the threads and open file descriptors of ``pids``.

    Args:
        pids: Host PIDs (e.g. :meth:`joblet.sys.cgroups.CgroupDriver.pids`).
        proc: Where procfs is mounted.
    """
    processes = threads = fds = 0
    for pid in pids:
        try:
            status = (proc / str(pid) / "status").read_text()
            open_fds = len(os.listdir(proc / str(pid) / "fd"))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # exited meanwhile (or a zombie without fds)
        processes += 1
        threads += status_field(status, "Threads") or 1
        fds += open_fds
    return ProcessCounts(processes, threads, fds)


def has_own_net_namespace(pid: int, proc: Path = PROC) -> bool:
    """Whether ``pid`` lives in a network namespace other than this process's.

    Returns False too when ``pid`` no longer exists.
    """
    try:
        theirs = os.stat(proc / str(pid) / "ns" / "net")
        ours = os.stat(proc / "self" / "ns" / "net")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino)


def open_net_namespace(pid: int, proc: Path = PROC) -> int | None:
    """A file descriptor of ``pid``'s network namespace (close-on-exec); None if ``pid`` is gone.

    While it is open the namespace lives on, with its counters, after its last process exits.
    The caller closes it.
    """
    try:
        return os.open(proc / str(pid) / "ns" / "net", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None


def namespace_net_counters(ns_fd: int) -> NetCounters:
    """The traffic counters of the network namespace ``ns_fd`` refers to (blocking).

    Every interface counts, loopback included (an isolated job has nothing else, and its loopback
    traffic is its own). The namespace is entered by a short-lived thread of its own, which reads
    ``/proc/thread-self/net/dev`` and ends there: a namespace belongs to the thread that enters
    it, so no other code of the daemon ever runs in the job's namespace.

    Raises:
        OSError: The namespace cannot be entered (not root, not a network namespace).
    """
    result: list[str] = []
    failure: list[OSError] = []

    def enter_and_read() -> None:
        try:
            _setns(ns_fd, CLONE_NEWNET)
            result.append((PROC / "thread-self" / "net" / "dev").read_text())
        except OSError as e:
            failure.append(e)

    reader = threading.Thread(target=enter_and_read, name="joblet-netns-reader", daemon=True)
    reader.start()
    reader.join()
    if failure:
        raise failure[0]
    return parse_net_dev(result[0])


def _setns(fd: int, nstype: int) -> None:
    setns = getattr(os, "setns", None)  # Python 3.12+
    if setns is not None:
        setns(fd, nstype)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
