"""The calls a qube makes to the broker about one lease, and the lease
the broker answers with.

``qubes.GpuLease+PROVIDER``: a consumer asks for a buffer
(:class:`LeaseRequest`). ``qubes.GpuOffer+CONSUMER``: a qube offers one
(:class:`OfferRequest`; the conversation goes on with the agent calls of
:mod:`.agent_calls`). Both end in a :class:`LeaseAnswer` for the consumer,
which is also the body of ``qubes.GpuDeliver``. ``qubes.GpuRelease``: the
consumer is done (:class:`ReleaseRequest`). Here the broker is the one
reading what a qube it must not trust wrote.
"""

from __future__ import annotations

import dataclasses

from ..formats import BufferMeta, BufferSpec, ReceiveMode
from .agent_calls import ExportAnswer
from .buffers import (_check_meta, _check_spec, _meta_fields, _parse_meta,
                      _parse_spec, _spec_fields)
from .fields import (MAX_DEADLINE, MAX_DOMID, MAX_TTL, _check_lease,
                     _check_qube, _check_uint, _set_enum)
from .message import MessageType, _Message
from .refs import GrantRefs


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
