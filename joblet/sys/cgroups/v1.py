"""The cgroup v1 driver: one group per job in each controller's hierarchy."""

from __future__ import annotations

import errno
import os
import posixpath
from pathlib import Path, PurePosixPath

import attrs

from joblet.config import CgroupSection
from joblet.core.counters import CgroupStats
from joblet.core.cpus import parse_cpu_list
from joblet.core.model import Limits
from joblet.sys.cgroups import files, parse
from joblet.sys.cgroups.driver import (
    CFS_PERIOD_US,
    MIB,
    CgroupDriver,
    CgroupUnavailable,
    KillFiles,
    check_job_id,
)
from joblet.sys.devices import block_device_numbers

#: cgroup v1 controllers without which the v1 driver is unavailable.
V1_REQUIRED: tuple[str, ...] = ("cpu", "memory", "pids", "freezer")
#: Every v1 controller used when mounted (a limit that needs a missing one, blkio for io_bps or
#: cpuset for cpu_cores, fails), in the order the stage-1 helper joins them. cpuset first: it is
#: the one most likely to refuse a task (no cpus/mems), and an early failure leaves less to undo.
V1_CONTROLLERS: tuple[str, ...] = ("cpuset", "cpu", "cpuacct", "memory", "blkio", "pids", "freezer")
#: The files :func:`joblet.sys.cgroups.parse.v1_stats` reads, by controller.
STAT_FILES: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu.stat",),
    "cpuacct": ("cpuacct.usage", "cpuacct.usage_user", "cpuacct.usage_sys", "cpuacct.stat"),
    "memory": (
        "memory.stat",
        "memory.usage_in_bytes",
        "memory.max_usage_in_bytes",
        "memory.limit_in_bytes",
        "memory.oom_control",
    ),
    "blkio": (
        "blkio.throttle.io_service_bytes_recursive",
        "blkio.throttle.io_service_bytes",
        "blkio.throttle.io_serviced_recursive",
        "blkio.throttle.io_serviced",
    ),
    "pids": ("pids.current", "pids.max"),
}


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
        """Use :meth:`probe` or :func:`~joblet.sys.cgroups.detect_driver` instead."""
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
                files.rmdir_quietly(d)
            raise

    def _apply(self, job_id: str, limits: Limits) -> None:
        cpu = self._dir("cpu", job_id)
        files.write(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
        quota = limits.cpu_percent * CFS_PERIOD_US // 100
        files.write(cpu / "cpu.cfs_quota_us", str(quota) if quota else "-1")

        if limits.memory_mb:
            mem = self._dir("memory", job_id)
            limit = str(limits.memory_mb * MIB)
            # memory.limit_in_bytes may never exceed memsw, so the plain limit goes first when
            # lowering (a new group starts at "unlimited" for both).
            files.write(mem / "memory.limit_in_bytes", limit)
            if (mem / "memory.memsw.limit_in_bytes").exists():
                # memory + swap: without it a job could swap out past its limit.
                files.write(mem / "memory.memsw.limit_in_bytes", limit)
            else:
                # No swap accounting (swapaccount=0): forbid this group to swap at all.
                files.write(mem / "memory.swappiness", "0")

        if limits.io_bps:
            blkio = self._dir("blkio", job_id)
            for dev in block_device_numbers():
                files.write(blkio / "blkio.throttle.read_bps_device", f"{dev} {limits.io_bps}")
                files.write(blkio / "blkio.throttle.write_bps_device", f"{dev} {limits.io_bps}")

        if "cpuset" in self._by_controller:
            cpuset = self._dir("cpuset", job_id)
            _inherit_cpuset(cpuset.parent, cpuset, cpus=limits.cpu_cores)

        files.write(self._dir("pids", job_id) / "pids.max", str(limits.pids_max or "max"))

    def membership(self, job_id: str) -> list[tuple[str, str, str]]:
        """See :meth:`CgroupDriver.membership`."""
        check_job_id(job_id)
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
        return parse.flat_keyed(text).get("oom_kill", 0) > 0

    def stats(self, job_id: str) -> CgroupStats:
        """See :meth:`CgroupDriver.stats`."""
        mem = self._dir("memory", job_id)
        if not mem.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such job cgroup", str(mem))
        texts: dict[str, str] = {}
        for controller, names in STAT_FILES.items():
            if controller in self._by_controller:
                texts.update(files.read_files(self._dir(controller, job_id), names))
        return parse.v1_stats(texts, clock_ticks=os.sysconf("SC_CLK_TCK"))

    def available_cpus(self) -> set[int]:
        """The CPUs of the parent cpuset group (all online CPUs when cpuset is not mounted)."""
        if "cpuset" not in self._by_controller:
            return files.online_cpus()
        top = self._by_controller["cpuset"].mount
        for d in (top / self._parent, top):
            text = files.read_or(d / "cpuset.effective_cpus") or files.read_or(d / "cpuset.cpus")
            if text.strip():
                return parse_cpu_list(text.strip())
        return files.online_cpus()

    def _kill_files(self, job_id: str) -> KillFiles:
        state = self._dir("freezer", job_id) / "freezer.state"
        return KillFiles(
            kill=None,
            freeze=state,
            frozen="FROZEN",
            thawed="THAWED",
            state=state,
            state_frozen="FROZEN",
        )


def _v1_hierarchies(root: Path) -> dict[str, Hierarchy]:
    """Map each v1 controller we use to its hierarchy, as mounted under ``root``."""
    mounts = {m.point: m for m in files.mounts() if m.fstype == "cgroup"}
    fields = [f for f in parse.proc_cgroup(files.read_or(Path("/proc/self/cgroup"))) if f]
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
        if not value and files.read_or(group / name).strip():
            continue  # already set: keep what an administrator chose for the parent
        files.write(group / name, value or files.read_or(upper / name).strip())
