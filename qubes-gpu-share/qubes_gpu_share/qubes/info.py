"""What the broker knows about one qube, and what happens to qubes (pure).

Plain data, separate from the seam (:mod:`.facts`) so that the decision
core can take a :class:`QubeInfo` without importing anything that does I/O.
"""

from __future__ import annotations

import dataclasses
import enum
import types
from collections.abc import Mapping

from ..limits import enabled_services
from ..names import DOM0

#: Qubes' class of dom0; it has no virt_mode property and is PV.
ADMIN_VM = "AdminVM"
VIRT_MODES = ("pv", "pvh", "hvm")


@dataclasses.dataclass(frozen=True)
class QubeInfo:
    """A snapshot of one existing qube, as qubesd described it.

    ``xid`` is the Xen domain id, -1 when the qube is not running.
    ``features`` holds the qube's own features (strings, not inherited from
    its template: qvm-service flags are per qube in Qubes too).
    """

    name: str
    klass: str
    running: bool
    xid: int
    virt_mode: str
    features: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}))
    tags: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.virt_mode not in VIRT_MODES:
            raise ValueError(f"qube {self.name}: unknown virt_mode "
                             f"{self.virt_mode!r}")
        # a read-only copy: a snapshot must not change behind the decider
        object.__setattr__(self, "features",
                           types.MappingProxyType(dict(self.features)))
        object.__setattr__(self, "tags", frozenset(self.tags))

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
    """Qubes' own event names for the life cycle the broker follows."""

    START = "domain-start"
    PRE_SHUTDOWN = "domain-pre-shutdown"
    SHUTDOWN = "domain-shutdown"


@dataclasses.dataclass(frozen=True)
class QubeEvent:
    """``qube`` started or is shutting down / has shut down."""

    kind: EventKind
    qube: str


@dataclasses.dataclass(frozen=True)
class ServiceResult:
    """Exit status and (bounded) standard output of a qrexec service call."""

    status: int
    output: bytes
