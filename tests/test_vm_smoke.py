"""The cgroup v2 VM of `just test-cgroup2`: a real v2 kernel with the controllers joblet uses."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

CGROUP2 = Path("/sys/fs/cgroup")
CONTROLLERS = {"cpu", "memory", "io", "pids"}


def a_whole_disk() -> tuple[str, str]:
    """(name, "major:minor") of the disk under /var/tmp, else of any real disk: io.max needs one."""
    st = os.stat("/var/tmp")
    backing = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    disks = [
        (d.name, (d / "dev").read_text().strip())
        for d in sorted(Path("/sys/block").iterdir())
        if not d.name.startswith(("loop", "ram", "zram", "nbd"))
    ]
    for name, dev in disks:
        if dev == backing:
            return name, dev
    if not disks:
        pytest.fail("no block device in /sys/block")
    return disks[0]


@pytest.mark.cgroup2
def test_cgroup_v2_kernel_creates_limits_and_removes_a_group() -> None:
    if not (CGROUP2 / "cgroup.controllers").exists():
        pytest.skip("not cgroup v2 (no /sys/fs/cgroup/cgroup.controllers): run just test-cgroup2")
    if os.geteuid() != 0:
        pytest.skip("needs root")
    available = set((CGROUP2 / "cgroup.controllers").read_text().split())
    assert available >= CONTROLLERS, f"controllers missing: {CONTROLLERS - available}"

    enabled = set((CGROUP2 / "cgroup.subtree_control").read_text().split())
    if CONTROLLERS - enabled:
        (CGROUP2 / "cgroup.subtree_control").write_text(
            " ".join(f"+{c}" for c in sorted(CONTROLLERS - enabled))
        )
    group = CGROUP2 / f"joblet-smoke-{os.getpid()}"
    group.mkdir()
    sleeper = None
    try:
        assert set((group / "cgroup.controllers").read_text().split()) >= CONTROLLERS
        disk, dev = a_whole_disk()
        limits = {
            "memory.max": ("67108864", "67108864"),
            "cpu.max": ("50000 100000", "50000 100000"),
            "pids.max": ("16", "16"),
            "io.max": (f"{dev} wbps=1048576", f"{dev} rbps=max wbps=1048576 riops=max wiops=max"),
        }
        for name, (value, _) in limits.items():
            (group / name).write_text(value + "\n")
        got = {name: (group / name).read_text().strip() for name in limits}
        assert got == {name: shown for name, (_, shown) in limits.items()}, f"disk {disk}"

        sleeper = subprocess.Popen(["sleep", "60"])
        (group / "cgroup.procs").write_text(str(sleeper.pid))
        name = group.name
        assert Path(f"/proc/{sleeper.pid}/cgroup").read_text() == f"0::/{name}\n"
        assert (group / "cgroup.procs").read_text().split() == [str(sleeper.pid)]
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
        # The cgroup is freed a moment after its last process is reaped.
        for _ in range(100):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.05)
    assert not group.exists()
