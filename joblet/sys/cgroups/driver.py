"""The cgroup driver interface and the behaviour both versions share.

:class:`CgroupDriver` is what the daemon uses; :mod:`joblet.sys.cgroups.v1` and
:mod:`joblet.sys.cgroups.v2` provide it for each cgroup version, and
:func:`~joblet.sys.cgroups.detect.detect_driver` picks one at start-up. Finding, signalling,
killing and removing a job's processes and groups is the same on both versions and lives here,
on top of what each backend names (:class:`KillFiles`).
"""

from __future__ import annotations

import abc
import errno
import math
import os
import posixpath
import signal
from pathlib import Path, PurePosixPath
from typing import ClassVar

import attrs
import trio

from joblet.config import CgroupSection
from joblet.core.counters import CgroupStats
from joblet.core.cpus import format_cpu_list, parse_cpu_list
from joblet.core.ids import is_job_id
from joblet.core.model import Limits
from joblet.sys.cgroups import files, parse

#: CFS period in microseconds; a quota of ``cpu_percent * 1000`` per period is that percentage of
#: one core.
CFS_PERIOD_US = 100_000
#: How often :meth:`CgroupDriver.kill_all` looks whether the kernel has emptied the group.
KILL_POLL_INTERVAL = 0.005
#: How long one kill round waits for the group to empty before it kills again (a process that
#: was forking while the group was read is caught by the next round).
KILL_ROUND = 0.2
#: Longest wait for a freezer to report FROZEN. A task in uninterruptible sleep (e.g. throttled
#: I/O) can hold a group in FREEZING; killing then still works, it is only no longer fork-proof.
FREEZE_WAIT = 0.05
#: The leaf group the daemon moves itself into when its own v2 group has to become an inner node
#: (cgroup v2 lets only leaves hold processes). Never reported as a job group.
DAEMON_LEAF = "joblet-daemon"
#: Bytes in a MiB (memory limits are given in MiB).
MIB = 1 << 20

# A job id becomes a directory name: one path component, never "." or "..".


class CgroupUnavailable(RuntimeError):
    """The host's cgroups cannot do what was asked (no usable hierarchy, a missing controller)."""


