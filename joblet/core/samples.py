"""Job metrics samples: what a sample holds and how it is computed from raw counters (no I/O).

A sample is a set of named numbers per metric type, taken at one instant. The names follow the
spec's Persist Service where it gives them (``cpu_user``, ``cpu_system``, ``cpu_total``,
``cpu_percent``, ``memory_rss``, ``memory_percent``, ``io_read_bytes``, ...); the rest are ours:

=========== ==================================================================================
type        values
=========== ==================================================================================
cpu         ``cpu_percent`` (= ``cpu_total``), ``cpu_user``, ``cpu_system``: percent of one core
            over the interval since the previous sample; ``cpu_usage_usec``,
            ``cpu_user_usec``, ``cpu_system_usec``, ``cpu_nr_periods``, ``cpu_nr_throttled``,
            ``cpu_throttled_usec``: totals since the job started
memory      bytes: ``memory_current``, ``memory_peak``, ``memory_limit`` (0 = none),
            ``memory_anon`` (= ``memory_rss``), ``memory_file``; ``memory_percent`` of the limit
            (only with a limit); counts: ``memory_pgfault``, ``memory_pgmajfault``,
            ``memory_oom_kills``
io          block devices, totals: ``io_read_bytes``, ``io_write_bytes``, ``io_read_ops``,
            ``io_write_ops``; rates over the interval: ``io_read_bps``, ``io_write_bps``
network     only for a job with its own network namespace, every interface of it: totals
            ``net_rx_bytes``, ``net_tx_bytes``, ``net_rx_packets``, ``net_tx_packets``; rates
            ``net_rx_bps``, ``net_tx_bps``
process     ``process_count``, ``process_threads``, ``process_open_fds``,
            ``process_pids_current`` (tasks in the cgroup), ``process_pids_limit`` (0 = none)
=========== ==================================================================================

Each type is stored as one :class:`MetricRecord` per sample, all with the sample's timestamp:
one JSON line of the job's metrics file (:mod:`joblet.store.metricfiles` writes and reads the
file).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

import attrs

from joblet.core.counters import CgroupStats, NetCounters, ProcessCounts

#: Metric types in the order a sample's records are written.
METRIC_TYPES = ("cpu", "memory", "io", "network", "process")


@attrs.frozen
class MetricRecord:
    """One line of a metrics file: the values of one metric type at one instant.

    Attributes:
        timestamp_ns: Unix time in nanoseconds (shared by all records of one sample).
        metric_type: ``"cpu"``, ``"memory"``, ``"io"``, ``"network"``, ``"process"`` (or
            another category; readers keep what they do not know).
        values: Metric name to number, e.g. ``{"cpu_percent": 58.0}``.
    """

    timestamp_ns: int
    metric_type: str
    values: dict[str, float]

    def to_json(self) -> str:
        """The record as one JSON line (without the newline), in the spec's field names."""
        return json.dumps(
            {
                "timestamp": self.timestamp_ns,
                "metric_type": self.metric_type,
                "values": self.values,
            },
            separators=(",", ":"),
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, line: str | bytes) -> MetricRecord:
        """Parse one JSON line.

        Raises:
            ValueError: The line is not a metric record.
        """
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise ValueError("a metric record is a JSON object")
        ts = obj.get("timestamp")
        kind = obj.get("metric_type")
        values = obj.get("values")
        if not isinstance(ts, int) or isinstance(ts, bool):
            raise ValueError(f"bad timestamp: {ts!r}")
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"bad metric_type: {kind!r}")
        if not isinstance(values, dict):
            raise ValueError(f"bad values: {values!r}")
        out: dict[str, float] = {}
        for name, v in values.items():
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ValueError(f"bad value for {name}: {v!r}")
            out[name] = float(v)
        return cls(ts, kind, out)


@attrs.frozen
class Reading:
    """The raw counters of a job at one instant.

    Attributes:
        timestamp_ns: Wall clock, Unix nanoseconds.
        monotonic: Monotonic clock, seconds (for intervals).
        cgroup: The job group's counters.
        processes: What the job's processes hold.
        network: The job's own network namespace's counters; None when it shares the host's.
    """

    timestamp_ns: int
    monotonic: float
    cgroup: CgroupStats = attrs.field(factory=CgroupStats)
    processes: ProcessCounts = attrs.field(factory=ProcessCounts)
    network: NetCounters | None = None


