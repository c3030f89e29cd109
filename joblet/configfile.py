"""Reading ``joblet-config.yml`` into :class:`joblet.config.Config`.

The file's keys are camelCase, as in the spec (``joblet.defaultCpuLimit``); each maps to the
snake_case attribute of the same name in :mod:`joblet.config` (``default_cpu_limit``). Every key is
optional.

- Durations (every ``float`` attribute) accept ``"1h"``, ``"30s"``, ``"500ms"``, ``"1h30m"`` (Go's
  units: h, m, s, ms, us, ns) or a number of seconds.
- Sizes and limits are integers.
- An unknown key, a value of the wrong type or out of range is an error naming the key's full path:
  ``joblet.jobTimeout: invalid duration 'abc'``. Every problem in the file is reported at once.

The conversion is a private :class:`cattrs.Converter`; :mod:`joblet.config` stays free of I/O and of
the file's spelling.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import attrs
import cattrs
import yaml
from cattrs.errors import ForbiddenExtraKeysError
from cattrs.gen import make_dict_structure_fn, override

from joblet.config import (
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

T = TypeVar("T")

#: cgroup drivers ``cgroup.driver`` may name.
CGROUP_DRIVERS = ("auto", "v1", "v2")
_UID_MAX = (1 << 32) - 2  # (uid_t)-1 means "no change" to the kernel
#: Most stage-1 processes ``isolation.prestart`` may keep waiting (each holds about 3 MB of its own
#: memory, 9 MB resident with the shared interpreter pages).
MAX_PRESTART = 64
_SECTIONS: tuple[type, ...] = (
    JobletSection,
    GrpcSection,
    SecuritySection,
    IsolationSection,
    CgroupSection,
    LogsSection,
    MetricsSection,
    # Nested ones before the sections holding them.
    PersistTlsSection,
    PersistServerSection,
    RetentionSection,
    PersistStorageSection,
    PersistSection,
)
#: Sections whose keys keep their attribute names: the spec writes ``persist:`` in snake_case.
_SNAKE_CASE: frozenset[type] = frozenset(
    {
        PersistSection,
        PersistServerSection,
        PersistTlsSection,
        PersistStorageSection,
        RetentionSection,
    }
)


class ConfigError(Exception):
    """The configuration file cannot be used.

    Attributes:
        problems: One line per problem, each ``<key path>: <what is wrong>``.
        source: The file, if one was read.
    """

    def __init__(self, problems: Sequence[str], *, source: Path | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__("; ".join(self.problems))


def load_config(path: Path | None, *, overrides: Mapping[str, object] | None = None) -> Config:
    """Read the configuration file and apply command-line overrides.

    Args:
        path: The YAML file; None for the built-in defaults.
        overrides: Values that replace the file's, by dotted key path as in the file (e.g.
            ``{"stateDir": "/var/lib/joblet", "grpc.port": 50052}``); None values are ignored, so
            unset CLI flags can be passed as they are. They are checked like the file's values.

    Raises:
        ConfigError: The file is unreadable or not valid YAML, or a key or value is wrong.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([f"cannot read config file {path}: {exc}"], source=path) from exc
        raw = _parse_yaml(text, path)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_path(raw, key, value, path)
    try:
        config: Config = _converter.structure(raw, Config)
    except Exception as exc:
        raise ConfigError(list(_describe(exc, "")), source=path) from exc
    return config


