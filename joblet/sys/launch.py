"""Starting a job's processes: the daemon side of the two-stage start.

The daemon never unshares or changes its own namespaces. It starts ``_stage1.py`` with the real
interpreter (``sys.executable -I -S``, never a PATH shim; see :data:`STAGE1_BOOT`) as the only
child of util-linux ``unshare --pid --fork --kill-child``, so stage 1 is PID 1 of a PID namespace
of its own from its first instruction; it hands stage 1 the launch spec over a socket, and learns
from the same socket that stage 1 took the spec (:data:`ACK`), then whether everything up to the
final exec worked (EOF) or what failed (one line of text). Stage 1 does every other step itself and
execs the job's PID 1 (dumb-init) last, so no helper program runs between the syscall filter and
the job. Stage 1 may be started before its job exists (:class:`Stage1`, kept ready by
:class:`joblet.actors.prestart.Stage1Pool`): it learns everything about its job from the spec. See
``_stage1.py`` for what happens on the other side.

The process the daemon holds is the ``unshare`` parent (a small C program): it waits for stage 1
(then the job's PID 1) and exits with its status; if it dies, the kernel kills the job's PID 1
(``--kill-child``, renewed by stage 1 after it drops privileges) and with it the whole namespace.
"""

from __future__ import annotations

import array
import fcntl
import functools
import marshal
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs
import trio

from joblet.core.errors import StartFailed

STAGE1 = str(Path(__file__).with_name("_stage1.py"))
#: How ``python -I -S -c`` runs stage 1: imported as a module rather than run as a script, so the
#: interpreter loads its cached bytecode (``__pycache__``, kept fresh by the import system) instead
#: of compiling the file on every job start (``docs/performance.md``). Its directory goes at the
#: end of ``sys.path``, where it cannot shadow a standard module. ``main()`` never returns (it
#: execs, or reports a failure and exits 127).
STAGE1_BOOT = (
    f"import sys; sys.path.append({str(Path(STAGE1).parent)!r}); "
    "import _stage1; _stage1.main(); sys.exit(127)"
)
#: How util-linux ``unshare`` starts stage 1: as the first process of a new PID namespace, its
#: child, killed by the kernel if ``unshare`` dies. ``unshare`` does nothing else: stage 1 mounts
#: the job's ``/proc``, chroots and drops privileges itself.
UNSHARE_ARGS = ("--pid", "--fork", "--kill-child", "--")
#: Pipe size for the job's stdout/stderr: larger pipes mean fewer wake-ups per megabyte.
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = 1031
#: Longest a stage-1 status report may be; it is one line of text.
_STATUS_MAX = 65536
#: Stage 1 writes this byte once it has the launch spec (``_stage1.ACK``): the job is its own.
ACK = b"\x06"
#: Longest a stage 1 may take from being handed its spec to exec'ing the job (it joins the
#: cgroup, unshares and builds the root: milliseconds). Past it the stage 1 is killed and the
#: start fails, instead of hanging (e.g. a waiting stage 1 someone stopped with SIGSTOP).
STAGE1_REPORT_TIMEOUT = 30.0
#: Size of the big-endian length before the launch spec on the status socket (``_stage1``).
HEADER_SIZE = 4


def find_init() -> str:
    """Path of the dumb-init binary that becomes every job's PID 1.

    Returns:
        An absolute path.

    Raises:
        StartFailed: dumb-init is not installed.
    """
    here = Path(sys.executable).parent / "dumb-init"
    if here.is_file():
        return str(here)
    found = shutil.which("dumb-init")
    if found is None:
        raise StartFailed("dumb-init not found (pip install dumb-init)")
    return found


@functools.cache
def find_unshare() -> str:
    """Path of util-linux ``unshare`` (looked up once).

    Raises:
        StartFailed: it is not installed.
    """
    for cand in ("/usr/bin/unshare", "/bin/unshare"):
        if os.access(cand, os.X_OK):
            return cand
    found = shutil.which("unshare")
    if found is None:
        raise StartFailed("util-linux unshare not found (apt-get install util-linux)")
    return found


