"""The daemon's own log lines, in the spec's format.

``[2024-01-15T10:30:00Z] [INFO] job started successfully | jobId=... pid=12345 command="..."``
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

_LOGGER = logging.getLogger("joblet")


def _value(v: Any) -> str:
    s = str(v)
    if not s or any(c in s for c in ' "=|') or not s.isprintable():
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


class SpecFormatter(logging.Formatter):
    """Formats records as ``[time] [LEVEL] message | key=value ...`` (UTC, RFC 3339)."""

    def format(self, record: logging.LogRecord) -> str:
        """Format one record."""
        ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        fields: dict[str, Any] = getattr(record, "fields", {})
        line = f"[{ts}] [{record.levelname}] {record.getMessage()}"
        if fields:
            line += " | " + " ".join(f"{k}={_value(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(level: int = logging.INFO) -> None:
    """Send the daemon's log lines to stderr in the spec's format."""
    logging.addLevelName(logging.WARNING, "WARN")  # the spec's level names
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SpecFormatter())
    _LOGGER.handlers[:] = [handler]
    _LOGGER.setLevel(level)
    _LOGGER.propagate = False


def event(level: int, message: str, *, exc_info: bool = False, **fields: Any) -> None:
    """Log one event with structured fields."""
    _LOGGER.log(level, message, extra={"fields": fields}, exc_info=exc_info)


def info(message: str, **fields: Any) -> None:
    """Log an INFO event."""
    event(logging.INFO, message, **fields)


def warn(message: str, **fields: Any) -> None:
    """Log a WARN event."""
    event(logging.WARNING, message, **fields)


def error(message: str, *, exc_info: bool = False, **fields: Any) -> None:
    """Log an ERROR event."""
    event(logging.ERROR, message, exc_info=exc_info, **fields)


def debug(message: str, **fields: Any) -> None:
    """Log a DEBUG event."""
    event(logging.DEBUG, message, **fields)
