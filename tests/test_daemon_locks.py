"""Two daemons on one host: each holds its state directory and its cgroup parent, alone.

A second daemon on a state directory or a cgroup parent that a running daemon holds refuses to
start with one line naming the path and the holder's pid, and touches nothing; daemons with
distinct ones run side by side, and neither's start-up recovery (also after a SIGKILL) touches the
other's jobs.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from joblet.protocol import joblet_pb2 as pb
from joblet.sys.locks import LockHeld, flock_holder, hold
from tests.daemon import (
    Daemon,
    crashable_daemon,
    free_port,
    running_daemon,
    spawn_daemon,
)
from tests.test_grpc import T, job_stub, open_channel

pytestmark = pytest.mark.slow

#: How long a refused daemon may take to say so and exit.
REFUSAL_TIMEOUT = 30.0


@contextmanager
def _admin(daemon: Daemon) -> Iterator[Any]:
    """An admin ``JobService`` stub for ``daemon``."""
    channel = open_channel(
        daemon.target, daemon.certs.ca_cert, (daemon.certs.admin_cert, daemon.certs.admin_key)
    )
    with channel:
        yield job_stub(channel)


def _run_sleeper(stub: Any) -> str:
    """Start ``sleep 300``; its id."""
    res = stub.RunJob(pb.RunJobReq(command="sleep", args=["300"]), timeout=T)
    assert res.status == "RUNNING"
    return str(res.id)


def _status(daemon: Daemon, job_id: str) -> str:
    with _admin(daemon) as stub:
        return str(stub.GetJobStatus(pb.GetJobStatusReq(id=job_id), timeout=T).status)


def _refused(process: subprocess.Popen[bytes], log: Path) -> str:
    """The refused daemon's last line, once it has exited non-zero."""
    rc = process.wait(REFUSAL_TIMEOUT)
    text = log.read_text(errors="replace")
    assert rc != 0, f"the second daemon started; log:\n{text}"
    return text.strip().splitlines()[-1]


@pytest.fixture
def scratch() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="joblet-second-"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_the_same_state_directory_is_refused(root: None, scratch: Path) -> None:
    with running_daemon() as first:
        with _admin(first) as stub:
            job_id = _run_sleeper(stub)
        second = spawn_daemon(
            scratch,
            None,
            port=free_port(),
            parent=f"joblet-d{secrets.token_hex(4)}",
            state=first.state_dir,
        )
        line = _refused(second.process, second.log_path)
        assert line == (
            f"joblet: cannot start: state directory {first.state_dir} is in use by another "
            f"joblet daemon (pid {first.process.pid})"
        )
        assert _status(first, job_id) == "RUNNING"
        # The first daemon's Persist Service socket is still its own.
        assert (first.state_dir / "run" / "persist-grpc.sock").exists()


def test_the_same_cgroup_parent_is_refused(root: None, scratch: Path) -> None:
    with running_daemon() as first:
        with _admin(first) as stub:
            job_id = _run_sleeper(stub)
        second = spawn_daemon(scratch, None, port=free_port(), parent=first.cgroup_parent)
        line = _refused(second.process, second.log_path)
        assert line.startswith("joblet: cannot start: cgroup parent /sys/fs/cgroup/")
        assert line.endswith(
            f"/{first.cgroup_parent} is in use by another joblet daemon (pid {first.process.pid})"
        )
        assert "leftover job group removed" not in second.log_path.read_text()
        assert _status(first, job_id) == "RUNNING"


def test_distinct_daemons_run_side_by_side_across_kill_and_restart(root: None) -> None:
    with crashable_daemon() as a, crashable_daemon() as b:
        with _admin(a.daemon) as stub:
            job_a = _run_sleeper(stub)
        with _admin(b.daemon) as stub:
            job_b = _run_sleeper(stub)
        # B dies and comes back: its recovery sweeps its own parent only.
        b.kill()
        b.restart()
        assert _status(a.daemon, job_a) == "RUNNING"
        assert _status(b.daemon, job_b) == "FAILED"
        assert "known=no" not in b.daemon.log()
        # And the other way round.
        with _admin(b.daemon) as stub:
            job_b2 = _run_sleeper(stub)
        a.kill()
        a.restart()
        assert _status(a.daemon, job_a) == "FAILED"
        assert _status(b.daemon, job_b2) == "RUNNING"
        assert "known=no" not in a.daemon.log()


def test_the_lock_names_its_holder(tmp_path: Path) -> None:
    path = tmp_path / "lockfile"
    with hold(path, "thing") as fd:
        assert path.read_text() == f"{os.getpid()}\n"
        with pytest.raises(LockHeld) as info, hold(path, "thing"):
            pass
        assert (
            str(info.value)
            == f"thing {path} is in use by another joblet daemon (pid {os.getpid()})"
        )
        assert info.value.pid == os.getpid()
        st = os.fstat(fd)
        assert flock_holder(Path("/proc/locks").read_text(), st.st_dev, st.st_ino) == os.getpid()
    # Released with the block: a new holder gets it at once.
    with hold(path, "thing"):
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    path = tmp_path / "lockfile"
    code = (
        "import sys, time; from pathlib import Path; from joblet.sys.locks import hold\n"
        f"with hold(Path({str(path)!r}), 'thing'):\n"
        "    print('held', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=Path(__file__).parents[1]
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(LockHeld, match=f"pid {holder.pid}"), hold(path, "thing"):
            pass
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            with hold(path, "thing"):
                break
        except LockHeld:
            assert time.monotonic() < deadline, "the lock outlived its holder"
            time.sleep(0.05)


def test_flock_holder_parses_proc_locks() -> None:
    dev = os.makedev(0, 0x1D)
    text = (
        "1: POSIX  ADVISORY  WRITE 99 00:1d:8277 0 EOF\n"
        "2: FLOCK  ADVISORY  WRITE 14051 00:1d:8277 0 EOF\n"
        "2: -> FLOCK  ADVISORY  WRITE 15000 00:1d:8277 0 EOF\n"
        "3: FLOCK  ADVISORY  WRITE 777 fd:00:8277 0 EOF\n"
    )
    assert flock_holder(text, dev, 8277) == 14051
    assert flock_holder(text, dev, 1) is None
