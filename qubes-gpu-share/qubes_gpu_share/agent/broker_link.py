"""The agent's calls to the dom0 broker.

Four services (docs/qrexec.md): ``qubes.GpuLease+PROVIDER``,
``qubes.GpuOffer+CONSUMER`` (several turns on one call),
``qubes.GpuRelease`` and ``qubes.GpuLeases``. How the bytes get to dom0 is
a :class:`~..qrexec.call.DuplexCaller`:

* in a qube, ``qrexec-client-vm @adminvm SERVICE+ARG``
  (:class:`~..qrexec.call.ClientVmCaller`);
* in the simulation, the simulated router as this qube (:func:`sim_caller`);
* as dom0's own agent, the broker's local ``dom0-agent.sock``
  (:class:`LocalSocketCaller`): qrexec does not route dom0 to dom0.

The broker answers with the status convention of qrexec/reply.py (``0\\0``
then the payload, or ``1\\0`` and a reason) once, at the start of its
answer; the payload is protocol messages. On the offer call the broker's
ExportRequest is a header-only message, so it ends at the blank line; the
final LeaseAnswer (or Error) ends with the broker's end of output.
"""

from __future__ import annotations

import asyncio
import os
from typing import Callable

from .. import unixserver
from ..names import DOM0
from ..protocol import (MAX_HEADER, Error, ExportAnswer, ExportRequest,
                        LeaseAnswer, LeaseList, LeaseRequest, ListRequest,
                        Message, OfferRequest, Ok, ProtocolError,
                        ReleaseRequest, decode, encode, max_size_for)
from ..qrexec import call, reply
from ..qrexec.call import Conversation, ConversationCaller, DuplexCaller
from ..qrexec.descriptor import ServiceDescriptor
from ..qrexec.router import Router

ADMINVM = "@adminvm"
#: How long one offer conversation may take, end to end.
OFFER_TIMEOUT = 60.0


class BrokerRefused(Exception):
    """dom0 (qrexec policy or the broker) said no; ``code`` for programs,
    ``str()`` is the one-line reason.

    ``answered`` is true when dom0 decided and said so (qrexec policy, or
    the broker's own error message): whatever the call recorded, the
    broker ends it. False when the call was cut, qrexec failed, the answer
    was garbled or never came: the broker may have recorded a lease whose
    id nobody here learned (the agent then reconciles, reconcile.py)."""

    def __init__(self, code: str, message: str, *, answered: bool = False):
        super().__init__(message)
        self.code = code
        self.answered = answered


def _refusal(exc: Exception) -> BrokerRefused:
    if isinstance(exc, call.PolicyDenied):
        return BrokerRefused("policy-denied", str(exc), answered=True)
    if isinstance(exc, reply.ServiceRefused):
        return BrokerRefused("refused", str(exc))
    if isinstance(exc, ProtocolError):
        return BrokerRefused("malformed", f"bad answer from dom0: {exc}")
    return BrokerRefused("qrexec", str(exc))


def _answer(message: Message, *expected: type) -> Message:
    if isinstance(message, Error):
        raise BrokerRefused(message.code, message.message, answered=True)
    assert isinstance(message, expected)
    return message


class BrokerLink:
    """The four broker services, as coroutines returning checked messages
    or raising :class:`BrokerRefused`."""

    def __init__(self, caller: DuplexCaller, target: str = ADMINVM):
        self._caller = caller
        self._target = target

    async def _call(self, service: str, request: Message,
                    *expected: type) -> Message:
        try:
            untrusted_payload = await call.call(
                self._caller, self._target, service, encode(request),
                max_size_for(*expected, Error))
            return _answer(decode(untrusted_payload, *expected, Error),
                           *expected)
        except (call.QrexecCallError, reply.ServiceRefused,
                ProtocolError) as exc:
            raise _refusal(exc) from None

    async def lease(self, provider: str, request: LeaseRequest) -> LeaseAnswer:
        return await self._call(f"qubes.GpuLease+{provider}", request,
                                LeaseAnswer)

    async def release(self, lease: str) -> None:
        await self._call("qubes.GpuRelease", ReleaseRequest(lease), Ok)

    async def list(self) -> LeaseList:
        return await self._call("qubes.GpuLeases", ListRequest(), LeaseList)

    async def offer(self, consumer: str, request: OfferRequest,
                    export: Callable[[ExportRequest], ExportAnswer | Error]
                    ) -> LeaseAnswer:
        """Offer a buffer: dom0 answers with the layout and consumer to
        grant to, ``export`` grants (or says why not), dom0 delivers."""
        try:
            conversation = await self._caller.open_service(
                self._target, f"qubes.GpuOffer+{consumer}")
            async with conversation:
                return await asyncio.wait_for(
                    self._offer_turns(conversation, request, export),
                    OFFER_TIMEOUT)
        except (call.QrexecCallError, reply.ServiceRefused,
                ProtocolError) as exc:
            raise _refusal(exc) from None
        except asyncio.TimeoutError:
            raise BrokerRefused("timeout", "dom0 did not finish the offer in "
                                f"{OFFER_TIMEOUT:.0f}s") from None

    @staticmethod
    async def _offer_turns(conversation: Conversation, request: OfferRequest,
                           export: Callable[[ExportRequest],
                                            ExportAnswer | Error]
                           ) -> LeaseAnswer:
        await conversation.send(encode(request))
        untrusted_status = await conversation.read_message(1, b"\0")
        if untrusted_status != b"0":
            untrusted_reason = await conversation.read_to_eof(
                reply.MAX_REASON_LEN + 1)
            reply.parse_reply(untrusted_status + b"\0" + untrusted_reason)
        untrusted_header = await conversation.read_message(MAX_HEADER,
                                                           b"\n\n")
        export_request = _answer(decode(untrusted_header + b"\n\n",
                                        ExportRequest, Error), ExportRequest)
        await conversation.send(encode(export(export_request)))
        await conversation.end_input()
        untrusted_final = await conversation.read_to_eof(
            max_size_for(LeaseAnswer, Error))
        return _answer(decode(untrusted_final, LeaseAnswer, Error),
                       LeaseAnswer)


class LocalSocketCaller(ConversationCaller):
    """dom0's own agent calling the broker on its local socket: the same
    bytes as a qrexec call from dom0 (descriptor, request, answer)."""

    def __init__(self, path: str | os.PathLike):
        self._path = os.fspath(path)

    async def open_service(self, target: str,
                           service_with_arg: str) -> Conversation:
        service, _plus, argument = service_with_arg.partition("+")
        try:
            reader, writer = await unixserver.open_unix_connection(self._path)
        except OSError as exc:
            raise call.QrexecProblem(
                f"cannot reach the broker at {self._path}: {exc}") from None
        writer.write(ServiceDescriptor(service, argument, DOM0, "keyword",
                                       "adminvm").encode())

        async def exit_zero() -> int:
            return 0

        return Conversation(target, service_with_arg, reader, writer,
                            exit_zero)


def sim_caller(root: str | os.PathLike, name: str) -> DuplexCaller:
    """Calls as qube ``name`` through the simulated router of ``root``,
    the same router every process of the simulation builds
    (:meth:`~..qrexec.router.Router.from_root`)."""
    return Router.from_root(root).caller(name)