def parse_duration(value: object) -> float:
    """Seconds in a duration: a number (seconds) or a string such as ``"1h30m"`` or ``"500ms"``.

    Raises:
        ValueError: ``value`` is not a duration (``invalid duration 'abc'``) or is negative.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"invalid duration {_show(value)}")
    if isinstance(value, str):
        text = value.strip()
        if _NUMBER.fullmatch(text):
            seconds = float(text)
        elif text and _DURATION.fullmatch(text):
            seconds = sum(float(num) * _UNITS[unit] for num, unit in _DURATION_PART.findall(text))
        else:
            raise ValueError(f"invalid duration {_show(value)}")
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {_show(value)}")
    if seconds < 0:
        raise ValueError(f"must not be negative (got {_show(value)})")
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


def dump_default_config() -> str:
    """The default configuration as commented YAML, every key with its default value.

    Loading the result gives ``Config()``.
    """
    lines = [
        "# joblet configuration (joblet-config.yml).",
        "# Every key is optional and shown with its default value.",
        '# Durations: "1h", "30s", "500ms", "1h30m" or a number of seconds.',
        "",
    ]
    default = Config()
    for field in attrs.fields(Config):
        key = _camel(field.name)
        value = getattr(default, field.name)
        if attrs.has(type(value)):
            lines.append(f"# {_doc(key)}")
            lines.append(f"{key}:")
            lines.extend(_yaml_section(key, value, "  "))
        else:
            lines.append(f"# {_doc(key)}")
            lines.extend(_yaml_entry(key, value, field.type, ""))
        lines.append("")
    return "\n".join(lines)


def _yaml_section(path: str, section: Any, indent: str) -> list[str]:
    """The keys of a section (and of the sections inside it), each after its comment."""
    lines = []
    for sub in attrs.fields(type(section)):
        sub_key = _file_key(type(section), sub.name)
        sub_path = f"{path}.{sub_key}"
        for doc_line in _doc(sub_path).split("\n"):
            lines.append(f"{indent}# {doc_line}")
        value = getattr(section, sub.name)
        if attrs.has(type(value)):
            lines.append(f"{indent}{sub_key}:")
            lines.extend(_yaml_section(sub_path, value, indent + "  "))
        else:
            lines.extend(_yaml_entry(sub_key, value, sub.type, indent))
    return lines


# --- the file's spelling --------------------------------------------------------------------------


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _file_key(cls: type | None, name: str) -> str:
    """The file's key for attribute ``name`` of section ``cls``."""
    return name if cls in _SNAKE_CASE else _camel(name)


