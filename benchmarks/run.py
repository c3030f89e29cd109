"""``just bench``: joblet's figures, each next to a baseline measured in the same run.

Engine (in-process harness, no gRPC):

- ``start``: request to RUNNING, p50/p99 over ``--jobs`` jobs started one after another (each
  waited for before the next), next to ``unshare --pid --fork --mount-proc /bin/true`` (spawn to
  exit) and the bare stage-1 interpreter (``python -I -S -c pass``), run as many times; a few
  starts after a pause (as a lone request meets them); then the same number of starts at once
  (wall time until all are RUNNING), next to as many ``unshare`` processes spawned at once.
  ``--breakdown [N]`` adds where the time of a start goes, from timestamps taken along the way
  over N more jobs (see :func:`start_breakdown`); ``--prestart N`` sets the number of stage-1
  processes kept waiting (``isolation.prestart``; 0 starts each with its job, as before the pool);
- ``logs``: MB/s of one job's output delivered to a live subscriber and written to disk (the clock
  stops once the log files are fsynced and closed, and their content is checked afterwards), next
  to ``gzip -1`` on the same bytes.

End to end (a real ``joblet serve`` subprocess with its own temporary state, grpcio client):

- ``grpc``: RunJob to RUNNING p50/p99 over mutual TLS for ``--jobs`` jobs, next to the engine's
  figure from this run; GetJobStatus calls per second with 1 client and with 16 concurrent
  clients (one thread and one channel/connection each), next to a minimal grpcio server
  (``benchmarks/trivial_server.py``) that answers the same bytes over the same certificates.

Every section prints the load average (``/proc/loadavg``) before and after it: the figures are
only comparable at a similar load. Run as root.

Usage: ``python -m benchmarks.run [--jobs 200] [--log-mb 200] [--rate-seconds 3]
[--breakdown [N]] [--prestart N] [--seccomp PROFILE] [--landlock on|off] [--only start,logs,grpc]``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import attrs
import grpc
import trio

from joblet.actors.prestart import Stage1Pool
from joblet.certs import CertPaths
from joblet.config import Config
from joblet.core.model import JobStatus
from joblet.protocol import joblet_pb2 as pb
from joblet.protocol import joblet_pb2_grpc as pb_grpc
from joblet.store.logfiles import LogFileReader
from joblet.sys import launch
from joblet.sys.cgroups import CgroupDriver
from joblet.testing import Harness, open_harness

from ._stage1_trace import BOOT as STAGE1_TRACE_BOOT

#: Jobs started (and waited for) before any timing: page cache of python, unshare, dumb-init.
WARMUP = 5
#: Timeout of every gRPC call, seconds.
CALL_TIMEOUT = 30.0
#: Concurrent clients of the second GetJobStatus figure.
MANY_CLIENTS = 16
#: Starts measured after a pause, and the pause (seconds).
IDLE_JOBS = 20
IDLE_GAP = 0.2
UNSHARE_TRUE = ("unshare", "--pid", "--fork", "--mount-proc", "/bin/true")
PYTHON_BARE = (sys.executable, "-I", "-S", "-c", "pass")

Results = dict[str, float]
EngineBench = Callable[[Harness, argparse.Namespace, Results], Awaitable[None]]
ProcessBench = Callable[[argparse.Namespace, Results], None]

#: Benchmarks that share one in-process harness, in the order they run.
ENGINE_BENCHES: dict[str, EngineBench] = {}
#: Benchmarks that run their own processes (after the engine ones).
PROCESS_BENCHES: dict[str, ProcessBench] = {}


def engine_bench(name: str) -> Callable[[EngineBench], EngineBench]:
    """Register a benchmark that runs in the shared in-process harness."""

    def register(fn: EngineBench) -> EngineBench:
        ENGINE_BENCHES[name] = fn
        return fn

    return register


def process_bench(name: str) -> Callable[[ProcessBench], ProcessBench]:
    """Register a benchmark that needs no harness (it starts its own daemon)."""

    def register(fn: ProcessBench) -> ProcessBench:
        PROCESS_BENCHES[name] = fn
        return fn

    return register


# --- output ---------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of values, nearest-rank."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@contextmanager
def section(title: str) -> Iterator[None]:
    """Print a section's title with the load average before it, and the load after it."""
    print(f"{title}  [load before: {loadavg()}]", flush=True)
    yield
    print(f"  {'':<46} [load after: {loadavg()}]", flush=True)


