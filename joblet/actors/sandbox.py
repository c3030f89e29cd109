"""A job's kernel resources: its cgroup, its directories and the start of its process.

:class:`Sandboxes` is the node's factory (it knows the cgroup driver, the stage-1 pool and the
isolation settings); each job gets one :class:`JobSandbox` from it, which creates the job's
cgroup and directories and starts its process through the two-stage launcher, kills what is left
in the cgroup, and releases it all again. The job actor (:mod:`joblet.actors.job`) decides when;
the sandbox does it, and knows nothing of the job's status, log or records.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import attrs
import trio

from joblet import logfmt
from joblet.actors.prestart import Stage1Pool
from joblet.config import IsolationSection
from joblet.core.errors import StartFailed
from joblet.core.model import JobSpec
from joblet.sys import launch
from joblet.sys.cgroups import CgroupDriver
from joblet.sys.confine import WRITABLE, Confinement


@attrs.frozen
class Sandboxes:
    """What every job's sandbox is made with.

    Attributes:
        driver: The cgroup driver.
        launcher: Starts stage 1 for each job (from its pool of waiting ones when it can).
        isolation: The isolation settings (user, system directories, /tmp size).
        jobs_dir: Where each job's directory (root mount point, /work) is made.
        init: Path of the job PID 1 binary (dumb-init).
        confinement: Resource limits, Landlock and the syscall filter of every job.
        cleanup_timeout: The bound on killing what a job left behind (``cleanupTimeout``).
    """

    driver: CgroupDriver
    launcher: Stage1Pool
    isolation: IsolationSection
    jobs_dir: Path
    init: str
    confinement: Confinement
    cleanup_timeout: float

    def for_job(self, job_id: str) -> JobSandbox:
        """The sandbox of one job (nothing is created until :meth:`JobSandbox.start`)."""
        return JobSandbox(job_id, self)


class JobSandbox:
    """One job's cgroup, directories and process start.

    Args:
        job_id: The job's id (its cgroup's and directory's name).
        base: The node's settings.
    """

    def __init__(self, job_id: str, base: Sandboxes) -> None:
        self.job_id = job_id
        self._base = base
        self._dir = base.jobs_dir / job_id

    async def start(self, spec: JobSpec) -> trio.Process:
        """Create the job's cgroup and directories and start its command.

        Raises:
            StartFailed: A step failed; the message says which and why.
        """
        base, iso = self._base, self._base.isolation
        try:
            base.driver.create(self.job_id, spec.limits)
        except (OSError, ValueError, RuntimeError) as e:
            raise StartFailed(f"cgroup setup failed: {e}") from e
        root, work = self._dir / "root", self._dir / "work"
        try:
            root.mkdir(parents=True)
            work.mkdir(mode=0o700)
            os.chown(work, iso.run_as_uid, iso.run_as_gid)
        except OSError as e:
            raise StartFailed(f"job directory setup failed: {e}") from e
        launch_spec = launch.LaunchSpec(
            job_id=self.job_id,
            command=spec.command,
            args=spec.args,
            env=spec.env,
            network=spec.network,
            membership=base.driver.membership(self.job_id),
            root=str(root),
            work=str(work),
            uid=iso.run_as_uid,
            gid=iso.run_as_gid,
            system_dirs=iso.system_dirs,
            etc_files=iso.etc_files,
            tmp_size_mb=iso.tmp_size_mb,
            init=base.init,
            rlimits=base.confinement.rlimits,
            seccomp=base.confinement.seccomp_bpf,
            landlock=base.confinement.landlock,
            writable=WRITABLE,
        )
        return await base.launcher.spawn(launch_spec)

    async def kill_all(self) -> None:
        """SIGKILL everything in the job's cgroup and wait until it is gone (bounded; logged)."""
        try:
            await self._base.driver.kill_all(self.job_id, self._base.cleanup_timeout)
        except (OSError, TimeoutError) as e:
            logfmt.error(
                "job cleanup could not kill every process", jobId=self.job_id, error=str(e)
            )

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer killed a process of the job (False if unknown)."""
        try:
            return self._base.driver.oom_killed(self.job_id)
        except OSError:
            return False

    async def release(self) -> None:
        """Remove the job's cgroup and directory (what cannot be removed is logged)."""
        try:
            await self._base.driver.remove(self.job_id)
        except OSError as e:
            logfmt.error("job cgroup could not be removed", jobId=self.job_id, error=str(e))
        await trio.to_thread.run_sync(shutil.rmtree, self._dir, True)
