"""Stage 1 of a job start: runs in ``python -I -S`` between the daemon and the job.

The daemon starts it with a one-line bootstrap that appends this directory to ``sys.path`` and
imports this module (see :data:`joblet.sys.launch.STAGE1_BOOT`), so the interpreter loads cached
bytecode instead of compiling the file on every start, as it would for a script. It uses the
standard library only (no site-packages, no joblet imports) and imports nothing it does not run,
so it stays small and fast: every module imported here is paid for on every job start. It runs as
root in the daemon's namespaces. The daemon may start it well before there is a job for it (the
pool of :class:`joblet.sys.launch.Stage1Pool`): nothing about a job reaches it before its spec.

1. It waits for the job's launch spec on the status socket (its fd number is ``argv[1]``): one
   message, a 4-byte big-endian length and a ``marshal`` document (builtin, so nothing to
   import; the daemon runs the same interpreter). EOF instead means the daemon is gone or let it
   go: it exits at once, having done nothing. Once it has the spec it writes :data:`ACK`: from
   then on the job is this process's, and the daemon never hands it to another one;
2. joins the job's cgroup(s) by writing ``0`` (itself) to each group's join file, then verifies
   ``/proc/self/cgroup``, so that nothing the job does can escape its limits (the only race-free
   way on cgroup v1). On v1 that is the ``tasks`` file, which moves the writing thread without
   the kernel's global threadgroup lock (after an idle moment, taking that lock waits for an RCU
   grace period): stage 1 has a single thread, checked before it joins, so the whole process
   moves;
3. unshares the mount, UTS, IPC and cgroup namespaces (and network, when the job asks for none),
   builds the job root (read-only binds of the system directories, a writable ``/work``, a private
   ``/tmp``, a minimal ``/dev``), sets the hostname to the job id and sets no_new_privs;
4. resolves the command inside the job root, builds a clean environment (never the daemon's), closes
   inherited descriptors and execs util-linux ``unshare`` to create the PID namespace, mount a fresh
   ``/proc``, chroot and drop to the unprivileged uid/gid; ``unshare`` then execs ``dumb-init`` as
   PID 1 of the job, which runs the command as its child, forwards signals and reaps zombies.

The status socket is close-on-exec: after the :data:`ACK`, the daemon sees EOF exactly when the
exec succeeded. Any failure before that is written to it as one line of text and the process exits
with status 127.
"""

from __future__ import annotations

import ctypes
import marshal
import os
import sys

# Not `from typing import TYPE_CHECKING`: importing typing (with re, enum, functools, collections)
# costs more per job start than all the rest of stage 1's imports (docs/performance.md).
TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only
    from typing import Any, BinaryIO, NoReturn

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

PR_SET_NO_NEW_PRIVS = 38

#: Written to the status socket once the launch spec is in: the job is this process's from then on.
#: The same byte as :data:`joblet.sys.launch.ACK`.
ACK = b"\x06"
#: Size of the length that precedes a message from the daemon (big-endian).
HEADER_SIZE = 4

DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
JOB_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    """A start step failed; the message goes to the daemon."""


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")


