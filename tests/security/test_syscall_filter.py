"""The default syscall filter, seen from inside real jobs.

``tests/test_seccomp.py`` checks the compiler and every rule of the profile in bare processes;
here the whole start path is under test: the daemon compiles the configured profile once, stage 1
installs it as its last step, and the job's command (and nothing before it) runs under it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from joblet.config import IsolationSection
from joblet.core.model import JobStatus
from joblet.testing import open_harness
from tests.conftest import make_config
from tests.daemon import free_port
from tests.security.test_containment import run
from tests.test_seccomp import (
    ALSO_DENIED,
    DENIED,
    EPERM,
    MARKER_ERRNO,
    marked_default_document,
    nr,
)

ENOSYS = 38
CLONE_NEWUSER = 0x10000000
SIGCHLD = 17

#: Run in a job: each probe's return value and errno, as JSON.
PROBES = r"""
import ctypes, json, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def call(nr, *args):
    ctypes.set_errno(0)
    args = (*args, 0, 0, 0, 0, 0, 0)[:6]
    ret = libc.syscall(ctypes.c_long(nr), *(ctypes.c_ulong(a) for a in args))
    return [ret, ctypes.get_errno() if ret == -1 else 0]

def raw(code):
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    return ctypes.CFUNCTYPE(ctypes.c_long)(address)()

out = {name: call(number) for name, number in json.loads(sys.argv[1]).items()}
out["clone-newuser"] = call(56, 0x10000000 | 17)
out["clone3"] = call(435)
out["personality-no-aslr"] = call(135, 0x0040000)
out["personality-query"] = call(135, 0xffffffff)
# i386 getpid through int 0x80, and x32 getpid (0x40000000 | 39) through syscall.
out["int80"] = raw(b"\xb8\x14\x00\x00\x00\xcd\x80\xc3")
out["x32"] = raw(b"\xb8\x27\x00\x00\x40\x0f\x05\xc3")
print(json.dumps(out))
"""


async def probe(iso: IsolationSection) -> tuple[dict[str, Any], str]:
    """Run :data:`PROBES` in a job of a joblet configured with ``iso``; results and profile."""
    numbers = {name: nr(name) for name in DENIED + ALSO_DENIED if _known(name)}
    async with open_harness(make_config(isolation=iso)) as joblet:
        final, out, err = await run(joblet, "python3", "-c", PROBES, json.dumps(numbers))
        status = joblet.engine.get(final.id)
    assert final.status is JobStatus.COMPLETED, (final, err)
    return json.loads(out), status.spec.seccomp


def _known(name: str) -> bool:
    try:
        nr(name)
    except AssertionError:
        return False
    return True


@pytest.mark.cgroup2  # and on the VM's older kernel
async def test_every_denied_syscall_fails_with_eperm_in_a_job(root: None) -> None:
    got, profile = await probe(IsolationSection())
    assert profile == "default"
    denied = {k: v for k, v in got.items() if k in DENIED or k in ALSO_DENIED}
    assert len(denied) > 60
    assert {k: v for k, v in denied.items() if v != [-1, EPERM]} == {}
    assert got["clone-newuser"] == [-1, EPERM]
    assert got["clone3"] == [-1, ENOSYS]  # so that glibc falls back to clone, which is checked
    assert got["personality-no-aslr"] == [-1, EPERM]
    assert got["personality-query"][0] >= 0
    assert got["int80"] == -EPERM and got["x32"] == -EPERM


async def test_it_is_the_filter_that_denies_them(root: None, tmp_path: Path) -> None:
    # The default profile with a marker errno no kernel path returns, installed from a file
    # (isolation.seccomp as a path): every denied call fails with the marker, so it is the
    # filter, not a missing privilege, that refuses them.
    path = tmp_path / "marked.json"
    path.write_text(json.dumps(marked_default_document()))
    got, profile = await probe(IsolationSection(seccomp=str(path)))
    assert profile == str(path)
    denied = {k: v for k, v in got.items() if k in DENIED or k in ALSO_DENIED}
    assert {k: v for k, v in denied.items() if v != [-1, MARKER_ERRNO]} == {}
    assert got["int80"] == -EPERM  # other ABIs: the bad-architecture action, EPERM


async def test_off_means_no_filter(root: None) -> None:
    async with open_harness(make_config(isolation=IsolationSection(seccomp="off"))) as joblet:
        final, out, _ = await run(joblet, "grep", "^Seccomp:", "/proc/self/status")
        assert joblet.engine.get(final.id).spec.seccomp == "off"
    assert out == "Seccomp:\t0\n"


@pytest.mark.cgroup2  # and on the VM's older kernel
async def test_a_job_runs_under_the_filter_and_only_the_job(root: None) -> None:
    async with open_harness(make_config()) as joblet:
        final, out, _ = await run(joblet, "grep", "^Seccomp", "/proc/1/status", "/proc/self/status")
    assert final.status is JobStatus.COMPLETED
    # Its PID 1 (dumb-init) and its command: one filter each (mode 2), inherited, never stacked.
    assert out.splitlines() == [
        "/proc/1/status:Seccomp:\t2",
        "/proc/1/status:Seccomp_filters:\t1",
        "/proc/self/status:Seccomp:\t2",
        "/proc/self/status:Seccomp_filters:\t1",
    ]


ORDINARY = r"""
import ctypes, json, multiprocessing, os, sqlite3, ssl, subprocess, sys, threading
out = {}
seen = []
threads = [threading.Thread(target=seen.append, args=(i,)) for i in range(8)]
for t in threads: t.start()
for t in threads: t.join()
out["threads"] = sorted(seen) == list(range(8))
with multiprocessing.Pool(2) as pool:
    out["multiprocessing"] = pool.map(abs, [-1, -2, -3])