@attrs.frozen
class LaunchSpec:
    """Everything stage 1 needs to start one job.

    Serialised with ``marshal``: stage 1 runs the same interpreter (``sys.executable``) and must not
    pay for importing ``json`` (which pulls in ``re`` and ``enum``) on every job start.
    """

    job_id: str
    command: str
    args: Sequence[str]
    env: Mapping[str, str]
    network: str
    membership: Sequence[tuple[str, str, str]]
    root: str
    work: str
    uid: int
    gid: int
    system_dirs: Sequence[str]
    etc_files: Sequence[str]
    tmp_size_mb: int
    init: str
    rlimits: Sequence[tuple[int, int, int]] = ()
    seccomp: bytes = b""
    landlock: int = 0
    writable: Sequence[str] = ()

    @property
    def hostname(self) -> str:
        """The job's hostname: its id."""
        return self.job_id

    def encode(self) -> bytes:
        """The document stage 1 reads (plain dicts, lists, strings and ints)."""
        d = attrs.asdict(self)
        d["hostname"] = self.hostname
        d["args"] = list(self.args)
        d["env"] = dict(self.env)
        d["membership"] = [list(m) for m in self.membership]
        d["system_dirs"] = list(self.system_dirs)
        d["etc_files"] = list(self.etc_files)
        d["rlimits"] = [list(r) for r in self.rlimits]
        d["writable"] = list(self.writable)
        return marshal.dumps(d)


async def spawn(spec: LaunchSpec) -> trio.Process:
    """Start a stage 1 for this job and return once its command is about to run.

    The returned process is the ``unshare`` parent of stage 1 (now the job's PID 1): it lives as
    long as the job's PID 1 and exits with its status. :meth:`Stage1.hand_over` does the same
    with a stage 1 started ahead of time (see :class:`joblet.actors.prestart.Stage1Pool`).

    Args:
        spec: The launch spec.

    Returns:
        The running process, with ``stdout`` and ``stderr`` pipes.

    Raises:
        StartFailed: Stage 1 could not be started or reported a failure (it has been reaped).
    """
    stage1 = await Stage1.start()
    try:
        return await stage1.hand_over(spec)
    except Stage1Gone as e:
        raise StartFailed(f"stage 1 exited before it took the launch spec ({e})") from None


class Stage1Gone(Exception):
    """Stage 1 ended before it took the launch spec: nothing of the job was done."""


