"""The broker: every lease flow over the registry, decide.py and Qubes facts.

No I/O of its own besides the registry and the agents (:mod:`.agents`):
the socket services (:mod:`.services`) and the admin socket (:mod:`.admin`)
decode what arrives and call in here. The broker never touches buffer
memory; it relays integers and metadata.

Durable points (docs/broker.md): a pull or offer records
``requested+exporting`` in one commit before the provider is asked, then
``active`` before anyone learns the refs; a release records ``releasing``
before the provider is asked and ``released`` after it confirmed. All go
through one :class:`GroupCommit`, so concurrent requests share commits.

Ending a lease follows the release order Xen imposes: the consumer lets go
and confirms first, only then the provider releases. A side whose qube is
not running (or runs under another domain id than the one granted) is
skipped: a dead domain maps nothing. A side that does not confirm leaves the
lease ``releasing``/``revoking`` with its budget held; it is retried with
exponential backoff until it confirms.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from .. import decide, formats, protocol
from ..decide import Kind
from ..formats import BufferMeta, ReceiveMode
from ..lease import FINAL, Initiator, Lease, State, new_lease
from ..names import DOM0, InvalidName, new_lease_id, parse_lease_id, \
    parse_qube_name
from ..protocol import (ExportRequest, GrantRefs, LeaseAnswer, LeaseEntry,
                        LeaseList, Role, RevokeStatus)
from ..qubes.facts import QubesFacts, QubesFactsError
from ..qubes.info import EventKind, QubeInfo
from ..registry import Create, GroupCommit, Registry, Transition, UnknownLease
from . import audit
from .agents import AgentError, Agents

log = logging.getLogger(__name__)

#: The grant step of a lease: the provider's agent (pull) or the offering
#: connection (offer) turns an ExportRequest into refs, or AgentError.
Exporter = Callable[[ExportRequest], Awaitable[GrantRefs]]

#: Reason of the revoking transition for a TTL expiry; the final state of a
#: lease revoked for it is ``expired`` (also after a broker restart).
TTL_REASON = "ttl expired"
#: How offered leases are received: cpu works in every qube (DESIGN.md).
OFFER_MODE = ReceiveMode.CPU


class Refused(Exception):
    """A request the broker says no to: a stable code and one line.

    ``about`` is what the audit line of the refusal names, as far as the
    broker got (audit.decision's keywords: consumer, provider, pages,
    lease_id); services.py logs it, where every refusal is answered.
    """

    def __init__(self, code: str, message: str, *, lease: Lease | None = None,
                 **about):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = protocol.one_line(message)
        self.about = _audit_fields(lease) if lease is not None else about


class Broker:
    """The dom0 authority over leases. One per registry."""

    def __init__(self, registry: Registry, facts: QubesFacts, agents: Agents,
                 *, clock: Callable[[], float] = time.time,
                 retry_base: float = 1.0, retry_max: float = 60.0):
        self.registry = registry
        self.facts = facts
        self.agents = agents
        self.commits = GroupCommit(registry)
        self._clock = clock
        self._retry_base = retry_base
        self._retry_max = retry_max
        self._admission = asyncio.Lock()
        #: admitted, not yet committed: (what, qube) -> leases or pages
        self._admitted: collections.Counter = collections.Counter()
        self._locks: dict[str, asyncio.Lock] = {}
        self._attempts: dict[str, int] = {}
        self._finals: dict[str, State] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()
        self._deadline_changed = asyncio.Event()

    # -- requests from qubes -------------------------------------------------

    async def lease(self, caller: str, untrusted_provider: str,
                    request: protocol.LeaseRequest) -> LeaseAnswer:
        """Pull: ``caller`` asks ``provider`` for a new buffer."""
        provider = _qube_argument(untrusted_provider)
        return await self._cycle(
            caller, Kind.LEASE, caller, provider, _layout(request.spec),
            request.mode, request.ttl,
            lambda req: self.agents.export(provider, req))

    async def offer(self, caller: str, untrusted_consumer: str,
                    request: protocol.OfferRequest,
                    export: Exporter) -> LeaseAnswer:
        """Offer: ``caller`` grants a buffer it has (through ``export``, the
        offer connection) and the broker delivers the lease to ``consumer``."""
        consumer = _qube_argument(untrusted_consumer)
        return await self._cycle(caller, Kind.OFFER, consumer, caller,
                                 _layout(request.spec), OFFER_MODE,
                                 request.ttl, export)

    async def release(self, caller: str, untrusted_lease_id: str) -> Lease:
        """The consumer let go (finish the lease), or the provider asks to
        end it (revoke, consumer first). Only the two parties may."""
        lease = self._own_lease(caller, untrusted_lease_id)
        if caller == lease.provider:
            return await self.revoke(lease.id, f"ended by provider {caller}")
        if lease.state == State.REVOKING:
            # the let-go a revocation (TTL, shutdown, admin) is waiting
            # for: finish now rather than at the next retry
            return await self.revoke(lease.id, lease.reason)
        async with self._lock(lease.id):
            lease = self.registry.get(lease.id)
            if lease.state != State.ACTIVE:
                return _already_ending(lease)
            lease = await self._move(lease, State.RELEASING,
                                     f"released by consumer {caller}")
            return await self._finish(lease)

    def leases_of(self, caller: str) -> LeaseList:
        """The caller's live leases, as it may see them."""
        entries = [
            LeaseEntry(lease.id,
                       Role.CONSUMER if lease.consumer == caller
                       else Role.PROVIDER,
                       lease.provider if lease.consumer == caller
                       else lease.consumer,
                       lease.state.value, lease.pages, lease.mode,
                       int(lease.deadline))
            for lease in self.registry.live_of_qube(caller)]
        return LeaseList(tuple(entries[:protocol.MAX_LIST_LEASES]))

    # -- ending leases (admin, events, expiry) -------------------------------

    async def revoke(self, lease_id: str, reason: str) -> Lease:
        """End a live lease in the safe order; returns it as it was left
        (``revoking`` when a side did not confirm: retried later)."""
        async with self._lock(lease_id):
            return await self._finish(self.registry.get(lease_id),
                                      reason=reason)

    async def revoke_qube(self, qube: str, reason: str) -> list[Lease]:
        """End every live lease ``qube`` takes part in (each in order)."""
        return await self._revoke_all(
            (lease.id for lease in self.registry.live_of_qube(qube)), reason)

    async def expire_due(self) -> list[Lease]:
        """Revoke the leases whose TTL ran out."""
        return await self._revoke_all(
            (lease.id for lease in self.registry.past_deadline(self._clock())),
            TTL_REASON)

    async def reconcile(self) -> list[Lease]:
        """At start: finish what a crash left in flight (lease.py's table),
        and revoke active leases whose qubes are gone or restarted."""
        ids = [lease.id for lease in self.registry.in_flight()]
        ids += [lease.id for lease in self.registry.leases(state=State.ACTIVE)
                if not self._both_alive(lease)]
        log.info("reconciling %d leases", len(ids))
        return await self._revoke_all(ids, "reconciled at broker start")

    async def run(self) -> None:
        """Follow qube events and expire leases, until cancelled."""
        events = self.facts.events()
        try:
            await asyncio.gather(self._follow(events), self._expire_loop())
        finally:
            await events.aclose()
            for timer in self._timers.values():
                timer.cancel()

    # -- the grant cycle -------------------------------------------------------

    async def _cycle(self, caller: str, kind: Kind, consumer: str,
                     provider: str, meta: BufferMeta, mode: ReceiveMode,
                     ttl: int, export: Exporter) -> LeaseAnswer:
        lease = await self._admit(caller, kind, consumer, provider, meta,
                                  mode, ttl)
        async with self._lock(lease.id):
            try:
                refs = await export(_export_request(lease))
            except AgentError as err:
                await self._export_failed(lease, err)
                raise Refused("export-failed",
                              f"{provider} did not grant: {err}",
                              lease=lease) from None
            lease = await self._move(lease, State.ACTIVE,
                                     f"granted by {provider}", refs=refs)
            answer = _lease_answer(lease, refs)
            if kind is Kind.OFFER:
                await self._deliver(lease, answer)
        _audit("active", lease, lease.reason)
        return answer

    async def _admit(self, caller: str, kind: Kind, consumer: str,
                     provider: str, meta: BufferMeta, mode: ReceiveMode,
                     ttl: int) -> Lease:
        """decide.py's verdict; if granted, requested+exporting in one
        commit. Serialised, so that two requests never both fit into the
        last free pages of one budget."""
        async with self._admission:
            verdict = self._decide(caller, kind, consumer, provider, meta,
                                   mode, ttl)
            if isinstance(verdict, decide.Refusal):
                raise Refused(verdict.reason.value, verdict.message,
                              consumer=consumer, provider=provider,
                              pages=meta.pages)
            lease = new_lease(
                lease_id=new_lease_id(), consumer=consumer, provider=provider,
                consumer_domid=verdict.consumer_xid,
                provider_domid=verdict.provider_xid, mode=mode,
                initiator=Initiator(kind.value), meta=meta, ttl=verdict.ttl,
                now=self._clock(), reason=f"{kind.value} by {caller}")
            # counted by admission until the registry counts it, so that
            # the commit (an fsync) need not hold the admission lock
            self._unsettled(lease, 1)
        lease = (await self.commits.apply([
            Create(lease),
            Transition(lease.id, State.EXPORTING,
                       f"export asked of {provider}")],
            settled=functools.partial(self._unsettled, lease, -1)))[-1]
        self._deadline_changed.set()
        _audit("granted", lease, f"{kind.value} by {caller}")
        return lease

    def _unsettled(self, lease: Lease, sign: int) -> None:
        """Count (1) or stop counting (-1) an admitted lease's charge."""
        self._admitted[("leases", lease.consumer)] += sign
        self._admitted[("consumer pages", lease.consumer)] += \
            sign * lease.pages
        self._admitted[("provider pages", lease.provider)] += \
            sign * lease.pages

    def _decide(self, caller: str, kind: Kind, consumer: str, provider: str,
                meta: BufferMeta, mode: ReceiveMode, ttl: int):
        try:
            consumer_info = self.facts.qube(consumer)
            provider_info = self.facts.qube(provider)
            dom0 = self.facts.qube(DOM0)
        except QubesFactsError as exc:
            return decide.Refusal(decide.Reason.QUBES_UNAVAILABLE, str(exc))
        leases, pages = self.registry.consumer_usage(consumer)
        held = self._admitted
        usage = decide.Usage(
            leases + held[("leases", consumer)],
            pages + held[("consumer pages", consumer)],
            self.registry.provider_pages(provider)
            + held[("provider pages", provider)])
        request = decide.Request(
            caller=caller, kind=kind, consumer=consumer, provider=provider,
            pages=meta.pages, mode=decide.Mode(mode.value), ttl=ttl,
            modifier=meta.modifier)
        return decide.decide(request, consumer_info, provider_info, usage,
                             dom0.features if dom0 else {})

    async def _export_failed(self, lease: Lease, err: AgentError) -> None:
        """A provider that said no granted nothing: failed at once. Any
        other failure (timeout, bad answer) may have left grants: revoke."""
        reason = f"export failed: {err}"
        if err.answered:
            lease = await self._move(lease, State.FAILED, reason)
            _audit("failed", lease, reason)
        else:
            await self._revoke_later(lease, reason)

    async def _deliver(self, lease: Lease, answer: LeaseAnswer) -> None:
        try:
            await self.agents.deliver(lease.consumer, answer)
        except AgentError as err:
            reason = f"delivery to {lease.consumer} failed: {err}"
            # a consumer that refused holds nothing; after a timeout it might
            self._finals[lease.id] = State.FAILED
            await self._revoke_later(lease, reason,
                                     ask_consumer=not err.answered)
            raise Refused("delivery-failed", reason, lease=lease) from None

    # -- ending, in the safe order --------------------------------------------

    async def _finish(self, lease: Lease, *, reason: str = "",
                      ask_consumer: bool = True,
                      final: State | None = None) -> Lease:
        """Drive a lease towards its end; the caller holds its lock.
        ``final`` overrides the end state (kept for retries)."""
        if final is not None:
            self._finals[lease.id] = final
        if lease.state in FINAL:
            return lease
        if lease.state == State.REQUESTED:
            return await self._end(lease, State.FAILED, reason)
        if lease.state in (State.EXPORTING, State.ACTIVE):
            lease = await self._move(lease, State.REVOKING, reason)
        if lease.state == State.REVOKING and ask_consumer and lease.refs \
                and not await self._let_go(lease, lease.consumer,
                                           lease.consumer_domid, Role.CONSUMER):
            return lease
        if not await self._let_go(lease, lease.provider, lease.provider_domid,
                                  Role.PROVIDER):
            return lease
        end = self._finals.get(lease.id) or _final_state(lease)
        return await self._end(lease, end, lease.reason)

    async def _revoke_later(self, lease: Lease, reason: str, *,
                            ask_consumer: bool = True) -> None:
        """Record ``revoking`` now, finish in the background: the caller
        gets its refusal without waiting for a slow agent."""
        lease = await self._move(lease, State.REVOKING, reason)

        async def finish() -> None:
            async with self._lock(lease.id):
                await self._finish(self.registry.get(lease.id),
                                   ask_consumer=ask_consumer)
        self._spawn(finish())

    async def _let_go(self, lease: Lease, qube: str, domid: int,
                      role: Role) -> bool:
        """Ask one side to let go; True when it confirmed or is gone."""
        try:
            if not _alive(self.facts.qube(qube), domid):
                log.info("lease %s: %s %s is gone, nothing to revoke there",
                         lease.id, role.value, qube)
                return True
            answer = await self.agents.revoke(qube, lease.id, role)
        except AgentError as exc:
            if role is Role.PROVIDER and exc.code == "unreachable":
                # no agent listens: its grants died with its gntdev and
                # gntalloc fds, and the consumer let go already
                log.info("lease %s: provider %s has no agent: %s",
                         lease.id, qube, exc)
                return True
            why = str(exc)
        except QubesFactsError as exc:
            why = str(exc)
        else:
            if answer.status is RevokeStatus.RELEASED:
                return True
            why = f"busy: {answer.reason}"
        _audit("busy", lease, f"{role.value} {qube} did not confirm: {why}")
        self._retry_later(lease.id)
        return False

    async def _end(self, lease: Lease, state: State, reason: str) -> Lease:
        lease = await self._move(lease, state, reason or state.value)
        self._attempts.pop(lease.id, None)
        self._finals.pop(lease.id, None)
        self._locks.pop(lease.id, None)
        _audit(state.value, lease, lease.reason)
        return lease

    def _retry_later(self, lease_id: str) -> None:
        attempts = self._attempts.get(lease_id, 0) + 1
        self._attempts[lease_id] = attempts
        delay = min(self._retry_base * 2 ** (attempts - 1), self._retry_max)
        if lease_id in self._timers:
            self._timers[lease_id].cancel()
        self._timers[lease_id] = asyncio.get_running_loop().call_later(
            delay, lambda: self._spawn(self._retry(lease_id)))

    async def _retry(self, lease_id: str) -> None:
        self._timers.pop(lease_id, None)
        async with self._lock(lease_id):
            await self._finish(self.registry.get(lease_id))

    async def _revoke_all(self, ids: Iterable[str], reason: str) -> list[Lease]:
        return list(await asyncio.gather(
            *(self.revoke(lease_id, reason) for lease_id in ids)))

    # -- background work -------------------------------------------------------

    async def idle(self) -> None:
        """Wait until background work (cleanups, revocations started by
        events) is done; retries waiting on their timer are not waited for."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _follow(self, events) -> None:
        async for event in events:
            if event.kind is EventKind.SHUTDOWN:
                self._spawn(self.revoke_qube(event.qube,
                                             f"{event.qube} shut down"))
            elif event.kind is EventKind.START:
                # a restarted qube has a new domain id: its old leases died
                self._spawn(self._revoke_stale(event.qube))

    async def _revoke_stale(self, qube: str) -> None:
        ids = [lease.id for lease in self.registry.live_of_qube(qube)
               if not self._both_alive(lease)]
        await self._revoke_all(ids, f"{qube} restarted")

    async def _expire_loop(self) -> None:
        while True:
            self._deadline_changed.clear()
            await self.expire_due()
            upcoming = self.registry.past_deadline(float(2 ** 62))
            delay = (upcoming[0].deadline - self._clock()) if upcoming \
                else 3600.0
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._deadline_changed.wait(),
                                       max(delay, 0.01))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background work failed: %s", task.exception())

    # -- helpers ----------------------------------------------------------

    def _lock(self, lease_id: str) -> asyncio.Lock:
        return self._locks.setdefault(lease_id, asyncio.Lock())

    async def _move(self, lease: Lease, state: State, reason: str, *,
                    refs: GrantRefs | tuple = ()) -> Lease:
        return (await self.commits.apply([
            Transition(lease.id, state, protocol.one_line(reason),
                       tuple(refs))]))[0]

    def _own_lease(self, caller: str, untrusted_lease_id: str) -> Lease:
        """The lease if ``caller`` is one of its parties; the same refusal
        whether it does not exist or belongs to others (no probing)."""
        try:
            lease = self.registry.get(parse_lease_id(untrusted_lease_id))
        except (InvalidName, UnknownLease):
            lease = None
        if lease is None or caller not in (lease.consumer, lease.provider):
            raise Refused("unknown-lease",
                          f"{caller} has no lease {untrusted_lease_id[:32]}")
        return lease

    def _both_alive(self, lease: Lease) -> bool:
        try:
            return _alive(self.facts.qube(lease.consumer),
                          lease.consumer_domid) and \
                _alive(self.facts.qube(lease.provider), lease.provider_domid)
        except QubesFactsError:
            return True  # cannot tell: keep it, the next event will


def _alive(info: QubeInfo | None, domid: int) -> bool:
    """The qube runs as the domain the grant named."""
    return info is not None and info.running and info.xid == domid


def _already_ending(lease: Lease) -> Lease:
    """A consumer's release of a lease that is not active: a repeated
    release, or one after the revocation ended, is done; a lease still
    being exported has nothing to release yet."""
    if lease.state in (State.RELEASING, State.REVOKING) or lease.state in FINAL:
        return lease
    raise Refused("not-active", f"lease {lease.id} is {lease.state.value}",
                  lease=lease)


def _final_state(lease: Lease) -> State:
    if lease.state == State.RELEASING:
        return State.RELEASED
    if not lease.refs:
        return State.FAILED  # never became active
    return State.EXPIRED if lease.reason == TTL_REASON else State.REVOKED


def _qube_argument(untrusted_name: str) -> str:
    try:
        return parse_qube_name(untrusted_name)
    except InvalidName as exc:
        raise Refused("malformed", f"service argument: {exc}") from None


def _layout(spec: formats.BufferSpec) -> BufferMeta:
    try:
        return formats.layout_for(spec)
    except formats.InvalidLayout as exc:
        raise Refused("malformed", str(exc)) from None


def _export_request(lease: Lease) -> ExportRequest:
    return ExportRequest(lease.id, lease.consumer, lease.consumer_domid,
                         lease.meta)


def _lease_answer(lease: Lease, refs: GrantRefs) -> LeaseAnswer:
    return LeaseAnswer(lease.id, lease.provider, lease.provider_domid,
                       lease.mode, lease.meta, int(lease.deadline), refs)


def _audit_fields(lease: Lease) -> dict:
    return dict(lease_id=lease.id, consumer=lease.consumer,
                provider=lease.provider, pages=lease.pages)


def _audit(event: str, lease: Lease, reason: str) -> None:
    audit.decision(event, reason=reason, **_audit_fields(lease))
