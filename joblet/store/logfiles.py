"""A job's stored log: two gzip files and an index (blocking I/O, meant for a worker thread).

Layout of ``<logs_dir>/<job_id>/``:

- ``stdout.log.gz`` and ``stderr.log.gz``: each stream's raw bytes as standard gzip, one or more
  complete gzip members per written batch. Concatenated members are valid gzip, so
  ``zcat stdout.log.gz`` prints exactly what the job wrote to stdout.
- ``index``: one fixed-size record per chunk (see :mod:`joblet.store.logindex`) giving the merged
  order, each chunk's timestamp and the gzip member that holds it.

A batch is written in this order: the gzip members (one write per stream), then the index records
(one write). Readers trust only what the index describes, and only the part of the index that is
complete and points inside the gzip files, so a crash mid-batch (a torn last member or a torn last
record) loses at most that batch and never corrupts what came before.

Members hold whole chunks and are cut at about :data:`MEMBER_TARGET` uncompressed bytes, so a
reader seeking to any offset decompresses at most one member's worth of data.
"""

from __future__ import annotations

import os
import shutil
import threading
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Sequence
from pathlib import Path

import attrs

from joblet.core.chunks import STREAM_NAMES, STREAMS, Chunk
from joblet.core.ids import check_job_id
from joblet.store.logindex import (
    RECORD_SIZE,
    IndexRecord,
    RecordError,
    decode_record,
    encode_records,
)

#: Name of the index file in a job's log directory.
INDEX_NAME = "index"
#: Uncompressed size at which a gzip member is closed: bounds the work (and memory) of a random
#: read to about one member, while keeping the per-member overhead (18 bytes, a fresh dictionary)
#: negligible.
MEMBER_TARGET = 1 << 20
#: gzip level: 1 is several times faster than the default 6 and still shrinks text about 4x.
GZIP_LEVEL = 1
#: A stream whose last compressed member shrank less than this (compressed/raw) has its next
#: members stored uncompressed (still gzip): deflate level 1 runs at a quarter of its text speed
#: on incompressible data, for nothing.
_INCOMPRESSIBLE_RATIO = 0.9
#: While a stream is stored, every this many members is compressed again to notice a change.
_RETRY_COMPRESSION_EVERY = 16
#: The wbits value that makes zlib read and write the gzip container.
_GZIP_WBITS = 31
_FILE_MODE = 0o600
_IOV_MAX = 1024


class LogCorrupted(Exception):
    """A stored log's data does not match its index (not a torn tail: that is tolerated)."""


def stream_path(job_dir: Path, stream: int) -> Path:
    """Path of one stream's gzip file in a job's log directory."""
    return job_dir / f"{STREAM_NAMES[stream]}.log.gz"


def job_log_dir(logs_dir: Path, job_id: str) -> Path:
    """The log directory of a job.

    Raises:
        ValueError: ``job_id`` is not one safe path component (see ``core.ids``).
    """
    check_job_id(job_id, "job id for a log directory")
    return logs_dir / job_id


def delete_job_logs(logs_dir: Path, job_id: str) -> None:
    """Remove a job's stored log; nothing happens if it has none.

    Only the disk writer calls it, the one writer of log files, which closes the job's writer
    first (see :meth:`joblet.actors.diskwriter.DiskWriter.delete_job`).

    Raises:
        ValueError: ``job_id`` is not one safe path component (see ``core.ids``).
    """
    path = job_log_dir(logs_dir, job_id)
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass


def _pwrite_all(fd: int, parts: list[bytes], pos: int) -> None:
    """Write ``parts`` back to back at ``pos``: one syscall unless the kernel writes short."""
    total = sum(len(p) for p in parts)
    written = os.pwritev(fd, parts, pos) if len(parts) <= _IOV_MAX else 0
    if written == total:
        return
    rest = memoryview(b"".join(parts))[written:]
    pos += written
    while rest:
        n = os.pwrite(fd, rest, pos)
        rest = rest[n:]
        pos += n


class _Compressor:
    """Makes a stream's gzip members, storing them uncompressed while they do not compress."""

    def __init__(self) -> None:
        #: Members stored since the last compressed one; 0 while compressing.
        self.stored_run = 0

    def member(self, parts: list[bytes]) -> bytes:
        """One complete gzip member holding ``parts`` concatenated."""
        # One zlib call per member: zlib releases the GIL for the whole call, whereas a call per
        # part would have to win the GIL back from a busy event loop thread after every part.
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if 0 < self.stored_run < _RETRY_COMPRESSION_EVERY:
            self.stored_run += 1
            return zlib.compress(data, 0, _GZIP_WBITS)
        out = zlib.compress(data, GZIP_LEVEL, _GZIP_WBITS)
        incompressible = len(out) > _INCOMPRESSIBLE_RATIO * len(data) and len(data) > 4096
        self.stored_run = 1 if incompressible else 0
        return out


