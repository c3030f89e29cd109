"""Hypothesis strategies for protobuf requests, derived from the message descriptors.

:func:`request_values` walks a message's descriptor and gives a strategy for a *value tree*: a
dict from field name to a Python value (a dict for a nested message or a map, a list for a repeated
field), so every field of every request is fuzzed without naming it. Values are chosen by the
field's type (empty, huge, NUL bytes, surrogates, job-id-like, path-like strings; boundary and
out-of-range integers; NaN and infinities; out-of-range enum numbers; long and empty repeated
fields) and, where a :class:`Domain` knows the field by name, by its meaning too (ids of jobs that
exist and their prefixes, real commands, stream names, times).

A tree becomes bytes on the wire in one of two ways:

- :func:`build_message` sets it on the generated class, as an honest client would; protobuf refuses
  some values at the client (a lone surrogate, an int out of its type's range):
  :class:`ClientRejected`;
- :func:`encode_raw` writes the wire format itself, so the server also sees what a client library
  would refuse (invalid UTF-8, a 64-bit varint in an int32 field), plus unknown fields, wrong wire
  types and truncated messages (:func:`raw_extras`).
"""

from __future__ import annotations

import math
import struct
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

INT32 = (-(1 << 31), (1 << 31) - 1)
INT64 = (-(1 << 63), (1 << 63) - 1)
UINT32 = (0, (1 << 32) - 1)
UINT64 = (0, (1 << 64) - 1)
#: Integers a field of any type gets now and then: its bounds are added per type.
_INT_SPECIALS = (0, 1, -1, 2, 7, 100, 101, 1023, 1024, 4096, 1 << 20, 1 << 31, 1 << 32, 1 << 62)
#: Values a client library refuses for a typed field, but the wire can carry (raw mode).
_WIRE_INTS = (*INT64, *UINT64, 1 << 40, -(1 << 40))
#: Strings that mean something to a shell, a path, a parser or a terminal.
SPECIAL_STRINGS = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\n",
    "\r\n",
    "\t",
    ".",
    "..",
    "../..",
    "../../../../etc/passwd",
    "/",
    "/etc/shadow",
    "./x",
    "~",
    "*",
    "?",
    "-",
    "--",
    "--help",
    "-1",
    "0",
    "%s%s%n",
    "${PATH}",
    "$(id)",
    "`id`",
    "'",
    '"',
    "\\",
    "a=b",
    "\u202e",  # right-to-left override
    "\ufeff",  # byte-order mark
    "\u0085",
    "\U0010ffff",
    "\ud800",  # lone surrogates: protobuf refuses them at the client
    "\udfff",
    "a\udc80b",
    "😀",
    "é" * 3,
    "\x7f",
    "\x1b[2J",
)
#: Lengths of "huge" strings: around the per-argument and the message size limits of the daemon.
HUGE_LENGTHS = (4096, 4097, 131071, 131072, 200_000, 524_000, 524_288, 600_000)
#: Most elements of a "long" repeated field or map (MAX_ARGS is 8192).
LONG_REPEATED = (100, 8192, 8193, 20_000)


class ClientRejected(Exception):
    """protobuf refused the value tree at the client (the reason is the message)."""


