"""Job metrics: the gzipped JSON Lines store, the sample model, and real jobs being sampled.

The store and the model are plain files and pure functions; the job tests run real jobs through the
in-process harness (real cgroups, real processes), with a short sampling interval from the config.
The API edges (gRPC, ``rnx``) are in ``test_metrics_api.py``.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
import trio

from cli import chart, output
from joblet.actors.sampler import FOLLOWER_BUFFER, MetricsHub
from joblet.config import MetricsSection
from joblet.core.counters import (
    CgroupStats,
    NetCounters,
    ProcessCounts,
    parse_net_dev,
    status_field,
)
from joblet.core.errors import JobNotFound
from joblet.core.model import JobStatus
from joblet.core.samples import (
    MetricRecord,
    MetricsSample,
    Reading,
    compute_sample,
    samples_from_records,
)
from joblet.rpc import convert
from joblet.store.metricfiles import (
    MetricsCorrupted,
    MetricsWriter,
    delete_job_metrics,
    metrics_path,
    read_metric_records,
)
from joblet.testing import Harness

MIB = 1 << 20


def records(n: int, start: int = 1) -> list[MetricRecord]:
    return [
        MetricRecord(ts, kind, {"a": float(ts), "b": ts * 0.5})
        for ts in range(start, start + n)
        for kind in ("cpu", "memory")
    ]


# --- the store ------------------------------------------------------------------------------------


def test_store_round_trip_is_standard_gzip_jsonl(tmp_path: Path) -> None:
    path = metrics_path(tmp_path, "job-1")
    assert path == tmp_path / "job-1" / "metrics.jsonl.gz"
    writer = MetricsWriter(path)
    writer.append(records(3))
    writer.append(records(2, start=4))
    writer.append([])  # nothing, no empty member
    writer.close()
    writer.close()  # idempotent
    assert read_metric_records(path) == records(5)
    # Standard gzip: the gzip module and zcat both read every member.
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    assert json.loads(lines[0]) == {
        "timestamp": 1,
        "metric_type": "cpu",
        "values": {"a": 1.0, "b": 0.5},
    }
    assert len(lines) == 10
    if shutil.which("zcat"):
        shown = subprocess.run(["zcat", str(path)], capture_output=True, check=True, timeout=10)
        assert shown.stdout.decode().splitlines() == lines


def test_missing_file_has_no_records_and_delete_is_idempotent(tmp_path: Path) -> None:
    assert read_metric_records(metrics_path(tmp_path, "nothing")) == []
    delete_job_metrics(tmp_path, "nothing")
    writer = MetricsWriter(metrics_path(tmp_path, "job"))
    writer.append(records(1))
    writer.close()
    delete_job_metrics(tmp_path, "job")
    assert not (tmp_path / "job").exists()
    for bad in ("", ".", "..", "a/b", "a\0b"):
        with pytest.raises(ValueError):
            metrics_path(tmp_path, bad)
        with pytest.raises(ValueError):
            delete_job_metrics(tmp_path, bad)


def test_torn_last_member_is_ignored_and_cut_by_the_next_writer(tmp_path: Path) -> None:
    path = metrics_path(tmp_path, "job")
    writer = MetricsWriter(path)
    writer.append(records(2))
    whole = writer.size
    writer.append(records(2, start=3))
    writer.close()
    full = path.read_bytes()
    # A crash anywhere inside the last member: the first member's records survive.
    for cut in range(whole, len(full)):
        path.write_bytes(full[:cut])
        assert read_metric_records(path) == records(2), cut
    # Garbage after the last complete member (not gzip at all) is a torn tail too.
    path.write_bytes(full[:whole] + b"\x1f\x8b\x08garbage")
    assert read_metric_records(path) == records(2)
    # A writer reopening the file cuts the tail and appends: zcat reads the whole file again.
    writer = MetricsWriter(path)
    assert writer.size == whole
    writer.append(records(1, start=9))
    writer.close()
    assert read_metric_records(path) == records(2) + records(1, start=9)
    gzip.decompress(path.read_bytes())  # raises on a damaged member


def test_torn_last_line_is_ignored_and_a_bad_complete_line_is_corruption(tmp_path: Path) -> None:
    path = metrics_path(tmp_path, "job")
    path.parent.mkdir()
    good = b"".join((r.to_json() + "\n").encode() for r in records(1))
    torn = good + b'{"timestamp": 7, "metric_ty'
    path.write_bytes(zlib.compress(torn, 6, 31))
    assert read_metric_records(path) == records(1)
    path.write_bytes(zlib.compress(good + b"not json\n", 6, 31))
    with pytest.raises(MetricsCorrupted):
        read_metric_records(path)


def test_writer_refuses_non_finite_values(tmp_path: Path) -> None:
    writer = MetricsWriter(metrics_path(tmp_path, "job"))
    with pytest.raises(ValueError, match="not finite"):
        writer.append([MetricRecord(1, "cpu", {"cpu_percent": float("nan")})])
    writer.close()
    assert read_metric_records(metrics_path(tmp_path, "job")) == []


# --- the sample model -----------------------------------------------------------------------------


def test_compute_sample_rates_and_percentages() -> None:
    before = Reading(
        1_000_000_000,
        10.0,
        CgroupStats(cpu_usage_usec=1_000_000, cpu_user_usec=800_000, io_read_bytes=100),
        network=NetCounters(rx_bytes=1000),
    )
    after = Reading(
        3_000_000_000,
        12.0,  # two seconds later
        CgroupStats(
            cpu_usage_usec=2_000_000,  # one CPU second in two: 50%
            cpu_user_usec=1_600_000,
            cpu_system_usec=200_000,
            io_read_bytes=4_100,
            io_write_bytes=10,
            memory_current=64 * MIB,
            memory_peak=32 * MIB,  # v2 kernels without memory.peak report 0 or less
            memory_limit=256 * MIB,
            memory_anon=60 * MIB,
            nr_throttled=7,
            pids_current=4,
            pids_limit=1024,
        ),
        ProcessCounts(processes=2, threads=4, open_fds=9),
        NetCounters(rx_bytes=3000, tx_bytes=10, rx_packets=5, tx_packets=1),
    )
    s = compute_sample(before, after)
    assert s.timestamp_ns == 3_000_000_000
    assert s.get("cpu", "cpu_percent") == pytest.approx(50.0)
    assert s.get("cpu", "cpu_total") == s.get("cpu", "cpu_percent")
    assert s.get("cpu", "cpu_user") == pytest.approx(40.0)
    assert s.get("cpu", "cpu_system") == pytest.approx(10.0)
    assert s.get("cpu", "cpu_nr_throttled") == 7
    assert s.get("io", "io_read_bps") == pytest.approx(2000.0)
    assert s.get("io", "io_write_bps") == pytest.approx(5.0)
    assert s.get("memory", "memory_peak") == 64 * MIB
    assert s.get("memory", "memory_rss") == 60 * MIB
    assert s.get("memory", "memory_percent") == pytest.approx(25.0)
    assert s.get("network", "net_rx_bps") == pytest.approx(1000.0)
    assert s.values["process"] == {
        "process_count": 2,
        "process_threads": 4,
        "process_open_fds": 9,
        "process_pids_current": 4,
        "process_pids_limit": 1024,
    }
    # No network namespace of its own: no network values at all; no limit: no percentage.
    bare = compute_sample(before, Reading(2, 10.0))
    assert "network" not in bare.values
    assert "memory_percent" not in bare.values["memory"]
    assert bare.get("cpu", "cpu_percent") == 0.0  # no time elapsed: no division by zero


def test_samples_survive_the_record_form() -> None:
    first = compute_sample(Reading(0, 0.0), Reading(5, 1.0, network=NetCounters()))
    second = compute_sample(Reading(5, 1.0), Reading(9, 2.0))
    recs = first.records() + second.records()
    assert [r.metric_type for r in first.records()] == ["cpu", "memory", "io", "network", "process"]
    assert samples_from_records(recs) == [first, second]
    assert samples_from_records([]) == []


def test_parse_net_dev_sums_every_interface() -> None:
    text = (
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets"
        " errs drop fifo colls carrier compressed\n"
        "    lo:  1000      10    0    0    0     0          0         0     1000      10"
        "    0    0    0     0       0          0\n"
        "  eth0:   500       5    0    0    0     0          0         0      300       3"
        "    0    0    0     0       0          0\n"
    )
    assert parse_net_dev(text) == NetCounters(1500, 1300, 15, 13)


def test_status_field_reads_a_number_of_proc_status() -> None:
    text = "Name:\tpython3\nUmask:\t0022\nThreads:\t4\nVmRSS:\t  1024 kB\nBad:\tx\n"
    assert status_field(text, "Threads") == 4
    assert status_field(text, "VmRSS") == 1024
    assert status_field(text, "Bad") == 0
    assert status_field(text, "Missing") == 0


def test_protobuf_sample_leaves_absent_types_unset_and_clamps() -> None:
    sample = MetricsSample(
        1_700_000_000_000_000_000,
        {
            "cpu": {"cpu_percent": 12.5, "cpu_usage_usec": 3.0},
            "process": {"process_count": float(1 << 40)},
        },
    )
    msg = convert.metrics_sample_to_pb("job", sample)
    assert (msg.jobId, msg.timestamp) == ("job", "2023-11-14T22:13:20Z")
    assert msg.timestampUnixNano == 1_700_000_000_000_000_000
    assert (msg.cpu.usagePercent, msg.cpu.usageUsec) == (12.5, 3)
    assert msg.process.count == (1 << 31) - 1  # int32 field: clamped
    assert msg.HasField("memory") is False and msg.HasField("network") is False


def test_human_block_and_chart_fit() -> None:
    samples = [
        convert.metrics_sample_to_pb(
            "job",
            MetricsSample(
                i * 1_000_000_000,
                {
                    "cpu": {"cpu_percent": 10.0 * i},
                    "memory": {"memory_current": i * MIB, "memory_limit": 64 * MIB},
                    "io": {"io_read_bps": 10 * MIB, "io_write_bps": 5 * MIB},
                },
            ),
        )
        for i in range(1, 8)
    ]
    assert output.render_metrics(samples[0]) == (
        "Timestamp: 1970-01-01T00:00:01Z\n"
        "CPU: 10.0%, Memory: 1.0MB, I/O Read: 10MB/s, I/O Write: 5.0MB/s\n"
    )
    assert output.format_bytes(256 * MIB) == "256MB"
    assert output.format_bytes(0) == "0B"
    for width in (40, 80, 200):
        text = chart.render_chart(samples, width)
        assert max(len(line) for line in text.splitlines()) <= width
        if width >= 80:
            assert "CPU (% of one core): mean 40.0%, max 70.0%" in text
            assert "Memory: peak 7.0MB of 64MB limit" in text
            assert "7 samples from 1970-01-01T00:00:01Z to 1970-01-01T00:00:07Z" in text
    assert chart.render_chart([], 80) == "No metrics samples."


# --- real jobs ------------------------------------------------------------------------------------

BURN = """
import time
data = b"x" * ({mib} << 20)  # touched: counted in the job's memory
end = time.monotonic() + {seconds}
while time.monotonic() < end:
    pass
