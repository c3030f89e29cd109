"""The engine end to end: real jobs in real namespaces and cgroups, via the in-process harness."""

from __future__ import annotations

import hashlib
import os
import re
import signal
from contextlib import aclosing
from pathlib import Path

import pytest
import trio

from joblet.actors.job import JobActor
from joblet.config import LogsSection
from joblet.core.errors import (
    AmbiguousJobId,
    InvalidRequest,
    JobNotFound,
    JobNotRunning,
    ResourceExhausted,
)
from joblet.core.model import JobStatus
from joblet.testing import Harness

pytestmark = pytest.mark.slow


# --- lifecycle and exit codes -------------------------------------------------------------------


async def test_completed_job_keeps_stdout_and_stderr_apart(joblet: Harness) -> None:
    with trio.fail_after(30):
        job = await joblet.run("sh", "-c", "echo out1; echo err1 >&2; echo out2")
        assert job.status is JobStatus.RUNNING
        assert re.fullmatch(
            r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", job.id
        )
        final = await joblet.wait(job.id)
        assert final.status is JobStatus.COMPLETED
        assert final.exit_code == 0 and final.reason == ""
        assert final.end_time is not None and final.start_time is not None
        out, err = await joblet.streams(job.id)
        assert out == b"out1\nout2\n"
        assert err == b"err1\n"


async def test_nonzero_exit_is_failed_with_its_code(joblet: Harness) -> None:
    with trio.fail_after(30):
        job = await joblet.run("sh", "-c", "exit 3")
        final = await joblet.wait(job.id)
        assert (final.status, final.exit_code) == (JobStatus.FAILED, 3)
        assert final.reason == "exit code 3"


async def test_killed_by_signal_is_128_plus_n(joblet: Harness) -> None:
    with trio.fail_after(30):
        job = await joblet.run("sh", "-c", "kill -KILL $$")
        final = await joblet.wait(job.id)
        assert (final.status, final.exit_code) == (JobStatus.FAILED, 128 + signal.SIGKILL)
        assert final.reason.startswith("signal 9")


async def test_unknown_command_fails_to_start_with_a_clear_reason(joblet: Harness) -> None:
    with trio.fail_after(30):
        job = await joblet.run("no-such-command-xyz")
        assert job.status is JobStatus.FAILED
        assert job.reason == "start failed: command not found: no-such-command-xyz"
        final = await joblet.wait(job.id)
        assert final.status is JobStatus.FAILED


async def test_arguments_pass_through_untouched(joblet: Harness) -> None:
    args = ["--flag", "-x", "a b", "", "ünïcode", "$HOME", "*", "'q'"]
    with trio.fail_after(30):
        job = await joblet.run("printf", "[%s]\\n", *args)
        await joblet.wait(job.id)
        out = await joblet.output(job.id)
    assert out.decode() == "".join(f"[{a}]\n" for a in args)


async def test_environment_is_clean_and_carries_the_jobs_variables(joblet: Harness) -> None:
    os.environ["JOBLET_TEST_DAEMON_SECRET"] = "leak"
    try:
        with trio.fail_after(30):
            job = await joblet.run("env", env={"GREETING": "hi there"})
            await joblet.wait(job.id)
            env = dict(
                line.split("=", 1) for line in (await joblet.output(job.id)).decode().splitlines()
            )
    finally:
        del os.environ["JOBLET_TEST_DAEMON_SECRET"]
    assert env["GREETING"] == "hi there"
    assert env["HOME"] == "/work"
    assert env["JOBLET_JOB_ID"] == job.id
    assert "JOBLET_TEST_DAEMON_SECRET" not in env
    assert set(env) <= {"PATH", "HOME", "LANG", "HOSTNAME", "JOBLET_JOB_ID", "GREETING", "PWD"}


# --- registry -----------------------------------------------------------------------------------


async def test_lookup_by_unique_prefix_and_errors(joblet: Harness) -> None:
    with trio.fail_after(30):
        job = await joblet.run("true")
        await joblet.wait(job.id)
        assert joblet.engine.get(job.id[:8]).id == job.id
        with pytest.raises(JobNotFound, match="job not found: nope"):
            joblet.engine.get("nope")
        other = await joblet.run("true")
        await joblet.wait(other.id)
        common = os.path.commonprefix([job.id, other.id])  # noqa: RUF071 (a string prefix)
        if common:
            with pytest.raises(AmbiguousJobId):
                joblet.engine.get(common)
        assert [j.id for j in joblet.engine.list_jobs()] == [job.id, other.id]


async def test_stopping_an_ended_job_names_its_status(joblet: Harness) -> None:
    with trio.fail_after(30):
        job = await joblet.run("true")
        await joblet.wait(job.id)
        with pytest.raises(JobNotRunning) as e:
            await joblet.engine.stop_job(job.id)
    assert str(e.value) == f"job is not running: {job.id} (current status: COMPLETED)"