class Huge(str):
    """A long string that shows as its length (Hypothesis prints every falsifying example)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<{len(self)} chars: {str.__repr__(self[:12])}...>"


class Many(list[Any]):
    """A long repeated field that shows as its length and first element."""

    def __repr__(self) -> str:
        return f"<{len(self)} x {self[0]!r}>" if self else "[]"


class ManyEntries(dict[Any, Any]):
    """A map with many entries that shows as its size."""

    def __repr__(self) -> str:
        return f"<{len(self)} entries like {next(iter(self.items()))!r}>" if self else "{}"


@st.composite
def _huge_text(draw: st.DrawFn) -> str:
    unit = draw(st.sampled_from(["x", "é", "😀", "\x00", "ab", " "]))
    n = draw(st.sampled_from(HUGE_LENGTHS))
    return Huge((unit * (n // len(unit.encode("utf-8")) + 1))[:n])


def job_id_like() -> st.SearchStrategy[str]:
    """Strings shaped like job ids that name no job: UUIDs, their prefixes, near misses."""
    fake = st.uuids(version=4).map(str)
    return st.one_of(
        fake,
        st.builds(lambda u, n: u[:n], fake, st.integers(1, 36)),
        fake.map(str.upper),
        fake.map(lambda u: u + "x"),
        fake.map(lambda u: u.replace("-", "")),
        fake.map(lambda u: "../" + u),
        fake.map(lambda u: u + "/.."),
        st.just(str(uuid.UUID(int=0))),
    )


def generic_text() -> st.SearchStrategy[str]:
    """Any string: short arbitrary unicode (surrogates included), specials, huge, id-like."""
    return st.one_of(
        st.sampled_from(SPECIAL_STRINGS),
        # Every code point, surrogates included (Hypothesis' default leaves them out).
        st.text(st.characters(codec=None, exclude_categories=()), max_size=40),
        st.text(max_size=8).map(lambda s: s + "\x00" + s),
        job_id_like(),
        _huge_text(),
    )


def _int_strategy(low: int, high: int) -> st.SearchStrategy[int]:
    bounds = (low, high, low + 1, high - 1)
    specials = sorted({v for v in _INT_SPECIALS + bounds + tuple(-v for v in _INT_SPECIALS)})
    in_range = [v for v in specials if low <= v <= high]
    return st.one_of(
        st.sampled_from(in_range),
        st.integers(low, high),
        # Out of the type's range: only raw mode can send them.
        st.sampled_from([v for v in _WIRE_INTS if not low <= v <= high] or [high]),
    )


_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: INT32,
    FieldDescriptor.TYPE_SINT32: INT32,
    FieldDescriptor.TYPE_SFIXED32: INT32,
    FieldDescriptor.TYPE_INT64: INT64,
    FieldDescriptor.TYPE_SINT64: INT64,
    FieldDescriptor.TYPE_SFIXED64: INT64,
    FieldDescriptor.TYPE_UINT32: UINT32,
    FieldDescriptor.TYPE_FIXED32: UINT32,
    FieldDescriptor.TYPE_UINT64: UINT64,
    FieldDescriptor.TYPE_FIXED64: UINT64,
}

#: A domain strategy for a field by its qualified name (``RunJobReq.command``, a map's parts as
#: ``RunJobReq.environment.key``), or None: the field has no special meaning.
FieldHook = Callable[[str], st.SearchStrategy[Any] | None]


def scalar_values(
    field: FieldDescriptor,
    hook: FieldHook | None = None,
    name: str | None = None,
    depth: int = 0,
    *,
    only_domain: bool = False,
) -> st.SearchStrategy[Any]:
    """Values for one element of ``field`` (not its repetition), by type and by domain.

    Args:
        field: The field.
        hook: Domain strategies by qualified field name.
        name: The name the hook knows the field by (default ``<message>.<field>``).
        depth: How deep in the request the field is.
        only_domain: Where the hook knows the field, only its values (no generic ones).
    """
    t = field.type
    generic: st.SearchStrategy[Any]
    if t == FieldDescriptor.TYPE_STRING:
        generic = generic_text()
    elif t == FieldDescriptor.TYPE_BYTES:
        generic = st.one_of(st.binary(max_size=64), _huge_text().map(lambda t: t.encode()))
    elif t in _INT_RANGES:
        generic = _int_strategy(*_INT_RANGES[t])
    elif t == FieldDescriptor.TYPE_BOOL:
        generic = st.one_of(st.booleans(), st.sampled_from([2, 255, 1 << 63]))
    elif t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        generic = st.one_of(
            st.floats(width=64 if t == FieldDescriptor.TYPE_DOUBLE else 32),
            st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf, 5e-324]),
        )
    elif t == FieldDescriptor.TYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        generic = st.one_of(st.sampled_from(numbers), _int_strategy(*INT32))
    elif t == FieldDescriptor.TYPE_MESSAGE:
        generic = request_values(field.message_type, hook, depth=depth + 1, only_domain=only_domain)
    else:  # groups: not in proto3
        raise TypeError(f"unsupported field type {t} of {field.full_name}")
    domain = hook(name or f"{field.containing_type.name}.{field.name}") if hook else None
    if domain is None:
        return generic
    # Domain values two times in three: they reach past the first checks.
    return domain if only_domain else st.one_of(domain, domain, generic)


def _is_map(field: FieldDescriptor) -> bool:
    return bool(
        field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry
    )


def approx_size(value: Any) -> int:
    """About how many bytes ``value`` (a value tree or part of one) takes on the wire."""
    if isinstance(value, str):
        return len(value) * 4 if len(value) < 64 else len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, dict):
        return sum(approx_size(k) + approx_size(v) + 4 for k, v in value.items())
    if isinstance(value, list):
        return sum(approx_size(v) + 2 for v in value)
    return 10


def _small(value: Any) -> bool:
    return approx_size(value) <= 256


def _repeated(elements: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    return st.one_of(
        st.just([]),
        st.lists(elements, max_size=6),
        # Long: one small value many times (thousands of distinct draws are too slow, and
        # thousands of huge ones far beyond any message size limit).
        st.builds(
            lambda v, n: Many([v] * n), elements.filter(_small), st.sampled_from(LONG_REPEATED)
        ),
    )


def field_values(
    field: FieldDescriptor,
    hook: FieldHook | None = None,
    depth: int = 0,
    *,
    only_domain: bool = False,
) -> st.SearchStrategy[Any]:
    """Values for ``field`` as a whole: a scalar, a list (repeated) or a dict (map)."""
    name = f"{field.containing_type.name}.{field.name}"
    if _is_map(field):
        key_field = field.message_type.fields_by_name["key"]
        value_field = field.message_type.fields_by_name["value"]
        keys = scalar_values(key_field, hook, f"{name}.key", depth, only_domain=only_domain)
        values = scalar_values(value_field, hook, f"{name}.value", depth, only_domain=only_domain)
        many: st.SearchStrategy[dict[Any, Any]] = st.just({})
        if key_field.type == FieldDescriptor.TYPE_STRING:
            many = st.builds(
                lambda v, n: ManyEntries({f"K{i}": v for i in range(n)}),
                values.filter(_small),
                st.sampled_from(LONG_REPEATED),
            )
        return st.one_of(st.dictionaries(keys, values, max_size=6), many)
    elements = scalar_values(field, hook, name, depth, only_domain=only_domain)
    if field.is_repeated:
        return _repeated(elements)
    return elements


def request_values(
    descriptor: Descriptor,
    hook: FieldHook | None = None,
    *,
    depth: int = 0,
    only_domain: bool = False,
) -> st.SearchStrategy[dict[str, Any]]:
    """Value trees for a message: every field optional, each from :func:`field_values`
    (with ``only_domain``, the fields the hook knows are always there).

    Nested messages are fuzzed to a depth of 3 (none of our requests nests deeper).
    """
    if depth > 3:
        return st.just({})
    required: dict[str, st.SearchStrategy[Any]] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for f in descriptor.fields:
        values = field_values(f, hook, depth, only_domain=only_domain)
        # With domain values only, a field the domain knows is always set (an id, a command).
        known = only_domain and hook is not None and hook(f"{descriptor.name}.{f.name}") is not None
        (required if known else optional)[f.name] = values
    return st.fixed_dictionaries(required, optional=optional)


# --- from a value tree to bytes ------------------------------------------------------------------


def build_message(cls: Any, tree: dict[str, Any]) -> Any:
    """The message of class ``cls`` with the tree's values, as a client sets them.

    Raises:
        ClientRejected: protobuf refuses a value (its reason is the message).
    """
    msg = cls()
    try:
        _fill(msg, tree)
    except (ValueError, TypeError, UnicodeError, OverflowError) as exc:
        raise ClientRejected(f"{type(exc).__name__}: {exc}") from exc
    return msg


def _fill(msg: Any, tree: dict[str, Any]) -> None:
    fields = msg.DESCRIPTOR.fields_by_name
    for name, value in tree.items():
        field = fields[name]
        target = getattr(msg, name)
        if _is_map(field):
            value_field = field.message_type.fields_by_name["value"]
            for k, v in value.items():
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    _fill(target[k], v)
                else:
                    target[k] = v
        elif field.is_repeated:
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                for v in value:
                    _fill(target.add(), v)
            else:
                target.extend(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            target.SetInParent()
            _fill(target, value)
        else:
            setattr(msg, name, value)


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _zigzag(value: int, bits: int) -> int:
    return ((value << 1) ^ (value >> (bits - 1))) & ((1 << bits) - 1)


_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _scalar_wire(field: FieldDescriptor, value: Any) -> tuple[int, bytes]:
    """(wire type, payload) of one value of ``field``, whatever its range."""
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        # surrogatepass: a lone surrogate becomes the invalid UTF-8 a client would refuse.
        return _LEN, value.encode("utf-8", "surrogatepass")
    if t == FieldDescriptor.TYPE_BYTES:
        return _LEN, bytes(value)
    if t == FieldDescriptor.TYPE_MESSAGE:
        return _LEN, encode_raw(field.message_type, value)
    if t in (FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64):
        return _VARINT, _varint(_zigzag(int(value), 64))
    if t in (FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32):
        return _I32, struct.pack("<I", int(value) & 0xFFFFFFFF)
    if t in (FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64):
        return _I64, struct.pack("<Q", int(value) & ((1 << 64) - 1))
    if t == FieldDescriptor.TYPE_DOUBLE:
        return _I64, struct.pack("<d", value)
    if t == FieldDescriptor.TYPE_FLOAT:
        try:
            return _I32, struct.pack("<f", value)
        except OverflowError:  # a double beyond float's range: what a client would round it to
            return _I32, struct.pack("<f", math.copysign(math.inf, value))
    return _VARINT, _varint(int(value))  # int32/64, uint32/64, bool, enum


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _tag(number, _LEN) + _varint(len(payload)) + payload


def encode_raw(descriptor: Descriptor, tree: dict[str, Any]) -> bytes:
    """The wire format of the tree, with no client-side check (see the module docstring)."""
    out = bytearray()
    for name, value in tree.items():
        field = descriptor.fields_by_name[name]
        if _is_map(field):
            entry = field.message_type
            for k, v in value.items():
                out += _length_delimited(field.number, encode_raw(entry, {"key": k, "value": v}))
        elif field.is_repeated:
            wires = [_scalar_wire(field, v) for v in value]
            if wires and all(w != _LEN for w, _ in wires):
                out += _length_delimited(field.number, b"".join(p for _, p in wires))  # packed
            else:
                for wire, payload in wires:
                    out += _emit(field.number, wire, payload)
        else:
            out += _emit(field.number, *_scalar_wire(field, value))
    return bytes(out)


def _emit(number: int, wire: int, payload: bytes) -> bytes:
    if wire == _LEN:
        return _length_delimited(number, payload)
    return _tag(number, wire) + payload


@st.composite
def raw_extras(draw: st.DrawFn, descriptor: Descriptor) -> Callable[[bytes], bytes]:
    """A mangling of an encoded request: unknown fields, wrong wire types, truncation, garbage."""
    numbers = [f.number for f in descriptor.fields] or [1]
    kind = draw(st.sampled_from(["unknown", "wrong-wire-type", "truncate", "garbage", "repeat"]))
    if kind == "unknown":
        number = draw(st.integers(1, (1 << 29) - 1).filter(lambda n: n not in numbers))
        extra = _emit(number, _VARINT, _varint(draw(st.integers(0, (1 << 64) - 1))))
        return lambda data: data + extra
    if kind == "wrong-wire-type":
        number = draw(st.sampled_from(numbers))
        wire = draw(st.sampled_from([_VARINT, _I64, _LEN, _I32]))
        payload = {_VARINT: b"\x01", _I64: b"\0" * 8, _LEN: b"\x02ab", _I32: b"\0" * 4}[wire]
        extra = _tag(number, wire) + payload
        return lambda data: data + extra
    if kind == "truncate":
        cut = draw(st.integers(1, 8))
        return lambda data: data[:-cut] if len(data) > cut else data + b"\x0a\x05ab"
    if kind == "garbage":
        junk = draw(st.binary(min_size=1, max_size=32))
        return lambda data: data + junk
    return lambda data: data + data  # every field twice: scalars last-wins, repeated doubled


def describe(tree: Any, limit: int = 300) -> str:
    """The tree for a failure message, with long strings and lists shortened."""

    def short(value: Any) -> Any:
        if isinstance(value, str | bytes) and len(value) > 40:
            return f"{value[:20]!r}...<{len(value)} long>"
        if isinstance(value, list):
            if len(value) > 6:
                return [short(v) for v in value[:3]] + [f"...<{len(value)} items>"]
            return [short(v) for v in value]
        if isinstance(value, dict):
            items = list(value.items())
            shown = {short(k): short(v) for k, v in items[:6]}
            if len(items) > 6:
                shown["..."] = f"<{len(items)} entries>"
            return shown
        return value

    text = repr(short(tree))
    return text if len(text) <= limit else text[:limit] + "..."


def methods_of(service: Any) -> Sequence[Any]:
    """A service descriptor's methods, in the order of the proto."""
    return list(service.methods)
