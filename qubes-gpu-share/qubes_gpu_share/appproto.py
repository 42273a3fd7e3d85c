"""The application protocol: what a local program and its agent say.

Shared by both ends and owned by neither (agent/appserver.py serves it,
client.py speaks it), so that an application's library does not pull in
the agent. Pure: bytes in, checked objects out, no I/O. The transport is
a ``SOCK_SEQPACKET`` Unix socket, so every message is one packet: no
framing to get wrong, and a file descriptor travels with the packet it
belongs to (SCM_RIGHTS).

A message is one JSON object of printable ASCII. JSON, unlike the protocol's
header format, is what any program (C, Rust, a shell with jq) can speak to a
local socket; it is parsed as strictly as the qrexec protocol: a hard size
bound first, no duplicate keys, no NaN or Infinity, exactly the keys of the
message kind, integers that are not booleans, names checked by
:mod:`.names`, buffer descriptions by :mod:`.formats`. A bad request gets
one :class:`AppProtocolError` (one line) and changes nothing.

Requests (application -> agent), by ``op``:

* ``lease``   provider, buffer description, mode, ttl -> ``lease`` + fd
* ``offer``   consumer, buffer description, ttl, + the buffer's fd -> ``offer``
* ``next``    role (consumer: a buffer offered to us; provider: a buffer we
  export, to draw into), timeout -> ``lease`` + fd
* ``list``    -> ``list``
* ``release`` lease -> ``release``

A buffer description is ``fourcc`` with ``width``/``height`` (and optional
``modifier``), or ``fourcc: "BLOB"`` with ``bytes``.

Replies (agent -> application) carry ``reply``: the op they answer, or
``error`` with ``code`` and ``message``. The agent may also send, at any
time, ``{"event": "revoke", "lease": ID}``: dom0 revokes that lease; let go
of it (unmap, close the fd, send ``release``) promptly.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Union

from . import names
from .formats import (BLOB, BlobSpec, BufferMeta, BufferSpec, ImageSpec,
                       InvalidLayout, Plane, ReceiveMode, check_spec,
                       validate_meta)
from .oneline import one_line
from .protocol import MAX_TTL, LeaseEntry, Role

#: Longest request: every legal one is far smaller.
MAX_REQUEST = 1024
#: Longest reply; a lease list is cut to MAX_LIST_ENTRIES to fit.
MAX_REPLY = 128 * 1024
MAX_LIST_ENTRIES = 1024
#: Longest an application may ask ``next`` to wait, in seconds.
MAX_WAIT = 3600
DEFAULT_TTL = 3600


class AppProtocolError(ValueError):
    """A message that is not well formed; ``str()`` is one line."""


# --- requests ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LeaseReq:
    provider: str
    spec: BufferSpec
    mode: ReceiveMode
    ttl: int


@dataclasses.dataclass(frozen=True)
class OfferReq:
    consumer: str
    spec: BufferSpec
    ttl: int


@dataclasses.dataclass(frozen=True)
class NextReq:
    role: Role
    timeout: int


@dataclasses.dataclass(frozen=True)
class ListReq:
    pass


@dataclasses.dataclass(frozen=True)
class ReleaseReq:
    lease: str


Request = Union[LeaseReq, OfferReq, NextReq, ListReq, ReleaseReq]

_SPEC_KEYS = {"fourcc", "width", "height", "modifier", "bytes"}
_KEYS = {
    "lease": {"provider", "mode", "ttl"} | _SPEC_KEYS,
    "offer": {"consumer", "ttl"} | _SPEC_KEYS,
    "next": {"role", "timeout"},
    "list": set(),
    "release": {"lease"},
}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise AppProtocolError(f"duplicate key {key[:32]!r}")
        result[key] = value
    return result


def _refuse_constant(name: str) -> None:
    raise AppProtocolError(f"{name} is not a number here")


def load_object(untrusted_data: bytes, max_len: int) -> dict[str, Any]:
    """One JSON object, bounded and strict (the shared part of decoding)."""
    if len(untrusted_data) > max_len:
        raise AppProtocolError(f"message of {len(untrusted_data)} bytes is "
                               f"over the limit of {max_len}")
    if not untrusted_data.isascii() or not all(
            32 <= byte < 127 for byte in untrusted_data):
        raise AppProtocolError("message is not printable ASCII")
    try:
        untrusted_obj = json.loads(untrusted_data,
                                   object_pairs_hook=_no_duplicates,
                                   parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise AppProtocolError(f"not JSON: {exc.msg} at {exc.pos}") from None
    except RecursionError:
        raise AppProtocolError("message nested too deeply") from None
    if not isinstance(untrusted_obj, dict):
        raise AppProtocolError("message is not a JSON object")
    return untrusted_obj


def _int(untrusted_obj: dict, key: str, low: int, high: int,
         default: int | None = None) -> int:
    untrusted_value = untrusted_obj.get(key, default)
    if untrusted_value is None:
        raise AppProtocolError(f"missing {key!r}")
    if isinstance(untrusted_value, bool) or not isinstance(untrusted_value,
                                                           int):
        raise AppProtocolError(f"{key!r} must be an integer")
    if not low <= untrusted_value <= high:
        raise AppProtocolError(f"{key!r} {untrusted_value} is outside "
                               f"{low}..{high}")
    return untrusted_value


def _str(untrusted_obj: dict, key: str) -> str:
    untrusted_value = untrusted_obj.get(key)
    if not isinstance(untrusted_value, str):
        raise AppProtocolError(f"{key!r} must be a string")
    return untrusted_value


def _choice(untrusted_obj: dict, key: str, enum_cls):
    try:
        return enum_cls(_str(untrusted_obj, key))
    except ValueError:
        raise AppProtocolError(
            f"{key!r} must be one of "
            f"{', '.join(m.value for m in enum_cls)}") from None


def _qube(untrusted_obj: dict, key: str) -> str:
    try:
        return names.parse_qube_name(_str(untrusted_obj, key))
    except names.InvalidName as exc:
        raise AppProtocolError(str(exc)) from None


def _spec(untrusted_obj: dict) -> BufferSpec:
    fourcc = _str(untrusted_obj, "fourcc")
    extra = {"bytes"} if fourcc == BLOB else {"width", "height", "modifier"}
    stray = (_SPEC_KEYS - {"fourcc"} - extra) & untrusted_obj.keys()
    if stray:
        raise AppProtocolError(f"{sorted(stray)[0]!r} does not go with "
                               f"fourcc {fourcc[:8]!r}")
    try:
        if fourcc == BLOB:
            spec: BufferSpec = BlobSpec(_int(untrusted_obj, "bytes", 1,
                                             2**40))
        else:
            spec = ImageSpec(_int(untrusted_obj, "width", 1, 2**32),
                             _int(untrusted_obj, "height", 1, 2**32), fourcc,
                             _int(untrusted_obj, "modifier", 0, 2**64 - 1,
                                  default=0))
        return check_spec(spec)
    except InvalidLayout as exc:
        raise AppProtocolError(str(exc)) from None


def decode_request(untrusted_data: bytes) -> Request:
    """The request in one packet; AppProtocolError for anything else."""
    untrusted_obj = load_object(untrusted_data, MAX_REQUEST)
    untrusted_op = untrusted_obj.pop("op", None)
    if not isinstance(untrusted_op, str) or untrusted_op not in _KEYS:
        raise AppProtocolError(f"unknown op {str(untrusted_op)[:20]!r}")
    op = untrusted_op
    unknown = untrusted_obj.keys() - _KEYS[op]
    if unknown:
        raise AppProtocolError(f"unknown key {sorted(unknown)[0][:32]!r} "
                               f"for {op}")
    if op == "lease":
        return LeaseReq(_qube(untrusted_obj, "provider"),
                        _spec(untrusted_obj),
                        _choice(untrusted_obj, "mode", ReceiveMode),
                        _int(untrusted_obj, "ttl", 1, MAX_TTL, DEFAULT_TTL))
    if op == "offer":
        return OfferReq(_qube(untrusted_obj, "consumer"),
                        _spec(untrusted_obj),
                        _int(untrusted_obj, "ttl", 1, MAX_TTL, DEFAULT_TTL))
    if op == "next":
        return NextReq(_choice(untrusted_obj, "role", Role),
                       _int(untrusted_obj, "timeout", 0, MAX_WAIT, 0))
    if op == "list":
        return ListReq()
    try:
        return ReleaseReq(names.parse_lease_id(_str(untrusted_obj, "lease")))
    except names.InvalidName as exc:
        raise AppProtocolError(str(exc)) from None


def spec_fields(spec: BufferSpec) -> dict[str, Any]:
    """A buffer description as request keys (for the client)."""
    if isinstance(spec, BlobSpec):
        return {"fourcc": BLOB, "bytes": spec.nbytes}
    return {"fourcc": spec.fourcc, "width": spec.width,
            "height": spec.height, "modifier": spec.modifier}


def encode(obj: dict[str, Any]) -> bytes:
    """Any message of this protocol (requests, replies, events)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


