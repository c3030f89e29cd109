"""The configuration file: defaults, every key, and errors that name the key and the problem."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
import yaml

from joblet.config import (
    CgroupSection,
    Config,
    ConfigError,
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
    StateLayout,
    dump_default_config,
    format_duration,
    load_config,
    parse_duration,
)
from joblet.config.durations import is_seconds
from joblet.config.fields import setting_of


def _load(tmp_path: Path, text: str, **overrides: object) -> Config:
    path = tmp_path / "joblet-config.yml"
    path.write_text(textwrap.dedent(text))
    return load_config(path, overrides=overrides or None)


def _problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    return info.value.problems


# --- defaults and every key -----------------------------------------------------------------------


def test_no_file_gives_the_defaults() -> None:
    assert load_config(None) == Config()


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_file_gives_the_defaults(tmp_path: Path, text: str) -> None:
    assert _load(tmp_path, text) == Config()


def test_empty_sections_give_the_defaults(tmp_path: Path) -> None:
    assert _load(tmp_path, "joblet:\ngrpc: {}\nlogs:\n") == Config()


def test_the_spec_example_loads(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        """
        joblet:
          defaultCpuLimit: 100        # Default CPU percentage
          defaultMemoryLimit: 512     # Default memory in MB
          defaultIoLimit: 0           # Default I/O limit (0=unlimited)
          maxConcurrentJobs: 100      # Maximum concurrent jobs
          jobTimeout: "1h"            # Maximum job runtime
          cleanupTimeout: "5s"        # Resource cleanup timeout

        grpc:
          maxRecvMsgSize: 524288      # 512KB max receive message
          maxSendMsgSize: 4194304     # 4MB max send message
          keepAliveTime: "30s"        # Connection keep-alive
        """,
    )
    assert config == Config()


def test_every_key(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        """
        stateDir: /var/lib/joblet
        joblet:
          defaultCpuLimit: 50
          defaultMemoryLimit: 256
          defaultIoLimit: 1048576
          defaultPidsLimit: 64
          maxConcurrentJobs: 3
          jobTimeout: 1h30m
          cleanupTimeout: 2.5
          stopGracePeriod: 250ms
        grpc:
          address: 127.0.0.1
          port: 50052
          maxRecvMsgSize: 1024
          maxSendMsgSize: 2048
          keepAliveTime: 1m
          handshakeTimeout: 3s
          idleTimeout: 1h
          maxConcurrentStreams: 10
          maxConnections: 20
          maxConnectionsPerClient: 5
          maxHandshakesPerAddress: 4
        security:
          caCert: /etc/joblet/ca.pem
          serverCert: /etc/joblet/server.pem
          serverKey: /etc/joblet/server.key
        isolation:
          runAsUid: 1000
          runAsGid: 1001
          systemDirs: [/usr, /bin]
          etcFiles: []
          tmpSizeMb: 16
          prestart: 0
          seccomp: off
          landlock: false
          maxOpenFiles: 1024
        cgroup:
          driver: v2
          root: /mnt/cgroup
          parent: joblet/test
        logs:
          memoryBudget: 1000000
          windowBytes: 0
          flushInterval: 1s
          flushBytes: 65536
        metrics:
          interval: 250ms
          enabled: false
        persist:
          server:
            grpc_socket: /run/joblet/persist.sock
            tcp_address: 127.0.0.1
            tcp_port: 50099
            tls:
              enabled: true
          storage:
            retention:
              logs_days: 7
              metrics_days: 0
              cleanup_interval: 1h
        """,
    )
    assert config == Config(
        state_dir=Path("/var/lib/joblet"),
        joblet=JobletSection(
            default_cpu_limit=50,
            default_memory_limit=256,
            default_io_limit=1048576,
            default_pids_limit=64,
            max_concurrent_jobs=3,
            job_timeout=5400.0,
            cleanup_timeout=2.5,
            stop_grace_period=0.25,
        ),
        grpc=GrpcSection(
            address="127.0.0.1",
            port=50052,
            max_recv_msg_size=1024,
            max_send_msg_size=2048,
            keep_alive_time=60.0,
            handshake_timeout=3.0,
            idle_timeout=3600.0,
            max_concurrent_streams=10,
            max_connections=20,
            max_connections_per_client=5,
            max_handshakes_per_address=4,
        ),
        security=SecuritySection(
            ca_cert="/etc/joblet/ca.pem",
            server_cert="/etc/joblet/server.pem",
            server_key="/etc/joblet/server.key",
        ),
        isolation=IsolationSection(
            run_as_uid=1000,
            run_as_gid=1001,
            system_dirs=("/usr", "/bin"),
            etc_files=(),
            tmp_size_mb=16,
            prestart=0,
            seccomp="off",
            landlock=False,
            max_open_files=1024,
        ),
        cgroup=CgroupSection(driver="v2", root="/mnt/cgroup", parent="joblet/test"),
        logs=LogsSection(
            memory_budget=1000000, window_bytes=0, flush_interval=1.0, flush_bytes=65536
        ),
        metrics=MetricsSection(interval=0.25, enabled=False),
        persist=PersistSection(
            server=PersistServerSection(
                grpc_socket="/run/joblet/persist.sock",
                tcp_address="127.0.0.1",
                tcp_port=50099,
                tls=PersistTlsSection(enabled=True),
            ),
            storage=PersistStorageSection(
                retention=RetentionSection(logs_days=7, metrics_days=0, cleanup_interval=3600.0)
            ),
        ),
    )
    # Every attribute was set to something other than its default.
    for section in attrs.fields(Config):
        value, default = getattr(config, section.name), getattr(Config(), section.name)
        if attrs.has(type(value)):
            for field in attrs.fields(type(value)):
                assert getattr(value, field.name) != getattr(default, field.name), field.name
        else:
            assert value != default


def test_prestart_sets_the_stage1_pool_size(tmp_path: Path) -> None:
    assert Config().isolation.prestart == 2
    assert _load(tmp_path, "isolation:\n  prestart: 0\n").isolation.prestart == 0
    assert _load(tmp_path, "isolation:\n  prestart: 8\n").isolation.prestart == 8
    assert _problems(tmp_path, "isolation:\n  prestart: 65\n") == [
        "isolation.prestart: must be between 0 and 64 (got 65)"
    ]


def test_dump_default_config_round_trips(tmp_path: Path) -> None:
    text = dump_default_config()
    assert _load(tmp_path, text) == Config()
    parsed = yaml.safe_load(text)
    for section in attrs.fields(Config):
        key = _camel(section.name)
        assert key in parsed
        default = getattr(Config(), section.name)
        if attrs.has(type(default)):
            assert set(parsed[key]) == {_camel(f.name) for f in attrs.fields(type(default))}
    # Every key is documented by the comment line just above it.
    assert "(undocumented)" not in text
    lines = text.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "-")):
            assert lines[i - 1].strip().startswith("#"), f"no comment above {stripped!r}"


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)


# --- errors name the key path and the problem -----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("joblet:\n  jobTimeout: abc\n", "joblet.jobTimeout: invalid duration 'abc'"),
        ("joblet:\n  jobTimeout: 5x\n", "joblet.jobTimeout: invalid duration '5x'"),
        ("joblet:\n  jobTimeout: [1]\n", "joblet.jobTimeout: invalid duration a list"),
        ("joblet:\n  jobTimeout: true\n", "joblet.jobTimeout: invalid duration true"),
        ("joblet:\n  jobTimeout: .inf\n", "joblet.jobTimeout: invalid duration inf"),
        ("joblet:\n  jobTimeout: -5\n", "joblet.jobTimeout: must not be negative (got -5)"),
        ("joblet:\n  jobTimeout: 0\n", "joblet.jobTimeout: must be positive (got 0s)"),
        ("joblet:\n  cleanupTimeout: 0s\n", "joblet.cleanupTimeout: must be positive (got 0s)"),
        (
            "joblet:\n  defaultCpuLimit: -1\n",
            "joblet.defaultCpuLimit: must not be negative (got -1)",
        ),
        (
            "joblet:\n  defaultMemoryLimit: '512'\n",
            "joblet.defaultMemoryLimit: expected an integer, got '512'",
        ),
        (
            "joblet:\n  maxConcurrentJobs: 1.5\n",
            "joblet.maxConcurrentJobs: expected an integer, got 1.5",
        ),
        (
            "joblet:\n  defaultIoLimit: yes\n",
            "joblet.defaultIoLimit: expected an integer, got true",
        ),
        ("grpc:\n  port: 0\n", "grpc.port: must be between 1 and 65535 (got 0)"),
        ("grpc:\n  port: 65536\n", "grpc.port: must be between 1 and 65535 (got 65536)"),
        ("grpc:\n  port: http\n", "grpc.port: expected an integer, got 'http'"),
        ("grpc:\n  maxRecvMsgSize: 0\n", "grpc.maxRecvMsgSize: must be positive (got 0)"),
        ("grpc:\n  maxSendMsgSize: -4\n", "grpc.maxSendMsgSize: must be positive (got -4)"),
        ("grpc:\n  address: ''\n", "grpc.address: must not be empty"),
        ("grpc:\n  address: 5\n", "grpc.address: expected a string, got 5"),
        ("grpc:\n  handshakeTimeout: 0\n", "grpc.handshakeTimeout: must be positive (got 0s)"),
        ("grpc:\n  idleTimeout: 0s\n", "grpc.idleTimeout: must be positive (got 0s)"),
        (
            "grpc:\n  maxConcurrentStreams: 0\n",
            "grpc.maxConcurrentStreams: must be between 1 and 2147483647 (got 0)",
        ),
        ("grpc:\n  maxConnections: 0\n", "grpc.maxConnections: must be positive (got 0)"),
        (
            "grpc:\n  maxConnectionsPerClient: -1\n",
            "grpc.maxConnectionsPerClient: must be positive (got -1)",
        ),
        (
            "grpc:\n  maxHandshakesPerAddress: 0\n",
            "grpc.maxHandshakesPerAddress: must be positive (got 0)",
        ),
        ("grpc: 5\n", "grpc: expected a mapping, got 5"),
        ("grpc: [port]\n", "grpc: expected a mapping, got a list"),
        ("stateDir: ''\n", "stateDir: must not be empty"),
        ("stateDir: {a: 1}\n", "stateDir: expected a string, got a mapping"),
        ("security:\n  caCert: null\n", "security.caCert: expected a string, got null"),
        (
            "isolation:\n  runAsUid: -1\n",
            "isolation.runAsUid: must be between 0 and 4294967294 (got -1)",
        ),
        (
            "isolation:\n  systemDirs: /usr\n",
            "isolation.systemDirs: expected a list of strings, got '/usr'",
        ),
        (
            "isolation:\n  systemDirs: [/usr, 5]\n",
            "isolation.systemDirs[1]: expected a string, got 5",
        ),
        (
            "isolation:\n  etcFiles: [/etc/hosts, hosts]\n",
            "isolation.etcFiles[1]: must be an absolute path (got 'hosts')",
        ),
        ("isolation:\n  tmpSizeMb: 0\n", "isolation.tmpSizeMb: must be positive (got 0)"),
        (
            "isolation:\n  prestart: -1\n",
            "isolation.prestart: must be between 0 and 64 (got -1)",
        ),
        ("isolation:\n  prestart: 2.0\n", "isolation.prestart: expected an integer, got 2.0"),
        ("cgroup:\n  driver: v3\n", "cgroup.driver: must be one of auto, v1, v2 (got 'v3')"),
        ("cgroup:\n  driver: V2\n", "cgroup.driver: must be one of auto, v1, v2 (got 'V2')"),
        ("cgroup:\n  root: sys/fs\n", "cgroup.root: must be an absolute path (got 'sys/fs')"),
        (
            "cgroup:\n  parent: ../escape\n",
            "cgroup.parent: must be a relative cgroup name such as 'joblet' (got '../escape')",
        ),
        (
            "cgroup:\n  parent: /abs\n",
            "cgroup.parent: must be a relative cgroup name such as 'joblet' (got '/abs')",
        ),
        ("logs:\n  memoryBudget: 0\n", "logs.memoryBudget: must be positive (got 0)"),
        ("logs:\n  windowBytes: -1\n", "logs.windowBytes: must not be negative (got -1)"),
        ("logs:\n  flushInterval: 0ms\n", "logs.flushInterval: must be positive (got 0s)"),
        ("logs:\n  flushBytes: 0\n", "logs.flushBytes: must be positive (got 0)"),
        ("metrics:\n  interval: 0s\n", "metrics.interval: must be positive (got 0s)"),
        ("metrics:\n  enabled: 1\n", "metrics.enabled: expected true or false, got 1"),
        ("metrics:\n  enabled: 'no'\n", "metrics.enabled: expected true or false, got 'no'"),
    ],
)
def test_bad_values(tmp_path: Path, text: str, problem: str) -> None:
    problems = _problems(tmp_path, text)
    assert problems == [problem]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "grpc:\n  maxRecvMsgSzie: 5\n",
            "grpc.maxRecvMsgSzie: unknown key (did you mean 'maxRecvMsgSize'?)",
        ),
        (
            "joblet:\n  default_cpu_limit: 5\n",
            "joblet.default_cpu_limit: unknown key (did you mean 'defaultCpuLimit'?)",
        ),
        ("persist:\n  ipc: {}\n", "persist.ipc: unknown key"),
        (
            "persist:\n  server:\n    grpcSocket: x\n",
            "persist.server.grpcSocket: unknown key (did you mean 'grpc_socket'?)",
        ),
        ("statedir: x\n", "statedir: unknown key (did you mean 'stateDir'?)"),
        ("logs:\n  zzz: 1\n", "logs.zzz: unknown key"),
        ("grpc:\n  1: 1\n", "grpc.1: unknown key"),
    ],
)
def test_unknown_keys(tmp_path: Path, text: str, problem: str) -> None:
    assert _problems(tmp_path, text) == [problem]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    problems = _problems(
        tmp_path,
        """
        joblet:
          jobTimeout: abc
          bogus: 1
        grpc:
          port: 0
        cgroup:
          driver: v9
        """,
    )
    assert sorted(problems) == [
        "cgroup.driver: must be one of auto, v1, v2 (got 'v9')",
        "grpc.port: must be between 1 and 65535 (got 0)",
        "joblet.bogus: unknown key",
        "joblet.jobTimeout: invalid duration 'abc'",
    ]
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, "grpc:\n  port: 0\njoblet:\n  jobTimeout: abc\n")
    assert str(info.value) == "; ".join(info.value.problems)
    assert info.value.source == tmp_path / "joblet-config.yml"


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    problems = _problems(tmp_path, "joblet:\n  jobTimeout: [1h\n")
    assert len(problems) == 1
    assert problems[0].startswith(f"{tmp_path / 'joblet-config.yml'}: invalid YAML (line ")


def test_duplicate_keys_are_an_error(tmp_path: Path) -> None:
    problems = _problems(tmp_path, "grpc:\n  port: 1\n  port: 2\n")
    assert len(problems) == 1
    assert "duplicate key 'port'" in problems[0]
    assert "(line 3, column 3)" in problems[0]


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    problems = _problems(tmp_path, "- a\n- b\n")
    assert problems == [
        f"{tmp_path / 'joblet-config.yml'}: the top level must be a mapping of sections, got a list"
    ]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.yml"):
        load_config(tmp_path / "nope.yml")


# --- overrides (CLI flags) ------------------------------------------------------------------------


def test_overrides_replace_file_values(tmp_path: Path) -> None:
    config = _load(tmp_path, "grpc:\n  port: 1234\n", **{"grpc.port": 4321, "stateDir": "/s"})
    assert config.grpc.port == 4321
    assert config.state_dir == Path("/s")


def test_overrides_without_a_file_and_none_values() -> None:
    config = load_config(None, overrides={"grpc.port": 50099, "stateDir": None})
    assert config.grpc.port == 50099
    assert config.state_dir == Config().state_dir


def test_overrides_are_checked_like_the_file() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides={"grpc.port": 0, "grpc.prot": 1})
    assert sorted(info.value.problems) == [
        "grpc.port: must be between 1 and 65535 (got 0)",
        "grpc.prot: unknown key (did you mean 'port'?)",
    ]


def test_override_below_a_scalar_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="stateDir: expected a mapping"):
        load_config(None, overrides={"stateDir": "x", "stateDir.y": 1})


# --- durations ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1h", 3600.0),
        ("30s", 30.0),
        ("500ms", 0.5),
        ("1h30m", 5400.0),
        ("1h30m15s", 5415.0),
        ("1.5h", 5400.0),
        ("2m0.5s", 120.5),
        ("100us", 1e-4),
        ("100µs", 1e-4),
        ("10ns", 1e-8),
        ("0", 0.0),
        ("45", 45.0),
        ("2.5", 2.5),
        (" 5s ", 5.0),
        (0, 0.0),
        (90, 90.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value", ["", "abc", "5x", "h", "1h 30m", "-5s", "1e3s", "5 s", "1,5s", True, None, [1]]
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(value)


def test_negative_numbers_are_not_durations() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        parse_duration(-1)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (3600.0, "1h"),
        (5400.0, "1h30m"),
        (30.0, "30s"),
        (0.1, "100ms"),
        (1.5, "1s500ms"),
        (0.0, "0s"),
        (90061.0, "25h1m1s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


# --- persist: the spec's snake_case keys, three levels deep ---------------------------------------


def test_the_spec_persist_example_loads(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        """
        persist:
          server:
            grpc_socket: "/opt/joblet/run/persist-grpc.sock"
            tls:
              enabled: false  # Optional for external access
          storage:
            retention:
              logs_days: 30        # Keep logs for 30 days
              metrics_days: 90     # Keep metrics for 90 days
              cleanup_interval: "24h"  # Run cleanup daily
        """,
    )
    assert config.persist == attrs.evolve(
        PersistSection(),
        server=PersistServerSection(grpc_socket="/opt/joblet/run/persist-grpc.sock"),
    )
    assert config.persist.storage.retention == RetentionSection(30, 90, 86400.0)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "persist:\n  server:\n    tcp_port: 0\n",
            "persist.server.tcp_port: must be between 1 and 65535 (got 0)",
        ),
        (
            "persist:\n  server:\n    grpc_socket: ''\n",
            "persist.server.grpc_socket: must not be empty",
        ),
        (
            "persist:\n  server:\n    tls:\n      enabled: 'yes'\n",
            "persist.server.tls.enabled: expected true or false, got 'yes'",
        ),
        (
            "persist:\n  server:\n    tls: true\n",
            "persist.server.tls: expected a mapping, got true",
        ),
        (
            "persist:\n  storage:\n    retention:\n      logs_days: -1\n",
            "persist.storage.retention.logs_days: must not be negative (got -1)",
        ),
        (
            "persist:\n  storage:\n    retention:\n      metrics_days: 1.5\n",
            "persist.storage.retention.metrics_days: expected an integer, got 1.5",
        ),
        (
            "persist:\n  storage:\n    retention:\n      cleanup_interval: 0s\n",
            "persist.storage.retention.cleanup_interval: must be positive (got 0s)",
        ),
        (
            "persist:\n  storage:\n    retention:\n      logsDays: 1\n",
            "persist.storage.retention.logsDays: unknown key (did you mean 'logs_days'?)",
        ),
    ],
)
def test_bad_persist_values(tmp_path: Path, text: str, problem: str) -> None:
    assert _problems(tmp_path, text) == [problem]


def test_default_config_shows_the_persist_keys_as_the_spec_writes_them() -> None:
    parsed = yaml.safe_load(dump_default_config())
    assert parsed["persist"] == {
        "server": {
            "grpc_socket": "run/persist-grpc.sock",
            "tcp_address": "0.0.0.0",
            "tcp_port": 50052,
            "tls": {"enabled": False},
        },
        "storage": {"retention": {"logs_days": 30, "metrics_days": 90, "cleanup_interval": "24h"}},
    }


# --- one declaration per key, and its check holds for a Config built in code ----------------------


def test_every_attribute_declares_its_key_and_doc() -> None:
    def walk(cls: type) -> None:
        keys = [setting_of(field).key for field in attrs.fields(cls)]
        assert len(set(keys)) == len(keys)
        for field in attrs.fields(cls):
            assert setting_of(field).doc
            if isinstance(field.type, type) and attrs.has(field.type):
                walk(field.type)

    walk(Config)


@pytest.mark.parametrize(
    ("build", "problem"),
    [
        (lambda: GrpcSection(port=0), "GrpcSection.port: must be between 1 and 65535 (got 0)"),
        (lambda: CgroupSection(driver="v3"), "CgroupSection.driver: must be one of auto, v1, v2"),
        (lambda: IsolationSection(prestart=65), "IsolationSection.prestart: must be between 0"),
        (
            lambda: IsolationSection(etc_files=("/etc/hosts", "hosts")),
            "IsolationSection.etc_files[1]: must be an absolute path (got 'hosts')",
        ),
        (
            lambda: JobletSection(job_timeout=0),
            "JobletSection.job_timeout: must be positive (got 0s)",
        ),
        (
            lambda: JobletSection(stop_grace_period=-1),
            "JobletSection.stop_grace_period: must not be negative (got -1)",
        ),
        (lambda: LogsSection(flush_interval=True), "LogsSection.flush_interval: invalid duration"),
        (
            lambda: attrs.evolve(RetentionSection(), logs_days=-1),
            "RetentionSection.logs_days: must not be negative",
        ),
    ],
)
def test_a_config_built_in_code_is_checked(build: Callable[[], object], problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        build()


def test_durations_in_code_are_seconds() -> None:
    assert MetricsSection(interval=30).interval == 30.0
    assert type(MetricsSection(interval=30).interval) is float
    assert LogsSection(flush_interval="1m30s").flush_interval == 90.0  # type: ignore[arg-type]
    # Only attributes typed Seconds are durations.
    seconds = {
        f"{cls.__name__}.{field.name}"
        for cls in (JobletSection, GrpcSection, LogsSection, MetricsSection, RetentionSection)
        for field in attrs.fields(cls)
        if is_seconds(field.type)
    }
    assert seconds == {
        "JobletSection.job_timeout",
        "JobletSection.cleanup_timeout",
        "JobletSection.stop_grace_period",
        "GrpcSection.keep_alive_time",
        "GrpcSection.handshake_timeout",
        "GrpcSection.idle_timeout",
        "LogsSection.flush_interval",
        "MetricsSection.interval",
        "RetentionSection.cleanup_interval",
    }


# --- the state directory's layout -----------------------------------------------------------------


def test_state_layout_spells_every_path_under_the_state_dir() -> None:
    layout = StateLayout(Path("/var/lib/joblet"))
    assert {
        "jobs": layout.jobs_dir,
        "logs": layout.logs_dir,
        "metrics": layout.metrics_dir,
        "jobs.db": layout.jobs_db,
        "node_id": layout.node_id,
        "lock": layout.lock,
        "run": layout.run_dir,
        "socket": layout.persist_socket,
        "certs": layout.certs_dir,
    } == {
        "jobs": Path("/var/lib/joblet/jobs"),
        "logs": Path("/var/lib/joblet/logs"),
        "metrics": Path("/var/lib/joblet/metrics"),
        "jobs.db": Path("/var/lib/joblet/jobs.db"),
        "node_id": Path("/var/lib/joblet/node_id"),
        "lock": Path("/var/lib/joblet/joblet.lock"),
        "run": Path("/var/lib/joblet/run"),
        "socket": Path("/var/lib/joblet/run/persist-grpc.sock"),
        "certs": Path("/var/lib/joblet/certs"),
    }
    assert layout.persist_socket.parent == layout.run_dir
    # The default certificate paths are in the certificate directory.
    sec = SecuritySection()
    assert {layout.under(p).parent for p in (sec.ca_cert, sec.server_cert, sec.server_key)} == {
        layout.certs_dir
    }
    assert layout.under("/etc/joblet/ca.pem") == Path("/etc/joblet/ca.pem")


def test_state_layout_follows_the_config(tmp_path: Path) -> None:
    config = _load(tmp_path, "stateDir: /s\npersist:\n  server:\n    grpc_socket: p.sock\n")
    assert config.layout == StateLayout(Path("/s"), "p.sock")
    assert config.layout.persist_socket == Path("/s/p.sock")
    absolute = _load(tmp_path, "persist:\n  server:\n    grpc_socket: /run/j.sock\n")
    assert absolute.layout.persist_socket == Path("/run/j.sock")
    assert Config().layout == StateLayout(Path("state"))
