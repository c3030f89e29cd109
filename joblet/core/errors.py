"""Our own error hierarchy.

Every error a client can see is one of these. They are translated to gRPC status codes in exactly
one place (:mod:`joblet.rpc.errors`) and to one-line messages and exit codes in exactly one place
(the ``rnx`` CLI). Messages follow the spec's wording.
"""

from __future__ import annotations


class JobletError(Exception):
    """Base class of every error joblet reports to a client."""


class InvalidRequest(JobletError):
    """The request is malformed or out of range (gRPC INVALID_ARGUMENT)."""


class JobNotFound(JobletError):
    """No job has that id or id prefix (gRPC NOT_FOUND)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job not found: {job_id}")
        self.job_id = job_id


class AmbiguousJobId(InvalidRequest):
    """An id prefix matches more than one job."""

    def __init__(self, prefix: str, count: int) -> None:
        super().__init__(f"job id prefix is ambiguous: {prefix} (matches {count} jobs)")
        self.prefix = prefix


class JobNotRunning(JobletError):
    """The operation needs a running job (gRPC FAILED_PRECONDITION)."""

    def __init__(self, job_id: str, status: str) -> None:
        super().__init__(f"job is not running: {job_id} (current status: {status})")
        self.job_id = job_id
        self.status = status


class JobStillRunning(JobletError):
    """The operation needs a job that has ended (gRPC FAILED_PRECONDITION)."""

    def __init__(self, job_id: str, status: str) -> None:
        super().__init__(f"job is still running: {job_id} (current status: {status})")
        self.job_id = job_id
        self.status = status


class ResourceExhausted(JobletError):
    """A configured cap is reached, e.g. ``maxConcurrentJobs`` (gRPC RESOURCE_EXHAUSTED)."""


class Unauthenticated(JobletError):
    """The client presented no usable identity (gRPC UNAUTHENTICATED)."""


class PermissionDenied(JobletError):
    """The client's role may not perform the operation (gRPC PERMISSION_DENIED)."""


class StartFailed(JobletError):
    """A job could not be started (its setup failed before the command ran)."""


class ShuttingDown(JobletError):
    """The daemon is stopping and accepts no new jobs (gRPC UNAVAILABLE)."""
