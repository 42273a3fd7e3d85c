"""What the broker knows about one qube, and what happens to qubes (pure).

Plain data beside the pure core (decide.py reads it), filled by the
Qubes-facts seam (:mod:`.qubes.facts`): the core takes a :class:`QubeInfo`
without importing the seam's folder or anything that does I/O.
"""

from __future__ import annotations

import dataclasses
import enum
import types
from collections.abc import Mapping

from .limits import enabled_services
from .names import DOM0

#: Qubes' class of dom0; it has no virt_mode property and is PV.
ADMIN_VM = "AdminVM"
VIRT_MODES = ("pv", "pvh", "hvm")


class PowerState(str, enum.Enum):
    """qubesd's power states (``vm.get_power_state()``); the value is its
    word. ``NA`` is what qubesd (or qubesadmin, for an empty answer) says
    when it cannot tell: the broker reads it as "unknown", never as halted.
    """

    RUNNING = "Running"
    TRANSIENT = "Transient"
    PAUSED = "Paused"
    SUSPENDED = "Suspended"
    HALTING = "Halting"
    DYING = "Dying"
    CRASHED = "Crashed"
    HALTED = "Halted"
    UNKNOWN = "NA"

    @classmethod
    def of(cls, untrusted_word: object) -> PowerState:
        """qubesd's word, UNKNOWN for anything this module does not know."""
        try:
            return cls(str(untrusted_word))
        except ValueError:
            return cls.UNKNOWN


@dataclasses.dataclass(frozen=True)
class PowerRule:
    """What the broker may do with a qube in one power state.

    ``new_lease``: the qube may be a party to a new lease. ``keeps_lease``:
    its live leases stay (no revocation starts because of this state).
    ``ask_agent``: its agent can be asked to let go (GpuRevoke).
    ``gone``: no Xen domain of this qube exists, so nothing maps or grants
    for it any more: the other side may be told to release without its
    confirmation. Only ``Halted`` is gone; every state with a domain, and
    an unknown state, is not.
    """

    new_lease: bool
    keeps_lease: bool
    ask_agent: bool
    gone: bool


#: The one table of power states (docs/broker.md shows it with reasons).
#: Transient: starting (qrexec not up) or between libvirt states; Paused
#: and Suspended: the domain and its mappings exist, nothing answers;
#: Halting, Dying, Crashed: the domain still exists (a crashed one is kept
#: with its mappings) and is ending: revoke, but wait for Halted.
POWER_RULES: Mapping[PowerState, PowerRule] = types.MappingProxyType({
    PowerState.RUNNING: PowerRule(True, True, True, False),
    PowerState.TRANSIENT: PowerRule(False, True, False, False),
    PowerState.PAUSED: PowerRule(False, True, False, False),
    PowerState.SUSPENDED: PowerRule(False, True, False, False),
    PowerState.HALTING: PowerRule(False, False, False, False),
    PowerState.DYING: PowerRule(False, False, False, False),
    PowerState.CRASHED: PowerRule(False, False, False, False),
    PowerState.HALTED: PowerRule(False, False, False, True),
    PowerState.UNKNOWN: PowerRule(False, True, False, False),
})


@dataclasses.dataclass(frozen=True)
class Domain:
    """One run of a qube as a Xen domain: its domain id and what tells
    this run from another one with the same id (qubesd's ``start_time``;
    empty when qubesd gives none, and then only the id is compared)."""

    xid: int
    start: str = ""

    def same_run(self, other: Domain) -> bool:
        """Whether ``other`` is this domain (and not a later one that got
        the same id, or an earlier one of the same qube)."""
        return self.xid == other.xid and (
            not self.start or not other.start or self.start == other.start)


@dataclasses.dataclass(frozen=True)
class QubeInfo:
    """A snapshot of one existing qube, as qubesd described it.

    ``xid`` is the Xen domain id, -1 when the qube has no domain.
    ``start`` tells one run from another (see :class:`Domain`).
    ``features`` holds the qube's own features (strings, not inherited from
    its template: qvm-service flags are per qube in Qubes too).
    """

    name: str
    klass: str
    power: PowerState
    xid: int
    virt_mode: str
    features: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}))
    tags: frozenset[str] = frozenset()
    start: str = ""

    def __post_init__(self) -> None:
        if self.virt_mode not in VIRT_MODES:
            raise ValueError(f"qube {self.name}: unknown virt_mode "
                             f"{self.virt_mode!r}")
        object.__setattr__(self, "power", PowerState(self.power))
        # a read-only copy: a snapshot must not change behind the decider
        object.__setattr__(self, "features",
                           types.MappingProxyType(dict(self.features)))
        object.__setattr__(self, "tags", frozenset(self.tags))

    @property
    def rule(self) -> PowerRule:
        return POWER_RULES[self.power]

    @property
    def running(self) -> bool:
        """Running, with a domain id: the only state a new lease accepts."""
        return self.rule.new_lease and self.xid >= 0

    @property
    def domain(self) -> Domain | None:
        """The qube's current Xen domain, None when it has none (halted)."""
        if self.power is PowerState.HALTED or self.xid < 0:
            return None
        return Domain(self.xid, self.start)

    def runs_as(self, domain: Domain) -> bool:
        """Whether ``domain`` is this qube's current run."""
        current = self.domain
        return current is not None and current.same_run(domain)

    def gone_from(self, domain: Domain) -> bool:
        """Definitely not running as ``domain`` any more: halted, or running
        as another domain (Xen gives an id to one live domain only, and a
        qube runs as one domain at a time). Unknown is not gone."""
        if self.rule.gone:
            return True
        current = self.domain
        if current is None or self.power is PowerState.UNKNOWN:
            return False
        return not current.same_run(domain)

    @property
    def services(self) -> frozenset[str]:
        """Services enabled with ``qvm-service``."""
        return enabled_services(self.features)

    @property
    def is_dom0(self) -> bool:
        return self.klass == ADMIN_VM or self.name == DOM0

    @property
    def is_pv(self) -> bool:
        """PV guests (dom0 always) cannot build a dma-buf from grants."""
        return self.is_dom0 or self.virt_mode == "pv"


class EventKind(str, enum.Enum):
    """Qubes' own event names for what the broker follows, and the state of
    the event connection itself (qubesadmin's ``connection-established``;
    ``connection-lost`` is the seam's own word for a broken connection)."""

    START = "domain-start"
    PRE_SHUTDOWN = "domain-pre-shutdown"
    SHUTDOWN = "domain-shutdown"
    CONNECTED = "connection-established"
    LOST = "connection-lost"
    #: a feature of ``qube`` changed (``detail``: its name); the broker
    #: itself ignores it, the stand-in qubesd relays it
    FEATURE = "domain-feature-set"


@dataclasses.dataclass(frozen=True)
class QubeEvent:
    """``qube`` started or is shutting down / has shut down; for the
    connection events, ``qube`` is empty and ``detail`` says why."""

    kind: EventKind
    qube: str = ""
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class ServiceResult:
    """Exit status and (bounded) standard output of a qrexec service call."""

    status: int
    output: bytes