def _mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    _check(
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def _bind(source: str, target: str, *, readonly: bool, extra: int = 0) -> None:
    _mount(source, target, None, MS_BIND | MS_REC)
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | extra
    if readonly:
        flags |= MS_RDONLY
    _mount(None, target, None, flags)


def join_cgroups(membership: list[list[str]]) -> None:
    """Write ``0`` (ourselves) into each join file, then check /proc/self/cgroup agrees.

    On cgroup v1 the join files are ``tasks`` files, which move the writing thread only, without
    the kernel's global lock that costs an RCU grace period after an idle moment (see
    ``CgroupDriver.membership``): that moves the whole process only because it has no other
    thread, which is checked first.
    """
    threads = os.listdir("/proc/self/task")
    if len(threads) != 1:
        raise SetupError(f"cgroup join refused: stage 1 has {len(threads)} threads, not 1")
    for join_file, _controller, _expected in membership:
        try:
            fd = os.open(join_file, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        except OSError as e:
            raise SetupError(f"cgroup join failed: {join_file}: {e.strerror}") from None
    with open("/proc/self/cgroup") as f:
        lines = f.read().splitlines()
    actual: dict[str, str] = {}
    for line in lines:
        _hid, controllers, path = line.split(":", 2)
        actual[controllers] = path
        for c in controllers.split(","):
            actual.setdefault(c, path)
    for _procs, controller, expected in membership:
        if actual.get(controller) != expected:
            raise SetupError(
                f"cgroup verification failed: {controller or 'unified'} is "
                f"{actual.get(controller)!r}, expected {expected!r}"
            )


def build_root(spec: dict[str, Any]) -> None:
    """Create the job's root filesystem inside our private mount namespace."""
    root = spec["root"]
    _mount("none", "/", None, MS_REC | MS_PRIVATE)
    _mount("joblet-root", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for src in spec["system_dirs"]:
        if not os.path.lexists(src):
            continue
        dst = root + src
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            os.makedirs(dst, exist_ok=True)
            _bind(src, dst, readonly=True, extra=MS_NODEV)
    os.makedirs(root + "/etc", exist_ok=True)
    for src in spec["etc_files"]:
        try:
            with open(src, "rb") as f:
                data = f.read()
        except OSError:
            continue
        with open(root + src, "wb") as f:
            f.write(data)
    uid, gid = spec["uid"], spec["gid"]
    with open(root + "/etc/passwd", "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\n")
        if uid != 0:
            f.write(f"job:x:{uid}:{gid}:joblet job:/work:/bin/sh\n")
    with open(root + "/etc/group", "w") as f:
        f.write("root:x:0:\n")
        if gid != 0:
            f.write(f"job:x:{gid}:\n")
    with open(root + "/etc/hostname", "w") as f:
        f.write(spec["hostname"] + "\n")
    # /work: the job's writable working directory, on the real disk (IO limits apply to it).
    os.mkdir(root + "/work")
    _bind(spec["work"], root + "/work", readonly=False, extra=MS_NODEV)
    os.mkdir(root + "/tmp")
    _mount(
        "joblet-tmp",
        root + "/tmp",
        "tmpfs",
        MS_NOSUID | MS_NODEV,
        f"mode=1777,size={spec['tmp_size_mb']}m",
    )
    dev = root + "/dev"
    os.mkdir(dev)
    _mount("joblet-dev", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")
    for node in DEV_NODES:
        if os.path.exists("/dev/" + node):
            open(dev + "/" + node, "w").close()
            _bind("/dev/" + node, dev + "/" + node, readonly=False, extra=MS_NOEXEC)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, dev + "/" + name)
    os.mkdir(dev + "/shm")
    _mount("joblet-shm", dev + "/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=16m")
    os.mkdir(root + "/proc")
    # The job's PID 1: dumb-init, bound read-only at a fixed path inside the root.
    os.mkdir(root + "/.joblet")
    init = root + "/.joblet/init"
    open(init, "w").close()
    _bind(spec["init"], init, readonly=True, extra=MS_NODEV)
    # Nothing may be created at the top of the job root.
    _mount(None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def resolve_command(root: str, command: str, path: str) -> str:
    """Find the command inside the job root, as the job's PATH lookup would."""
    if "/" in command:
        candidates = [command if command.startswith("/") else "/work/" + command]
    else:
        candidates = [d.rstrip("/") + "/" + command for d in path.split(":") if d]
    for cand in candidates:
        host = root + cand
        if os.path.isfile(host) and os.access(host, os.X_OK):
            return cand
    if "/" in command:
        raise SetupError(f"command not found or not executable: {command}")
    raise SetupError(f"command not found: {command}")


def receive(status: BinaryIO) -> dict[str, Any] | None:
    """Wait for the daemon's message: a length, then that many bytes of ``marshal``.

    Returns:
        The message, or None at EOF before its first byte (the daemon is gone, or let us go).
    """
    header = _read_exactly(status, HEADER_SIZE)
    if not header:
        return None
    size = int.from_bytes(header, "big")
    body = _read_exactly(status, size)
    if len(header) < HEADER_SIZE or len(body) < size:
        raise SetupError("launch spec truncated")
    message: dict[str, Any] = marshal.loads(body)
    return message


def _read_exactly(status: BinaryIO, size: int) -> bytes:
    """``size`` bytes, or fewer at EOF."""
    data = b""
    while len(data) < size:
        part = status.read(size - len(data))
        if not part:
            break
        data += part
    return data


def main() -> None:
    """Run stage 1; never returns on success (it execs)."""
    status_fd = int(sys.argv[1])
    status = os.fdopen(status_fd, "r+b", buffering=0)
    try:
        try:
            spec = receive(status)
        except KeyboardInterrupt:
            spec = None  # a Ctrl-C meant for the daemon, in its process group
        if spec is None:
            os._exit(0)  # no job was given: nothing was done
        status.write(ACK)
        os.set_inheritable(status_fd, False)
        join_cgroups(spec["membership"])
        flags = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWCGROUP
        if spec["network"] == "none":
            flags |= CLONE_NEWNET
        _check(_libc.unshare(ctypes.c_int(flags)), "unshare")
        name = spec["hostname"].encode()
        _check(_libc.sethostname(name, ctypes.c_size_t(len(name))), "sethostname")
        if spec["network"] == "none":
            # A new network namespace has only a down loopback; bring it up so local servers work.
            _loopback_up()
        build_root(spec)
        command = resolve_command(spec["root"], spec["command"], JOB_PATH)
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(no_new_privs)")
        env = {"PATH": JOB_PATH, "HOME": "/work", "LANG": "C.UTF-8", "HOSTNAME": spec["hostname"]}
        env["JOBLET_JOB_ID"] = spec["job_id"]
        env.update(spec["env"])
        argv = [
            "unshare",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "--root=" + spec["root"],
            "--wd=/work",
            "--setgid",
            str(spec["gid"]),
            "--setuid",
            str(spec["uid"]),
            "--",
            "/.joblet/init",
            "--",
            command,
            *spec["args"],
        ]
        _close_fds_except(status_fd)
        os.execve(spec["unshare"], argv, env)
    except SetupError as e:
        _fail(status, str(e))
    except Exception as e:  # report anything at all rather than a silent death
        _fail(status, f"{type(e).__name__}: {e}")


def _loopback_up() -> None:
    import fcntl
    import socket
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(s, siocgifflags, ifreq))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH14s", b"lo", flags | iff_up, b""))


def _close_fds_except(keep: int) -> None:
    """Close every inherited descriptor but stdio and ``keep`` (which is close-on-exec)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the listdir's own descriptor, already gone


def _fail(status: BinaryIO, message: str) -> NoReturn:
    try:
        status.write(message.encode("utf-8", "replace")[:4000])
    finally:
        os._exit(127)


if __name__ == "__main__":
    main()
    sys.exit(127)
