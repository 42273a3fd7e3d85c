"""Reconciling with dom0: ending the leases dom0 holds active for this
qube that this agent does not know (:class:`Reconciler`, docs/agent.md).
The agent asks for it after a call to dom0 failed without dom0's word,
and once at start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ..lease import State
from ..protocol import LeaseEntry, Role
from .broker_link import BrokerLink, BrokerRefused
from .calls import LeaseCalls

log = logging.getLogger(__name__)

#: The first retry of a GpuLeases that did not get through, the longest
#: wait between retries, and when to give up (the default TTL: by then it
#: ended the lease).
RECONCILE_RETRY = 0.2
RECONCILE_RETRY_MAX = 10.0
RECONCILE_GIVE_UP = 600.0
#: How long an unknown active lease may still be an offer on its way here
#: (dom0 records an offer active, then delivers it), and how long a round
#: waits for this agent's own lease calls to end.
DELIVERY_GRACE = 1.0
CALLS_WAIT = 60.0


class Reconciler:
    """Ends this qube's consumer leases that dom0 holds active but this
    agent does not know.

    Such a lease exists when the broker recorded it ``active`` and died (or
    the call broke) before its answer reached us: nobody here learned its
    id, so without this only its TTL would end it, holding the provider's
    budget. Also, after an agent restart, every lease from before: the
    mappings died with the old agent and its applications lost their
    connection, which tells them to let go (docs/agent.md).

    The race: a lease listed active and unknown may be the answer of one of
    our own lease calls still on its way. Lease entries carry no creation
    time, so "older than the failed call" cannot be told; instead the agent
    numbers its calls (:class:`LeaseCalls`). Every call started before the
    list's answer arrived may own a listed lease (one started later cannot:
    dom0 answered the list before it received that call). An unknown lease
    from a provider none of those calls asks is released at once; one from
    a provider such a call asks waits until those calls ended, and is
    released only if it is still unknown then. Waiting for "no call in
    flight at all" would be simpler but never comes on a busy agent. An
    offer to us is recorded active just before dom0 delivers it, beyond our
    sight: every release waits :data:`DELIVERY_GRACE` first and looks
    again (a delivered offer nobody took yet is known and stays)."""

    def __init__(self, link: BrokerLink, calls: LeaseCalls,
                 knows: Callable[[str], bool],
                 release: Callable[[str], Awaitable[None]]):
        self._link = link
        self._calls = calls
        self._knows = knows
        self._release = release
        self._wanted = False
        self._task: asyncio.Task | None = None

    def request(self) -> None:
        """Reconcile in the background; once more after a round under way
        (the failure that asks may have come after its list)."""
        self._wanted = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def idle(self) -> None:
        """Until no round is under way (tests)."""
        while self._task is not None and not self._task.done():
            await asyncio.wait({self._task})

    async def _run(self) -> None:
        """Rounds while wanted; a list that does not reach dom0 is retried
        with backoff (dom0's broker is restarting), bounded in time."""
        loop = asyncio.get_running_loop()
        delay, give_up = RECONCILE_RETRY, loop.time() + RECONCILE_GIVE_UP
        while self._wanted:
            self._wanted = False
            try:
                await self._round()
                delay, give_up = (RECONCILE_RETRY,
                                  loop.time() + RECONCILE_GIVE_UP)
            except BrokerRefused as exc:
                if exc.answered or loop.time() + delay > give_up:
                    log.warning("cannot reconcile leases with dom0: %s", exc)
                    return
                self._wanted = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONCILE_RETRY_MAX)

    async def _round(self) -> None:
        listed = (await self._link.list()).leases
        mark = self._calls.mark()
        unknown = self._unknown(listed)
        if not unknown:
            return
        await asyncio.sleep(DELIVERY_GRACE)
        busy = self._calls.pending(mark)
        await self._end([entry for entry in unknown
                         if entry.peer not in busy])
        later = [entry for entry in unknown if entry.peer in busy]
        if later:
            try:
                await asyncio.wait_for(self._calls.settled(mark), CALLS_WAIT)
            except asyncio.TimeoutError:
                log.warning("lease calls did not end in %.0fs: %d unknown "
                            "leases left to their TTL", CALLS_WAIT,
                            len(later))
                return
            await self._end(later)

    def _unknown(self, listed: tuple[LeaseEntry, ...]) -> list[LeaseEntry]:
        return [entry for entry in listed
                if entry.role is Role.CONSUMER
                and entry.state is State.ACTIVE
                and not self._knows(entry.lease)]

    async def _end(self, entries: list[LeaseEntry]) -> None:
        for entry in self._unknown(tuple(entries)):
            log.warning("lease %s from %s: active at dom0 but unknown here "
                        "(its answer was lost): releasing", entry.lease,
                        entry.peer)
            try:
                await self._release(entry.lease)
            except BrokerRefused as exc:
                log.warning("lease %s: release: %s", entry.lease, exc)
