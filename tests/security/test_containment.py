"""Attempts to get out of a job, from inside it, each asserted to fail.

Every test runs the attempt in a real job of a real in-process joblet (the ``joblet`` fixture)
and, where it can, also shows from the host that the target of the attempt is real (the file
exists, the process runs, the socket listens), so that a passing test means "denied", not
"there was nothing to find".
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import socket
import stat
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path

import pytest
import trio

from joblet.config import IsolationSection
from joblet.core.model import JobInfo, JobStatus
from joblet.sys.confine import landlock_abi
from joblet.testing import Harness
from tests.conftest import IN_CI

#: The uid jobs run as by default.
NOBODY = 65534


async def run_sh(joblet: Harness, script: str, network: str = "") -> tuple[JobInfo, str, str]:
    """Run ``sh -c script`` as a job; its final record, stdout and stderr."""
    return await run(joblet, "sh", "-c", script, network=network)


async def run(joblet: Harness, *argv: str, network: str = "") -> tuple[JobInfo, str, str]:
    with trio.fail_after(60):
        job = await joblet.run(*argv, network=network)
        final = await joblet.wait(job.id)
        out, err = await joblet.streams(job.id)
    return final, out.decode(), err.decode()


async def wait_for_line(joblet: Harness, job_id: str, wanted: str) -> None:
    got = b""
    with trio.fail_after(30):
        async with aclosing(joblet.engine.follow_log(job_id)) as chunks:
            async for chunk in chunks:
                got += chunk.data
                if wanted.encode() in got:
                    return
    raise AssertionError(f"job {job_id} ended before printing {wanted!r}: {got!r}")


def attempts_script(attempts: dict[str, str]) -> str:
    """A shell script that tries each attempt and prints ``<name> ok`` or ``<name> denied``."""
    return "; ".join(
        f"if {{ {a}; }} 2>/dev/null; then echo {k} ok; else echo {k} denied; fi"
        for k, a in attempts.items()
    )


def children(pid: int) -> list[int]:
    """The children of a host process."""
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def require_landlock() -> int:
    abi = landlock_abi()
    if abi == 0:
        if IN_CI:
            pytest.fail("this kernel has no Landlock; CI's kernel must have it")
        pytest.skip("no Landlock in this kernel")
    return abi


# --- the daemon's files and other jobs --------------------------------------------------------


async def test_the_daemons_state_keys_and_jobs_db_are_not_in_the_job(joblet: Harness) -> None:
    state = joblet.state_dir
    layout = joblet.node.config.layout
    targets = [state, layout.jobs_db, layout.certs_dir, layout.logs_dir, layout.jobs_dir]
    assert state.is_dir() and layout.jobs_db.is_file()  # they exist, on the host
    script = "; ".join(f"test -e {p} && echo VISIBLE {p}" for p in targets) + "; echo done"
    final, out, _ = await run_sh(joblet, script)
    assert final.status is JobStatus.COMPLETED
    assert out == "done\n"


async def test_another_jobs_work_and_logs_are_out_of_reach(joblet: Harness) -> None:
    secret = f"secret-{uuid.uuid4()}"
    victim = await joblet.run("sh", "-c", f"echo {secret} > /work/secret; echo ready; sleep 60")
    await wait_for_line(joblet, victim.id, "ready")
    layout = joblet.node.config.layout
    host_copy = layout.jobs_dir / victim.id / "work" / "secret"
    assert host_copy.read_text() == secret + "\n"  # it is there, on the host
    attempts = [
        f"cat {host_copy}",
        f"cat {layout.logs_dir}/{victim.id}/*",
        "cat /proc/*/root/work/secret",
        "cat /proc/*/cwd/secret",
        "ls /proc",
    ]
    _, out, err = await run_sh(joblet, "; ".join(f"{a} 2>&1" for a in attempts))
    assert secret not in out + err
    # Its own processes only: PID 1 (init), sh, ls.
    numeric = [p for p in out.split() if p.isdigit()]
    assert len(numeric) <= 3, out
    await joblet.engine.stop_job(victim.id)
    await joblet.wait(victim.id)


async def test_host_processes_and_other_jobs_cannot_be_signalled_or_traced(
    joblet: Harness,
) -> None:
    other = await joblet.run("sleep", "60")
    # The daemon and the other job by their host PIDs (PID 1 inside a job is its own init).
    targets = [os.getpid(), other.pid, *children(other.pid)]
    assert len(targets) == 3  # the other job's unshare parent and its init: real processes
    code = f"""