ctx = multiprocessing.get_context("spawn")
with ctx.Pool(1) as pool:
    out["spawn"] = pool.map(abs, [-4])
db = sqlite3.connect("/work/db.sqlite")
db.execute("create table t (x)")
db.executemany("insert into t values (?)", [(1,), (2,)])
db.commit()
out["sqlite3"] = db.execute("select sum(x) from t").fetchone()[0]
ctx = ssl.create_default_context()
out["ssl"] = ctx.verify_mode == ssl.CERT_REQUIRED and ctx.cert_store_stats()["x509_ca"] > 0
out["sh"] = subprocess.run(["sh", "-c", "echo a; (echo b) | cat; x=$(echo c); echo $x"],
                           capture_output=True, text=True, check=True).stdout
out["coreutils"] = subprocess.run(
    "ls -la / >/dev/null && cp /etc/hostname /work/h && sort /work/h | wc -l && "
    "tar -C /work -cf /tmp/t.tar h && gzip -9 /tmp/t.tar && ls /tmp && "
    "find /work -name h && date +%Y >/dev/null && stat -c %s /work/h >/dev/null && echo ok",
    shell=True, capture_output=True, text=True, check=True).stdout.split()
# A child blocked on a pipe until it is killed: attached while it surely lives.
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.read(r, 1)
    os._exit(0)
libc = ctypes.CDLL(None, use_errno=True)
attached = libc.ptrace(ctypes.c_long(16), ctypes.c_long(pid), None, None)
out["ptrace of its own child"] = [attached, ctypes.get_errno() if attached else 0]
os.kill(pid, 9)
os.waitpid(pid, 0)
print(json.dumps(out))
"""


@pytest.mark.cgroup2  # and on the VM's older kernel
async def test_ordinary_programs_still_work(root: None) -> None:
    async with open_harness(make_config()) as joblet:
        final, out, err = await run(joblet, "python3", "-c", ORDINARY)
    assert final.status is JobStatus.COMPLETED, (final, err)
    assert json.loads(out) == {
        "threads": True,
        "multiprocessing": [1, 2, 3],
        "spawn": [4],
        "sqlite3": 3,
        "ssl": True,
        "sh": "a\nb\nc\n",
        "coreutils": ["1", "t.tar.gz", "/work/h", "ok"],
        "ptrace of its own child": [0, 0],
    }


def test_a_bad_profile_stops_joblet_serve_with_one_line(root: None, tmp_path: Path) -> None:
    profile = tmp_path / "broken.json"
    profile.write_text('{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [')
    config = tmp_path / "joblet-config.yml"
    config.write_text(f"isolation:\n  seccomp: {profile}\n")
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "joblet.main", "serve", "--config", str(config)),
            *("--state-dir", str(tmp_path / "state"), "--address", "127.0.0.1"),
            *("--port", str(free_port())),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"joblet: invalid isolation.seccomp: seccomp profile {profile}: ")
    assert "not valid JSON" in lines[0]


def test_seccomp_off_reads_as_off_in_yaml(tmp_path: Path) -> None:
    from joblet.config import load_config

    path = tmp_path / "joblet-config.yml"
    for text in ("off", "false", "no", '"off"'):
        path.write_text(f"isolation:\n  seccomp: {text}\n")
        assert load_config(path).isolation.seccomp == "off", text