class Stage1:
    """A started stage 1 waiting for a launch spec, not knowing which job it will run.

    Exactly what :func:`spawn` starts: ``unshare --pid --fork --kill-child`` running
    ``sys.executable -I -S`` with an empty environment, stdin on ``/dev/null``, stdout and stderr
    on pipes (they become the job's) and its end of the start socket; nothing else. It exits by
    itself at EOF on the start socket (the daemon died or closed it). Whoever holds one either
    hands it a job (:meth:`hand_over`) or closes it (:meth:`aclose`).

    Use :meth:`start` to create one.

    Attributes:
        proc: The process: the ``unshare`` parent, whose only child is the interpreter.
    """

    def __init__(self, proc: trio.Process, status: trio.SocketStream) -> None:
        self.proc = proc
        self._status = status

    @classmethod
    async def start(cls) -> Stage1:
        """Start a stage 1.

        Raises:
            StartFailed: The process could not be started.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            theirs.set_inheritable(True)
            proc = await trio.lowlevel.open_process(
                [
                    find_unshare(),
                    *UNSHARE_ARGS,
                    sys.executable,
                    "-I",
                    "-S",
                    "-c",
                    STAGE1_BOOT,
                    str(theirs.fileno()),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(theirs.fileno(),),
                env={},
                close_fds=True,
            )
        except OSError as e:
            ours.close()
            raise StartFailed(f"cannot start stage 1: {e}") from e
        finally:
            theirs.close()
        for pipe in (proc.stdout, proc.stderr):
            assert pipe is not None
            try:
                fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, PIPE_SIZE)  # type: ignore[attr-defined]
            except OSError:
                pass  # capped by /proc/sys/fs/pipe-max-size: the default size still works
        return cls(proc, trio.SocketStream(trio.socket.from_stdlib_socket(ours)))

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    @property
    def alive(self) -> bool:
        """Whether the process has not exited (reaps it if it has)."""
        return self.proc.returncode is None

    async def hand_over(self, spec: LaunchSpec) -> trio.Process:
        """Send the launch spec and return the process once the job's command is about to run.

        Consumes this object: afterwards the process is the caller's (see :func:`spawn`), or it
        has been reaped.

        The spec goes over the start socket with a fresh report socket attached (``SCM_RIGHTS``);
        stage 1's ACK, a failure or the EOF of its exec come back on that one, which nothing but
        stage 1 holds (the ``unshare`` parent holds the start socket for the job's whole life).
        Stage 1 gets :data:`STAGE1_REPORT_TIMEOUT` to exec the job.

        Raises:
            Stage1Gone: It ended before it took the spec; retrying with another stage 1 is safe.
            StartFailed: It took the spec, then reported a failure, or did not finish in time.
        """
        body = spec.encode()
        header = len(body).to_bytes(HEADER_SIZE, "big")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        report_stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        report = b""
        timeout = STAGE1_REPORT_TIMEOUT
        try:
            try:
                with trio.move_on_after(timeout) as deadline:
                    try:
                        rights = array.array("i", [theirs.fileno()])
                        await self._status.socket.sendmsg(
                            [header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)]
                        )
                        theirs.close()  # in flight now: stage 1's alone once it takes it
                        await self._status.send_all(body)
                    except (OSError, trio.BrokenResourceError):
                        pass  # it is gone: the report socket says whether it took the spec
                    theirs.close()
                    while chunk := await report_stream.receive_some(_STATUS_MAX):
                        report += chunk
                        if len(report) > _STATUS_MAX:
                            break
                if deadline.cancelled_caught:
                    await self.aclose()
                    raise StartFailed(
                        f"stage 1 did not start the job within {timeout:g}s (pid {self.pid}); "
                        "it was killed"
                    )
            except trio.BrokenResourceError:
                # ECONNRESET: it ended without reading everything it was sent.
                if report == ACK:
                    report += b"stage 1 reset its report socket"
        except BaseException:
            theirs.close()
            await report_stream.aclose()
            await self.aclose()
            raise
        await report_stream.aclose()
        if report[:1] != ACK:
            await self.aclose()
            if report:  # it could not even read the spec
                raise StartFailed(report.decode("utf-8", "replace").strip())
            raise Stage1Gone(_exit_status(self.proc))
        if report[1:]:
            await self.aclose()
            raise StartFailed(report[1:].decode("utf-8", "replace").strip())
        await self._status.aclose()
        return self.proc

    async def aclose(self) -> None:
        """Kill the process if it still runs, reap it, close its pipes and socket (shielded)."""
        with trio.CancelScope(shield=True):
            if self.proc.returncode is None:
                self.proc.kill()
            await self.proc.wait()
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    await pipe.aclose()
            await self._status.aclose()


def _exit_status(proc: trio.Process) -> str:
    code = proc.returncode
    if code is not None and code < 0:
        return f"killed by signal {-code}"
    return f"exit status {code}"


def init_pid(proc: trio.Process) -> int | None:
    """Host PID of the job's PID 1 (stage 1, then dumb-init), the ``unshare`` parent's only child.

    Returns:
        The PID, or None when it has already exited.
    """
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def send_stop_signal(proc: trio.Process, sig: int = signal.SIGTERM) -> bool:
    """Ask the job to stop: ``sig`` to its PID 1, which forwards it to the command.

    Returns:
        Whether the signal was delivered.
    """
    pid = init_pid(proc)
    if pid is None:
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True
