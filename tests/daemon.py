"""A real ``joblet serve`` in a subprocess, for end-to-end tests (gRPC clients, ``rnx``).

Example::

    from tests.daemon import running_daemon

    with running_daemon() as daemon:
        subprocess.run(["rnx", f"--server={daemon.target}", f"--ca={daemon.certs.ca_cert}",
                        f"--cert={daemon.certs.admin_cert}", f"--key={daemon.certs.admin_key}",
                        "job", "list"], check=True)

:func:`running_daemon` starts ``python -m joblet.main serve`` on 127.0.0.1 and a free port with a
temporary state directory and a cgroup parent of its own, and returns once the port completes a
mutual TLS handshake with the admin certificate. On exit it sends SIGTERM and checks that the
daemon exited 0 and left no job process, no job cgroup and none of its waiting stage-1 processes
behind (an :class:`AssertionError` otherwise), then removes the state directory. It needs root,
like the daemon.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import yaml

from joblet.certs import CertPaths
from joblet.config import StateLayout
from joblet.sys.cgroups import DAEMON_LEAF
from tests.conftest import CGROUP_ROOT, processes_in_cgroup_named, stage1_children

REPO = Path(__file__).resolve().parents[1]
#: Poll interval while waiting for the daemon's port or a log line (waiting on another process).
POLL = 0.05


@attrs.frozen
class Daemon:
    """A running daemon.

    Attributes:
        process: The ``joblet serve`` process.
        state_dir: Its state directory (certificates in its ``StateLayout.certs_dir``).
        port: The port it listens on, at 127.0.0.1.
        certs: Its certificate files (CA, server, admin, viewer, client).
        log_path: Its stdout and stderr.
        cgroup_parent: Its cgroup parent's name (unique to this daemon).
    """

    process: subprocess.Popen[bytes]
    state_dir: Path
    port: int
    certs: CertPaths
    log_path: Path
    cgroup_parent: str

    @property
    def target(self) -> str:
        """The address for a client: ``localhost:<port>`` (a name the server certificate has)."""
        return f"localhost:{self.port}"

    def log(self) -> str:
        """Everything the daemon has printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        """Wait until the daemon's output contains ``text``; returns the first line that does.

        Raises:
            AssertionError: Not within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log().splitlines():
                if text in line:
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon never logged {text!r}; log:\n{self.log()[-4000:]}")
            time.sleep(POLL)


@contextmanager
def running_daemon(
    config: Mapping[str, Any] | None = None,
    *,
    startup_timeout: float = 30.0,
    stop_timeout: float = 30.0,
) -> Iterator[Daemon]:
    """Run ``joblet serve`` for the duration of the ``with`` block.

    Args:
        config: Extra configuration, as the YAML file's sections (e.g.
            ``{"grpc": {"maxRecvMsgSize": 1024}}``); merged over the helper's own
            (``cgroup.parent``).
        startup_timeout: Longest wait for the daemon to accept TLS connections.
        stop_timeout: Longest wait for it to exit after SIGTERM.

    Yields:
        The running daemon.

    Raises:
        AssertionError: It did not start, or did not stop cleanly (exit 0, nothing left behind).
    """
    base = Path(tempfile.mkdtemp(prefix="joblet-daemon-"))
    daemon = spawn_daemon(base, config, port=free_port(), parent=f"joblet-d{secrets.token_hex(4)}")
    failed = True
    try:
        wait_until_serving(daemon, startup_timeout)
        yield daemon
        failed = False
    finally:
        try:
            stop_daemon(daemon, stop_timeout)
        except AssertionError:
            if not failed:
                raise
            # The block already failed: its error is the one to see.
        finally:
            shutil.rmtree(base, ignore_errors=True)


class CrashableDaemon:
    """A daemon that a test kills with SIGKILL and starts again on the same state and port.

    Use :func:`crashable_daemon`. :attr:`daemon` is the current incarnation.
    """

    def __init__(self, base: Path, config: Mapping[str, Any] | None, timeout: float) -> None:
        self._base = base
        self._config = config
        self._timeout = timeout
        self.daemon = spawn_daemon(
            base, config, port=free_port(), parent=f"joblet-d{secrets.token_hex(4)}"
        )
        wait_until_serving(self.daemon, timeout)

    def kill(self) -> None:
        """SIGKILL the daemon and reap it; its jobs are left as they are."""
        self.daemon.process.kill()
        self.daemon.process.wait()

    def restart(self) -> Daemon:
        """Start the daemon again (same state directory, port and cgroup parent)."""
        self.daemon = spawn_daemon(
            self._base, self._config, port=self.daemon.port, parent=self.daemon.cgroup_parent
        )
        wait_until_serving(self.daemon, self._timeout)
        return self.daemon


@contextmanager
def crashable_daemon(
    config: Mapping[str, Any] | None = None, *, timeout: float = 30.0
) -> Iterator[CrashableDaemon]:
    """Like :func:`running_daemon`, for tests that crash and restart the daemon.

    On exit the last incarnation is stopped with SIGTERM and checked like
    :func:`running_daemon` does (exit 0, no job process or cgroup left).
    """
    base = Path(tempfile.mkdtemp(prefix="joblet-daemon-"))
    ctl: CrashableDaemon | None = None
    failed = True
    try:
        ctl = CrashableDaemon(base, config, timeout)
        yield ctl
        failed = False
    finally:
        try:
            if ctl is not None:
                stop_daemon(ctl.daemon, timeout)
        except AssertionError:
            if not failed:
                raise
        finally:
            if ctl is not None:
                # A failed test may leave a killed daemon's jobs behind: take them down.
                _force_remove_jobs(ctl.daemon.cgroup_parent)
            shutil.rmtree(base, ignore_errors=True)


def _force_remove_jobs(parent: str) -> None:
    """Kill every process in the parent's job groups and remove the groups; never fails."""
    for _ in range(50):
        groups = _job_cgroups(parent)
        if not groups:
            break
        for group in groups:
            for procs in group.rglob("cgroup.procs"):
                for pid in procs.read_text().split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            for sub in sorted(group.rglob("*/"), key=lambda p: len(p.parts), reverse=True):
                if sub.is_dir():
                    try:
                        sub.rmdir()
                    except OSError:
                        pass
            try:
                group.rmdir()
            except OSError:
                pass
        time.sleep(POLL)
    _remove_parent(parent)


