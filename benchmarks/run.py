"""``just bench``: joblet's figures, each next to a baseline measured in the same run.

Engine (in-process harness, no gRPC):
- start latency, request to RUNNING, p50/p99 over N jobs, next to
  ``unshare --pid --fork --mount-proc /bin/true`` (spawn to exit) run N times;
- log throughput: MB/s of one job's output written to disk and delivered to a live subscriber,
  next to ``gzip -1`` on the same bytes.

Run as root. Usage: ``python -m benchmarks.run [--jobs 200] [--log-mb 200] [--only start,logs]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from joblet.harness import Harness, open_harness
from joblet.model import JobStatus

BENCHES: dict[str, Callable[[Harness, argparse.Namespace], Awaitable[None]]] = {}


def bench(
    name: str,
) -> Callable[
    [Callable[[Harness, argparse.Namespace], Awaitable[None]]],
    Callable[[Harness, argparse.Namespace], Awaitable[None]],
]:
    """Register a benchmark under ``name``."""

    def register(
        fn: Callable[[Harness, argparse.Namespace], Awaitable[None]],
    ) -> Callable[[Harness, argparse.Namespace], Awaitable[None]]:
        BENCHES[name] = fn
        return fn

    return register


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of values, nearest-rank."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def row(label: str, value: str, baseline_label: str, baseline: str) -> None:
    """Print one figure next to its baseline."""
    print(f"  {label:<44} {value:>14}    | {baseline_label:<40} {baseline:>12}")


@bench("start")
async def bench_start(joblet: Harness, args: argparse.Namespace) -> None:
    """Start latency: request to RUNNING."""
    n = args.jobs
    for _ in range(5):  # warm caches (page cache of python, unshare, dumb-init)
        await joblet.wait((await joblet.run("true")).id)
    lat: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        job = await joblet.run("true")
        lat.append((time.perf_counter() - t0) * 1000)
        assert job.status is JobStatus.RUNNING, job
        await joblet.wait(job.id)
    base = await trio.to_thread.run_sync(_unshare_baseline, n)
    print(f"start latency, {n} jobs (ms)")
    row(
        "joblet RunJob->RUNNING p50",
        f"{statistics.median(lat):.1f} ms",
        "unshare --pid --fork --mount-proc true p50",
        f"{statistics.median(base):.1f} ms",
    )
    row(
        "joblet RunJob->RUNNING p99",
        f"{pct(lat, 99):.1f} ms",
        "unshare ... p99",
        f"{pct(base, 99):.1f} ms",
    )
    row("target p50", "<= 20 ms", "", "")


@bench("logs")
async def bench_logs(joblet: Harness, args: argparse.Namespace) -> None:
    """Log throughput: disk + one live subscriber, vs gzip -1 on the same bytes."""
    size = args.log_mb * 1024 * 1024
    script = f"seq 1 1000000000 | head -c {size}"
    t0 = time.perf_counter()
    job = await joblet.run("sh", "-c", script)
    received = 0
    async for chunk in joblet.engine.follow_log(job.id):
        received += len(chunk.data)
    t_live = time.perf_counter() - t0
    final = await joblet.wait(job.id)
    await joblet.engine.context.persist.flush()
    t_disk = time.perf_counter() - t0
    assert final.status is JobStatus.COMPLETED and received == size, (final, received)
    on_disk = sum(p.stat().st_size for p in (joblet.state_dir / "logs" / job.id).iterdir())
    t_gzip, t_gen = await trio.to_thread.run_sync(_gzip_baseline, script)
    mb = size / 1e6
    print(f"log throughput, {args.log_mb} MiB of `seq` output, one live subscriber")
    row(
        "delivered to a live subscriber",
        f"{mb / t_live:.0f} MB/s",
        "gzip -1 on the same bytes",
        f"{mb / t_gzip:.0f} MB/s",
    )
    row(
        "written to disk (job start to flushed)",
        f"{mb / t_disk:.0f} MB/s",
        "the producer alone (seq | head > null)",
        f"{mb / t_gen:.0f} MB/s",
    )
    row("compressed size on disk", f"{on_disk / 1e6:.1f} MB", "raw", f"{mb:.1f} MB")
    row("target", ">= 100 MB/s", "", "")


def _unshare_baseline(n: int) -> list[float]:
    """Spawn-to-exit of ``unshare --pid --fork --mount-proc /bin/true``, n times (ms)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "/bin/true"], check=True)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def _gzip_baseline(script: str) -> tuple[float, float]:
    """Seconds for ``gzip -1`` on the script's output (from the page cache), and for the script."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        subprocess.run(["sh", "-c", f"{script} > {raw}"], check=True)
        subprocess.run(["cat", str(raw)], stdout=subprocess.DEVNULL, check=True)
        t1 = time.perf_counter()
        subprocess.run(["gzip", "-1", "-c", str(raw)], stdout=subprocess.DEVNULL, check=True)
        t_gzip = time.perf_counter() - t1
        t2 = time.perf_counter()
        subprocess.run(["sh", "-c", f"{script} > /dev/null"], check=True)
        return t_gzip, time.perf_counter() - t2


async def main(args: argparse.Namespace) -> None:
    """Run the selected benchmarks in one harness."""
    names = args.only.split(",") if args.only else list(BENCHES)
    async with open_harness() as joblet:
        for name in names:
            await BENCHES[name](joblet, args)


def cli() -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--log-mb", type=int, default=200)
    parser.add_argument("--only", default="", help="comma-separated: " + ",".join(BENCHES))
    args = parser.parse_args()
    print(f"joblet benchmarks (python {sys.version.split()[0]}, trio {trio.__version__})")
    trio.run(main, args)


if __name__ == "__main__":
    cli()
