"""Stage 1 with timestamps: ``benchmarks.run --breakdown`` runs this in place of stage 1.

Started like stage 1 (``python -I -S -c <boot> <fd>``: standard library only, no site-packages;
see :data:`BOOT`), it does what :data:`joblet.sys.launch.STAGE1_BOOT` does: append stage 1's
directory to ``sys.path``, import ``_stage1`` (from its cached bytecode) and run its ``main()``.
Along the way it records ``time.perf_counter()`` (CLOCK_MONOTONIC: comparable with the daemon's
clock) and writes the marks as one line to stderr (the job's stderr, so the bench finds them in
the job's log) just before the final ``execve``::

    JOBLET-STAGE1-TRACE main=<t> imported=<t> spec=<t> joined=<t> root=<t> built=<t> exec=<t>

``spec`` is when it has its launch spec. A stage 1 from the pool of waiting ones
(``isolation.prestart``) was started long before its job: its ``main`` and ``imported`` come
before the request.
"""

import time

_marks = [("main", time.perf_counter())]

import os  # noqa: E402 (after the first timestamp on purpose)
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
#: The ``-c`` program that runs this module instead of stage 1.
BOOT = (
    f"import sys; sys.path.append({_HERE!r}); "
    "import _stage1_trace; _stage1_trace.run(); sys.exit(127)"
)
STAGE1_DIR = os.path.join(os.path.dirname(_HERE), "joblet", "sys")


def _mark(name: str) -> None:
    _marks.append((name, time.perf_counter()))


def _around(module: Any, fn_name: str, before: str, after: str) -> None:
    fn = getattr(module, fn_name)

    def traced(*args: Any, **kwargs: Any) -> Any:
        _mark(before)
        result = fn(*args, **kwargs)
        _mark(after)
        return result

    setattr(module, fn_name, traced)


def _traced_execve(real: Callable[..., Any]) -> Callable[..., None]:
    def execve(path: str, argv: list[str], env: dict[str, str]) -> None:
        _mark("exec")
        line = " ".join(f"{name}={t:.6f}" for name, t in _marks)
        os.write(2, f"JOBLET-STAGE1-TRACE {line}\n".encode())
        real(path, argv, env)

    return execve


def run() -> None:
    """Import and run stage 1 as the daemon's bootstrap does, with timestamps."""
    sys.path.append(STAGE1_DIR)
    import _stage1  # type: ignore[import-not-found]

    _mark("imported")
    _around(_stage1, "receive", "waiting", "spec")
    _around(_stage1, "join_cgroups", "joining", "joined")
    _around(_stage1, "build_root", "root", "built")
    os.execve = _traced_execve(os.execve)  # type: ignore[assignment]
    _stage1.main()
