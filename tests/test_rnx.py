"""``rnx`` end to end: the real command line, as a subprocess, against a real ``joblet serve``.

One daemon serves the whole module. Every ``rnx`` call has a timeout; certificates and the server
address come from the ``JOBLET_*`` environment variables unless a test says otherwise, and every
call runs in an empty directory, so the default ``certs/...`` paths do not exist there.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

import attrs
import pytest

from cli.client import ClientSettings, ConfigError, make_ssl_context
from joblet.certs import create_ca, init_certs, issue_client_cert
from tests.conftest import require_root
from tests.daemon import Daemon, running_daemon

RNX = [sys.executable, "-m", "cli.rnx"]
#: Ceiling on one rnx call (a few hundred milliseconds normally).
TIMEOUT = 30.0
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


@attrs.frozen
class Env:
    """The daemon and what an rnx call needs to reach it."""

    daemon: Daemon
    env: Mapping[str, str]
    workdir: Path
    rogue_cert: Path
    rogue_key: Path

    def run(
        self,
        *args: str,
        env: Mapping[str, str | None] | None = None,
        timeout: float = TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``rnx args...`` to completion; ``env`` entries override (None: unset)."""
        return subprocess.run(
            [*RNX, *args],
            env=self.environ(env),
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def run_bytes(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        """Run ``rnx args...`` and keep its output as bytes."""
        return subprocess.run(
            [*RNX, *args],
            env=self.environ(None),
            cwd=self.workdir,
            capture_output=True,
            timeout=TIMEOUT,
            stdin=subprocess.DEVNULL,
        )

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        """Start ``rnx args...`` with stdout and stderr piped."""
        return subprocess.Popen(
            [*RNX, *args],
            env=self.environ(None),
            cwd=self.workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )

    def environ(self, extra: Mapping[str, str | None] | None) -> dict[str, str]:
        """The environment of an rnx call."""
        env = dict(self.env)
        for key, value in (extra or {}).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def start(self, *command: str) -> str:
        """Start a job with ``--json`` and return its id."""
        proc = self.run("--json", "job", "run", *command)
        assert proc.returncode == 0, proc.stderr
        job_id: str = json.loads(proc.stdout)["id"]
        return job_id

    def wait_ended(self, job_id: str) -> None:
        """Wait for a job to end (its log stream ends with it)."""
        proc = self.run_bytes("job", "log", job_id)
        assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def rnx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """A running daemon and the environment to reach it with rnx."""
    require_root()
    workdir = tmp_path_factory.mktemp("rnx-cwd")
    with running_daemon() as daemon:
        other = tmp_path_factory.mktemp("other-ca")
        ca = create_ca(other)
        rogue_cert, rogue_key = issue_client_cert(ca.cert, ca.key, other, "rogue", "admin")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBLET_", "RNX_"))}
        env.update(
            JOBLET_SERVER=daemon.target,
            JOBLET_CA_PATH=str(daemon.certs.ca_cert),
            JOBLET_CERT_PATH=str(daemon.certs.admin_cert),
            JOBLET_KEY_PATH=str(daemon.certs.admin_key),
        )
        yield Env(daemon, env, workdir, rogue_cert, rogue_key)


def assert_one_line_error(
    proc: subprocess.CompletedProcess[str], status: int, pattern: str
) -> None:
    """Failed with ``status``, nothing on stdout, one ``rnx: error:`` line matching ``pattern``."""
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("rnx: error: "), proc.stderr
    assert re.search(pattern, lines[0]), proc.stderr


def read_line(stream: IO[bytes] | None, timeout: float) -> bytes:
    """One line from a child's pipe, waiting at most ``timeout`` seconds."""
    assert stream is not None
    fd = stream.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0, f"no full line within {timeout}s (got {data!r})"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 1)
            assert chunk, f"EOF before a full line (got {data!r})"
            data += chunk
    return data


def test_run_status_list_log_human(rnx: Env) -> None:
    proc = rnx.run("job", "run", "--max-cpu=50", "--max-memory=256", "sh", "-c", "echo hi there")
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(
        rf"Job started:\nID: ({UUID})\nCommand: sh -c 'echo hi there'\n"
        rf"Status: (INITIALIZING|RUNNING|COMPLETED)\nStartTime: {TIME}\nMaxCPU: 50\n"
        r"MaxMemory: 256\nNetwork: host \(shared with system\)\n",
        proc.stdout,
    ), proc.stdout
    job_id = proc.stdout.split("\n")[1].removeprefix("ID: ")

    log = rnx.run("job", "log", job_id)
    assert (log.returncode, log.stdout, log.stderr) == (0, "hi there\n", "")

    status = rnx.run("job", "status", job_id[:8])  # a unique prefix is enough
    assert status.returncode == 0, status.stderr
    assert re.fullmatch(
        rf"Id: {job_id}\nCommand: sh -c 'echo hi there'\nStatus: COMPLETED\n"
        rf"Started At: {TIME}\nEnded At: {TIME}\nMaxCPU: 50\nMaxMemory: 256\nMaxIOBPS: 0\n"
        r"ExitCode: 0\nSeccomp: (default|off)\nLandlock: (ABI \d+|off)\n",
        status.stdout,
    ), status.stdout

    listing = rnx.run("job", "list")
    assert listing.returncode == 0, listing.stderr
    assert re.search(
        rf"^{job_id} COMPLETED StartTime: {TIME} Command: sh -c 'echo hi there'$",
        listing.stdout,
        re.MULTILINE,
    ), listing.stdout


def test_command_arguments_pass_through_untouched(rnx: Env) -> None:
    # Words after the command that look like rnx's own options, and `--`, belong to the job.
    script = 'printf "%s|" "$@"'
    proc = rnx.run(
        "job", "run", "--wait", "sh", "-c", script, "sh", "-la", "--max-cpu=5", "--json", "--",
        "--help", "-h",
    )  # fmt: skip
    assert (proc.returncode, proc.stdout) == (0, "-la|--max-cpu=5|--json|--|--help|-h|")
    # `--` ends rnx's options; what follows is the command, even when it starts with `-`.
    proc = rnx.run("job", "run", "--wait", "--", "printf", "%s", "-n")
    assert (proc.returncode, proc.stdout) == (0, "-n")
    proc = rnx.run("job", "run", "--wait", "ls", "-la", "/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("total "), proc.stdout
    proc = rnx.run("job", "run", "--wait", "python3", "-c", "print(1)")
    assert (proc.returncode, proc.stdout) == (0, "1\n"), proc.stderr


def test_json_output(rnx: Env) -> None:
    proc = rnx.run("--json", "job", "run", "--max-cpu=30", "sh", "-c", "echo out; sleep 30")
    assert proc.returncode == 0, proc.stderr
    job = json.loads(proc.stdout)
    assert re.fullmatch(UUID, job["id"])
    assert (job["command"], job["args"], job["maxCPU"]) == ("sh", ["-c", "echo out; sleep 30"], 30)
    job_id = job["id"]

    # A global option may also follow the subcommand.
    status = json.loads(rnx.run("job", "status", job_id, "--json").stdout)
    assert (status["uuid"], status["maxCPU"], status["maxIOBPS"]) == (job_id, 30, 0)
    assert status["status"] in ("INITIALIZING", "RUNNING")

    listing = json.loads(rnx.run("--json", "job", "list").stdout)
    assert isinstance(listing, list)
    assert job_id in [j["id"] for j in listing]

    stop = rnx.run("--json", "job", "stop", job_id)
    assert stop.returncode == 0, stop.stderr
    stopped = json.loads(stop.stdout)
    assert (stopped["id"], stopped["status"], stopped["exitCode"]) == (job_id, "STOPPED", -1)
    assert re.fullmatch(TIME, stopped["endTime"])

    # `log` stays raw bytes with --json (documented).
    log = rnx.run("--json", "job", "log", job_id)
    assert (log.returncode, log.stdout) == (0, "out\n")


def test_stop_and_wait_exit_statuses(rnx: Env) -> None:
    waiter = rnx.popen("job", "run", "--wait", "sh", "-c", "echo up; exec sleep 60")
    try:
        first = read_line(waiter.stderr, TIMEOUT).decode()
        match = re.fullmatch(rf"Job started: ({UUID})\n", first)
        assert match, first
        job_id = match.group(1)
        assert read_line(waiter.stdout, TIMEOUT) == b"up\n"

        stop = rnx.run("job", "stop", job_id)
        assert stop.returncode == 0, stop.stderr
        assert re.fullmatch(
            rf"Job stopped successfully:\nID: {job_id}\nStatus: STOPPED\nExitCode: -1\n"
            rf"EndTime: {TIME}\n",
            stop.stdout,
        ), stop.stdout
        # A stopped job: 128 + SIGTERM, and one line on stderr saying so.
        assert waiter.wait(TIMEOUT) == 143
        rest = waiter.stderr.read().decode() if waiter.stderr else ""
        assert re.fullmatch(rf"Job {job_id} STOPPED \(exit code -1.*\)\n", rest), rest
    finally:
        waiter.kill()
        waiter.communicate()

    again = rnx.run("job", "stop", job_id)
    assert_one_line_error(again, 1, rf"job is not running: {job_id} \(current status: STOPPED\)")

    assert rnx.run("job", "run", "--wait", "sh", "-c", "exit 3").returncode == 3
    killed = rnx.run("job", "run", "--wait", "sh", "-c", "kill -9 $$")
    assert killed.returncode == 137
    job_id = killed.stderr.split()[2]
    status = rnx.run("job", "status", job_id)
    assert "\nStatus: FAILED\n" in status.stdout
    assert re.search(r"^Reason: .*9", status.stdout, re.MULTILINE), status.stdout


def test_delete_and_delete_all(rnx: Env) -> None:
    done = rnx.run("job", "run", "--wait", "echo", "bye")
    assert done.returncode == 0, done.stderr
    job_id = done.stderr.split()[2]
    running = rnx.run("job", "run", "sleep", "60")
    running_id = re.search(UUID, running.stdout)
    assert running_id, running.stdout
    try:
        busy = rnx.run("job", "delete", running_id.group(0))
        assert_one_line_error(
            busy, 1, rf"job is still running: {running_id.group(0)} \(current status: RUNNING\)"
        )
        deleted = rnx.run("job", "delete", job_id[:8])
        assert deleted.returncode == 0, deleted.stderr
        assert deleted.stdout == f"Job deleted successfully:\nID: {job_id}\n"
        gone = rnx.run("job", "status", job_id)
        assert_one_line_error(gone, 3, rf"job not found: {job_id}")
        every = rnx.run("job", "delete-all")
        assert every.returncode == 0, every.stderr
        assert re.fullmatch(
            r"Successfully deleted \d+ jobs, skipped 1 running/scheduled jobs\n", every.stdout
        ), every.stdout
        as_json = json.loads(rnx.run("--json", "job", "delete-all").stdout)
        assert (as_json["deletedCount"], as_json["skippedCount"]) == (0, 1)
    finally:
        rnx.run("job", "stop", running_id.group(0))


def test_log_is_binary_safe_and_quiet_in_a_closed_pipe(rnx: Env) -> None:
    job_id = rnx.start("printf", r"\377\000\n")
    log = rnx.run_bytes("job", "log", job_id)
    assert (log.returncode, log.stdout, log.stderr) == (0, b"\xff\x00\n", b"")

    # ~600 kB, several chunks: rnx is still writing when head exits.
    done = rnx.run_bytes("job", "run", "--wait", "seq", "1", "100000")
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(b"\n99999\n100000\n")
    job_id = done.stderr.decode().split()[2]
    rnx_cmd = " ".join([*RNX, "job", "log", job_id])
    shell = subprocess.run(
        ["bash", "-c", f'{rnx_cmd} | head -1; echo "status=${{PIPESTATUS[0]}}"'],
        env=rnx.environ(None),
        cwd=rnx.workdir,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert (shell.stdout, shell.stderr) == ("1\nstatus=0\n", "")


def test_ctrl_c_while_following_exits_quietly(rnx: Env) -> None:
    job_id = rnx.start("sh", "-c", "echo started; exec sleep 60")
    follower = rnx.popen("job", "log", job_id)
    try:
        assert read_line(follower.stdout, TIMEOUT) == b"started\n"
        follower.send_signal(signal.SIGINT)
        _, err = follower.communicate(timeout=TIMEOUT)
        assert follower.returncode == 130
        assert err.strip() == b"", err
    finally:
        follower.kill()
        follower.communicate()
        rnx.run("job", "stop", job_id)


def test_unloadable_certificate_files_are_one_line_config_errors(tmp_path: Path) -> None:
    certs = init_certs(tmp_path / "certs")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^cannot load CA certificate \S+/junk\.pem: \S"):
        make_ssl_context(ClientSettings(cert=certs.admin_cert, key=certs.admin_key, ca=junk))
    mismatched = ClientSettings(cert=certs.admin_cert, key=certs.viewer_key, ca=certs.ca_cert)
    with pytest.raises(
        ConfigError,
        match=r"^cannot load client certificate \S+ with key \S+viewer-client-key\.pem: ",
    ):
        make_ssl_context(mismatched)
    assert (
        make_ssl_context(
            ClientSettings(cert=certs.admin_cert, key=certs.admin_key, ca=certs.ca_cert)
        ).minimum_version
        == ssl.TLSVersion.TLSv1_2
    )


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


#: Failing invocations: case -> (exit status, pattern of the one error line).
ERROR_CASES = {
    "unknown-flag": (2, r"Unknown option: --bogus"),
    "missing-command": (2, r"COMMAND"),
    "bad-max-cpu": (2, r"--max-cpu"),
    "negative-max-cpu": (2, r"--max-cpu"),
    "bad-env": (2, r"--env"),
    "unknown-command": (2, r"frob"),
    "bad-server-address": (2, r"invalid server address"),
    "limit-above-host": (2, r"maxMemory exceeds system limits"),
    "missing-cert-file": (2, r"certificate file not found: certs/client-cert\.pem$"),
    "unknown-job": (3, r"job not found: 00000000-dead$"),
    "unknown-job-log": (3, r"job not found: 00000000-dead$"),
    "viewer-runs": (4, r"role viewer is not allowed to perform operation run_job$"),
    "foreign-ca-cert": (4, r"certificate|TLS"),
    "not-listening": (5, r"cannot connect to 127\.0\.0\.1:\d+: Connection refused$"),
}


@pytest.fixture(scope="module")
def error_runs(rnx: Env) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every :data:`ERROR_CASES` invocation, run concurrently (each test checks one)."""
    certs = rnx.daemon.certs
    viewer: dict[str, str | None] = {
        "JOBLET_CERT_PATH": str(certs.viewer_cert),
        "JOBLET_KEY_PATH": str(certs.viewer_key),
    }
    rogue: dict[str, str | None] = {
        "JOBLET_CERT_PATH": str(rnx.rogue_cert),
        "JOBLET_KEY_PATH": str(rnx.rogue_key),
    }
    invocations: dict[str, tuple[list[str], dict[str, str | None]]] = {
        "unknown-flag": (["job", "run", "--bogus", "true"], {}),
        "missing-command": (["job", "run"], {}),
        "bad-max-cpu": (["job", "run", "--max-cpu=abc", "true"], {}),
        "negative-max-cpu": (["job", "run", "--max-cpu=-5", "true"], {}),
        "bad-env": (["job", "run", "--env", "NOEQUALS", "true"], {}),
        "unknown-command": (["job", "frob"], {}),
        "bad-server-address": (["--server=localhost:99999", "job", "list"], {}),
        "limit-above-host": (["job", "run", "--max-memory=2000000000", "true"], {}),
        "missing-cert-file": (["job", "list"], {"JOBLET_CERT_PATH": None}),
        "unknown-job": (["job", "status", "00000000-dead"], {}),
        "unknown-job-log": (["job", "log", "00000000-dead"], {}),
        "viewer-runs": (["job", "run", "true"], viewer),
        "foreign-ca-cert": (["job", "list"], rogue),
        "not-listening": ([f"--server=127.0.0.1:{_dead_port()}", "job", "list"], {}),
    }
    assert invocations.keys() == ERROR_CASES.keys()
    procs = {
        case: subprocess.Popen(
            [*RNX, *args],
            env=rnx.environ(env),
            cwd=rnx.workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        for case, (args, env) in invocations.items()
    }
    results = {}
    try:
        for case, proc in procs.items():
            out, err = proc.communicate(timeout=TIMEOUT)
            results[case] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():
            proc.kill()
            proc.communicate()
    return results


@pytest.mark.parametrize("case", ERROR_CASES)
def test_failures_give_one_line_and_a_status(
    error_runs: dict[str, subprocess.CompletedProcess[str]], case: str
) -> None:
    status, pattern = ERROR_CASES[case]
    assert_one_line_error(error_runs[case], status, pattern)


def test_viewer_reads_and_flags_beat_environment(rnx: Env) -> None:
    certs = rnx.daemon.certs
    viewer = {"JOBLET_CERT_PATH": str(certs.viewer_cert), "JOBLET_KEY_PATH": str(certs.viewer_key)}
    assert rnx.run("job", "list", env=viewer).returncode == 0
    # The environment names a dead server, the flag the real one.
    ok = rnx.run(
        f"--server={rnx.daemon.target}",
        "--json",
        "job",
        "list",
        env={"JOBLET_SERVER": f"127.0.0.1:{_dead_port()}"},
    )
    assert ok.returncode == 0, ok.stderr
    assert isinstance(json.loads(ok.stdout), list)


def test_help(rnx: Env) -> None:
    top = rnx.run("--help")
    assert top.returncode == 0
    assert "job" in top.stdout and "--server" in top.stdout and "JOBLET_SERVER" in top.stdout
    run = rnx.run("job", "run", "--help")
    assert run.returncode == 0
    assert "--max-cpu" in run.stdout and "COMMAND" in run.stdout
