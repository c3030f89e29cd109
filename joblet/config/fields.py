"""Declaring a configuration attribute: its file key, doc and check in one place.

Each attribute of a section is declared with :func:`setting` (or :func:`duration`, or
:func:`section` for a nested section)::

    port: int = setting(50051, key="port", doc="Port to listen on.", check=between(1, 65535))

The declaration is all there is: the file's converter reads the key and runs the check, ``joblet
config print`` writes the doc above the key, and the check also runs as an attrs validator, so a
``Config`` built in code (the harness, tests, benchmarks) is refused for the same reasons as the
file.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, TypeVar

import attrs

from joblet.config.checks import Check, ElementError
from joblet.config.durations import parse_duration

T = TypeVar("T")

_METADATA_KEY = "joblet.config"


class _OffMarker:
    def __repr__(self) -> str:
        return "or off"


#: The marker inside :data:`OrOff`.
OR_OFF: Final = _OffMarker()
#: A string setting that may also be ``off``, written the way YAML reads as false (``off``,
#: ``no``, ``false`` unquoted): the file's converter turns that false back into ``"off"``.
OrOff = Annotated[str, OR_OFF]


def is_or_off(type_: object) -> bool:
    """Whether an attribute's (resolved) type is :data:`OrOff`."""
    return OR_OFF in getattr(type_, "__metadata__", ())


@attrs.frozen
class Setting:
    """What an attribute's declaration says about it.

    Attributes:
        key: Its key in the file (the spec's spelling: ``defaultCpuLimit``, ``grpc_socket``).
        doc: One or more lines for ``joblet config print``.
        check: What its value must satisfy, beyond its type.
    """

    key: str
    doc: str
    check: Check | None = None


def setting(default: Any, *, key: str, doc: str, check: Check | None = None) -> Any:
    """A configuration attribute (see the module docstring).

    Args:
        default: Its value when the file does not set it.
        key: Its key in the file.
        doc: Its documentation (``\\n`` separates lines).
        check: What its value must satisfy; it also runs when the class is built in code.
    """
    return attrs.field(
        default=default,
        validator=None if check is None else _validator(check),
        metadata={_METADATA_KEY: Setting(key, doc, check)},
    )


def duration(default: float, *, key: str, doc: str, check: Check | None = None) -> Any:
    """A :data:`~joblet.config.durations.Seconds` attribute, declared like :func:`setting`.

    Its value is converted by :func:`~joblet.config.durations.parse_duration`, in code as in the
    file: ``1`` becomes ``1.0``, ``"5m"`` ``300.0``, and a negative one is refused.
    """
    return attrs.field(
        default=default,
        converter=attrs.Converter(_seconds, takes_self=True, takes_field=True),
        validator=None if check is None else _validator(check),
        metadata={_METADATA_KEY: Setting(key, doc, check)},
    )


def section(cls: type[T], *, key: str, doc: str) -> Any:
    """An attribute that holds a nested section (a mapping in the file), by default ``cls()``."""
    return attrs.field(factory=cls, metadata={_METADATA_KEY: Setting(key, doc)})


def setting_of(field: attrs.Attribute[Any]) -> Setting:
    """The declaration of ``field``.

    Raises:
        TypeError: The attribute was not declared with :func:`setting`, :func:`duration` or
            :func:`section`.
    """
    declared = field.metadata.get(_METADATA_KEY)
    if not isinstance(declared, Setting):
        raise TypeError(f"configuration attribute {field.name!r} has no file key and doc")
    return declared


def _where(instance: object, field: attrs.Attribute[Any], exc: ValueError) -> str:
    suffix = exc.suffix if isinstance(exc, ElementError) else ""
    return f"{type(instance).__name__}.{field.name}{suffix}: {exc}"


def _validator(check: Check) -> Any:
    def validate(instance: object, field: attrs.Attribute[Any], value: object) -> None:
        try:
            check(value)
        except ValueError as exc:
            raise ValueError(_where(instance, field, exc)) from None

    return validate


def _seconds(value: object, instance: object, field: attrs.Attribute[Any]) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ValueError(_where(instance, field, exc)) from None
