"""The daemon's configuration model (no I/O).

Each attribute is declared once, with its key in ``joblet-config.yml``, its doc and its check
(:mod:`joblet.config.fields`); :mod:`joblet.config.file` reads the file into these classes. Keys are
camelCase as the spec writes them (``defaultCpuLimit``), except under ``persist:``, which the spec
writes in snake_case. Durations are :data:`~joblet.config.durations.Seconds`; sizes are bytes
unless the name says otherwise.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from joblet.config.checks import (
    absolute,
    absolute_paths,
    at_least,
    between,
    cgroup_name,
    not_empty,
    one_of,
    positive,
)
from joblet.config.durations import Seconds, positive_duration
from joblet.config.fields import OrOff, duration, section, setting
from joblet.config.layout import CERTS_DIR, DEFAULT_PERSIST_SOCKET, StateLayout
from joblet.core.model import Limits

#: System directories bind-mounted read-only into every job's root (those that exist on the host).
DEFAULT_SYSTEM_DIRS: tuple[str, ...] = (
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/usr",
    "/etc/alternatives",
    "/etc/ssl",
    "/etc/ca-certificates",
)
#: Host files under /etc copied read-only into every job's root (name resolution, time zone).
DEFAULT_ETC_FILES: tuple[str, ...] = (
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/localtime",
    "/etc/ld.so.cache",
)
#: cgroup drivers ``cgroup.driver`` may name.
CGROUP_DRIVERS = ("auto", "v1", "v2")
#: Most stage-1 processes ``isolation.prestart`` may keep waiting (each holds about 3 MB of its own
#: memory, 9 MB resident with the shared interpreter pages).
MAX_PRESTART = 64
_UID_MAX = (1 << 32) - 2  # (uid_t)-1 means "no change" to the kernel
_PORT = between(1, 65535)
#: Largest value HTTP/2 allows in a SETTINGS frame.
MAX_STREAMS = 2**31 - 1


@attrs.frozen
class JobletSection:
    """The spec's ``joblet:`` section: job defaults and caps."""

    default_cpu_limit: int = setting(
        100,
        key="defaultCpuLimit",
        doc="CPU limit of a job that sets none, percent of one core (0 = none).",
        check=at_least(0),
    )
    default_memory_limit: int = setting(
        512,
        key="defaultMemoryLimit",
        doc="Memory limit of a job that sets none, in MB (0 = none).",
        check=at_least(0),
    )
    default_io_limit: int = setting(
        0,
        key="defaultIoLimit",
        doc="I/O limit of a job that sets none, bytes per second (0 = none).",
        check=at_least(0),
    )
    default_pids_limit: int = setting(
        1024,
        key="defaultPidsLimit",
        doc="Most processes and threads a job may have (0 = no limit).",
        check=at_least(0),
    )
    max_concurrent_jobs: int = setting(
        100,
        key="maxConcurrentJobs",
        doc="Most jobs running at once (0 = no limit).",
        check=at_least(0),
    )
    job_timeout: Seconds = duration(
        3600.0,
        key="jobTimeout",
        doc="Longest a job may run before it is stopped.",
        check=positive_duration,
    )
    cleanup_timeout: Seconds = duration(
        5.0,
        key="cleanupTimeout",
        doc="Longest the daemon waits for a job's resources to be cleaned up.",
        check=positive_duration,
    )
    stop_grace_period: Seconds = duration(
        0.1,
        key="stopGracePeriod",
        doc="Time between SIGTERM and SIGKILL when a job is stopped.",
    )


@attrs.frozen
class GrpcSection:
    """The spec's ``grpc:`` section."""

    address: str = setting("0.0.0.0", key="address", doc="Address to listen on.", check=not_empty)
    port: int = setting(50051, key="port", doc="Port to listen on.", check=_PORT)
    max_recv_msg_size: int = setting(
        524288,
        key="maxRecvMsgSize",
        doc="Largest message the server accepts, bytes.",
        check=positive,
    )
    max_send_msg_size: int = setting(
        4194304,
        key="maxSendMsgSize",
        doc="Largest message the server sends, bytes.",
        check=positive,
    )
    keep_alive_time: Seconds = duration(
        30.0,
        key="keepAliveTime",
        doc="Interval of keep-alive pings on idle connections.",
        check=positive_duration,
    )
    handshake_timeout: Seconds = duration(
        10.0,
        key="handshakeTimeout",
        doc="Longest a new connection may take to complete its TLS handshake and send\n"
        "the HTTP/2 preface; then it is closed.",
        check=positive_duration,
    )
    idle_timeout: Seconds = duration(
        300.0,
        key="idleTimeout",
        doc="A connection with no call in flight for this long is closed (GOAWAY;\n"
        "clients reconnect for their next call).",
        check=positive_duration,
    )
    max_concurrent_streams: int = setting(
        100,
        key="maxConcurrentStreams",
        doc="Most calls in flight on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS;\n"
        "a stream above it is refused).",
        check=between(1, MAX_STREAMS),
    )
    max_connections: int = setting(
        512,
        key="maxConnections",
        doc="Most connections open at once; one more is closed at once.",
        check=positive,
    )
    max_connections_per_client: int = setting(
        64,
        key="maxConnectionsPerClient",
        doc="Most connections open at once with one client certificate (by its subject).",
        check=positive,
    )
    max_handshakes_per_address: int = setting(
        32,
        key="maxHandshakesPerAddress",
        doc="Most connections from one client address that have not completed\n"
        "their TLS handshake yet.",
        check=positive,
    )


