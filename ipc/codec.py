"""Typed messages over msgpack: a dataclass per message, a `type` tag, strict validation.

    @message("load")
    @dataclass(frozen=True)
    class Load:
        unit: int
        slot: int

    raw = encode(Load(3, 0))        # b'\x83\xa4type\xa4load...'
    msg = decode(raw)               # Load(unit=3, slot=0), or ProtocolError

`decode` never trusts its input: garbage bytes, an unknown tag, a missing or extra field or a value
of the wrong type raise `ProtocolError` with a message fit for an error reply. No pickle anywhere.
The size limit is the CLIENT limit (`MAX_REQUEST_BYTES`): a larger request is refused with an error
reply naming its size (`peek_request_id` finds whom to tell without decoding it). Frames over
`MAX_FRAME_BYTES` (above it) are not even buffered: the public socket drops their connection.
Messages between the coordinator and its own workers are bound by neither (`decode(raw,
max_bytes=None)`): one weight pass may carry many MiB of prompt token ids. So, from the edge in:
HTTP body limit < MAX_REQUEST_BYTES < MAX_FRAME_BYTES < internal links (unbounded).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import msgpack

MAX_REQUEST_BYTES = 1 << 20  # client messages are small; weight bytes never cross a socket
MAX_FRAME_BYTES = 4 << 20  # the public socket's zmq.MAXMSGSIZE: larger frames drop their connection
_REGISTRY: dict[str, type] = {}


class ProtocolError(ValueError):
    """A message that cannot be decoded or does not match its declared type."""


def message(tag: str):
    """Class decorator registering a frozen dataclass as the message with `type == tag`."""
    def register(cls):
        assert dataclasses.is_dataclass(cls), cls
        assert tag not in _REGISTRY, f"duplicate message tag {tag!r}"
        cls.TYPE = tag
        cls._hints = None  # resolved lazily: annotations are strings under `from __future__`
        _REGISTRY[tag] = cls
        return cls
    return register


def encode(msg: Any) -> bytes:
    assert type(msg).TYPE in _REGISTRY, f"not a registered message: {msg!r}"
    d = {"type": type(msg).TYPE, **dataclasses.asdict(msg)}
    return msgpack.packb(d, use_bin_type=True)


def decode(raw: bytes, max_bytes: int | None = MAX_REQUEST_BYTES) -> Any:
    """One message from `raw`; `max_bytes=None` for internal (coordinator-worker) messages."""
    if max_bytes is not None and len(raw) > max_bytes:
        raise ProtocolError(too_large(len(raw), max_bytes))
    try:
        d = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"not a msgpack message: {type(e).__name__}") from None
    if not isinstance(d, dict):
        raise ProtocolError("a message must be a msgpack map")
    tag = d.pop("type", None)
    cls = _REGISTRY.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {tag!r}")
    return from_dict(cls, d)


def too_large(nbytes: int, limit: int = MAX_REQUEST_BYTES) -> str:
    return f"message of {nbytes} bytes exceeds the {limit}-byte limit"


def peek_request_id(raw: bytes) -> str:
    """The `request_id` of a message that will not be decoded (too large, malformed), where one
    can be read, else "": the error reply then reaches the request that caused it. Other fields
    are skipped, not unpacked, so a huge prompt costs no copy."""
    try:
        u = msgpack.Unpacker(raw=False, max_buffer_size=max(len(raw), 1))
        u.feed(raw)
        for _ in range(min(u.read_map_header(), 64)):
            key = u.unpack()
            if key == "request_id":
                rid = u.unpack()
                return rid if isinstance(rid, str) and len(rid) <= 128 else ""
            u.skip()
    except Exception:  # msgpack raises several unrelated types on garbage
        pass
    return ""


def from_dict(cls: type, d: dict) -> Any:
    if cls._hints is None:
        cls._hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    extra = set(d) - set(fields)
    if extra:
        raise ProtocolError(f"{cls.TYPE}: unknown field(s) {sorted(extra, key=repr)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in d:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{cls.TYPE}: missing field {name!r}")
            continue
        kwargs[name] = _check(d[name], cls._hints[name], f"{cls.TYPE}.{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # __post_init__ validation
        raise ProtocolError(f"{cls.TYPE}: {e}") from None


def _fast_items(value, item) -> list | None:
    """`value`'s items as `_check` would return them when `item` is int or a fixed tuple of ints
    and every item matches (bool is not an int here); None otherwise (the slow path then names
    the bad item). A MoE block's Run lends up to hundreds of [unit, offset] pairs, a prompt is
    thousands of ids: checking them one call per item cost milliseconds per message."""
    if item is int:
        return list(value) if all(type(v) is int for v in value) else None
    if typing.get_origin(item) is tuple:
        args = typing.get_args(item)
        if args and all(a is int for a in args):
            n = len(args)
            if all(type(v) in (list, tuple) and len(v) == n and all(type(x) is int for x in v)
                   for v in value):
                return [tuple(v) for v in value]
    return None


def _check(value: Any, hint: Any, where: str) -> Any:
    """Return `value` (lists converted to tuples where the hint says tuple) if it matches `hint`."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for alt in typing.get_args(hint):
            try:
                return _check(value, alt, where)
            except ProtocolError:
                pass
        raise ProtocolError(f"{where}: {type(value).__name__} is not {hint}")
    if hint is type(None):
        if value is None:
            return None
        raise ProtocolError(f"{where}: expected null")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ProtocolError(f"{where}: expected a list, got {type(value).__name__}")
        args = typing.get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ProtocolError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_check(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        fast = _fast_items(value, item)  # token ids, [unit, offset] pairs: no per-item recursion
        out = fast if fast is not None else [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a map, got {type(value).__name__}")
        kt, vt = typing.get_args(hint) or (Any, Any)
        return {_check(k, kt, f"{where} key"): _check(v, vt, f"{where}[{k!r}]") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a map, got {type(value).__name__}")
        return from_dict(hint, dict(value)) if hasattr(hint, "TYPE") else _plain(hint, value, where)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ProtocolError(f"{where}: expected a number, got {type(value).__name__}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ProtocolError(f"{where}: expected an integer, got {type(value).__name__}")
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise ProtocolError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
    raise AssertionError(f"unsupported type hint {hint!r} at {where}")


def _plain(cls: type, d: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if set(d) - names:  # keys of any type (msgpack maps may have int or bytes keys): sort by repr
        raise ProtocolError(f"{where}: unknown field(s) {sorted(set(d) - names, key=repr)}")
    try:
        return cls(**{k: _check(v, hints[k], f"{where}.{k}") for k, v in d.items()})
    except TypeError as e:
        raise ProtocolError(f"{where}: {e}") from None
