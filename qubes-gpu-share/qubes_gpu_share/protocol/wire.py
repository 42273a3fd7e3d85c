"""The framing: how a message becomes bytes and back, with the size bound
of every read. In short::

    qubes-gpu-share/1\\n       magic and version
    lease-answer\\n            message type
    key=value\\n ...           known keys only, each at most once
    \\n                        end of header
    <payload>                 refs: count x little-endian u32 (count in the
                              header); lease list: count text lines

(docs/protocol.md has an example of each message.) Every decoder refuses
input longer than the type's fixed maximum (:data:`MAX_SIZE`) before
parsing anything, so the I/O layer can do bounded reads; then reads the
header strictly (:data:`_LINE`) and hands its fields to the message's own
parser. :func:`frame_length` finds where a message ends in a stream that
carries several (the offer's conversation).
"""

from __future__ import annotations

import re
from typing import Union

from ..formats import MAX_LEASE_PAGES
from .agent_calls import ExportAnswer, ExportRequest, RevokeAnswer, \
    RevokeRequest
from .fields import ProtocolError, _check_uint, _Fields
from .lease_list import (MAX_LIST_LEASES, MAX_LIST_LINE, LeaseList,
                         ListRequest)
from .message import MessageType, _Message
from .qube_calls import LeaseAnswer, LeaseRequest, OfferRequest, \
    ReleaseRequest
from .refs import REF_SIZE
from .replies import Error, Ok

MAGIC = b"qubes-gpu-share/1"
#: Every header (magic, type, keys, blank line) fits in this many bytes.
MAX_HEADER = 1024

_LINE = re.compile(
    rb"([a-z][a-z0-9-]{0,31})=([\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?)")

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
