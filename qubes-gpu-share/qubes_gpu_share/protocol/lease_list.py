"""A qube's view of its leases: ``qubes.GpuLeases`` asks
(:class:`ListRequest`), the broker answers with one text line per lease
the caller takes part in (:class:`LeaseList` of :class:`LeaseEntry`).

The only message whose payload is text: count lines of seven words,
bounded per line (:data:`MAX_LIST_LINE`) and in number
(:data:`MAX_LIST_LEASES`), so that the agent reconciling its leases and
``qvm-gpu-share list`` read a bounded answer.
"""

from __future__ import annotations

import dataclasses

from ..formats import MAX_LEASE_PAGES, ReceiveMode
from ..lease import State
from .fields import (MAX_DEADLINE, ProtocolError, Role, _check_lease,
                     _check_qube, _check_uint, _parse_uint, _set_enum)
from .message import MessageType, _Message

#: The most leases one qube sees in a lease list.
MAX_LIST_LEASES = 4096
#: A lease-list line: "ID ROLE PEER STATE PAGES MODE DEADLINE\n" at most.
MAX_LIST_LINE = 32 + 1 + 8 + 1 + 31 + 1 + 16 + 1 + 5 + 1 + 6 + 1 + 13 + 1


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
