"""The retention actor: removes the files of jobs that ended long ago (the spec's retention).

Every ``persist.storage.retention.cleanup_interval`` (and once at start-up) it looks at
``<state>/logs/<job_id>/`` and ``<state>/metrics/<job_id>/``:

- a job that ended more than ``logs_days`` ago loses its log, more than ``metrics_days`` ago its
  metrics (0 days: kept forever);
- a running job is never touched;
- a directory of a job the engine does not know (its record is gone) ages by the newest
  modification time of the directory and the files in it (the last write, about when the job
  ended);
- once a job's log and metrics are both gone by age, its record is dropped too (``forget``), so
  the job disappears from ``rnx job list``.

The actor decides what is due; the deleting is done by the one owner of those files, the disk
writer (:meth:`~joblet.actors.diskwriter.DiskWriter.delete_logs`,
:meth:`~joblet.actors.diskwriter.DiskWriter.delete_metrics`), which orders it after any pending
write of the job. Where end times come from, how files and records are removed (the engine's
:meth:`~joblet.actors.engine.Engine.end_times` and :meth:`~joblet.actors.engine.Engine.forget`)
and the wall clock are given to the actor, so it can be tested with trio's mock clock.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from joblet import logfmt
from joblet.config import RetentionSection

#: Seconds in a retention day.
DAY = 86400.0

#: Job id -> the time it ended (Unix seconds), None while it runs.
EndTimes = Callable[[], Mapping[str, float | None]]


@attrs.frozen
class Sweep:
    """What one clean-up did.

    Attributes:
        logs_deleted: Jobs whose log was removed.
        metrics_deleted: Jobs whose metrics were removed.
        forgotten: Jobs whose record was dropped.
    """

    logs_deleted: tuple[str, ...] = ()
    metrics_deleted: tuple[str, ...] = ()
    forgotten: tuple[str, ...] = ()


@attrs.frozen
class _Kind:
    name: str
    base: Path
    days: int
    delete: Callable[[str], Awaitable[None]]

    def cutoff(self, now: float) -> float | None:
        """Files of jobs that ended before this time go; None: kept forever."""
        return now - self.days * DAY if self.days > 0 else None


class RetentionActor:
    """Deletes old logs and metrics, and then the records of their jobs.

    Run :meth:`run` as a long-lived task; :meth:`sweep` does one clean-up.

    Args:
        logs_dir: ``<state>/logs``.
        metrics_dir: ``<state>/metrics``.
        cfg: How long files are kept and how often to look.
        end_times: Every known job's end time (Unix seconds), None while it runs; called on the
            event loop.
        forget: Drops a job's record once its files are gone.
        delete_logs: Deletes a job's log files.
        delete_metrics: Deletes a job's metrics files.
        wall_clock: Unix time now (``time.time``).
        run_sync: Runs the file system work off the event loop (``trio.to_thread.run_sync``).
    """

    def __init__(
        self,
        logs_dir: Path,
        metrics_dir: Path,
        cfg: RetentionSection,
        *,
        end_times: EndTimes,
        forget: Callable[[str], Awaitable[None]],
        delete_logs: Callable[[str], Awaitable[None]],
        delete_metrics: Callable[[str], Awaitable[None]],
        wall_clock: Callable[[], float] = time.time,
        run_sync: Callable[[Callable[[], Any]], Awaitable[Any]] = trio.to_thread.run_sync,
    ) -> None:
        self._kinds = (
            _Kind("logs", logs_dir, cfg.logs_days, delete_logs),
            _Kind("metrics", metrics_dir, cfg.metrics_days, delete_metrics),
        )
        self._interval = cfg.cleanup_interval
        self._end_times = end_times
        self._forget = forget
        self._wall_clock = wall_clock
        self._run_sync = run_sync

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Clean up now and then every ``cleanup_interval``, until cancelled."""
        task_status.started()
        while True:
            await self.sweep()
            await trio.sleep(self._interval)

    async def sweep(self) -> Sweep:
        """One clean-up: delete what is due, then drop the records of jobs with nothing left.

        A file that cannot be deleted is logged and tried again at the next clean-up.
        """
        now = self._wall_clock()
        ends = dict(self._end_times())
        due: dict[str, list[str]] = await self._run_sync(partial(self._due, now, ends))
        deleted: dict[str, list[str]] = {}
        for kind in self._kinds:
            deleted[kind.name] = done = []
            for job_id in due[kind.name]:
                try:
                    await kind.delete(job_id)
                except Exception as exc:
                    logfmt.warn(
                        f"old job {kind.name} could not be deleted", jobId=job_id, error=str(exc)
                    )
                    continue
                done.append(job_id)
        forgettable: list[str] = await self._run_sync(partial(self._forgettable, now, ends))
        forgotten = []
        for job_id in forgettable:
            try:
                await self._forget(job_id)
            except Exception as exc:
                logfmt.error("job record could not be dropped", jobId=job_id, error=str(exc))
                continue
            forgotten.append(job_id)
        sweep = Sweep(tuple(deleted["logs"]), tuple(deleted["metrics"]), tuple(forgotten))
        if sweep != Sweep():
            logfmt.info(
                "retention clean-up",
                logsDeleted=len(sweep.logs_deleted),
                metricsDeleted=len(sweep.metrics_deleted),
                jobsForgotten=len(sweep.forgotten),
            )
        return sweep

    # --- in a worker thread -------------------------------------------------------------------

    def _due(self, now: float, ends: Mapping[str, float | None]) -> dict[str, list[str]]:
        """Per kind, the jobs whose files are old enough to go."""
        due: dict[str, list[str]] = {}
        for kind in self._kinds:
            due[kind.name] = found = []
            cutoff = kind.cutoff(now)
            if cutoff is None:
                continue
            for job_id in _entries(kind.base):
                path = kind.base / job_id
                if job_id in ends:
                    end = ends[job_id]
                    if end is None or end >= cutoff:
                        continue  # running, or not old enough
                else:
                    newest = _newest_mtime(path)
                    if newest is None or newest >= cutoff:
                        continue  # not a directory, gone, or recent
                found.append(job_id)
        return due

    def _forgettable(self, now: float, ends: Mapping[str, float | None]) -> list[str]:
        """Ended jobs past both retention periods whose log and metrics are both gone."""
        cutoffs = [(kind, kind.cutoff(now)) for kind in self._kinds]
        if any(cutoff is None for _, cutoff in cutoffs):
            return []  # one kind is kept forever: so are the records
        out = []
        for job_id, end in ends.items():
            if end is None:
                continue
            if all(
                cutoff is not None and end < cutoff and not os.path.lexists(kind.base / job_id)
                for kind, cutoff in cutoffs
            ):
                out.append(job_id)
        return out


def _entries(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except OSError as exc:  # tried again at the next clean-up
        logfmt.warn("cannot list job files", path=str(directory), error=str(exc))
        return []


def _newest_mtime(path: Path) -> float | None:
    """Newest modification time of a directory and the files directly in it; None if it is
    not a directory (a symlink or a file is not ours to age)."""
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            return None
        newest = st.st_mtime
        with os.scandir(path) as it:
            for entry in it:
                try:
                    newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
                except FileNotFoundError:
                    continue
    except OSError:  # gone meanwhile, or unreadable: not aged this time
        return None
    return newest
