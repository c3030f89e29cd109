"""The cgroup v2 driver: one group per job in the unified hierarchy."""

from __future__ import annotations

import errno
import os
import posixpath
from pathlib import Path, PurePosixPath

from joblet.config import CgroupSection
from joblet.core.counters import CgroupStats
from joblet.core.cpus import parse_cpu_list
from joblet.core.model import Limits
from joblet.sys.cgroups import files, parse
from joblet.sys.cgroups.driver import (
    CFS_PERIOD_US,
    DAEMON_LEAF,
    MIB,
    CgroupDriver,
    CgroupUnavailable,
    KillFiles,
)
from joblet.sys.devices import block_device_numbers

#: ``memory.high`` (v2) as a percentage of ``memory.max``. At 100 the kernel reclaims (page cache
#: first) when the job reaches its limit and OOM-kills it when nothing is left to reclaim. Below
#: 100, a job whose anonymous memory grows past ``memory.high`` is throttled, never OOM-killed,
#: and stalls until ``jobTimeout``: seen in the v2 VM at 95% (64 MiB limit, 200 MB allocation:
#: stuck at 65.5 MB for over a minute with ``memory.events`` high 161, oom_kill 0).
MEMORY_HIGH_PERCENT = 100
#: cgroup v2 controllers without which the v2 driver is unavailable.
V2_REQUIRED: tuple[str, ...] = ("cpu", "memory", "pids")
#: Every v2 controller enabled for job groups when available (freezing and killing a group need
#: no controller on v2).
V2_CONTROLLERS: tuple[str, ...] = ("cpuset", "cpu", "io", "memory", "pids")
#: The files :func:`joblet.sys.cgroups.parse.v2_stats` reads.
STAT_FILES: tuple[str, ...] = (
    "cpu.stat",
    "memory.stat",
    "io.stat",
    "memory.current",
    "memory.peak",
    "memory.max",
    "memory.events",
    "pids.current",
    "pids.max",
)


class V2Driver(CgroupDriver):
    """cgroup v2: one group per job under the parent, with the needed controllers enabled in
    ``cgroup.subtree_control`` all the way down from the root."""

    version = 2

    def __init__(self, cfg: CgroupSection, available: frozenset[str], mount_root: str) -> None:
        """Use :meth:`probe` or :func:`~joblet.sys.cgroups.detect_driver` instead."""
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
            (
                m.root
                for m in reversed(files.mounts())
                if m.point == point and m.fstype == "cgroup2"
            ),
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
        have = set(files.read_or(group / "cgroup.subtree_control").split())
        missing = [c for c in self._controllers if c not in have]
        if not missing:
            return
        value = " ".join(f"+{c}" for c in missing)
        try:
            files.write(group / "cgroup.subtree_control", value)
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
        # EBUSY: the group holds processes (the no-internal-processes rule).
        procs = set(files.procs(group))
        me = os.getpid()
        if me in procs:
            leaf = group / DAEMON_LEAF
            try:
                leaf.mkdir()
            except FileExistsError:
                pass
            files.write(leaf / "cgroup.procs", str(me))
            procs = set(files.procs(group))
        if procs:
            raise CgroupUnavailable(
                f"cgroup v2: cannot enable controllers in {group}: it holds processes "
                f"{' '.join(map(str, sorted(procs)))} and only leaf groups may; move them to a "
                "leaf group or choose another cgroup.parent"
            )
        files.write(group / "cgroup.subtree_control", value)

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
            files.rmdir_quietly(group)
            raise

    def _apply(self, group: Path, limits: Limits) -> None:
        quota = limits.cpu_percent * CFS_PERIOD_US // 100
        files.write(group / "cpu.max", f"{quota or 'max'} {CFS_PERIOD_US}")
        if limits.memory_mb:
            limit = limits.memory_mb * MIB
            files.write(group / "memory.max", str(limit))
            files.write(group / "memory.high", str(limit * MEMORY_HIGH_PERCENT // 100))
            if (group / "memory.swap.max").exists():
                # Swap is not part of memory.max: without this a job could swap past its limit.
                files.write(group / "memory.swap.max", "0")
        else:
            files.write(group / "memory.max", "max")
            files.write(group / "memory.high", "max")
        if limits.io_bps:
            for dev in block_device_numbers():
                files.write(group / "io.max", f"{dev} rbps={limits.io_bps} wbps={limits.io_bps}")
        if limits.cpu_cores:
            files.write(group / "cpuset.cpus", limits.cpu_cores)
        files.write(group / "pids.max", str(limits.pids_max or "max"))

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
        return parse.flat_keyed((group / "memory.events").read_text()).get("oom_kill", 0) > 0

    def stats(self, job_id: str) -> CgroupStats:
        """See :meth:`CgroupDriver.stats`."""
        (group,) = self._job_dirs(job_id)
        if not group.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such job cgroup", str(group))
        return parse.v2_stats(files.read_files(group, STAT_FILES))

    def available_cpus(self) -> set[int]:
        """The effective CPUs of the parent group (all online CPUs without cpuset)."""
        for d in (self._root / self._parent, self._root):
            text = files.read_or(d / "cpuset.cpus.effective").strip()
            if text:
                return parse_cpu_list(text)
        return files.online_cpus()

    def _kill_files(self, job_id: str) -> KillFiles:
        (group,) = self._job_dirs(job_id)
        kill = group / "cgroup.kill"
        return KillFiles(
            # cgroup.kill (5.14+) kills the whole subtree at once, fork-proof: no freeze needed.
            kill=kill if kill.exists() else None,
            freeze=group / "cgroup.freeze",
            frozen="1",
            thawed="0",
            state=group / "cgroup.events",
            state_frozen="frozen 1",
        )
