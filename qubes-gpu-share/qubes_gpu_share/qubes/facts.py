"""The Qubes-facts seam: what the broker asks Qubes, as one interface.

Two implementations: :mod:`.admin` over qubesadmin (dom0) and :mod:`.memory`
(tests and the demo). Besides facts about qubes the seam carries the one
dom0 -> qube action the broker needs, a qrexec service call, because in dom0
that goes through qubesadmin (``vm.run_service``) and only :mod:`.admin` may
import qubesadmin.

Queries are synchronous, as in Qubes' own qrexec policy daemon: qubesd
answers over a local socket in well under a millisecond. Events and service
calls are asynchronous because they wait on other qubes.
"""

from __future__ import annotations

import abc
import asyncio
import re
from collections.abc import AsyncIterator, Callable

from ..names import parse_qube_name
from .info import QubeEvent, QubeInfo, ServiceResult

#: qrexec's characters for a service name with its argument.
_SERVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9+._-]{0,63}")


class QubesFactsError(Exception):
    """Qubes could not answer (qubesd down, access denied...): one line."""


class ServiceCallError(QubesFactsError):
    """A service call did not complete: not running, timeout, output too
    long. The callee's exit status is a normal result, not this error."""


class EventStream(AsyncIterator[QubeEvent]):
    """Life-cycle events from the moment the stream was opened."""

    def __aiter__(self) -> EventStream:
        return self

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop listening; pending iteration ends."""


class QueuedEventStream(EventStream):
    """An event stream fed by :meth:`push` (from a dispatcher or a model).

    ``on_close`` runs once on :meth:`aclose`, to stop whatever feeds it.
    """

    def __init__(self, on_close: Callable[[], None] = lambda: None):
        self._queue: asyncio.Queue[QubeEvent | None] = asyncio.Queue()
        self._on_close = on_close
        self._closed = False

    def push(self, event: QubeEvent) -> None:
        if not self._closed:
            self._queue.put_nowait(event)

    async def __anext__(self) -> QubeEvent:
        event = None if self._closed else await self._queue.get()
        if event is None:
            raise StopAsyncIteration
        return event

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)  # wakes a pending __anext__
            self._on_close()


class QubesFacts(abc.ABC):
    """What the broker needs to know about qubes, and one way to call them."""

    @abc.abstractmethod
    def qube(self, name: str) -> QubeInfo | None:
        """A snapshot of qube ``name``, None when no such qube exists.

        Raises QubesFactsError when Qubes cannot answer.
        """

    @abc.abstractmethod
    def events(self) -> EventStream:
        """Start/shutdown events of all qubes, from now on."""

    async def call_service(self, qube: str, service: str, payload: bytes, *,
                           max_output: int,
                           timeout: float) -> ServiceResult:
        """Call qrexec ``service`` (``NAME+ARG``) in running ``qube``.

        Returns the exit status and at most ``max_output`` bytes of output;
        more output, a timeout or a halted qube raise ServiceCallError. The
        qube is never started for the call.
        """
        parse_qube_name(qube)
        if not _SERVICE.fullmatch(service):
            raise ValueError(f"invalid qrexec service name {service!r}")
        try:
            result = await asyncio.wait_for(
                self._call_service(qube, service, payload, max_output),
                timeout)
        except asyncio.TimeoutError:
            raise ServiceCallError(
                f"{service} in {qube} did not answer in {timeout:g} s"
            ) from None
        if len(result.output) > max_output:
            raise ServiceCallError(
                f"{service} in {qube} wrote more than {max_output} bytes")
        return result

    @abc.abstractmethod
    async def _call_service(self, qube: str, service: str, payload: bytes,
                            max_output: int) -> ServiceResult:
        """Run the call; read at most ``max_output + 1`` bytes of output so
        that the caller can tell "too long" from "exactly the limit"."""
