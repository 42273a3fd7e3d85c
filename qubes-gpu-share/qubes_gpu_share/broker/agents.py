"""Calling the agents' services: qubes.GpuExport, GpuDeliver, GpuRevoke.

Calls to a qube go through :meth:`QubesFacts.call_service` (qubesadmin's
``vm.run_service`` in dom0, the simulated router in the demo); calls to
dom0's own agent go to its local socket, since qrexec does not route a
dom0-to-dom0 socket service. Either way the bytes are the same: the
service descriptor qrexec would write, one protocol message, EOF.

The agent's answer is untrusted (a qube wrote it). It is read with the
bound of the message expected, must carry the reply status of
qrexec/reply.py, and is decoded strictly. Anything else, a timeout, or a
qube that is not there becomes :class:`AgentCallError`, with ``answered`` set
only when the agent clearly said no (so it holds nothing for this call).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses

from .. import protocol, unixserver
from ..oneline import one_line
from ..names import DOM0
from ..protocol import (Error, ExportAnswer, ExportRequest, GrantRefs,
                        LeaseAnswer, Ok, Role, RevokeAnswer, RevokeRequest)
from ..qrexec import call, reply, stream
from ..qrexec.descriptor import ServiceDescriptor
from ..qubes.facts import QubesFacts, QubesFactsError

EXPORT = "qubes.GpuExport"
DELIVER = "qubes.GpuDeliver"
REVOKE = "qubes.GpuRevoke"
#: dom0's agent socket (the dom0 agent, its own user, serves there).
DOM0_AGENT_SOCKET = "/run/qubes-gpu-share-dom0/service.sock"
#: Calls in flight at once, to one qube and in all. A qube whose agent
#: never answers holds at most PER_QUBE of them (each until its deadline);
#: the others wait for a slot within their own deadline, and every other
#: qube's calls go on (docs/broker.md, "What a qube can make dom0 spend").
PER_QUBE = 4
IN_ALL = 64


class AgentCallError(Exception):
    """A call to an agent did not give the answer needed; one line.

    ``answered``: the agent answered with a refusal (an Error message or a
    refusal status), i.e. it did the call's work not at all.
    """

    def __init__(self, code: str, message: str, *, answered: bool = False):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.answered = answered


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """Seconds to wait for each service. A consumer's agent waits (bounded)
    for its applications to let go before it answers a revoke, so revoke
    gets the longest."""

    export: float = 15.0
    deliver: float = 15.0
    revoke: float = 30.0


def parse_answer(untrusted_output: bytes, *expected: type,
                 max_len: int) -> protocol.Message:
    """The agent's answer: a reply status, then one of ``expected``.

    An Error message (or a refusal status) raises AgentCallError(answered=True).
    """
    if len(untrusted_output) > max_len + len(reply.OK_PREFIX):
        raise AgentCallError("bad-answer", "answer over its size limit")
    try:
        untrusted_payload = reply.parse_reply(untrusted_output)
    except reply.ServiceRefused as refused:
        raise AgentCallError("refused", str(refused), answered=True) from None
    except reply.BadReply as exc:
        raise AgentCallError("bad-answer", str(exc)) from None
    try:
        message = protocol.decode(untrusted_payload, *expected, Error)
    except protocol.ProtocolError as exc:
        raise AgentCallError("bad-answer", str(exc)) from None
    if isinstance(message, Error):
        raise AgentCallError(message.code, message.message, answered=True)
    return message


class Agents:
    """The three agent services, as the broker calls them."""

    def __init__(self, facts: QubesFacts, *,
                 dom0_socket: str = DOM0_AGENT_SOCKET,
                 timeouts: Timeouts = Timeouts(), per_qube: int = PER_QUBE,
                 in_all: int = IN_ALL):
        self._facts = facts
        self._dom0_socket = dom0_socket
        self.timeouts = timeouts
        self._per_qube = per_qube
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._all = asyncio.Semaphore(in_all)
        #: calls under way or waiting for a slot, per qube
        self.pending: collections.Counter[str] = collections.Counter()

    async def export(self, provider: str, request: ExportRequest) -> GrantRefs:
        """Ask ``provider`` to allocate and grant; one ref per page."""
        pages = request.meta.pages
        answer = await self._call(
            provider, EXPORT, request, ExportAnswer,
            protocol.max_size_for(ExportAnswer, refs=pages),
            self.timeouts.export)
        try:
            return answer.check_pages(pages).refs
        except protocol.ProtocolError as exc:
            raise AgentCallError("bad-answer", str(exc)) from None

    async def deliver(self, consumer: str, answer: LeaseAnswer) -> None:
        """Hand an offered lease to ``consumer``'s agent."""
        await self._call(consumer, DELIVER, answer, Ok,
                         protocol.max_size_for(Ok), self.timeouts.deliver)

    async def revoke(self, qube: str, lease_id: str,
                     role: Role) -> RevokeAnswer:
        """Tell one side to let go; its answer says released or busy."""
        return await self._call(qube, REVOKE, RevokeRequest(lease_id, role),
                                RevokeAnswer, protocol.max_size_for(
                                    RevokeAnswer), self.timeouts.revoke)

    async def _call(self, qube: str, service: str, message, expected: type,
                    max_len: int, timeout: float):
        """One call with its deadline, waiting for a slot included."""
        payload = protocol.encode(message)
        max_output = max_len + len(reply.OK_PREFIX)
        self.pending[qube] += 1
        try:
            # in this task (stream.within), not wait_for's task of its own
            status, untrusted_output = await stream.within(
                timeout, self._in_slot(qube, service, payload, max_output))
            call.raise_for_status(status, qube, service)
        except asyncio.TimeoutError:
            raise AgentCallError("timeout", f"{service} in {qube} did not "
                             f"answer in {timeout:g} s") from None
        except (QubesFactsError, call.QrexecCallError, OSError,
                stream.StreamError) as exc:
            raise AgentCallError("unreachable", f"{service} in {qube}: "
                             f"{one_line(exc)}") from None
        finally:
            self.pending[qube] -= 1
            if not self.pending[qube]:
                del self.pending[qube]
        return parse_answer(untrusted_output, expected, max_len=max_len)

    async def _in_slot(self, qube: str, service: str, payload: bytes,
                       max_output: int) -> tuple[int, bytes]:
        slots = self._slots.setdefault(qube,
                                       asyncio.Semaphore(self._per_qube))
        try:
            async with slots, self._all:
                if qube == DOM0:
                    return await self._call_dom0(service, payload, max_output)
                result = await self._facts.call_service(
                    qube, service + "+", payload, max_output=max_output,
                    timeout=None)
                return result.status, result.output
        finally:
            if qube not in self.pending or self.pending[qube] <= 1:
                self._slots.pop(qube, None)

    async def _call_dom0(self, service: str, payload: bytes,
                         max_output: int) -> tuple[int, bytes]:
        """dom0's agent on its local socket, with the descriptor qrexec
        would write for a call from dom0."""
        reader, writer = await unixserver.open_unix_connection(self._dom0_socket)
        try:
            writer.write(ServiceDescriptor(service, "", DOM0).encode()
                         + payload)
            writer.write_eof()
            await writer.drain()
            return 0, await stream.read_to_eof(reader, max_output)
        finally:
            writer.close()
