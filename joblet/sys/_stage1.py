"""Stage 1 of a job start: runs in ``python -I -S`` between the daemon and the job.

The daemon starts it with a one-line bootstrap that appends this directory to ``sys.path`` and
imports this module (see :data:`joblet.sys.launch.STAGE1_BOOT`), so the interpreter loads cached
bytecode instead of compiling the file on every start, as it would for a script. It uses the
standard library only (no site-packages, no joblet imports) and imports nothing it does not run,
so it stays small and fast: every module imported here is paid for on every job start. It runs as
root, as PID 1 of a fresh PID namespace (util-linux ``unshare --pid --fork --kill-child`` is its
parent, the process the daemon holds), otherwise in the daemon's namespaces. The daemon may start
it well before there is a job for it (the pool of :class:`joblet.actors.prestart.Stage1Pool`):
nothing about a job reaches it before its spec.

1. It waits for the job's launch spec on the start socket (its fd number is ``argv[1]``): one
   message, a 4-byte big-endian length and a ``marshal`` document (builtin, so nothing to
   import; the daemon runs the same interpreter), with the report socket attached (see
   :func:`receive`). EOF instead means the daemon is gone or let it go: it exits at once, having
   done nothing. Once it has the spec it writes :data:`ACK` to the report socket: from then on
   the job is this process's, and the daemon never hands it to another one;
2. joins the job's cgroup(s) by writing ``0`` (itself) to each group's join file, then verifies
   ``/proc/self/cgroup``, so that nothing the job does can escape its limits (the only race-free
   way on cgroup v1). On v1 that is the ``tasks`` file, which moves the writing thread without
   the kernel's global threadgroup lock (after an idle moment, taking that lock waits for an RCU
   grace period): stage 1 has a single thread, checked before it joins, so the whole process
   moves;
3. unshares the mount, UTS, IPC and cgroup namespaces (and network, when the job asks for none),
   builds the job root (read-only binds of the system directories, a writable ``/work``, a private
   ``/tmp``, a minimal ``/dev``, a ``/proc`` of its own PID namespace) and sets the hostname to the
   job id;
4. resolves the command inside the job root, chroots into it, sets the job's resource limits
   (:func:`set_rlimits`), drops to the unprivileged uid/gid with no supplementary groups, asks
   to be killed when its parent dies (the credential change cleared what ``unshare`` set), sets
   no_new_privs, confines writes with Landlock when the daemon asks (:func:`landlock`), builds
   a clean environment (never the daemon's), closes inherited descriptors, installs the seccomp
   filter (the BPF program the daemon compiled once; ``_filter.py``) and, as its very last step,
   execs ``dumb-init`` as the job's PID 1, which runs the command as its child, forwards signals
   and reaps zombies. Nothing but the job ever runs under the filter.

The report socket is close-on-exec: after the :data:`ACK`, the daemon sees EOF exactly when the
exec succeeded. Any failure before that is written to it as one line of text and the process exits
with status 127.
"""

from __future__ import annotations

import _socket
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

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
SIGKILL = 9

#: Written to the report socket once the launch spec is in: the job is this process's from then on.
#: The same byte as :data:`joblet.sys.launch.ACK`.
ACK = b"\x06"
#: Size of the length that precedes a message from the daemon (big-endian).
HEADER_SIZE = 4

DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
JOB_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_libc = ctypes.CDLL(None, use_errno=True)

# The seccomp installer, imported while a pooled stage 1 still waits for its job (not on the
# start's clock, and before the chroot, outside of which this directory lies).
if TYPE_CHECKING or __package__:
    from joblet.sys import _filter  # imported as part of the package (tests, type checks)
else:
    import _filter  # stage 1 itself: a top-level module, this directory on sys.path


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
    # We are PID 1 of the job's PID namespace: this /proc shows the job's processes only.
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
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


def receive(boot_fd: int) -> tuple[dict[str, Any], int] | None:
    """Wait for the daemon's message on the start socket ``boot_fd``, then close that socket.

    The message is a length and that many bytes of ``marshal``; its first bytes carry, as
    ``SCM_RIGHTS``, the report socket: the ACK, a failure or EOF go there. The start socket
    cannot tell the daemon that the exec happened because the ``unshare`` parent holds a copy of
    it for as long as the job runs; the report socket is this process's alone (close-on-exec).

    Returns:
        The message and the report socket's descriptor, or None at EOF before the first byte
        (the daemon is gone, or let us go).

    Raises:
        SetupError: The message is incomplete.
    """
    boot = _socket.socket(fileno=boot_fd)
    try:
        data, ancdata, _flags, _addr = boot.recvmsg(
            HEADER_SIZE, _socket.CMSG_SPACE(4), _socket.MSG_CMSG_CLOEXEC
        )
        report = -1
        for level, kind, payload in ancdata:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS and len(payload) >= 4:
                report = int.from_bytes(payload[:4], sys.byteorder)
        if not data:
            return None
        if report < 0:
            raise SetupError("the launch spec came without its report socket")
        header = data + _recv_exactly(boot, HEADER_SIZE - len(data))
        size = int.from_bytes(header, "big")
        body = _recv_exactly(boot, size)
        if len(header) < HEADER_SIZE or len(body) < size:
            raise SetupError("launch spec truncated")
        message: dict[str, Any] = marshal.loads(body)
        return message, report
    finally:
        boot.close()


def _recv_exactly(sock: _socket.socket, size: int) -> bytes:
    """``size`` bytes, or fewer at EOF."""
    data = b""
    while len(data) < size:
        part = sock.recv(size - len(data))
        if not part:
            break
        data += part
    return data