@attrs.frozen
class SecuritySection:
    """Where the daemon's certificates are (relative paths are under the state directory)."""

    ca_cert: str = setting(
        f"{CERTS_DIR}/ca-cert.pem",
        key="caCert",
        doc="CA certificate that client certificates must be issued by.",
        check=not_empty,
    )
    server_cert: str = setting(
        f"{CERTS_DIR}/server-cert.pem",
        key="serverCert",
        doc="The server's certificate.",
        check=not_empty,
    )
    server_key: str = setting(
        f"{CERTS_DIR}/server-key.pem",
        key="serverKey",
        doc="The server's private key.",
        check=not_empty,
    )


@attrs.frozen
class IsolationSection:
    """How jobs are isolated.

    ``tmp_size_mb`` is a tmpfs, charged to the job's memory limit; each ``prestart`` process is a
    stage 1 kept started and waiting for a job, so a job start skips its start-up.
    """

    run_as_uid: int = setting(
        65534,
        key="runAsUid",
        doc="uid jobs run as (0 = root, only if you mean it).",
        check=between(0, _UID_MAX),
    )
    run_as_gid: int = setting(
        65534, key="runAsGid", doc="gid jobs run as.", check=between(0, _UID_MAX)
    )
    system_dirs: tuple[str, ...] = setting(
        DEFAULT_SYSTEM_DIRS,
        key="systemDirs",
        doc="Host directories bind-mounted read-only into every job's root.",
        check=absolute_paths,
    )
    etc_files: tuple[str, ...] = setting(
        DEFAULT_ETC_FILES,
        key="etcFiles",
        doc="Host files copied read-only into the job's /etc.",
        check=absolute_paths,
    )
    tmp_size_mb: int = setting(
        64,
        key="tmpSizeMb",
        doc="Size of each job's private /tmp in MB (counts against its memory).",
        check=positive,
    )
    prestart: int = setting(
        2,
        key="prestart",
        doc="Job helper processes kept started ahead, for faster job starts\n"
        "(0 = start each with its job).",
        check=between(0, MAX_PRESTART),
    )
    seccomp: OrOff = setting(
        "default",
        key="seccomp",
        doc="Syscall filter of every job: default (joblet's profile), off, or the path\n"
        "of a profile in Docker's seccomp JSON format.",
        check=not_empty,
    )
    landlock: bool = setting(
        True,
        key="landlock",
        doc="Confine each job's writes to its own writable paths with Landlock\n"
        "(where the kernel has it; ignored where it does not).",
    )
    max_open_files: int = setting(
        4096,
        key="maxOpenFiles",
        doc="Open files a job may have (RLIMIT_NOFILE, soft and hard).",
        check=between(16, 1 << 20),
    )


@attrs.frozen
class CgroupSection:
    """cgroup driver choice: ``auto`` detects v2 or v1 at start-up."""

    driver: str = setting(
        "auto", key="driver", doc="auto (detect), v1 or v2.", check=one_of(*CGROUP_DRIVERS)
    )
    root: str = setting(
        "/sys/fs/cgroup",
        key="root",
        doc="Where the cgroup filesystems are mounted.",
        check=absolute,
    )
    parent: str = setting(
        "joblet",
        key="parent",
        doc="Name of joblet's group under the root; each job gets a group inside it.",
        check=cgroup_name,
    )


@attrs.frozen
class LogsSection:
    """Log buffering.

    At ``memory_budget`` the daemon stops reading jobs' pipes, so jobs block on write; the
    ``window_bytes`` of each job are already on disk and kept for live readers.
    """

    memory_budget: int = setting(
        1 << 30,
        key="memoryBudget",
        doc="Bytes of job output held in memory for all jobs before it is written;\n"
        "at the bound jobs block on write.",
        check=positive,
    )
    window_bytes: int = setting(
        1 << 20,
        key="windowBytes",
        doc="Bytes of already-written output kept in memory per job for live readers.",
        check=at_least(0),
    )
    flush_interval: Seconds = duration(
        0.2,
        key="flushInterval",
        doc="Longest time output waits in memory before it is written.",
        check=positive_duration,
    )
    flush_bytes: int = setting(
        4 << 20,
        key="flushBytes",
        doc="Batch size that triggers a write before flushInterval ends.",
        check=positive,
    )


