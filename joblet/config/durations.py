"""Durations: the :data:`Seconds` type, its parser and its shortest spelling.

A duration in the file is ``"1h"``, ``"30s"``, ``"500ms"``, ``"1h30m"`` (Go's units: h, m, s, ms,
us, ns) or a number of seconds; in code it is a number of seconds. Only attributes typed
:data:`Seconds` are durations: another ``float`` is not parsed this way.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Final

from joblet.config.checks import show


class _SecondsMarker:
    """Marks ``Annotated[float, ...]`` as a duration, for the file's converter and its dump."""

    def __repr__(self) -> str:
        return "seconds"


#: The marker inside :data:`Seconds`.
SECONDS: Final = _SecondsMarker()

#: A duration, in seconds. To type checkers it is a ``float``; the configuration file's converter
#: (and ``joblet config print``) tell it from other numbers by its marker.
Seconds = Annotated[float, SECONDS]

_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ms|us|µs|ns|h|m|s)")
_DURATION = re.compile(r"(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:ms|us|µs|ns|h|m|s))+")


def is_seconds(type_: object) -> bool:
    """Whether an attribute's (resolved) type is :data:`Seconds`."""
    return SECONDS in getattr(type_, "__metadata__", ())


def parse_duration(value: object) -> float:
    """Seconds in a duration: a number (seconds) or a string such as ``"1h30m"`` or ``"500ms"``.

    It is also the converter of every :data:`Seconds` attribute, so ``LogsSection(
    flush_interval=1)`` holds ``1.0``.

    Raises:
        ValueError: ``value`` is not a duration (``invalid duration 'abc'``) or is negative.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"invalid duration {show(value)}")
    if isinstance(value, str):
        text = value.strip()
        if _NUMBER.fullmatch(text):
            seconds = float(text)
        elif text and _DURATION.fullmatch(text):
            seconds = sum(float(num) * _UNITS[unit] for num, unit in _DURATION_PART.findall(text))
        else:
            raise ValueError(f"invalid duration {show(value)}")
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {show(value)}")
    if seconds < 0:
        raise ValueError(f"must not be negative (got {show(value)})")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest duration string for ``seconds``: ``3600`` is ``"1h"``, ``0.1`` ``"100ms"``."""
    ms = round(seconds * 1000)
    if seconds < 0 or not math.isclose(ms, seconds * 1000, abs_tol=1e-6):
        return repr(seconds)
    if ms == 0:
        return "0s"
    parts = []
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        count, ms = divmod(ms, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def positive_duration(value: float) -> None:
    """Check: the duration is more than zero (``must be positive (got 0s)``)."""
    if value <= 0:
        raise ValueError(f"must be positive (got {format_duration(value)})")