import ctypes, errno, os, signal
libc = ctypes.CDLL(None, use_errno=True)
PTRACE_ATTACH, PTRACE_SEIZE = 16, 0x4206
for pid in {targets!r}:
    try:
        os.kill(pid, signal.SIGTERM)
        print(pid, "signalled")
    except ProcessLookupError:
        print(pid, "kill ESRCH")
    for req in (PTRACE_ATTACH, PTRACE_SEIZE):
        r = libc.ptrace(ctypes.c_long(req), ctypes.c_long(pid), None, None)
        print(pid, "ptrace", r, errno.errorcode.get(ctypes.get_errno()) if r else "")
    iov = (ctypes.c_char * 8)()
    vec = (ctypes.c_void_p * 2)(ctypes.addressof(iov), 8)
    r = libc.process_vm_readv(pid, vec, 1, vec, 1, 0)
    print(pid, "process_vm_readv", r, errno.errorcode.get(ctypes.get_errno()))
"""
    final, out, err = await run(joblet, "python3", "-c", code)
    assert final.status is JobStatus.COMPLETED, (final, err)
    for pid in targets:
        assert f"{pid} kill ESRCH" in out
        assert out.count(f"{pid} ptrace -1 ESRCH") == 2, out
        assert f"{pid} process_vm_readv -1 ESRCH" in out, out
    # kill -KILL -1 reaches every process the job can see: only its own.
    final, out, _ = await run_sh(joblet, "sleep 30 & kill -KILL -1; wait $!; echo status $?")
    assert (final.status, out) == (JobStatus.COMPLETED, "status 137\n")  # its own sleep died
    assert joblet.engine.get(other.id).status is JobStatus.RUNNING
    await joblet.engine.stop_job(other.id)
    await joblet.wait(other.id)


async def test_proc_sys_sysrq_and_kcore_are_denied(joblet: Harness) -> None:
    attempts = {
        "hostname": "echo pwned > /proc/sys/kernel/hostname",
        "sysrq": "echo h > /proc/sysrq-trigger",  # 'h' only prints help, if it ever got through
        "kcore": "head -c 1 /proc/kcore > /dev/null",
        "kmsg": "head -c 1 /proc/kmsg > /dev/null",
        "mem": "head -c 1 /dev/mem > /dev/null",
    }
    script = attempts_script(attempts)
    _, out, _ = await run_sh(joblet, script)
    assert out.split("\n")[:-1] == [f"{k} denied" for k in attempts], out


async def test_mount_and_mknod_fail(joblet: Harness) -> None:
    attempts = {
        "mount-tmpfs": "mount -t tmpfs none /tmp",
        "mount-proc": "mount -t proc proc /tmp",
        "bind": "mount --bind /work /tmp",
        "mknod-char": "mknod /tmp/null c 1 3",
        "mknod-block": "mknod /work/sda b 8 0",
    }
    script = attempts_script(attempts)
    _, out, _ = await run_sh(joblet, script)
    assert out.split("\n")[:-1] == [f"{k} denied" for k in attempts], out


@pytest.fixture
def setuid_dir() -> Iterator[Path]:
    """A host directory holding a setuid-root copy of ``id`` (removed afterwards)."""
    directory = Path(f"/var/tmp/joblet-suid-{uuid.uuid4().hex[:8]}")
    directory.mkdir(mode=0o755)
    binary = directory / "id"
    shutil.copy("/usr/bin/id", binary)
    binary.chmod(0o4755)
    yield directory
    shutil.rmtree(directory)


async def test_a_setuid_binary_gains_nothing(root: None, setuid_dir: Path) -> None:
    binary = setuid_dir / "id"
    assert binary.stat().st_mode & stat.S_ISUID
    # On the host the bit works: an unprivileged user running it is root, effectively.
    host = subprocess.run(  # noqa: ASYNC221 (a short command, before any trio work)
        [str(binary), "-u"], user=NOBODY, capture_output=True, text=True
    )
    assert host.stdout == "0\n", host
    iso = IsolationSection(system_dirs=(*IsolationSection().system_dirs, str(setuid_dir)))
    from joblet.testing import open_harness
    from tests.conftest import make_config

    async with open_harness(make_config(isolation=iso)) as joblet:
        final, out, err = await run(joblet, str(binary), "-u")
    assert final.status is JobStatus.COMPLETED, (final, err)
    assert out == f"{NOBODY}\n"


async def test_the_root_cannot_be_escaped(joblet: Harness) -> None:
    code = r"""
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
try:
    os.chroot("/tmp")
    print("chroot ok")
