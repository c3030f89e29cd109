"""What confines every job beyond its namespaces and cgroup: resource limits, Landlock, seccomp.

The node builds one :class:`Confinement` at start-up from ``isolation:`` (the seccomp program is
compiled once, the kernel's Landlock ABI is asked once) and every job's launch spec carries it to
stage 1, which applies it after dropping privileges (``_stage1.py``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource

import attrs

#: Where a job may change the filesystem (paths inside its root); Landlock denies the rest.
WRITABLE = ("/work", "/tmp", "/dev/shm")
#: Locked memory a job may pin (``RLIMIT_MEMLOCK``): the kernel's default for an unprivileged
#: user. Memory is charged to the job's cgroup either way; the bound keeps a job from pinning it.
MEMLOCK_BYTES = 8 << 20

_SYS_LANDLOCK_CREATE_RULESET = 444
_LANDLOCK_CREATE_RULESET_VERSION = 1


@attrs.frozen
class Confinement:
    """The node-wide confinement of jobs.

    Attributes:
        seccomp: The syscall filter's profile name: ``default``, ``off``, or the profile's path.
        seccomp_bpf: The compiled filter (classic BPF, as the kernel takes it); empty when off.
        landlock: The Landlock ABI version jobs are confined with; 0 when off or unsupported.
        rlimits: ``(resource, soft, hard)`` set in every job before it drops privileges.
    """

    seccomp: str = "off"
    seccomp_bpf: bytes = b""
    landlock: int = 0
    rlimits: tuple[tuple[int, int, int], ...] = ()


def job_rlimits(max_open_files: int) -> tuple[tuple[int, int, int], ...]:
    """The resource limits of a job, hard limits included, so an unprivileged job cannot raise
    them: no core dumps (they would land in ``/work``), ``max_open_files`` descriptors, the
    default locked memory, and neither real-time scheduling nor a raised priority.

    Per-user counters (``RLIMIT_NPROC``, ``RLIMIT_SIGPENDING``) are left as they are: every job
    shares one uid, so a per-user limit would be shared by all jobs; the pids cgroup bounds a
    job's processes instead.
    """
    return (
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_NOFILE, max_open_files, max_open_files),
        (resource.RLIMIT_MEMLOCK, MEMLOCK_BYTES, MEMLOCK_BYTES),
        (resource.RLIMIT_RTPRIO, 0, 0),
        (resource.RLIMIT_NICE, 0, 0),
    )


def landlock_abi() -> int:
    """The running kernel's Landlock ABI version, or 0 when Landlock is missing or disabled."""
    libc = ctypes.CDLL(None, use_errno=True)
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    version = syscall(
        ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET),
        None,
        ctypes.c_size_t(0),
        ctypes.c_long(_LANDLOCK_CREATE_RULESET_VERSION),
    )
    if version < 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EOPNOTSUPP):
            return 0
        raise OSError(err, f"landlock_create_ruleset(VERSION): {os.strerror(err)}")
    return int(version)


def build_confinement(*, seccomp: str, landlock: bool, max_open_files: int) -> Confinement:
    """The node's confinement of jobs from the ``isolation:`` settings.

    Args:
        seccomp: ``isolation.seccomp``: ``default``, ``off`` or a Docker-format profile's path.
        landlock: Whether to use Landlock where the kernel has it.
        max_open_files: ``isolation.maxOpenFiles``.

    Raises:
        SeccompProfileError: The profile cannot be read or compiled; the message says why.
    """
    from joblet.sys.seccomp import load_profile  # libseccomp: only when a node starts

    profile = load_profile(seccomp)
    return Confinement(
        seccomp=profile.name,
        seccomp_bpf=profile.bpf,
        landlock=landlock_abi() if landlock else 0,
        rlimits=job_rlimits(max_open_files),
    )
