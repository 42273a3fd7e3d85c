"""The lease state machine and the lease record (pure, no I/O).

A lease is one buffer granted by a provider qube to a consumer qube. Its
states and the transitions between them are written down here once; the
registry (the only writer of lease state) enforces them through
:func:`advance`, and the broker decides *when* to move a lease.

The graph follows the release order Xen imposes (DESIGN.md, hard facts):
IMP_RELEASE cannot take back a grant the peer still maps, so a lease ends
only after the consumer let go and then the provider released. Until the
provider confirmed, the lease is live and holds budget::

    requested --> exporting --> active --> releasing --> released
        |             |           |
        |             |           +------> revoking --> revoked | expired
        |             +------------------> revoking --> failed
        +--> failed   +--> failed

* ``requested``: admitted and recorded; the provider has not been asked yet
  (so nothing can have been granted: a crash here ends in ``failed``).
* ``exporting``: recorded *before* the broker asks the provider to grant, so
  after a crash the broker knows grants may exist and must be cleaned up.
* ``active``: the provider answered with refs; the consumer got (pull) or is
  given (offer) them.
* ``releasing``: the consumer let go and confirmed; the provider is asked to
  release.
* ``revoking``: the broker ends the lease (TTL, shutdown, admin, a failed
  export, reconciliation): consumer first, then provider. It may stay here
  as long as the consumer does not confirm; the budget stays held.
* final: ``released`` (normal end), ``revoked`` (ended by the broker),
  ``expired`` (ended by the broker because its TTL ran out), ``failed``
  (never became active).
"""

from __future__ import annotations

import array
import dataclasses
import enum
from collections.abc import Sequence

from .formats import BufferMeta, ReceiveMode, validate_meta
from .names import MAX_DOMID, parse_lease_id, parse_qube_name
from .qubeinfo import Domain

MAX_REF = 0xFFFFFFFF


class State(str, enum.Enum):
    """Lease states; the value is what the registry stores."""

    REQUESTED = "requested"
    EXPORTING = "exporting"
    ACTIVE = "active"
    RELEASING = "releasing"
    REVOKING = "revoking"
    RELEASED = "released"
    REVOKED = "revoked"
    EXPIRED = "expired"
    FAILED = "failed"


class Initiator(str, enum.Enum):
    """Which side started the lease: the consumer (pull) or provider (offer)."""

    LEASE = "lease"
    OFFER = "offer"


#: The whole graph: for each state, the states it may move to.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.REQUESTED: frozenset({State.EXPORTING, State.FAILED}),
    State.EXPORTING: frozenset({State.ACTIVE, State.FAILED, State.REVOKING}),
    State.ACTIVE: frozenset({State.RELEASING, State.REVOKING}),
    State.RELEASING: frozenset({State.RELEASED}),
    State.REVOKING: frozenset({State.REVOKED, State.EXPIRED, State.FAILED}),
    State.RELEASED: frozenset(),
    State.REVOKED: frozenset(),
    State.EXPIRED: frozenset(),
    State.FAILED: frozenset(),
}

INITIAL = State.REQUESTED
FINAL = frozenset(s for s, nexts in TRANSITIONS.items() if not nexts)
#: States that hold budget (pages of the provider, quota of the consumer).
LIVE = frozenset(TRANSITIONS) - FINAL
#: Live states in which a side effect may be in flight: after a broker crash
#: these leases must be reconciled with the qubes before anything else.
IN_FLIGHT = frozenset({State.REQUESTED, State.EXPORTING, State.RELEASING,
                       State.REVOKING})
#: Live states that the TTL still applies to (the others are already ending).
EXPIRABLE = frozenset({State.REQUESTED, State.EXPORTING, State.ACTIVE})


class IllegalTransition(ValueError):
    """A state change the state machine does not allow."""


class InvalidLease(ValueError):
    """Lease fields that cannot describe a real lease."""


def check_transition(old: State, new: State) -> None:
    """Raise :class:`IllegalTransition` unless ``old -> new`` is allowed."""
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(
            f"illegal lease transition {old.value} -> {new.value}")


def check_history(states: Sequence[State]) -> None:
    """Check a whole recorded history (initial state first) against the graph.

    Used on the audit trail, e.g. after a crash, to prove that no lease ever
    took a path the graph does not have.
    """
    if not states or states[0] != INITIAL:
        raise IllegalTransition("history does not start at 'requested'")
    for old, new in zip(states, states[1:]):
        check_transition(old, new)