"""


async def collect(joblet: Harness, job_id: str) -> list[MetricsSample]:
    return [s async for s in joblet.engine.follow_metrics(job_id)]


def stored(joblet: Harness, job_id: str) -> list[MetricsSample]:
    return samples_from_records(read_metric_records(metrics_path(metrics_dir(joblet), job_id)))


def metrics_dir(joblet: Harness) -> Path:
    return joblet.engine.services.metrics_dir


@pytest.mark.slow
@pytest.mark.cgroup2  # the v2 driver's stats too, in `just test-cgroup2`
@pytest.mark.joblet_config(metrics=MetricsSection(interval=0.5))
async def test_cpu_limited_job_shows_its_share_and_its_memory(joblet: Harness) -> None:
    with trio.fail_after(60):
        job = await joblet.run(
            "python3", "-c", BURN.format(mib=48, seconds=4), max_cpu=50, max_memory=256
        )
        samples = await collect(joblet, job.id)
        assert (await joblet.wait(job.id)).status is JobStatus.COMPLETED
    assert len(samples) >= 5
    times = [s.timestamp_ns for s in samples]
    assert times == sorted(set(times))
    # The busy part: the data is allocated and the processes still run.
    busy = [
        s
        for s in samples
        if s.get("memory", "memory_current") >= 48 * MIB and s.get("process", "process_count")
    ]
    assert len(busy) >= 3, [s.values for s in samples]
    first, last = busy[0], busy[-1]
    used = last.get("cpu", "cpu_usage_usec") - first.get("cpu", "cpu_usage_usec")
    share = used / ((last.timestamp_ns - first.timestamp_ns) / 1000) * 100
    print(f"measured CPU share under a 50% limit: {share:.1f}%")
    assert 30 <= share <= 65
    assert all(s.get("cpu", "cpu_percent") < 90 for s in busy[1:])
    assert samples[-1].get("cpu", "cpu_nr_throttled") > 0
    memory = [s.get("memory", "memory_current") for s in samples]
    assert max(memory) > 48 * MIB
    assert all(s.get("memory", "memory_limit") == 256 * MIB for s in samples)
    assert samples[-1].get("memory", "memory_peak") >= max(memory)
    assert "network" not in samples[0].values  # the host's network: nothing of its own
    # The final sample is taken after the processes are gone: the totals are final.
    assert samples[-1].get("process", "process_count") == 0
    assert max(s.get("process", "process_count") for s in samples) >= 1
    # Replay after the end is exactly what was followed live, and what the file holds.
    assert await collect(joblet, job.id) == samples
    assert stored(joblet, job.id) == samples


@pytest.mark.slow
@pytest.mark.joblet_config(metrics=MetricsSection(interval=0.1))
async def test_following_a_running_job_is_live_and_ends_with_it(joblet: Harness) -> None:
    with trio.fail_after(60):
        job = await joblet.run("sleep", "60")
        live: list[MetricsSample] = []
        statuses: list[JobStatus] = []
        async with trio.open_nursery() as nursery:
            async for sample in joblet.engine.follow_metrics(job.id[:8]):
                live.append(sample)
                statuses.append(joblet.engine.get(job.id).status)
                if len(live) == 3:
                    nursery.start_soon(joblet.engine.stop_job, job.id)
        assert joblet.engine.get(job.id).status is JobStatus.STOPPED
    assert statuses[:3] == [JobStatus.RUNNING] * 3  # received while the job ran
    assert len(live) >= 4
    assert live[-1].get("process", "process_count") == 0
    assert await collect(joblet, job.id) == live
    assert stored(joblet, job.id) == live


@pytest.mark.slow
@pytest.mark.joblet_config(metrics=MetricsSection(interval=0.05))
async def test_a_stalled_follower_catches_up_from_disk_and_misses_nothing(
    joblet: Harness,
) -> None:
    with trio.fail_after(60):
        job = await joblet.run("sleep", "60")
        fast: list[MetricsSample] = []
        slow: list[MetricsSample] = []
        far_ahead = trio.Event()

        async def follow_fast() -> None:
            async for sample in joblet.engine.follow_metrics(job.id):
                fast.append(sample)
                if len(fast) == FOLLOWER_BUFFER * 2 + 4:
                    far_ahead.set()

        async def follow_slow() -> None:
            async for sample in joblet.engine.follow_metrics(job.id):
                slow.append(sample)
                if len(slow) == 1:
                    # Stalled while more than a channel's worth of samples is taken.
                    await far_ahead.wait()
            await stop_done.wait()

        stop_done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow_fast)
            nursery.start_soon(follow_slow)
            await far_ahead.wait()
            await joblet.engine.stop_job(job.id)
            stop_done.set()
    assert len(fast) > FOLLOWER_BUFFER * 2 + 4
    assert slow == fast
    assert stored(joblet, job.id) == fast


@pytest.mark.slow
@pytest.mark.joblet_config(metrics=MetricsSection(interval=30))
async def test_a_job_shorter_than_the_interval_has_a_start_and_a_final_sample(
    joblet: Harness,
) -> None:
    with trio.fail_after(30):
        job = await joblet.run("sleep", "0.5")
        samples = await collect(joblet, job.id)
    assert len(samples) == 2
    assert samples[0].get("process", "process_count") >= 1
    assert samples[1].get("process", "process_count") == 0
    assert samples[1].get("cpu", "cpu_usage_usec") >= samples[0].get("cpu", "cpu_usage_usec")


@pytest.mark.slow
@pytest.mark.joblet_config(metrics=MetricsSection(interval=0.2))
async def test_stored_metrics_are_read_by_job_id_after_a_restart(joblet: Harness) -> None:
    with trio.fail_after(30):
        job = await joblet.run("sh", "-c", "echo hi")
        await joblet.wait(job.id)
        samples = await collect(joblet, job.id)
        # A fresh hub knows no sampler: what a restarted daemon has.
        ctx = joblet.engine.services
        fresh = MetricsHub(ctx.metrics_dir, MetricsSection(), ctx.sandboxes.driver, ctx.disk_writer)
        assert [s async for s in fresh.follow(job.id)] == samples
    path = metrics_path(ctx.metrics_dir, job.id)
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    kinds = {json.loads(line)["metric_type"] for line in lines}
    assert kinds == {"cpu", "memory", "io", "process"}
    assert os.stat(path).st_mode & 0o777 == 0o600
    with pytest.raises(JobNotFound):
        await collect(joblet, "no-such-job")


LOOPBACK = """
import socket
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
client = socket.create_connection(server.getsockname())
peer, _ = server.accept()
client.sendall(b"x" * 200_000)
got = 0
while got < 200_000:
    got += len(peer.recv(65536))