@attrs.define
class _OpenMember:
    """A gzip member being filled while a batch is laid out."""

    stream_offset: int
    parts: list[bytes] = attrs.Factory(list)
    size: int = 0
    records: list[dict[str, int]] = attrs.Factory(list)


class LogFileWriter:
    """Appends batches of chunks to a job's log directory (blocking; use from one thread at a time).

    If the directory already holds a log (a writer reopened after a failure or a restart), the
    writer continues it after discarding any torn tail.

    Args:
        job_dir: The job's log directory; created if missing.

    Owns three file descriptors, released by :meth:`close`.
    """

    def __init__(self, job_dir: Path) -> None:
        self.job_dir = job_dir
        job_dir.mkdir(parents=True, exist_ok=True)
        existing = LogFileReader(job_dir)
        existing.verify_tail()
        self._next_offset = existing.size()
        self._stream_offset = dict(existing.stream_sizes())
        self._file_size = dict(existing.file_extents())
        self._index_size = existing.record_count() * RECORD_SIZE
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        self._fds: dict[int, int] = {}
        try:
            for stream in STREAMS:
                self._fds[stream] = os.open(stream_path(job_dir, stream), flags, _FILE_MODE)
            self._index_fd = os.open(job_dir / INDEX_NAME, flags, _FILE_MODE)
        except BaseException:
            for fd in self._fds.values():
                os.close(fd)
            raise
        self._compressors = {s: _Compressor() for s in STREAMS}
        self._closed = False
        # Drop a torn tail so the next batch starts on a clean boundary.
        self._truncate()

    @property
    def size(self) -> int:
        """Merged bytes written so far."""
        return self._next_offset

    def append(self, chunks: Sequence[Chunk]) -> None:
        """Write a batch: one or more gzip members per stream it touches, then its index records.

        Either the whole batch is written or, if writing fails, the files are cut back to where
        they were, so the same batch can be retried.

        Args:
            chunks: In merged order, contiguous, starting at :attr:`size`.

        Raises:
            ValueError: The chunks are not contiguous with what was written, or the writer is
                closed.
            OSError: Writing failed (the files are restored to their previous state if possible).
        """
        if self._closed:
            raise ValueError("log writer is closed")
        if not chunks:
            return
        expected = self._next_offset
        for c in chunks:
            if c.offset != expected or c.stream not in STREAM_NAMES:
                raise ValueError(
                    f"chunk at merged offset {c.offset} (stream {c.stream}) does not continue "
                    f"the log at {expected}"
                )
            expected = c.end
        stream_offset = dict(self._stream_offset)
        file_size = dict(self._file_size)
        # A retried batch must produce the same bytes (a reader may have seen part of the failed
        # attempt), so the compressors' choices are rolled back with the files.
        stored_runs = {s: c.stored_run for s, c in self._compressors.items()}
        try:
            index, out = self._lay_out(chunks, stream_offset, file_size)
            for stream in STREAMS:
                if out[stream]:
                    _pwrite_all(self._fds[stream], out[stream], self._file_size[stream])
            _pwrite_all(self._index_fd, [index], self._index_size)
        except BaseException:
            for stream, run in stored_runs.items():
                self._compressors[stream].stored_run = run
            try:
                self._truncate()
            except OSError:
                pass  # the torn tail is dropped by the next writer or ignored by readers
            raise
        self._next_offset = expected
        self._stream_offset = stream_offset
        self._file_size = file_size
        self._index_size += len(index)

    def _lay_out(
        self, chunks: Sequence[Chunk], stream_offset: dict[int, int], file_size: dict[int, int]
    ) -> tuple[bytes, dict[int, list[bytes]]]:
        """Cut the batch into gzip members and index records.

        Advances ``stream_offset`` and ``file_size`` (copies owned by the caller).

        Returns:
            The index records' bytes, and each stream's members in file order.
        """
        out: dict[int, list[bytes]] = {s: [] for s in STREAMS}
        open_members: dict[int, _OpenMember] = {}
        records: list[dict[str, int]] = []

        def finish(stream: int) -> None:
            member = open_members.pop(stream)
            data = self._compressors[stream].member(member.parts)
            for r in member.records:
                r["member_file_offset"] = file_size[stream]
                r["member_length"] = len(data)
            file_size[stream] += len(data)
            out[stream].append(data)

        for c in chunks:
            if not c.data:
                continue
            member = open_members.get(c.stream)
            if member is not None and member.size >= MEMBER_TARGET:
                finish(c.stream)
                member = None
            if member is None:
                member = open_members[c.stream] = _OpenMember(stream_offset[c.stream])
            rec = {
                "merged_offset": c.offset,
                "stream": c.stream,
                "stream_offset": stream_offset[c.stream],
                "length": len(c.data),
                "ts_ns": c.ts_ns,
                "member_stream_offset": member.stream_offset,
            }
            member.parts.append(c.data)
            member.size += len(c.data)
            member.records.append(rec)
            records.append(rec)
            stream_offset[c.stream] += len(c.data)
        for stream in list(open_members):
            finish(stream)
        return encode_records([IndexRecord(**r) for r in records]), out

    def sync(self) -> None:
        """fsync every file (the log survives a power loss up to here)."""
        for fd in (*self._fds.values(), self._index_fd):
            os.fsync(fd)

    def close(self) -> None:
        """fsync and close the files; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.sync()
        finally:
            for fd in (*self._fds.values(), self._index_fd):
                os.close(fd)

    def _truncate(self) -> None:
        for stream, fd in self._fds.items():
            os.ftruncate(fd, self._file_size[stream])
        os.ftruncate(self._index_fd, self._index_size)


class LogFileReader:
    """Random access to a job's stored log by merged offset (blocking; thread-safe).

    The reader follows a log that is still being written: it re-reads the new part of the index
    when asked for an offset beyond what it knows. It trusts only index records that are complete,
    pass their checksum, continue the log without a gap and point inside the gzip files.

    It keeps the index (64 bytes per chunk) and the last decompressed member of each stream (at
    most about ``2 * MEMBER_TARGET`` bytes, see :meth:`drop_cache`) in memory, and holds no open
    files between calls.

    Args:
        job_dir: The job's log directory (it need not exist yet: the log is then empty).
    """

    def __init__(self, job_dir: Path) -> None:
        self.job_dir = job_dir
        self._lock = threading.Lock()
        self._raw = bytearray()
        self._offsets = array("Q")
        self._size = 0
        self._stream_size = dict.fromkeys(STREAMS, 0)
        self._extent = dict.fromkeys(STREAMS, 0)
        self._frozen = False
        self._cache: dict[int, tuple[int, bytes]] = {}

    def size(self) -> int:
        """Merged bytes stored and complete."""
        with self._lock:
            self._refresh()
            return self._size

    def record_count(self) -> int:
        """Number of valid index records known (after the last refresh)."""
        with self._lock:
            return len(self._offsets)

    def stream_sizes(self) -> dict[int, int]:
        """Bytes of each stream covered by the valid index (after the last refresh)."""
        with self._lock:
            return dict(self._stream_size)

    def file_extents(self) -> dict[int, int]:
        """Bytes of each gzip file the valid index refers to (after the last refresh)."""
        with self._lock:
            return dict(self._extent)

    def records(self) -> list[IndexRecord]:
        """Every valid index record, in merged order (e.g. for per-line timestamps)."""
        with self._lock:
            self._refresh()
            return [self._record(i) for i in range(len(self._offsets))]

    def read(self, offset: int, max_bytes: int) -> list[Chunk]:
        """Chunks of the merged log starting exactly at ``offset``, up to ``max_bytes`` in all.

        A chunk that ``offset`` (or the ``max_bytes`` limit) falls inside is split; each returned
        chunk keeps its stream and timestamp.

        Returns:
            Contiguous chunks, or ``[]`` when nothing is stored at ``offset`` yet.

        Raises:
            ValueError: ``offset`` is negative or ``max_bytes`` is not positive.
            LogCorrupted: A gzip member the index points to is damaged.
        """
        if offset < 0 or max_bytes <= 0:
            raise ValueError(f"bad read: offset {offset}, max_bytes {max_bytes}")
        with self._lock:
            if offset >= self._size:
                self._refresh()
            if offset >= self._size:
                return []
            i = bisect_right(self._offsets, offset) - 1
            out: list[Chunk] = []
            left = max_bytes
            while left > 0 and i < len(self._offsets):
                rec = self._record(i)
                member = self._member(rec)
                skip = offset - rec.merged_offset
                take = min(rec.length - skip, left)
                start = rec.offset_in_member + skip
                out.append(Chunk(offset, rec.stream, member[start : start + take], rec.ts_ns))
                offset += take
                left -= take
                i += 1
            return out

    def verify_tail(self) -> int:
        """Check the last gzip member of each stream and drop a damaged tail; freeze the reader.

        For a log that is no longer written (a finished job after a restart, or a writer
        continuing a log): a crash can leave index records whose member was never fully written,
        or a complete member whose index records were only partly written. Either way the batch
        was torn: this drops the member's records and every record after them, so the log is a
        prefix of whole members and ``zcat`` of each stream shows exactly the indexed bytes once
        a writer has cut the files back (see :class:`LogFileWriter`). The reader then stops
        looking for new records.

        Returns:
            The size of the valid log.
        """
        with self._lock:
            self._refresh()
            self._frozen = True
            while self._offsets:
                bad = None
                for stream in STREAMS:
                    last = self._last_of(stream)
                    if last is None:
                        continue
                    rec = self._record(last)
                    try:
                        whole = len(self._member(rec)) == rec.offset_in_member + rec.length
                    except LogCorrupted:
                        whole = False
                    if not whole:
                        # Cut at the first record of the torn member (a member holds
                        # consecutive chunks of one stream).
                        first = last
                        for j in range(last - 1, -1, -1):
                            prev = self._record(j)
                            if prev.stream != stream:
                                continue
                            if prev.member_file_offset != rec.member_file_offset:
                                break
                            first = j
                        bad = first if bad is None else min(bad, first)
                if bad is None:
                    break
                self._cut(bad)
            return self._size

    def drop_cache(self) -> None:
        """Forget the decompressed members kept for sequential reads."""
        with self._lock:
            self._cache.clear()

    # --- internals (called with the lock held) ---------------------------------------------

    def _record(self, i: int) -> IndexRecord:
        return decode_record(self._raw, i * RECORD_SIZE)

    def _last_of(self, stream: int) -> int | None:
        for i in range(len(self._offsets) - 1, -1, -1):
            if self._record(i).stream == stream:
                return i
        return None

    def _cut(self, count: int) -> None:
        """Keep only the first ``count`` records."""
        kept = [self._record(i) for i in range(count)]
        self._raw = self._raw[: count * RECORD_SIZE]
        self._offsets = self._offsets[:count]
        self._size = kept[-1].merged_end if kept else 0
        self._stream_size = dict.fromkeys(STREAMS, 0)
        self._extent = dict.fromkeys(STREAMS, 0)
        for rec in kept:
            self._stream_size[rec.stream] = rec.stream_offset + rec.length
            self._extent[rec.stream] = rec.member_file_offset + rec.member_length
        self._cache.clear()

    def _refresh(self) -> None:
        if self._frozen:
            return
        try:
            with open(self.job_dir / INDEX_NAME, "rb", buffering=0) as f:
                f.seek(len(self._raw))
                new = f.read()
        except FileNotFoundError:
            return
        if len(new) < RECORD_SIZE:
            return
        # Stat the data files after reading the index: a record found above was written after
        # its member, so a live log's member is already visible in the size read here.
        file_size = {}
        for stream in STREAMS:
            try:
                file_size[stream] = os.stat(stream_path(self.job_dir, stream)).st_size
            except FileNotFoundError:
                file_size[stream] = 0
        for pos in range(0, len(new) - RECORD_SIZE + 1, RECORD_SIZE):
            try:
                rec = decode_record(new, pos)
            except RecordError:
                break  # torn or not yet complete: maybe later, maybe never (crash)
            if (
                rec.merged_offset != self._size
                or rec.stream_offset != self._stream_size[rec.stream]
                or rec.member_file_offset + rec.member_length > file_size[rec.stream]
                or rec.length == 0
            ):
                break
            self._raw += new[pos : pos + RECORD_SIZE]
            self._offsets.append(rec.merged_offset)
            self._size += rec.length
            self._stream_size[rec.stream] += rec.length
            self._extent[rec.stream] = rec.member_file_offset + rec.member_length

    def _member(self, rec: IndexRecord) -> bytes:
        cached = self._cache.get(rec.stream)
        if cached is not None and cached[0] == rec.member_file_offset:
            data = cached[1]
        else:
            data = self._load_member(rec)
            self._cache[rec.stream] = (rec.member_file_offset, data)
        if rec.offset_in_member + rec.length > len(data):
            raise LogCorrupted(
                f"{STREAM_NAMES[rec.stream]} member at {rec.member_file_offset} in {self.job_dir} "
                f"is shorter than its index says"
            )
        return data

    def _load_member(self, rec: IndexRecord) -> bytes:
        path = stream_path(self.job_dir, rec.stream)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise LogCorrupted(f"log file missing: {path}") from e
        try:
            comp = os.pread(fd, rec.member_length, rec.member_file_offset)
        finally:
            os.close(fd)
        d = zlib.decompressobj(_GZIP_WBITS)
        try:
            data = d.decompress(comp)
        except zlib.error as e:
            raise LogCorrupted(f"damaged gzip member at {rec.member_file_offset} in {path}") from e
        if len(comp) != rec.member_length or not d.eof or d.unused_data:
            raise LogCorrupted(f"incomplete gzip member at {rec.member_file_offset} in {path}")
        return data
