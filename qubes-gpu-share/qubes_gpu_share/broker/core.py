"""The broker: every lease flow over the registry, decide.py and Qubes facts.

No I/O of its own besides the registry and the agents (:mod:`.agents`):
the socket services (:mod:`.services`) and the admin socket (:mod:`.admin`)
decode what arrives and call in here; :mod:`.follow` feeds it qubesd's
events and runs the expiry timer. The broker never touches buffer memory;
it relays integers and metadata.

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
import collections
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from .. import decide, formats, limits, protocol
from ..formats import BufferMeta, ReceiveMode
from ..lease import FINAL, Initiator, Lease, State, new_lease
from ..names import DOM0, InvalidName, new_lease_id, parse_lease_id, \
    parse_qube_name
from ..protocol import (ExportRequest, GrantRefs, LeaseAnswer, LeaseEntry,
                        LeaseList, Role, RevokeStatus)
from ..qubes.facts import QubesFacts, QubesFactsError
from ..qubeinfo import Domain, QubeInfo
from ..groupcommit import GroupCommit
from ..lease import advance
from ..registry import Create, Registry, Transition, UnknownLease
from . import audit
from .agents import AgentError, Agents
from .retries import Retries

log = logging.getLogger(__name__)

#: The grant step of a lease: the provider's agent (pull) or the offering
#: connection (offer) turns an ExportRequest into refs, or AgentError.
Exporter = Callable[[ExportRequest], Awaitable[GrantRefs]]

#: Reason of the revoking transition for a TTL expiry; the final state of a
#: lease revoked for it is ``expired`` (also after a broker restart).
TTL_REASON = "ttl expired"
#: How offered leases are received: cpu works in every qube (DESIGN.md).
OFFER_MODE = ReceiveMode.CPU
#: Ended leases are pruned from the registry after this many more ended.
PRUNE_EVERY = 100


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
                 retry_base: float = 1.0, retry_max: float = 60.0,
                 history: limits.History = limits.History()):
        self.registry = registry
        self.facts = facts
        self.agents = agents
        self.commits = GroupCommit(registry)
        self.history = history
        self.clock = clock
        self._admission = asyncio.Lock()
        #: admitted, not yet committed: (what, qube) -> leases or pages
        self._admitted: collections.Counter = collections.Counter()
        self._locks: dict[str, asyncio.Lock] = {}
        self._finals: dict[str, State] = {}
        #: (lease, role) whose domain is known gone: its domain id was seen
        #: held by another domain (a later run, or another qube)
        self._gone: set[tuple[str, Role]] = set()
        self.retries = Retries(self._retry, base=retry_base,
                               maximum=retry_max)
        #: domains (name, xid, start) found with no stale lease on their id
        self._clean: set[tuple[str, int, str]] = set()
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
        self._clean.clear()  # whatever was missed: found again
        infos: dict[str, QubeInfo | None] = {}
        ending = []
        for lease in self.registry.leases(state=State.ACTIVE):
            for name in (lease.consumer, lease.provider):
                if name not in infos:
                    infos[name] = await self.facts.describe(name)
            if not all(_keeps(infos[qube], domain)
                       for qube, domain in _sides(lease)):
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
        self._clean = {clean for clean in self._clean
                       if clean[1] != info.xid}
        stale = self._stale_on(info)
        stale += [lease for lease in self.registry.live_of_qube(qube)
                  if lease not in stale
                  and any(name == qube and info.gone_from(domain)
                          for name, domain in _sides(lease))]
        await self._supersede(info, stale)

    # -- the grant cycle -------------------------------------------------------

    async def _cycle(self, caller: str, kind: Initiator, consumer: str,
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
            lease = self._move_later(lease, State.ACTIVE,
                                     f"granted by {provider}", refs=refs)
            answer = _lease_answer(lease, refs)
            if kind is Initiator.OFFER:
                await self._deliver(lease, answer)
        _audit("active", lease, lease.reason)
        return answer

    async def _admit(self, caller: str, kind: Initiator, consumer: str,
                     provider: str, meta: BufferMeta, mode: ReceiveMode,
                     ttl: int) -> Lease:
        """decide.py's verdict; if granted, requested+exporting in one
        commit.

        Facts come first, off the loop: snapshots (kept current by
        qubesd's events), a first verdict on them (a refusal costs qubesd
        nothing more), then each side's domain read fresh (one call each).
        The final verdict and the record are serialised, so that two
        requests never both fit into the last free pages of one budget."""
        about = dict(consumer=consumer, provider=provider, pages=meta.pages)
        judge = functools.partial(self._judge, caller, kind, consumer,
                                  provider, meta, mode, ttl, about=about)
        infos = await self._facts_for(consumer, provider, about)
        judge(infos)
        await self._same_domains(infos[:2], about)
        async with self._admission:
            self._check_trusted(about)
            verdict = judge(infos)
            self._check_domains(infos[:2], about)
            lease = new_lease(
                lease_id=new_lease_id(), consumer=consumer, provider=provider,
                consumer_domid=verdict.consumer_xid,
                provider_domid=verdict.provider_xid, mode=mode,
                initiator=kind, meta=meta, ttl=verdict.ttl,
                now=self.clock(), reason=f"{kind.value} by {caller}",
                consumer_start=infos[0].start, provider_start=infos[1].start)
            # counted by admission until the registry counts it, so that
            # the commit (an fsync) need not hold the admission lock
            self._unsettled(lease, 1)
        lease = (await self.commits.apply([
            Create(lease),
            Transition(lease.id, State.EXPORTING,
                       f"export asked of {provider}")],
            settled=functools.partial(self._unsettled, lease, -1)))[-1]
        self.deadline_changed.set()
        _audit("granted", lease, f"{kind.value} by {caller}")
        return lease

    async def _facts_for(self, consumer: str, provider: str,
                         about: dict) -> tuple:
        """(consumer, provider, dom0) as the facts seam knows them."""
        self._check_trusted(about)
        try:
            return tuple(await asyncio.gather(
                *(self.facts.describe(name)
                  for name in (consumer, provider, DOM0))))
        except QubesFactsError as exc:
            raise Refused(decide.Reason.QUBES_UNAVAILABLE.value, str(exc),
                          **about) from None

    async def _same_domains(self, infos: Iterable[QubeInfo],
                            about: dict) -> None:
        """Each side's domain read fresh from qubesd must be the one the
        snapshot names: the grant goes to that domain id."""
        infos = list(infos)
        try:
            now = await asyncio.gather(
                *(self.facts.current_domain(info.name) for info in infos))
        except QubesFactsError as exc:
            raise Refused(decide.Reason.QUBES_UNAVAILABLE.value, str(exc),
                          **about) from None
        for info, domain in zip(infos, now):
            if domain is None or not domain.same_run(info.domain):
                raise Refused(decide.Reason.QUBES_UNAVAILABLE.value,
                              f"{info.name} changed while the broker "
                              f"decided (domain {info.xid} -> "
                              f"{domain.xid if domain else 'none'}); try "
                              f"again", **about)

    def _check_trusted(self, about: dict) -> None:
        if not self.trusted():
            raise Refused(decide.Reason.QUBES_UNAVAILABLE.value,
                          "qubes events unavailable: the broker grants "
                          "nothing until it hears qubesd again", **about)

    def _check_domains(self, infos: Iterable[QubeInfo], about: dict) -> None:
        """A domain id that still has live leases of an earlier domain gets
        nothing new until those ended (they are being ended now)."""
        for info in infos:
            stale = self._stale_on(info)
            if stale:
                self.spawn(self._supersede(info, stale))
                raise Refused(
                    "domain-reused",
                    f"domain id {info.xid} of {info.name} still has "
                    f"{len(stale)} lease(s) of an earlier domain, being "
                    f"revoked; try again", **about)

    def _stale_on(self, info: QubeInfo) -> list[Lease]:
        """Live leases bound to ``info``'s domain id under another name or
        an earlier run.

        Once a domain was found clean it stays clean until another domain
        gets its id, which is a domain start (the follower calls
        :meth:`domain_started`) or something missed while events were down
        (:meth:`recheck`): both forget what was found, so admission does
        not read every live lease of a busy provider each time."""
        current = info.domain
        if current is None:
            return []
        identity = (info.name, current.xid, current.start)
        if identity in self._clean:
            return []
        stale = [lease for lease in self.registry.live_on_domid(current.xid)
                 if any(domain.xid == current.xid
                        and not (name == info.name
                                 and domain.same_run(current))
                        for name, domain in _sides(lease))]
        if not stale:
            self._clean.add(identity)
        return stale

    async def _supersede(self, owner: QubeInfo, stale: list[Lease]) -> None:
        """End leases whose side's domain id ``owner`` now holds."""
        for lease in stale:
            for role, (name, domain) in zip((Role.CONSUMER, Role.PROVIDER),
                                            _sides(lease)):
                if domain.xid == owner.xid and not (
                        name == owner.name and domain.same_run(owner.domain)):
                    self._gone.add((lease.id, role))
        await self._revoke_all(
            [lease.id for lease in stale],
            f"domain id {owner.xid} now belongs to {owner.name}")

    def _unsettled(self, lease: Lease, sign: int) -> None:
        """Count (1) or stop counting (-1) an admitted lease's charge."""
        for key in _charges(lease):
            self._admitted[key] += sign * (1 if key[0].endswith("leases")
                                           else lease.pages)

    def _judge(self, caller: str, kind: Initiator, consumer: str, provider: str,
               meta: BufferMeta, mode: ReceiveMode, ttl: int, infos: tuple,
               *, about: dict) -> decide.Grant:
        """decide.py's verdict over ``infos`` and the usage now; a refusal
        is raised."""
        consumer_info, provider_info, dom0 = infos
        usage = self._usage(consumer, provider)
        request = decide.Request(
            caller=caller, kind=kind, consumer=consumer, provider=provider,
            pages=meta.pages, mode=mode, ttl=ttl,
            modifier=meta.modifier)
        verdict = decide.decide(request, consumer_info, provider_info, usage,
                                dom0.features if dom0 else {})
        if isinstance(verdict, decide.Refusal):
            raise Refused(verdict.reason.value, verdict.message, **about)
        return verdict

    def _usage(self, consumer: str, provider: str) -> decide.Usage:
        """What the registry holds, plus what admission let through and
        the registry does not count yet."""
        leases, pages = self.registry.consumer_usage(consumer)
        offered, offered_pages, pair = self.registry.consumer_share(
            consumer, provider)
        held = self._admitted
        return decide.Usage(
            consumer_leases=leases - offered + held["leases", consumer],
            consumer_pages=pages - offered_pages + held["pages", consumer],
            provider_pages=self.registry.provider_pages(provider)
            + held["provider pages", provider],
            offered_leases=offered + held["offered leases", consumer],
            offered_pages=offered_pages + held["offered pages", consumer],
            pair_pages=pair + held["pair pages", consumer, provider])

    async def _export_failed(self, lease: Lease, err: AgentError) -> None:
        """A provider that said no granted nothing: failed at once. Any
        other failure (timeout, bad answer) may have left grants: revoke."""
        reason = f"export failed: {err}"
        if err.answered:
            lease = await self._move(lease, State.FAILED, reason)
            _audit("failed", lease, reason)
        else:  # the consumer was not answered: only the provider is told
            await self._revoke_later(lease, reason, ask_consumer=False)

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
        qube, domain = _sides(lease)[role is Role.PROVIDER]
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
        except (AgentError, QubesFactsError) as exc:
            why = str(exc)
        why = f"{role.value} {qube} did not confirm: {why}"
        delay = self.retries.later(lease.id, why)
        _audit("busy", lease, f"{why}; again in {delay:g} s")
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
            _audit("unverified", lease, f"{lease.provider}'s kernel cannot "
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
        _audit(state.value, lease, lease.reason)
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
            Transition(lease.id, state, protocol.one_line(reason),
                       tuple(refs))]))[0]

    def _move_later(self, lease: Lease, state: State, reason: str, *,
                    refs: GrantRefs | tuple = ()) -> Lease:
        """A change that rides on the next commit (GroupCommit.later)."""
        reason = protocol.one_line(reason)
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


def _sides(lease: Lease) -> tuple[tuple[str, Domain], tuple[str, Domain]]:
    """(consumer, its domain), (provider, its domain) as the grant names
    them."""
    return ((lease.consumer, Domain(lease.consumer_domid,
                                    lease.consumer_start)),
            (lease.provider, Domain(lease.provider_domid,
                                    lease.provider_start)))


def _charges(lease: Lease) -> list[tuple]:
    """The admission counters a lease counts in (core.Broker._usage)."""
    own = "offered " if lease.initiator is Initiator.OFFER else ""
    return [(own + "leases", lease.consumer), (own + "pages", lease.consumer),
            ("provider pages", lease.provider),
            ("pair pages", lease.consumer, lease.provider)]


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


def _audit_fields(lease: Lease) -> dict:
    return dict(lease_id=lease.id, consumer=lease.consumer,
                provider=lease.provider, pages=lease.pages)


def _audit(event: str, lease: Lease, reason: str) -> None:
    audit.decision(event, reason=reason, **_audit_fields(lease))
