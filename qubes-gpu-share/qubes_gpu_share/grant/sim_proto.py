"""Wire format between simulated grant devices and the simulated hypervisor.

Pure: bytes in, values out, no I/O (the socket and os modules serve
only SCM_RIGHTS constants and closing fds the reader owns). One request frame, one reply frame per
operation (a single round trip, like one ioctl). A frame is a 5-byte header
(payload length, op or status) and a payload; file descriptors ride on the
first byte with SCM_RIGHTS. Refs travel as runs (first ref, count), so a
lease of consecutive refs costs 8 bytes whatever its size.
"""

from __future__ import annotations

import array
import enum
import itertools
import os
import socket
import struct
from collections.abc import Iterable, Sequence

from ..formats import MAX_LEASE_PAGES
from . import errors
from .expected import DomainKind, VirtMode

HEADER = struct.Struct("<IB")
#: Large enough for the worst case: 65,535 refs that form no run at all.
MAX_PAYLOAD = 16 + 8 * MAX_LEASE_PAGES
MAX_FDS = 1
_RUN = struct.Struct("<II")
_ONE = struct.Struct("<I")


class Op(enum.IntEnum):
    HELLO = 1         # <HBBII domid virt traits table maptrack
    GRANT_DMABUF = 2  # <IH pages to_domid, fd            -> <I id + runs
    GRANT_NEW = 3     # <IH pages to_domid                -> <I id + runs, fd
    REVOKE = 4        # <I grant id
    MAP = 5           # <HB from writable + runs          -> <IQ id offset, fd
    UNMAP = 6         # <I mapping id
    EXPORT = 7        # <H from + runs                    -> <I id, fd
    WAIT = 8          # <II export id, timeout_ms
    HAZARDS = 9       #                                   -> utf-8 lines
    STATS = 10        # <H domid                          -> <6I
    PEEK = 11         # fd of an export (test aid)  -> <IQ pages offset, fd
    TRY_END = 12      # <I grant id                       -> <I pages held
    DESTROY = 13      # <H domid (the domain died; test aid)
    GNTALLOC_LIMIT = 14  # <i new limit, or -1 to read    -> <I limit


STATUS_OK = 0
STATUS_ERROR = 1

HELLO = struct.Struct("<HBBII")
GRANT = struct.Struct("<IH")
MAP = struct.Struct("<HB")
EXPORT = struct.Struct("<H")
WAIT = struct.Struct("<II")
STATS = struct.Struct("<H")
MAPPED = struct.Struct("<IQ")
PEEKED = struct.Struct("<IQ")
STATS_REPLY = struct.Struct("<10I")
HELD = struct.Struct("<I")
DOMID = struct.Struct("<H")
LIMIT = struct.Struct("<i")
ID = _ONE


class SimulatorLimit(errors.GrantError):
    """Something the real device does that the simulator cannot model (e.g.
    refs that are not consecutive pages of one buffer, mapped as one view)."""


class ProtocolError(errors.GrantError):
    """A malformed frame between a simulated device and the hypervisor."""


#: The wire code of every error class: the index in this tuple.
ERRORS: tuple[type[errors.GrantError], ...] = (
    errors.GrantError, errors.NoGrantDevice, errors.DmabufNotSupported,
    errors.DmabufReceiveRefused, errors.NotGrantable, errors.MapRefused,
    errors.GrantTableFull, errors.ReleaseTimeout, errors.AlreadyReleased,
    errors.TooManyPages, SimulatorLimit, ProtocolError)
_ERROR = struct.Struct("<B")


def frame(code: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"frame of {len(payload)} bytes is too large")
    return HEADER.pack(len(payload), code) + payload


def parse_header(untrusted_header: bytes) -> tuple[int, int]:
    """(payload length, code), refusing lengths above the bound."""
    length, code = HEADER.unpack(untrusted_header)
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"frame announces {length} bytes")
    return length, code


_VIRT_MODES = tuple(VirtMode)


#: The kernel's boolean traits, one bit each in HELLO, in this order.
TRAIT_BITS = ("dmabuf_ioctls", "receive_fix", "xen_swiotlb", "dmabuf_mmap",
              "grant_frames_fix", "release_query")


def encode_hello(domid: int, kind: DomainKind, table_entries: int,
                 maptrack_entries: int) -> bytes:
    """A device's domain and its kernel's traits (0 entries: the
    hypervisor's default size)."""
    bits = sum(1 << i for i, name in enumerate(TRAIT_BITS)
               if getattr(kind, name))
    return HELLO.pack(domid, _VIRT_MODES.index(VirtMode(kind.virt_mode)),
                      bits, table_entries, maptrack_entries)