@attrs.frozen
class MetricsSample:
    """One sample of a job's metrics.

    Attributes:
        timestamp_ns: When it was taken, Unix nanoseconds.
        values: Metric type to ``{name: number}`` (see the module's table); a type the sample
            has nothing for (``network`` of a job on the host's network) is absent.
    """

    timestamp_ns: int
    values: Mapping[str, Mapping[str, float]]

    def get(self, metric_type: str, name: str, default: float = 0.0) -> float:
        """One value, ``default`` when the sample does not have it."""
        return self.values.get(metric_type, {}).get(name, default)

    def records(self) -> list[MetricRecord]:
        """The sample as stored: one record per metric type."""
        known = [t for t in METRIC_TYPES if t in self.values]
        other = sorted(t for t in self.values if t not in METRIC_TYPES)
        return [MetricRecord(self.timestamp_ns, t, dict(self.values[t])) for t in (*known, *other)]


def samples_from_records(records: Iterable[MetricRecord]) -> list[MetricsSample]:
    """Stored records back into samples: consecutive records with one timestamp form a sample."""
    samples: list[MetricsSample] = []
    current: dict[str, Mapping[str, float]] = {}
    ts: int | None = None
    for r in records:
        if r.timestamp_ns != ts:
            if ts is not None:
                samples.append(MetricsSample(ts, current))
            ts, current = r.timestamp_ns, {}
        current[r.metric_type] = r.values
    if ts is not None:
        samples.append(MetricsSample(ts, current))
    return samples


def compute_sample(previous: Reading, current: Reading) -> MetricsSample:
    """The sample for ``current``; rates and percentages are over the time since ``previous``.

    Args:
        previous: The reading before (for a job's first sample: zero counters at its start).
        current: The reading now.
    """
    elapsed = current.monotonic - previous.monotonic
    a, b = previous.cgroup, current.cgroup

    def rate(before: int, after: int) -> float:
        return max(0, after - before) / elapsed if elapsed > 0 else 0.0

    def percent(before_usec: int, after_usec: int) -> float:
        return rate(before_usec, after_usec) / 1e6 * 100.0

    cpu_percent = percent(a.cpu_usage_usec, b.cpu_usage_usec)
    values: dict[str, Mapping[str, float]] = {
        "cpu": {
            "cpu_percent": cpu_percent,
            "cpu_total": cpu_percent,
            "cpu_user": percent(a.cpu_user_usec, b.cpu_user_usec),
            "cpu_system": percent(a.cpu_system_usec, b.cpu_system_usec),
            "cpu_usage_usec": b.cpu_usage_usec,
            "cpu_user_usec": b.cpu_user_usec,
            "cpu_system_usec": b.cpu_system_usec,
            "cpu_nr_periods": b.nr_periods,
            "cpu_nr_throttled": b.nr_throttled,
            "cpu_throttled_usec": b.throttled_usec,
        },
        "memory": _memory(b),
        "io": {
            "io_read_bytes": b.io_read_bytes,
            "io_write_bytes": b.io_write_bytes,
            "io_read_ops": b.io_read_ops,
            "io_write_ops": b.io_write_ops,
            "io_read_bps": rate(a.io_read_bytes, b.io_read_bytes),
            "io_write_bps": rate(a.io_write_bytes, b.io_write_bytes),
        },
    }
    net = current.network
    if net is not None:
        before = previous.network or NetCounters()
        values["network"] = {
            "net_rx_bytes": net.rx_bytes,
            "net_tx_bytes": net.tx_bytes,
            "net_rx_packets": net.rx_packets,
            "net_tx_packets": net.tx_packets,
            "net_rx_bps": rate(before.rx_bytes, net.rx_bytes),
            "net_tx_bps": rate(before.tx_bytes, net.tx_bytes),
        }
    procs = current.processes
    values["process"] = {
        "process_count": procs.processes,
        "process_threads": procs.threads,
        "process_open_fds": procs.open_fds,
        "process_pids_current": b.pids_current,
        "process_pids_limit": b.pids_limit,
    }
    return MetricsSample(current.timestamp_ns, values)


def _memory(s: CgroupStats) -> dict[str, float]:
    out: dict[str, float] = {
        "memory_current": s.memory_current,
        "memory_peak": max(s.memory_peak, s.memory_current),
        "memory_limit": s.memory_limit,
        "memory_anon": s.memory_anon,
        "memory_rss": s.memory_anon,
        "memory_file": s.memory_file,
        "memory_pgfault": s.pgfault,
        "memory_pgmajfault": s.pgmajfault,
        "memory_oom_kills": s.oom_kills,
    }
    if s.memory_limit > 0:
        out["memory_percent"] = s.memory_current / s.memory_limit * 100.0
    return out
