"""The ``persist`` benchmark: log lines to disk, and QueryLogs on a large log.

- Write path: 40-byte lines appended to a :class:`~joblet.actors.joblog.JobLog` in batches of
  :data:`BATCH` bytes (a pipe read of a busy job), written by the real
  :class:`~joblet.actors.diskwriter.DiskWriter` to gzip files, timed until they are on disk; next
  to ``gzip -1`` on the same bytes (same run) and the spec's "5M+ lines/s".
- Query path: ``QueryLogs`` of that whole log (:data:`LOG_BYTES`) through the real Persist
  Service on its Unix socket, with a ``grpcio`` client in another process: time to the first
  entry, total time, lines per second, and how much the serving process's peak RSS grew; next to
  ``gzip -dc`` of the same files and the spec's "50-500 ms" for log queries.

Registered in :mod:`benchmarks.run` (``--only persist``), which passes its output helpers. The
client half runs as ``python -m benchmarks.persist client <target>`` and prints JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import trio

from joblet.actors.diskwriter import DiskWriter
from joblet.actors.joblog import JobLog, LogBudget
from joblet.config import Config, LogsSection, StateLayout
from joblet.core.chunks import STDOUT
from joblet.rpc.persist_service import (
    PersistServer,
    PersistService,
    open_persist_listeners,
    socket_path,
)
from joblet.store.logfiles import LogFileReader, job_log_dir

#: Bytes per line, as the spec's throughput claim is usually read.
LINE_BYTES = 40
#: Size of the log (the query figure is for a 100 MB log).
LOG_BYTES = 100_000_000
#: Bytes per JobLog.append: what one read of a busy job's pipe returns.
BATCH = 64 << 10
JOB_ID = "bench-persist-0000-0000-000000000000"


def make_lines(total_bytes: int) -> bytes:
    """About ``total_bytes`` of 40-byte log lines that look like a program's output."""
    n = total_bytes // LINE_BYTES
    # "2024-01-15T10:30:00 step 00000001234 ok\n" is 40 bytes.
    parts = [f"2024-01-15T10:{i // 60 % 60:02d}:{i % 60:02d} step {i:011d} ok\n" for i in range(n)]
    data = "".join(parts).encode()
    assert len(data) == n * LINE_BYTES
    return data


async def write_path(logs_dir: Path, data: bytes, batch: int) -> float:
    """Seconds from the first append to the whole log on disk (gzip files and index)."""
    disk_writer = DiskWriter(logs_dir, LogsSection())
    defaults = LogsSection()
    log = JobLog(
        JOB_ID,
        sink=disk_writer,
        budget=LogBudget(defaults.memory_budget),
        window_bytes=defaults.window_bytes,
        reader=lambda: LogFileReader(job_log_dir(logs_dir, JOB_ID)),
    )
    view = memoryview(data)
    async with trio.open_nursery() as nursery:
        await nursery.start(disk_writer.run)
        t0 = time.perf_counter()
        for start in range(0, len(data), batch):
            await log.append(STDOUT, view[start : start + batch])
        log.close()
        disk_writer.close_job(JOB_ID)
        await disk_writer.flush()
        elapsed = time.perf_counter() - t0
        nursery.cancel_scope.cancel()
    return elapsed


def gzip_seconds(data: bytes, scratch: Path) -> tuple[float, float]:
    """Seconds for ``gzip -1`` of ``data`` (from the page cache) and ``gzip -dc`` of the result."""
    raw = scratch / "raw"
    raw.write_bytes(data)
    packed = scratch / "raw.gz"
    subprocess.run(["cat", str(raw)], stdout=subprocess.DEVNULL, check=True)
    t0 = time.perf_counter()
    with packed.open("wb") as out:
        subprocess.run(["gzip", "-1", "-c", str(raw)], stdout=out, check=True)
    t_compress = time.perf_counter() - t0
    t1 = time.perf_counter()
    subprocess.run(["gzip", "-dc", str(packed)], stdout=subprocess.DEVNULL, check=True)
    return t_compress, time.perf_counter() - t1


