"""A job's log as data: its two streams and the chunk, the unit every part of the log works in.

A job's log is one *merged* byte stream: stdout and stderr chunks in arrival order. Each chunk
knows its offset in the merged stream, which stream it came from and when it arrived. How chunks
are laid out on disk is :mod:`joblet.store.logindex`'s business.
"""

from __future__ import annotations

import attrs

#: Stream id of the job's standard output.
STDOUT = 1
#: Stream id of the job's standard error.
STDERR = 2
#: Every stream id, in file-name order.
STREAMS: tuple[int, ...] = (STDOUT, STDERR)
#: File name prefix of each stream's gzip file (``<name>.log.gz``).
STREAM_NAMES: dict[int, str] = {STDOUT: "stdout", STDERR: "stderr"}


@attrs.frozen
class Chunk:
    """A contiguous piece of one stream's output, placed in the merged log.

    Attributes:
        offset: Offset of the first byte in the merged (stdout + stderr) stream.
        stream: :data:`STDOUT` or :data:`STDERR`.
        data: The bytes, exactly as the job wrote them.
        ts_ns: When the daemon read them, in ns since the Unix epoch.
    """

    offset: int
    stream: int
    data: bytes
    ts_ns: int

    @property
    def end(self) -> int:
        """Merged offset just past the last byte."""
        return self.offset + len(self.data)
