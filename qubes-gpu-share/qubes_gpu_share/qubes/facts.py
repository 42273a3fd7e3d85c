"""The Qubes-facts seam: what the broker asks Qubes, as one interface.

Two implementations: :mod:`.admin` over qubesadmin (dom0) and :mod:`.memory`
(tests and the demo). Besides facts about qubes the seam carries the one
dom0 -> qube action the broker needs, a qrexec service call, because in dom0
that goes through qubesadmin (``vm.run_service``) and only :mod:`.admin` may
import qubesadmin.

The broker asks with :meth:`QubesFacts.describe`, a coroutine: whatever
blocks (a qubesd round trip) happens off the event loop, so that a slow
qubesd delays the one decision that waits for it, not every qube's calls.
:meth:`QubesFacts.qube` is the same question asked synchronously (tools,
tests, and the worker behind ``describe``). Events and service calls are
asynchronous because they wait on other qubes.

The event stream also reports its own connection (``connection-established``
when it (re)connects, ``connection-lost`` when it broke): what was missed
in between is unknown, so the broker re-checks every live lease after each
(re)connection and grants nothing while the stream is down.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Callable

from ..names import parse_qube_name
from ..qrexec.descriptor import is_service_call
from ..qubeinfo import Domain, EventKind, QubeEvent, QubeInfo, ServiceResult


class QubesFactsError(Exception):
    """Qubes could not answer (qubesd down, access denied...): one line."""


class ServiceCallError(QubesFactsError):
    """A service call did not complete: not running, timeout, output too
    long. The callee's exit status is a normal result, not this error."""


class EventStream(AsyncIterator[QubeEvent]):
    """Life-cycle events from the moment the stream was opened.

    ``connected`` says whether events are being heard right now (it changes
    when the producer learns it, before the listener reads the
    connection event); ``generation`` counts the connections, so that a
    listener can tell "checked since the last (re)connection" from
    "checked before a break it has not read about yet".
    """

    connected: bool = False
    generation: int = 0

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
        if self._closed:
            return
        if event.kind is EventKind.CONNECTED:
            self.connected = True
            self.generation += 1
        elif event.kind is EventKind.LOST:
            self.connected = False
        self._queue.put_nowait(event)

    def end(self) -> None:
        """The producer stopped for good: the listener's iteration ends."""
        self.connected = False
        if not self._closed:
            self._queue.put_nowait(None)

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
        """A snapshot of qube ``name``, None when no such qube exists
        (blocking). Raises QubesFactsError when Qubes cannot answer."""

    async def describe(self, name: str) -> QubeInfo | None:
        """:meth:`qube`, without blocking the event loop (and, where the
        implementation keeps them current from events, from a snapshot)."""
        return self.qube(name)

    async def current_domain(self, name: str) -> Domain | None:
        """The qube's domain right now, read fresh (one qubesd call): what
        a grant must not get wrong. None when it has none."""
        info = self.qube(name)
        return info.domain if info is not None else None

    @abc.abstractmethod
    def events(self) -> EventStream:
        """Start/shutdown events of all qubes, from now on; the first item
        is ``connection-established`` once the stream is connected."""

    async def call_service(self, qube: str, service: str, payload: bytes, *,
                           max_output: int,
                           timeout: float | None) -> ServiceResult:
        """Call qrexec ``service`` (``NAME+ARG``) in running ``qube``.

        Returns the exit status and at most ``max_output`` bytes of output;
        more output, a timeout or a halted qube raise ServiceCallError. The
        qube is never started for the call. ``timeout`` None: the caller
        bounds the call itself (broker/agents.py).
        """
        parse_qube_name(qube)
        if not is_service_call(service):
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
