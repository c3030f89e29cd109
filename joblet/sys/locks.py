"""Exclusive locks a daemon holds for its whole life: its state directory and its cgroup parent.

Two daemons on one state directory would write the same job database and log files; two on one
cgroup parent would sweep each other's job groups at start-up (recovery removes every group under
the parent). So a daemon takes an exclusive ``flock`` on each before it touches either, and keeps
it until it exits; the kernel drops the lock when the process dies, however it dies, so a
crashed daemon never leaves a stale lock behind. A second daemon refuses to start, naming the path
and the holder's pid (read from ``/proc/locks``).

The state directory is locked through a file in it (holding the owner's pid, for people); the
cgroup parent through its directory in the cgroup file system itself (``flock`` works on any open
directory), so the lock covers every daemon on the host whatever its state directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

PROC_LOCKS = Path("/proc/locks")


class LockHeld(Exception):
    """Another process holds the lock.

    Attributes:
        path: What is locked.
        pid: The holder's pid, or None if it could not be found.
    """

    def __init__(self, what: str, path: Path, pid: int | None) -> None:
        holder = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(f"{what} {path} is in use by another joblet daemon ({holder})")
        self.path = path
        self.pid = pid


def flock_holder(locks_text: str, dev: int, ino: int) -> int | None:
    """The pid holding a ``flock`` on the file ``(dev, ino)``, from ``/proc/locks``' text.

    Lines look like ``1: FLOCK  ADVISORY  WRITE 14051 00:1d:8277 0 EOF``; device numbers are hex,
    the inode decimal. Lines of waiters (``1: -> FLOCK ...``) are skipped.
    """
    want = f"{os.major(dev):02x}:{os.minor(dev):02x}:{ino}"
    for line in locks_text.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == want:
            try:
                return int(fields[4])
            except ValueError:
                return None
    return None


def _holder(fd: int) -> int | None:
    st = os.fstat(fd)
    try:
        text = PROC_LOCKS.read_text()
    except OSError:
        return None
    return flock_holder(text, st.st_dev, st.st_ino)


@contextlib.contextmanager
def hold(
    path: Path, what: str, *, shown: Path | None = None, directory: bool = False
) -> Iterator[int]:
    """Hold an exclusive lock on ``path`` for the ``with`` block; yields the open descriptor.

    Args:
        path: A file (created if missing, and given our pid) or, with ``directory``, an existing
            directory.
        what: How the error names what is locked ("state directory", "cgroup parent").
        shown: The path the error names (default ``path``).
        directory: Lock the directory itself.

    Raises:
        LockHeld: Another process holds it.
        OSError: It cannot be opened.
    """
    if directory:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise LockHeld(what, shown or path, _holder(fd)) from None
        if not directory:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold_state_dir(state_dir: Path, lock_file: Path) -> Iterator[int]:
    """Hold the state directory's lock (``lock_file``, ``StateLayout.lock``); creates the directory.

    Raises:
        LockHeld: Another daemon uses the directory.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    with hold(lock_file, "state directory", shown=state_dir) as fd:
        yield fd