_DOCS: dict[str, str] = {
    "stateDir": "Directory of the daemon's state: jobs, logs and (by default) certificates.",
    "joblet": "Job defaults and caps (the spec's section).",
    "joblet.defaultCpuLimit": "CPU limit of a job that sets none, percent of one core (0 = none).",
    "joblet.defaultMemoryLimit": "Memory limit of a job that sets none, in MB (0 = none).",
    "joblet.defaultIoLimit": "I/O limit of a job that sets none, bytes per second (0 = none).",
    "joblet.defaultPidsLimit": "Most processes and threads a job may have (0 = no limit).",
    "joblet.maxConcurrentJobs": "Most jobs running at once (0 = no limit).",
    "joblet.jobTimeout": "Longest a job may run before it is stopped.",
    "joblet.cleanupTimeout": "Longest the daemon waits for a job's resources to be cleaned up.",
    "joblet.stopGracePeriod": "Time between SIGTERM and SIGKILL when a job is stopped.",
    "grpc": "The gRPC server (the spec's section).",
    "grpc.address": "Address to listen on.",
    "grpc.port": "Port to listen on.",
    "grpc.maxRecvMsgSize": "Largest message the server accepts, bytes.",
    "grpc.maxSendMsgSize": "Largest message the server sends, bytes.",
    "grpc.keepAliveTime": "Interval of keep-alive pings on idle connections.",
    "security": "TLS files; relative paths are under stateDir.",
    "security.caCert": "CA certificate that client certificates must be issued by.",
    "security.serverCert": "The server's certificate.",
    "security.serverKey": "The server's private key.",
    "isolation": "How jobs are isolated.",
    "isolation.runAsUid": "uid jobs run as (0 = root, only if you mean it).",
    "isolation.runAsGid": "gid jobs run as.",
    "isolation.systemDirs": "Host directories bind-mounted read-only into every job's root.",
    "isolation.etcFiles": "Host files copied read-only into the job's /etc.",
    "isolation.tmpSizeMb": "Size of each job's private /tmp in MB (counts against its memory).",
    "isolation.prestart": "Job helper processes kept started ahead, for faster job starts\n"
    "(0 = start each with its job).",
    "cgroup": "cgroup hierarchy used for limits.",
    "cgroup.driver": "auto (detect), v1 or v2.",
    "cgroup.root": "Where the cgroup filesystems are mounted.",
    "cgroup.parent": "Name of joblet's group under the root; each job gets a group inside it.",
    "logs": "Job output buffering.",
    "logs.memoryBudget": "Bytes of job output held in memory for all jobs before it is written;\n"
    "at the bound jobs block on write.",
    "logs.windowBytes": "Bytes of already-written output kept in memory per job for live readers.",
    "logs.flushInterval": "Longest time output waits in memory before it is written.",
    "logs.flushBytes": "Batch size that triggers a write before flushInterval ends.",
    "metrics": "Per-job resource metrics (GetJobMetrics), stored under stateDir/metrics.",
    "metrics.interval": "Time between samples of a running job (and one at its start and end).",
    "metrics.enabled": "Whether jobs are sampled at all.",
    "persist": "The Persist Service: historical log and metric queries, retention (spec keys).",
    "persist.server": "Where the Persist Service listens.",
    "persist.server.grpc_socket": "Its Unix socket (mode 0600: the daemon's user only);\n"
    "relative paths are under stateDir.",
    "persist.server.tcp_address": "Address of the TCP listener (with tls.enabled).",
    "persist.server.tcp_port": "Port of the TCP listener (with tls.enabled).",
    "persist.server.tls": "The TCP listener: mutual TLS with the certificates of security.",
    "persist.server.tls.enabled": "Also serve on TCP (viewer and admin clients may query).",
    "persist.storage": "Persisted job data.",
    "persist.storage.retention": "How long the files of ended jobs are kept.",
    "persist.storage.retention.logs_days": "Days a job's log is kept after it ended (0 = forever).",
    "persist.storage.retention.metrics_days": "Days a job's metrics are kept after it ended\n"
    "(0 = forever).",
    "persist.storage.retention.cleanup_interval": "Time between clean-ups (one at start-up).",
}


def _doc(key: str) -> str:
    return _DOCS.get(key, "(undocumented)")


def _yaml_entry(key: str, value: object, type_: object, indent: str) -> list[str]:
    if type_ is float:
        assert isinstance(value, float)
        return [f"{indent}{key}: {json.dumps(format_duration(value))}"]
    if isinstance(value, tuple):
        if not value:
            return [f"{indent}{key}: []"]
        return [f"{indent}{key}:"] + [f"{indent}  - {json.dumps(str(v))}" for v in value]
    if isinstance(value, bool | int):
        return [f"{indent}{key}: {json.dumps(value)}"]
    return [f"{indent}{key}: {json.dumps(str(value))}"]


# --- parsing --------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that rejects a key given twice in one mapping (PyYAML keeps the last)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, str) and key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", mark)
        if isinstance(key, str):
            seen.add(key)
    loader.flatten_mapping(node)
    return dict(loader.construct_pairs(node, deep=True))


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def _parse_yaml(text: str, path: Path) -> dict[str, Any]:
    try:
        # A SafeLoader subclass: builds plain data, never arbitrary objects.
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" (line {mark.line + 1}, column {mark.column + 1})"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}: invalid YAML{where}: {problem}"], source=path) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            [f"{path}: the top level must be a mapping of sections, got {_show(data)}"],
            source=path,
        )
    return data


def _set_path(raw: dict[str, Any], dotted: str, value: object, source: Path | None) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parents[: i + 1])
            raise ConfigError([f"{where}: expected a mapping, got {_show(child)}"], source=source)
        node = child
    node[last] = value