@dataclasses.dataclass(frozen=True)
class Lease:
    """One lease as the registry records it.

    ``refs`` are empty until the lease becomes active. ``reason`` is the
    reason given for the latest transition: for a final lease, why it ended.
    Times are seconds since the epoch; ``deadline`` = ``created`` + ``ttl``.
    ``consumer_start``/``provider_start`` tell the run of each side's
    domain from a later one with the same domain id (qubesd's start_time;
    empty when unknown). A final lease keeps no refs: they name grants that
    no longer exist.
    """

    id: str
    consumer: str
    provider: str
    consumer_domid: int
    provider_domid: int
    mode: ReceiveMode
    initiator: Initiator
    meta: BufferMeta
    ttl: int
    created: float
    updated: float
    deadline: float
    state: State = INITIAL
    refs: tuple[int, ...] = ()
    reason: str = ""
    consumer_start: str = ""
    provider_start: str = ""

    @property
    def live(self) -> bool:
        """Whether the lease still holds budget."""
        return self.state in LIVE

    def sides(self) -> tuple[tuple[str, Domain], tuple[str, Domain]]:
        """(consumer, its domain), (provider, its domain) as the grant
        names them."""
        return ((self.consumer, Domain(self.consumer_domid,
                                       self.consumer_start)),
                (self.provider, Domain(self.provider_domid,
                                       self.provider_start)))

    @property
    def pages(self) -> int:
        return self.meta.pages


def new_lease(*, lease_id: str, consumer: str, provider: str,
              consumer_domid: int, provider_domid: int, mode: ReceiveMode,
              initiator: Initiator, meta: BufferMeta, ttl: int, now: float,
              reason: str = "requested", consumer_start: str = "",
              provider_start: str = "") -> Lease:
    """A lease in its initial state, with its invariants checked.

    The inputs come from the broker after it validated the request; the
    checks here guard the registry against a programming error, not a qube.
    """
    lease = Lease(id=parse_lease_id(lease_id),
                  consumer=parse_qube_name(consumer),
                  provider=parse_qube_name(provider),
                  consumer_domid=consumer_domid, provider_domid=provider_domid,
                  mode=ReceiveMode(mode), initiator=Initiator(initiator),
                  meta=validate_meta(meta, allowed_modifiers=None),
                  ttl=ttl, created=now, updated=now, deadline=now + ttl,
                  reason=reason, consumer_start=_run_id(consumer_start),
                  provider_start=_run_id(provider_start))
    if lease.consumer == lease.provider:
        raise InvalidLease("consumer and provider are the same qube")
    for domid in (consumer_domid, provider_domid):
        if not 0 <= domid <= MAX_DOMID:
            raise InvalidLease(f"domain id {domid} out of range")
    if ttl <= 0:
        raise InvalidLease("ttl must be positive")
    return lease


def advance(lease: Lease, new: State, *, reason: str, now: float,
            refs: Sequence[int] = ()) -> Lease:
    """Return ``lease`` moved to ``new``, or raise and change nothing.

    Refs arrive exactly once, when the lease becomes active, and must cover
    the buffer page for page (one grant reference per page).
    """
    check_transition(lease.state, new)
    if new == State.ACTIVE:
        _check_refs(refs, lease.meta.pages)
    elif refs:
        raise InvalidLease(f"refs given for a move to {new.value}")
    if not reason:
        raise InvalidLease("a transition needs a reason")
    if new == State.ACTIVE:
        kept = tuple(refs)
    else:
        kept = () if new in FINAL else lease.refs
    return dataclasses.replace(lease, state=new, reason=reason, updated=now,
                               refs=kept)


#: qubesd's start_time is a decimal number of seconds; room to spare.
MAX_RUN_ID = 40


def _run_id(value: str) -> str:
    if len(value) > MAX_RUN_ID or not value.isascii() or \
            not value.isprintable():
        raise InvalidLease(f"run id {value[:MAX_RUN_ID]!r} is not a short "
                           f"printable ASCII word")
    return value


def _check_refs(refs: Sequence[int], pages: int) -> None:
    if len(refs) != pages:
        raise InvalidLease(f"{len(refs)} refs for a buffer of {pages} pages")
    try:
        # array checks every ref in C (a Python test per ref cost the broker
        # 0.3 ms per 32 MiB lease); "I" is a u32 wherever Qubes runs
        array.array("I", refs)
    except (TypeError, OverflowError):
        raise InvalidLease("grant ref out of range (u32)") from None
