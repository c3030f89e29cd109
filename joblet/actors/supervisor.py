"""Supervision of the daemon's long-lived system actors.

A system actor is anything with ``async def run(self, *, task_status)``. :func:`supervise` runs it
and restarts it with exponential backoff when it fails, so one failing system actor (say, the
disk writer hitting a full disk) is retried rather than taking the daemon down. Jobs are not
supervised here: a job's failure ends that job (see :mod:`joblet.actors.job`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from joblet import logfmt


async def supervise(
    name: str,
    run: Callable[..., Awaitable[None]],
    *,
    min_backoff: float = 0.1,
    max_backoff: float = 30.0,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``run`` forever, restarting it after it fails or returns.

    The first start is reported through ``task_status`` with the value the actor reports, so a
    caller's ``await nursery.start(supervise, ...)`` returns once the actor is really usable. A
    failure before that first start propagates, since nothing can work without the actor.

    Args:
        name: For log lines.
        run: The actor's ``run`` method (takes ``task_status``).
        min_backoff: Delay before the first restart; doubles on each consecutive failure.
        max_backoff: Upper bound of the delay.
        task_status: Reports the actor's first start.
    """
    first = True
    backoff = min_backoff
    while True:
        try:
            async with trio.open_nursery() as nursery:
                value = await nursery.start(run)
                if first:
                    task_status.started(value)
                    first = False
                else:
                    logfmt.info("system actor restarted", actor=name)
                    backoff = min_backoff
        except Exception:
            if first:
                raise
            logfmt.error("system actor failed", actor=name, exc_info=True)
        else:
            logfmt.warn("system actor exited", actor=name)
        await trio.sleep(backoff)
        backoff = min(backoff * 2, max_backoff)