# --- conversion -----------------------------------------------------------------------------------


class _KeyedError(ValueError):
    """A problem in an element of a value: ``suffix`` is appended to the key path (``[2]``)."""

    def __init__(self, suffix: str, message: str) -> None:
        super().__init__(message)
        self.suffix = suffix


def _show(value: object) -> str:
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


def _int(value: object, _: object = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {_show(value)}")
    return value


def _bool(value: object, _: object = None) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_show(value)}")
    return value


def _duration(value: object, _: object = None) -> float:
    return parse_duration(value)


def _str(value: object, _: object = None) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_show(value)}")
    return value


def _path(value: object, _: object = None) -> Path:
    text = _str(value)
    if not text:
        raise ValueError("must not be empty")
    return Path(text)


def _str_tuple(value: object, _: object = None) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of strings, got {_show(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _KeyedError(f"[{i}]", f"expected a string, got {_show(item)}")
    return tuple(value)


# Range checks, run after the type's own conversion; each raises ValueError with the problem.


def _at_least(low: int | float) -> Callable[[Any], None]:
    def check(value: int | float) -> None:
        if value < low:
            bound = "negative" if low == 0 else f"less than {low}"
            raise ValueError(f"must not be {bound} (got {_num(value)})")

    return check


def _positive(value: int | float) -> None:
    if value <= 0:
        raise ValueError(f"must be positive (got {_num(value)})")


def _between(low: int, high: int) -> Callable[[int], None]:
    def check(value: int) -> None:
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high} (got {value})")

    return check


def _not_empty(value: str) -> None:
    if not value:
        raise ValueError("must not be empty")


def _one_of(*choices: str) -> Callable[[str], None]:
    def check(value: str) -> None:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)} (got {value!r})")

    return check


def _absolute(value: str) -> None:
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path (got {value!r})")


def _absolute_paths(values: tuple[str, ...]) -> None:
    for i, value in enumerate(values):
        if not value.startswith("/"):
            raise _KeyedError(f"[{i}]", f"must be an absolute path (got {value!r})")


def _cgroup_name(value: str) -> None:
    parts = PurePosixPath(value).parts
    if not value or value.startswith("/") or ".." in parts or "." in value.split("/"):
        raise ValueError(f"must be a relative cgroup name such as 'joblet' (got {value!r})")


def _num(value: int | float) -> str:
    return format_duration(value) if isinstance(value, float) else str(value)


_CHECKS: dict[tuple[type, str], Callable[[Any], None]] = {
    (Config, "state_dir"): lambda p: _not_empty(str(p)),
    (JobletSection, "default_cpu_limit"): _at_least(0),
    (JobletSection, "default_memory_limit"): _at_least(0),
    (JobletSection, "default_io_limit"): _at_least(0),
    (JobletSection, "default_pids_limit"): _at_least(0),
    (JobletSection, "max_concurrent_jobs"): _at_least(0),
    (JobletSection, "job_timeout"): _positive,
    (JobletSection, "cleanup_timeout"): _positive,
    (JobletSection, "stop_grace_period"): _at_least(0),
    (GrpcSection, "address"): _not_empty,
    (GrpcSection, "port"): _between(1, 65535),
    (GrpcSection, "max_recv_msg_size"): _positive,
    (GrpcSection, "max_send_msg_size"): _positive,
    (GrpcSection, "keep_alive_time"): _positive,
    (SecuritySection, "ca_cert"): _not_empty,
    (SecuritySection, "server_cert"): _not_empty,
    (SecuritySection, "server_key"): _not_empty,
    (IsolationSection, "run_as_uid"): _between(0, _UID_MAX),
    (IsolationSection, "run_as_gid"): _between(0, _UID_MAX),
    (IsolationSection, "system_dirs"): _absolute_paths,
    (IsolationSection, "etc_files"): _absolute_paths,
    (IsolationSection, "tmp_size_mb"): _positive,
    (IsolationSection, "prestart"): _between(0, MAX_PRESTART),
    (CgroupSection, "driver"): _one_of(*CGROUP_DRIVERS),
    (CgroupSection, "root"): _absolute,
    (CgroupSection, "parent"): _cgroup_name,
    (LogsSection, "memory_budget"): _positive,
    (LogsSection, "window_bytes"): _at_least(0),
    (LogsSection, "flush_interval"): _positive,
    (LogsSection, "flush_bytes"): _positive,
    (MetricsSection, "interval"): _positive,
    (PersistServerSection, "grpc_socket"): _not_empty,
    (PersistServerSection, "tcp_address"): _not_empty,
    (PersistServerSection, "tcp_port"): _between(1, 65535),
    (RetentionSection, "logs_days"): _at_least(0),
    (RetentionSection, "metrics_days"): _at_least(0),
    (RetentionSection, "cleanup_interval"): _positive,
}


