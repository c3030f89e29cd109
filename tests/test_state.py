"""The job state machine, without processes or a running loop."""

from __future__ import annotations

import pytest

from joblet.core.errors import JobNotRunning
from joblet.core.lifecycle import JobState
from joblet.core.model import JobStatus


def running() -> JobState:
    s = JobState("j1", start_time=1.0)
    s.started()
    return s


@pytest.mark.parametrize(
    ("returncode", "oom", "status", "code", "reason"),
    [
        (0, False, JobStatus.COMPLETED, 0, ""),
        (3, False, JobStatus.FAILED, 3, "exit code 3"),
        (137, False, JobStatus.FAILED, 137, "signal 9 (SIGKILL)"),
        (-9, False, JobStatus.FAILED, 137, "signal 9 (SIGKILL)"),
        (143, False, JobStatus.FAILED, 143, "signal 15 (SIGTERM)"),
        (137, True, JobStatus.FAILED, 137, "OOMKilled"),
        (0, True, JobStatus.FAILED, 137, "OOMKilled"),
        (255, False, JobStatus.FAILED, 255, "exit code 255"),
    ],
)
def test_final_status_from_exit(
    returncode: int, oom: bool, status: JobStatus, code: int, reason: str
) -> None:
    s = running()
    s.finish(returncode, oom_killed=oom, now=2.0)
    assert (s.status, s.exit_code, s.reason, s.end_time) == (status, code, reason, 2.0)


def test_accepted_stop_wins_over_a_racing_exit() -> None:
    for returncode, oom in ((0, False), (1, False), (143, False), (137, True)):
        s = running()
        assert s.request_stop("stopped") is True
        assert s.request_stop("timeout") is False  # the first reason stays
        s.finish(returncode, oom_killed=oom, now=2.0)
        assert (s.status, s.exit_code, s.reason) == (JobStatus.STOPPED, -1, "stopped")


def test_final_status_is_decided_once() -> None:
    s = running()
    s.finish(0, oom_killed=False, now=2.0)
    s.finish(9, oom_killed=True, now=3.0)
    assert (s.status, s.exit_code, s.end_time) == (JobStatus.COMPLETED, 0, 2.0)


def test_stop_after_the_end_names_the_status() -> None:
    s = running()
    s.finish(1, oom_killed=False, now=2.0)
    with pytest.raises(JobNotRunning, match=r"^job is not running: j1 \(current status: FAILED\)$"):
        s.request_stop()


def test_start_failure() -> None:
    s = JobState("j1", start_time=1.0)
    s.start_failed("command not found: x", now=1.5)
    assert (s.status, s.exit_code, s.reason) == (
        JobStatus.FAILED,
        -1,
        "start failed: command not found: x",
    )
    assert s.status.terminal
