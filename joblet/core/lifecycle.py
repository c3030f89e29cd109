"""The job lifecycle: every transition of a job, in one place, with no I/O and no clock of its own.

A :class:`JobLifecycle` is the one owner of a job's status. The actors report what happened
(the process started, it exited, the record reached the disk, ...) and the lifecycle decides what
that means; nothing else sets a status. The phases and the events that move between them:

==============  ==============================================  ===============================
phase           events (-> next phase)                          clients see
==============  ==============================================  ===============================
SCHEDULED       due -> INITIALIZING, cancel -> ENDING           SCHEDULED
INITIALIZING    started -> RUNNING, start_failed / exited /     INITIALIZING
                gone / internal_error / restart -> ENDING
RUNNING         exited / gone / internal_error / restart        RUNNING
                -> ENDING
ENDING          durable -> ENDED, restart -> ENDING             the status before ENDING
ENDED           (none)                                          the final status
==============  ==============================================  ===============================

ENDING is "ended, not yet durable": the outcome is decided but the final record is not in the
job database yet, so clients still see the status the job had before (a client that saw a job
end must never see it come back as lost after a crash; a failed start never shows RUNNING).
``restart`` is what start-up recovery applies to a job an earlier daemon left unfinished: it ends
FAILED with :data:`RESTART_REASON`. SCHEDULED, ``due`` and ``cancel`` are the scheduler's (the
daemon has no scheduler yet: nothing creates a SCHEDULED job today).

A stop request (:meth:`JobLifecycle.request_stop`) does not change the phase: it is recorded, and
once accepted it wins over whatever the process does afterwards, so a racing exit can never turn
a STOPPED job into FAILED or the reverse (the Go implementation's bug). Any other event in a phase
that does not take it is a bug in the caller and raises :class:`IllegalTransition`.
"""

from __future__ import annotations

import enum
import signal

import attrs

from joblet.core.errors import JobNotRunning
from joblet.core.model import JobInfo, JobSpec, JobStatus

#: Exit code reported for a job ended by a stop request, its timeout, a failed start, an internal
#: error or a daemon restart (spec: -1 when stopped).
STOPPED_EXIT_CODE = -1
#: Exit code reported for a job killed by the OOM killer (128 + SIGKILL).
OOM_EXIT_CODE = 128 + signal.SIGKILL
#: Reason recorded for a job that was running when the daemon died.
RESTART_REASON = "daemon restarted while the job was running"


class Phase(enum.Enum):
    """Where a job is in its life (finer than the status clients see)."""

    SCHEDULED = "SCHEDULED"
    INITIALIZING = "INITIALIZING"
    RUNNING = "RUNNING"
    #: The outcome is decided; the final record is not durable yet.
    ENDING = "ENDING"
    #: The final record is durable.
    ENDED = "ENDED"


class Event(enum.Enum):
    """What can happen to a job (the methods of :class:`JobLifecycle` of the same names)."""

    DUE = "due"
    CANCEL = "cancel"
    STARTED = "started"
    START_FAILED = "start_failed"
    EXITED = "exited"
    GONE = "gone"
    INTERNAL_ERROR = "internal_error"
    DURABLE = "durable"
    RESTART = "restart"


#: Every legal transition. A pair that is not here is an :class:`IllegalTransition`.
TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (Phase.SCHEDULED, Event.DUE): Phase.INITIALIZING,
    (Phase.SCHEDULED, Event.CANCEL): Phase.ENDING,
    (Phase.INITIALIZING, Event.STARTED): Phase.RUNNING,
    (Phase.INITIALIZING, Event.START_FAILED): Phase.ENDING,
    # The process was spawned but ended (or was killed) before it was reported running.
    (Phase.INITIALIZING, Event.EXITED): Phase.ENDING,
    # No exit status to go by: none was spawned, or it could not be waited for.
    (Phase.INITIALIZING, Event.GONE): Phase.ENDING,
    (Phase.INITIALIZING, Event.INTERNAL_ERROR): Phase.ENDING,
    (Phase.INITIALIZING, Event.RESTART): Phase.ENDING,
    (Phase.RUNNING, Event.EXITED): Phase.ENDING,
    (Phase.RUNNING, Event.GONE): Phase.ENDING,
    (Phase.RUNNING, Event.INTERNAL_ERROR): Phase.ENDING,
    (Phase.RUNNING, Event.RESTART): Phase.ENDING,
    (Phase.ENDING, Event.DURABLE): Phase.ENDED,
    # Its end never reached the disk before the daemon died: it failed with the restart.
    (Phase.ENDING, Event.RESTART): Phase.ENDING,
}

