"""The in-process harness: a whole joblet engine inside your own trio run.

For our tests and for anyone who tests their own tooling against joblet. It runs the real engine
(real processes, namespaces and cgroups: it needs root on Linux) with a temporary state directory
and a cgroup parent of its own, so it never touches a real daemon's jobs, and removes everything it
created on exit.

Example::

    import trio
    from joblet.testing import open_harness

    async def main():
        async with open_harness() as joblet:
            job = await joblet.run("sh", "-c", "echo hello; echo oops >&2")
            final = await joblet.wait(job.id)
            print(final.status, final.exit_code)        # JobStatus.COMPLETED 0
            print(await joblet.output(job.id))          # b'hello\\noops\\n'

    trio.run(main)
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs

from joblet.actors.engine import Engine
from joblet.actors.root import Node, open_node
from joblet.config import CgroupSection, Config
from joblet.core.model import JobInfo, RunRequest


@attrs.frozen
class Harness:
    """A running in-process joblet with conveniences for tests.

    Attributes:
        node: The running node.
        state_dir: Its temporary state directory.
    """

    node: Node
    state_dir: Path

    @property
    def engine(self) -> Engine:
        """The engine (the full API)."""
        return self.node.engine

    async def run(
        self,
        command: str,
        *args: str,
        max_cpu: int = 0,
        max_memory: int = 0,
        max_iobps: int = 0,
        cpu_cores: str = "",
        env: Mapping[str, str] | None = None,
        network: str = "",
    ) -> JobInfo:
        """Validate and start a job, as RunJob would; returns once it runs (or failed to start)."""
        request = RunRequest(
            command=command,
            args=args,
            max_cpu=max_cpu,
            max_memory=max_memory,
            max_iobps=max_iobps,
            cpu_cores=cpu_cores,
            env=env or {},
            network=network,
        )
        return await self.engine.run_job(request)

    async def wait(self, job_id: str) -> JobInfo:
        """Wait for the job to end and be cleaned up."""
        return await self.engine.wait_job(job_id)

    async def output(self, job_id: str, offset: int = 0) -> bytes:
        """The job's whole merged output from ``offset`` (waits for the job to end)."""
        parts = [chunk.data async for chunk in self.engine.follow_log(job_id, offset)]
        return b"".join(parts)

    async def streams(self, job_id: str) -> tuple[bytes, bytes]:
        """The job's stdout and stderr, apart (waits for the job to end)."""
        out: dict[int, list[bytes]] = {1: [], 2: []}
        async for chunk in self.engine.follow_log(job_id):
            out[chunk.stream].append(chunk.data)
        return b"".join(out[1]), b"".join(out[2])


@asynccontextmanager
async def open_harness(
    config: Config | None = None,
    *,
    state_dir: Path | None = None,
    cgroup_parent: str | None = None,
    **overrides: Any,
) -> AsyncIterator[Harness]:
    """Run a joblet engine in the caller's trio run, with temporary state.

    Args:
        config: Base configuration; its ``state_dir`` and cgroup parent are replaced by temporary
            ones.
        state_dir: Keep the state here instead (created if missing, kept on exit): open the
            harness again on the same directory to see what a restarted daemon sees.
        cgroup_parent: The cgroup parent's name instead of a unique one (with ``state_dir``,
            to find the groups an earlier run left behind).
        **overrides: Config fields to replace (e.g. ``joblet=JobletSection(job_timeout=5)``).

    Yields:
        The harness. On exit every job is stopped, and the cgroup parent and the temporary state
        directory are removed.
    """
    base = config or Config()
    state = state_dir or Path(tempfile.mkdtemp(prefix="joblet-harness-"))
    parent = cgroup_parent or _unique_parent(base.cgroup)
    cgroup = attrs.evolve(overrides.pop("cgroup", base.cgroup), parent=parent)
    cfg = attrs.evolve(base, state_dir=state, cgroup=cgroup, **overrides)
    try:
        async with open_node(cfg, shutdown_grace=5.0) as node:
            yield Harness(node=node, state_dir=state)
    finally:
        if state_dir is None:
            shutil.rmtree(state, ignore_errors=True)


def _unique_parent(cg: CgroupSection) -> str:
    return f"{cg.parent}-h{secrets.token_hex(4)}"
