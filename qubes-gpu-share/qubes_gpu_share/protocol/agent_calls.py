"""The calls the broker makes to an agent, and the agent's answers.

``qubes.GpuExport`` (or the offering qube's turn on an offer connection):
the broker asks a provider to allocate a layout and grant it to the
consumer's domain (:class:`ExportRequest`), and the provider answers with
one grant ref per page (:class:`ExportAnswer`). ``qubes.GpuRevoke``: the
broker asks a consumer to let go, then the provider to release
(:class:`RevokeRequest`), and each says whether it did
(:class:`RevokeAnswer`). Here the broker is the caller and the agent the
qube it must not trust.
"""

from __future__ import annotations

import dataclasses

from ..formats import MAX_LEASE_PAGES, BufferMeta
from .buffers import _check_meta, _meta_fields, _parse_meta
from .fields import (_TEXT, MAX_DOMID, ProtocolError, RevokeStatus, Role,
                     _check_lease, _check_pattern, _check_qube, _check_uint,
                     _set_enum)
from .message import MessageType, _Message
from .refs import GrantRefs


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
