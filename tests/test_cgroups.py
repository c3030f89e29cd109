"""The cgroup drivers against the real kernel: real groups, real processes, real limits.

Every driver test runs once per cgroup version. On a cgroup v1 host the v2 cases (marked
``cgroup2``) are skipped with a reason and run in the cgroup v2 VM (``just test-cgroup2``); on a
pure v2 host the v1 cases are skipped. Processes join a group as the stage-1 helper can: they
write their own PID to every join file of :meth:`CgroupDriver.membership`, then exec the
workload. Each test works under a parent group of its own module
(``joblet-test-<random>``), so a real daemon's groups are never touched; after every test no job
group and no test process may be left, and the parent is removed at the end.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attrs
import pytest
import trio

from joblet.config import CgroupSection
from joblet.core.counters import CgroupStats
from joblet.core.cpus import CpuListError, format_cpu_list, parse_cpu_list
from joblet.core.model import Limits
from joblet.sys.cgroups import (
    MEMORY_HIGH_PERCENT,
    CgroupDriver,
    CgroupUnavailable,
    V1Driver,
    V2Driver,
    detect_driver,
    files,
    parse,
)
from joblet.sys.devices import block_device_numbers, block_devices, disk_for_path
from tests.conftest import IN_CI, require_root

CGROUP_ROOT = Path("/sys/fs/cgroup")
V2_HOST = (CGROUP_ROOT / "cgroup.controllers").exists()
MIB = 1 << 20
REPO = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")

#: Joins every join file given before ``--`` (writing its PID: sh has a single thread), says so on
#: stdout, then execs the workload after ``--``.
JOIN = (
    'while [ "$1" != -- ]; do echo $$ > "$1" || exit 99; shift; done; shift; echo joined; exec "$@"'
)


async def wait_exited(pids: list[int]) -> None:
    """Wait until every process in ``pids`` has exited (children or not), without polling.

    A pidfd becomes readable when its process exits; one opened for an already dead process
    is readable at once.
    """
    fds = []
    try:
        for pid in pids:
            try:
                fds.append(os.pidfd_open(pid))
            except ProcessLookupError:
                continue  # already reaped
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: being reaped right now
                    raise
        for fd in fds:
            await trio.lowlevel.wait_readable(fd)
    finally:
        for fd in fds:
            os.close(fd)


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["v1", pytest.param("v2", marks=pytest.mark.cgroup2)])
def module_driver(request: pytest.FixtureRequest) -> Iterator[CgroupDriver]:
    """A driver of the parametrized version, set up under a parent group of its own."""
    require_root()
    version: str = request.param
    if version == "v2" and not V2_HOST:
        pytest.skip(
            f"cgroup v2 is not mounted at {CGROUP_ROOT} (this host is cgroup v1): "
            "the cgroup2 tests run in the v2 VM"
        )
    cfg = CgroupSection(driver=version, parent=f"joblet-test-{secrets.token_hex(4)}")
    try:
        driver = detect_driver(cfg)
    except CgroupUnavailable:
        if version == "v1" and V2_HOST:
            pytest.skip("no cgroup v1 hierarchies on this cgroup v2 host")
        raise
    driver.setup()
    yield driver
    # A module-scoped fixture ends outside any test's event loop: teardown gets one of its own.
    trio.run(driver.teardown)
    assert [p for p in driver.parent_dirs() if p.exists()] == [], "parent group left behind"


class Jobs:
    """Creates job groups and starts processes in them; remembers everything for the checks."""

    def __init__(self, driver: CgroupDriver) -> None:
        self.driver = driver
        self.processes: list[trio.Process] = []

    def create(self, limits: Limits) -> str:
        """A new job group with ``limits``; returns its id."""
        job_id = f"job-{secrets.token_hex(6)}"
        self.driver.create(job_id, limits)
        return job_id

    async def start(self, job_id: str, *argv: str) -> tuple[trio.Process, Lines]:
        """Start ``argv`` inside the job's group; returns once it has joined (before it runs)."""
        files = [join_file for join_file, _field, _expected in self.driver.membership(job_id)]
        proc = await trio.lowlevel.open_process(
            ["sh", "-c", JOIN, "sh", *files, "--", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        self.processes.append(proc)
        assert proc.stdout is not None
        lines = Lines(proc.stdout)
        assert await lines.next() == "joined", "could not join the job's cgroup"
        return proc, lines

    async def finish(self, job_id: str) -> None:
        """Kill what is left of the job and remove its group, as the daemon does."""
        await self.driver.kill_all(job_id, 5)
        await self.driver.remove(job_id)


class Lines:
    """Reads a process's stdout line by line."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> str:
        """The next line without its newline, or "" at end of file."""
        while b"\n" not in self._buffer:
            data = await self._stream.receive_some()
            if not data:
                rest, self._buffer = self._buffer, b""
                return rest.decode()
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()


@pytest.fixture
async def jobs(module_driver: CgroupDriver) -> AsyncIterator[Jobs]:
    """The driver for one test; afterwards no job group and no test process may be left."""
    helper = Jobs(module_driver)
    yield helper
    driver = module_driver
    parent = driver.parent_dirs()[0].name
    left_groups = sorted({(p / g).as_posix() for p in driver.parent_dirs() for g in _subdirs(p)})
    left_processes = _processes_under(parent)
    # Clean up before asserting, so one leaky test does not fail the ones after it.
    with trio.move_on_after(10):
        for name in driver.job_groups():
            await driver.kill_all(name, 5)
            await driver.remove(name)
        for proc in helper.processes:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.aclose()
    assert left_groups == [], "job groups left behind"
    assert left_processes == [], "processes left in the job groups"
    assert all(p.returncode is not None for p in helper.processes), "test processes left"


def _subdirs(path: Path) -> list[str]:
    return [e.name for e in os.scandir(path) if e.is_dir()] if path.is_dir() else []


def _processes_under(parent: str) -> list[int]:
    """PIDs of every live process with a cgroup under ``parent`` in any hierarchy.

    Zombies do not count: they hold no resources, and cgroup v2 still shows a zombie in the group
    it died in until its parent reaps it (an orphan's parent is the host's init).
    """
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/cgroup").read_text()
                state = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[0]
            except (OSError, IndexError):
                continue
            if f"/{parent}/" in text and state != "Z":
                found.append(int(entry))
    return found


def _read(path: Path) -> str:
    return path.read_text().strip()


def _v1_groups(driver: V1Driver, job_id: str) -> dict[str, Path]:
    """The job's group directory for each v1 controller (co-mounted ones share one)."""
    return {
        c: parent / job_id
        for h, parent in zip(driver.hierarchies, driver.parent_dirs(), strict=True)
        for c in h.controllers
    }


def _exists(path: str) -> bool:
    return os.path.exists(path)


# --- detection and plain functions ----------------------------------------------------------


def test_auto_detects_the_host_version() -> None:
    require_root()
    driver = detect_driver(CgroupSection(parent="joblet-test-detect"))
    controllers = set(_read(CGROUP_ROOT / "cgroup.controllers").split()) if V2_HOST else set()
    expected = V2Driver if {"cpu", "memory", "pids"} <= controllers else V1Driver
    assert type(driver) is expected
    assert driver.version == (2 if expected is V2Driver else 1)
    # Detection creates nothing.
    assert [p for p in driver.parent_dirs() if p.exists()] == []


def test_bad_driver_config_is_refused() -> None:
    # The section's own checks refuse these values; the driver refuses them too when a section
    # gets past them.
    with attrs.validators.disabled():
        bad_driver, bad_parent = CgroupSection(driver="v3"), CgroupSection(parent="../escape")
    with pytest.raises(CgroupUnavailable, match=r"invalid cgroup\.driver 'v3'"):
        detect_driver(bad_driver)
    with pytest.raises(CgroupUnavailable, match=r"invalid cgroup\.parent"):
        detect_driver(bad_parent)
    with pytest.raises(CgroupUnavailable, match="cgroup v2"):
        detect_driver(CgroupSection(driver="v2", root="/proc"))
    with pytest.raises(CgroupUnavailable, match="cgroup v1"):
        detect_driver(CgroupSection(driver="v1", root="/proc"))


def test_cpu_lists() -> None:
    assert parse_cpu_list("0-2,4") == {0, 1, 2, 4}
    assert parse_cpu_list("3") == {3}
    assert format_cpu_list({0, 1, 2, 4, 6, 7}) == "0-2,4,6-7"
    assert format_cpu_list(parse_cpu_list("0-3,5,7-8")) == "0-3,5,7-8"
    # Strict: the kernel's trailing newline is stripped by the caller; only ASCII digits.
    for bad in ("", "a", "1-", "1,,2", "3\n", " 3", "\u0663"):
        with pytest.raises(CpuListError, match="invalid cpu list") as info:
            parse_cpu_list(bad)
        assert (info.value.text, info.value.problem) == (bad, "expected e.g. '0-1' or '0,2'")
    with pytest.raises(ValueError, match=r"invalid cpu list '0,2-1' \(range 2-1 is backwards\)"):
        parse_cpu_list("0,2-1")


# --- parsers: a file's text in, numbers out ------------------------------------------------


def test_flat_keyed_and_int_or() -> None:
    assert parse.flat_keyed("usage_usec 120\nnr_periods 3\nbogus x\n") == {
        "usage_usec": 120,
        "nr_periods": 3,
        "bogus": 0,
    }
    assert [parse.int_or(t) for t in ("42\n", "max\n", "", " 7 ")] == [42, 0, 0, 7]
    assert parse.pid_list("12\n7\n") == [12, 7]
    assert parse.pid_list("") == []


def test_v2_stats_from_file_texts() -> None:
    texts = {
        "cpu.stat": "usage_usec 5000\nuser_usec 3000\nsystem_usec 2000\nnr_periods 10\n"
        "nr_throttled 4\nthrottled_usec 900\n",
        "memory.stat": "anon 4096\nfile 8192\npgfault 11\npgmajfault 2\nshmem 0\n",
        # Two devices, one with fields we do not use.
        "io.stat": "254:0 rbytes=100 wbytes=200 rios=1 wios=2 dbytes=0 dios=0\n"
        "8:0 rbytes=10 wbytes=20 rios=3 wios=4\n",
        "memory.current": "12288\n",
        "memory.peak": "16384\n",
        "memory.max": "max\n",
        "memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        "pids.current": "2\n",
        "pids.max": "20\n",
    }
    assert parse.v2_stats(texts) == CgroupStats(
        cpu_usage_usec=5000,
        cpu_user_usec=3000,
        cpu_system_usec=2000,
        nr_periods=10,
        nr_throttled=4,
        throttled_usec=900,
        memory_current=12288,
        memory_peak=16384,
        memory_anon=4096,
        memory_file=8192,
        pgfault=11,
        pgmajfault=2,
        io_read_bytes=110,
        io_write_bytes=220,
        io_read_ops=4,
        io_write_ops=6,
        pids_current=2,
        memory_limit=0,
        oom_kills=1,
        pids_limit=20,
    )
    # A kernel without memory.peak or io (files missing) reports zeros there.
    assert parse.v2_stats({}) == CgroupStats()


def test_v1_stats_from_file_texts() -> None:
    texts = {
        "cpu.stat": "nr_periods 10\nnr_throttled 4\nthrottled_time 9000\n",
        "cpuacct.usage": "5000000\n",
        "cpuacct.usage_user": "3000000\n",
        "cpuacct.usage_sys": "2000000\n",
        "cpuacct.stat": "user 999\nsystem 999\n",
        "memory.stat": "rss 1\ncache 1\ntotal_rss 4096\ntotal_cache 8192\n"
        "total_pgfault 11\ntotal_pgmajfault 2\n",
        "memory.usage_in_bytes": "12288\n",
        "memory.max_usage_in_bytes": "16384\n",
        # "Unlimited": PAGE_COUNTER_MAX pages, in bytes.
        "memory.limit_in_bytes": "9223372036854771712\n",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        "blkio.throttle.io_service_bytes_recursive": "254:0 Read 100\n254:0 Write 200\n"
        "254:0 Sync 300\n254:0 Total 300\n8:0 Read 10\n8:0 Write 20\nTotal 330\n",
        "blkio.throttle.io_service_bytes": "254:0 Read 1\n254:0 Write 1\n",
        # An empty recursive file: the plain one counts.
        "blkio.throttle.io_serviced_recursive": "",
        "blkio.throttle.io_serviced": "254:0 Read 3\n254:0 Write 5\nTotal 8\n",
        "pids.current": "2\n",
        "pids.max": "max\n",
    }
    assert parse.v1_stats(texts, clock_ticks=100) == CgroupStats(
        cpu_usage_usec=5000,
        cpu_user_usec=3000,
        cpu_system_usec=2000,
        nr_periods=10,
        nr_throttled=4,
        throttled_usec=9,
        memory_current=12288,
        memory_peak=16384,
        memory_anon=4096,
        memory_file=8192,
        pgfault=11,
        pgmajfault=2,
        io_read_bytes=110,
        io_write_bytes=220,
        io_read_ops=3,
        io_write_ops=5,
        pids_current=2,
        memory_limit=0,
        oom_kills=2,
        pids_limit=0,
    )
    # Before Linux 4.6 there is no cpuacct.usage_user: cpuacct.stat counts clock ticks.
    old_kernel = {"cpuacct.usage": "5000000\n", "cpuacct.stat": "user 30\nsystem 20\n"}
    stats = parse.v1_stats(old_kernel, clock_ticks=100)
    assert (stats.cpu_usage_usec, stats.cpu_user_usec, stats.cpu_system_usec) == (
        5000,
        300_000,
        200_000,
    )
    assert parse.v1_stats({"memory.limit_in_bytes": "67108864\n"}, clock_ticks=100) == (
        CgroupStats(memory_limit=64 * MIB)
    )


def test_proc_cgroup_and_mountinfo() -> None:
    v1 = "12:pids:/joblet/job-1\n4:cpu,cpuacct:/joblet/job-1\n1:name=systemd:/\n0::/\n"
    assert parse.proc_cgroup(v1) == {
        "pids": "/joblet/job-1",
        "cpu,cpuacct": "/joblet/job-1",
        "name=systemd": "/",
        "": "/",
    }
    assert parse.proc_cgroup("0::/joblet/job-1\n") == {"": "/joblet/job-1"}
    text = (
        "30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:12 - cgroup cgroup "
        "rw,cpu,cpuacct\n"
        "31 25 0:27 /sub /sys/fs/cgroup/my\\040dir rw - cgroup2 cgroup2 rw,nsdelegate\n"
        "garbage line\n"
    )
    assert parse.mountinfo(text) == [
        parse.Mount(
            point="/sys/fs/cgroup/cpu,cpuacct",
            root="/",
            fstype="cgroup",
            options=frozenset({"rw", "cpu", "cpuacct"}),
        ),
        parse.Mount(
            point="/sys/fs/cgroup/my dir",
            root="/sub",
            fstype="cgroup2",
            options=frozenset({"rw", "nsdelegate"}),
        ),
    ]


def test_block_devices_skip_virtual_and_empty_disks(tmp_path: Path) -> None:
    for name, dev, size in [
        ("loop0", "7:0", 100),
        ("ram0", "1:0", 100),
        ("zram0", "252:0", 100),
        ("sr0", "11:0", 0),
        ("vdb", "254:16", 2048),
        ("sda", "8:0", 4096),
        ("nvme0c0n1", "259:1", 4096),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "dev").write_text(f"{dev}\n")
        (tmp_path / name / "size").write_text(f"{size}\n")
    (tmp_path / "nvme0c0n1" / "hidden").write_text("1\n")
    (tmp_path / "sda" / "hidden").write_text("0\n")
    assert block_device_numbers(tmp_path) == ["8:0", "254:16"]


def test_block_devices_are_the_hosts_real_disks() -> None:
    devices = block_devices()
    partitions = Path("/proc/partitions").read_text()
    for d in devices:
        assert not d.name.startswith(("loop", "ram", "zram"))
        assert _read(Path(f"/sys/dev/block/{d.majmin}/size")) != "0"
        # Every device is one the kernel lists, with the same numbers.
        assert f" {d.major} " in partitions and d.name in partitions
    root_disk = disk_for_path("/")
    if root_disk is not None:
        assert root_disk in devices


# --- create / apply / remove ----------------------------------------------------------------
# These touch cgroupfs synchronously up to the removal, so a fail_after could not fire in
# them; the fixture's asynchronous cleanup is bounded there.


async def test_create_writes_the_limits_and_remove_cleans_up(jobs: Jobs) -> None:
    driver = jobs.driver
    cpus = driver.available_cpus()
    core = str(max(cpus))
    limits = Limits(cpu_percent=20, memory_mb=64, io_bps=MIB, cpu_cores=core, pids_max=20)
    job_id = jobs.create(limits)
    devices = block_device_numbers()
    assert "8:0" not in devices or _exists("/sys/dev/block/8:0")
    assert driver.job_groups() == [job_id]

    if isinstance(driver, V1Driver):
        by = _v1_groups(driver, job_id)
        assert _read(by["cpu"] / "cpu.cfs_period_us") == "100000"
        assert _read(by["cpu"] / "cpu.cfs_quota_us") == "20000"
        assert _read(by["memory"] / "memory.limit_in_bytes") == str(64 * MIB)
        if (by["memory"] / "memory.memsw.limit_in_bytes").exists():
            assert _read(by["memory"] / "memory.memsw.limit_in_bytes") == str(64 * MIB)
        assert _read(by["pids"] / "pids.max") == "20"
        assert _read(by["freezer"] / "freezer.state") == "THAWED"
        if "blkio" in by:
            for name in ("read_bps_device", "write_bps_device"):
                text = _read(by["blkio"] / f"blkio.throttle.{name}")
                assert sorted(text.splitlines()) == sorted(f"{d} {MIB}" for d in devices)
        if "cpuset" in by:
            assert _read(by["cpuset"] / "cpuset.cpus") == core
            assert _read(by["cpuset"] / "cpuset.mems") == _read(by["cpuset"].parent / "cpuset.mems")
            assert _read(by["cpuset"] / "cpuset.mems") != ""
    else:
        group = driver.parent_dirs()[0] / job_id
        assert _read(group / "cpu.max") == "20000 100000"
        assert _read(group / "memory.max") == str(64 * MIB)
        assert (
            int(_read(group / "memory.high"))
            == 64 * MIB * MEMORY_HIGH_PERCENT // 100 // PAGE * PAGE
        )
        if (group / "memory.swap.max").exists():
            assert _read(group / "memory.swap.max") == "0"
        assert _read(group / "pids.max") == "20"
        if "io" in _read(group / "cgroup.controllers").split():
            lines = {line.split()[0]: line for line in _read(group / "io.max").splitlines()}
            assert sorted(lines) == sorted(devices)
            for line in lines.values():
                assert f"rbps={MIB} wbps={MIB}" in line
        if "cpuset" in _read(group / "cgroup.controllers").split():
            assert _read(group / "cpuset.cpus") == core

    for join_file, _field, _expected in driver.membership(job_id):
        assert _exists(join_file)
    assert driver.pids(job_id) == []
    assert driver.oom_killed(job_id) is False
    stats = driver.stats(job_id)
    assert stats.pids_current == 0
    assert (stats.memory_limit, stats.pids_limit, stats.oom_kills) == (64 * MIB, 20, 0)

    await driver.remove(job_id)
    assert driver.job_groups() == []
    for parent in driver.parent_dirs():
        assert not (parent / job_id).exists()
    await driver.remove(job_id)  # a missing group is not an error


async def test_zero_limits_mean_unlimited(jobs: Jobs) -> None:
    driver = jobs.driver
    job_id = jobs.create(Limits(cpu_percent=0, memory_mb=0, io_bps=0, cpu_cores="", pids_max=0))
    if isinstance(driver, V1Driver):
        by = _v1_groups(driver, job_id)
        assert _read(by["cpu"] / "cpu.cfs_quota_us") == "-1"
        assert int(_read(by["memory"] / "memory.limit_in_bytes")) > 1 << 60
        assert _read(by["pids"] / "pids.max") == "max"
        if "blkio" in by:
            assert _read(by["blkio"] / "blkio.throttle.write_bps_device") == ""
    else:
        group = driver.parent_dirs()[0] / job_id
        assert _read(group / "cpu.max") == "max 100000"
        assert _read(group / "memory.max") == "max"
        assert _read(group / "pids.max") == "max"
        if (group / "io.max").exists():
            assert _read(group / "io.max") == ""
    assert (driver.stats(job_id).memory_limit, driver.stats(job_id).pids_limit) == (0, 0)
    await driver.remove(job_id)


async def test_failed_create_leaves_nothing(jobs: Jobs) -> None:
    driver = jobs.driver
    bad = str(max(driver.available_cpus()) + 1)
    with pytest.raises(ValueError, match=f"invalid cpu_cores '{bad}'.* not available"):
        driver.create("job-bad-cores", Limits(cpu_cores=bad))
    with pytest.raises(ValueError, match="invalid cpu_cores"):
        driver.create("job-bad-cores", Limits(cpu_cores="0-"))
    with pytest.raises(ValueError, match="invalid job id"):
        driver.create("../escape", Limits())
    with pytest.raises(ValueError, match="invalid memory_mb"):
        driver.create("job-negative", Limits(memory_mb=-1))
    # The kernel refuses a CPU quota of 10**12 % (above its maximum): the group is made, then
    # the write fails, and the group must be gone again. The error names the file.
    with pytest.raises(OSError, match=r"cpu\.(cfs_quota_us|max)"):
        driver.create("job-huge-quota", Limits(cpu_percent=10**12))
    assert driver.job_groups() == []


# --- joining ----------------------------------------------------------------------------------

#: What the stage-1 helper does with the membership data (stdlib only, a single thread): join by
#: writing 0 (itself), then verify.
STAGE1_CHECK = """
import json, os, sys
membership = json.loads(sys.argv[1])
for join_file, _field, _expected in membership:
    with open(join_file, "w") as f:
        f.write("0")
actual = {}
for line in open("/proc/self/cgroup").read().splitlines():
    _hid, field, path = line.split(":", 2)
    actual[field] = path
bad = [(field, actual.get(field), expected) for _p, field, expected in membership
       if actual.get(field) != expected]
print("ok" if not bad else f"mismatch {bad}")
"""


async def test_membership_is_enough_to_join_and_verify(jobs: Jobs) -> None:
    with trio.fail_after(10):
        job_id = jobs.create(Limits())
        membership = jobs.driver.membership(job_id)
        assert len(membership) == (
            1 if jobs.driver.version == 2 else len(jobs.driver.parent_dirs())
        )
        if jobs.driver.version == 2:
            assert membership[0][1] == ""
            assert membership[0][0].endswith("/cgroup.procs")
        else:
            # Per thread, without the kernel's global lock (see CgroupDriver.membership).
            assert all(join_file.endswith("/tasks") for join_file, _f, _e in membership)
        for _procs, _field, expected in membership:
            assert expected.endswith(f"/{jobs.driver.parent_dirs()[0].name}/{job_id}")
        result = await trio.run_process(
            [sys.executable, "-I", "-S", "-c", STAGE1_CHECK, json.dumps(membership)],
            capture_stdout=True,
        )
        assert result.stdout.decode().strip() == "ok"
        await jobs.finish(job_id)


# --- limits -----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_memory_limit_oom_kills_and_is_reported(jobs: Jobs) -> None:
    with trio.fail_after(30):
        hog = jobs.create(Limits(memory_mb=64))
        # bytes * n writes every page, so the memory is really used (a bare bytearray is not).
        proc, _ = await jobs.start(hog, sys.executable, "-c", "x = b'1' * (200 << 20)")
        assert await proc.wait() == -signal.SIGKILL
        assert jobs.driver.oom_killed(hog) is True
        assert jobs.driver.stats(hog).memory_peak <= 64 * MIB
        assert jobs.driver.stats(hog).oom_kills >= 1
        await jobs.finish(hog)

        modest = jobs.create(Limits(memory_mb=64))
        proc, _ = await jobs.start(modest, sys.executable, "-c", "x = b'1' * (16 << 20)")
        assert await proc.wait() == 0
        assert jobs.driver.oom_killed(modest) is False
        stats = jobs.driver.stats(modest)
        assert 16 * MIB <= stats.memory_peak <= 64 * MIB
        await jobs.finish(modest)


@pytest.mark.slow
async def test_cpu_quota_holds_a_busy_loop_to_its_share(jobs: Jobs) -> None:
    with trio.fail_after(20):
        job_id = jobs.create(Limits(cpu_percent=20))
        proc, _ = await jobs.start(job_id, "sh", "-c", "while :; do :; done")
        before, t0 = jobs.driver.stats(job_id), trio.current_time()
        await trio.sleep(1.5)  # a measurement window, not an ordering device
        after, t1 = jobs.driver.stats(job_id), trio.current_time()
        share = (after.cpu_usage_usec - before.cpu_usage_usec) / 1e6 / (t1 - t0)
        assert 0.10 <= share <= 0.30, f"busy loop got {share:.0%} of a core under a 20% quota"
        assert after.nr_throttled > before.nr_throttled
        assert after.cpu_user_usec + after.cpu_system_usec > 0
        await jobs.finish(job_id)
        assert await proc.wait() == -signal.SIGKILL


@pytest.fixture
def disk_dir() -> Path:
    """A writable directory on a real block device (``$JOBLET_TEST_IO_DIR``, /var/tmp or /tmp)."""
    # A sync fixture: a skip raised inside a trio test loses its reason.
    candidates = [os.environ.get("JOBLET_TEST_IO_DIR", ""), "/var/tmp", "/tmp"]
    for c in candidates:
        if c and os.path.isdir(c) and disk_for_path(c) is not None:
            return Path(c)
    reason = (
        "no directory on a real block device to write to (tried /var/tmp, /tmp); "
        "set JOBLET_TEST_IO_DIR to one"
    )
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.mark.slow
async def test_io_limit_throttles_direct_writes(jobs: Jobs, disk_dir: Path) -> None:
    with trio.fail_after(20), tempfile.NamedTemporaryFile(dir=disk_dir) as target:
        job_id = jobs.create(Limits(io_bps=MIB))
        size = 48 * 64 * 1024  # 3 MiB: about 3 s at 1 MiB/s
        proc, _ = await jobs.start(
            job_id,
            "dd",
            "if=/dev/zero",
            f"of={target.name}",
            "bs=64k",
            "count=48",
            "oflag=direct",
            "status=none",
        )
        t0 = trio.current_time()
        assert await proc.wait() == 0
        rate = size / (trio.current_time() - t0)
        assert 0.5 * MIB <= rate <= 1.6 * MIB, f"dd wrote {rate / MIB:.2f} MiB/s under 1 MiB/s"
        assert jobs.driver.stats(job_id).io_write_bytes >= size
        await jobs.finish(job_id)


FORK_UNTIL_REFUSED = """
import os, signal
forked = refused = 0
for _ in range(100):
    try:
        pid = os.fork()
    except BlockingIOError:
        refused += 1
        continue
    if pid == 0:
        signal.pause()
        os._exit(0)
    forked += 1
print(forked, refused, flush=True)
signal.pause()
"""


async def test_pids_max_stops_a_fork_loop_and_kill_all_empties_the_group(jobs: Jobs) -> None:
    with trio.fail_after(20):
        job_id = jobs.create(Limits(pids_max=20))
        proc, lines = await jobs.start(job_id, sys.executable, "-c", FORK_UNTIL_REFUSED)
        forked, refused = map(int, (await lines.next()).split())
        assert (forked, refused) == (19, 81)
        assert len(jobs.driver.pids(job_id)) == 20
        assert jobs.driver.stats(job_id).pids_current == 20
        await jobs.driver.kill_all(job_id, 5)
        assert jobs.driver.pids(job_id) == []
        assert await proc.wait() == -signal.SIGKILL
        await jobs.driver.remove(job_id)


# --- killing ----------------------------------------------------------------------------------

BACKGROUND = "sleep 60 & setsid sh -c 'sleep 60 & echo ready; wait' & wait"


async def test_kill_all_kills_background_and_setsid_processes(jobs: Jobs) -> None:
    with trio.fail_after(20):
        job_id = jobs.create(Limits())
        proc, lines = await jobs.start(job_id, "sh", "-c", BACKGROUND)
        assert await lines.next() == "ready"
        pids = jobs.driver.pids(job_id)
        assert proc.pid in pids and len(pids) == 4
        assert len({os.getsid(p) for p in pids}) == 2, "the setsid'd shell has a session of its own"
        await jobs.driver.kill_all(job_id, 5)
        assert jobs.driver.pids(job_id) == []
        assert await proc.wait() == -signal.SIGKILL
        await wait_exited(pids)
        await jobs.driver.remove(job_id)
        assert [p for p in jobs.driver.parent_dirs() if (p / job_id).exists()] == []


async def test_signal_all_reaches_every_process(jobs: Jobs) -> None:
    with trio.fail_after(20):
        job_id = jobs.create(Limits())
        proc, lines = await jobs.start(job_id, "sh", "-c", BACKGROUND)
        assert await lines.next() == "ready"
        pids = jobs.driver.pids(job_id)
        assert len(pids) == 4
        jobs.driver.signal_all(job_id, signal.SIGTERM)
        assert await proc.wait() == -signal.SIGTERM
        # None of them ignores SIGTERM: all die of it, grandchildren included, without kill_all.
        await wait_exited(pids)
        assert jobs.driver.pids(job_id) == []
        await jobs.driver.remove(job_id)


async def test_kill_all_out_of_time_names_the_survivors(jobs: Jobs) -> None:
    with trio.fail_after(20):
        job_id = jobs.create(Limits())
        proc, _ = await jobs.start(job_id, "sleep", "60")
        with pytest.raises(TimeoutError, match=f"{job_id}.*{proc.pid}"):
            await jobs.driver.kill_all(job_id, 0)
        assert proc.returncode is None
        await jobs.finish(job_id)
        assert await proc.wait() == -signal.SIGKILL


FORK_BOMB = """
import os
me = os.getpid()
while True:
    try:
        os.fork()
    except BlockingIOError:
        if os.getpid() == me:
            print("full", flush=True)
            me = 0
"""


@pytest.mark.parametrize("method", ["default", "freezer"])
async def test_kill_all_stops_a_fork_bomb(
    jobs: Jobs, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = jobs.driver
    if method == "freezer":
        # Take away cgroup.kill (v2, Linux 5.14+) to test the freeze/kill/thaw path on v2 as well;
        # on v1 it is the only path anyway.
        files = driver._kill_files
        monkeypatch.setattr(driver, "_kill_files", lambda j: attrs.evolve(files(j), kill=None))
    with trio.fail_after(20):
        job_id = jobs.create(Limits(pids_max=30, cpu_percent=50))
        proc, lines = await jobs.start(job_id, sys.executable, "-c", FORK_BOMB)
        assert await lines.next() == "full"
        await driver.kill_all(job_id, 10)
        assert driver.pids(job_id) == []
        assert await proc.wait() == -signal.SIGKILL
        await driver.remove(job_id)


@pytest.fixture
def v2_host() -> None:
    """Skip unless this is a cgroup v2 host (a sync fixture, so the reason is kept)."""
    require_root()
    if not V2_HOST:
        pytest.skip(
            f"cgroup v2 is not mounted at {CGROUP_ROOT} (this host is cgroup v1): "
            "the cgroup2 tests run in the v2 VM"
        )


@pytest.mark.cgroup2
@pytest.mark.usefixtures("v2_host")
async def test_v2_setup_moves_the_daemon_out_of_the_groups_it_needs() -> None:
    """cgroup v2 lets only leaves hold processes: a daemon living in its own parent group
    moves itself to a leaf; a stranger in there is reported, not moved.

    This test process plays the daemon (a fresh Python importing trio takes half a minute in
    the emulated VM), and goes back to its own group at the end.
    """
    parent = f"joblet-test-{secrets.token_hex(4)}"
    group = CGROUP_ROOT / parent
    home_path = _own_v2_group()
    home = CGROUP_ROOT / home_path.lstrip("/")
    driver = detect_driver(CgroupSection(driver="v2", parent=parent))
    with trio.fail_after(20):
        group.mkdir()
        try:
            _move_self(group)
            driver.setup()
            assert _own_v2_group() == f"/{parent}/joblet-daemon"
            driver.create("job-1", Limits())
            assert driver.job_groups() == ["job-1"]
            await driver.remove("job-1")
            # Undo setup's work, so a process may join the group itself again.
            _move_self(home)
            (group / "joblet-daemon").rmdir()
            enabled = _read(group / "cgroup.subtree_control").split()
            (group / "cgroup.subtree_control").write_text(" ".join(f"-{c}" for c in enabled))

            async with trio.open_nursery() as nursery:
                stranger = await nursery.start(_run_in_group, group)
                with pytest.raises(CgroupUnavailable, match=f"holds processes {stranger} "):
                    driver.setup()
                assert _own_v2_group() == home_path, "setup moved the daemon although it failed"
                nursery.cancel_scope.cancel()
        finally:
            _move_self(home)
            for leftover in (group / "joblet-daemon", group):
                if leftover.exists():
                    leftover.rmdir()


def _own_v2_group() -> str:
    text = Path("/proc/self/cgroup").read_text()
    return next(line[3:] for line in text.splitlines() if line.startswith("0::"))


def _move_self(group: Path) -> None:
    (group / "cgroup.procs").write_text(str(os.getpid()))


async def _run_in_group(group: Path, *, task_status: trio.TaskStatus[int]) -> None:
    """Run a sleeping process in ``group`` until cancelled; reports its PID once it is in."""
    proc = await trio.lowlevel.open_process(
        ["sh", "-c", f"echo $$ > {group}/cgroup.procs; echo in; exec sleep 60"],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        assert await Lines(proc.stdout).next() == "in"
        task_status.started(proc.pid)
        await proc.wait()
    finally:
        proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()
            await proc.stdout.aclose()


async def test_kill_all_and_remove_of_a_missing_group_do_nothing(jobs: Jobs) -> None:
    with trio.fail_after(5):
        await jobs.driver.kill_all("job-never-created", 1)
        await jobs.driver.remove("job-never-created")
        assert jobs.driver.pids("job-never-created") == []
        with pytest.raises(FileNotFoundError):
            jobs.driver.stats("job-never-created")


async def test_remove_retries_a_busy_group_while_other_tasks_run(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group that is still busy is retried without holding up the event loop: here the task
    that empties it runs between the attempts, and the removal then succeeds."""
    # Retries for far longer than the test needs: only a blocked loop could exhaust them.
    monkeypatch.setattr(files, "RMDIR_ATTEMPTS", 5_000)
    attempts: list[bool] = []
    first_busy = trio.Event()
    try_rmdir = files.try_rmdir

    def spy(group: Path) -> bool:
        gone = try_rmdir(group)
        attempts.append(gone)
        if not gone:
            first_busy.set()
        return gone

    monkeypatch.setattr(files, "try_rmdir", spy)
    with trio.fail_after(20):
        job_id = jobs.create(Limits())
        proc, _ = await jobs.start(job_id, "sleep", "60")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(jobs.driver.remove, job_id)
            await first_busy.wait()
            # The removal is under way and the group still there: this task empties it.
            assert [p for p in jobs.driver.parent_dirs() if (p / job_id).exists()] != []
            proc.kill()
            assert await proc.wait() == -signal.SIGKILL
        assert [p for p in jobs.driver.parent_dirs() if (p / job_id).exists()] == []
        assert attempts.count(False) >= 1 and attempts[-1] is True
