"""The broker's four qrexec socket services.

qubes.GpuLease+PROVIDER, qubes.GpuRelease and qubes.GpuLeases are one-shot:
the caller writes one message and EOF, the broker answers once: the
reply.py status ``0\\0`` (the broker took the call and answers), then the
encoded answer message, or an error message (code and one line) when the
request is refused. ``1\\0`` + a line comes only from SocketServiceServer
itself (bad descriptor, unknown service, internal error).

qubes.GpuOffer+CONSUMER is a conversation on one connection: the offering
qube writes an offer-request (no EOF); the broker answers ``0\\0`` +
export-request (or an error message); the qube writes an export-answer
(or an error message); the broker delivers the lease to the consumer and
ends with a lease-answer (or an error message), the status already sent.

Each handler reads with the bound of the message it expects, decodes with
the protocol and calls :class:`.core.Broker`. The caller is the descriptor's
source and nothing else. A bad message gets one refusal and changes nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from .. import limits, protocol
from ..oneline import one_line
from ..names import DOM0
from ..protocol import (Error, ExportAnswer, ExportRequest, GrantRefs,
                        LeaseRequest, ListRequest, OfferRequest, Ok,
                        ReleaseRequest)
from ..qrexec import reply, stream
from ..qrexec.descriptor import ServiceDescriptor
from ..qrexec.service import Handler
from ..qubes.facts import QubesFactsError
from . import audit
from .agents import AgentCallError
from .core import Broker
from .refusal import Refused

log = logging.getLogger(__name__)

LEASE = "qubes.GpuLease"
OFFER = "qubes.GpuOffer"
RELEASE = "qubes.GpuRelease"
LEASES = "qubes.GpuLeases"
#: How long an offering qube may take to grant, once asked.
OFFER_EXPORT_TIMEOUT = 15.0


def refusal(code: str, message: str) -> bytes:
    """A refused call's answer: status 0 and an error message."""
    return reply.ok_reply(protocol.encode(Error.of(code, message)))


class BrokerServices:
    """Handlers for :class:`qrexec.service.SocketServiceServer`."""

    def __init__(self, broker: Broker):
        self.broker = broker

    def handlers(self) -> dict[str, Handler]:
        return {LEASE: self.gpu_lease, OFFER: self.gpu_offer,
                RELEASE: self.gpu_release, LEASES: self.gpu_leases}

    def dom0_handlers(self) -> dict[str, Handler]:
        """For dom0-agent.sock: the caller is dom0 whatever it writes, and
        is refused unless the admin opted dom0 in."""
        def as_dom0(handler: Handler) -> Handler:
            async def wrapped(descriptor, reader, writer):
                if not await self._dom0_allowed():
                    self._refuse(writer, dataclasses.replace(
                        descriptor, source=DOM0), "dom0-not-allowed",
                        f"dom0 takes part only with feature "
                        f"{limits.DOM0_OPT_IN}=1 on dom0")
                    return
                await handler(dataclasses.replace(descriptor, source=DOM0),
                              reader, writer)
            return wrapped
        return {name: as_dom0(h) for name, h in self.handlers().items()}

    async def gpu_lease(self, descriptor: ServiceDescriptor, reader,
                        writer) -> None:
        async def serve(request: LeaseRequest):
            return await self.broker.lease(descriptor.source,
                                           descriptor.argument, request)
        await self._one_shot(descriptor, reader, writer, LeaseRequest, serve)

    async def gpu_release(self, descriptor: ServiceDescriptor, reader,
                          writer) -> None:
        async def serve(request: ReleaseRequest):
            await self.broker.release(descriptor.source, request.lease)
            return Ok()
        await self._one_shot(descriptor, reader, writer, ReleaseRequest,
                             serve, no_argument=True)

    async def gpu_leases(self, descriptor: ServiceDescriptor, reader,
                         writer) -> None:
        async def serve(_request: ListRequest):
            return self.broker.leases_of(descriptor.source)
        await self._one_shot(descriptor, reader, writer, ListRequest, serve,
                             no_argument=True)

    async def _one_shot(self, descriptor, reader, writer, expected, serve, *,
                        no_argument: bool = False) -> None:
        try:
            if no_argument and descriptor.argument:
                raise Refused("malformed", f"{descriptor.service} takes no "
                              "argument")
            untrusted_body = await stream.read_to_eof(
                reader, protocol.max_size_for(expected))
            request = protocol.decode(untrusted_body, expected)
            answer = await serve(request)
        except (protocol.ProtocolError, stream.StreamError) as exc:
            self._refuse(writer, descriptor, "malformed", str(exc))
        except Refused as exc:
            self._refuse(writer, descriptor, exc.code, exc.message,
                         exc.about)
        else:
            writer.write(reply.ok_reply(protocol.encode(answer)))

    async def gpu_offer(self, descriptor: ServiceDescriptor, reader,
                        writer) -> None:
        turns = _OfferTurns(reader, writer)
        try:
            untrusted_body = await stream.read_frame(
                reader, protocol.max_size_for(OfferRequest),
                protocol.frame_length)
            request = protocol.decode(untrusted_body, OfferRequest)
            answer = await self.broker.offer(descriptor.source,
                                             descriptor.argument, request,
                                             turns.export)
        except (protocol.ProtocolError, stream.StreamError) as exc:
            turns.refuse(self._log(descriptor, "malformed", str(exc)))
        except Refused as exc:
            turns.refuse(self._log(descriptor, exc.code, exc.message,
                                   exc.about))
        else:
            writer.write(protocol.encode(answer))

    async def _dom0_allowed(self) -> bool:
        try:
            dom0 = await self.broker.facts.describe(DOM0)
            return limits.global_settings(dom0.features).dom0_allowed
        except (QubesFactsError, limits.SettingError, AttributeError):
            return False

    def _refuse(self, writer, descriptor, code: str, message: str,
                about: dict | None = None) -> None:
        writer.write(refusal(*self._log(descriptor, code, message, about)))

    @staticmethod
    def _log(descriptor: ServiceDescriptor, code: str, message: str,
             about: dict | None = None) -> tuple[str, str]:
        """The audit line of a refusal (every one passes here), naming
        the call and its caller; the parties the request named unless the
        broker knows better (``about``, from :class:`.refusal.Refused`)."""
        message = one_line(message)
        audit.decision("refused", **{**_named_parties(descriptor),
                                     **(about or {})},
                       reason=f"{code}: {message} "
                              f"({descriptor.service_with_arg} from "
                              f"{descriptor.source})",
                       charged=descriptor.source)
        return code, message

    @staticmethod
    def refused_call(descriptor: ServiceDescriptor | None, why: str) -> None:
        """The audit line of a call the server refused before its handler
        ran (too many calls, a service not served here)."""
        if descriptor is None:
            audit.decision("refused", reason=f"{why} (before its "
                           f"descriptor)", charged="-")
            return
        audit.decision("refused", **_named_parties(descriptor),
                       reason=f"{why} ({descriptor.service_with_arg} from "
                              f"{descriptor.source})",
                       charged=descriptor.source)


