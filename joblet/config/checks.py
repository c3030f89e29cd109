"""Checks of configuration values, declared next to the attribute they check.

A check is a function of the (converted) value that raises :class:`ValueError` with the problem,
worded for the user: ``must be between 1 and 65535 (got 0)``. The file's converter prefixes it
with the key's path (``grpc.port: ...``), an attrs validator with the attribute
(``GrpcSection.port: ...``), so a ``Config`` built in code is held to the same rules as the file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

#: A check of one value (see the module docstring).
Check = Callable[[Any], None]


class ElementError(ValueError):
    """A problem in one element of a value: ``suffix`` is appended to the key path (``[2]``)."""

    def __init__(self, suffix: str, message: str) -> None:
        super().__init__(message)
        self.suffix = suffix


def show(value: object) -> str:
    """A value roughly as the user wrote it: strings quoted, YAML's null, true and false."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return str(value)


def at_least(low: int) -> Check:
    """Check: ``value >= low`` (``must not be negative`` for 0)."""

    def check(value: int) -> None:
        if value < low:
            bound = "negative" if low == 0 else f"less than {low}"
            raise ValueError(f"must not be {bound} (got {value})")

    return check


def positive(value: int) -> None:
    """Check: more than zero."""
    if value <= 0:
        raise ValueError(f"must be positive (got {value})")


def between(low: int, high: int) -> Check:
    """Check: ``low <= value <= high``."""

    def check(value: int) -> None:
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high} (got {value})")

    return check


def not_empty(value: str) -> None:
    """Check: not the empty string."""
    if not value:
        raise ValueError("must not be empty")


def one_of(*choices: str) -> Check:
    """Check: one of ``choices`` (case matters)."""

    def check(value: str) -> None:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)} (got {value!r})")

    return check


def absolute(value: str) -> None:
    """Check: an absolute path."""
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path (got {value!r})")


def absolute_paths(values: tuple[str, ...]) -> None:
    """Check: every element is an absolute path (the problem names the element)."""
    for i, value in enumerate(values):
        if not value.startswith("/"):
            raise ElementError(f"[{i}]", f"must be an absolute path (got {value!r})")


def cgroup_name(value: str) -> None:
    """Check: a relative cgroup path that stays below its root (no ``..``, no ``.``)."""
    parts = PurePosixPath(value).parts
    if not value or value.startswith("/") or ".." in parts or "." in value.split("/"):
        raise ValueError(f"must be a relative cgroup name such as 'joblet' (got {value!r})")
