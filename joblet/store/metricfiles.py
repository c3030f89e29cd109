"""A job's stored metrics: one gzipped JSON Lines file (blocking I/O, meant for a worker thread).

Layout (the spec's Persist Service storage): ``<metrics_dir>/<job_id>/metrics.jsonl.gz`` holds one
JSON object per line and per metric type of a sample::

    {"timestamp": 1704451200000000000, "metric_type": "cpu", "values": {"cpu_percent": 58.0}}

``timestamp`` is Unix time in nanoseconds; every record of one sample carries the same timestamp.

The file is standard gzip (``zcat metrics.jsonl.gz`` prints the lines): each flush appends one
complete gzip member holding whole lines, in a single write. A crash can therefore only leave a torn
*last* member; readers ignore it (and a last line without its newline), and a writer reopening the
file cuts it off before appending, so the file stays valid gzip.
"""

from __future__ import annotations

import math
import os
import shutil
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from joblet.core.ids import check_job_id
from joblet.core.samples import MetricRecord

#: File name of a job's metrics inside its directory (the spec's name).
METRICS_FILE_NAME = "metrics.jsonl.gz"
#: gzip level: metrics lines are small and repetitive; level 6 (zlib's default) costs nothing here.
GZIP_LEVEL = 6
#: The wbits value that makes zlib read and write the gzip container.
_GZIP_WBITS = 31
_FILE_MODE = 0o600
_READ_BLOCK = 1 << 16


class MetricsCorrupted(Exception):
    """A complete gzip member of a metrics file holds a line that is not a metric record."""


def job_metrics_dir(metrics_dir: Path, job_id: str) -> Path:
    """The metrics directory of a job.

    Raises:
        ValueError: ``job_id`` is not one safe path component (see ``core.ids``).
    """
    check_job_id(job_id, "job id for a metrics directory")
    return metrics_dir / job_id


def metrics_path(metrics_dir: Path, job_id: str) -> Path:
    """Path of a job's metrics file: ``<metrics_dir>/<job_id>/metrics.jsonl.gz``.

    Raises:
        ValueError: ``job_id`` is not one safe path component (see ``core.ids``).
    """
    return job_metrics_dir(metrics_dir, job_id) / METRICS_FILE_NAME


def delete_job_metrics(metrics_dir: Path, job_id: str) -> None:
    """Remove a job's stored metrics; nothing happens if it has none.

    Only the disk writer calls it, the one writer of metrics files, after the job's queued writes
    (see :meth:`joblet.actors.diskwriter.DiskWriter.delete_job`).

    Raises:
        ValueError: ``job_id`` is not one safe path component (see ``core.ids``).
    """
    try:
        shutil.rmtree(job_metrics_dir(metrics_dir, job_id))
    except FileNotFoundError:
        pass


def encode_member(records: Iterable[MetricRecord]) -> bytes:
    """One complete gzip member holding ``records`` as JSON lines."""
    text = "".join(r.to_json() + "\n" for r in records)
    return zlib.compress(text.encode(), GZIP_LEVEL, _GZIP_WBITS)


def decode_members(data: bytes) -> tuple[list[MetricRecord], int]:
    """Parse concatenated gzip members, stopping at the first one that is torn or damaged.

    Returns:
        The records of the complete members, and the number of bytes those members take (where a
        writer may append).

    Raises:
        MetricsCorrupted: A complete member holds a line that is not a metric record.
    """
    records: list[MetricRecord] = []
    pos = 0
    while pos < len(data):
        d = zlib.decompressobj(_GZIP_WBITS)
        try:
            text = d.decompress(data[pos:])
        except zlib.error:
            break  # a torn member whose damage shows before its end, or garbage after the last
        if not d.eof:
            break  # torn: the member ends before its trailer
        lines = text.split(b"\n")
        if lines[-1]:
            lines = lines[:-1]  # a last line without its newline: torn, not ours to judge
        for line in lines:
            if not line:
                continue
            try:
                records.append(MetricRecord.from_json(line))
            except ValueError as e:
                raise MetricsCorrupted(f"bad metric line at member offset {pos}: {e}") from e
        pos = len(data) - len(d.unused_data)
    return records, pos


def read_metric_records(path: Path) -> list[MetricRecord]:
    """Every record of a metrics file in file order; a missing file has none.

    A torn last gzip member and a torn last line are ignored (a crash while writing).

    Raises:
        MetricsCorrupted: A complete member holds a line that is not a metric record.
        OSError: The file exists but cannot be read.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return decode_members(data)[0]


class MetricsWriter:
    """Appends records to a job's metrics file, one gzip member per :meth:`append` (blocking).

    Use from one thread at a time. If the file exists (a writer reopened after a restart), a torn
    tail is cut off and the writer continues after the last complete member.

    The file is opened for each write and closed again: appends come seconds apart, and a
    daemon with many running jobs should not hold a descriptor per job for this.

    Args:
        path: The metrics file (see :func:`metrics_path`); its directory is created if missing.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        try:
            self._size = _valid_extent(fd)
            os.ftruncate(fd, self._size)
        finally:
            os.close(fd)
        self._closed = False

    @property
    def size(self) -> int:
        """Bytes of complete members in the file."""
        return self._size

    def append(self, records: Sequence[MetricRecord]) -> None:
        """Write ``records`` as one gzip member (nothing if empty).

        Raises:
            ValueError: The writer is closed, or a value is not finite.
            OSError: Writing failed (the file is cut back to its previous size if possible).
        """
        if self._closed:
            raise ValueError("metrics writer is closed")
        if not records:
            return
        for r in records:
            for name, v in r.values.items():
                if not math.isfinite(v):
                    raise ValueError(f"metric {name} is not finite: {v!r}")
        member = encode_member(records)
        fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            written = 0
            while written < len(member):
                written += os.pwrite(fd, member[written:], self._size + written)
        except BaseException:
            try:
                os.ftruncate(fd, self._size)
            except OSError:
                pass  # a torn member is ignored by readers and cut by the next writer
            raise
        finally:
            os.close(fd)
        self._size += len(member)

    def sync(self) -> None:
        """fsync the file (it survives a power loss up to here)."""
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self, *, fsync: bool = True) -> None:
        """fsync the file (unless told not to) and refuse further appends; idempotent."""
        if self._closed:
            return
        self._closed = True
        if fsync:
            self.sync()


def _valid_extent(fd: int) -> int:
    chunks = []
    pos = 0
    while block := os.pread(fd, _READ_BLOCK, pos):
        chunks.append(block)
        pos += len(block)
    return decode_members(b"".join(chunks))[1]
