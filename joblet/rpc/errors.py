"""Our errors as gRPC statuses: the one place where that translation happens.

:func:`status_for` turns whatever a request raised into the status the client sees. Our own
errors (:mod:`joblet.core.errors`) keep their message, which follows the spec's wording; anything
else is a bug or an unexpected system error: it is logged with its traceback and the client gets
INTERNAL with a reference to the log line, never the traceback itself.

A message is at most :data:`MAX_STATUS_MESSAGE` bytes: many quote what the client sent ("job not
found: <id>"), and a client may send half a megabyte.
"""

from __future__ import annotations

import secrets

from purerpc.grpclib.status import Status, StatusCode

from joblet import logfmt
from joblet.core.errors import (
    InvalidRequest,
    JobletError,
    JobNotFound,
    JobNotRunning,
    JobStillRunning,
    PermissionDenied,
    ResourceExhausted,
    ShuttingDown,
    Unauthenticated,
)

#: Longest status message sent, in UTF-8 bytes (longer ones are cut, saying so). It travels
#: percent-encoded in a trailer, up to three characters a byte, and clients refuse metadata of a
#: few KiB (grpcio: 8 KiB by default), so a longer one would leave the client without an answer.
MAX_STATUS_MESSAGE = 1024


class Unimplemented(JobletError):
    """The server does not implement the RPC (UNIMPLEMENTED).

    Args:
        method: The RPC's name.
        message: Why; by default the RPC is in the API but not implemented yet.
    """

    def __init__(self, method: str, *, message: str = "") -> None:
        super().__init__(f"{message}: {method}" if message else f"{method} is not implemented yet")
        self.method = method


class DeadlineExceeded(JobletError):
    """The client's deadline (``grpc-timeout``) passed before the answer was ready."""

    def __init__(self) -> None:
        super().__init__("deadline exceeded")


# Checked in order: the first matching class wins (AmbiguousJobId is an InvalidRequest).
_CODES: tuple[tuple[type[JobletError], StatusCode], ...] = (
    (InvalidRequest, StatusCode.INVALID_ARGUMENT),
    (JobNotFound, StatusCode.NOT_FOUND),
    (JobNotRunning, StatusCode.FAILED_PRECONDITION),
    (JobStillRunning, StatusCode.FAILED_PRECONDITION),
    (ResourceExhausted, StatusCode.RESOURCE_EXHAUSTED),
    (Unauthenticated, StatusCode.UNAUTHENTICATED),
    (PermissionDenied, StatusCode.PERMISSION_DENIED),
    (ShuttingDown, StatusCode.UNAVAILABLE),
    (Unimplemented, StatusCode.UNIMPLEMENTED),
    (DeadlineExceeded, StatusCode.DEADLINE_EXCEEDED),
)


def code_for(exc: BaseException) -> StatusCode:
    """The status code for one of our errors; INTERNAL for anything else."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return StatusCode.INTERNAL


def status_for(exc: Exception, method: str) -> Status:
    """The status a request that raised ``exc`` ends with.

    Our errors keep their message; an error we do not know is logged (ERROR, with its traceback)
    under a short reference that the client's message repeats.

    Args:
        exc: What the request raised (never a cancellation: that is not an answer).
        method: The RPC's name, for the log line.
    """
    code = code_for(exc)
    if isinstance(exc, JobletError):
        # Our own error, even one without a more specific code (StartFailed: INTERNAL), carries
        # a message meant for the client.
        return Status(code, status_message=bounded_message(str(exc)))
    ref = secrets.token_hex(4)
    logfmt.error(
        "request failed with an internal error",
        method=method,
        ref=ref,
        error=f"{type(exc).__name__}: {exc}",
        exc_info=True,
    )
    return Status(StatusCode.INTERNAL, status_message=f"internal error (server log ref={ref})")


def bounded_message(text: str, limit: int = MAX_STATUS_MESSAGE) -> str:
    """``text`` cut to ``limit`` UTF-8 bytes (between characters), ending with its full size."""
    data = text.encode("utf-8", "backslashreplace")
    if len(data) <= limit:
        return text
    suffix = f"... ({len(data)} bytes in all)"
    return data[: max(0, limit - len(suffix))].decode("utf-8", "ignore") + suffix
