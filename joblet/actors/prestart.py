"""The stage-1 pool: stage-1 processes started ahead of demand, so a job start skips their start-up.

Starting stage 1 (fork, exec, the interpreter's start-up and its imports) is most of a cold job
start (figures in ``docs/performance.md``). :class:`Stage1Pool` keeps ``isolation.prestart`` of them
started and waiting (each one a :class:`~joblet.sys.launch.Stage1`, exactly what a cold start
would run, blocked reading a launch spec it has not been given), hands one to each job start and
starts a replacement once that job runs. When none is waiting, a job starts one of its own as
before.

Each waiting process is owned by one task of the pool's nursery, which notices when it dies
(it is then closed and replaced) and kills and reaps it when the pool stops; taking a process
from the pool moves its ownership to the job start. A process that died but was not yet noticed
is skipped, and one that dies after it was taken, before it took the spec, is detected by the
launch protocol (:class:`~joblet.sys.launch.Stage1Gone`): the start moves on to the next one,
so a dead process is never a job's.

A waiting process stays in the daemon's cgroup: it joins its job's groups itself once it has the
spec, and checks ``/proc/self/cgroup`` before any isolation, as a cold stage 1 does (why it is not
moved into a job group ahead of time: ``docs/decisions.md``).
"""

from __future__ import annotations

import attrs
import trio

from joblet import logfmt
from joblet.core.errors import StartFailed
from joblet.sys import launch

#: Pause before the pool tries again after a stage 1 could not be started (say, out of file
#: descriptors), so a persistent failure does not spin; starts meanwhile start their own stage 1
#: and report the failure as theirs.
RETRY_DELAY = 1.0


@attrs.define(eq=False)
class _Waiting:
    """A stage 1 in the pool and the cancel scope of the task that owns it."""

    stage1: launch.Stage1
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    taken: bool = False


class Stage1Pool:
    """Keeps ``size`` stage-1 processes started and waiting for a job.

    Run it as a long-lived task (``await nursery.start(pool.run)``) for as long as jobs start;
    :meth:`spawn` works without it too (it then always starts a new stage 1). On the way out it
    kills and reaps every waiting process.

    Args:
        size: How many to keep waiting; 0 disables the pool.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._waiting: list[_Waiting] = []  # oldest first
        self._wanted = trio.Event()  # set when the pool may be short of processes
        self._changed = trio.Event()  # set (and replaced) whenever _waiting changes

    async def run(
        self, *, task_status: trio.TaskStatus[Stage1Pool] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep the pool full until cancelled; usable at once (it fills in the background)."""
        async with trio.open_nursery() as nursery:
            task_status.started(self)
            while True:
                while len(self._waiting) < self.size:
                    try:
                        await nursery.start(self._keep)
                    except StartFailed as e:
                        logfmt.error("stage 1 could not be started ahead", error=str(e))
                        await trio.sleep(RETRY_DELAY)
                await self._wanted.wait()
                self._wanted = trio.Event()

    async def spawn(self, spec: launch.LaunchSpec) -> trio.Process:
        """Start a job with a waiting stage 1, or a new one if none is waiting.

        See :func:`joblet.sys.launch.spawn`, which this replaces.

        Raises:
            StartFailed: Stage 1 reported a failure (it has been reaped).
        """
        try:
            while (stage1 := self._take()) is not None:
                try:
                    return await stage1.hand_over(spec)
                except launch.Stage1Gone as e:
                    logfmt.warn(
                        "a waiting stage 1 exited before it took its job; trying another",
                        jobId=spec.job_id,
                        pid=stage1.pid,
                        status=str(e),
                    )
            return await launch.spawn(spec)
        finally:
            # Replacements start once this job runs, not while it starts: on a small host they
            # would compete with it for the CPU.
            self._wanted.set()

    def waiting_pids(self) -> list[int]:
        """The process ids of the stage-1 processes waiting in the pool, oldest first."""
        return [w.stage1.pid for w in self._waiting]

    async def wait_full(self) -> None:
        """Return once ``size`` stage-1 processes are waiting (at once if they are)."""
        while len(self._waiting) < self.size:
            await self._changed.wait()

    def _take(self) -> launch.Stage1 | None:
        while self._waiting:
            waiting = self._waiting.pop(0)
            self._notify()
            if not waiting.stage1.alive:
                # Died, and its task has not run since: it closes it when it does.
                continue
            waiting.taken = True
            waiting.scope.cancel()
            return waiting.stage1
        return None

    async def _keep(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start a stage 1 and own it while it waits: until taken, dead, or the pool stops."""
        stage1 = await launch.Stage1.start()
        waiting = _Waiting(stage1)
        self._waiting.append(waiting)
        self._notify()
        try:
            with waiting.scope:
                task_status.started()
                await stage1.proc.wait()
            if not waiting.taken:
                logfmt.warn(
                    "a waiting stage 1 exited; replacing it",
                    pid=stage1.pid,
                    exitCode=stage1.proc.returncode,
                )
        finally:
            if not waiting.taken:
                if waiting in self._waiting:
                    self._waiting.remove(waiting)
                    self._notify()
                self._wanted.set()
                await stage1.aclose()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
