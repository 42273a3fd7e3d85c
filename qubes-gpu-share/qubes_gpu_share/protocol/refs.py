"""Grant refs on the wire: the payload of an export answer and a lease
answer, one little-endian u32 per page.

A lease may have 65,535 pages, so the array is kept as the bytes that
travel rather than as Python ints: decoding and encoding cost one copy.
"""

from __future__ import annotations

import array
import collections.abc
import sys
from collections.abc import Iterable, Iterator

from .fields import ProtocolError

REF_SIZE = 4

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
