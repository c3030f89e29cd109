"""CPU lists as the kernel writes them (``"0-2,4"``): one parser and one formatter.

A job's ``cpuCores`` and the kernel's cpuset files (``cpuset.cpus``, ``cpuset.cpus.effective``,
``/sys/devices/system/cpu/online``) use the same syntax: comma-separated CPU numbers and
inclusive ranges. The parser is strict (ASCII digits only, no blanks): kernel text is stripped of
its newline by the caller.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_CPU_LIST = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*", re.ASCII)


class CpuListError(ValueError):
    """A text that is not a CPU list.

    Attributes:
        text: The text.
        problem: What is wrong with it, e.g. ``"range 2-1 is backwards"``.
    """

    def __init__(self, text: str, problem: str) -> None:
        super().__init__(f"invalid cpu list {text!r} ({problem})")
        self.text = text
        self.problem = problem


def parse_cpu_list(text: str) -> set[int]:
    """The CPUs a list such as ``"0-2,4"`` names (here ``{0, 1, 2, 4}``).

    Raises:
        CpuListError: The text is not a CPU list (a :class:`ValueError`).
    """
    if not _CPU_LIST.fullmatch(text):
        raise CpuListError(text, "expected e.g. '0-1' or '0,2'")
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if last < first:
            raise CpuListError(text, f"range {part} is backwards")
        cpus.update(range(first, last + 1))
    return cpus


def format_cpu_list(cpus: Iterable[int]) -> str:
    """Format CPUs the kernel's way (``{0, 1, 2, 4}`` -> ``"0-2,4"``)."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and ranges[-1][1] == cpu - 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)