def _checked(base: Callable[[Any, Any], T], check: Callable[[T], None]) -> Callable[[Any, Any], T]:
    def hook(value: Any, type_: Any) -> T:
        result = base(value, type_)
        check(result)
        return result

    return hook


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(int, _int)
    conv.register_structure_hook(bool, _bool)
    conv.register_structure_hook(float, _duration)
    conv.register_structure_hook(str, _str)
    conv.register_structure_hook(Path, _path)
    conv.register_structure_hook_func(lambda t: t == tuple[str, ...], _str_tuple)
    for cls in (*_SECTIONS, Config):
        attrs.resolve_types(cls)  # config.py's annotations are strings (PEP 563)
        overrides: dict[str, Any] = {}
        for field in attrs.fields(cls):
            check = _CHECKS.get((cls, field.name))
            hook = None
            if check is not None:
                base = conv.get_structure_hook(field.type)
                hook = _checked(base, check)
            overrides[field.name] = override(rename=_file_key(cls, field.name), struct_hook=hook)
        structure: Callable[[Any, Any], Any] = make_dict_structure_fn(
            cls, conv, _cattrs_forbid_extra_keys=True, **overrides
        )
        conv.register_structure_hook(cls, _mapping_or_null(structure))
    return conv


def _mapping_or_null(structure: Callable[[Any, Any], T]) -> Callable[[Any, Any], T]:
    """A section may be empty (``grpc:`` alone is null in YAML) but not a scalar or a list."""

    def hook(value: Any, type_: Any) -> T:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {_show(value)}")
        return structure(value, type_)

    return hook


_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ms|us|µs|ns|h|m|s)")
_DURATION = re.compile(r"(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:ms|us|µs|ns|h|m|s))+")

_converter = _make_converter()


def _describe(exc: BaseException, path: str) -> Iterator[str]:
    """Every problem in ``exc`` (cattrs' exception groups), as ``key.path: message`` lines."""
    if isinstance(exc, ForbiddenExtraKeysError):
        known = [_file_key(exc.cl, f.name) for f in attrs.fields(exc.cl)]
        for key in sorted(str(k) for k in exc.extra_fields):
            hint = difflib.get_close_matches(key, known, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            yield f"{_join(path, key)}: unknown key{suggestion}"
    elif isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from _describe(sub, _join(path, _note_key(sub, getattr(exc, "cl", None))))
    elif isinstance(exc, _KeyedError):
        yield f"{path}{exc.suffix}: {exc}"
    elif isinstance(exc, Exception):
        yield f"{path or '(top level)'}: {exc}"
    else:
        raise exc


def _note_key(exc: BaseException, cls: type | None = None) -> str:
    for note in getattr(exc, "__notes__", ()):
        name = getattr(note, "name", None)
        if isinstance(name, str):
            return _file_key(cls, name)
    return ""


def _join(path: str, key: str) -> str:
    if not key:
        return path
    return f"{path}.{key}" if path else key
