"""The daemon's configuration model (no I/O).

The YAML file (``joblet-config.yml``) is parsed into these classes by :mod:`joblet.configfile`;
the spec's camelCase keys (``defaultCpuLimit``) map to these snake_case attributes. Durations are
seconds, sizes are bytes unless the name says otherwise.
"""

from __future__ import annotations

from pathlib import Path

import attrs

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


@attrs.frozen
class JobletSection:
    """The spec's ``joblet:`` section: job defaults and caps."""

    default_cpu_limit: int = 100
    default_memory_limit: int = 512
    default_io_limit: int = 0
    default_pids_limit: int = 1024
    max_concurrent_jobs: int = 100
    job_timeout: float = 3600.0
    cleanup_timeout: float = 5.0
    stop_grace_period: float = 0.1


@attrs.frozen
class GrpcSection:
    """The spec's ``grpc:`` section."""

    address: str = "0.0.0.0"
    port: int = 50051
    max_recv_msg_size: int = 524288
    max_send_msg_size: int = 4194304
    keep_alive_time: float = 30.0


@attrs.frozen
class SecuritySection:
    """Where the daemon's certificates are (relative paths are under the state directory)."""

    ca_cert: str = "certs/ca-cert.pem"
    server_cert: str = "certs/server-cert.pem"
    server_key: str = "certs/server-key.pem"


@attrs.frozen
class IsolationSection:
    """How jobs are isolated.

    Attributes:
        run_as_uid: The uid jobs run as; 0 (root) only when configured so.
        run_as_gid: The gid jobs run as.
        system_dirs: Host directories bind-mounted read-only into the job root.
        etc_files: Host files under /etc copied read-only into the job root (name resolution etc.).
        tmp_size_mb: Size of the job's private /tmp (tmpfs, charged to the job's memory limit).
        prestart: Stage-1 processes kept started and waiting for a job, so a job start skips
            their start-up (0 = start each one with its job).
    """

    run_as_uid: int = 65534
    run_as_gid: int = 65534
    system_dirs: tuple[str, ...] = DEFAULT_SYSTEM_DIRS
    etc_files: tuple[str, ...] = (
        "/etc/hosts",
        "/etc/resolv.conf",
        "/etc/nsswitch.conf",
        "/etc/localtime",
        "/etc/ld.so.cache",
    )
    tmp_size_mb: int = 64
    prestart: int = 2


@attrs.frozen
class CgroupSection:
    """cgroup driver choice: ``auto`` detects v2 or v1 at start-up."""

    driver: str = "auto"
    root: str = "/sys/fs/cgroup"
    parent: str = "joblet"


@attrs.frozen
class LogsSection:
    """Log buffering.

    Attributes:
        memory_budget: Bytes of log data held in memory for all jobs before it reaches disk; at
            the bound the daemon stops reading jobs' pipes (jobs block on write).
        window_bytes: Bytes of already-persisted log kept in memory per job for live readers.
        flush_interval: Longest time a log byte waits before it is written to disk.
        flush_bytes: Batch size that triggers a write before the interval ends.
    """

    memory_budget: int = 1 << 30
    window_bytes: int = 1 << 20
    flush_interval: float = 0.2
    flush_bytes: int = 4 << 20


@attrs.frozen
class MetricsSection:
    """Per-job resource metrics (GetJobMetrics; stored under ``<state>/metrics``).

    Attributes:
        interval: Time between two samples of a running job (one more is taken when it starts
            and one when it ends).
        enabled: Whether jobs are sampled at all.
    """

    interval: float = 5.0
    enabled: bool = True


@attrs.frozen
class PersistTlsSection:
    """``persist.server.tls``: the Persist Service on TCP with mutual TLS.

    Attributes:
        enabled: Also serve on ``tcp_address:tcp_port``, with the daemon's CA and server
            certificate (``security``) and the main service's roles (viewer and admin may query).
    """

    enabled: bool = False


@attrs.frozen
class PersistServerSection:
    """``persist.server``: where the Persist Service (historical queries) listens.

    Attributes:
        grpc_socket: Its Unix socket; relative paths are under the state directory. The socket
            is created with mode 0600: only the daemon's user (root) may connect, and whoever can
            connect may query every job.
        tcp_address: Address of the TCP listener (with ``tls.enabled``).
        tcp_port: Port of the TCP listener.
        tls: The TCP listener.
    """

    grpc_socket: str = "run/persist-grpc.sock"
    tcp_address: str = "0.0.0.0"
    tcp_port: int = 50052
    tls: PersistTlsSection = PersistTlsSection()


@attrs.frozen
class RetentionSection:
    """``persist.storage.retention``: how long the files of ended jobs are kept.

    Attributes:
        logs_days: Days a job's log is kept after the job ended (0 = forever).
        metrics_days: Days a job's metrics are kept after the job ended (0 = forever).
        cleanup_interval: Time between two clean-ups (the first runs at start-up).
    """

    logs_days: int = 30
    metrics_days: int = 90
    cleanup_interval: float = 86400.0


@attrs.frozen
class PersistStorageSection:
    """``persist.storage``: the spec's storage settings (local files only)."""

    retention: RetentionSection = RetentionSection()


@attrs.frozen
class PersistSection:
    """The spec's ``persist:`` section (its keys are snake_case, as the spec writes them)."""

    server: PersistServerSection = PersistServerSection()
    storage: PersistStorageSection = PersistStorageSection()


@attrs.frozen
class Config:
    """The whole daemon configuration."""

    state_dir: Path = Path("state")
    joblet: JobletSection = JobletSection()
    grpc: GrpcSection = GrpcSection()
    security: SecuritySection = SecuritySection()
    isolation: IsolationSection = IsolationSection()
    cgroup: CgroupSection = CgroupSection()
    logs: LogsSection = LogsSection()
    metrics: MetricsSection = MetricsSection()
    persist: PersistSection = PersistSection()

    def default_limits(self) -> Limits:
        """Limits a job gets for every value its request leaves unset."""
        j = self.joblet
        return Limits(
            cpu_percent=j.default_cpu_limit,
            memory_mb=j.default_memory_limit,
            io_bps=j.default_io_limit,
            pids_max=j.default_pids_limit,
        )
