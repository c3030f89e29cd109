"""Reading ``joblet-config.yml`` into :class:`~joblet.config.model.Config`.

Each key is the one declared next to its attribute (:mod:`joblet.config.model`); every key is
optional.

- Durations (attributes typed :data:`~joblet.config.durations.Seconds`) accept ``"1h"``,
  ``"30s"``, ``"500ms"``, ``"1h30m"`` (Go's units: h, m, s, ms, us, ns) or a number of seconds.
- Sizes and limits are integers.
- An unknown key, a value of the wrong type or out of range is an error naming the key's full path:
  ``joblet.jobTimeout: invalid duration 'abc'``. Every problem in the file is reported at once.

The conversion is a private :class:`cattrs.Converter`; the model stays free of I/O, and of YAML.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import cattrs
import yaml
from cattrs.errors import ForbiddenExtraKeysError
from cattrs.gen import make_dict_structure_fn, override

from joblet.config.checks import Check, ElementError, show
from joblet.config.durations import format_duration, is_seconds, parse_duration
from joblet.config.fields import is_or_off, setting_of
from joblet.config.model import Config

T = TypeVar("T")


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
    for field in attrs.fields(Config):
        lines.extend(_yaml_key(Config(), field, ""))
        lines.append("")
    return "\n".join(lines)


def _yaml_key(holder: Any, field: attrs.Attribute[Any], indent: str) -> list[str]:
    """One key of ``holder`` after its doc, with the keys inside it if it is a section."""
    declared = setting_of(field)
    lines = [f"{indent}# {line}" for line in declared.doc.split("\n")]
    value = getattr(holder, field.name)
    if attrs.has(type(value)):
        lines.append(f"{indent}{declared.key}:")
        for sub in attrs.fields(type(value)):
            lines.extend(_yaml_key(value, sub, indent + "  "))
    else:
        lines.extend(_yaml_entry(declared.key, value, field.type, indent))
    return lines


def _yaml_entry(key: str, value: object, type_: object, indent: str) -> list[str]:
    if is_seconds(type_):
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
            [f"{path}: the top level must be a mapping of sections, got {show(data)}"],
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
            raise ConfigError([f"{where}: expected a mapping, got {show(child)}"], source=source)
        node = child
    node[last] = value


# --- conversion -----------------------------------------------------------------------------------


def _int(value: object, _: object = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {show(value)}")
    return value


def _bool(value: object, _: object = None) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {show(value)}")
    return value


def _seconds(value: object, _: object = None) -> float:
    return parse_duration(value)


def _str_or_off(value: object, _: object = None) -> str:
    if value is False:  # YAML 1.1 reads an unquoted off (or no, false) as false
        return "off"
    return _str(value)


def _str(value: object, _: object = None) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {show(value)}")
    return value


def _path(value: object, _: object = None) -> Path:
    text = _str(value)
    if not text:
        raise ValueError("must not be empty")
    return Path(text)


def _str_tuple(value: object, _: object = None) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of strings, got {show(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ElementError(f"[{i}]", f"expected a string, got {show(item)}")
    return tuple(value)


def _checked(base: Callable[[Any, Any], T], check: Check) -> Callable[[Any, Any], T]:
    """The type's conversion, then the attribute's check.

    The check runs here too, not only as the attrs validator, so that its problem is reported under
    its key together with the file's other problems (cattrs collects errors per attribute, and a
    validator only fails later, in the class's ``__init__``).
    """

    def hook(value: Any, type_: Any) -> T:
        result = base(value, type_)
        check(result)
        return result

    return hook


def _sections(cls: type) -> Iterator[type]:
    """``cls`` and every section inside it, nested ones before the sections holding them."""
    attrs.resolve_types(cls)  # the model's annotations are strings (PEP 563)
    for field in attrs.fields(cls):
        if isinstance(field.type, type) and attrs.has(field.type):
            yield from _sections(field.type)
    yield cls


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(int, _int)
    conv.register_structure_hook(bool, _bool)
    conv.register_structure_hook(str, _str)
    conv.register_structure_hook(Path, _path)
    conv.register_structure_hook_func(lambda t: t == tuple[str, ...], _str_tuple)
    conv.register_structure_hook_func(is_seconds, _seconds)
    conv.register_structure_hook_func(is_or_off, _str_or_off)
    for cls in _sections(Config):
        overrides: dict[str, Any] = {}
        for field in attrs.fields(cls):
            declared = setting_of(field)
            hook = None
            if declared.check is not None:
                hook = _checked(conv.get_structure_hook(field.type), declared.check)
            overrides[field.name] = override(rename=declared.key, struct_hook=hook)
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
            raise ValueError(f"expected a mapping, got {show(value)}")
        return structure(value, type_)

    return hook


_converter = _make_converter()


def _describe(exc: BaseException, path: str) -> Iterator[str]:
    """Every problem in ``exc`` (cattrs' exception groups), as ``key.path: message`` lines."""
    if isinstance(exc, ForbiddenExtraKeysError):
        known = [setting_of(f).key for f in attrs.fields(exc.cl)]
        for key in sorted(str(k) for k in exc.extra_fields):
            hint = difflib.get_close_matches(key, known, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            yield f"{_join(path, key)}: unknown key{suggestion}"
    elif isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from _describe(sub, _join(path, _note_key(sub, getattr(exc, "cl", None))))
    elif isinstance(exc, ElementError):
        yield f"{path}{exc.suffix}: {exc}"
    elif isinstance(exc, Exception):
        yield f"{path or '(top level)'}: {exc}"
    else:
        raise exc


def _note_key(exc: BaseException, cls: type | None) -> str:
    """The file key of the attribute cattrs' note on ``exc`` names (an attribute of ``cls``)."""
    for note in getattr(exc, "__notes__", ()):
        name = getattr(note, "name", None)
        if isinstance(name, str) and cls is not None:
            return setting_of(attrs.fields_dict(cls)[name]).key
    return ""


def _join(path: str, key: str) -> str:
    if not key:
        return path
    return f"{path}.{key}" if path else key
