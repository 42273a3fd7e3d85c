"""Every message that crosses a qrexec boundary, with encode and decode.

Pure: bytes in, objects out, no I/O. docs/protocol.md describes the wire
format with an example of each message. In short::

    qubes-gpu-share/1\\n       magic and version
    lease-answer\\n            message type
    key=value\\n ...           known keys only, each at most once
    \\n                        end of header
    <payload>                 refs: count x little-endian u32 (count in the
                              header); lease list: count text lines

Why so strict: the broker in dom0 reads these bytes from qubes it must not
trust, and agents read them from a broker they should not have to trust
blindly. Every decoder:

* refuses input longer than the type's fixed maximum (:data:`MAX_SIZE`)
  before parsing anything, so the I/O layer can do bounded reads;
* accepts printable ASCII only, ``key=value`` lines with no blanks around
  values, decimal integers with no sign or leading zero, names checked by
  :mod:`.names` and buffer layouts checked by :mod:`.formats`;
* raises :class:`ProtocolError` (a ``ValueError`` with a one-line reason)
  and nothing else, whatever the input.

Messages validate themselves on construction, so whatever encodes also
decodes, to an equal message.
"""

from __future__ import annotations

import array
import collections.abc
import contextlib
import dataclasses
import enum
import re
import sys
from collections.abc import Iterable, Iterator
from typing import ClassVar, Union

from . import names, uint
from .lease import State
from .oneline import MAX_LEN, one_line
from .formats import (
    BLOB, MAX_LEASE_PAGES, MAX_PLANES, BlobSpec, BufferMeta, BufferSpec,
    ImageSpec, InvalidLayout, Plane, ReceiveMode, check_spec, validate_meta)

MAGIC = b"qubes-gpu-share/1"
#: Every header (magic, type, keys, blank line) fits in this many bytes.
MAX_HEADER = 1024
#: The most leases one qube sees in a lease list.
MAX_LIST_LEASES = 4096
#: A lease-list line: "ID ROLE PEER STATE PAGES MODE DEADLINE\n" at most.
MAX_LIST_LINE = 32 + 1 + 8 + 1 + 31 + 1 + 16 + 1 + 5 + 1 + 6 + 1 + 13 + 1
REF_SIZE = 4
MAX_DOMID = names.MAX_DOMID
MAX_TTL = 365 * 24 * 3600
MAX_DEADLINE = 2**40
MAX_TEXT = MAX_LEN

_LINE = re.compile(
    rb"([a-z][a-z0-9-]{0,31})=([\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?)")
_TOKEN = re.compile(r"[a-z][a-z0-9-]{0,39}")
_TEXT = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,%d}[\x21-\x7e])?"
                   % (MAX_TEXT - 2))


class ProtocolError(ValueError):
    """A message that is not well formed; ``str()`` is one line."""

    #: the Error reason code an answering service sends for it
    code = "malformed"


class MessageType(str, enum.Enum):
    """The second line of every message."""

    LEASE_REQUEST = "lease-request"
    OFFER_REQUEST = "offer-request"
    EXPORT_REQUEST = "export-request"
    EXPORT_ANSWER = "export-answer"
    LEASE_ANSWER = "lease-answer"
    RELEASE_REQUEST = "release-request"
    REVOKE_REQUEST = "revoke-request"
    REVOKE_ANSWER = "revoke-answer"
    LIST_REQUEST = "list-request"
    LEASE_LIST = "lease-list"
    OK = "ok"
    ERROR = "error"


class Role(str, enum.Enum):
    """Which side of a lease a qube is on."""

    CONSUMER = "consumer"
    PROVIDER = "provider"


class RevokeStatus(str, enum.Enum):
    """An agent's answer to a revoke request."""

    RELEASED = "released"
    BUSY = "busy"


# --- value checks (one place for every range and charset) -----------------

@contextlib.contextmanager
def _reason_as_protocol_error() -> Iterator[None]:
    """Names and layouts have their own checks; report them as ours."""
    try:
        yield
    except (InvalidLayout, names.InvalidName) as exc:
        raise ProtocolError(str(exc)) from None


