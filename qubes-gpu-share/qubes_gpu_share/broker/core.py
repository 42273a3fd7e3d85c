"""The broker: every lease flow, from admission to the end, over the registry.

Whether a lease may be granted is :mod:`.admission`'s (over decide.py and
the Qubes facts); this module runs the grant cycle around it and ends
leases in the safe order. No I/O of its own besides the registry and the
agents (:mod:`.agents`): the socket services (:mod:`.services`) and the
admin socket (:mod:`.admin`) decode what arrives and call in here;
:mod:`.follow` feeds it qubesd's events and runs the expiry timer. The
broker never touches buffer memory; it relays integers and metadata.

Durable points (docs/registry.md argues each): a pull or offer records
``requested+exporting`` durably before the provider is asked; ``active``
rides on the next commit (the refs may reach the consumer first: after a
crash the lease is ``exporting`` and is revoked, consumer first); a
release records ``releasing`` durably before the provider is asked, and
the end rides on the next commit (after a crash the lease is
``releasing`` and the provider, asked again, confirms again). All go
through one :class:`GroupCommit`, off the event loop, so concurrent
requests share commits.

Ending a lease follows the release order Xen imposes: the consumer lets go
and confirms first, only then the provider releases. The broker never acts
on a guess (docs/broker.md, "What ends a side's part"): a side's part ends
only with its own confirmation, or when qubesd says its domain is gone
(halted, or running as another domain; a domain id now held by another
domain). A timeout, an error, a garbled answer, a paused or crashed qube,
or a state qubesd does not give leave the lease ``releasing``/``revoking``
with its budget held; it is retried with backoff (:mod:`.retries`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from .. import formats, limits, protocol
from ..oneline import one_line
from ..formats import BufferMeta, ReceiveMode
from ..groupcommit import GroupCommit
from ..lease import FINAL, Initiator, Lease, State, advance
from ..names import InvalidName, parse_lease_id, parse_qube_name
from ..protocol import (ExportRequest, GrantRefs, LeaseAnswer, LeaseEntry,
                        LeaseList, Role, RevokeStatus)
from ..qubeinfo import Domain, QubeInfo
from ..qubes.facts import QubesFacts, QubesFactsError
from ..registry import Registry, Transition, UnknownLease
from . import audit
from .admission import Admission
from .agents import AgentCallError, Agents
from .refusal import Refused
from .retries import Retries

log = logging.getLogger(__name__)

#: The grant step of a lease: the provider's agent (pull) or the offering
#: connection (offer) turns an ExportRequest into refs, or AgentCallError.
Exporter = Callable[[ExportRequest], Awaitable[GrantRefs]]

#: Reason of the revoking transition for a TTL expiry; the final state of a
#: lease revoked for it is ``expired`` (also after a broker restart).
TTL_REASON = "ttl expired"
#: How offered leases are received: cpu works in every qube (DESIGN.md).
OFFER_MODE = ReceiveMode.CPU
#: Ended leases are pruned from the registry after this many more ended.
PRUNE_EVERY = 100


class Broker:
    """The dom0 authority over leases. One per registry."""

    def __init__(self, registry: Registry, facts: QubesFacts, agents: Agents,
                 *, clock: Callable[[], float] = time.time,
                 retry_base: float = 1.0, retry_max: float = 60.0,
                 history: limits.History = limits.History()):
        self.registry = registry
        self.facts = facts
        self.agents = agents
        self.commits = GroupCommit(registry)
        self.history = history
        self.clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        self._finals: dict[str, State] = {}
        #: (lease, role) whose domain is known gone: its domain id was seen
        #: held by another domain (a later run, or another qube)
        self._gone: set[tuple[str, Role]] = set()
        self.retries = Retries(self._retry, base=retry_base,
                               maximum=retry_max)
        #: lease -> pages its consumer still maps, by the provider's kernel
        #: (the lease stays releasing/revoking, charged, until they are 0)
        self.held: dict[str, int] = {}
        #: lease -> the call to a side under way to end it (for the admin)
        self.asking: dict[str, str] = {}
        self._tasks: set[asyncio.Task] = set()
        self._ended = 0
        #: whether qubesd's events are heard and every live lease was
        #: checked against fresh facts since (set by .follow.Follower)
        self.trusted = lambda: False
        #: wakes the expiry timer when a new deadline may be nearer
        self.deadline_changed = asyncio.Event()
        self.admission = Admission(
            registry, facts, self.commits, clock=clock,
            trusted=lambda: self.trusted(),
            on_stale=lambda info, stale: self.spawn(
                self._supersede(info, stale)))

    # -- requests from qubes -------------------------------------------------

    async def lease(self, caller: str, untrusted_provider: str,
                    request: protocol.LeaseRequest) -> LeaseAnswer:
        """Pull: ``caller`` asks ``provider`` for a new buffer."""
        provider = _qube_argument(untrusted_provider)
        return await self._cycle(
            caller, Initiator.LEASE, caller, provider, _layout(request.spec),
            request.mode, request.ttl,
            lambda req: self.agents.export(provider, req))

    async def offer(self, caller: str, untrusted_consumer: str,
                    request: protocol.OfferRequest,
                    export: Exporter) -> LeaseAnswer:
        """Offer: ``caller`` grants a buffer it has (through ``export``, the
        offer connection) and the broker delivers the lease to ``consumer``."""
        consumer = _qube_argument(untrusted_consumer)
        return await self._cycle(caller, Initiator.OFFER, consumer, caller,
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
            lease = self.get(lease.id)
            if lease.state != State.ACTIVE:
                return _already_ending(lease)
            lease = await self._move(lease, State.RELEASING,
                                     f"released by consumer {caller}")
            return await self._finish(lease)

    def leases_of(self, caller: str) -> LeaseList:
        """The caller's live leases, as it may see them (changes waiting
        for their commit included: a lease it just released is gone)."""
        leases = [self.commits.pending(lease.id) or lease
                  for lease in self.registry.live_of_qube(caller)]
        entries = [
            LeaseEntry(lease.id,
                       Role.CONSUMER if lease.consumer == caller
                       else Role.PROVIDER,
                       lease.provider if lease.consumer == caller
                       else lease.consumer,
                       lease.state.value, lease.pages, lease.mode,
                       int(lease.deadline))
            for lease in leases if lease.live]
        return LeaseList(tuple(entries[:protocol.MAX_LIST_LEASES]))

    # -- ending leases (admin, events, expiry) -------------------------------

    async def revoke(self, lease_id: str, reason: str) -> Lease:
        """End a live lease in the safe order; returns it as it was left
        (``revoking`` when a side did not confirm: retried later)."""
        async with self._lock(lease_id):
            return await self._finish(self.get(lease_id), reason=reason)

    async def revoke_qube(self, qube: str, reason: str) -> list[Lease]:
        """End every live lease ``qube`` takes part in (each in order)."""
        return await self._revoke_all(
            (lease.id for lease in self.registry.live_of_qube(qube)), reason)

    async def revoke_within(self, lease_ids: Iterable[str], reason: str,
                            seconds: float) -> list[Lease]:
        """Start ending each lease and wait at most ``seconds`` for them;
        return each as it is then. An agent that does not answer keeps
        the caller (an admin) no longer than that: the ending goes on in
        the background, and the lease shows why it waits."""
        lease_ids = list(lease_ids)
        tasks = [self.spawn(self.revoke(lease_id, reason))
                 for lease_id in lease_ids]
        if tasks:
            await asyncio.wait(tasks, timeout=seconds)
        return [self.get(lease_id) for lease_id in lease_ids]

    async def expire_due(self) -> list[Lease]:
        """Revoke the leases whose TTL ran out."""
        return await self._revoke_all(
            (lease.id for lease in self.registry.past_deadline(self.clock())),
            TTL_REASON)

    async def finish_in_flight(self) -> None:
        """At start: finish in the background what a crash left in flight
        (lease.py's table); nothing else drives those leases."""
        ids = [lease.id for lease in self.registry.in_flight()]
        log.info("finishing %d leases a previous broker left in flight",
                 len(ids))
        for lease_id in ids:
            self.spawn(self.revoke(lease_id, "reconciled at broker start"))

    async def recheck(self, why: str) -> int:
        """Check every active lease against fresh facts and start ending
        those a side of which is gone or ending (shut down, crashed...).

        Runs at start and after every (re)connection of the events stream:
        what happened while nobody listened is unknown. Raises
        QubesFactsError when qubesd cannot answer (nothing is ended on a
        guess); returns how many leases it started to end."""
        await self.commits.flush()  # leases whose `active` waits included
        self.admission.forget()  # whatever was missed: found again
        infos: dict[str, QubeInfo | None] = {}
        ending = []
        for lease in self.registry.leases(state=State.ACTIVE):
            for name in (lease.consumer, lease.provider):
                if name not in infos:
                    infos[name] = await self.facts.describe(name)
            if not all(_keeps(infos[qube], domain)
                       for qube, domain in lease.sides()):
                ending.append(lease.id)
        for lease_id in ending:
            self.spawn(self.revoke(lease_id, why))
        return len(ending)

    async def domain_started(self, qube: str) -> None:
        """``qube`` started: every live lease bound to its domain id under
        another name or an earlier run ends (that domain is gone: Xen gives
        an id to one domain at a time), as do its own leases from earlier
        runs. Admission refuses the new domain until they ended."""
        info = await self.facts.describe(qube)
        if info is None or info.domain is None:
            return
        self.admission.forget(info.xid)
        stale = self.admission.stale_on(info)
        stale += [lease for lease in self.registry.live_of_qube(qube)
                  if lease not in stale
                  and any(name == qube and info.gone_from(domain)
                          for name, domain in lease.sides())]
        await self._supersede(info, stale)

    # -- the grant cycle -------------------------------------------------------

    async def _cycle(self, caller: str, kind: Initiator, consumer: str,
                     provider: str, meta: BufferMeta, mode: ReceiveMode,
                     ttl: int, export: Exporter) -> LeaseAnswer:
        lease = await self.admission.admit(caller, kind, consumer, provider,
                                           meta, mode, ttl)
        self.deadline_changed.set()
        async with self._lock(lease.id):
            try:
                refs = await export(_export_request(lease))
            except AgentCallError as err:
                await self._export_failed(lease, err)
                raise Refused("export-failed",
                              f"{provider} did not grant: {err}",
                              lease=lease) from None
            lease = self._move_later(lease, State.ACTIVE,
                                     f"granted by {provider}", refs=refs)
            answer = _lease_answer(lease, refs)
            if kind is Initiator.OFFER:
                await self._deliver(lease, answer)
        audit.lease_event("active", lease, lease.reason)
        return answer

    async def _supersede(self, owner: QubeInfo, stale: list[Lease]) -> None:
        """End leases whose side's domain id ``owner`` now holds."""
        for lease in stale:
            for role, (name, domain) in zip((Role.CONSUMER, Role.PROVIDER),
                                            lease.sides()):
                if domain.xid == owner.xid and not (
                        name == owner.name and domain.same_run(owner.domain)):
                    self._gone.add((lease.id, role))
        await self._revoke_all(
            [lease.id for lease in stale],
            f"domain id {owner.xid} now belongs to {owner.name}")

    async def _export_failed(self, lease: Lease, err: AgentCallError) -> None:
        """A provider that said no granted nothing: failed at once. Any
        other failure (timeout, bad answer) may have left grants: revoke."""
        reason = f"export failed: {err}"
        if err.answered:
            lease = await self._move(lease, State.FAILED, reason)
            audit.lease_event("failed", lease, reason)
        else:  # the consumer was not answered: only the provider is told
            await self._revoke_later(lease, reason, ask_consumer=False)

    async def _deliver(self, lease: Lease, answer: LeaseAnswer) -> None:
        try:
            await self.agents.deliver(lease.consumer, answer)
        except AgentCallError as err:
            reason = f"delivery to {lease.consumer} failed: {err}"
            # a consumer that refused holds nothing; after a timeout it might
            self._finals[lease.id] = State.FAILED
            await self._revoke_later(lease, reason,
                                     ask_consumer=not err.answered)
            raise Refused("delivery-failed", reason, lease=lease) from None

    # -- ending, in the safe order --------------------------------------------

    async def _finish(self, lease: Lease, *, reason: str = "",
                      ask_consumer: bool = True) -> Lease:
        """Drive a lease towards its end; the caller holds its lock."""
        if lease.state in FINAL:
            return lease
        if lease.state == State.REQUESTED:
            return await self._end(lease, State.FAILED, reason)
        if lease.state in (State.EXPORTING, State.ACTIVE):
            lease = await self._move(lease, State.REVOKING, reason)
        # the consumer is asked even without refs on record: an ``active``
        # that a crash kept from the disk may have reached it
        if lease.state == State.REVOKING and ask_consumer \
                and not await self._side_done(lease, Role.CONSUMER):
            return lease
        if not await self._side_done(lease, Role.PROVIDER):
            return lease
        end = self._finals.get(lease.id) or _final_state(lease)
        return await self._end(lease, end, lease.reason)

    async def _revoke_later(self, lease: Lease, reason: str, *,
                            ask_consumer: bool = True) -> None:
        """Record ``revoking`` now, finish in the background: the caller
        gets its refusal without waiting for a slow agent."""
        lease = await self._move(lease, State.REVOKING, reason)
        if not ask_consumer:
            self._gone.add((lease.id, Role.CONSUMER))

        async def finish() -> None:
            async with self._lock(lease.id):
                await self._finish(self.get(lease.id))
        self.spawn(finish())

    async def _side_done(self, lease: Lease, role: Role) -> bool:
        """Whether one side's part has ended: it confirmed, or its domain
        is definitely gone. Anything else schedules a retry: False."""
        qube, domain = lease.sides()[role is Role.PROVIDER]
        if (lease.id, role) in self._gone:
            return True
        try:
            info = await self.facts.describe(qube)
            if info is None or info.gone_from(domain):
                log.info("lease %s: %s %s is gone (%s), nothing to revoke "
                         "there", lease.id, role.value, qube,
                         info.power.value if info else "no such qube")
                return True
            if not info.rule.ask_agent:
                why = f"{qube} is {info.power.value}: waiting for it to " \
                      f"run or halt"
            else:
                self.asking[lease.id] = f"asking {role.value} {qube} " \
                                        f"to let go"
                try:
                    answer = await self.agents.revoke(qube, lease.id, role)
                finally:
                    self.asking.pop(lease.id, None)
                if role is Role.PROVIDER:
                    self._note_held(lease, answer)
                if answer.status is RevokeStatus.RELEASED:
                    return True
                why = f"busy: {answer.reason}"
        except (AgentCallError, QubesFactsError) as exc:
            why = str(exc)
        why = f"{role.value} {qube} did not confirm: {why}"
        delay = self.retries.later(lease.id, why)
        audit.lease_event("busy", lease, f"{why}; again in {delay:g} s")
        return False

    def _note_held(self, lease: Lease, answer) -> None:
        """What the provider's kernel says the consumer still maps (issue
        14): those pages stay charged (the lease does not end) and are
        shown; a kernel that cannot tell is said so in the audit."""
        if answer.held_pages:
            self.held[lease.id] = answer.held_pages
            return
        self.held.pop(lease.id, None)
        if answer.held_pages is None and \
                answer.status is RevokeStatus.RELEASED:
            audit.lease_event("unverified", lease, f"{lease.provider}'s kernel cannot "
                   f"tell whether {lease.consumer} still maps the pages "
                   f"(no IMP_TRY_RELEASE): taken as released")

    async def _end(self, lease: Lease, state: State, reason: str) -> Lease:
        lease = self._move_later(lease, state, reason or state.value)
        self.held.pop(lease.id, None)
        self.retries.done(lease.id)
        self._finals.pop(lease.id, None)
        self._locks.pop(lease.id, None)
        self._gone.discard((lease.id, Role.CONSUMER))
        self._gone.discard((lease.id, Role.PROVIDER))
        audit.lease_event(state.value, lease, lease.reason)
        self._ended += 1
        if self._ended >= PRUNE_EVERY:
            self._ended = 0
            self.spawn(self.prune())
        return lease

    async def prune(self) -> int:
        """Forget ended leases beyond the kept history (limits.History),
        on the registry's writer thread."""
        pruned, batch = 0, 1000
        while True:
            count = await self.commits.run(lambda: self.registry.prune(
                self.clock(), keep_seconds=self.history.seconds,
                keep_leases=self.history.leases, batch=batch))
            pruned += count
            if count < batch:
                return pruned

    def _retry(self, lease_id: str) -> None:
        async def again() -> None:
            async with self._lock(lease_id):
                await self._finish(self.get(lease_id))
        self.spawn(again())

    async def _revoke_all(self, ids: Iterable[str], reason: str) -> list[Lease]:
        """Revoke each; one that fails (a bug, a registry error) is logged
        and does not stop the others."""
        results = await asyncio.gather(
            *(self.revoke(lease_id, reason) for lease_id in ids),
            return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.error("revocation failed: %r", result)
        return [r for r in results if isinstance(r, Lease)]

    # -- background work -------------------------------------------------------

    async def idle(self) -> None:
        """Wait until background work (cleanups, revocations started by
        events) is done and every change is on disk; retries waiting on
        their timer are not waited for."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.commits.flush()

    def spawn(self, coro) -> asyncio.Task:
        """Run ``coro`` in the background; a failure is logged."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background work failed: %r", task.exception())

    def close(self) -> None:
        """Stop retry timers and background work (the daemon is ending)."""
        self.retries.close()
        for task in self._tasks:
            task.cancel()

    async def aclose(self) -> None:
        """:meth:`close`, then commit what waits and stop the writer."""
        self.close()
        await self.commits.aclose()

    # -- helpers ----------------------------------------------------------

    def _lock(self, lease_id: str) -> asyncio.Lock:
        return self._locks.setdefault(lease_id, asyncio.Lock())

    async def _move(self, lease: Lease, state: State, reason: str, *,
                    refs: GrantRefs | tuple = ()) -> Lease:
        """A change that is durable when this returns."""
        return (await self.commits.apply([
            Transition(lease.id, state, one_line(reason),
                       tuple(refs))]))[0]

    def _move_later(self, lease: Lease, state: State, reason: str, *,
                    refs: GrantRefs | tuple = ()) -> Lease:
        """A change that rides on the next commit (GroupCommit.later)."""
        reason = one_line(reason)
        moved = advance(lease, state, reason=reason, now=self.clock(),
                        refs=refs)
        self.commits.later(Transition(lease.id, state, reason, tuple(refs)),
                           moved)
        return moved

    def get(self, lease_id: str) -> Lease:
        """The lease as it is, a change still on its way to disk included."""
        return self.commits.pending(lease_id) or self.registry.get(lease_id)

    def _own_lease(self, caller: str, untrusted_lease_id: str) -> Lease:
        """The lease if ``caller`` is one of its parties; the same refusal
        whether it does not exist or belongs to others (no probing)."""
        try:
            lease = self.get(parse_lease_id(untrusted_lease_id))
        except (InvalidName, UnknownLease):
            lease = None
        if lease is None or caller not in (lease.consumer, lease.provider):
            raise Refused("unknown-lease",
                          f"{caller} has no lease {untrusted_lease_id[:32]}")
        return lease


def _keeps(info: QubeInfo | None, domain: Domain) -> bool:
    """Whether a side's state lets its lease stay (POWER_RULES): it still
    runs as the granted domain in a state that keeps leases, or qubesd
    does not say (unknown: no step on a guess)."""
    if info is None or info.gone_from(domain):
        return False
    return info.rule.keeps_lease


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