def row(label: str, value: str, baseline_label: str = "", baseline: str = "") -> None:
    """Print one figure next to its baseline."""
    print(f"  {label:<46} {value:>14}    | {baseline_label:<46} {baseline:>12}", flush=True)


def ms(t0: float) -> float:
    """Milliseconds since ``t0`` (a ``time.perf_counter()``)."""
    return (time.perf_counter() - t0) * 1000


# --- baselines --------------------------------------------------------------------------------


def spawn_times(argv: Sequence[str], n: int, gap: float = 0.0) -> list[float]:
    """Spawn-to-exit of ``argv``, n times one after another, ``gap`` seconds apart (ms)."""
    times = []
    for _ in range(n):
        time.sleep(gap)
        t0 = time.perf_counter()
        subprocess.run(argv, check=True)
        times.append(ms(t0))
    return times


def spawn_all_at_once(argv: Sequence[str], n: int) -> float:
    """Seconds from spawning ``argv`` n times (without waiting in between) until all exited."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(argv) for _ in range(n)]
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError(f"{argv} exited with {p.returncode}")
    return time.perf_counter() - t0


def gzip_baseline(script: str) -> tuple[float, float]:
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


# --- engine: start ----------------------------------------------------------------------------


@engine_bench("start")
async def bench_start(joblet: Harness, args: argparse.Namespace, results: Results) -> None:
    """Start latency (sequential), then as many starts at once; optionally the breakdown."""
    n = args.jobs
    for _ in range(WARMUP):
        await joblet.wait((await joblet.run("true")).id)
    with section(f"start latency, {n} jobs one after another, request to RUNNING"):
        lat: list[float] = []
        for _ in range(n):
            t0 = time.perf_counter()
            job = await joblet.run("true")
            lat.append(ms(t0))
            assert job.status is JobStatus.RUNNING, job
            await joblet.wait(job.id)
        base = await trio.to_thread.run_sync(spawn_times, UNSHARE_TRUE, n)
        bare = await trio.to_thread.run_sync(spawn_times, PYTHON_BARE, n)
        results["engine_p50"], results["engine_p99"] = statistics.median(lat), pct(lat, 99)
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
        row(
            "",
            "",
            "stage 1's bare interpreter (-I -S -c pass) p50",
            f"{statistics.median(bare):.1f} ms",
        )
        row("target p50", "<= 20 ms")

    with section(
        f"start latency after {IDLE_GAP * 1000:.0f} ms idle, {IDLE_JOBS} jobs, request to RUNNING"
    ):
        # What changes after idle: the pool of waiting stage 1s is full (back to back, a start
        # may find it empty), and caches are cold. A cgroup join through cgroup.procs (cgroup
        # v2) takes the kernel's global threadgroup rwsem, which waits for an RCU grace period
        # when nothing took it for a while; stage 1 avoids it on v1 (see
        # CgroupDriver.membership).
        idle: list[float] = []
        for _ in range(IDLE_JOBS):
            await trio.sleep(IDLE_GAP)
            t0 = time.perf_counter()
            job = await joblet.run("true")
            idle.append(ms(t0))
            assert job.status is JobStatus.RUNNING, job
            await joblet.wait(job.id)
        base_idle = await trio.to_thread.run_sync(spawn_times, UNSHARE_TRUE, IDLE_JOBS, IDLE_GAP)
        row(
            "joblet RunJob->RUNNING p50 after idle",
            f"{statistics.median(idle):.1f} ms",
            "unshare ... true p50 after idle",
            f"{statistics.median(base_idle):.1f} ms",
        )
        row("joblet RunJob->RUNNING max after idle", f"{max(idle):.1f} ms")

    with section(f"{n} starts at once, request to RUNNING"):
        lat_c: list[float] = []
        ids: list[str] = []

        async def start_one() -> None:
            t = time.perf_counter()
            job = await joblet.run("true")
            lat_c.append(ms(t))
            assert job.status is JobStatus.RUNNING, job
            ids.append(job.id)

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(start_one)
        t_running = time.perf_counter() - t0
        for job_id in ids:
            await joblet.wait(job_id)
        t_done = time.perf_counter() - t0
        t_base = await trio.to_thread.run_sync(spawn_all_at_once, UNSHARE_TRUE, n)
        row(
            f"all {n} RUNNING (wall time)",
            f"{t_running:.2f} s",
            f"{n} x unshare ... true spawned at once, all exited",
            f"{t_base:.2f} s",
        )
        row(
            "starts per second",
            f"{n / t_running:.0f} /s",
            "unshare ... true per second",
            f"{n / t_base:.0f} /s",
        )
        row(
            "per-job request->RUNNING p50 / p99",
            f"{statistics.median(lat_c):.0f} / {pct(lat_c, 99):.0f} ms",
        )
        row(f"all {n} ended and cleaned up (wall time)", f"{t_done:.2f} s")

    if args.breakdown:
        await start_breakdown(args)


#: The phases of a start, as (description, from, to) timestamps; they follow each other, so their
#: sum is the whole request->RUNNING time. Daemon-side marks come from the wrappers installed by
#: traced_launch(), stage-1 marks from _stage1_trace.py (the same monotonic clock).
PHASES = (
    ("engine: validate, actor, nursery.start", "request", "cgroup"),
    ("cgroup create (mkdir per hierarchy, limits)", "cgroup", "cgroup_done"),
    ("job dirs (root, work, chown), launch spec", "cgroup_done", "spawn"),
    ("spec sent -> stage 1 has it (see below)", "spawn", "spec"),
    ("stage 1: join cgroups, check /proc/self/cgroup", "spec", "joined"),
    ("stage 1: unshare, sethostname", "joined", "root"),
    ("stage 1: build the root (mounts, /etc, /dev)", "root", "built"),
    ("stage 1: chroot, limits, uid, Landlock, close fds, filter", "built", "exec"),
    ("execve(dumb-init) to the daemon seeing EOF", "exec", "eof"),
    ("EOF to run_job returning RUNNING", "eof", "returned"),
)
#: What "spec sent -> stage 1 has it" holds for a stage 1 started with its job (no waiting one
#: in the pool): the whole start of stage 1.
COLD_PHASES = (
    ("  cold: fork+exec stage 1, interpreter start-up", "spawn", "main"),
    ("  cold: import _stage1 (ctypes, CDLL)", "main", "imported"),
    ("  cold: wait for and read the launch spec", "imported", "spec"),
)


@contextmanager
def traced_launch(pool: Stage1Pool, driver: CgroupDriver) -> Iterator[dict[str, float]]:
    """Timestamp a start on the daemon side (bench-only patching of the node's objects).

    Stage 1 is traced by :data:`STAGE1_TRACE_BOOT`, which must be in place before the pool starts
    its processes (see :func:`start_breakdown`). Yields the dict the wrappers write
    ``time.perf_counter()`` marks into (one job at a time).
    """
    marks: dict[str, float] = {}
    real_create, real_spawn = driver.create, pool.spawn

    def create(job_id: str, limits: Any) -> None:
        marks["cgroup"] = time.perf_counter()
        real_create(job_id, limits)
        marks["cgroup_done"] = time.perf_counter()

    async def spawn(spec: launch.LaunchSpec) -> trio.Process:
        marks["spawn"] = time.perf_counter()
        proc = await real_spawn(spec)
        marks["eof"] = time.perf_counter()
        return proc

    driver.create = create  # type: ignore[method-assign]
    pool.spawn = spawn  # type: ignore[method-assign]
    try:
        yield marks
    finally:
        del driver.create, pool.spawn
        assert driver.create == real_create and pool.spawn == real_spawn


async def start_breakdown(args: argparse.Namespace) -> None:
    """Where the time of a start goes: p50 and p90 of each phase over ``args.breakdown`` traced
    jobs, back to back and after :data:`IDLE_GAP` of idle.

    Runs in a harness of its own, whose stage-1 processes (the waiting ones of the pool too) are
    the tracing ones. The job is ``date +%s.%N``, which prints the (realtime) moment the command
    runs, so the table also shows how long after stage 1's ``execve`` (which is when the daemon
    reports RUNNING) the command really starts.
    """
    n = args.breakdown
    to_mono = time.time() - time.perf_counter()
    runs: dict[float, list[dict[str, float]]] = {0.0: [], IDLE_GAP: []}
    real_boot = launch.STAGE1_BOOT
    launch.STAGE1_BOOT = STAGE1_TRACE_BOOT
    try:
        async with open_harness(bench_config(args)) as joblet:
            ctx = joblet.engine.services
            with traced_launch(ctx.sandboxes.launcher, ctx.sandboxes.driver) as marks:
                for gap, samples in runs.items():
                    jobs: list[tuple[str, dict[str, float]]] = []
                    for i in range(WARMUP + n):
                        await trio.sleep(gap)
                        marks.clear()
                        marks["request"] = time.perf_counter()
                        job = await joblet.run("date", "+%s.%N")
                        marks["returned"] = time.perf_counter()
                        assert job.status is JobStatus.RUNNING, job
                        final = await joblet.wait(job.id)
                        assert final.status is JobStatus.COMPLETED, final
                        if i >= WARMUP:
                            jobs.append((job.id, dict(marks)))
                    # Read the logs afterwards: the spacing of the starts stays that of the
                    # `start` figure (it matters: see the cgroup join).
                    for job_id, sample in jobs:
                        out, err = await joblet.streams(job_id)
                        for line in err.decode().splitlines():
                            if line.startswith("JOBLET-STAGE1-TRACE "):
                                for item in line.split()[1:]:
                                    key, value = item.split("=")
                                    sample[key] = float(value)
                        sample["command"] = float(out.decode()) - to_mono
                        samples.append(sample)
    finally:
        launch.STAGE1_BOOT = real_boot

    def cold(sample: dict[str, float]) -> bool:
        return sample["main"] > sample["spawn"]

    def p50_p90(start: str, end: str, gap: float, only_cold: bool = False) -> str:
        d = [(s[end] - s[start]) * 1000 for s in runs[gap] if cold(s) or not only_cold]
        return f"{statistics.median(d):.2f} / {pct(d, 90):.1f}" if d else "-"

    def pooled(gap: float) -> str:
        return f"{sum(not cold(s) for s in runs[gap])} of {len(runs[gap])}"

    idle = f"after {IDLE_GAP * 1000:.0f} ms idle"
    with section(f"where a start goes: {n} traced jobs (command: date), p50 / p90 in ms"):
        row("", "back to back", "", idle)
        row("stage 1 from the pool (the others cold)", pooled(0.0), "", pooled(IDLE_GAP))
        for label, start, end in PHASES:
            row(label, p50_p90(start, end, 0.0), "", p50_p90(start, end, IDLE_GAP))
        row(
            "request->RUNNING",
            p50_p90("request", "returned", 0.0),
            "",
            p50_p90("request", "returned", IDLE_GAP),
        )
        for label, start, end in COLD_PHASES:
            row(label, p50_p90(start, end, 0.0, True), "", p50_p90(start, end, IDLE_GAP, True))
        row(
            "after RUNNING: execve(dumb-init) -> command runs",
            p50_p90("exec", "command", 0.0),
            "",
            p50_p90("exec", "command", IDLE_GAP),
        )
        row(
            "  (the command runs this long after RUNNING)",
            p50_p90("returned", "command", 0.0),
            "",
            p50_p90("returned", "command", IDLE_GAP),
        )


# --- engine: logs -----------------------------------------------------------------------------


@engine_bench("logs")
async def bench_logs(joblet: Harness, args: argparse.Namespace, results: Results) -> None:
    """Log throughput: disk + one live subscriber, vs gzip -1 on the same bytes."""
    size = args.log_mb * 1024 * 1024
    script = f"seq 1 1000000000 | head -c {size}"
    with section(f"log throughput, {args.log_mb} MiB of `seq` output, one live subscriber"):
        t0 = time.perf_counter()
        job = await joblet.run("sh", "-c", script)
        received = 0
        async for chunk in joblet.engine.follow_log(job.id):
            received += len(chunk.data)
        t_live = time.perf_counter() - t0
        final = await joblet.wait(job.id)
        # Everything submitted and the job's log files fsynced and closed (wait() returns after
        # the job's cleanup, which asks the disk writer to close them).
        await joblet.engine.services.disk_writer.flush()
        t_disk = time.perf_counter() - t0
        assert final.status is JobStatus.COMPLETED and received == size, (final, received)
        log_dir = joblet.node.config.layout.logs_dir / job.id
        persisted = await trio.to_thread.run_sync(lambda: LogFileReader(log_dir).size())
        assert persisted == size, f"only {persisted} of {size} bytes on disk when the clock stopped"
        on_disk = sum(p.stat().st_size for p in log_dir.iterdir())
        t_gzip, t_gen = await trio.to_thread.run_sync(gzip_baseline, script)
        mb = size / 1e6
        row(
            "delivered to a live subscriber",
            f"{mb / t_live:.0f} MB/s",
            "gzip -1 on the same bytes",
            f"{mb / t_gzip:.0f} MB/s",
        )
        row(
            "written to disk (job start to fsynced)",
            f"{mb / t_disk:.0f} MB/s",
            "the producer alone (seq | head > null)",
            f"{mb / t_gen:.0f} MB/s",
        )
        row("compressed size on disk", f"{on_disk / 1e6:.1f} MB", "raw", f"{mb:.1f} MB")
        row("target", ">= 100 MB/s")


# --- end to end: gRPC -------------------------------------------------------------------------


def open_channel(port: int, certs: CertPaths) -> grpc.Channel:
    """A grpcio channel with the admin certificate, on a connection of its own."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=certs.ca_cert.read_bytes(),
        private_key=certs.admin_key.read_bytes(),
        certificate_chain=certs.admin_cert.read_bytes(),
    )
    # A local subchannel pool: channels to the same target do not share one connection.
    return grpc.secure_channel(
        f"127.0.0.1:{port}", creds, options=[("grpc.use_local_subchannel_pool", 1)]
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@attrs.frozen
class Rate:
    """What :func:`call_rate` measured."""

    calls_per_s: float
    p50_ms: float
    client_cpu: float  # CPU seconds per wall second, the whole client process
    server_cpu: float  # the same for the server process


def call_rate(
    port: int, certs: CertPaths, server_pid: int, job_id: str, clients: int, seconds: float
) -> Rate:
    """GetJobStatus calls per second from ``clients`` threads, each with its own channel."""
    req = pb.GetJobStatusReq(id=job_id)
    with ExitStack() as stack:
        stubs = []
        for _ in range(clients):
            channel = stack.enter_context(open_channel(port, certs))
            stub = pb_grpc.JobServiceStub(channel)  # type: ignore[no-untyped-call]
            stub.GetJobStatus(req, timeout=CALL_TIMEOUT)  # connected and warm
            stubs.append(stub)
        counts = [0] * clients
        latencies: list[list[float]] = [[] for _ in range(clients)]
        barrier = threading.Barrier(clients + 1)
        deadline = 0.0

        def client(i: int) -> None:
            barrier.wait()
            stub, lat = stubs[i], latencies[i]
            while (t := time.perf_counter()) < deadline:
                stub.GetJobStatus(req, timeout=CALL_TIMEOUT)
                lat.append(ms(t))
            counts[i] = len(lat)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        cpu0, server0 = time.process_time(), cpu_seconds(server_pid)
        t0 = time.perf_counter()
        deadline = t0 + seconds
        barrier.wait()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        cpu, server = time.process_time() - cpu0, cpu_seconds(server_pid) - server0
    return Rate(
        calls_per_s=sum(counts) / wall,
        p50_ms=statistics.median(x for lat in latencies for x in lat),
        client_cpu=cpu / wall,
        server_cpu=server / wall,
    )


_STARTED = re.compile(r"job started successfully \| jobId=(\S+) .*\bduration=(\d+)ms")


def daemon_start_times(log: str, job_ids: set[str]) -> list[float]:
    """The start durations (ms, whole) the daemon logged for these jobs ("job started ...")."""
    found = (_STARTED.search(line) for line in log.splitlines())
    return [float(m[2]) for m in found if m and m[1] in job_ids]


@contextmanager
def trivial_server(certs: CertPaths, response: Any) -> Iterator[tuple[int, int]]:
    """Run benchmarks/trivial_server.py; yields its (port, pid)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.trivial_server", str(certs.certs_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(response.SerializeToString())
        proc.stdin.close()
        line = proc.stdout.readline().decode()
        if not line.startswith("port "):
            raise RuntimeError(f"trivial server did not start: {line!r}")
        yield int(line.split()[1]), proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


@process_bench("grpc")
def bench_grpc(args: argparse.Namespace, results: Results) -> None:
    """End to end over mutual TLS: RunJob->RUNNING, and GetJobStatus calls per second."""
    from tests.daemon import running_daemon  # the tests' way of running a daemon

    n = args.jobs
    with running_daemon() as daemon:
        certs = daemon.certs
        with section(f"end to end over mTLS gRPC (daemon subprocess, grpcio client), {n} jobs"):
            with open_channel(daemon.port, certs) as channel:
                stub = pb_grpc.JobServiceStub(channel)  # type: ignore[no-untyped-call]
                lat: list[float] = []
                ids: set[str] = set()
                for i in range(WARMUP + n):
                    t0 = time.perf_counter()
                    res = stub.RunJob(pb.RunJobReq(command="true"), timeout=CALL_TIMEOUT)
                    if i >= WARMUP:
                        lat.append(ms(t0))
                        ids.add(res.id)
                    assert res.status == "RUNNING", res
                    # The log stream ends when the job has ended: one job at a time.
                    for _ in stub.GetJobLogs(pb.GetJobLogsReq(id=res.id), timeout=CALL_TIMEOUT):
                        pass
                status = stub.GetJobStatus(pb.GetJobStatusReq(id=res.id), timeout=CALL_TIMEOUT)
            engine = "engine in-process (start, this run)"
            row(
                "RunJob->RUNNING p50",
                f"{statistics.median(lat):.1f} ms",
                engine + " p50",
                f"{results['engine_p50']:.1f} ms" if "engine_p50" in results else "not run",
            )
            row(
                "RunJob->RUNNING p99",
                f"{pct(lat, 99):.1f} ms",
                engine + " p99",
                f"{results['engine_p99']:.1f} ms" if "engine_p99" in results else "not run",
            )
            inside = daemon_start_times(daemon.log(), ids)
            if inside:
                row(
                    "  of which inside the daemon's job actor p50",
                    f"{statistics.median(inside):.0f} ms",
                    "  the rest (gRPC, TLS, client) p50",
                    f"{statistics.median(lat) - statistics.median(inside):.0f} ms",
                )
            row("target p50", "<= 25 ms")

        with (
            section(f"GetJobStatus over mTLS gRPC, grpcio clients, {args.rate_seconds:g} s each"),
            trivial_server(certs, status) as (trivial_port, trivial_pid),
        ):
            for clients in (1, MANY_CLIENTS):
                # Alternate the two servers so that a change of load hits both alike.
                ours = call_rate(
                    daemon.port, certs, daemon.process.pid, status.uuid, clients, args.rate_seconds
                )
                base = call_rate(
                    trivial_port, certs, trivial_pid, status.uuid, clients, args.rate_seconds
                )
                who = f"{clients} client" + ("s" if clients > 1 else "")
                row(
                    f"joblet, {who}",
                    f"{ours.calls_per_s:.0f} calls/s",
                    f"trivial grpcio server, {who}",
                    f"{base.calls_per_s:.0f} calls/s",
                )
                row(
                    "  p50 latency",
                    f"{ours.p50_ms:.2f} ms",
                    "  p50 latency",
                    f"{base.p50_ms:.2f} ms",
                )
                row(
                    "  CPU (cores): server / client",
                    f"{ours.server_cpu:.2f} / {ours.client_cpu:.2f}",
                    "  CPU (cores): server / client",
                    f"{base.server_cpu:.2f} / {base.client_cpu:.2f}",
                )


# --- persist (benchmarks/persist.py) ---------------------------------------------------------


@process_bench("persist")
def bench_persist(args: argparse.Namespace, results: Results) -> None:
    """Log lines/s through the disk writer to disk; QueryLogs on a 100 MB log."""
    from benchmarks import persist

    persist.run(args, results, row=row, section=section)


# --- main -------------------------------------------------------------------------------------


def bench_config(args: argparse.Namespace) -> Config:
    """The configuration of the engine benchmarks' harness."""
    base = Config()
    # Room for the "starts at once" figure.
    joblet_cfg = attrs.evolve(
        base.joblet, max_concurrent_jobs=max(base.joblet.max_concurrent_jobs, args.jobs)
    )
    isolation = base.isolation
    if args.prestart is not None:
        isolation = attrs.evolve(isolation, prestart=args.prestart)
    if args.seccomp is not None:
        isolation = attrs.evolve(isolation, seccomp=args.seccomp)
    if args.landlock is not None:
        isolation = attrs.evolve(isolation, landlock=args.landlock == "on")
    return attrs.evolve(base, joblet=joblet_cfg, isolation=isolation)


async def run_engine_benches(names: list[str], args: argparse.Namespace, results: Results) -> None:
    """Run the selected engine benchmarks in one harness."""
    async with open_harness(bench_config(args)) as joblet:
        for name in names:
            await ENGINE_BENCHES[name](joblet, args, results)


def cli() -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=200, help="jobs per start figure")
    parser.add_argument("--log-mb", type=int, default=200, help="output of the log job")
    parser.add_argument(
        "--rate-seconds", type=float, default=3.0, help="length of each calls/s measurement"
    )
    parser.add_argument(
        "--breakdown",
        type=int,
        nargs="?",
        const=50,
        default=0,
        metavar="N",
        help="with start: where a start's time goes, over N traced jobs back to back and N "
        "after idle (default 50)",
    )
    parser.add_argument(
        "--prestart",
        type=int,
        default=None,
        metavar="N",
        help="stage-1 processes kept waiting (isolation.prestart) in the engine benchmarks' "
        "harness; 0 starts each with its job (default: the configuration's default)",
    )
    parser.add_argument(
        "--seccomp",
        default=None,
        metavar="PROFILE",
        help="isolation.seccomp of the engine benchmarks' harness (default, off or a path; "
        "default: the configuration's default)",
    )
    parser.add_argument(
        "--landlock",
        choices=("on", "off"),
        default=None,
        help="isolation.landlock of the engine benchmarks' harness",
    )
    every = [*ENGINE_BENCHES, *PROCESS_BENCHES]
    parser.add_argument("--only", default="", help="comma-separated: " + ",".join(every))
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] if args.only else every
    unknown = [n for n in names if n not in every]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)} (choose from {', '.join(every)})")
    print(
        f"joblet benchmarks (python {sys.version.split()[0]}, trio {trio.__version__}, "
        f"grpcio {grpc.__version__}, {os.cpu_count()} CPUs)",
        flush=True,
    )
    results: Results = {}
    engine = [n for n in ENGINE_BENCHES if n in names]
    if engine:
        trio.run(run_engine_benches, engine, args, results)
    for name in PROCESS_BENCHES:
        if name in names:
            PROCESS_BENCHES[name](args, results)


if __name__ == "__main__":
    cli()
