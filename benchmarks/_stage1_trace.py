"""Stage 1 with timestamps: ``benchmarks.run --breakdown`` runs this in place of ``_stage1.py``.

Runs as ``python -I -S _stage1_trace.py <fd>``, exactly like stage 1 (standard library only, no
site-packages), and does what the interpreter does with a script: read and compile
``joblet/sys/_stage1.py``, run its module body, then its ``main()``. Around the way it records
``time.perf_counter()`` (CLOCK_MONOTONIC: comparable with the daemon's) at each step, and writes
them as one line to stderr (the job's stderr, so the bench finds them in the job's log) just
before the final ``execve``:

    JOBLET-STAGE1-TRACE main=<t> compiled=<t> imported=<t> spec=<t> joined=<t> root=<t> built=<t>
    exec=<t>
"""

import time

_marks = [("main", time.perf_counter())]

import os  # noqa: E402 (after the first timestamp on purpose)

STAGE1 = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "joblet", "sys", "_stage1.py"
)


def _mark(name):
    _marks.append((name, time.perf_counter()))


def _around(ns, fn_name, before, after):
    fn = ns[fn_name]

    def traced(*args, **kwargs):
        _mark(before)
        result = fn(*args, **kwargs)
        _mark(after)
        return result

    ns[fn_name] = traced


def _traced_execve(real):
    def execve(path, argv, env):
        _mark("exec")
        line = " ".join(f"{name}={t:.6f}" for name, t in _marks)
        os.write(2, f"JOBLET-STAGE1-TRACE {line}\n".encode())
        real(path, argv, env)

    return execve


def run():
    with open(STAGE1, "rb") as f:
        source = f.read()
    code = compile(source, STAGE1, "exec")
    _mark("compiled")
    ns = {"__name__": "_stage1", "__file__": STAGE1, "__builtins__": __builtins__}
    exec(code, ns)
    _mark("imported")
    _around(ns, "join_cgroups", "spec", "joined")
    _around(ns, "build_root", "root", "built")
    os.execve = _traced_execve(os.execve)
    ns["main"]()


if __name__ == "__main__":
    run()
    raise SystemExit(127)