def spawn_daemon(
    base: Path,
    config: Mapping[str, Any] | None,
    *,
    port: int,
    parent: str,
    state: Path | None = None,
) -> Daemon:
    """Start ``joblet serve`` with its state in ``base / "state"`` (output appended to a log).

    Args:
        base: Where its config file and log go (and its state, by default).
        config: Extra configuration, as for :func:`running_daemon`.
        port: Its port at 127.0.0.1.
        parent: Its cgroup parent.
        state: Another state directory.
    """
    state = state or base / "state"
    merged: dict[str, Any] = {"cgroup": {"parent": parent}}
    for section, values in (config or {}).items():
        if isinstance(values, Mapping):
            merged[section] = {**merged.get(section, {}), **values}
        else:
            merged[section] = values
    config_path = base / "joblet-config.yml"
    config_path.write_text(yaml.safe_dump(merged))
    log_path = base / "daemon.log"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "joblet.main",
                "serve",
                "--config",
                str(config_path),
                "--state-dir",
                str(state),
                "--address",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=base,
            env=env,
        )
    return Daemon(
        process=process,
        state_dir=state,
        port=port,
        certs=CertPaths.in_dir(StateLayout(state).certs_dir),
        log_path=log_path,
        cgroup_parent=parent,
    )


def tls_handshake(daemon: Daemon, cert: Path, key: Path, timeout: float = 5.0) -> None:
    """Complete one mutual TLS handshake with the daemon (raises ``OSError``/``ssl.SSLError``).

    In TLS 1.3 the server checks the client's certificate after the client considers the
    handshake done: a rejection shows as an error on the first read.
    """
    ctx = ssl.create_default_context(cafile=daemon.certs.ca_cert)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.recv(1)  # the server's HTTP/2 SETTINGS, or its rejection


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until_serving(daemon: Daemon, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    certs = daemon.certs
    while True:
        if daemon.process.poll() is not None:
            raise AssertionError(
                f"daemon exited with {daemon.process.returncode} during start-up; "
                f"log:\n{daemon.log()[-4000:]}"
            )
        try:
            if certs.admin_cert.exists() and certs.admin_key.exists():
                tls_handshake(daemon, certs.admin_cert, certs.admin_key, timeout=1.0)
                return
        except (OSError, ssl.SSLError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"daemon not serving after {timeout}s; log:\n{daemon.log()}")
        time.sleep(POLL)


def stop_daemon(daemon: Daemon, timeout: float) -> None:
    process = daemon.process
    waiting = stage1_children(process.pid)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        rc = process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(
            f"daemon still running {timeout}s after SIGTERM; log:\n{daemon.log()[-4000:]}"
        ) from None
    leftovers = _job_cgroups(daemon.cgroup_parent)
    processes = processes_in_cgroup_named(daemon.cgroup_parent)
    stage1 = [pid for pid in waiting if _alive(pid)]
    _remove_parent(daemon.cgroup_parent)
    assert rc == 0, f"daemon exited with {rc}; log:\n{daemon.log()[-4000:]}"
    assert processes == [], f"job processes left behind: {processes}"
    assert stage1 == [], f"waiting stage-1 processes left behind: {stage1}"
    assert leftovers == [], f"job cgroups left behind: {leftovers}"


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _parent_dirs(parent: str) -> list[Path]:
    hierarchies = [CGROUP_ROOT] + [p for p in CGROUP_ROOT.iterdir() if p.is_dir()]
    return [h / parent for h in hierarchies if (h / parent).is_dir()]


def _job_cgroups(parent: str) -> list[Path]:
    return [
        child
        for group in _parent_dirs(parent)
        for child in group.iterdir()
        if child.is_dir() and child.name != DAEMON_LEAF
    ]


def _remove_parent(parent: str) -> None:
    """Remove what a daemon may rightly leave (its own leaf on cgroup v2); never fails."""
    for group in _parent_dirs(parent):
        for leaf in (group / DAEMON_LEAF, group):
            try:
                leaf.rmdir()
            except OSError:
                pass
