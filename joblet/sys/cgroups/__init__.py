"""cgroup drivers: one interface, a cgroup v1 and a cgroup v2 backend, chosen at start-up.

Every job gets a group named exactly its id under the daemon's parent group (``cgroup.parent``,
``joblet`` by default): ``<root>/joblet/<id>`` on cgroup v2, and ``<root>/<hierarchy>/joblet/<id>``
in each used controller hierarchy on cgroup v1. The driver creates the groups and writes the limits;
the job's stage-1 helper joins them itself (it writes ``0``, itself, to every file that
:meth:`CgroupDriver.membership` names and checks ``/proc/self/cgroup``), so nothing the job runs
can start outside its limits.

No limit is ever silently dropped: a limit that needs a controller the host does not offer makes
:meth:`CgroupDriver.create` fail. Everything here is synchronous file I/O on cgroupfs (which does
not block), except what may wait: :meth:`CgroupDriver.kill_all` and :meth:`CgroupDriver.remove`
wait for the kernel (processes to die, a group to empty), so they are async.

The package: :mod:`~joblet.sys.cgroups.driver` (the interface, shared behaviour),
:mod:`~joblet.sys.cgroups.detect` (:func:`detect_driver`), :mod:`~joblet.sys.cgroups.v1` and
:mod:`~joblet.sys.cgroups.v2` (the backends), :mod:`~joblet.sys.cgroups.parse` (what the files'
texts say, as numbers, without I/O) and :mod:`~joblet.sys.cgroups.files` (reading, writing,
walking and removing on cgroupfs).
Everything the rest of the daemon uses is importable from here.

Example::

    driver = detect_driver(config.cgroup)
    driver.setup()
    driver.create(job_id, limits)
    spawn_stage1(membership=driver.membership(job_id))
    ...
    await driver.kill_all(job_id, timeout=5.0)
    oom = driver.oom_killed(job_id)
    await driver.remove(job_id)
"""

from joblet.sys.cgroups.detect import detect_driver
from joblet.sys.cgroups.driver import (
    CFS_PERIOD_US,
    DAEMON_LEAF,
    CgroupDriver,
    CgroupUnavailable,
)
from joblet.sys.cgroups.v1 import Hierarchy, V1Driver
from joblet.sys.cgroups.v2 import MEMORY_HIGH_PERCENT, V2Driver

__all__ = [
    "CFS_PERIOD_US",
    "DAEMON_LEAF",
    "MEMORY_HIGH_PERCENT",
    "CgroupDriver",
    "CgroupUnavailable",
    "Hierarchy",
    "V1Driver",
    "V2Driver",
    "detect_driver",
]
