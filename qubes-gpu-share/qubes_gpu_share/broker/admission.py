"""Admission: may this lease be granted now, and its record if so.

The verdict is decide.py's (pure); this module gathers what it judges and
keeps the judgement honest under concurrency and uncertain facts:

- facts come off the event loop: qubesd's snapshots (kept current by its
  events), a first verdict on them (a refusal costs qubesd nothing more),
  then each side's domain read fresh, one call each;
- nothing is granted while the broker does not trust what it knows
  (qubesd's events down, or not re-checked since they came back);
- a domain id that still has live leases of an earlier domain gets nothing
  new until they ended (Xen may give an id to a new domain at once);
- the final verdict and the record are serialised, and an admitted lease
  is counted here until the registry counts it, so that two requests never
  both fit into the last free pages of one budget while the commit (an
  fsync) runs without the lock.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import Callable, Iterable

from .. import decide
from ..formats import BufferMeta, ReceiveMode
from ..groupcommit import GroupCommit
from ..lease import Initiator, Lease, State, new_lease
from ..names import DOM0, new_lease_id
from ..qubeinfo import QubeInfo
from ..qubes.facts import QubesFacts, QubesFactsError
from ..registry import Create, Registry, Transition
from . import audit
from .refusal import Refused

#: Told of live leases found on a domain id that another domain holds now
#: (the broker ends them); called from admission, so it must not block.
OnStale = Callable[[QubeInfo, list[Lease]], None]


class Admission:
    """Admits leases for one broker over its registry and facts."""

    def __init__(self, registry: Registry, facts: QubesFacts,
                 commits: GroupCommit, *, clock: Callable[[], float],
                 trusted: Callable[[], bool], on_stale: OnStale):
        self.registry = registry
        self.facts = facts
        self.commits = commits
        self.clock = clock
        self._trusted = trusted
        self._on_stale = on_stale
        self._lock = asyncio.Lock()
        #: admitted, not yet committed: (what, qube) -> leases or pages
        self.admitted: collections.Counter = collections.Counter()
        #: domains (name, xid, start) found with no stale lease on their id
        self.clean: set[tuple[str, int, str]] = set()

    def forget(self, xid: int | None = None) -> None:
        """Forget which domains were found clean (all, or those of domain
        id ``xid``): another domain may hold their id now."""
        if xid is None:
            self.clean.clear()
        else:
            self.clean = {clean for clean in self.clean if clean[1] != xid}

    async def admit(self, caller: str, kind: Initiator, consumer: str,
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
        async with self._lock:
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
        audit.lease_event("granted", lease, f"{kind.value} by {caller}")
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
        if not self._trusted():
            raise Refused(decide.Reason.QUBES_UNAVAILABLE.value,
                          "qubes events unavailable: the broker grants "
                          "nothing until it hears qubesd again", **about)

    def _check_domains(self, infos: Iterable[QubeInfo], about: dict) -> None:
        """A domain id that still has live leases of an earlier domain gets
        nothing new until those ended (they are being ended now)."""
        for info in infos:
            stale = self.stale_on(info)
            if stale:
                self._on_stale(info, stale)
                raise Refused(
                    "domain-reused",
                    f"domain id {info.xid} of {info.name} still has "
                    f"{len(stale)} lease(s) of an earlier domain, being "
                    f"revoked; try again", **about)

    def stale_on(self, info: QubeInfo) -> list[Lease]:
        """Live leases bound to ``info``'s domain id under another name or
        an earlier run.

        Once a domain was found clean it stays clean until another domain
        gets its id, which is a domain start (the follower calls
        :meth:`.core.Broker.domain_started`) or something missed while
        events were down (:meth:`.core.Broker.recheck`): both forget what
        was found (:meth:`forget`), so admission does
        not read every live lease of a busy provider each time."""
        current = info.domain
        if current is None:
            return []
        identity = (info.name, current.xid, current.start)
        if identity in self.clean:
            return []
        stale = [lease for lease in self.registry.live_on_domid(current.xid)
                 if any(domain.xid == current.xid
                        and not (name == info.name
                                 and domain.same_run(current))
                        for name, domain in lease.sides())]
        if not stale:
            self.clean.add(identity)
        return stale

    def _unsettled(self, lease: Lease, sign: int) -> None:
        """Count (1) or stop counting (-1) an admitted lease's charge."""
        for key in _charges(lease):
            self.admitted[key] += sign * (1 if key[0].endswith("leases")
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
        held = self.admitted
        return decide.Usage(
            consumer_leases=leases - offered + held["leases", consumer],
            consumer_pages=pages - offered_pages + held["pages", consumer],
            provider_pages=self.registry.provider_pages(provider)
            + held["provider pages", provider],
            offered_leases=offered + held["offered leases", consumer],
            offered_pages=offered_pages + held["offered pages", consumer],
            pair_pages=pair + held["pair pages", consumer, provider])


def _charges(lease: Lease) -> list[tuple]:
    """The admission counters a lease counts in (Admission._usage)."""
    own = "offered " if lease.initiator is Initiator.OFFER else ""
    return [(own + "leases", lease.consumer), (own + "pages", lease.consumer),
            ("provider pages", lease.provider),
            ("pair pages", lease.consumer, lease.provider)]
