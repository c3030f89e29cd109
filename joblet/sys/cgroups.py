"""cgroup drivers: one interface, a cgroup v1 and a cgroup v2 backend, chosen at start-up.

Every job gets a group named exactly its id under the daemon's parent group (``cgroup.parent``,
``joblet`` by default): ``<root>/joblet/<id>`` on cgroup v2, and ``<root>/<hierarchy>/joblet/<id>``
in each used controller hierarchy on cgroup v1. The driver creates the groups and writes the limits;
the job's stage-1 helper joins them itself (it writes ``0``, itself, to every file that
:meth:`CgroupDriver.membership` names and checks ``/proc/self/cgroup``), so nothing the job runs
can start outside its limits.

No limit is ever silently dropped: a limit that needs a controller the host does not offer makes
:meth:`CgroupDriver.create` fail. Everything here is synchronous file I/O on cgroupfs (which does
not block), except what may wait: :meth:`CgroupDriver.kill_all` and :meth:`CgroupDriver.remove`
wait for the kernel, and walks of a group tree run in a worker thread, so they are async.

Example::

    driver = detect_driver(config.cgroup)
    driver.setup()
    driver.create(job_id, limits)
    spawn_stage1(membership=driver.membership(job_id))
    ...
    await driver.kill_all(job_id, timeout=5.0)
    oom = driver.oom_killed(job_id)
    await driver.remove(job_id)
"""

from __future__ import annotations

import abc
import errno
import math
import os
import posixpath
import re
import signal
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import ClassVar

import attrs
import trio

from joblet.config import CgroupSection
from joblet.core.model import Limits
from joblet.sys.devices import block_device_numbers

#: CFS period in microseconds; a quota of ``cpu_percent * 1000`` per period is that percentage of
#: one core.
CFS_PERIOD_US = 100_000
#: ``memory.high`` (v2) as a percentage of ``memory.max``. At 100 the kernel reclaims (page cache
#: first) when the job reaches its limit and OOM-kills it when nothing is left to reclaim. Below
#: 100, a job whose anonymous memory grows past ``memory.high`` is throttled, never OOM-killed,
#: and stalls until ``jobTimeout``: seen in the v2 VM at 95% (64 MiB limit, 200 MB allocation:
#: stuck at 65.5 MB for over a minute with ``memory.events`` high 161, oom_kill 0).
MEMORY_HIGH_PERCENT = 100
#: How often :meth:`CgroupDriver.kill_all` looks whether the kernel has emptied the group.
KILL_POLL_INTERVAL = 0.005
#: How long one kill round waits for the group to empty before it kills again (a process that
#: was forking while the group was read is caught by the next round).
KILL_ROUND = 0.2
#: Longest wait for a freezer to report FROZEN. A task in uninterruptible sleep (e.g. throttled
#: I/O) can hold a group in FREEZING; killing then still works, it is only no longer fork-proof.
FREEZE_WAIT = 0.05
#: ``rmdir`` of a group whose last task is still being torn down can fail with EBUSY for a moment.
RMDIR_ATTEMPTS = 20
RMDIR_RETRY_DELAY = 0.002
#: The leaf group the daemon moves itself into when its own v2 group has to become an inner node
#: (cgroup v2 lets only leaves hold processes). Never reported as a job group.
DAEMON_LEAF = "joblet-daemon"

#: cgroup v1 controllers without which the v1 driver is unavailable.
V1_REQUIRED: tuple[str, ...] = ("cpu", "memory", "pids", "freezer")
#: Every v1 controller used when mounted (a limit that needs a missing one, blkio for io_bps or
#: cpuset for cpu_cores, fails), in the order the stage-1 helper joins them. cpuset first: it is
#: the one most likely to refuse a task (no cpus/mems), and an early failure leaves less to undo.
V1_CONTROLLERS: tuple[str, ...] = ("cpuset", "cpu", "cpuacct", "memory", "blkio", "pids", "freezer")
#: cgroup v2 controllers without which the v2 driver is unavailable.
V2_REQUIRED: tuple[str, ...] = ("cpu", "memory", "pids")
#: Every v2 controller enabled for job groups when available (freezing and killing a group need
#: no controller on v2).
V2_CONTROLLERS: tuple[str, ...] = ("cpuset", "cpu", "io", "memory", "pids")