# Phases whose visible status is the phase's own name.
_SHOWN = {
    Phase.SCHEDULED: JobStatus.SCHEDULED,
    Phase.INITIALIZING: JobStatus.INITIALIZING,
    Phase.RUNNING: JobStatus.RUNNING,
}


class IllegalTransition(RuntimeError):
    """An event arrived in a phase that does not take it: a bug in the caller, not a client's."""

    def __init__(self, job_id: str, phase: Phase, event: Event) -> None:
        super().__init__(f"job {job_id}: {event.value} is not possible in phase {phase.value}")
        self.phase = phase
        self.event = event


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return str(num)


@attrs.define
class JobLifecycle:
    """One job's phase, outcome and times; the only place a job's status is decided.

    Attributes:
        job_id: The job's id (for error messages).
        start_time: When the job was accepted (Unix seconds).
        phase: Where the job is.
        status: The decided status: the phase's for a job that has not ended, the outcome once
            ENDING or ENDED. Clients see :meth:`visible` instead.
        exit_code: Final exit code (valid once ENDING).
        reason: Why the job ended as it did; empty for a plain exit.
        stop_reason: Set once a stop was accepted: ``"stopped"``, ``"timeout"``,
            ``"daemon shutdown"``.
        end_time: When the outcome was decided.
        pid: Host PID of the job's top process while it runs, else 0.
    """

    job_id: str
    start_time: float | None = None
    phase: Phase = Phase.INITIALIZING
    status: JobStatus = JobStatus.INITIALIZING
    exit_code: int = 0
    reason: str = ""
    stop_reason: str | None = None
    end_time: float | None = None
    pid: int = 0
    # The status clients saw before ENDING (what they keep seeing until the end is durable).
    _shown: JobStatus = JobStatus.INITIALIZING

    @classmethod
    def scheduled(cls, job_id: str, *, accepted: float) -> JobLifecycle:
        """A job that waits for its time (the scheduler's)."""
        return cls(job_id, start_time=accepted, phase=Phase.SCHEDULED, status=JobStatus.SCHEDULED)

    @classmethod
    def from_record(cls, info: JobInfo) -> JobLifecycle:
        """The lifecycle of a job as its record in the job database shows it.

        A record with a terminal status is ENDED (it is durable: it was read from disk); any
        other is in the phase of its status.
        """
        if info.status.terminal:
            phase, shown = Phase.ENDED, info.status
        else:
            phase = Phase(info.status.value)
            shown = info.status
        return cls(
            info.id,
            start_time=info.start_time,
            phase=phase,
            status=info.status,
            exit_code=info.exit_code,
            reason=info.reason,
            end_time=info.end_time,
            pid=info.pid,
            shown=shown,
        )

    # --- queries ------------------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        """Whether the outcome is decided (ENDING or ENDED)."""
        return self.phase in (Phase.ENDING, Phase.ENDED)

    def record(self, spec: JobSpec, node_id: str) -> JobInfo:
        """The job as it is decided now: what the job database gets."""
        return self._info(spec, node_id, self.status, shown_end=True)

    def visible(self, spec: JobSpec, node_id: str) -> JobInfo:
        """The job as clients see it: an end shows only once it is durable."""
        if self.phase is Phase.ENDING:
            return self._info(spec, node_id, self._shown, shown_end=False)
        return self._info(spec, node_id, self.status, shown_end=True)

    def _info(self, spec: JobSpec, node_id: str, status: JobStatus, *, shown_end: bool) -> JobInfo:
        return JobInfo(
            id=self.job_id,
            spec=spec,
            status=status,
            start_time=self.start_time,
            end_time=self.end_time if shown_end else None,
            exit_code=self.exit_code if shown_end else 0,
            reason=self.reason if shown_end else "",
            pid=self.pid if status is JobStatus.RUNNING else 0,
            node_id=node_id,
        )

    # --- events -------------------------------------------------------------------------------

    def _move(self, event: Event) -> None:
        nxt = TRANSITIONS.get((self.phase, event))
        if nxt is None:
            raise IllegalTransition(self.job_id, self.phase, event)
        if nxt is Phase.ENDING and self.phase is not Phase.ENDING:
            self._shown = self.status
        self.phase = nxt
        if nxt in _SHOWN:
            self.status = _SHOWN[nxt]

    def _end(self, status: JobStatus, exit_code: int, reason: str, now: float) -> None:
        self.status, self.exit_code, self.reason, self.end_time = status, exit_code, reason, now
        self.pid = 0

    def due(self) -> None:
        """A scheduled job's time has come: it starts now."""
        self._move(Event.DUE)

    def cancel(self, now: float) -> None:
        """A scheduled job is canceled before it started."""
        self._move(Event.CANCEL)
        self._end(JobStatus.CANCELED, 0, "canceled", now)

    def started(self, pid: int) -> None:
        """The job's command is running as host process ``pid``."""
        self._move(Event.STARTED)
        self.pid = pid

    def start_failed(self, message: str, now: float) -> None:
        """The job could not be started (its setup failed before the command ran)."""
        self._move(Event.START_FAILED)
        self._end(JobStatus.FAILED, STOPPED_EXIT_CODE, f"start failed: {message}", now)

    def internal_error(self, message: str, now: float) -> None:
        """A bug or an unexpected system error in the daemon ended the job."""
        self._move(Event.INTERNAL_ERROR)
        self._end(JobStatus.FAILED, STOPPED_EXIT_CODE, f"internal error: {message}", now)

    def restart(self, now: float) -> None:
        """Recovery found the job unfinished by a daemon that died: it failed with the restart."""
        self._move(Event.RESTART)
        self._end(JobStatus.FAILED, STOPPED_EXIT_CODE, RESTART_REASON, now)

    def durable(self) -> None:
        """The final record is in the job database: clients may see the end."""
        self._move(Event.DURABLE)

    def request_stop(self, reason: str = "stopped") -> bool:
        """Accept a stop request.

        Args:
            reason: ``"stopped"`` for a client's request, ``"timeout"`` for jobTimeout,
                ``"daemon shutdown"``.

        Returns:
            True if this call accepted the stop, False if there is nothing more to do: a stop
            was already under way, or the job is ending anyway (wait for its end).

        Raises:
            JobNotRunning: The job has ended, or has not started (SCHEDULED).
        """
        if self.phase in (Phase.ENDED, Phase.SCHEDULED):
            raise JobNotRunning(self.job_id, self.status.value)
        if self.phase is Phase.ENDING or self.stop_reason is not None:
            return False
        self.stop_reason = reason
        return True

    def gone(self, now: float) -> None:
        """The job's processes are gone with no exit status to go by.

        Its process was never spawned (the start was stopped before it ran) or could not be
        waited for in time. A stop that was accepted ends it STOPPED as usual; without one, the
        daemon lost track of it, an internal error.
        """
        self._move(Event.GONE)
        if self.stop_reason is not None:
            self._end(JobStatus.STOPPED, STOPPED_EXIT_CODE, self.stop_reason, now)
        else:
            self._end(
                JobStatus.FAILED,
                STOPPED_EXIT_CODE,
                "internal error: the job's process could not be waited for",
                now,
            )

    def exited(self, returncode: int, *, oom_killed: bool, now: float) -> None:
        """The job's processes are gone: decide the outcome from how it ended.

        Args:
            returncode: As reported by the job's top process: its exit status, or ``-N`` when it
                was killed by signal N. The job's PID 1 reports a command killed by signal N as
                ``128 + N``, the shell convention.
            oom_killed: The job's cgroup recorded an OOM kill.
            now: The end time.
        """
        self._move(Event.EXITED)
        if self.stop_reason is not None:
            self._end(JobStatus.STOPPED, STOPPED_EXIT_CODE, self.stop_reason, now)
            return
        if returncode < 0:
            returncode = 128 - returncode
        if returncode == 0 and not oom_killed:
            self._end(JobStatus.COMPLETED, 0, "", now)
        elif oom_killed:
            # Exit 0 with an OOM kill: the command survived but something in the job was killed.
            self._end(JobStatus.FAILED, returncode or OOM_EXIT_CODE, "OOMKilled", now)
        elif 128 < returncode <= 128 + 64:
            sig = returncode - 128
            self._end(JobStatus.FAILED, returncode, f"signal {sig} ({_signal_name(sig)})", now)
        else:
            self._end(JobStatus.FAILED, returncode, f"exit code {returncode}", now)
