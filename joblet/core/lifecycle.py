"""The job state machine: pure, no I/O, no clock of its own.

Every status change of a job goes through :class:`JobState`, and the final status is decided once,
in :meth:`JobState.finish`, from everything known at that moment. A stop request that was accepted
while the job ran always wins over whatever the process did afterwards, so a racing exit can never
turn a STOPPED job into FAILED or the reverse (the Go implementation's bug).
"""

from __future__ import annotations

import signal

import attrs

from joblet.core.errors import JobNotRunning
from joblet.core.model import JobStatus

#: Exit code reported for a job ended by a stop request or its timeout (spec).
STOPPED_EXIT_CODE = -1
#: Exit code reported for a job killed by the OOM killer (128 + SIGKILL).
OOM_EXIT_CODE = 128 + signal.SIGKILL


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return str(num)


@attrs.define
class JobState:
    """Status, exit code and reason of one job.

    Attributes:
        job_id: The job's id (for error messages).
        status: Current status.
        exit_code: Final exit code (valid once terminal).
        reason: Why the job ended as it did; empty for a plain exit.
        stop_reason: Set when a stop was accepted: ``"stopped"`` or ``"timeout"``.
        start_time: When the job was accepted (Unix seconds).
        end_time: When it reached a terminal status.
    """

    job_id: str
    status: JobStatus = JobStatus.INITIALIZING
    exit_code: int = 0
    reason: str = ""
    stop_reason: str | None = None
    start_time: float | None = None
    end_time: float | None = None

    def started(self) -> None:
        """The command is running."""
        if self.status is JobStatus.INITIALIZING:
            self.status = JobStatus.RUNNING

    def start_failed(self, message: str, now: float) -> None:
        """The job could not be started."""
        self.status = JobStatus.FAILED
        self.exit_code = -1
        self.reason = f"start failed: {message}"
        self.end_time = now

    def request_stop(self, reason: str = "stopped") -> bool:
        """Accept a stop request.

        Args:
            reason: ``"stopped"`` for a client's request, ``"timeout"`` for jobTimeout.

        Returns:
            True if this call accepted the stop, False if a stop was already under way.

        Raises:
            JobNotRunning: The job has already ended.
        """
        if self.status.terminal:
            raise JobNotRunning(self.job_id, self.status.value)
        if self.stop_reason is not None:
            return False
        self.stop_reason = reason
        return True

    def finish(self, returncode: int, *, oom_killed: bool, now: float) -> None:
        """Decide the final status from how the process ended.

        Args:
            returncode: As reported by the job's top process: its exit status, or ``-N`` when it
                was killed by signal N. The job's PID 1 reports a command killed by signal N as
                ``128 + N``, the shell convention.
            oom_killed: The job's cgroup recorded an OOM kill.
            now: The end time.
        """
        if self.status.terminal:
            return
        self.end_time = now
        if self.stop_reason is not None:
            self.status = JobStatus.STOPPED
            self.exit_code = STOPPED_EXIT_CODE
            self.reason = self.stop_reason
            return
        if returncode < 0:
            returncode = 128 - returncode
        if returncode == 0 and not oom_killed:
            self.status = JobStatus.COMPLETED
            self.exit_code = 0
            return
        self.status = JobStatus.FAILED
        self.exit_code = returncode
        if oom_killed:
            self.reason = "OOMKilled"
            if returncode == 0:
                # The command survived but something in the job was OOM-killed.
                self.exit_code = OOM_EXIT_CODE
        elif 128 < returncode <= 128 + 64:
            self.reason = f"signal {returncode - 128} ({_signal_name(returncode - 128)})"
        else:
            self.reason = f"exit code {returncode}"