# --- replies -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LeaseInfo:
    """A buffer handed to the application with its fd: which lease, which
    side, how to map it (``offset``/``length`` into the fd, cpu mode)."""

    lease: str
    role: Role
    peer: str
    mode: ReceiveMode
    meta: BufferMeta
    deadline: int
    offset: int
    length: int

    def to_reply(self) -> dict[str, Any]:
        meta = dataclasses.asdict(self.meta)
        meta["planes"] = [[p.stride, p.offset] for p in self.meta.planes]
        return {"reply": "lease", "lease": self.lease, "role": self.role.value,
                "peer": self.peer, "mode": self.mode.value, "meta": meta,
                "deadline": self.deadline, "offset": self.offset,
                "length": self.length}

    @classmethod
    def from_reply(cls, untrusted_obj: dict[str, Any]) -> LeaseInfo:
        try:
            untrusted_meta = untrusted_obj["meta"]
            meta = BufferMeta(
                untrusted_meta["pages"], untrusted_meta["width"],
                untrusted_meta["height"], untrusted_meta["fourcc"],
                untrusted_meta["modifier"],
                tuple(Plane(stride, offset)
                      for stride, offset in untrusted_meta["planes"]))
            validate_meta(meta, allowed_modifiers=None)
            return cls(names.parse_lease_id(untrusted_obj["lease"]),
                       Role(untrusted_obj["role"]),
                       names.parse_qube_name(untrusted_obj["peer"]),
                       ReceiveMode(untrusted_obj["mode"]), meta,
                       _int(untrusted_obj, "deadline", 0, 2**40),
                       _int(untrusted_obj, "offset", 0, 2**48),
                       _int(untrusted_obj, "length", 1, 2**40))
        except (KeyError, TypeError, ValueError) as exc:
            raise AppProtocolError(f"bad lease reply: {exc}") from None


def error_reply(code: str, message: str) -> dict[str, Any]:
    return {"reply": "error", "code": code, "message": one_line(message)}


def list_reply(entries: tuple[LeaseEntry, ...]) -> dict[str, Any]:
    shown = entries[:MAX_LIST_ENTRIES]
    return {"reply": "list", "more": len(entries) - len(shown),
            "leases": [entry.to_line().decode("ascii").rstrip("\n")
                       for entry in shown]}


def revoke_event(lease: str) -> dict[str, Any]:
    return {"event": "revoke", "lease": lease}
