"""The job lifecycle, without processes or a running loop: every (phase, event) pair, as a table."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from joblet.core.errors import JobNotRunning
from joblet.core.lifecycle import (
    RESTART_REASON,
    TRANSITIONS,
    Event,
    IllegalTransition,
    JobLifecycle,
    Phase,
)
from joblet.core.model import JobInfo, JobSpec, JobStatus

SPEC = JobSpec(command="true")

# How to fire each event (arguments as the actors give them).
FIRE: dict[Event, Callable[[JobLifecycle], None]] = {
    Event.DUE: lambda s: s.due(),
    Event.CANCEL: lambda s: s.cancel(now=5.0),
    Event.STARTED: lambda s: s.started(pid=4242),
    Event.START_FAILED: lambda s: s.start_failed("command not found: x", now=5.0),
    Event.EXITED: lambda s: s.exited(0, oom_killed=False, now=5.0),
    Event.GONE: lambda s: s.gone(now=5.0),
    Event.INTERNAL_ERROR: lambda s: s.internal_error("boom", now=5.0),
    Event.DURABLE: lambda s: s.durable(),
    Event.RESTART: lambda s: s.restart(now=5.0),
}

# The expected machine, written out independently of the module's own table.
EXPECTED: dict[tuple[Phase, Event], Phase] = {
    (Phase.SCHEDULED, Event.DUE): Phase.INITIALIZING,
    (Phase.SCHEDULED, Event.CANCEL): Phase.ENDING,
    (Phase.INITIALIZING, Event.STARTED): Phase.RUNNING,
    (Phase.INITIALIZING, Event.START_FAILED): Phase.ENDING,
    (Phase.INITIALIZING, Event.EXITED): Phase.ENDING,
    (Phase.INITIALIZING, Event.GONE): Phase.ENDING,
    (Phase.INITIALIZING, Event.INTERNAL_ERROR): Phase.ENDING,
    (Phase.INITIALIZING, Event.RESTART): Phase.ENDING,
    (Phase.RUNNING, Event.EXITED): Phase.ENDING,
    (Phase.RUNNING, Event.GONE): Phase.ENDING,
    (Phase.RUNNING, Event.INTERNAL_ERROR): Phase.ENDING,
    (Phase.RUNNING, Event.RESTART): Phase.ENDING,
    (Phase.ENDING, Event.DURABLE): Phase.ENDED,
    (Phase.ENDING, Event.RESTART): Phase.ENDING,
}

# A way to reach each phase from a fresh job.
PATHS: dict[Phase, tuple[Event, ...]] = {
    Phase.SCHEDULED: (),
    Phase.INITIALIZING: (Event.DUE,),
    Phase.RUNNING: (Event.DUE, Event.STARTED),
    Phase.ENDING: (Event.DUE, Event.STARTED, Event.EXITED),
    Phase.ENDED: (Event.DUE, Event.STARTED, Event.EXITED, Event.DURABLE),
}


def in_phase(phase: Phase) -> JobLifecycle:
    s = JobLifecycle.scheduled("j1", accepted=1.0)
    for event in PATHS[phase]:
        FIRE[event](s)
    assert s.phase is phase
    return s


def running() -> JobLifecycle:
    return in_phase(Phase.RUNNING)


def test_the_table_is_the_machine() -> None:
    assert TRANSITIONS == EXPECTED


@pytest.mark.parametrize("event", list(Event), ids=lambda e: e.value)
@pytest.mark.parametrize("phase", list(Phase), ids=lambda p: p.value)
def test_every_phase_and_event(phase: Phase, event: Event) -> None:
    s = in_phase(phase)
    expected = EXPECTED.get((phase, event))
    if expected is None:
        before = (s.phase, s.status, s.exit_code, s.reason, s.end_time)
        with pytest.raises(
            IllegalTransition, match=f"{event.value} is not possible in phase {phase.value}$"
        ):
            FIRE[event](s)
        assert (s.phase, s.status, s.exit_code, s.reason, s.end_time) == before
    else:
        FIRE[event](s)
        assert s.phase is expected


def test_a_new_job_is_initializing() -> None:
    s = JobLifecycle("j1", start_time=1.0)
    assert (s.phase, s.status) == (Phase.INITIALIZING, JobStatus.INITIALIZING)
    assert s.visible(SPEC, "n").status is JobStatus.INITIALIZING


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
    s.exited(returncode, oom_killed=oom, now=2.0)
    assert (s.status, s.exit_code, s.reason, s.end_time) == (status, code, reason, 2.0)


def test_accepted_stop_wins_over_a_racing_exit() -> None:
    for returncode, oom in ((0, False), (1, False), (143, False), (137, True)):
        s = running()
        assert s.request_stop("stopped") is True
        assert s.request_stop("timeout") is False  # the first reason stays
        s.exited(returncode, oom_killed=oom, now=2.0)
        assert (s.status, s.exit_code, s.reason) == (JobStatus.STOPPED, -1, "stopped")


def test_the_outcome_is_decided_once() -> None:
    s = running()
    s.exited(0, oom_killed=False, now=2.0)
    with pytest.raises(IllegalTransition):
        s.exited(9, oom_killed=True, now=3.0)
    with pytest.raises(IllegalTransition):
        s.internal_error("late", now=3.0)
    assert (s.status, s.exit_code, s.end_time) == (JobStatus.COMPLETED, 0, 2.0)


def test_stop_of_an_ending_job_waits_for_its_end() -> None:
    s = running()
    s.exited(1, oom_killed=False, now=2.0)
    assert s.request_stop() is False  # nothing to do: it has ended, its record is on its way
    assert s.stop_reason is None
    assert s.status is JobStatus.FAILED


def test_stop_after_the_end_names_the_status() -> None:
    s = running()
    s.exited(1, oom_killed=False, now=2.0)
    s.durable()
    with pytest.raises(JobNotRunning, match=r"^job is not running: j1 \(current status: FAILED\)$"):
        s.request_stop()


def test_stop_of_a_scheduled_job_is_refused() -> None:
    s = in_phase(Phase.SCHEDULED)
    with pytest.raises(JobNotRunning, match=r"\(current status: SCHEDULED\)$"):
        s.request_stop()


def test_a_stop_before_the_process_started_ends_stopped() -> None:
    s = in_phase(Phase.INITIALIZING)
    assert s.request_stop("daemon shutdown") is True
    s.gone(now=2.0)
    assert (s.status, s.exit_code, s.reason) == (JobStatus.STOPPED, -1, "daemon shutdown")


def test_a_process_lost_without_a_stop_is_an_internal_error() -> None:
    s = running()
    s.gone(now=2.0)
    assert (s.status, s.exit_code, s.reason) == (
        JobStatus.FAILED,
        -1,
        "internal error: the job's process could not be waited for",
    )


def test_start_failure() -> None:
    s = JobLifecycle("j1", start_time=1.0)
    s.start_failed("command not found: x", now=1.5)
    assert (s.status, s.exit_code, s.reason) == (
        JobStatus.FAILED,
        -1,
        "start failed: command not found: x",
    )
    assert s.ended and s.phase is Phase.ENDING


def test_an_internal_error_has_its_own_reason() -> None:
    s = running()
    s.internal_error("disk on fire", now=2.0)
    assert (s.status, s.exit_code, s.reason) == (
        JobStatus.FAILED,
        -1,
        "internal error: disk on fire",
    )


def test_cancel() -> None:
    s = in_phase(Phase.SCHEDULED)
    s.cancel(now=2.0)
    s.durable()
    info = s.visible(SPEC, "n")
    assert (info.status, info.end_time) == (JobStatus.CANCELED, 2.0)


def test_an_end_shows_only_once_durable() -> None:
    s = running()
    assert s.visible(SPEC, "n").pid == 4242
    s.exited(3, oom_killed=False, now=2.0)
    shown = s.visible(SPEC, "n")
    assert (shown.status, shown.end_time, shown.exit_code, shown.reason) == (
        JobStatus.RUNNING,
        None,
        0,
        "",
    )
    recorded = s.record(SPEC, "n")
    assert (recorded.status, recorded.exit_code, recorded.reason) == (
        JobStatus.FAILED,
        3,
        "exit code 3",
    )
    s.durable()
    assert s.visible(SPEC, "n") == recorded


def test_a_failed_start_never_shows_running() -> None:
    s = JobLifecycle("j1", start_time=1.0)
    s.start_failed("no such file", now=1.5)
    assert s.visible(SPEC, "n").status is JobStatus.INITIALIZING
    s.durable()
    assert s.visible(SPEC, "n").status is JobStatus.FAILED


def record(status: JobStatus, **fields: object) -> JobInfo:
    return JobInfo(id="j1", spec=SPEC, status=status, start_time=1.0, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("status", [JobStatus.INITIALIZING, JobStatus.RUNNING])
def test_a_job_left_unfinished_fails_with_the_restart(status: JobStatus) -> None:
    s = JobLifecycle.from_record(record(status, pid=77))
    s.restart(now=9.0)
    got = s.record(SPEC, "n")
    assert (got.status, got.exit_code, got.reason, got.end_time, got.pid) == (
        JobStatus.FAILED,
        -1,
        RESTART_REASON,
        9.0,
        0,
    )


@pytest.mark.parametrize("status", [JobStatus.COMPLETED, JobStatus.STOPPED, JobStatus.CANCELED])
def test_a_recorded_end_is_durable(status: JobStatus) -> None:
    s = JobLifecycle.from_record(record(status, end_time=2.0))
    assert s.phase is Phase.ENDED
    with pytest.raises(IllegalTransition):
        s.restart(now=9.0)