@attrs.frozen
class MetricsSection:
    """Per-job resource metrics (GetJobMetrics; stored under ``<state>/metrics``)."""

    interval: Seconds = duration(
        5.0,
        key="interval",
        doc="Time between samples of a running job (and one at its start and end).",
        check=positive_duration,
    )
    enabled: bool = setting(True, key="enabled", doc="Whether jobs are sampled at all.")


@attrs.frozen
class PersistTlsSection:
    """``persist.server.tls``: the Persist Service on TCP with mutual TLS.

    It uses the daemon's CA and server certificate (``security``) and the main service's roles.
    """

    enabled: bool = setting(
        False, key="enabled", doc="Also serve on TCP (viewer and admin clients may query)."
    )


@attrs.frozen
class PersistServerSection:
    """``persist.server``: where the Persist Service (historical queries) listens.

    Whoever can connect to the Unix socket may query every job; hence mode 0600.
    """

    grpc_socket: str = setting(
        DEFAULT_PERSIST_SOCKET,
        key="grpc_socket",
        doc="Its Unix socket (mode 0600: the daemon's user only);\n"
        "relative paths are under stateDir.",
        check=not_empty,
    )
    tcp_address: str = setting(
        "0.0.0.0",
        key="tcp_address",
        doc="Address of the TCP listener (with tls.enabled).",
        check=not_empty,
    )
    tcp_port: int = setting(
        50052, key="tcp_port", doc="Port of the TCP listener (with tls.enabled).", check=_PORT
    )
    tls: PersistTlsSection = section(
        PersistTlsSection,
        key="tls",
        doc="The TCP listener: mutual TLS with the certificates of security.",
    )


@attrs.frozen
class RetentionSection:
    """``persist.storage.retention``: how long the files of ended jobs are kept."""

    logs_days: int = setting(
        30,
        key="logs_days",
        doc="Days a job's log is kept after it ended (0 = forever).",
        check=at_least(0),
    )
    metrics_days: int = setting(
        90,
        key="metrics_days",
        doc="Days a job's metrics are kept after it ended\n(0 = forever).",
        check=at_least(0),
    )
    cleanup_interval: Seconds = duration(
        86400.0,
        key="cleanup_interval",
        doc="Time between clean-ups (one at start-up).",
        check=positive_duration,
    )


@attrs.frozen
class PersistStorageSection:
    """``persist.storage``: the spec's storage settings (local files only)."""

    retention: RetentionSection = section(
        RetentionSection, key="retention", doc="How long the files of ended jobs are kept."
    )


@attrs.frozen
class PersistSection:
    """The spec's ``persist:`` section (its keys are snake_case, as the spec writes them)."""

    server: PersistServerSection = section(
        PersistServerSection, key="server", doc="Where the Persist Service listens."
    )
    storage: PersistStorageSection = section(
        PersistStorageSection, key="storage", doc="Persisted job data."
    )


@attrs.frozen
class Config:
    """The whole daemon configuration."""

    state_dir: Path = setting(
        Path("state"),
        key="stateDir",
        doc="Directory of the daemon's state: jobs, logs and (by default) certificates.",
    )
    joblet: JobletSection = section(
        JobletSection, key="joblet", doc="Job defaults and caps (the spec's section)."
    )
    grpc: GrpcSection = section(
        GrpcSection, key="grpc", doc="The gRPC server (the spec's section)."
    )
    security: SecuritySection = section(
        SecuritySection, key="security", doc="TLS files; relative paths are under stateDir."
    )
    isolation: IsolationSection = section(
        IsolationSection, key="isolation", doc="How jobs are isolated."
    )
    cgroup: CgroupSection = section(
        CgroupSection, key="cgroup", doc="cgroup hierarchy used for limits."
    )
    logs: LogsSection = section(LogsSection, key="logs", doc="Job output buffering.")
    metrics: MetricsSection = section(
        MetricsSection,
        key="metrics",
        doc="Per-job resource metrics (GetJobMetrics), stored under stateDir/metrics.",
    )
    persist: PersistSection = section(
        PersistSection,
        key="persist",
        doc="The Persist Service: historical log and metric queries, retention (spec keys).",
    )

    @property
    def layout(self) -> StateLayout:
        """The paths under :attr:`state_dir` (with the Persist Service's socket setting)."""
        return StateLayout(self.state_dir, self.persist.server.grpc_socket)

    def default_limits(self) -> Limits:
        """Limits a job gets for every value its request leaves unset."""
        j = self.joblet
        return Limits(
            cpu_percent=j.default_cpu_limit,
            memory_mb=j.default_memory_limit,
            io_bps=j.default_io_limit,
            pids_max=j.default_pids_limit,
        )