@pytest.mark.joblet_config(max_concurrent_jobs=2)
async def test_max_concurrent_jobs_is_enforced(joblet: Harness) -> None:
    with trio.fail_after(30):
        a = await joblet.run("sleep", "60")
        b = await joblet.run("sleep", "60")
        with pytest.raises(ResourceExhausted, match="maximum concurrent jobs reached"):
            await joblet.run("true")
        await joblet.engine.stop_job(a.id)
        c = await joblet.run("true")  # a slot is free again
        await joblet.wait(c.id)
        await joblet.engine.stop_job(b.id)


@pytest.mark.joblet_config(job_timeout=1.0)
async def test_job_timeout_stops_the_job(joblet: Harness) -> None:
    with trio.fail_after(30):
        job = await joblet.run("sleep", "60")
        final = await joblet.wait(job.id)
    assert (final.status, final.exit_code, final.reason) == (JobStatus.STOPPED, -1, "timeout")


async def test_invalid_requests_name_the_problem(joblet: Harness) -> None:
    with pytest.raises(InvalidRequest, match="command is required"):
        await joblet.run("")
    with pytest.raises(InvalidRequest, match="NUL"):
        await joblet.run("echo", "a\x00b")
    with pytest.raises(InvalidRequest, match="maxMemory exceeds system limits"):
        await joblet.run("true", max_memory=10**9)
    with pytest.raises(InvalidRequest, match="must not be negative"):
        await joblet.run("true", max_cpu=-5)
    with pytest.raises(InvalidRequest, match="cpuCores"):
        await joblet.run("true", cpu_cores="0-999")
    assert joblet.engine.list_jobs() == []


# --- stop ---------------------------------------------------------------------------------------


async def test_stop_is_graceful_through_sigterm(joblet: Harness) -> None:
    with trio.fail_after(30):
        job = await joblet.run(
            "sh", "-c", "trap 'echo got TERM; exit 0' TERM; echo ready; sleep 60 & wait"
        )
        await _wait_for_output(joblet, job.id, b"ready\n")
        final = await joblet.engine.stop_job(job.id)
        assert (final.status, final.exit_code) == (JobStatus.STOPPED, -1)
        assert await joblet.output(job.id) == b"ready\ngot TERM\n"


async def test_plain_sleep_stops(joblet: Harness) -> None:
    with trio.fail_after(30):
        job = await joblet.run("sleep", "60")
        final = await joblet.engine.stop_job(job.id)
    assert (final.status, final.exit_code, final.reason) == (JobStatus.STOPPED, -1, "stopped")


async def test_job_ignoring_sigterm_is_killed_after_the_grace_period(joblet: Harness) -> None:
    with trio.fail_after(30):
        job = await joblet.run("sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done")
        await _wait_for_output(joblet, job.id, b"ready\n")
        final = await joblet.engine.stop_job(job.id)
    assert (final.status, final.exit_code) == (JobStatus.STOPPED, -1)


async def test_background_processes_die_with_the_job_and_zombies_are_reaped(
    joblet: Harness,
) -> None:
    script = (
        "sh -c 'sleep 0.2 & exit 0' ; "  # leaves an orphan that PID 1 must reap
        "sleep 0.5; "
        "ps -eo stat= | grep -c '^Z' || true; "
        "setsid sleep 300 & "  # a background process in its own session, left running
        "echo bg started"
    )
    with trio.fail_after(30):
        job = await joblet.run("sh", "-c", script)
        final = await joblet.wait(job.id)
        out = await joblet.output(job.id)
    assert final.status is JobStatus.COMPLETED
    assert out == b"0\nbg started\n"
    # The leak check of the fixture proves the setsid'd sleep is gone with the job's cgroup.


# --- isolation ----------------------------------------------------------------------------------


async def test_isolation(joblet: Harness) -> None:
    secret = joblet.state_dir / "daemon-key.pem"
    secret.write_text("top secret")
    os.chmod(secret, 0o644)  # readable by anyone on the host: only the root isolation protects it
    script = (
        "echo pid=$$; "
        "echo procs=$(ls /proc | grep -c '^[0-9]'); "
        "echo host=$(hostname); "
        "echo uid=$(id -u) gid=$(id -g); "
        "grep -E '^(NoNewPrivs|CapEff|CapPrm|CapAmb)' /proc/self/status; "
        f"cat {secret} >/dev/null 2>&1 && echo secret=readable || echo secret=hidden; "
        f"ls {joblet.state_dir} >/dev/null 2>&1 && echo state=visible || echo state=hidden; "
        "(echo x > /proc/sys/kernel/hostname) 2>/dev/null "
        "&& echo procsys=writable || echo procsys=ro; "
        "touch /etc/x 2>/dev/null && echo etc=writable || echo etc=ro; "
        "touch /usr/x 2>/dev/null && echo usr=writable || echo usr=ro; "
        "touch /work/x && echo work=writable; touch /tmp/x && echo tmp=writable; "
        f"kill -0 {os.getpid()} 2>/dev/null && echo daemon=visible || echo daemon=hidden"
    )
    with trio.fail_after(30):
        job = await joblet.run("sh", "-c", script)
        await joblet.wait(job.id)
        out, _err = await joblet.streams(job.id)
    lines = dict(
        line.split("=", 1) if "=" in line else line.split(":\t")
        for line in out.decode().splitlines()
    )
    assert lines["pid"] == "2"  # PID 1 is the job's init, the command is its child
    assert int(lines["procs"]) <= 6  # init, sh, ls, grep (host processes are not visible)
    assert lines["host"] == job.id
    assert lines["uid"] == "65534 gid=65534"
    assert lines["NoNewPrivs"] == "1"
    assert lines["CapEff"] == lines["CapPrm"] == lines["CapAmb"] == "0000000000000000"
    assert lines["secret"] == "hidden" and lines["state"] == "hidden"
    assert lines["procsys"] == "ro"
    assert lines["etc"] == "ro" and lines["usr"] == "ro"
    assert lines["work"] == "writable" and lines["tmp"] == "writable"
    assert lines["daemon"] == "hidden"