_MIB = 1 << 20
#: v1 shows an unlimited memory limit as a huge number (about 2**63, rounded down to pages).
_V1_UNLIMITED = 1 << 62
# A job id becomes a directory name: one path component, never "." or "..".
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_CPU_LIST = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")


class CgroupUnavailable(RuntimeError):
    """The host's cgroups cannot do what was asked (no usable hierarchy, a missing controller)."""


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


def detect_driver(cfg: CgroupSection) -> CgroupDriver:
    """Pick the cgroup driver for this host.

    ``auto`` takes cgroup v2 when ``<root>/cgroup.controllers`` offers cpu, memory and pids, else
    cgroup v1 when its hierarchies are mounted under ``<root>``; ``v1`` and ``v2`` force a driver
    (and fail if the host does not have it).

    Args:
        cfg: The ``cgroup`` config section.

    Returns:
        A driver; call :meth:`CgroupDriver.setup` before creating job groups.

    Raises:
        CgroupUnavailable: The requested driver (or, for ``auto``, neither) can work on this host,
            or ``cfg.driver`` is not one of auto, v1, v2.
    """
    _check_parent(cfg.parent)
    if cfg.driver == "v2":
        return V2Driver.probe(cfg)
    if cfg.driver == "v1":
        return V1Driver.probe(cfg)
    if cfg.driver != "auto":
        raise CgroupUnavailable(f"invalid cgroup.driver {cfg.driver!r}: expected auto, v1 or v2")
    try:
        return V2Driver.probe(cfg)
    except CgroupUnavailable as v2_error:
        try:
            return V1Driver.probe(cfg)
        except CgroupUnavailable as v1_error:
            raise CgroupUnavailable(
                f"no usable cgroup hierarchy under {cfg.root}: {v2_error}; {v1_error}"
            ) from None


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
            waits for an RCU grace period (7-15 ms here, on every job start after an idle
            moment). A single-threaded process is moved whole; one with more threads would
            leave them behind, and must write its PID to ``cgroup.procs`` next to it instead.
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
    def _kill_files(self, job_id: str) -> _KillFiles:
        """The files :meth:`kill_all` uses for the job."""

    # --- shared behaviour -------------------------------------------------------------------

    def _job_dirs(self, job_id: str) -> list[Path]:
        _check_job_id(job_id)
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
            await _rmdir(parent)

    def job_groups(self) -> list[str]:
        """Names of the job groups that exist under the parent (for recovery after a restart)."""
        names: set[str] = set()
        for parent in self.parent_dirs():
            try:
                names.update(e.name for e in os.scandir(parent) if e.is_dir())
            except FileNotFoundError:
                continue
        names.discard(DAEMON_LEAF)
        return sorted(names)

    def pids(self, job_id: str) -> list[int]:
        """Every process in the job's group(s), sub-groups included, in PID order."""
        found: set[int] = set()
        for top in self._job_dirs(job_id):
            for d in _tree(top):
                found.update(_procs(d))
        return sorted(found)

    def signal_all(self, job_id: str, sig: int) -> None:
        """Send ``sig`` to every process of the job.

        A process that exits meanwhile is skipped, and a PID reused by a process outside the
        job is never signalled (see :meth:`_send`).
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
        while left := await trio.to_thread.run_sync(self.pids, job_id):
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
        files = self._kill_files(job_id)
        if files.kill is not None:
            try:
                _write(files.kill, "1")
            except FileNotFoundError:
                pass  # the group is gone, and so are its processes
            return
        try:
            _write(files.freeze, files.frozen)
        except FileNotFoundError:
            return  # the group is gone, and so are its processes
        try:
            while files.state_frozen not in _read_or(files.state):
                if trio.current_time() >= freeze_deadline:
                    break
                await trio.sleep(KILL_POLL_INTERVAL)
            await trio.to_thread.run_sync(self.signal_all, job_id, signal.SIGKILL)
        finally:
            # Even when cancelled: a group left frozen would hold its processes forever.
            try:
                _write(files.freeze, files.thawed)
            except FileNotFoundError:
                pass

    async def remove(self, job_id: str) -> None:
        """Remove the job's group(s), sub-groups first. A missing group is not an error.

        A group whose last process is still exiting is busy for a moment: its removal is retried
        (:data:`RMDIR_ATTEMPTS`) while other tasks run.

        Raises:
            OSError: A group still holds processes (EBUSY): call :meth:`kill_all` first.
        """
        for top in self._job_dirs(job_id):
            for d in reversed(await trio.to_thread.run_sync(_tree, top)):
                await _rmdir(d)

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
        lines = _cgroup_lines(text)
        for _procs_file, field, expected in self.membership(job_id):
            path = lines.get(field)
            if path is not None and (path == expected or path.startswith(expected + "/")):
                return True
        return False

    def _check_limits(self, job_id: str, limits: Limits, *, io: bool, cpuset: bool) -> None:
        """Refuse bad ids and limits before anything is created."""
        _check_job_id(job_id)
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
                wanted = parse_cpu_list(limits.cpu_cores)
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
class _KillFiles:
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


# --- cgroup v1 ------------------------------------------------------------------------------


@attrs.frozen
class Hierarchy:
    """One mounted cgroup v1 hierarchy.

    Attributes:
        controllers: The controllers we use that are bound to it (``("cpu", "cpuacct")`` when
            co-mounted).
        mount: Its mount point, symlinks resolved (``/sys/fs/cgroup/cpu`` may be a link to
            ``/sys/fs/cgroup/cpu,cpuacct``).
        mount_root: The group the mount shows as its top, as paths in ``/proc/<pid>/cgroup``
            name it (``/`` unless the hierarchy is mounted from a sub-group, as in containers).
        field: The hierarchy's controller field in ``/proc/self/cgroup``, e.g. ``cpu,cpuacct``.
    """

    controllers: tuple[str, ...]
    mount: Path
    mount_root: str
    field: str


class V1Driver(CgroupDriver):
    """cgroup v1: one group per job in each of the cpu, cpuacct, memory, blkio, pids, cpuset and
    freezer hierarchies (a co-mounted ``cpu,cpuacct`` hierarchy is one group)."""

    version = 1

    def __init__(self, cfg: CgroupSection, hierarchies: dict[str, Hierarchy]) -> None:
        """Use :meth:`probe` or :func:`detect_driver` instead."""
        super().__init__(cfg)
        self._by_controller = hierarchies
        # Each hierarchy once, in join order (a co-mounted cpu,cpuacct is one entry).
        self._hierarchies = list(
            dict.fromkeys(hierarchies[c] for c in V1_CONTROLLERS if c in hierarchies)
        )

    @classmethod
    def probe(cls, cfg: CgroupSection) -> V1Driver:
        """The v1 driver, if the needed hierarchies are mounted under ``cfg.root``.

        Raises:
            CgroupUnavailable: cpu, memory, pids or freezer is not mounted.
        """
        hierarchies = _v1_hierarchies(Path(cfg.root))
        missing = [c for c in V1_REQUIRED if c not in hierarchies]
        if missing:
            raise CgroupUnavailable(
                f"cgroup v1: no {', '.join(missing)} hierarchy mounted under {cfg.root}"
            )
        return cls(cfg, hierarchies)

    @property
    def hierarchies(self) -> list[Hierarchy]:
        """The hierarchies in use, each once."""
        return list(self._hierarchies)

    def parent_dirs(self) -> list[Path]:
        """See :meth:`CgroupDriver.parent_dirs`."""
        return [h.mount / self._parent for h in self._hierarchies]

    def _dir(self, controller: str, job_id: str) -> Path:
        return self._by_controller[controller].mount / self._parent / job_id

    def setup(self) -> None:
        """Create the parent group in every used hierarchy.

        In the cpuset hierarchy a new group starts with no CPUs and no memory nodes, and no task
        can join it until both are set; they are copied from the level above at every level.
        """
        for h in self._hierarchies:
            level = h.mount
            for part in PurePosixPath(self._parent).parts:
                upper, level = level, level / part
                try:
                    level.mkdir()
                except FileExistsError:
                    pass
                if "cpuset" in h.controllers:
                    _inherit_cpuset(upper, level)

    def create(self, job_id: str, limits: Limits) -> None:
        """See :meth:`CgroupDriver.create`."""
        self._check_limits(
            job_id,
            limits,
            io="blkio" in self._by_controller,
            cpuset="cpuset" in self._by_controller,
        )
        created: list[Path] = []
        try:
            for d in self._job_dirs(job_id):
                d.mkdir()
                created.append(d)
            self._apply(job_id, limits)
        except BaseException:
            for d in reversed(created):
                _rmdir_quietly(d)
            raise

    def _apply(self, job_id: str, limits: Limits) -> None:
        cpu = self._dir("cpu", job_id)
        _write(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
        quota = limits.cpu_percent * CFS_PERIOD_US // 100
        _write(cpu / "cpu.cfs_quota_us", str(quota) if quota else "-1")

        if limits.memory_mb:
            mem = self._dir("memory", job_id)
            limit = str(limits.memory_mb * _MIB)
            # memory.limit_in_bytes may never exceed memsw, so the plain limit goes first when
            # lowering (a new group starts at "unlimited" for both).
            _write(mem / "memory.limit_in_bytes", limit)
            if (mem / "memory.memsw.limit_in_bytes").exists():
                # memory + swap: without it a job could swap out past its limit.
                _write(mem / "memory.memsw.limit_in_bytes", limit)
            else:
                # No swap accounting (swapaccount=0): forbid this group to swap at all.
                _write(mem / "memory.swappiness", "0")

        if limits.io_bps:
            blkio = self._dir("blkio", job_id)
            for dev in block_device_numbers():
                _write(blkio / "blkio.throttle.read_bps_device", f"{dev} {limits.io_bps}")
                _write(blkio / "blkio.throttle.write_bps_device", f"{dev} {limits.io_bps}")

        if "cpuset" in self._by_controller:
            cpuset = self._dir("cpuset", job_id)
            _inherit_cpuset(cpuset.parent, cpuset, cpus=limits.cpu_cores)

        _write(self._dir("pids", job_id) / "pids.max", str(limits.pids_max or "max"))

    def membership(self, job_id: str) -> list[tuple[str, str, str]]:
        """See :meth:`CgroupDriver.membership`."""
        _check_job_id(job_id)
        return [
            (
                # Not cgroup.procs: see CgroupDriver.membership.
                str(h.mount / self._parent / job_id / "tasks"),
                h.field,
                posixpath.join(h.mount_root, self._parent, job_id),
            )
            for h in self._hierarchies
        ]

    def oom_killed(self, job_id: str) -> bool:
        """See :meth:`CgroupDriver.oom_killed` (reads ``memory.oom_control``)."""
        text = (self._dir("memory", job_id) / "memory.oom_control").read_text()
        return _flat_keyed(text).get("oom_kill", 0) > 0

    def stats(self, job_id: str) -> CgroupStats:
        """See :meth:`CgroupDriver.stats`."""
        mem = self._dir("memory", job_id)
        if not mem.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such job cgroup", str(mem))
        cpu = _flat_keyed(_read_or(self._dir("cpu", job_id) / "cpu.stat"))
        usage = user = system = 0
        if "cpuacct" in self._by_controller:
            acct = self._dir("cpuacct", job_id)
            usage = _int_or(_read_or(acct / "cpuacct.usage")) // 1000
            if (acct / "cpuacct.usage_user").exists():
                user = _int_or(_read_or(acct / "cpuacct.usage_user")) // 1000
                system = _int_or(_read_or(acct / "cpuacct.usage_sys")) // 1000
            else:
                ticks = _flat_keyed(_read_or(acct / "cpuacct.stat"))
                usec_per_tick = 1_000_000 // os.sysconf("SC_CLK_TCK")
                user = ticks.get("user", 0) * usec_per_tick
                system = ticks.get("system", 0) * usec_per_tick
        memstat = _flat_keyed(_read_or(mem / "memory.stat"))
        read_bytes = write_bytes = read_ops = write_ops = 0
        if "blkio" in self._by_controller:
            blkio = self._dir("blkio", job_id)
            read_bytes, write_bytes = _blkio_rw(blkio, "blkio.throttle.io_service_bytes")
            read_ops, write_ops = _blkio_rw(blkio, "blkio.throttle.io_serviced")
        return CgroupStats(
            cpu_usage_usec=usage,
            cpu_user_usec=user,
            cpu_system_usec=system,
            nr_periods=cpu.get("nr_periods", 0),
            nr_throttled=cpu.get("nr_throttled", 0),
            throttled_usec=cpu.get("throttled_time", 0) // 1000,
            memory_current=_int_or(_read_or(mem / "memory.usage_in_bytes")),
            memory_peak=_int_or(_read_or(mem / "memory.max_usage_in_bytes")),
            # The total_* keys include sub-groups; the plain ones do not.
            memory_anon=memstat.get("total_rss", 0),
            memory_file=memstat.get("total_cache", 0),
            pgfault=memstat.get("total_pgfault", 0),
            pgmajfault=memstat.get("total_pgmajfault", 0),
            io_read_bytes=read_bytes,
            io_write_bytes=write_bytes,
            io_read_ops=read_ops,
            io_write_ops=write_ops,
            pids_current=_int_or(_read_or(self._dir("pids", job_id) / "pids.current")),
            memory_limit=_v1_limit(_int_or(_read_or(mem / "memory.limit_in_bytes"))),
            oom_kills=_flat_keyed(_read_or(mem / "memory.oom_control")).get("oom_kill", 0),
            pids_limit=_int_or(_read_or(self._dir("pids", job_id) / "pids.max")),
        )

    def available_cpus(self) -> set[int]:
        """The CPUs of the parent cpuset group (all online CPUs when cpuset is not mounted)."""
        if "cpuset" not in self._by_controller:
            return _online_cpus()
        top = self._by_controller["cpuset"].mount
        for d in (top / self._parent, top):
            text = _read_or(d / "cpuset.effective_cpus") or _read_or(d / "cpuset.cpus")
            if text.strip():
                return parse_cpu_list(text.strip())
        return _online_cpus()

    def _kill_files(self, job_id: str) -> _KillFiles:
        state = self._dir("freezer", job_id) / "freezer.state"
        return _KillFiles(
            kill=None,
            freeze=state,
            frozen="FROZEN",
            thawed="THAWED",
            state=state,
            state_frozen="FROZEN",
        )


def _v1_hierarchies(root: Path) -> dict[str, Hierarchy]:
    """Map each v1 controller we use to its hierarchy, as mounted under ``root``."""
    mounts = {m.point: m for m in _mounts() if m.fstype == "cgroup"}
    fields = [f for f in _cgroup_lines(_read_or(Path("/proc/self/cgroup"))) if f]
    by_point: dict[str, list[str]] = {}
    for c in V1_CONTROLLERS:
        d = root / c
        if not (d / "cgroup.procs").is_file():
            continue
        point = os.path.realpath(d)
        m = mounts.get(point)
        if m is not None and c not in m.options:
            continue  # a directory that happens to be called like the controller
        by_point.setdefault(point, []).append(c)
    result: dict[str, Hierarchy] = {}
    for point, controllers in by_point.items():
        m = mounts.get(point)
        field = next(
            (f for f in fields if controllers[0] in f.split(",")),
            ",".join(controllers),
        )
        h = Hierarchy(
            controllers=tuple(controllers),
            mount=Path(point),
            mount_root=m.root if m is not None else "/",
            field=field,
        )
        for c in controllers:
            result[c] = h
    return result


def _inherit_cpuset(upper: Path, group: Path, *, cpus: str = "") -> None:
    """Fill a v1 cpuset group's empty cpus and mems from the group above (cpus from ``cpus``)."""
    for name, value in (("cpuset.cpus", cpus), ("cpuset.mems", "")):
        if not value and _read_or(group / name).strip():
            continue  # already set: keep what an administrator chose for the parent
        _write(group / name, value or _read_or(upper / name).strip())