class CgroupDriver(abc.ABC):
    """What the daemon needs from cgroups, whatever the version.

    Attributes:
        version: 1 or 2.
    """

    version: ClassVar[int]

    def __init__(self, cfg: CgroupSection) -> None:
        self._root = Path(cfg.root)
        self._parent = posixpath.normpath(cfg.parent)

    # --- what each version provides ---------------------------------------------------------

    @abc.abstractmethod
    def setup(self) -> None:
        """Create the parent group(s), ready for job groups. Idempotent; run once at start-up.

        Raises:
            OSError: A group could not be created or configured.
            CgroupUnavailable: The configuration cannot work on this host.
        """

    @abc.abstractmethod
    def create(self, job_id: str, limits: Limits) -> None:
        """Create the job's group(s) and apply its limits; on failure nothing is left behind.

        Args:
            job_id: The job's id, which names the group.
            limits: The limits to apply.

        Raises:
            ValueError: The id or a limit is invalid (e.g. ``cpu_cores`` names CPUs the host
                does not have).
            CgroupUnavailable: A limit needs a controller the host does not offer.
            OSError: The kernel refused a group or a value (the message names the file).
        """

    @abc.abstractmethod
    def membership(self, job_id: str) -> list[tuple[str, str, str]]:
        """How a process joins the job's group(s) and checks that it did.

        Args:
            job_id: The job's id.

        Returns:
            One ``(join_file, controllers, expected_path)`` per group: a single-threaded process
            writes ``0`` (itself) or its PID to ``join_file``; then the line of
            ``/proc/self/cgroup`` whose controller field is ``controllers`` (``""`` on cgroup v2;
            on v1 as the line shows it, e.g. ``"memory"`` or ``"cpu,cpuacct"``) must show
            ``expected_path``. On cgroup v2 ``join_file`` is ``cgroup.procs``. On v1 it is the
            group's ``tasks`` file, which moves the writing thread only: written ``0``, the
            kernel then skips its global threadgroup lock, whose first taker after a quiet spell
            waits for an RCU grace period on every job start after an idle moment
            (``docs/performance.md``). A single-threaded process is moved whole; one with more
            threads would leave them behind, and must write its PID to ``cgroup.procs`` next
            to it instead.
        """

    @abc.abstractmethod
    def oom_killed(self, job_id: str) -> bool:
        """Whether the kernel's OOM killer killed a process of the job.

        Raises:
            OSError: The job's group does not exist.
        """

    @abc.abstractmethod
    def stats(self, job_id: str) -> CgroupStats:
        """The job's resource usage, read from its group(s).

        Raises:
            FileNotFoundError: The job's group does not exist.
        """

    @abc.abstractmethod
    def available_cpus(self) -> set[int]:
        """The CPUs a job's ``cpu_cores`` may name."""

    @abc.abstractmethod
    def parent_dirs(self) -> list[Path]:
        """The parent group's directory in each used hierarchy (one on cgroup v2)."""

    @abc.abstractmethod
    def _kill_files(self, job_id: str) -> KillFiles:
        """The files :meth:`kill_all` uses for the job."""

    # --- shared behaviour -------------------------------------------------------------------

    def _job_dirs(self, job_id: str) -> list[Path]:
        check_job_id(job_id)
        return [p / job_id for p in self.parent_dirs()]

    async def teardown(self) -> None:
        """Remove the parent group(s), for a daemon (or test harness) that leaves for good.

        Job groups still present are removed first; missing groups are not an error.

        Raises:
            OSError: A group still holds processes (kill the jobs first).
        """
        for name in await trio.to_thread.run_sync(self.job_groups):
            await self.remove(name)
        for parent in self.parent_dirs():
            if (parent / DAEMON_LEAF).exists():
                # We live in there (see V2Driver.setup): the parent has to stay.
                continue
            await files.rmdir(parent)

    def job_groups(self) -> list[str]:
        """Names of the job groups that exist under the parent (for recovery after a restart).

        Blocking (lists directories): async code runs it in a worker thread.
        """
        names: set[str] = set()
        for parent in self.parent_dirs():
            try:
                names.update(e.name for e in os.scandir(parent) if e.is_dir())
            except FileNotFoundError:
                continue
        names.discard(DAEMON_LEAF)
        return sorted(names)

    def pids(self, job_id: str) -> list[int]:
        """Every process in the job's group(s), sub-groups included, in PID order.

        Reads cgroupfs only, which lives in memory and never waits for a disk: a few system
        calls for a job's groups, cheaper than a worker-thread hop, so async code calls it on
        the event loop (``docs/performance.md``).
        """
        found: set[int] = set()
        for top in self._job_dirs(job_id):
            for d in files.tree(top):
                found.update(files.procs(d))
        return sorted(found)

    def signal_all(self, job_id: str, sig: int) -> None:
        """Send ``sig`` to every process of the job.

        A process that exits meanwhile is skipped, and a PID reused by a process outside the
        job is never signalled (see :meth:`_send`). cgroupfs reads and signals only (see
        :meth:`pids`).
        """
        for pid in self.pids(job_id):
            self._send(job_id, pid, sig)

    # A timeout argument rather than the caller's cancel scope: running out of time is an error
    # that names the survivors, and the caller's cleanup goes on after it.
    async def kill_all(self, job_id: str, timeout: float) -> None:  # noqa: ASYNC109
        """Kill every process of the job and wait until the group is empty.

        Uses ``cgroup.kill`` where the kernel has it (v2, Linux 5.14+), which no fork can escape.
        Otherwise freezes the group (so nothing can fork meanwhile), SIGKILLs every process,
        thaws it (frozen tasks die only when they run again), and repeats until no process is
        left. Returns at once for an empty or missing group.

        Args:
            job_id: The job's id.
            timeout: Longest time to try, in seconds.

        Raises:
            TimeoutError: Processes were still in the group after ``timeout`` (they are named).
        """
        deadline = trio.current_time() + timeout
        next_round = -math.inf
        while left := self.pids(job_id):
            now = trio.current_time()
            if now >= deadline:
                raise TimeoutError(
                    f"cgroup {job_id}: processes still alive after {timeout:g} s: "
                    + " ".join(map(str, left))
                )
            if now >= next_round:
                await self._kill_round(job_id, min(deadline, now + FREEZE_WAIT))
                next_round = trio.current_time() + KILL_ROUND
            await trio.sleep(KILL_POLL_INTERVAL)

    async def _kill_round(self, job_id: str, freeze_deadline: float) -> None:
        kill_files = self._kill_files(job_id)
        if kill_files.kill is not None:
            try:
                files.write(kill_files.kill, "1")
            except FileNotFoundError:
                pass  # the group is gone, and so are its processes
            return
        try:
            files.write(kill_files.freeze, kill_files.frozen)
        except FileNotFoundError:
            return  # the group is gone, and so are its processes
        try:
            while kill_files.state_frozen not in files.read_or(kill_files.state):
                if trio.current_time() >= freeze_deadline:
                    break
                await trio.sleep(KILL_POLL_INTERVAL)
            self.signal_all(job_id, signal.SIGKILL)
        finally:
            # Even when cancelled: a group left frozen would hold its processes forever.
            try:
                files.write(kill_files.freeze, kill_files.thawed)
            except FileNotFoundError:
                pass

    async def remove(self, job_id: str) -> None:
        """Remove the job's group(s), sub-groups first. A missing group is not an error.

        A group whose last process is still exiting is busy for a moment: its removal is retried
        (:data:`~joblet.sys.cgroups.files.RMDIR_ATTEMPTS`) while other tasks run.

        Raises:
            OSError: A group still holds processes (EBUSY): call :meth:`kill_all` first.
        """
        # The walk reads cgroupfs only (see pids); the waits between retries let other tasks run.
        groups = [d for top in self._job_dirs(job_id) for d in files.tree(top)]
        for d in reversed(groups):
            await files.rmdir(d)

    def _send(self, job_id: str, pid: int, sig: int) -> None:
        """Signal ``pid`` only if it is still a member of the job's group.

        The PID was read from ``cgroup.procs`` a moment ago; the process may have died and its
        PID been reused since. A pidfd pins the process we check, so the check and the signal
        are about the same process.
        """
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        except OSError as e:
            if e.errno == errno.EINVAL:
                return  # the process is being reaped right now: its PID no longer has a task
            if e.errno != errno.ENOSYS:
                raise
            # Linux < 5.3 has no pidfds: check, then signal by PID (a tiny reuse window remains).
            if self._is_member(job_id, pid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            return
        try:
            if self._is_member(job_id, pid):
                signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)

    def _is_member(self, job_id: str, pid: int) -> bool:
        try:
            text = Path(f"/proc/{pid}/cgroup").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return False
        lines = parse.proc_cgroup(text)
        for _procs_file, field, expected in self.membership(job_id):
            path = lines.get(field)
            if path is not None and (path == expected or path.startswith(expected + "/")):
                return True
        return False

    def _check_limits(self, job_id: str, limits: Limits, *, io: bool, cpuset: bool) -> None:
        """Refuse bad ids and limits before anything is created."""
        check_job_id(job_id)
        for name in ("cpu_percent", "memory_mb", "io_bps", "pids_max"):
            value = getattr(limits, name)
            if value < 0:
                raise ValueError(f"invalid {name}: {value} (must be >= 0; 0 means unlimited)")
        if limits.io_bps and not io:
            raise CgroupUnavailable(
                f"an I/O limit needs the {'blkio' if self.version == 1 else 'io'} cgroup "
                "controller, which this host does not offer"
            )
        if limits.cpu_cores:
            if not cpuset:
                raise CgroupUnavailable(
                    "cpu_cores needs the cpuset cgroup controller, which this host does not offer"
                )
            try:
                wanted = parse_cpu_list(limits.cpu_cores.strip())
            except ValueError as e:
                raise ValueError(f"invalid cpu_cores: {e}") from None
            available = self.available_cpus()
            if not wanted <= available:
                raise ValueError(
                    f"invalid cpu_cores {limits.cpu_cores!r}: CPUs "
                    f"{format_cpu_list(wanted - available)} are not available on "
                    f"this host (available: {format_cpu_list(available)})"
                )


@attrs.frozen
class KillFiles:
    """The files one kill round uses.

    Attributes:
        kill: ``cgroup.kill`` of the group (v2, Linux 5.14+), or None.
        freeze: The file that freezes the group (v1 ``freezer.state``, v2 ``cgroup.freeze``).
        frozen: What to write there to freeze.
        thawed: What to write there to thaw.
        state: The file that tells whether the group is frozen yet.
        state_frozen: What ``state`` contains once it is.
    """

    kill: Path | None
    freeze: Path
    frozen: str
    thawed: str
    state: Path
    state_frozen: str


def check_job_id(job_id: str) -> None:
    """Refuse an id that cannot name a job group (not one path component, or ours).

    Raises:
        ValueError: It cannot.
    """
    if not is_job_id(job_id) or job_id == DAEMON_LEAF:
        raise ValueError(f"invalid job id for a cgroup name: {job_id!r}")


def check_parent(parent: str) -> None:
    parts = PurePosixPath(parent).parts
    if not parts or parent.startswith("/") or any(p in (".", "..") for p in parts):
        raise CgroupUnavailable(
            f"invalid cgroup.parent {parent!r}: expected a relative path such as 'joblet'"
        )
