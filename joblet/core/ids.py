"""Job ids: making one, checking one before it names a file or a group, and resolving a prefix.

Every job id is a UUIDv4 made by :func:`new_job_id`. Ids also come back from clients and from
disk (directory names, database rows), and become directory and cgroup names, so
:func:`check_job_id` is the one check that an id is a single safe path component. Clients may
name a job by any unique prefix of its id; :func:`resolve_prefix` is the one resolver, used by the
engine and the Persist Service alike.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable

from joblet.core.errors import AmbiguousJobId, JobNotFound

# One path component: no separator, no NUL, not "." or "..", nothing a shell or a cgroup
# file system would read specially (a leading dot or dash).
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def new_job_id() -> str:
    """A fresh job id (a UUIDv4 in its canonical text form)."""
    return str(uuid.uuid4())


def is_job_id(text: str) -> bool:
    """Whether ``text`` can be a job id, i.e. is one safe path component."""
    return _JOB_ID.fullmatch(text) is not None


def check_job_id(text: str, what: str = "job id") -> str:
    """``text``, checked to be one safe path component (a directory or cgroup name).

    Args:
        text: The id.
        what: How the error names it (e.g. "job id for a log directory").

    Raises:
        ValueError: It is not (empty, ``.``/``..``, a separator, a NUL byte, a leading dot or
            dash, other characters than letters, digits, ``.``, ``_`` and ``-``).
    """
    if not is_job_id(text):
        raise ValueError(f"invalid {what}: {text!r}")
    return text


def resolve_prefix(ref: str, ids: Iterable[str]) -> str:
    """The one id in ``ids`` that equals ``ref`` or starts with it.

    Args:
        ref: A whole id or a prefix a client gave.
        ids: Every id that may be meant (a set makes the exact match O(1)).

    Raises:
        JobNotFound: None matches (also for an empty ``ref``).
        AmbiguousJobId: More than one starts with ``ref``.
    """
    pool = ids if isinstance(ids, set | frozenset | dict) else set(ids)
    if ref in pool:
        return ref  # an exact id wins over longer ids it is a prefix of
    if not ref:
        raise JobNotFound(ref)
    matches = sorted(i for i in pool if i.startswith(ref))
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise AmbiguousJobId(ref, len(matches))
    raise JobNotFound(ref)
