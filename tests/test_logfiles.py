"""The persisted log files: layout, gzip compatibility, random access and crash tolerance.

Real files in ``tmp_path``; ``zcat`` is the real one. The module under test is blocking code
meant for a worker thread, so these tests are synchronous; the only thing that could hang, the
``zcat`` process, runs with a timeout.
"""

from __future__ import annotations

import errno
import os
import random
import resource
import signal
import subprocess
from pathlib import Path

import pytest

from joblet.core.chunks import STDERR, STDOUT, Chunk
from joblet.store.logfiles import (
    INDEX_NAME,
    MEMBER_TARGET,
    LogFileReader,
    LogFileWriter,
    delete_job_logs,
    stream_path,
)
from joblet.store.logindex import RECORD_SIZE


def make_chunks(seed: int, n: int, *, start: int = 0, big: bool = False) -> list[Chunk]:
    """Deterministic interleaved stdout/stderr chunks: text lines, some random bytes."""
    rng = random.Random(seed)
    chunks = []
    offset = start
    for i in range(n):
        stream = STDOUT if rng.random() < 0.7 else STDERR
        if big and i % 7 == 0:
            size = rng.randrange(MEMBER_TARGET // 2, MEMBER_TARGET)
        else:
            size = rng.randrange(1, 5000)
        if rng.random() < 0.2:
            data = rng.randbytes(size)
        else:
            line = b"%s line %d of chunk %d\n" % (b"out" if stream == STDOUT else b"err", i, seed)
            data = (line * (size // len(line) + 1))[:size]
        chunks.append(Chunk(offset, stream, data, ts_ns=1_700_000_000_000_000_000 + offset))
        offset += size
    return chunks


def write_batches(job_dir: Path, batches: list[list[Chunk]]) -> None:
    writer = LogFileWriter(job_dir)
    try:
        for batch in batches:
            writer.append(batch)
    finally:
        writer.close()


def merged(chunks: list[Chunk]) -> bytes:
    return b"".join(c.data for c in chunks)


def stream_bytes(chunks: list[Chunk], stream: int) -> bytes:
    return b"".join(c.data for c in chunks if c.stream == stream)


def read_all(reader: LogFileReader, offset: int = 0, max_bytes: int = 1 << 30) -> list[Chunk]:
    out: list[Chunk] = []
    while got := reader.read(offset, max_bytes):
        for c in got:
            assert c.offset == offset, "chunks must be contiguous"
            offset = c.end
        out.extend(got)
    return out


def zcat(path: Path) -> tuple[int, bytes]:
    proc = subprocess.run(["zcat", str(path)], capture_output=True, check=False, timeout=30)
    return proc.returncode, proc.stdout


def batches_of(chunks: list[Chunk], sizes: list[int]) -> list[list[Chunk]]:
    out, i = [], 0
    for n in sizes:
        out.append(chunks[i : i + n])
        i += n
    out.append(chunks[i:])
    return [b for b in out if b]


def test_layout_is_gzip_per_stream_and_zcat_prints_the_raw_output(tmp_path: Path) -> None:
    chunks = make_chunks(1, 300, big=True)
    write_batches(tmp_path, batches_of(chunks, [1, 50, 100]))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        INDEX_NAME,
        "stderr.log.gz",
        "stdout.log.gz",
    ]
    for stream in (STDOUT, STDERR):
        rc, out = zcat(stream_path(tmp_path, stream))
        assert rc == 0
        assert out == stream_bytes(chunks, stream)
    index_size = (tmp_path / INDEX_NAME).stat().st_size
    assert index_size == RECORD_SIZE * len(chunks)


def test_reader_recovers_the_merged_order_and_timestamps(tmp_path: Path) -> None:
    chunks = make_chunks(2, 400, big=True)
    write_batches(tmp_path, batches_of(chunks, [3, 7, 150, 1]))
    reader = LogFileReader(tmp_path)
    assert reader.size() == sum(len(c.data) for c in chunks)
    assert read_all(reader) == chunks  # same boundaries, streams and timestamps
    records = reader.records()
    assert [(r.merged_offset, r.stream, r.length, r.ts_ns) for r in records] == [
        (c.offset, c.stream, len(c.data), c.ts_ns) for c in chunks
    ]
    # Members are cut near MEMBER_TARGET, so a random read decompresses about one member.
    members = {(r.stream, r.member_file_offset) for r in records}
    assert len(members) > 10


def test_reads_resume_at_any_offset_without_loss_or_duplication(tmp_path: Path) -> None:
    chunks = make_chunks(3, 200, big=True)
    whole = merged(chunks)
    write_batches(tmp_path, batches_of(chunks, [20, 20, 20]))
    reader = LogFileReader(tmp_path)
    rng = random.Random(3)
    offsets = [0, 1, len(whole) - 1, chunks[5].offset, chunks[5].offset + 1]
    offsets += [rng.randrange(len(whole)) for _ in range(40)]
    for offset in offsets:
        max_bytes = rng.choice([1, 7, 4096, 65536, 1 << 30])
        first = reader.read(offset, max_bytes)
        assert first[0].offset == offset
        assert 0 < sum(len(c.data) for c in first) <= max_bytes
        end = sum(len(c.data) for c in first) + offset
        assert merged(first) == whole[offset:end]
        assert merged(read_all(reader, end, 65536)) == whole[end:]
    assert reader.read(len(whole), 10) == []
    with pytest.raises(ValueError):
        reader.read(-1, 10)


def test_split_chunks_keep_their_stream_and_timestamp(tmp_path: Path) -> None:
    chunks = [
        Chunk(0, STDOUT, b"hello\n", 10),
        Chunk(6, STDERR, b"oops\n", 20),
        Chunk(11, STDOUT, b"bye\n", 30),
    ]
    write_batches(tmp_path, [chunks])
    got = LogFileReader(tmp_path).read(3, 5)
    assert got == [Chunk(3, STDOUT, b"lo\n", 10), Chunk(6, STDERR, b"oo", 20)]


def test_a_log_being_written_is_read_as_it_grows(tmp_path: Path) -> None:
    chunks = make_chunks(4, 60)
    reader = LogFileReader(tmp_path / "job")  # the directory does not exist yet
    assert reader.size() == 0
    assert reader.read(0, 100) == []
    writer = LogFileWriter(tmp_path / "job")
    try:
        seen = 0
        for batch in batches_of(chunks, [10, 10, 10, 10, 10]):
            writer.append(batch)
            assert reader.size() == batch[-1].end
            got = read_all(reader, seen)
            assert got == [c for c in chunks if seen <= c.offset < batch[-1].end]
            seen = batch[-1].end
    finally:
        writer.close()


def test_a_torn_last_gzip_member_is_tolerated(tmp_path: Path) -> None:
    first = make_chunks(5, 50)
    second = make_chunks(6, 50, start=first[-1].end)
    write_batches(tmp_path, [first, second])
    # A crash cut the stdout file in the middle of the second batch's member.
    path = stream_path(tmp_path, STDOUT)
    first_stdout = len(stream_bytes(first, STDOUT))
    reader = LogFileReader(tmp_path)
    second_member = next(
        r.member_file_offset
        for r in reader.records()
        if r.stream == STDOUT and r.stream_offset >= first_stdout
    )
    os.truncate(path, second_member + 10)
    reader = LogFileReader(tmp_path)
    # The log ends where the damaged member's first chunk starts: a prefix, no gap.
    cut = next(c.offset for c in second if c.stream == STDOUT)
    assert reader.size() == cut
    assert merged(read_all(reader)) == merged(first + second)[:cut]
    # zcat still prints every complete member, then complains about the torn one.
    rc, out = zcat(path)
    assert rc != 0
    assert out.startswith(stream_bytes(first, STDOUT))


def test_a_torn_or_damaged_index_tail_is_tolerated(tmp_path: Path) -> None:
    chunks = make_chunks(7, 30)
    whole = merged(chunks)
    write_batches(tmp_path, [chunks])
    index = tmp_path / INDEX_NAME
    good = index.read_bytes()
    index.write_bytes(good + good[-RECORD_SIZE:][:20])  # torn trailing record
    assert merged(read_all(LogFileReader(tmp_path))) == whole
    index.write_bytes(good[: -RECORD_SIZE // 2])  # the last record cut in half
    assert LogFileReader(tmp_path).size() == chunks[-1].offset
    index.write_bytes(good[:-RECORD_SIZE] + bytes(RECORD_SIZE))  # zero-filled after a crash
    assert LogFileReader(tmp_path).size() == chunks[-1].offset
    assert merged(read_all(LogFileReader(tmp_path))) == whole[: chunks[-1].offset]


def test_verify_tail_drops_a_member_that_is_present_but_damaged(tmp_path: Path) -> None:
    first = make_chunks(8, 40)
    second = make_chunks(9, 40, start=first[-1].end)
    write_batches(tmp_path, [first, second])
    path = stream_path(tmp_path, STDERR)
    rec = [r for r in LogFileReader(tmp_path).records() if r.stream == STDERR][-1]
    with open(path, "r+b") as f:  # the member's bytes never reached the disk: zeros
        f.seek(rec.member_file_offset)
        f.write(bytes(rec.member_length))
    reader = LogFileReader(tmp_path)
    size = reader.verify_tail()
    # The damaged member's records go, and with them the rest of its batch: the stdout member
    # written with it would otherwise hold bytes the index no longer describes.
    cut = second[0].offset
    assert size == cut == reader.size()
    assert merged(read_all(reader)) == merged(first + second)[:cut]


def test_a_writer_continues_a_log_after_dropping_its_torn_tail(tmp_path: Path) -> None:
    first = make_chunks(10, 40)
    torn = make_chunks(11, 40, start=first[-1].end)
    write_batches(tmp_path, [first, torn])
    index = tmp_path / INDEX_NAME
    index.write_bytes(index.read_bytes()[: -RECORD_SIZE // 2])  # crash mid-record
    with stream_path(tmp_path, STDOUT).open("ab") as f:
        f.write(b"\x1f\x8b garbage of a torn member")
    writer = LogFileWriter(tmp_path)
    # A record of the second batch was torn, so the batch was: its members are dropped whole.
    assert writer.size == first[-1].end
    rest = make_chunks(12, 40, start=writer.size)
    writer.append(rest)
    writer.close()
    expected = first + rest
    assert read_all(LogFileReader(tmp_path)) == expected
    for stream in (STDOUT, STDERR):
        assert zcat(stream_path(tmp_path, stream)) == (0, stream_bytes(expected, stream))


def test_a_failed_batch_leaves_the_files_as_before_and_can_be_retried(tmp_path: Path) -> None:
    first = make_chunks(12, 30)
    second = make_chunks(13, 300, start=first[-1].end)
    writer = LogFileWriter(tmp_path)
    writer.append(first)
    sizes = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    # A real write failure: the file size limit (EFBIG once it is reached, like a full disk),
    # hit in the middle of the batch's stdout members.
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (sizes["stdout.log.gz"] + 1000, limit[1]))
    try:
        with pytest.raises(OSError) as failed:
            writer.append(second)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, xfsz)
    assert failed.value.errno == errno.EFBIG
    assert {p.name: p.stat().st_size for p in tmp_path.iterdir()} == sizes
    assert writer.size == first[-1].end
    with pytest.raises(ValueError, match="does not continue"):
        writer.append(second[1:])
    writer.append(second)
    writer.close()
    assert read_all(LogFileReader(tmp_path)) == first + second
    assert zcat(stream_path(tmp_path, STDOUT)) == (0, stream_bytes(first + second, STDOUT))


def test_incompressible_output_is_stored_and_still_gzip(tmp_path: Path) -> None:
    data = random.Random(14).randbytes(3 * MEMBER_TARGET)
    chunks = [Chunk(i, STDOUT, data[i : i + 65536], 0) for i in range(0, len(data), 65536)]
    write_batches(tmp_path, [chunks])
    path = stream_path(tmp_path, STDOUT)
    assert path.stat().st_size < len(data) * 1.01
    assert (zcat(path)) == (0, data)
    assert merged(read_all(LogFileReader(tmp_path), max_bytes=12345)) == data


def test_delete_job_logs(tmp_path: Path) -> None:
    write_batches(tmp_path / "job-1", [make_chunks(15, 5)])
    delete_job_logs(tmp_path, "job-1")
    assert not (tmp_path / "job-1").exists()
    delete_job_logs(tmp_path, "job-1")  # already gone: fine
    for bad in ("", ".", "..", "a/b"):
        with pytest.raises(ValueError):
            delete_job_logs(tmp_path, bad)
