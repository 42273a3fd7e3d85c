"""What keeps the broker's picture of qubes true: qubesd's events, the
re-check after every (re)connection, the expiry timer, and their watch.

The broker trusts what it believes about qubes only while it hears
qubesd's events and has checked every live lease against fresh facts since
the connection was (re)established: events missed while the connection was
down (a qube that shut down, another that took its domain id) are unknown,
so nothing is granted until the check is done (``qubes-unavailable``).

If the event follower or the expiry timer stops, the broker cannot keep
its promises (leases of a halted qube would stay; TTLs would not end):
:meth:`Follower.run` then raises :class:`Stopped`, the daemon exits non-zero
and systemd restarts it (Restart=on-failure); the new broker reconciles at
start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..qrexec.stream import within
from ..qubes.facts import EventStream, QubesFactsError
from ..qubeinfo import EventKind, QubeEvent
from .core import Broker

log = logging.getLogger(__name__)

#: When qubesd cannot answer the re-check: first wait, longest wait.
RECHECK_RETRY = 0.5
RECHECK_RETRY_MAX = 30.0
#: The expiry timer sleeps at most this long (a lease's deadline is also
#: signalled when it is made).
EXPIRY_IDLE = 3600.0


class Stopped(Exception):
    """A task the broker cannot do without has stopped; one line."""


class Follower:
    """Follows the events for one broker and watches its timers."""

    def __init__(self, broker: Broker):
        self.broker = broker
        self.ready = asyncio.Event()
        self._stream: EventStream | None = None
        self._checked = -1  # the stream generation last re-checked
        self._started = False
        broker.trusted = self.trusted

    def trusted(self) -> bool:
        """Events heard now, and every live lease re-checked since the
        connection came (back)."""
        stream = self._stream
        return stream is not None and stream.connected \
            and self._checked == stream.generation

    async def run(self) -> None:
        """Follow events and expire leases until cancelled; raise Stopped
        when either stops (its exception is logged with it)."""
        stream = self.broker.facts.events()
        self._stream = stream
        tasks = [asyncio.create_task(self._follow(stream),
                                     name="the qubes event follower"),
                 asyncio.create_task(self._expire(),
                                     name="the lease expiry timer")]
        try:
            done, _pending = await asyncio.wait(
                tasks, return_when=asyncio.FIRST_COMPLETED)
            task = done.pop()
            error = None if task.cancelled() else task.exception()
            raise Stopped(f"{task.get_name()} stopped: "
                          f"{error!r}" if error else f"{task.get_name()} "
                          "ended")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await stream.aclose()

    async def _follow(self, stream: EventStream) -> None:
        async for event in stream:
            await self._on(event)
        raise Stopped("the qubes event stream ended")

    async def _on(self, event: QubeEvent) -> None:
        broker, kind = self.broker, event.kind
        if kind is EventKind.CONNECTED:
            await self._connected()
        elif kind is EventKind.LOST:
            log.warning("qubes events lost (%s): no new leases until the "
                        "connection is back and every lease re-checked",
                        event.detail or "connection broken")
        elif kind in (EventKind.PRE_SHUTDOWN, EventKind.SHUTDOWN):
            broker.spawn(broker.revoke_qube(event.qube,
                                            f"{event.qube} shut down"))
        elif kind is EventKind.START:
            broker.spawn(broker.domain_started(event.qube))

    async def _connected(self) -> None:
        """Re-check every live lease against fresh facts; until that
        worked, nothing is trusted (qubesd not answering is retried)."""
        assert self._stream is not None
        generation = self._stream.generation
        why = ("reconciled at broker start" if not self._started else
               "re-checked after the qubes events connection came back")
        if not self._started:
            self._started = True
            await self.broker.finish_in_flight()
        delay = RECHECK_RETRY
        while True:
            try:
                ending = await self.broker.recheck(why)
                break
            except QubesFactsError as exc:
                log.warning("cannot re-check leases (%s): again in %g s",
                            exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECHECK_RETRY_MAX)
        self._checked = generation
        log.info("qubes events connected; leases re-checked, %d ending",
                 ending)
        self.ready.set()

    async def _expire(self) -> None:
        """Revoke leases at their deadline; sleep until the next one (from
        the registry's index) or until a new lease is made."""
        broker = self.broker
        while True:
            broker.deadline_changed.clear()
            await broker.expire_due()
            upcoming = broker.registry.next_deadline()
            delay = EXPIRY_IDLE if upcoming is None else \
                upcoming - broker.clock()
            # stream.within, not wait_for: Python 3.11's wait_for returns
            # (and swallows the task's cancellation) when the event is set
            # in the turn the task is cancelled, and the timer would go on
            # waiting; it also needs no task of its own per wake
            with contextlib.suppress(asyncio.TimeoutError):
                await within(min(max(delay, 0.01), EXPIRY_IDLE),
                             broker.deadline_changed.wait())
