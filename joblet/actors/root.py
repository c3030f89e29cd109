"""The root of the supervisor tree: one joblet node and the system actors it owns.

:func:`open_node` is what both ``joblet serve`` and the in-process harness run. It detects the
cgroup driver and prepares the parent group, starts the persist actor and the pool of waiting
stage-1 processes (:mod:`joblet.actors.prestart`) under supervisors, recovers from an earlier run
that did not end cleanly (see :func:`recover`), runs the engine, and removes the files of jobs that
ended long ago (:mod:`joblet.actors.retention`). Leaving the context stops every job gracefully,
flushes the logs, stops the waiting stage-1 processes and removes what the node created under the
cgroup parent.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from joblet import logfmt
from joblet.actors.engine import Engine
from joblet.actors.job import JobContext
from joblet.actors.metrics import MetricsHub
from joblet.actors.persist import PersistActor
from joblet.actors.prestart import Stage1Pool
from joblet.actors.retention import RetentionActor
from joblet.actors.supervisor import supervise
from joblet.config import Config
from joblet.core.model import JobInfo, JobStatus
from joblet.store.joblog import LogBudget
from joblet.sys import launch
from joblet.sys.cgroups import CgroupDriver, detect_driver

#: Reason recorded for a job that was running when the daemon died.
RESTART_REASON = "daemon restarted while the job was running"


@attrs.frozen
class Node:
    """A running joblet node.

    Attributes:
        config: Its configuration.
        engine: The job engine (run, stop, list, follow jobs).
        nursery: The node's own nursery, for further system actors (e.g. the gRPC server).
    """

    config: Config
    engine: Engine
    nursery: trio.Nursery


def load_node_id(state_dir: Path) -> str:
    """This installation's node id, generated once and kept in ``<state>/node_id``."""
    path = state_dir / "node_id"
    try:
        node_id = path.read_text().strip()
        if node_id:
            return node_id
    except FileNotFoundError:
        pass
    node_id = str(uuid.uuid4())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(node_id + "\n")
    tmp.replace(path)
    return node_id


@asynccontextmanager
async def open_node(config: Config, *, shutdown_grace: float = 10.0) -> AsyncIterator[Node]:
    """Run a joblet node inside the caller's trio run.

    Args:
        config: The configuration (its ``state_dir`` is created if missing).
        shutdown_grace: On exit, how long running jobs get to stop gracefully before the engine
            is cancelled (which kills them).

    Yields:
        The running node.
    """
    state = config.state_dir.resolve()
    (state / "jobs").mkdir(parents=True, exist_ok=True)
    (state / "logs").mkdir(parents=True, exist_ok=True)
    (state / "metrics").mkdir(parents=True, exist_ok=True)
    driver = detect_driver(config.cgroup)
    driver.setup()
    persist = PersistActor(state / "logs", config.logs, db_path=state / "jobs.db")
    past = await persist.open_db()
    ctx = JobContext(
        config=config,
        driver=driver,
        persist=persist,
        budget=LogBudget(config.logs.memory_budget),
        jobs_dir=state / "jobs",
        logs_dir=state / "logs",
        metrics_dir=state / "metrics",
        metrics=MetricsHub(state / "metrics", config.metrics, driver),
        launcher=Stage1Pool(config.isolation.prestart),
        init=launch.find_init(),
        unshare=launch.find_unshare(),
        node_id=load_node_id(state),
    )
    logfmt.info(
        "joblet node starting",
        nodeId=ctx.node_id,
        stateDir=str(state),
        cgroup=f"v{driver.version}",
        knownJobs=len(past),
    )
    async with trio.open_nursery() as system:
        await system.start(supervise, "persist", persist.run)
        # Before the engine and stopped after it: every job start goes through it.
        await system.start(supervise, "stage1-pool", ctx.launcher.run)
        past = await recover(ctx, past)
        engine = Engine(ctx, past)
        async with trio.open_nursery() as jobs:
            await jobs.start(engine.run)
            retention = RetentionActor(
                ctx.logs_dir,
                ctx.metrics_dir,
                config.persist.storage.retention,
                end_times=engine.end_times,
                forget=engine.forget,
            )
            await system.start(supervise, "retention", retention.run)
            try:
                yield Node(config=config, engine=engine, nursery=system)
            finally:
                with trio.CancelScope(shield=True):
                    await engine.shutdown(shutdown_grace)
                jobs.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(config.joblet.cleanup_timeout * 2):
                await persist.flush()
        system.cancel_scope.cancel()
    try:
        # Shielded and bounded like the other cleanup: the parent is removed even when the
        # node is left because of a cancellation.
        with trio.CancelScope(shield=True), trio.move_on_after(config.joblet.cleanup_timeout):
            await driver.teardown()
    except OSError as e:
        logfmt.warn("cgroup parent could not be removed", error=str(e))
    logfmt.info("joblet node stopped", nodeId=ctx.node_id)


async def recover(ctx: JobContext, past: list[JobInfo]) -> list[JobInfo]:
    """Clean up after a daemon that died with jobs running; returns the jobs, all ended.

    Jobs the database still shows as not ended are marked FAILED with :data:`RESTART_REASON`
    (exit code -1); every process left in a job group under the cgroup parent is killed and the
    groups are removed (also groups of jobs the database never heard of); leftover job
    directories are deleted. Needs the persist actor running (the records are saved).
    """
    now = time.time()
    fixed: list[JobInfo] = []
    jobs: list[JobInfo] = []
    for info in past:
        if not info.status.terminal:
            info = attrs.evolve(
                info,
                status=JobStatus.FAILED,
                end_time=now,
                exit_code=-1,
                reason=RESTART_REASON,
                pid=0,
            )
            fixed.append(info)
            logfmt.warn("job was running when the daemon stopped", jobId=info.id)
        jobs.append(info)
    await _remove_leftover_groups(
        ctx.driver, {i.id for i in past}, ctx.config.joblet.cleanup_timeout
    )
    await trio.to_thread.run_sync(_remove_children, ctx.jobs_dir)
    # Submitted together, they are written in one batch.
    for saved in [ctx.persist.submit_job(info) for info in fixed]:
        await saved.wait()
    return jobs


def _remove_children(directory: Path) -> None:
    for path in directory.iterdir():
        shutil.rmtree(path, ignore_errors=True)


async def _remove_leftover_groups(
    driver: CgroupDriver,
    known: set[str],
    timeout: float,  # noqa: ASYNC109 (kill_all's own bound, which names the survivors)
) -> None:
    for name in await trio.to_thread.run_sync(driver.job_groups):
        try:
            await driver.kill_all(name, timeout)
            await driver.remove(name)
        except (OSError, TimeoutError, ValueError) as e:
            logfmt.error("leftover job group could not be removed", group=name, error=str(e))
            continue
        logfmt.warn(
            "leftover job group removed",
            group=name,
            known="yes" if name in known else "no",
        )
