"""The host's real block devices, the ones an I/O limit has to name.

cgroup I/O limits are per device ("MAJ:MIN"), so a limit only holds if it is written for every disk
a job can reach. The device numbers are read from sysfs, never assumed: the Go joblet hard-coded
``8:0``, which is not even a disk on a virtio machine (whose root disk is ``vda``, 254:0).
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs

#: Device name prefixes that are never real disks: loop files, RAM disks and compressed swap.
#: Throttling them is pointless, and the kernel refuses some of them (zram is not throttle-able).
VIRTUAL_PREFIXES: tuple[str, ...] = ("loop", "ram", "zram")


@attrs.frozen
class BlockDevice:
    """One whole-disk block device.

    Attributes:
        name: Kernel name, e.g. ``"vda"``.
        major: Major device number.
        minor: Minor device number.
        sectors: Size in 512-byte sectors (always > 0).
    """

    name: str
    major: int
    minor: int
    sectors: int

    @property
    def majmin(self) -> str:
        """``"MAJ:MIN"``, as cgroup limit files want it."""
        return f"{self.major}:{self.minor}"


def block_devices(sys_block: str | os.PathLike[str] = "/sys/block") -> list[BlockDevice]:
    """The real whole disks of the host, in name order.

    /sys/block lists whole disks only (partitions live below them), so throttling each of these
    covers every partition: the cgroup I/O controllers account a partition's I/O to its disk.

    Args:
        sys_block: Where sysfs lists block devices (a parameter so tests can point at a fake tree).

    Returns:
        Every disk that is not a loop, RAM or zram device, not hidden, and has a non-zero size
        (which drops empty CD drives and unconnected nbd devices).
    """
    found = []
    for entry in sorted(Path(sys_block).iterdir()):
        if entry.name.startswith(VIRTUAL_PREFIXES):
            continue
        try:
            sectors = int((entry / "size").read_text())
            major, minor = (int(n) for n in (entry / "dev").read_text().strip().split(":"))
        except (OSError, ValueError):
            # A device that disappears while we look (hot unplug) or has no readable numbers
            # cannot be throttled anyway.
            continue
        if _is_hidden(entry):
            # NVMe multipath paths (nvme0c0n1): I/O goes through their visible head device.
            continue
        if sectors > 0:
            found.append(BlockDevice(entry.name, major, minor, sectors))
    return found


def _is_hidden(entry: Path) -> bool:
    try:
        return (entry / "hidden").read_text().strip() == "1"
    except OSError:
        return False  # older kernels have no "hidden" attribute


def block_device_numbers(sys_block: str | os.PathLike[str] = "/sys/block") -> list[str]:
    """``"MAJ:MIN"`` of every real whole disk; see :func:`block_devices`."""
    return [d.majmin for d in block_devices(sys_block)]


def disk_for_path(
    path: str | os.PathLike[str], sys_block: str | os.PathLike[str] = "/sys/block"
) -> BlockDevice | None:
    """The real whole disk that holds the file system of ``path``, if there is one.

    Args:
        path: Any existing file or directory.
        sys_block: Where sysfs lists block devices.

    Returns:
        The disk (the parent disk when the file system sits on a partition), or None when the file
        system is not on a real disk (tmpfs, overlay, 9p, btrfs' anonymous device numbers...).
    """
    dev = os.stat(path).st_dev
    node = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    try:
        real = node.resolve(strict=True)
    except OSError:
        return None
    # A partition's sysfs directory sits inside its disk's directory.
    name = real.parent.name if (real / "partition").exists() else real.name
    return next((d for d in block_devices(sys_block) if d.name == name), None)