async def test_network_none_has_only_loopback(joblet: Harness) -> None:
    with trio.fail_after(30):
        job = await joblet.run("cat", "/proc/net/dev", network="none")
        await joblet.wait(job.id)
        out = (await joblet.output(job.id)).decode()
    ifaces = {line.split(":")[0].strip() for line in out.splitlines()[2:]}
    assert ifaces == {"lo"}


# --- logs ---------------------------------------------------------------------------------------


#: The memory budget for unwritten output in the stalled-subscriber test: the job writes faster
#: than gzip compresses, so the budget is what its unwritten output may take.
LOG_BUDGET = 32 << 20
#: How much the test process's RSS may grow while a stalled subscriber is 200 MB behind. RSS is
#: a coarse, noisy measure (the allocator, other tests' leftovers, gzip buffers): the exact check
#: is the budget's high-water mark; this one only proves the 200 MB were never held at once.
RSS_BOUND = 128 << 20


async def test_100_concurrent_jobs_have_byte_exact_logs(joblet: Harness) -> None:
    n = 100

    def expected(i: int) -> bytes:
        return b"".join(b"job %d line %d\n" % (i, k) for k in range(1, 2001))

    with trio.fail_after(240):
        ids: dict[int, str] = {}

        async def start(i: int) -> None:
            job = await joblet.run("sh", "-c", f"seq 1 2000 | sed 's/^/job {i} line /'")
            ids[i] = job.id

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(start, i)
        for i, job_id in ids.items():
            final = await joblet.wait(job_id)
            assert final.status is JobStatus.COMPLETED, final
            assert await joblet.output(job_id) == expected(i)


@pytest.mark.joblet_config(logs=LogsSection(memory_budget=LOG_BUDGET))
async def test_a_stalled_subscriber_never_blocks_the_job_and_gets_every_byte(
    joblet: Harness,
) -> None:
    size = 200 * 1024 * 1024
    # Deterministic, compressible-but-not-trivial output: numbered lines.
    script = f"seq 1 100000000 | head -c {size}"
    with trio.fail_after(300):
        baseline = _rss()
        peak = baseline
        job = await joblet.run("sh", "-c", script)
        actor = joblet.engine._resolve(job.id)
        assert isinstance(actor, JobActor)
        stalled = joblet.engine.follow_log(job.id)
        first = await stalled.__anext__()  # subscribe, take one chunk, then stall
        async with trio.open_nursery() as nursery:

            async def watch_rss() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, _rss())
                    await trio.sleep(0.02)

            nursery.start_soon(watch_rss)
            final = await joblet.wait(job.id)  # the job finishes while the subscriber sleeps
            nursery.cancel_scope.cancel()
        assert final.status is JobStatus.COMPLETED
        assert actor.log.size == size
        # The daemon held a bounded window, not the 200 MB the subscriber has not read: exactly
        # (unwritten bytes never exceeded the budget) ...
        budget = joblet.engine.services.budget
        assert 0 < budget.peak <= LOG_BUDGET, budget.peak
        # ... and coarsely, as the kernel sees the process.
        assert peak - baseline < RSS_BOUND, f"RSS grew by {(peak - baseline) >> 20} MiB"
        digest = hashlib.sha256(first.data)
        got = len(first.data)
        async for chunk in stalled:
            assert chunk.offset == got
            digest.update(chunk.data)
            got += len(chunk.data)
    assert got == size
    expected = hashlib.sha256()
    seq = b"".join(b"%d\n" % k for k in range(1, 30_000_000))
    expected.update(seq[:size])
    assert digest.hexdigest() == expected.hexdigest()


def _rss() -> int:
    """This process's resident set size in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def _wait_for_output(joblet: Harness, job_id: str, wanted: bytes) -> None:
    got = b""
    async with aclosing(joblet.engine.follow_log(job_id)) as chunks:
        async for chunk in chunks:
            got += chunk.data
            if wanted in got:
                return
    raise AssertionError(f"job ended before printing {wanted!r}: {got!r}")