except PermissionError:
    print("chroot denied")
print("fds", sorted(int(f) for f in os.listdir("/proc/self/fd")))
# open_by_handle_at with a handle to the host's root inode (the "shocker" escape).
handle = (ctypes.c_uint * 4)(8, 1, 2, 0)  # handle_bytes=8, type=1 (FILEID_INO32_GEN), ino 2
r = libc.syscall(304, -100, handle, os.O_RDONLY)
print("open_by_handle_at", r, errno.errorcode.get(ctypes.get_errno()))
r = libc.syscall(303, -100, b"/", handle, ctypes.byref(ctypes.c_int()), 0)
print("name_to_handle_at", r, errno.errorcode.get(ctypes.get_errno()))
print("root", sorted(os.listdir("/")))
"""
    final, out, err = await run(joblet, "python3", "-c", code)
    assert final.status is JobStatus.COMPLETED, (final, err)
    lines = out.splitlines()
    assert lines[0] == "chroot denied"
    assert lines[1] == "fds [0, 1, 2, 3]"  # stdio and the listing itself: nothing held open
    assert lines[2] == "open_by_handle_at -1 EPERM"
    assert lines[3].startswith("name_to_handle_at -1 ")
    top = set(ast.literal_eval(lines[4].removeprefix("root ")))
    assert top <= {
        *(Path(d).name for d in IsolationSection().system_dirs),
        "etc",
        "work",
        "tmp",
        "dev",
        "proc",
        ".joblet",
    }


async def test_no_user_namespace_can_be_made(joblet: Harness) -> None:
    code = r"""
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
for name, flag in (("user", 0x10000000), ("mount", 0x00020000), ("net", 0x40000000)):
    r = libc.unshare(flag)
    print(name, r, errno.errorcode.get(ctypes.get_errno()))
"""
    final, out, err = await run(joblet, "python3", "-c", code)
    assert final.status is JobStatus.COMPLETED, (final, err)
    assert out.splitlines() == ["user -1 EPERM", "mount -1 EPERM", "net -1 EPERM"]
    final, out, err = await run_sh(joblet, "unshare -U true 2>&1; echo rc=$?")
    assert "rc=0" not in out and "Operation not permitted" in out, out


async def test_the_daemons_unix_sockets_cannot_be_reached(joblet: Harness) -> None:
    path = joblet.node.config.layout.persist_socket
    path.parent.mkdir(parents=True, exist_ok=True)
    abstract = f"\0joblet-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX) as by_path, socket.socket(socket.AF_UNIX) as by_name:
        by_path.bind(str(path))
        by_path.listen()
        by_name.bind(abstract)
        by_name.listen()
        code = f"""
import socket
for addr in ({str(path)!r}, {abstract!r}):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(addr)
        print("connected")
    except OSError as e:
        print(type(e).__name__)
"""
        final, out, err = await run(joblet, "python3", "-c", code)
    path.unlink()
    assert final.status is JobStatus.COMPLETED, (final, err)
    by_path_result, by_name_result = out.splitlines()
    assert by_path_result == "FileNotFoundError"  # the state directory is not in the job
    if landlock_abi() >= 6:  # Landlock scopes abstract sockets to the job
        assert by_name_result == "PermissionError"


async def test_its_own_cgroup_limits_cannot_be_written(joblet: Harness) -> None:
    script = (
        "cat /proc/self/cgroup; ls /sys 2>&1 | head -1; "
        "{ echo max > /sys/fs/cgroup/memory.max; } 2>/dev/null && echo wrote || echo denied; "
        "mount -t cgroup2 none /tmp 2>/dev/null && echo mounted || echo denied"
    )
    job = await joblet.run("sh", "-c", script + "; sleep 1")
    groups = joblet.engine.services.sandboxes.driver.membership(job.id)
    assert groups  # the job's groups are real, on the host
    final = await joblet.wait(job.id)
    out = (await joblet.output(job.id)).decode()
    assert final.status is JobStatus.COMPLETED
    # The job sees its own group as the root of its cgroup namespace, and no cgroupfs.
    groups_seen = [line for line in out.splitlines() if re.match(r"\d+:", line)]
    assert groups_seen and all(line.endswith(":/") for line in groups_seen), out
    assert "cannot access '/sys'" in out
    assert out.splitlines()[-2:] == ["denied", "denied"], out


# --- limits inside the job --------------------------------------------------------------------


@pytest.mark.cgroup2
async def test_resource_limits_inside_the_job(joblet: Harness) -> None:
    code = r"""