def set_rlimits(rlimits: list[list[int]]) -> None:
    """Set each ``[resource, soft, hard]`` (still as root, so hard limits may go up as well).

    Through libc rather than the ``resource`` module: one import less on every start.
    """
    for res, soft, hard in rlimits:
        limit = (ctypes.c_ulong * 2)(soft, hard)
        _check(_libc.setrlimit(ctypes.c_int(res), limit), f"setrlimit({res}, {soft}, {hard})")


def drop_privileges(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` with no supplementary groups, and die with the ``unshare`` parent.

    The kernel clears the parent-death signal on a credential change, so it is set again after.
    An unprivileged job also loses every capability from its bounding set first, so nothing it
    executes can ever gain one (no_new_privs, set next, already stops setuid binaries).
    """
    if uid != 0:
        cap = 0
        while _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
            cap += 1  # EINVAL past the last capability this kernel knows
        if cap == 0:
            raise SetupError(f"prctl(PR_CAPBSET_DROP): {os.strerror(ctypes.get_errno())}")
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as e:
        raise SetupError(f"dropping to uid {uid} gid {gid}: {e.strerror}") from None
    _check(_libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "prctl(pdeathsig)")


#: Landlock (``linux/landlock.h``): the syscalls (the same number on every architecture), the
#: rights it can take away, and from which ABI version each exists.
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_RULE_PATH_BENEATH = 1
_FS_WRITE_FILE = 1 << 1
_FS_WRITES_V1 = (1 << 1) | (0x1FF << 4)  # WRITE_FILE, REMOVE_DIR ... MAKE_SYM
_FS_REFER_V2 = 1 << 13
_FS_TRUNCATE_V3 = 1 << 14
_SCOPE_V6 = (1 << 0) | (1 << 1)  # abstract unix sockets, signals: only within the job


def landlock(abi: int, writable: list[str]) -> None:
    """Confine the job's writes to ``writable`` (paths inside its root) with Landlock.

    Every way of changing the filesystem (writing, truncating, creating, removing, linking,
    renaming) is allowed beneath those directories and nowhere else, even where a mount is
    writable by mistake; ``/dev`` keeps plain writes (``/dev/null``, ``/dev/tty``). From ABI 6 on
    the job may also neither connect to abstract unix sockets nor signal processes created
    outside it. Reading is left to the mount layout. ``abi`` is the kernel's Landlock ABI version
    as the daemon found it.
    """
    handled = _FS_WRITES_V1
    if abi >= 2:
        handled |= _FS_REFER_V2
    if abi >= 3:
        handled |= _FS_TRUNCATE_V3
    scoped = _SCOPE_V6 if abi >= 6 else 0
    attr = (ctypes.c_uint64 * 3)(handled, 0, scoped)
    size = 24 if abi >= 6 else (16 if abi >= 4 else 8)
    syscall = _libc.syscall
    syscall.restype = ctypes.c_long
    ruleset = syscall(
        ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), attr, ctypes.c_size_t(size), ctypes.c_long(0)
    )
    if ruleset < 0:
        raise SetupError(f"landlock: cannot create a ruleset: {os.strerror(ctypes.get_errno())}")
    try:
        rules = [(path, handled) for path in writable]
        rules.append(("/dev", _FS_WRITE_FILE | (handled & _FS_TRUNCATE_V3)))
        for path, allowed in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                # struct landlock_path_beneath_attr is packed: u64 allowed_access, s32 parent_fd.
                rule = allowed.to_bytes(8, sys.byteorder) + fd.to_bytes(4, sys.byteorder)
                if syscall(
                    ctypes.c_long(_SYS_LANDLOCK_ADD_RULE),
                    ctypes.c_long(ruleset),
                    ctypes.c_long(_LANDLOCK_RULE_PATH_BENEATH),
                    rule,
                    ctypes.c_long(0),
                ):
                    err = os.strerror(ctypes.get_errno())
                    raise SetupError(f"landlock: cannot allow writes beneath {path}: {err}")
            finally:
                os.close(fd)
        restrict = ctypes.c_long(_SYS_LANDLOCK_RESTRICT_SELF)
        if syscall(restrict, ctypes.c_long(ruleset), ctypes.c_long(0)):
            raise SetupError(f"landlock: cannot restrict: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(ruleset)


def main() -> None:
    """Run stage 1; never returns on success (it execs)."""
    try:
        got = receive(int(sys.argv[1]))
    except KeyboardInterrupt:
        got = None  # a Ctrl-C meant for the daemon, in its process group
    except SetupError:
        os._exit(127)  # the daemon sees EOF without ACK: this stage 1 never took the job
    if got is None:
        os._exit(0)  # no job was given: nothing was done
    spec, report_fd = got
    status = os.fdopen(report_fd, "wb", buffering=0)
    try:
        status.write(ACK)
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
        bpf = spec["seccomp"]
        _check(_libc.chroot(spec["root"].encode()), "chroot")
        os.chdir("/work")
        set_rlimits(spec["rlimits"])
        drop_privileges(spec["uid"], spec["gid"])
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(no_new_privs)")
        if spec["landlock"]:
            landlock(spec["landlock"], spec["writable"])
        env = {"PATH": JOB_PATH, "HOME": "/work", "LANG": "C.UTF-8", "HOSTNAME": spec["hostname"]}
        env["JOBLET_JOB_ID"] = spec["job_id"]
        env.update(spec["env"])
        argv = ["/.joblet/init", "--", command, *spec["args"]]
        _close_fds_except(report_fd)
        if bpf:
            try:
                _filter.install(bpf)
            except OSError as e:
                raise SetupError(f"seccomp filter: {e}") from None
        os.execve("/.joblet/init", argv, env)
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
