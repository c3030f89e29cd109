"""Files on cgroupfs: single-write values, tolerant reads, and the walks and removals that wait.

cgroupfs lives in memory: reading or writing one of its files never waits for a disk, so the
drivers do it directly. What may take longer runs off the event loop: :func:`walk` lists a group
tree in a worker thread, and :func:`rmdir` waits for a busy group with ``trio.sleep`` between
attempts.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

import trio

from joblet.core.cpus import parse_cpu_list
from joblet.sys.cgroups import parse

#: ``rmdir`` of a group whose last task is still being torn down can fail with EBUSY for a moment.
RMDIR_ATTEMPTS = 20
RMDIR_RETRY_DELAY = 0.002


def write(path: Path, value: str) -> None:
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


def read_or(path: Path, default: str = "") -> str:
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


def read_files(group: Path, names: Iterable[str]) -> dict[str, str]:
    """The texts of those of ``names`` that exist in ``group``, by name."""
    texts: dict[str, str] = {}
    for name in names:
        try:
            texts[name] = (group / name).read_text()
        except FileNotFoundError:
            continue
        except OSError as e:
            if e.errno != errno.ENODEV:  # see read_or
                raise
    return texts


def procs(group: Path) -> list[int]:
    """The processes of one group (not of its sub-groups); [] when it does not exist."""
    return parse.pid_list(read_or(group / "cgroup.procs"))


def tree(top: Path) -> list[Path]:
    """``top`` and every group below it, parents before children; [] when ``top`` is missing.

    A directory walk; on cgroupfs (in memory) cheap enough for the event loop.
    """
    if not top.is_dir():
        return []
    found = [top]
    for dirpath, dirnames, _files in os.walk(top):
        found.extend(Path(dirpath, d) for d in dirnames)
    return found


async def rmdir(group: Path) -> None:
    """Remove an empty group; missing is fine, EBUSY is retried briefly.

    Between attempts the loop runs other tasks (a worker thread would hold a thread token for
    the whole wait and could not be cancelled); each attempt is one rmdir(2) on cgroupfs, which
    never waits for a disk.

    Raises:
        OSError: EBUSY after :data:`RMDIR_ATTEMPTS` attempts, or any other error at once.
    """
    for _ in range(RMDIR_ATTEMPTS - 1):
        if try_rmdir(group):
            return
        # The last task may still be leaving the group (its exit is not complete yet).
        await trio.sleep(RMDIR_RETRY_DELAY)
    if not try_rmdir(group):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(group))


def try_rmdir(group: Path) -> bool:
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


def rmdir_quietly(group: Path) -> None:
    """Undo a half-made group; the error that made us undo it is the one to report.

    One attempt, no retry: no process has joined a group that is still being made, so it is
    never busy.
    """
    try:
        try_rmdir(group)
    except OSError:
        pass


def mounts() -> list[parse.Mount]:
    """The mounts of our mount namespace, from ``/proc/self/mountinfo``."""
    return parse.mountinfo(read_or(Path("/proc/self/mountinfo")))


def online_cpus() -> set[int]:
    """The host's online CPUs (those we may run on, if the kernel does not say)."""
    text = read_or(Path("/sys/devices/system/cpu/online")).strip()
    return parse_cpu_list(text) if text else set(os.sched_getaffinity(0))