def zcat_seconds(job_dir: Path) -> float:
    """Seconds for ``gzip -dc`` of a job's log files (what reading the log costs at least)."""
    files = sorted(str(p) for p in job_dir.glob("*.log.gz") if p.stat().st_size)
    t0 = time.perf_counter()
    subprocess.run(["gzip", "-dc", *files], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


async def query_path(state: Path) -> dict[str, float]:
    """QueryLogs of the whole log via the Unix socket, client in a separate process."""
    config = Config(state_dir=state)
    service = PersistService(config.layout.logs_dir, config.layout.metrics_dir)
    async with await open_persist_listeners(config) as listeners, trio.open_nursery() as nursery:
        await nursery.start(PersistServer(service, listeners, None, config).run)
        gc.collect()
        # Reset the peak RSS (VmHWM) to the current RSS: what follows is the query's peak.
        Path("/proc/self/clear_refs").write_text("5")  # noqa: ASYNC240 (procfs, no disk)
        before = _status("VmRSS")
        result = await trio.run_process(
            [sys.executable, "-m", "benchmarks.persist", "client", f"unix:{socket_path(config)}"],
            capture_stdout=True,
        )
        peak = _status("VmHWM")
        nursery.cancel_scope.cancel()
    figures: dict[str, float] = json.loads(result.stdout)
    figures["rss_growth"] = float(peak - before)
    return figures


def run(
    args: argparse.Namespace,
    results: dict[str, float],
    *,
    row: Callable[[str, str, str, str], None],
    section: Callable[[str], AbstractContextManager[None]],
) -> None:
    """The benchmark (``benchmarks.run`` registers it and passes ``row`` and ``section``)."""
    del args  # fixed sizes: the figures are for 40-byte lines and a 100 MB log
    figures = trio.run(_measure)
    lines, mb = figures["lines"], figures["lines"] * LINE_BYTES / 1e6
    results.update({f"persist_{k}": v for k, v in figures.items()})
    title = (
        f"persist write path: {lines:,.0f} lines of {LINE_BYTES} B ({mb:.0f} MB), "
        f"JobLog.append of {BATCH >> 10} KiB -> DiskWriter -> gzip files"
    )
    with section(title):
        row(
            "lines/s to disk (first append to flushed)",
            f"{lines / figures['write'] / 1e6:.2f} M lines/s",
            "gzip -1 on the same bytes",
            f"{lines / figures['gzip'] / 1e6:.2f} M lines/s",
        )
        row(
            "  same in MB/s",
            f"{mb / figures['write']:.0f} MB/s",
            "gzip -1 on the same bytes",
            f"{mb / figures['gzip']:.0f} MB/s",
        )
        row(
            "  compressed size on disk",
            f"{figures['on_disk'] / 1e6:.1f} MB",
            "spec claim (write throughput)",
            "5M+ lines/s",
        )
    with section(f"persist QueryLogs of that {mb:.0f} MB log: Unix socket, grpcio client process"):
        row(
            "time to first entry",
            f"{figures['first'] * 1000:.0f} ms",
            "spec claim (log queries)",
            "~50-500 ms",
        )
        row(
            "total time",
            f"{figures['total']:.2f} s",
            "gzip -dc of the same files",
            f"{figures['zcat']:.2f} s",
        )
        row(
            "lines/s",
            f"{lines / figures['total'] / 1e6:.2f} M lines/s",
            "gzip -dc of the same files",
            f"{lines / figures['zcat'] / 1e6:.2f} M lines/s",
        )
        row(
            "peak RSS growth of the serving process",
            f"{figures['rss_growth'] / 1e6:.0f} MB",
            "the log, uncompressed",
            f"{mb:.0f} MB",
        )


async def _measure() -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="joblet-bench-persist-") as tmp:
        state = Path(tmp) / "state"
        logs_dir = StateLayout(state).logs_dir
        data = make_lines(LOG_BYTES)
        lines = len(data) // LINE_BYTES
        t_write = await write_path(logs_dir, data, BATCH)
        t_gzip, _ = await trio.to_thread.run_sync(gzip_seconds, data, Path(tmp))
        del data
        job_dir = logs_dir / JOB_ID
        on_disk = sum(p.stat().st_size for p in job_dir.iterdir())
        t_zcat = await trio.to_thread.run_sync(zcat_seconds, job_dir)
        query = await query_path(state)
    if query["lines"] != lines:
        raise RuntimeError(f"QueryLogs returned {query['lines']:.0f} lines of {lines}")
    return {
        "lines": float(lines),
        "write": t_write,
        "gzip": t_gzip,
        "on_disk": float(on_disk),
        "zcat": t_zcat,
        **query,
    }


def client(target: str) -> None:
    """The client half: one QueryLogs of the benchmark job; prints JSON figures."""
    import grpc

    from joblet.protocol import persist_pb2, persist_pb2_grpc

    options = [("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = persist_pb2_grpc.PersistServiceStub(channel)  # type: ignore[no-untyped-call]
        grpc.channel_ready_future(channel).result(timeout=10)
        t0 = time.perf_counter()
        first = 0.0
        count = 0
        for response in stub.QueryLogs(persist_pb2.QueryLogsRequest(job_id=JOB_ID), timeout=600):
            if not count and len(response.entries):
                first = time.perf_counter() - t0
            count += len(response.entries)
        total = time.perf_counter() - t0
    print(json.dumps({"first": first, "total": total, "lines": count}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["client"]:
        client(sys.argv[2])
    else:
        sys.exit("usage: python -m benchmarks.persist client <target>")
