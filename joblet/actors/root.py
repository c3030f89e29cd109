"""The root of the supervisor tree: one joblet node and the system actors it owns.

:func:`open_node` is what both ``joblet serve`` and the in-process harness run. It claims the
state directory and the cgroup parent (:func:`claim_node`: exclusive locks for its whole life),
prepares the parent group, starts the disk writer and the pool of waiting
stage-1 processes (:mod:`joblet.actors.prestart`) under supervisors, recovers from an earlier run
that did not end cleanly (see :func:`recover`), runs the engine, and removes the files of jobs that
ended long ago (:mod:`joblet.actors.retention`). Leaving the context stops every job gracefully,
flushes the logs, stops the waiting stage-1 processes and removes what the node created under the
cgroup parent.
"""

from __future__ import annotations

import contextlib
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from joblet import logfmt
from joblet.actors.diskwriter import DiskWriter
from joblet.actors.engine import Engine, NodeServices
from joblet.actors.joblog import LogBudget
from joblet.actors.prestart import Stage1Pool
from joblet.actors.retention import RetentionActor
from joblet.actors.sampler import MetricsHub
from joblet.actors.sandbox import Sandboxes
from joblet.actors.supervisor import supervise
from joblet.config import Config, StateLayout
from joblet.core.lifecycle import JobLifecycle
from joblet.core.model import JobInfo, JobStatus
from joblet.sys import launch, locks
from joblet.sys.cgroups import CgroupDriver, detect_driver
from joblet.sys.confine import Confinement, build_confinement
from joblet.sys.host import read_host_facts


@attrs.frozen
class Node:
    """A running joblet node.

    Attributes:
        config: Its configuration.
        engine: The job engine (run, stop, list, follow jobs).
        nursery: The node's system nursery, for further system actors that must stop with the
            node (the gRPC servers live outside it, so that their drain outlasts the node).
    """

    config: Config
    engine: Engine
    nursery: trio.Nursery


def load_node_id(path: Path) -> str:
    """This installation's node id, generated once and kept in ``path`` (``<state>/node_id``)."""
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


@attrs.frozen
class NodeClaim:
    """What a node holds before it starts: its state directory and cgroup parent, locked.

    Attributes:
        layout: The paths under the (resolved) state directory.
        driver: The cgroup driver, its parent group locked (not set up yet).
        confinement: Every job's resource limits, Landlock and compiled syscall filter.
    """

    layout: StateLayout
    driver: CgroupDriver
    confinement: Confinement


@contextlib.contextmanager
def claim_node(config: Config) -> Iterator[NodeClaim]:
    """Lock the state directory and the cgroup parent for the ``with`` block.

    A daemon holds both for its whole life (:mod:`joblet.sys.locks`): a second one on either
    refuses to start, and recovery only ever sweeps a parent its node holds. Synchronous, so
    ``joblet serve`` takes the locks before it touches anything in the state directory and a
    refusal surfaces as itself (not inside an exception group of the servers' nursery).

    Raises:
        LockHeld: Another daemon holds the state directory or the cgroup parent.
        CgroupUnavailable: The cgroup configuration cannot work on this host.
    """
    layout = attrs.evolve(config.layout, root=config.state_dir.resolve())
    iso = config.isolation
    confinement = build_confinement(
        seccomp=iso.seccomp, landlock=iso.landlock, max_open_files=iso.max_open_files
    )
    with locks.hold_state_dir(layout.root, layout.lock):
        driver = detect_driver(config.cgroup)
        # Locked before anything is set up or swept under it.
        lock_dir = driver.parent_dirs()[0]
        lock_dir.mkdir(parents=True, exist_ok=True)
        with locks.hold(lock_dir, "cgroup parent", directory=True):
            yield NodeClaim(layout=layout, driver=driver, confinement=confinement)


@asynccontextmanager
async def open_node(
    config: Config, *, shutdown_grace: float = 10.0, claim: NodeClaim | None = None
) -> AsyncIterator[Node]:
    """Run a joblet node inside the caller's trio run.

    Args:
        config: The configuration (its ``state_dir`` is created if missing).
        shutdown_grace: On exit, how long running jobs get to stop gracefully before the engine
            is cancelled (which kills them).
        claim: The locks, taken by the caller with :func:`claim_node` (``joblet serve`` does);
            by default the node takes them itself for its life.

    Yields:
        The running node.

    Raises:
        LockHeld: Another daemon holds the state directory or the cgroup parent.
    """
    with contextlib.ExitStack() as stack:
        if claim is None:
            claim = stack.enter_context(claim_node(config))
        async with _open_node(config, claim, shutdown_grace) as node:
            yield node


