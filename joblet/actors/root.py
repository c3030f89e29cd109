"""The root of the supervisor tree: one joblet node and the system actors it owns.

:func:`open_node` is what both ``joblet serve`` and the in-process harness run. It detects the
cgroup driver and prepares the parent group, starts the persist actor under a supervisor, and runs
the engine. Leaving the context stops every job gracefully, flushes the logs and removes what the
node created under the cgroup parent.
"""

from __future__ import annotations

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
from joblet.actors.supervisor import supervise
from joblet.config import Config
from joblet.store.joblog import LogBudget
from joblet.sys import launch
from joblet.sys.cgroups import detect_driver


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
    persist = PersistActor(state / "logs", config.logs)
    ctx = JobContext(
        config=config,
        driver=driver,
        persist=persist,
        budget=LogBudget(config.logs.memory_budget),
        jobs_dir=state / "jobs",
        logs_dir=state / "logs",
        metrics_dir=state / "metrics",
        metrics=MetricsHub(state / "metrics", config.metrics, driver),
        init=launch.find_init(),
        unshare=launch.find_unshare(),
        node_id=load_node_id(state),
    )
    engine = Engine(ctx)
    logfmt.info(
        "joblet node starting",
        nodeId=ctx.node_id,
        stateDir=str(state),
        cgroup=f"v{driver.version}",
    )
    async with trio.open_nursery() as system:
        await system.start(supervise, "persist", persist.run)
        async with trio.open_nursery() as jobs:
            await jobs.start(engine.run)
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
        driver.teardown()
    except OSError as e:
        logfmt.warn("cgroup parent could not be removed", error=str(e))
    logfmt.info("joblet node stopped", nodeId=ctx.node_id)