def decode_hello(untrusted_payload: bytes
                 ) -> tuple[int, DomainKind, int, int]:
    """(domid, kind, table entries, maptrack entries); ProtocolError for
    anything :func:`encode_hello` does not make (the domid's bound is the
    hypervisor's to check)."""
    (domid, virt, bits, table, maptrack), _ = split_fixed(
        untrusted_payload, HELLO)
    if virt >= len(_VIRT_MODES) or bits >> len(TRAIT_BITS):
        raise ProtocolError("invalid domain description")
    traits = {name: bool(bits >> i & 1) for i, name in enumerate(TRAIT_BITS)}
    try:
        kind = DomainKind(_VIRT_MODES[virt], **traits)
    except ValueError as exc:
        raise ProtocolError(f"invalid domain description: {exc}") from None
    return domid, kind, table, maptrack


def encode_refs(refs: Iterable[int]) -> bytes:
    """Refs as runs of consecutive numbers."""
    refs = tuple(refs)
    if refs and refs == tuple(range(refs[0], refs[0] + len(refs))):
        return _RUN.pack(refs[0], len(refs))  # the usual case, in C
    runs: list[int] = []
    for ref in refs:
        if runs and runs[-2] + runs[-1] == ref:
            runs[-1] += 1
        else:
            runs += (ref, 1)
    return struct.pack(f"<{len(runs)}I", *runs)


def encode_runs(runs: Sequence[tuple[int, int]]) -> bytes:
    return b"".join(_RUN.pack(start, count) for start, count in runs)


def decode_runs(untrusted_data: bytes) -> list[tuple[int, int]]:
    """Runs (first ref, count); at most MAX_LEASE_PAGES refs in all."""
    if len(untrusted_data) % _RUN.size:
        raise ProtocolError("refs are not whole (ref, count) pairs")
    runs = list(_RUN.iter_unpack(untrusted_data))
    total = sum(count for _, count in runs)
    if not runs or any(count == 0 for _, count in runs):
        raise ProtocolError("empty run of refs")
    if total > MAX_LEASE_PAGES or any(
            start + count > 0xFFFFFFFF for start, count in runs):
        raise errors.TooManyPages(f"{total} refs in one request")
    return runs


def expand_runs(runs: Iterable[tuple[int, int]]) -> tuple[int, ...]:
    # chained ranges: the refs are made in C, not one Python step per page
    return tuple(itertools.chain.from_iterable(
        range(start, start + count) for start, count in runs))


def u32_array(values: Iterable[int] = ()) -> array.array:
    """An array of u32 (typecode I is 4 bytes where Qubes runs); building
    it refuses anything that is not an int in 0..2**32-1."""
    return array.array("I", values)


assert u32_array().itemsize == 4


def encode_error(exc: errors.GrantError) -> bytes:
    code = ERRORS.index(type(exc)) if type(exc) in ERRORS else 0
    return _ERROR.pack(code) + str(exc).encode("utf-8", "replace")[:1000]


def decode_error(untrusted_payload: bytes) -> errors.GrantError:
    if not untrusted_payload or untrusted_payload[0] >= len(ERRORS):
        return ProtocolError("hypervisor sent an unknown error")
    message = untrusted_payload[1:].decode("utf-8", "replace")
    return ERRORS[untrusted_payload[0]](message)


def split_fixed(untrusted_payload: bytes,
                head: struct.Struct) -> tuple[tuple, bytes]:
    """A fixed-size head and the rest (refs), or ProtocolError."""
    if len(untrusted_payload) < head.size:
        raise ProtocolError(f"payload shorter than {head.size} bytes")
    return (head.unpack_from(untrusted_payload),
            untrusted_payload[head.size:])


class FrameReader:
    """Assembles one frame and its fds from a stream, never reading past its
    end: the I/O side asks for :meth:`wanted` bytes and passes what recvmsg
    gave to :meth:`take`. Until :meth:`detach_fds`, the reader owns the
    fds and :meth:`close` closes them."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._need = HEADER.size
        self._fds: list[int] = []
        self.code: int | None = None

    def wanted(self) -> int:
        return self._need - len(self._buf)

    def take(self, data: bytes, ancdata: list, flags: int) -> bool:
        """Add one recvmsg result; False at EOF before any byte."""
        self._fds += fds_from_ancillary(ancdata)
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("too many fds")
        if not data:
            if self._buf or self._fds:
                raise ProtocolError("EOF inside a frame")
            return False
        self.feed(data)
        return True

    def feed(self, data: bytes) -> None:
        self._buf += data
        if self.code is None and len(self._buf) == HEADER.size:
            length, self.code = parse_header(bytes(self._buf))
            self._need += length

    def done(self) -> bool:
        return self.code is not None and not self.wanted()

    def payload(self) -> bytes:
        return bytes(self._buf[HEADER.size:])

    def detach_fds(self) -> list[int]:
        fds, self._fds = self._fds, []
        return fds

    def close(self) -> None:
        for fd in self.detach_fds():
            os.close(fd)


def fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds of SCM_RIGHTS messages (whole ints only)."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds += array.array("i", data[:usable])
    return fds


def rights(fd: int) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]


ANCILLARY_SIZE = socket.CMSG_SPACE(4 * MAX_FDS)