def _check_uint(what: str, value: int, high: int, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{what} must be an integer")
    if not low <= value <= high:
        raise ProtocolError(f"{what} {value} is outside {low}..{high}")
    return value


def _check_pattern(what: str, pattern: re.Pattern, value: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ProtocolError(f"invalid {what} {str(value)[:40]!r}")
    return value


def _check_enum(enum_cls: type[enum.Enum], value,
                label: str | None = None) -> enum.Enum:
    try:
        return enum_cls(value)
    except ValueError:
        raise ProtocolError(
            f"invalid {label or 'value'} {str(value)[:20]!r}: not a "
            f"{enum_cls.__name__}") from None


def _set_enum(message, name: str, enum_cls: type[enum.Enum]) -> None:
    """Check an enum field of a frozen message and store the enum member,
    so that "cpu" and ReceiveMode.CPU make the same message."""
    object.__setattr__(message, name,
                       _check_enum(enum_cls, getattr(message, name), name))


def _check_qube(value: str) -> str:
    with _reason_as_protocol_error():
        return names.parse_qube_name(value)


def _check_lease(value: str) -> str:
    with _reason_as_protocol_error():
        return names.parse_lease_id(value)


# --- grant refs ----------------------------------------------------------

_REF_TYPECODE = "I" if array.array("I").itemsize == REF_SIZE else "L"
_LITTLE = sys.byteorder == "little"


class GrantRefs(collections.abc.Sequence):
    """An immutable array of grant refs kept as its wire bytes.

    65,535 refs in a Python tuple cost a millisecond to build; kept as
    little-endian u32 bytes they are decoded and encoded with one copy, and
    read as a sequence of ints through a memoryview.
    """

    __slots__ = ("_data", "_ints")

    def __init__(self, le_bytes: bytes):
        if len(le_bytes) % REF_SIZE:
            raise ProtocolError("grant ref array is not a whole number of u32")
        self._data = bytes(le_bytes)
        if _LITTLE:
            self._ints = memoryview(self._data).cast(_REF_TYPECODE)
        else:  # pragma: no cover - x86 and arm64 qubes are little-endian
            self._ints = array.array(_REF_TYPECODE, self._data)
            self._ints.byteswap()

    @classmethod
    def from_ints(cls, refs: Iterable[int]) -> GrantRefs:
        """Refs from the grant device, each a u32."""
        try:
            ints = array.array(_REF_TYPECODE, refs)
        except (OverflowError, TypeError) as exc:
            raise ProtocolError(f"grant ref is not a u32: {exc}") from None
        if not _LITTLE:  # pragma: no cover
            ints.byteswap()
        return cls(ints.tobytes())

    def to_bytes(self) -> bytes:
        return self._data

    def __len__(self) -> int:
        return len(self._data) // REF_SIZE

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._ints[index].tolist()
        return self._ints[index]

    def __iter__(self) -> Iterator[int]:
        return iter(self._ints)

    def __eq__(self, other) -> bool:
        if isinstance(other, GrantRefs):
            return self._data == other._data
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._data)

    def __repr__(self) -> str:
        head = ", ".join(map(str, self[:4]))
        return f"GrantRefs([{head}{', ...' if len(self) > 4 else ''}], " \
               f"n={len(self)})"


# --- untrusted header fields ----------------------------------------------

def _parse_uint(what: str, untrusted_value: str) -> int:
    """Syntax only (digits, no sign, no leading zero, no blanks); ranges
    are checked by the message the number goes into."""
    value = uint.parse_uint(untrusted_value)
    if value is None:
        raise ProtocolError(
            f"{what} is not a plain decimal number: {untrusted_value[:24]!r}")
    return value


#
class _Fields:
    """The key=value pairs of one header, taken out one by one so that a key
    nobody asked for is caught at the end (:meth:`finish`)."""

    def __init__(self, untrusted_items: dict[str, str]):
        self._untrusted = untrusted_items

    def text(self, key: str) -> str:
        """The raw value, still untrusted: the message's checks validate."""
        try:
            return self._untrusted.pop(key)
        except KeyError:
            raise ProtocolError(f"missing key {key!r}") from None

    def has(self, key: str) -> bool:
        return key in self._untrusted

    def uint(self, key: str) -> int:
        return _parse_uint(key, self.text(key))

    def finish(self) -> None:
        if self._untrusted:
            raise ProtocolError(
                f"unknown key {sorted(self._untrusted)[0]!r}")


# --- buffer descriptions and metadata on the wire --------------------------

def _spec_fields(spec: BufferSpec) -> list[tuple[str, object]]:
    if isinstance(spec, BlobSpec):
        return [("fourcc", BLOB), ("bytes", spec.nbytes)]
    return [("fourcc", spec.fourcc), ("width", spec.width),
            ("height", spec.height), ("modifier", spec.modifier)]


def _parse_spec(fields: _Fields) -> BufferSpec:
    untrusted_fourcc = fields.text("fourcc")
    if untrusted_fourcc == BLOB:
        return BlobSpec(fields.uint("bytes"))
    return ImageSpec(fields.uint("width"), fields.uint("height"),
                     untrusted_fourcc, fields.uint("modifier"))


def _check_spec(spec: BufferSpec) -> None:
    with _reason_as_protocol_error():
        check_spec(spec)


def _meta_fields(meta: BufferMeta) -> list[tuple[str, object]]:
    pairs: list[tuple[str, object]] = [
        ("pages", meta.pages), ("fourcc", meta.fourcc),
        ("width", meta.width), ("height", meta.height),
        ("modifier", meta.modifier)]
    for index, plane in enumerate(meta.planes):
        pairs += [(f"plane{index}-stride", plane.stride),
                  (f"plane{index}-offset", plane.offset)]
    return pairs


def _parse_meta(fields: _Fields) -> BufferMeta:
    planes = []
    for index in range(MAX_PLANES):
        if not fields.has(f"plane{index}-stride"):
            break
        planes.append(Plane(fields.uint(f"plane{index}-stride"),
                            fields.uint(f"plane{index}-offset")))
    return BufferMeta(fields.uint("pages"), fields.uint("width"),
                      fields.uint("height"), fields.text("fourcc"),
                      fields.uint("modifier"), tuple(planes))


def _check_meta(meta: BufferMeta) -> None:
    """Structurally legal; the admin's modifier policy and per-lease cap
    are the broker's to apply (formats.validate_meta with its limits)."""
    with _reason_as_protocol_error():
        validate_meta(meta, allowed_modifiers=None)


# --- messages ----------------------------------------------------------------

class _Message:
    """Base of every message: a frozen dataclass that checks itself."""

    TYPE: ClassVar[MessageType]
    #: header key holding the payload count: "refs" (binary u32 array),
    #: "leases" (text lines), or None (no payload)
    COUNT_KEY: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        """Raise ProtocolError unless every field is legal."""

    def _fields(self) -> list[tuple[str, object]]:
        return []

    def _payload(self) -> bytes:
        return b""

    @classmethod
    def _parse(cls, fields: _Fields, untrusted_payload: bytes):
        return cls()


@dataclasses.dataclass(frozen=True)
class LeaseRequest(_Message):
    """Consumer -> broker (qubes.GpuLease+PROVIDER): lend me a buffer."""

    TYPE = MessageType.LEASE_REQUEST
    spec: BufferSpec
    mode: ReceiveMode
    ttl: int

    def _check(self) -> None:
        _check_spec(self.spec)
        _set_enum(self, "mode", ReceiveMode)
        _check_uint("ttl", self.ttl, MAX_TTL, low=1)

    def _fields(self):
        return _spec_fields(self.spec) + [("mode", self.mode.value),
                                          ("ttl", self.ttl)]

    @classmethod
    def _parse(cls, fields, untrusted_payload):
        return cls(_parse_spec(fields), fields.text("mode"),
                   fields.uint("ttl"))


@dataclasses.dataclass(frozen=True)
class OfferRequest(_Message):
    """Offering qube -> broker (qubes.GpuOffer+CONSUMER). On acceptance the
    broker sends an ExportRequest on the same connection, the qube answers
    with an ExportAnswer (or Error), and the broker ends with Ok or Error."""

    TYPE = MessageType.OFFER_REQUEST
    spec: BufferSpec
    ttl: int

    def _check(self) -> None:
        _check_spec(self.spec)
        _check_uint("ttl", self.ttl, MAX_TTL, low=1)

    def _fields(self):
        return _spec_fields(self.spec) + [("ttl", self.ttl)]

    @classmethod
    def _parse(cls, fields, untrusted_payload):
        return cls(_parse_spec(fields), fields.uint("ttl"))


@dataclasses.dataclass(frozen=True)
class ExportRequest(_Message):
    """Broker -> provider (qubes.GpuExport, or on an offer connection):
    allocate this layout and grant it to this domain."""

    TYPE = MessageType.EXPORT_REQUEST
    lease: str
    consumer: str
    consumer_domid: int
    meta: BufferMeta

    def _check(self) -> None:
        _check_lease(self.lease)
        _check_qube(self.consumer)
        _check_uint("consumer-domid", self.consumer_domid, MAX_DOMID)
        _check_meta(self.meta)

    def _fields(self):
        return [("lease", self.lease), ("consumer", self.consumer),
                ("consumer-domid", self.consumer_domid)] \
            + _meta_fields(self.meta)

    @classmethod
    def _parse(cls, fields, untrusted_payload):
        return cls(fields.text("lease"), fields.text("consumer"),
                   fields.uint("consumer-domid"), _parse_meta(fields))


@dataclasses.dataclass(frozen=True)
class ExportAnswer(_Message):
    """Provider -> broker: one grant ref per page. The broker checks the
    count against the lease's pages (:meth:`check_pages`)."""

    TYPE = MessageType.EXPORT_ANSWER
    COUNT_KEY = "refs"
    refs: GrantRefs

    def _check(self) -> None:
        if not isinstance(self.refs, GrantRefs):
            raise ProtocolError("refs must be GrantRefs")
        _check_uint("refs", len(self.refs), MAX_LEASE_PAGES, low=1)

    def check_pages(self, pages: int) -> ExportAnswer:
        if len(self.refs) != pages:
            raise ProtocolError(
                f"provider answered {len(self.refs)} refs for {pages} pages")
        return self

    def _payload(self) -> bytes:
        return self.refs.to_bytes()

    @classmethod
    def _parse(cls, fields, untrusted_payload):
        return cls(GrantRefs(untrusted_payload))


@dataclasses.dataclass(frozen=True)
class LeaseAnswer(_Message):
    """Broker -> consumer: the lease (also the body of qubes.GpuDeliver)."""

    TYPE = MessageType.LEASE_ANSWER
    COUNT_KEY = "refs"
    lease: str
    provider: str
    provider_domid: int
    mode: ReceiveMode
    meta: BufferMeta
    deadline: int
    refs: GrantRefs

    def _check(self) -> None:
        _check_lease(self.lease)
        _check_qube(self.provider)
        _check_uint("provider-domid", self.provider_domid, MAX_DOMID)
        _set_enum(self, "mode", ReceiveMode)
        _check_meta(self.meta)
        _check_uint("deadline", self.deadline, MAX_DEADLINE)
        ExportAnswer(self.refs).check_pages(self.meta.pages)

    def _fields(self):
        return [("lease", self.lease), ("provider", self.provider),
                ("provider-domid", self.provider_domid),
                ("mode", self.mode.value), ("deadline", self.deadline)] \
            + _meta_fields(self.meta)

    def _payload(self) -> bytes:
        return self.refs.to_bytes()

    @classmethod
    def _parse(cls, fields, untrusted_payload):
        return cls(fields.text("lease"), fields.text("provider"),
                   fields.uint("provider-domid"), fields.text("mode"),
                   _parse_meta(fields), fields.uint("deadline"),
                   GrantRefs(untrusted_payload))


@dataclasses.dataclass(frozen=True)
class ReleaseRequest(_Message):
    """Consumer -> broker (qubes.GpuRelease): I am done with this lease."""

    TYPE = MessageType.RELEASE_REQUEST
    lease: str

    def _check(self) -> None:
        _check_lease(self.lease)

    def _fields(self):
        return [("lease", self.lease)]

    @classmethod
    def _parse(cls, fields, untrusted_payload):
        return cls(fields.text("lease"))


@dataclasses.dataclass(frozen=True)
class RevokeRequest(_Message):
    """Broker -> agent (qubes.GpuRevoke). To the consumer: let go, then
    confirm. To the provider (only after the consumer confirmed): release
    the grant now."""

    TYPE = MessageType.REVOKE_REQUEST
    lease: str
    role: Role

    def _check(self) -> None:
        _check_lease(self.lease)
        _set_enum(self, "role", Role)

    def _fields(self):
        return [("lease", self.lease), ("role", self.role.value)]

    @classmethod
    def _parse(cls, fields, untrusted_payload):
        return cls(fields.text("lease"), fields.text("role"))


@dataclasses.dataclass(frozen=True)
class RevokeAnswer(_Message):
    """Agent -> broker: released, or still busy (with the reason).

    ``held_pages``, from a provider: how many of the lease's pages the
    consumer still maps, as its kernel says (IMP_TRY_RELEASE, or the
    simulator): they stay granted, so the lease is not over whatever the
    consumer claimed (issue 14). Absent: the kernel cannot tell. A
    released answer holds nothing (0 or absent).
    """

    TYPE = MessageType.REVOKE_ANSWER
    status: RevokeStatus
    reason: str | None = None
    held_pages: int | None = None

    def _check(self) -> None:
        _set_enum(self, "status", RevokeStatus)
        if (self.reason is None) != (self.status is RevokeStatus.RELEASED):
            raise ProtocolError("a reason comes with busy, and only with it")
        if self.reason is not None:
            _check_pattern("reason", _TEXT, self.reason)
        if self.held_pages is not None:
            _check_uint("held pages", self.held_pages, MAX_LEASE_PAGES)
            if self.held_pages and self.status is RevokeStatus.RELEASED:
                raise ProtocolError("released, yet pages held")

    def _fields(self):
        return [("status", self.status.value)] + \
            ([("reason", self.reason)] if self.reason is not None else []) \
            + ([("held", self.held_pages)] if self.held_pages is not None
               else [])

    @classmethod
    def _parse(cls, fields, untrusted_payload):
        return cls(fields.text("status"), fields.text("reason")
                   if fields.has("reason") else None,
                   fields.uint("held") if fields.has("held") else None)


@dataclasses.dataclass(frozen=True)
class ListRequest(_Message):
    """Qube -> broker (qubes.GpuLeases): which leases do I take part in?"""

    TYPE = MessageType.LIST_REQUEST


@dataclasses.dataclass(frozen=True)
class LeaseEntry:
    """One line of a lease list, as the asking qube sees it."""

    lease: str
    role: Role
    peer: str
    state: State
    pages: int
    mode: ReceiveMode
    deadline: int

    def __post_init__(self) -> None:
        _check_lease(self.lease)
        _set_enum(self, "role", Role)
        _check_qube(self.peer)
        _set_enum(self, "state", State)
        _check_uint("pages", self.pages, MAX_LEASE_PAGES, low=1)
        _set_enum(self, "mode", ReceiveMode)
        _check_uint("deadline", self.deadline, MAX_DEADLINE)

    def to_line(self) -> bytes:
        return (f"{self.lease} {self.role.value} {self.peer} {self.state.value} "
                f"{self.pages} {self.mode.value} {self.deadline}\n"
                ).encode("ascii")

    @classmethod
    def from_line(cls, untrusted_line: str) -> LeaseEntry:
        untrusted_words = untrusted_line.split(" ")
        if len(untrusted_words) != 7:
            raise ProtocolError("a lease line has 7 fields separated by "
                                "single spaces")
        lease, role, peer, state, pages, mode, deadline = untrusted_words
        return cls(lease, role, peer, state, _parse_uint("pages", pages),
                   mode, _parse_uint("deadline", deadline))


@dataclasses.dataclass(frozen=True)
class LeaseList(_Message):
    """Broker -> qube: the caller's leases, one text line each."""

    TYPE = MessageType.LEASE_LIST
    COUNT_KEY = "leases"
    leases: tuple[LeaseEntry, ...] = ()

    def _check(self) -> None:
        if not isinstance(self.leases, tuple) or not all(
                isinstance(entry, LeaseEntry) for entry in self.leases):
            raise ProtocolError("leases must be a tuple of LeaseEntry")
        _check_uint("leases", len(self.leases), MAX_LIST_LEASES)

    def _payload(self) -> bytes:
        return b"".join(entry.to_line() for entry in self.leases)

    @classmethod
    def _parse(cls, fields, untrusted_payload):
        untrusted_lines = untrusted_payload.decode("ascii").split("\n")[:-1]
        return cls(tuple(LeaseEntry.from_line(untrusted_line)
                         for untrusted_line in untrusted_lines))


@dataclasses.dataclass(frozen=True)
class Ok(_Message):
    """The request was done."""

    TYPE = MessageType.OK


@dataclasses.dataclass(frozen=True)
class Error(_Message):
    """The request was refused: a stable reason code for programs and a
    one-line message for people."""

    TYPE = MessageType.ERROR
    code: str
    message: str

    def _check(self) -> None:
        _check_pattern("error code", _TOKEN, self.code)
        _check_pattern("error message", _TEXT, self.message)

    @classmethod
    def of(cls, code: str, message: str) -> Error:
        """An Error from any text (e.g. an exception's), made one line."""
        return cls(code, one_line(message))

    def _fields(self):
        return [("code", self.code), ("message", self.message)]

    @classmethod
    def _parse(cls, fields, untrusted_payload):
        return cls(fields.text("code"), fields.text("message"))


Message = Union[LeaseRequest, OfferRequest, ExportRequest, ExportAnswer,
                LeaseAnswer, ReleaseRequest, RevokeRequest, RevokeAnswer,
                ListRequest, LeaseList, Ok, Error]
MESSAGES: dict[MessageType, type[_Message]] = {
    cls.TYPE: cls for cls in (
        LeaseRequest, OfferRequest, ExportRequest, ExportAnswer, LeaseAnswer,
        ReleaseRequest, RevokeRequest, RevokeAnswer, ListRequest, LeaseList,
        Ok, Error)}
_BY_TYPE_LINE = {mtype.value.encode("ascii"): cls
                 for mtype, cls in MESSAGES.items()}

#: Largest legal message of each type, in bytes: the bound of every read.
MAX_SIZE: dict[MessageType, int] = {
    mtype: MAX_HEADER + {
        "refs": REF_SIZE * MAX_LEASE_PAGES,
        "leases": MAX_LIST_LINE * MAX_LIST_LEASES,
        None: 0}[cls.COUNT_KEY]
    for mtype, cls in MESSAGES.items()}


def max_size_for(*expected: type[_Message], refs: int | None = None) -> int:
    """How many bytes to read at most when one of ``expected`` (default:
    any message) comes next; ``refs`` tightens it when the ref count is
    known (an ExportAnswer for a lease of that many pages)."""
    types = expected or tuple(MESSAGES.values())
    if refs is None:
        return max(MAX_SIZE[cls.TYPE] for cls in types)
    _check_uint("refs", refs, MAX_LEASE_PAGES, low=1)
    return MAX_HEADER + REF_SIZE * refs


# --- encode ----------------------------------------------------------------

def encode(message: _Message) -> bytes:
    """The wire form of a message (which checked itself when it was built)."""
    payload = message._payload()
    pairs = message._fields()
    if message.COUNT_KEY == "refs":
        pairs = pairs + [("refs", len(payload) // REF_SIZE)]
    elif message.COUNT_KEY == "leases":
        pairs = pairs + [("leases", len(message.leases))]
    header = "".join(f"{key}={value}\n" for key, value in pairs)
    return b"%s\n%s\n%s\n%s" % (MAGIC, message.TYPE.value.encode("ascii"),
                                header.encode("ascii"), payload)


# --- decode ----------------------------------------------------------------

def _parse_header(untrusted_data: bytes) -> tuple[type[_Message], _Fields, int]:
    """The message class, its header fields and where the payload starts;
    ProtocolError if there is no complete, well-formed header."""
    end = untrusted_data.find(b"\n\n", 0, MAX_HEADER)
    if end < 0:
        raise ProtocolError(
            f"no complete header in the first {MAX_HEADER} bytes")
    untrusted_lines = bytes(untrusted_data[:end]).split(b"\n")
    if untrusted_lines[0] != MAGIC:
        raise ProtocolError(f"not a {MAGIC.decode()} message")
    if len(untrusted_lines) < 2 or untrusted_lines[1] not in _BY_TYPE_LINE:
        raise ProtocolError("unknown message type")
    cls = _BY_TYPE_LINE[untrusted_lines[1]]
    untrusted_items: dict[str, str] = {}
    for untrusted_line in untrusted_lines[2:]:
        match = _LINE.fullmatch(untrusted_line)
        if not match:
            raise ProtocolError(
                f"malformed header line {untrusted_line[:40]!r}")
        untrusted_key = match[1].decode("ascii")
        if untrusted_key in untrusted_items:
            raise ProtocolError(f"duplicate key {untrusted_key!r}")
        untrusted_items[untrusted_key] = match[2].decode("ascii")
    return cls, _Fields(untrusted_items), end + 2


def _payload_end(cls: type[_Message], fields: _Fields,
                 untrusted_data: bytes, start: int) -> int | None:
    """Where the message that starts at 0 ends, or None if ``untrusted_data``
    does not hold all of its payload yet. Takes the count key from fields."""
    if cls.COUNT_KEY is None:
        return start
    count = fields.uint(cls.COUNT_KEY)
    if cls.COUNT_KEY == "refs":
        _check_uint("refs", count, MAX_LEASE_PAGES, low=1)
        end = start + REF_SIZE * count
        return end if len(untrusted_data) >= end else None
    _check_uint("leases", count, MAX_LIST_LEASES)
    end = start
    for _ in range(count):
        end = untrusted_data.find(b"\n", end, end + MAX_LIST_LINE) + 1
        if end == 0:
            if len(untrusted_data) - start >= MAX_LIST_LINE * count:
                raise ProtocolError("lease line too long")
            return None
    return end


def frame_length(untrusted_prefix: bytes | bytearray) -> int | None:
    """Length of the message at the start of a stream, once it has all
    arrived (None before). For connections that carry several messages
    (the offer: OfferRequest then ExportAnswer). Raises ProtocolError as
    soon as the prefix cannot start a legal message. Reads the prefix in
    place (a reader's growing bytearray is not copied): past the header
    it looks only at the payload's length, but for a lease list's lines."""
    try:
        cls, fields, start = _parse_header(untrusted_prefix)
    except ProtocolError:
        if b"\n\n" in untrusted_prefix or len(untrusted_prefix) >= MAX_HEADER:
            raise
        return None
    return _payload_end(cls, fields, untrusted_prefix, start)


def decode(untrusted_data: bytes, *expected: type[_Message]) -> Message:
    """The message in ``untrusted_data``, which must hold exactly one.

    ``expected`` restricts the types accepted (e.g. ``LeaseAnswer, Error``);
    the size bound of those types is enforced before anything is parsed.
    """
    if not isinstance(untrusted_data, (bytes, bytearray)):
        raise ProtocolError("a message is bytes")
    if len(untrusted_data) > max_size_for(*expected):
        raise ProtocolError(
            f"message of {len(untrusted_data)} bytes is over the limit")
    cls, fields, start = _parse_header(untrusted_data)
    if expected and cls not in expected:
        raise ProtocolError(f"unexpected message {cls.TYPE.value}")
    if len(untrusted_data) > MAX_SIZE[cls.TYPE]:
        raise ProtocolError(f"{cls.TYPE.value} over its size limit")
    end = _payload_end(cls, fields, untrusted_data, start)
    if end is None:
        raise ProtocolError(f"{cls.TYPE.value} is truncated")
    if end != len(untrusted_data):
        raise ProtocolError(f"{len(untrusted_data) - end} bytes after the "
                            f"end of {cls.TYPE.value}")
    untrusted_payload = bytes(untrusted_data[start:end])
    if cls.COUNT_KEY == "leases" and not untrusted_payload.isascii():
        raise ProtocolError("lease list is not ASCII")
    message = cls._parse(fields, untrusted_payload)
    fields.finish()
    return message