@asynccontextmanager
async def _open_node(
    config: Config, claim: NodeClaim, shutdown_grace: float
) -> AsyncIterator[Node]:
    layout, driver = claim.layout, claim.driver
    for directory in (layout.jobs_dir, layout.logs_dir, layout.metrics_dir):
        directory.mkdir(parents=True, exist_ok=True)
    driver.setup()
    disk_writer = DiskWriter(
        layout.logs_dir, config.logs, db_path=layout.jobs_db, metrics_dir=layout.metrics_dir
    )
    past = await disk_writer.open_db()
    ctx = NodeServices(
        config=config,
        disk_writer=disk_writer,
        budget=LogBudget(config.logs.memory_budget),
        logs_dir=layout.logs_dir,
        metrics_dir=layout.metrics_dir,
        metrics=MetricsHub(layout.metrics_dir, config.metrics, driver, disk_writer),
        sandboxes=Sandboxes(
            driver=driver,
            launcher=Stage1Pool(config.isolation.prestart),
            isolation=config.isolation,
            jobs_dir=layout.jobs_dir,
            init=launch.find_init(),
            confinement=claim.confinement,
            cleanup_timeout=config.joblet.cleanup_timeout,
        ),
        node_id=load_node_id(layout.node_id),
    )
    logfmt.info(
        "joblet node starting",
        nodeId=ctx.node_id,
        stateDir=str(layout.root),
        cgroup=f"v{driver.version}",
        seccomp=ctx.sandboxes.confinement.seccomp,
        landlock=ctx.sandboxes.confinement.landlock or "off",
        knownJobs=len(past),
    )
    async with trio.open_nursery() as system:
        await system.start(supervise, "disk-writer", disk_writer.run)
        # Before the engine and stopped after it: every job start goes through it.
        await system.start(supervise, "stage1-pool", ctx.sandboxes.launcher.run)
        past = await recover(ctx, past)
        engine = Engine(ctx, read_host_facts(), past)
        async with trio.open_nursery() as jobs:
            await jobs.start(engine.run)
            retention = RetentionActor(
                ctx.logs_dir,
                ctx.metrics_dir,
                config.persist.storage.retention,
                end_times=engine.end_times,
                forget=engine.forget,
                delete_logs=disk_writer.delete_logs,
                delete_metrics=disk_writer.delete_metrics,
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
                await disk_writer.flush()
        system.cancel_scope.cancel()
    try:
        # Shielded and bounded like the other cleanup: the parent is removed even when the
        # node is left because of a cancellation.
        with trio.CancelScope(shield=True), trio.move_on_after(config.joblet.cleanup_timeout):
            await driver.teardown()
    except OSError as e:
        logfmt.warn("cgroup parent could not be removed", error=str(e))
    logfmt.info("joblet node stopped", nodeId=ctx.node_id)


async def recover(ctx: NodeServices, past: list[JobInfo]) -> list[JobInfo]:
    """Clean up after a daemon that died with jobs running; returns the jobs, all ended.

    Jobs the database still shows as starting or running end FAILED with the lifecycle's
    ``restart`` (exit code -1, :data:`~joblet.core.lifecycle.RESTART_REASON`); every process
    left in a job group under the cgroup parent (which this node holds locked) is killed and the
    groups are removed (also groups of jobs the database never heard of); leftover job
    directories are deleted; the files of jobs deleted when the daemon died are deleted. Needs
    the disk writer running (the records are saved).
    """
    now = time.time()
    fixed: list[JobInfo] = []
    jobs: list[JobInfo] = []
    for info in past:
        if info.status in (JobStatus.INITIALIZING, JobStatus.RUNNING):
            life = JobLifecycle.from_record(info)
            life.restart(now)
            info = life.record(info.spec, info.node_id)
            fixed.append(info)
            logfmt.warn("job was running when the daemon stopped", jobId=info.id)
        jobs.append(info)
    await _remove_leftover_groups(
        ctx.sandboxes.driver, {i.id for i in past}, ctx.config.joblet.cleanup_timeout
    )
    await trio.to_thread.run_sync(_remove_children, ctx.sandboxes.jobs_dir)
    for job_id in await ctx.disk_writer.finish_deletions():
        logfmt.warn("deletion of a job finished after the daemon stopped", jobId=job_id)
    # Submitted together, they are written in one batch.
    for saved in [ctx.disk_writer.submit_job(info) for info in fixed]:
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