def _named_parties(descriptor: ServiceDescriptor) -> dict[str, str]:
    """Consumer and provider as the call names them: the caller and the
    service argument (qrexec's charset, no spaces), by the service."""
    other = descriptor.argument or "-"
    if descriptor.service == LEASE:
        return {"consumer": descriptor.source, "provider": other}
    if descriptor.service == OFFER:
        return {"consumer": other, "provider": descriptor.source}
    return {}


class _OfferTurns:
    """The offering side of an offer connection, as the broker's exporter."""

    def __init__(self, reader: stream.DeadlineReader,
                 writer: asyncio.StreamWriter):
        self._reader = reader
        self._writer = writer
        self._status_sent = False

    async def export(self, request: ExportRequest) -> GrantRefs:
        self._writer.write(reply.ok_reply(protocol.encode(request)))
        self._status_sent = True
        self._reader.allow(OFFER_EXPORT_TIMEOUT)
        try:
            await stream.within(OFFER_EXPORT_TIMEOUT, self._writer.drain())
            untrusted_answer = await stream.read_frame(
                self._reader, protocol.max_size_for(
                    ExportAnswer, refs=request.meta.pages),
                protocol.frame_length)
            answer = protocol.decode(untrusted_answer, ExportAnswer, Error)
        except (asyncio.TimeoutError, stream.InputTimeout):
            raise AgentCallError("timeout", "the offering qube did not grant in "
                             f"{OFFER_EXPORT_TIMEOUT:g} s") from None
        except (protocol.ProtocolError, stream.StreamError,
                ConnectionError) as exc:
            raise AgentCallError("bad-answer", one_line(exc)) from None
        if isinstance(answer, Error):
            raise AgentCallError(answer.code, answer.message, answered=True)
        try:
            return answer.check_pages(request.meta.pages).refs
        except protocol.ProtocolError as exc:
            raise AgentCallError("bad-answer", str(exc)) from None

    def refuse(self, code_message: tuple[str, str]) -> None:
        code, message = code_message
        if self._status_sent:
            self._writer.write(protocol.encode(Error.of(code, message)))
        else:
            self._writer.write(refusal(code, message))
