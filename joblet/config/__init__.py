"""The daemon's configuration: the model, the file that fills it, the state directory's layout.

- :mod:`joblet.config.model`: the sections and :class:`Config`, each attribute declared once with
  its file key, doc and check (:mod:`joblet.config.fields`, :mod:`joblet.config.checks`).
- :mod:`joblet.config.durations`: the :data:`Seconds` type and the ``"1h30m"`` spelling.
- :mod:`joblet.config.file`: reading ``joblet-config.yml`` (YAML, a private cattrs converter) and
  ``joblet config print``.
- :mod:`joblet.config.layout`: every path under the state directory.
"""

from joblet.config.durations import Seconds, format_duration, parse_duration
from joblet.config.file import ConfigError, dump_default_config, load_config
from joblet.config.layout import StateLayout
from joblet.config.model import (
    CGROUP_DRIVERS,
    DEFAULT_ETC_FILES,
    DEFAULT_SYSTEM_DIRS,
    MAX_PRESTART,
    CgroupSection,
    Config,
    GrpcSection,
    IsolationSection,
    JobletSection,
    LogsSection,
    MetricsSection,
    PersistSection,
    PersistServerSection,
    PersistStorageSection,
    PersistTlsSection,
    RetentionSection,
    SecuritySection,
)

__all__ = [
    "CGROUP_DRIVERS",
    "DEFAULT_ETC_FILES",
    "DEFAULT_SYSTEM_DIRS",
    "MAX_PRESTART",
    "CgroupSection",
    "Config",
    "ConfigError",
    "GrpcSection",
    "IsolationSection",
    "JobletSection",
    "LogsSection",
    "MetricsSection",
    "PersistSection",
    "PersistServerSection",
    "PersistStorageSection",
    "PersistTlsSection",
    "RetentionSection",
    "Seconds",
    "SecuritySection",
    "StateLayout",
    "dump_default_config",
    "format_duration",
    "load_config",
    "parse_duration",
]
