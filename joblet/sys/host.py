"""Facts about the host that request validation needs, read once by the node."""

from __future__ import annotations

import os

from joblet.core.validate import HostFacts


def read_host_facts() -> HostFacts:
    """The host's total memory and the CPUs this process may use."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    return HostFacts(memory_mb=memory, cpus=frozenset(os.sched_getaffinity(0)))
