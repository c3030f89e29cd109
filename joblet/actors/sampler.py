"""Job metrics while the daemon runs: one sampler per running job, and their followers.

A :class:`JobSampler` belongs to one :class:`~joblet.actors.job.JobActor`. Its
:meth:`~JobSampler.run` task lives in the job's supervising nursery: it takes a sample as soon as
the job runs, then one
every ``metrics.interval``, and a last one when the job has ended (its processes are gone but its
cgroup, with the final totals, is still there). Each sample is read in a worker thread (cgroup and
``/proc`` files), handed to the live followers, and written to
``<state>/metrics/<job_id>/metrics.jsonl.gz`` (:mod:`joblet.store.metricfiles`) by the disk writer
(:meth:`~joblet.actors.diskwriter.DiskWriter.write_metrics`, which also deletes it), one gzip
member per flush: at most every :data:`FLUSH_INTERVAL` seconds, and at the job's end.

The :class:`MetricsHub` knows the samplers of running jobs; :meth:`MetricsHub.follow` gives every
sample of a job: for a running job what is stored, then live samples until the job ends; for any
other job (ended, or from before a daemon restart) what is stored.

Slow followers never hold up the sampler: each has a bounded channel, and a follower whose channel
is full is dropped from live delivery and catches up from the file and the sampler's unwritten
samples, then rejoins (drop-to-disk-replay). No sample is lost or repeated; the follower only sees
it later.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path

import attrs
import trio

from joblet import logfmt
from joblet.actors.diskwriter import DiskWriter
from joblet.config import MetricsSection
from joblet.core.counters import NetCounters
from joblet.core.samples import MetricsSample, Reading, compute_sample, samples_from_records
from joblet.store.metricfiles import metrics_path, read_metric_records
from joblet.sys import procfs
from joblet.sys.cgroups import CgroupDriver

#: Samples a live follower may have waiting. Samples are small (about 1 KB) and come every few
#: seconds, so a follower this far behind is stalled, not slow: it is moved to catching up from
#: disk instead of growing this.
FOLLOWER_BUFFER = 16
#: Longest a sample waits in memory before it is written (the job's end writes at once).
FLUSH_INTERVAL = 2.0
#: Unwritten samples kept while the metrics file cannot be written (disk full): the oldest are
#: dropped beyond this, so a broken disk costs bounded memory.
MAX_PENDING = 1024
#: Bound on the final sample and write when the job ends (shielded: it runs during cleanup).
FINAL_TIMEOUT = 5.0


@attrs.define(eq=False)
class _Follower:
    """One live follower's channel; whoever removes it from the sampler's set closes it."""

    send: trio.MemorySendChannel[MetricsSample]
    lagged: bool = False


class MetricsHub:
    """The metrics of every job: samplers of running jobs, stored samples of all.

    Args:
        metrics_dir: Where each job's metrics directory is (``<state>/metrics``), for reading.
        config: The ``metrics:`` section.
        driver: The cgroup driver the samplers read jobs' groups through.
        disk_writer: Writes the samplers' metrics files (into ``metrics_dir``).
    """

    def __init__(
        self,
        metrics_dir: Path,
        config: MetricsSection,
        driver: CgroupDriver,
        disk_writer: DiskWriter,
    ) -> None:
        self.metrics_dir = metrics_dir
        self._config = config
        self._driver = driver
        self._disk_writer = disk_writer
        self._live: dict[str, JobSampler] = {}

    def sampler(self, job_id: str, *, own_network: bool) -> JobSampler:
        """Make the sampler of a new job and register it, so followers find it at once.

        Start :meth:`JobSampler.run` once the job runs; call :meth:`JobSampler.close` in the
        job's cleanup in any case (it unregisters the sampler; :meth:`JobSampler.run` does it
        too).

        Args:
            job_id: The job's id.
            own_network: Whether the job has a network namespace of its own (its traffic is
                then sampled).
        """
        sampler = JobSampler(self, job_id, own_network=own_network)
        self._live[job_id] = sampler
        return sampler

    def live(self, job_id: str) -> JobSampler | None:
        """The sampler of a job that is still being sampled, else None."""
        return self._live.get(job_id)

    async def read(self, job_id: str) -> list[MetricsSample]:
        """Every stored sample of a job, oldest first (none when it has no metrics file).

        Raises:
            MetricsCorrupted: The file is damaged (not just torn at its end).
        """
        path = metrics_path(self.metrics_dir, job_id)
        records = await trio.to_thread.run_sync(read_metric_records, path)
        return samples_from_records(records)

    async def follow(self, job_id: str) -> AsyncGenerator[MetricsSample, None]:
        """Every sample of a job: stored ones, then live ones until the job ends."""
        sampler = self._live.get(job_id)
        if sampler is None:
            for sample in await self.read(job_id):
                yield sample
            return
        async with aclosing(sampler.follow()) as samples:
            async for sample in samples:
                yield sample

    def _unregister(self, sampler: JobSampler) -> None:
        if self._live.get(sampler.job_id) is sampler:
            del self._live[sampler.job_id]


class JobSampler:
    """Samples one job's resource usage while it runs and hands the samples out.

    Made by :meth:`MetricsHub.sampler`. Owns the send side of every live follower's channel; the
    disk writer writes its samples.
    """

    def __init__(self, hub: MetricsHub, job_id: str, *, own_network: bool) -> None:
        self.job_id = job_id
        self._hub = hub
        self._driver = hub._driver
        self._disk_writer = hub._disk_writer
        self._interval = hub._config.interval
        self._enabled = hub._config.enabled
        self._own_network = own_network
        # Counters start at zero with the job's group: the first sample's rates are over the
        # time since the job was accepted.
        self._previous = Reading(time.time_ns(), time.monotonic())
        self._last_network: NetCounters | None = None
        #: The job's network namespace, held open once found (see joblet.sys.procfs).
        self._netns_fd: int | None = None
        self._last_ts = 0
        #: Samples not yet written, oldest first.
        self._pending: list[MetricsSample] = []
        self._followers: set[_Follower] = set()
        # Whether the disk writer has written samples of this job (and so has a file to sync).
        self._wrote = False
        self._last_flush = -math.inf
        self._failures: set[str] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether sampling has ended (followers end after what they have)."""
        return self._closed

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sample the job until cancelled; then take the final sample, write, end followers.

        Cancel it once the job's processes have ended and before its cgroup is removed. Never
        raises an ``Exception``: a failure to read or write is logged and sampling goes on.
        """
        if not self._enabled or self._closed:
            self.close()
            task_status.started()
            return
        try:
            task_status.started()
            while True:
                await self._sample()
                if trio.current_time() - self._last_flush >= FLUSH_INTERVAL:
                    await self._flush()
                await trio.sleep(self._interval)
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(FINAL_TIMEOUT):
                    await self._sample()
                    await self._flush()
                    await self._close_writer()
                # Out of time, the disk writer keeps the file's writer (it holds no open file)
                # until the job is deleted or the daemon stops.
                self.close()

    def close(self) -> None:
        """End sampling: live followers end after what they have; unregister from the hub.

        Idempotent. Unwritten samples stay available to followers until the sampler is gone.
        """
        self._closed = True
        fd, self._netns_fd = self._netns_fd, None
        if fd is not None:
            os.close(fd)
        followers, self._followers = self._followers, set()
        for f in followers:
            f.send.close()
        self._hub._unregister(self)

    async def follow(self) -> AsyncGenerator[MetricsSample, None]:
        """Every sample of the job: stored, unwritten, then live ones until sampling ends."""
        last = -1
        while True:
            send, receive = trio.open_memory_channel[MetricsSample](FOLLOWER_BUFFER)
            follower = _Follower(send)
            # Registering and taking the unwritten samples happen with no checkpoint between,
            # so every sample is in the file, in `backlog` or in the channel (or several).
            backlog = list(self._pending)
            if self._closed:
                send.close()
            else:
                self._followers.add(follower)
            try:
                async with receive:
                    stored = await self._hub.read(self.job_id)
                    for sample in itertools.chain(stored, backlog):
                        if sample.timestamp_ns > last:
                            last = sample.timestamp_ns
                            yield sample
                    async for sample in receive:
                        if sample.timestamp_ns > last:
                            last = sample.timestamp_ns
                            yield sample
            finally:
                if follower in self._followers:
                    self._followers.discard(follower)
                    send.close()
            if not follower.lagged:
                return

    # --- internals ----------------------------------------------------------------------------

    async def _sample(self) -> None:
        try:
            reading = await trio.to_thread.run_sync(self._read)
        except Exception as e:  # the group vanished, /proc hiccup: skip this sample
            self._report("job metrics could not be read", e)
            return
        ts = max(reading.timestamp_ns, self._last_ts + 1)
        reading = attrs.evolve(reading, timestamp_ns=ts)
        sample = compute_sample(self._previous, reading)
        self._previous, self._last_ts = reading, ts
        self._pending.append(sample)
        if len(self._pending) > MAX_PENDING:
            del self._pending[: len(self._pending) - MAX_PENDING]
        for f in list(self._followers):
            try:
                f.send.send_nowait(sample)
            except (trio.WouldBlock, trio.BrokenResourceError):
                # Full: it catches up from the file. Gone: its generator was dropped unclosed.
                self._followers.discard(f)
                f.lagged = True
                f.send.close()

    def _read(self) -> Reading:
        """Read the job's counters (blocking: runs in a worker thread)."""
        stats = self._driver.stats(self.job_id)
        pids = self._driver.pids(self.job_id)
        processes = procfs.process_counts(pids)
        network = None
        if self._own_network and not self._closed:
            if self._netns_fd is None:
                # The first process seen in a namespace of its own (stage 1 enters it a moment
                # after joining the cgroup); from then on the namespace is held open.
                for pid in pids:
                    if procfs.has_own_net_namespace(pid):
                        self._netns_fd = procfs.open_net_namespace(pid)
                        if self._netns_fd is not None:
                            break
            if self._netns_fd is not None:
                network = procfs.namespace_net_counters(self._netns_fd)
            network = network or self._last_network or NetCounters()
            self._last_network = network
        return Reading(time.time_ns(), time.monotonic(), stats, processes, network)

    async def _flush(self) -> None:
        self._last_flush = trio.current_time()
        if not self._pending:
            return
        batch = list(self._pending)
        records = [r for sample in batch for r in sample.records()]
        # Even a failed write may leave the disk writer with the file's writer: close it at the end.
        self._wrote = True
        try:
            await self._disk_writer.write_metrics(self.job_id, records)
        except (OSError, ValueError) as e:
            self._report("job metrics could not be written", e)
            return
        # Only this task adds samples, and not while it is here: the batch is the list's head.
        del self._pending[: len(batch)]

    async def _close_writer(self) -> None:
        if not self._wrote:
            return
        try:
            await self._disk_writer.close_metrics(self.job_id)
        except OSError as e:
            self._report("job metrics file could not be closed", e)
        self._wrote = False

    def _report(self, message: str, error: Exception) -> None:
        """Log a failure once per kind, so a lasting one does not flood the log."""
        kind = f"{message}: {type(error).__name__}"
        if kind in self._failures:
            return
        self._failures.add(kind)
        logfmt.warn(message, jobId=self.job_id, error=str(error) or type(error).__name__)