import resource as r
for name in ("CORE", "NOFILE", "MEMLOCK", "RTPRIO", "NICE"):
    res = getattr(r, "RLIMIT_" + name)
    soft, hard = r.getrlimit(res)
    try:
        r.setrlimit(res, (soft, hard + 1 if hard != r.RLIM_INFINITY else hard))
        raised = "raised" if hard != r.RLIM_INFINITY else "unlimited"
    except (ValueError, OSError):
        raised = "refused"
    print(name, soft, hard, raised)
for line in open("/proc/self/status"):
    if line.startswith(("CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")):
        print(line.strip().replace("\t", " "))
"""
    final, out, err = await run(joblet, "python3", "-c", code)
    assert final.status is JobStatus.COMPLETED, (final, err)
    assert out.splitlines() == [
        "CORE 0 0 refused",
        "NOFILE 4096 4096 refused",
        f"MEMLOCK {8 << 20} {8 << 20} refused",
        "RTPRIO 0 0 refused",
        "NICE 0 0 refused",
        "CapPrm: 0000000000000000",
        "CapEff: 0000000000000000",
        "CapBnd: 0000000000000000",
        "CapAmb: 0000000000000000",
        "NoNewPrivs: 1",
    ]


@pytest.mark.joblet_config(isolation=IsolationSection(max_open_files=256))
async def test_max_open_files_comes_from_config(joblet: Harness) -> None:
    _, out, _ = await run_sh(joblet, "ulimit -n; ulimit -Hn")
    assert out == "256\n256\n"


# --- Landlock ---------------------------------------------------------------------------------


@pytest.mark.cgroup2  # and on the VM's older kernel (a lower Landlock ABI)
@pytest.mark.parametrize("landlock", [True, False], ids=["landlock", "no-landlock"])
async def test_landlock_confines_a_root_jobs_writes_to_its_own_paths(
    root: None, landlock: bool
) -> None:
    # A job running as root (runAsUid: 0, out of the security model) can write wherever a mount
    # lets it: /dev is a writable tmpfs, /proc/sys/kernel/hostname its own UTS namespace's.
    # Landlock takes that away; the same job without it shows the writes are otherwise possible.
    require_landlock()
    from joblet.testing import open_harness
    from tests.conftest import make_config

    iso = IsolationSection(run_as_uid=0, run_as_gid=0, landlock=landlock)
    attempts = {
        "dev-mkdir": "mkdir /dev/x",
        "dev-file": "echo x > /dev/x.txt",
        "proc-sys": "echo confined > /proc/sys/kernel/hostname",
        "work": "echo x > /work/x && rm /work/x",
        "tmp": "mkdir /tmp/d && touch /tmp/d/f && mv /tmp/d/f /tmp/g && rm -r /tmp/d /tmp/g",
        "shm": "echo x > /dev/shm/x",
        "devnull": "echo x > /dev/null",
    }
    script = attempts_script(attempts)
    async with open_harness(make_config(isolation=iso)) as joblet:
        final, out, err = await run_sh(joblet, script)
        assert joblet.engine.get(final.id).spec.landlock == (landlock_abi() if landlock else 0)
    assert final.status is JobStatus.COMPLETED, (final, err)
    outside = "denied" if landlock else "ok"
    assert out.splitlines() == [
        f"dev-mkdir {outside}",
        f"dev-file {outside}",
        f"proc-sys {outside}",
        "work ok",
        "tmp ok",
        "shm ok",
        "devnull ok",
    ]