# Stay up for a few sampling intervals after the traffic: samples are taken while the job runs,
# so one that ends at once may never be sampled after its last byte.
import time
time.sleep(1)
"""


@pytest.mark.slow
@pytest.mark.joblet_config(metrics=MetricsSection(interval=0.2))
async def test_a_job_with_its_own_network_has_network_metrics(joblet: Harness) -> None:
    with trio.fail_after(30):
        job = await joblet.run("python3", "-c", LOOPBACK, network="none")
        samples = await collect(joblet, job.id)
        assert (await joblet.wait(job.id)).status is JobStatus.COMPLETED
    assert all("network" in s.values for s in samples)
    last = samples[-1]
    # Loopback: every byte sent is also received.
    assert last.get("network", "net_rx_bytes") >= 200_000
    assert last.get("network", "net_tx_bytes") >= 200_000
    assert last.get("network", "net_rx_packets") > 0


@pytest.mark.slow
@pytest.mark.joblet_config(metrics=MetricsSection(enabled=False))
async def test_disabled_metrics_sample_nothing(joblet: Harness) -> None:
    with trio.fail_after(30):
        job = await joblet.run("sh", "-c", "echo hi")
        assert await collect(joblet, job.id) == []
        await joblet.wait(job.id)
        assert await collect(joblet, job.id) == []
    assert not (metrics_dir(joblet) / job.id).exists()