def _v1_limit(value: int) -> int:
    """A v1 byte limit, 0 for "unlimited" (the kernel shows PAGE_COUNTER_MAX pages in bytes)."""
    return 0 if value >= _V1_UNLIMITED else value


def _blkio_rw(group: Path, name: str) -> tuple[int, int]:
    """Sum the Read and Write lines of a blkio stat file over all devices."""
    text = _read_or(group / f"{name}_recursive") or _read_or(group / name)
    read = write = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "Read":
            read += _int_or(parts[2])
        elif len(parts) == 3 and parts[1] == "Write":
            write += _int_or(parts[2])
    return read, write


# --- cgroup v2 ------------------------------------------------------------------------------


class V2Driver(CgroupDriver):
    """cgroup v2: one group per job under the parent, with the needed controllers enabled in
    ``cgroup.subtree_control`` all the way down from the root."""

    version = 2

    def __init__(self, cfg: CgroupSection, available: frozenset[str], mount_root: str) -> None:
        """Use :meth:`probe` or :func:`detect_driver` instead."""
        super().__init__(cfg)
        self._controllers = tuple(c for c in V2_CONTROLLERS if c in available)
        self._mount_root = mount_root

    @classmethod
    def probe(cls, cfg: CgroupSection) -> V2Driver:
        """The v2 driver, if ``cfg.root`` is a cgroup v2 hierarchy with cpu, memory and pids.

        Raises:
            CgroupUnavailable: It is not, or a needed controller is bound elsewhere (to v1).
        """
        root = Path(cfg.root)
        try:
            available = frozenset((root / "cgroup.controllers").read_text().split())
        except FileNotFoundError:
            raise CgroupUnavailable(
                f"cgroup v2: {root} is not a cgroup v2 hierarchy (no cgroup.controllers)"
            ) from None
        missing = [c for c in V2_REQUIRED if c not in available]
        if missing:
            raise CgroupUnavailable(
                f"cgroup v2: controllers {', '.join(missing)} are not available in {root} "
                "(bound to cgroup v1 hierarchies?)"
            )
        point = os.path.realpath(root)
        mount_root = next(
            (m.root for m in reversed(_mounts()) if m.point == point and m.fstype == "cgroup2"),
            "/",
        )
        return cls(cfg, available, mount_root)

    @property
    def controllers(self) -> tuple[str, ...]:
        """The controllers enabled for job groups."""
        return self._controllers

    def parent_dirs(self) -> list[Path]:
        """See :meth:`CgroupDriver.parent_dirs`."""
        return [self._root / self._parent]

    def setup(self) -> None:
        """Create the parent group and enable the controllers on every level down to it.

        cgroup v2 lets a group with controllers enabled for its children hold no processes
        itself (except the root). If a group on the way is the daemon's own, the daemon first
        moves to a leaf group inside it (:data:`DAEMON_LEAF`).

        Raises:
            CgroupUnavailable: A group on the way holds other processes than the daemon.
        """
        level = self._root
        self._enable(level)
        for part in PurePosixPath(self._parent).parts:
            level = level / part
            try:
                level.mkdir()
            except FileExistsError:
                pass
            self._enable(level)

    def _enable(self, group: Path) -> None:
        have = set(_read_or(group / "cgroup.subtree_control").split())
        missing = [c for c in self._controllers if c not in have]
        if not missing:
            return
        value = " ".join(f"+{c}" for c in missing)
        try:
            _write(group / "cgroup.subtree_control", value)
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
        # EBUSY: the group holds processes (the no-internal-processes rule).
        procs = set(_procs(group))
        me = os.getpid()
        if me in procs:
            leaf = group / DAEMON_LEAF
            try:
                leaf.mkdir()
            except FileExistsError:
                pass
            _write(leaf / "cgroup.procs", str(me))
            procs = set(_procs(group))
        if procs:
            raise CgroupUnavailable(
                f"cgroup v2: cannot enable controllers in {group}: it holds processes "
                f"{' '.join(map(str, sorted(procs)))} and only leaf groups may; move them to a "
                "leaf group or choose another cgroup.parent"
            )
        _write(group / "cgroup.subtree_control", value)

    def create(self, job_id: str, limits: Limits) -> None:
        """See :meth:`CgroupDriver.create`."""
        self._check_limits(
            job_id, limits, io="io" in self._controllers, cpuset="cpuset" in self._controllers
        )
        (group,) = self._job_dirs(job_id)
        group.mkdir()
        try:
            self._apply(group, limits)
        except BaseException:
            _rmdir_quietly(group)
            raise

    def _apply(self, group: Path, limits: Limits) -> None:
        quota = limits.cpu_percent * CFS_PERIOD_US // 100
        _write(group / "cpu.max", f"{quota or 'max'} {CFS_PERIOD_US}")
        if limits.memory_mb:
            limit = limits.memory_mb * _MIB
            _write(group / "memory.max", str(limit))
            _write(group / "memory.high", str(limit * MEMORY_HIGH_PERCENT // 100))
            if (group / "memory.swap.max").exists():
                # Swap is not part of memory.max: without this a job could swap past its limit.
                _write(group / "memory.swap.max", "0")
        else:
            _write(group / "memory.max", "max")
            _write(group / "memory.high", "max")
        if limits.io_bps:
            for dev in block_device_numbers():
                _write(group / "io.max", f"{dev} rbps={limits.io_bps} wbps={limits.io_bps}")
        if limits.cpu_cores:
            _write(group / "cpuset.cpus", limits.cpu_cores)
        _write(group / "pids.max", str(limits.pids_max or "max"))

    def membership(self, job_id: str) -> list[tuple[str, str, str]]:
        """See :meth:`CgroupDriver.membership`."""
        (group,) = self._job_dirs(job_id)
        return [
            (
                str(group / "cgroup.procs"),
                "",
                posixpath.join(self._mount_root, self._parent, job_id),
            )
        ]

    def oom_killed(self, job_id: str) -> bool:
        """See :meth:`CgroupDriver.oom_killed` (reads ``memory.events``, sub-groups included)."""
        (group,) = self._job_dirs(job_id)
        return _flat_keyed((group / "memory.events").read_text()).get("oom_kill", 0) > 0

    def stats(self, job_id: str) -> CgroupStats:
        """See :meth:`CgroupDriver.stats`."""
        (group,) = self._job_dirs(job_id)
        if not group.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such job cgroup", str(group))
        cpu = _flat_keyed(_read_or(group / "cpu.stat"))
        memstat = _flat_keyed(_read_or(group / "memory.stat"))
        io = {"rbytes": 0, "wbytes": 0, "rios": 0, "wios": 0}
        for line in _read_or(group / "io.stat").splitlines():
            for item in line.split()[1:]:
                key, _, value = item.partition("=")
                if key in io:
                    io[key] += _int_or(value)
        return CgroupStats(
            cpu_usage_usec=cpu.get("usage_usec", 0),
            cpu_user_usec=cpu.get("user_usec", 0),
            cpu_system_usec=cpu.get("system_usec", 0),
            nr_periods=cpu.get("nr_periods", 0),
            nr_throttled=cpu.get("nr_throttled", 0),
            throttled_usec=cpu.get("throttled_usec", 0),
            memory_current=_int_or(_read_or(group / "memory.current")),
            # memory.peak is Linux 5.19+.
            memory_peak=_int_or(_read_or(group / "memory.peak")),
            memory_anon=memstat.get("anon", 0),
            memory_file=memstat.get("file", 0),
            pgfault=memstat.get("pgfault", 0),
            pgmajfault=memstat.get("pgmajfault", 0),
            io_read_bytes=io["rbytes"],
            io_write_bytes=io["wbytes"],
            io_read_ops=io["rios"],
            io_write_ops=io["wios"],
            pids_current=_int_or(_read_or(group / "pids.current")),
            memory_limit=_int_or(_read_or(group / "memory.max")),  # "max": 0
            oom_kills=_flat_keyed(_read_or(group / "memory.events")).get("oom_kill", 0),
            pids_limit=_int_or(_read_or(group / "pids.max")),
        )

    def available_cpus(self) -> set[int]:
        """The effective CPUs of the parent group (all online CPUs without cpuset)."""
        for d in (self._root / self._parent, self._root):
            text = _read_or(d / "cpuset.cpus.effective").strip()
            if text:
                return parse_cpu_list(text)
        return _online_cpus()

    def _kill_files(self, job_id: str) -> _KillFiles:
        (group,) = self._job_dirs(job_id)
        kill = group / "cgroup.kill"
        return _KillFiles(
            # cgroup.kill (5.14+) kills the whole subtree at once, fork-proof: no freeze needed.
            kill=kill if kill.exists() else None,
            freeze=group / "cgroup.freeze",
            frozen="1",
            thawed="0",
            state=group / "cgroup.events",
            state_frozen="frozen 1",
        )


# --- helpers --------------------------------------------------------------------------------


def parse_cpu_list(text: str) -> set[int]:
    """Parse a kernel CPU list such as ``"0-2,4"``.

    Raises:
        ValueError: The text is not a CPU list.
    """
    text = text.strip()
    if not _CPU_LIST.fullmatch(text):
        raise ValueError(f"invalid cpu list {text!r} (expected e.g. '0-1' or '0,2')")
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if last < first:
            raise ValueError(f"invalid cpu list {text!r} (range {part} is backwards)")
        cpus.update(range(first, last + 1))
    return cpus


def format_cpu_list(cpus: Iterable[int]) -> str:
    """Format CPUs the kernel's way (``{0, 1, 2, 4}`` -> ``"0-2,4"``)."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and ranges[-1][1] == cpu - 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def _online_cpus() -> set[int]:
    text = _read_or(Path("/sys/devices/system/cpu/online")).strip()
    return parse_cpu_list(text) if text else set(os.sched_getaffinity(0))


def _check_job_id(job_id: str) -> None:
    if not _JOB_ID.fullmatch(job_id) or job_id == DAEMON_LEAF:
        raise ValueError(f"invalid job id for a cgroup name: {job_id!r}")


def _check_parent(parent: str) -> None:
    parts = PurePosixPath(parent).parts
    if not parts or parent.startswith("/") or any(p in (".", "..") for p in parts):
        raise CgroupUnavailable(
            f"invalid cgroup.parent {parent!r}: expected a relative path such as 'joblet'"
        )


def _write(path: Path, value: str) -> None:
    """Write one value to a cgroup file in a single write(2), as cgroupfs wants.

    No O_CREAT: a misspelt or missing control file is an error, never a new regular file.

    Raises:
        OSError: With the file and the value in the message (the kernel only gives an errno).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror}: writing {value!r} to {path}") from e


def _read_or(path: Path, default: str = "") -> str:
    """A cgroup file's text, or ``default`` when it (or its group) does not exist."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return default
    except OSError as e:
        # ENODEV: the group was removed while the file was open.
        if e.errno == errno.ENODEV:
            return default
        raise


def _int_or(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        return 0


def _flat_keyed(text: str) -> dict[str, int]:
    """Parse ``key value`` lines (cpu.stat, memory.stat, memory.events, oom_control...)."""
    result: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        result[key] = _int_or(value)
    return result


def _procs(group: Path) -> list[int]:
    return [int(p) for p in _read_or(group / "cgroup.procs").split()]


def _tree(top: Path) -> list[Path]:
    """``top`` and every group below it, parents before children; [] when ``top`` is missing."""
    if not top.is_dir():
        return []
    found = [top]
    for dirpath, dirnames, _files in os.walk(top):
        found.extend(Path(dirpath, d) for d in dirnames)
    return found


async def _rmdir(group: Path) -> None:
    """Remove an empty group; missing is fine, EBUSY is retried briefly.

    Between attempts the loop runs other tasks (a worker thread would hold a thread token for
    the whole wait and could not be cancelled); each attempt is one rmdir(2) on cgroupfs, which
    never waits for a disk.

    Raises:
        OSError: EBUSY after :data:`RMDIR_ATTEMPTS` attempts, or any other error at once.
    """
    for _ in range(RMDIR_ATTEMPTS - 1):
        if _try_rmdir(group):
            return
        # The last task may still be leaving the group (its exit is not complete yet).
        await trio.sleep(RMDIR_RETRY_DELAY)
    if not _try_rmdir(group):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(group))


def _try_rmdir(group: Path) -> bool:
    """One attempt to remove an empty group: True once it is gone, False while it is busy.

    Raises:
        OSError: Anything but EBUSY (a missing group counts as gone).
    """
    try:
        group.rmdir()
    except FileNotFoundError:
        return True
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        return False
    return True


def _rmdir_quietly(group: Path) -> None:
    """Undo a half-made group; the error that made us undo it is the one to report.

    One attempt, no retry: no process has joined a group that is still being made, so it is
    never busy.
    """
    try:
        _try_rmdir(group)
    except OSError:
        pass


def _cgroup_lines(text: str) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` as {controller field: path} (v2's field is ``""``)."""
    result: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            result[parts[1]] = parts[2]
    return result


@attrs.frozen
class _Mount:
    point: str
    root: str
    fstype: str
    options: frozenset[str]


def _mounts() -> list[_Mount]:
    """The mounts of our mount namespace, from ``/proc/self/mountinfo``."""
    found = []
    for line in _read_or(Path("/proc/self/mountinfo")).splitlines():
        left, sep, right = line.partition(" - ")
        pre, post = left.split(), right.split()
        if not sep or len(pre) < 5 or len(post) < 3:
            continue
        found.append(
            _Mount(
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
