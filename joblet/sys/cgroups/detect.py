"""Choosing the cgroup driver for this host at start-up (the backends import the interface;
this module imports both)."""

from __future__ import annotations

from joblet.config import CgroupSection
from joblet.sys.cgroups.driver import CgroupDriver, CgroupUnavailable, check_parent
from joblet.sys.cgroups.v1 import V1Driver
from joblet.sys.cgroups.v2 import V2Driver


def detect_driver(cfg: CgroupSection) -> CgroupDriver:
    """Pick the cgroup driver for this host.

    ``auto`` takes cgroup v2 when ``<root>/cgroup.controllers`` offers cpu, memory and pids, else
    cgroup v1 when its hierarchies are mounted under ``<root>``; ``v1`` and ``v2`` force a driver
    (and fail if the host does not have it).

    Args:
        cfg: The ``cgroup`` config section.

    Returns:
        A driver; call :meth:`CgroupDriver.setup` before creating job groups.

    Raises:
        CgroupUnavailable: The requested driver (or, for ``auto``, neither) can work on this host,
            or ``cfg.driver`` is not one of auto, v1, v2.
    """
    check_parent(cfg.parent)
    if cfg.driver == "v2":
        return V2Driver.probe(cfg)
    if cfg.driver == "v1":
        return V1Driver.probe(cfg)
    if cfg.driver != "auto":
        raise CgroupUnavailable(f"invalid cgroup.driver {cfg.driver!r}: expected auto, v1 or v2")
    try:
        return V2Driver.probe(cfg)
    except CgroupUnavailable as v2_error:
        try:
            return V1Driver.probe(cfg)
        except CgroupUnavailable as v1_error:
            raise CgroupUnavailable(
                f"no usable cgroup hierarchy under {cfg.root}: {v2_error}; {v1_error}"
            ) from None
